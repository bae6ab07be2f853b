"""Evaluation: lm-eval-compatible multiple choice, WebQuestions exact match, perplexity.

``evaluate(model, tokenizer, task)`` scores a model on one task's ``eval`` part (or on given
``docs``); ``METRIC[task]`` names the headline metric of the result (``acc`` for the multiple-choice
tasks, as the papers report; ``exact_match`` for webqs; ``ppl`` for held-out ``text``). A task may
also be a data owner's own file (a path, or an :class:`offsite.data.own.OwnTask`; see
``docs/own-task.md``): multiple choice is scored as the built-in tasks, generation by
:func:`offsite.eval.gen.score_generation`; :func:`metric_of` names its headline metric.
"""

from __future__ import annotations

from typing import Sequence

from offsite.data.tasks import TASKS, load_task
from offsite.errors import OffsiteError
from offsite.data.own import OwnTask, resolve_task
from offsite.eval.gen import score_generation, score_webqs
from offsite.eval.loglik import loglikelihood
from offsite.eval.mc import score_mc
from offsite.eval.ppl import perplexity

__all__ = ["correct", "document_scores", "evaluate", "metric_of", "METRIC", "EVAL_TASKS", "score_mc", "score_webqs", "score_generation",
           "perplexity", "loglikelihood"]

METRIC: dict[str, str] = {**{t: "acc" for t in TASKS if t != "webqs"}, "webqs": "exact_match",
                          "text": "ppl"}
EVAL_TASKS = tuple(METRIC)


def metric_of(task) -> str:
    """The headline metric of a built-in task name or an own task (file path or OwnTask)."""
    task = resolve_task(task)
    return task.metric if isinstance(task, OwnTask) else METRIC[task]


def evaluate(model, tokenizer, task, docs: Sequence | None = None, limit: int | None = None,
             batch_size: int = 32, progress: bool = True, max_length: int | None = None,
             return_details: bool = False) -> dict:
    """Score ``model`` on ``task``; returns the metric dict (with ``n``) of the task's scorer.

    ``docs`` defaults to ``load_task(task, "eval")`` (for ``text``: ``public_text("heldout")``);
    ``limit`` keeps the first ``limit`` of them — a fixed fair sample, since task parts come in a
    hash order. For ``text`` ``max_length`` is the window (default 512) and ``batch_size`` counts
    windows. ``return_details`` adds the per-document predictions of a multiple-choice task
    (``score_mc``'s ``details``) or of an own generation task (``score_generation``'s); other tasks
    ignore it.
    """
    task = resolve_task(task)  # OffsiteError for an unknown name or a bad file
    if limit is not None and limit < 1:
        raise OffsiteError(f"limit must be a positive number of documents, got {limit}")
    if task == "text":
        if docs is None:
            from offsite.data.text import public_text

            docs = public_text("heldout")
        docs = list(docs)[:limit]
        return perplexity(model, tokenizer, docs, max_length=max_length or 512,
                          batch_size=max(1, batch_size // 4), progress=progress)
    if isinstance(task, OwnTask):
        docs = list(task.docs if docs is None else docs)[:limit]
        if task.kind == "gen":
            return score_generation(model, tokenizer, docs, batch_size=batch_size, progress=progress,
                                    max_length=max_length, return_details=return_details)
        return score_mc(model, tokenizer, docs, batch_size=batch_size, progress=progress,
                        max_length=max_length, return_details=return_details)
    if docs is None:
        docs = load_task(task, "eval")
    docs = list(docs)[:limit]
    if task == "webqs":
        return score_webqs(model, tokenizer, docs, batch_size=batch_size, progress=progress,
                           max_length=max_length)
    return score_mc(model, tokenizer, docs, batch_size=batch_size, progress=progress,
                    max_length=max_length, return_details=return_details)


def document_scores(details: Sequence[dict]) -> list[float]:
    """Per-document correctness from :func:`evaluate`'s ``details`` (``return_details=True``), 1.0 or
    0.0: a multiple-choice document's prediction against its gold choice, a generation document's
    exact match. The one definition the paired statistics, the harm check and transfer read."""
    return [float(d["exact_match"]) if "exact_match" in d else float(d["pred"] == d["gold"]) for d in details]


def correct(model, tokenizer, task, limit: int | None = None, batch_size: int = 32, progress: bool = True,
            docs: Sequence | None = None) -> list[float]:
    """Per-document correctness (:func:`document_scores`) of ``model`` on ``task``: a multiple-choice
    task or a data owner's own generation task, scored as :func:`evaluate` scores it."""
    res = evaluate(model, tokenizer, task, docs=docs, limit=limit, batch_size=batch_size, progress=progress,
                   return_details=True)
    if "details" not in res:
        raise OffsiteError(f"{task} gives no per-document correctness (a multiple-choice task or an own "
                           "generation task does)")
    return document_scores(res["details"])
