"""The free-generation tasks PEMA is evaluated on, WebQuestions (:mod:`offsite.data.tasks`) and
NQ-open (:mod:`offsite.data.nq_open`), as documents or as (prompt, answer) pairs."""

from __future__ import annotations

from offsite.data.nq_open import load_nq_open
from offsite.data.tasks import Doc, load_task
from offsite.errors import OffsiteError

GENERATION_TASKS = ("webqs", "nq_open")


def task_docs(task: str, part: str) -> list[Doc]:
    """The documents of a generation task's ``part`` ("train" or "eval")."""
    if task == "nq_open":
        return load_nq_open(part)
    if task == "webqs":
        return load_task("webqs", part)
    raise OffsiteError(f"PEMA is evaluated on generation tasks: {', '.join(GENERATION_TASKS)} (got {task!r})")


def task_pairs(task: str, part: str = "train") -> list[tuple[str, str]]:
    """(prompt, " " + gold answer) pairs of a generation task."""
    return [(d.context, " " + d.target) for d in task_docs(task, part)]
