"""Multiple-choice scoring with lm-evaluation-harness's ``multiple_choice`` semantics.

For each document every choice is scored as the continuation ``" " + choice`` of ``doc.context``
(lm-eval's default ``target_delimiter``) by its summed token log-likelihood
(``offsite.eval.loglik.loglikelihood``, which shares each question's context across its choices).

* ``acc``: the argmax of the log-likelihoods is the gold choice (first index wins ties, as
  ``numpy.argmax``).
* ``acc_norm``: the argmax of log-likelihood / ``len(choice)`` — lm-eval divides by the length of
  the choice *string* in characters, without the delimiter space (``completion_len`` in
  ``ConfigurableTask.process_results``); that is bytes for ASCII text.
* ``*_stderr``: lm-eval's ``mean_stderr`` = sqrt(p(1-p)/(n-1)).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from offsite.data.tasks import Doc
from offsite.eval.loglik import loglikelihood, mean_stderr

__all__ = ["score_mc", "mc_requests"]


def mc_requests(docs: Sequence[Doc]) -> list[tuple[str, str]]:
    """The (context, continuation) requests of the docs, doc by doc, choice by choice."""
    return [(d.context, " " + c) for d in docs for c in d.choices]


def score_mc(model, tokenizer, docs: Sequence[Doc], batch_size: int = 32, progress: bool = True,
             max_length: int | None = None, share_context: bool = True,
             return_details: bool = False, **loglik_options) -> dict:
    """Score multiple-choice docs; returns acc, acc_stderr, acc_norm, acc_norm_stderr, n.

    With ``return_details`` the result also has ``details``: per doc ``{"id", "lls", "pred",
    "pred_norm", "gold"}`` (for parity checks against lm-eval).
    """
    docs = list(docs)
    if not docs:
        raise ValueError("no documents to score")
    for d in docs:
        if not d.choices or not 0 <= d.gold < len(d.choices):
            raise ValueError(f"document {d.id} is not a multiple-choice doc with a valid gold index")
    res = loglikelihood(model, tokenizer, mc_requests(docs), batch_size=batch_size, progress=progress,
                        max_length=max_length, share_context=share_context, desc="multiple choice",
                        **loglik_options)
    acc, acc_norm, details = [], [], []
    k = 0
    for d in docs:
        lls = np.array([ll for ll, _ in res[k: k + len(d.choices)]])
        k += len(d.choices)
        lens = np.array([float(len(c)) for c in d.choices])
        pred, pred_norm = int(np.argmax(lls)), int(np.argmax(lls / lens))
        acc.append(float(pred == d.gold))
        acc_norm.append(float(pred_norm == d.gold))
        if return_details:
            details.append({"id": d.id, "lls": lls.tolist(), "pred": pred, "pred_norm": pred_norm,
                            "gold": d.gold})
    out = {"acc": float(np.mean(acc)), "acc_stderr": mean_stderr(acc),
           "acc_norm": float(np.mean(acc_norm)), "acc_norm_stderr": mean_stderr(acc_norm),
           "n": len(docs)}
    if return_details:
        out["details"] = details
    return out
