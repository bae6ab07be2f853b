"""WebQuestions exact match, scored the way lm-evaluation-harness's ``webqs`` task does.

lm-eval's ``webqs`` (version 2.0) is an ``output_type: multiple_choice`` task, not free generation:
its choices are the accepted answers after ``_remove_prefixes`` (sort the aliases, drop any alias
that starts with the previously kept one), every choice is a gold target, and ``exact_match`` is 1
when *any* accepted answer's tokens are all the greedy (argmax) tokens after the prompt, i.e. when
greedy decoding would produce that answer. We implement exactly that on top of
``offsite.eval.loglik.loglikelihood``; stderr is lm-eval's ``mean_stderr``.

A data owner's own generation task (:mod:`offsite.data.own`) is scored by free greedy generation
instead (:func:`score_generation`): the continuation up to its first newline, exact match and token
F1 against the best accepted answer after SQuAD's normalisation.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

from offsite.data.tasks import Doc
from offsite.eval.loglik import loglikelihood, mean_stderr

__all__ = ["score_webqs", "webqs_choices", "score_generation", "greedy_continuation", "normalize_answer",
           "answer_f1"]


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


# --- a data owner's generation task: greedy continuation, exact match and F1 ---------------------

#: New tokens generated per document at most; the answer is the continuation up to its first newline.
MAX_NEW_TOKENS = 32


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCT = set(string.punctuation)


def answer_f1(prediction: str, answer: str) -> float:
    """SQuAD's token F1 between normalised prediction and answer."""
    p, a = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not p or not a:
        return float(p == a)
    common = Counter(p) & Counter(a)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(a)
    return 2 * precision * recall / (precision + recall)


def greedy_continuation(model, tokenizer, context: str, max_new_tokens: int = MAX_NEW_TOKENS,
                        max_length: int | None = None) -> str:
    """The greedy (argmax) continuation of ``context`` up to its first newline (newlines before
    any text are skipped), EOS or ``max_new_tokens`` tokens, stripped. The context is encoded as
    the scorer encodes it (lm-eval's rule, :func:`offsite.eval.loglik.encode_pair`); every step is
    a full forward pass, so it holds for any emulator block, with or without a KV cache."""
    import torch

    from offsite.eval.loglik import encode_pair, model_max_length

    max_length = max_length or model_max_length(model, tokenizer)
    ctx, _ = encode_pair(tokenizer, context, "")
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    new: list[int] = []
    for _ in range(max_new_tokens):
        ids = (ctx + new)[-max_length:]
        logits = model(input_ids=torch.tensor([ids], device=device), use_cache=False).logits[0, -1]
        t = int(logits.argmax())
        if t == eos:
            break
        new.append(t)
        if "\n" in tokenizer.decode(new, skip_special_tokens=True).lstrip("\n"):
            break
    text = tokenizer.decode(new, skip_special_tokens=True).lstrip("\n")
    return text.split("\n")[0].strip()


def score_generation(model, tokenizer, docs: Sequence[Doc], batch_size: int = 32, progress: bool = True,
                     max_length: int | None = None, max_new_tokens: int = MAX_NEW_TOKENS,
                     return_details: bool = False) -> dict:
    """exact_match and f1 (each with its stderr), n; per document the greedy answer against the best
    of its accepted ``answers`` (SQuAD normalisation). ``batch_size`` is unused: one document per
    pass keeps the context unpadded."""
    import torch
    from tqdm.auto import tqdm

    docs = list(docs)
    if not docs:
        raise ValueError("no documents to score")
    em, f1, details = [], [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for d in tqdm(docs, disable=not progress, desc="generation", leave=False):
                if not d.answers:
                    raise ValueError(f"document {d.id} has no accepted answers")
                pred = greedy_continuation(model, tokenizer, d.context, max_new_tokens, max_length)
                em.append(float(any(normalize_answer(pred) == normalize_answer(a) for a in d.answers)))
                f1.append(max(answer_f1(pred, a) for a in d.answers))
                if return_details:
                    details.append({"id": d.id, "prediction": pred, "answers": list(d.answers),
                                    "exact_match": em[-1], "f1": f1[-1]})
    finally:
        model.train(was_training)
    out = {"exact_match": sum(em) / len(em), "exact_match_stderr": mean_stderr(em),
           "f1": sum(f1) / len(f1), "f1_stderr": mean_stderr(f1), "n": len(docs)}
    if return_details:
        out["details"] = details
    return out
