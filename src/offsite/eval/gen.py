"""WebQuestions exact match, scored the way lm-evaluation-harness's ``webqs`` task does.

lm-eval's ``webqs`` (version 2.0) is an ``output_type: multiple_choice`` task, not free generation:
its choices are the accepted answers after ``_remove_prefixes`` (sort the aliases, drop any alias
that starts with the previously kept one), every choice is a gold target, and ``exact_match`` is 1
when *any* accepted answer's tokens are all the greedy (argmax) tokens after the prompt, i.e. when
greedy decoding would produce that answer. We implement exactly that on top of
``offsite.eval.loglik.loglikelihood``; stderr is lm-eval's ``mean_stderr``.
"""

from __future__ import annotations

from typing import Sequence

from offsite.data.tasks import Doc
from offsite.eval.loglik import loglikelihood, mean_stderr

__all__ = ["score_webqs", "webqs_choices"]


def webqs_choices(answers: Sequence[str]) -> list[str]:
    """lm-eval's ``webqs`` ``_remove_prefixes``: sorted aliases minus those extending the last kept one."""
    aliases = sorted(answers)
    kept = [aliases[0]]
    for a in aliases[1:]:
        if not a.startswith(kept[-1]):
            kept.append(a)
    return kept


def score_webqs(model, tokenizer, docs: Sequence[Doc], batch_size: int = 32, progress: bool = True,
                max_length: int | None = None, return_details: bool = False) -> dict:
    """exact_match, exact_match_stderr, n (and per-doc ``details`` on request)."""
    docs = list(docs)
    if not docs:
        raise ValueError("no documents to score")
    choices = []
    for d in docs:
        if not d.answers:
            raise ValueError(f"document {d.id} has no accepted answers")
        choices.append(webqs_choices(d.answers))
    reqs = [(d.context, " " + c) for d, cs in zip(docs, choices) for c in cs]
    res = loglikelihood(model, tokenizer, reqs, batch_size=batch_size, progress=progress,
                        max_length=max_length, desc="webqs")
    em, details, k = [], [], 0
    for d, cs in zip(docs, choices):
        greedy = [g for _, g in res[k: k + len(cs)]]
        k += len(cs)
        em.append(float(any(greedy)))
        if return_details:
            details.append({"id": d.id, "choices": cs, "greedy": greedy})
    out = {"exact_match": sum(em) / len(em), "exact_match_stderr": mean_stderr(em), "n": len(docs)}
    if return_details:
        out["details"] = details
    return out
