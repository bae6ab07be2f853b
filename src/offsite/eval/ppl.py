"""Perplexity of documents, like lm-evaluation-harness's ``wikitext`` task (``loglikelihood_rolling``).

Each document is tokenised whole (tokenizer defaults, as lm-eval) and prefixed with the BOS token
(else EOS), lm-eval's ``prefix_token_id``. Its tokens are predicted in consecutive chunks of
``stride`` tokens (default ``max_length``, i.e. lm-eval's disjoint rolling windows); the window that
predicts a chunk is the up-to-``max_length`` tokens ending just before the chunk's last token, so
every token is predicted exactly once with as much left context as fits (``stride < max_length``
gives every chunk at least ``max_length - stride`` tokens of context: lower, slower perplexity).
The default ``max_length=512`` is Offsite-Tuning's block size for WikiText.

Metrics, summed over documents as lm-eval's ``weighted_perplexity``: ``word_perplexity``
(words = ``re.split(r"\\s+", doc)``), ``byte_perplexity`` (UTF-8 bytes), ``bits_per_byte`` and
``token_perplexity`` (= ``ppl``). lm-eval gives these no stderr; we add ``bits_per_byte_stderr``
and ``ppl_stderr`` from the ratio estimator over documents (documents as the sampling unit,
delta method for the exponential) — meaningful when there are many documents.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import torch

from offsite.eval import loglik as L

__all__ = ["perplexity", "rolling_windows"]


def rolling_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, a, b): predict tokens[a:b] from ext[start:b], where ext = [prefix] + tokens."""
    out, a = [], 0
    while a < n_tokens:
        b = min(a + stride, n_tokens)
        out.append((max(0, b - max_length), a, b))
        a = b
    return out


def _ratio_stderr(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2 or sum(y) == 0:
        return float("nan")
    r = sum(x) / sum(y)
    var = n / (n - 1) * sum((xi - r * yi) ** 2 for xi, yi in zip(x, y)) / sum(y) ** 2
    return math.sqrt(var)


def perplexity(model, tokenizer, docs: Sequence[str], max_length: int = 512, stride: int | None = None,
               batch_size: int = 8, progress: bool = True) -> dict:
    """word/byte/token perplexity and bits per byte of ``docs`` (see the module docstring)."""
    from tqdm.auto import tqdm

    docs = [d for d in docs]
    if not docs:
        raise ValueError("no documents to score")
    stride = max_length if stride is None else stride
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    prefix = L._prefix_token(tokenizer)
    toks = L._encode_many(tokenizer, docs)
    groups, owner = [], []
    for di, t in enumerate(toks):
        ext = [prefix] + t
        for start, a, b in rolling_windows(len(t), max_length, stride):
            g = L._Group(ext[start:b], [L._Member(len(owner), t[a:b], [], a - start)])
            groups.append(g)
            owner.append(di)
    order = sorted(range(len(groups)), key=lambda i: -len(groups[i].prefix))
    body, takes_pos, _ = L._body(model)
    head = L._head(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ll = [0.0] * len(docs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            bar = tqdm(total=len(groups), disable=not progress, desc="perplexity", leave=False)
            for s in range(0, len(order), max(1, batch_size)):
                batch = [groups[i] for i in order[s: s + batch_size]]
                for req, v, _ in L._run_batch(model, body, takes_pos, head, batch, pad, device):
                    ll[owner[req]] += v
                bar.update(len(batch))
            bar.close()
    finally:
        model.train(was_training)
    words = [len(re.split(r"\s+", d)) for d in docs]
    nbytes = [len(d.encode("utf-8")) for d in docs]
    ntok = [len(t) for t in toks]
    nll = [-v for v in ll]
    tot = sum(nll)
    ppl = math.exp(tot / sum(ntok))
    return {
        "ppl": ppl,
        "ppl_stderr": ppl * _ratio_stderr(nll, ntok),
        "token_perplexity": ppl,
        "word_perplexity": math.exp(tot / sum(words)),
        "byte_perplexity": math.exp(tot / sum(nbytes)),
        "bits_per_byte": tot / sum(nbytes) / math.log(2),
        "bits_per_byte_stderr": _ratio_stderr(nll, nbytes) / math.log(2),
        "n": len(docs),
        "tokens": sum(ntok),
    }
