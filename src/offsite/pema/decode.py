"""Inference with Gradual Unrolling (GU): PEMA's distribution mixed into the model's, step by step.

At generation step ``t`` (``t = 0`` predicts the first token after the prompt) the data owner asks
the owner for ``P_LM`` and the representation ``f`` of the current context, computes
``P_PEMA = softmax(W_hd · LN(B_pd · s·A·f))`` and takes the greedy token of::

    P(w) = λ_t · P_PEMA(w) + (1 − λ_t) · P_LM(w)        (in log space, with logsumexp)

**The schedule** (official ``generation/utils.py``; docs/pema.md), with ``L`` the length the
interpolation spans and ``m`` the "minimum" (0 in the paper)::

    λ_0 = λmax
    λ_t = (λmax · (1 − t/L))² · (1 − m) + m      for 1 ≤ t < L
    λ_t = 0                                       for t ≥ L   (interpolation stops)

(The code keeps ``λ_cur`` and subtracts ``λmax/L`` after each step while that stays positive, applies
``λ_cur²/y + (y−1)/y`` with ``y = 1/(1 − m%)``, and stops mixing once the reference's ``L`` label
tokens have been popped; the closed form above is the same numbers, see ``tests/test_pema.py``.)
``gradual=False`` keeps ``λ_t = λmax`` for ``t < L`` (the code without ``--gradual_unrolling``).

**L without the reference.** The code sets ``L`` to the token count of the *reference* sequence
(prompt + gold target, without BOS) — the test answer's length leaks into decoding. That is the second
apparent slip we correct: by default ``L = P + max(1, round(ρ·P))`` with ``P`` the prompt's token
count (without BOS) and ``ρ`` the target/prompt token ratio of the **training** pairs (stored with the
memory, so nothing about the test answer is used; ``length_ratio`` overrides it). For our QA tasks the
prompt is the source. ``length="reference"`` restores the code's rule and needs the reference targets
(an explicit option, for comparisons only). ``count_prompt=False`` makes ``L`` count target tokens
only (not the code's rule; offered because the paper's text does not pin it down).

With ``λmax = 0`` every step takes the model's own argmax: decoding is the model's greedy decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from offsite.errors import OffsiteError
from offsite.pema.memory import source_length

__all__ = ["GUOptions", "gu_lambda", "interpolation_length", "mix_logprobs", "pema_logprobs", "generate",
           "score_requests", "score_webqs_pema", "score_generation"]


@dataclass
class GUOptions:
    lambda_max: float = field(default=0.9, metadata={"help": "λmax of Gradual Unrolling (paper: 0.9; 0 = the model alone)"})
    minimum: float = field(default=0.0, metadata={"help": "GU minimum m as a fraction (paper: 0)"})
    gradual: bool = field(default=True, metadata={"help": "decay λ (GU); --no-gradual keeps λ = λmax"})
    length: str = field(default="estimate", metadata={"help": "interpolation length L: 'estimate' (from the "
                                                              "prompt length) or 'reference' (the code's; leaks)"})
    length_ratio: float | None = field(default=None, metadata={"help": "target/prompt token ratio for the "
                                                                       "estimate (default: the training pairs')"})
    count_prompt: bool = field(default=True, metadata={"help": "L includes the prompt tokens (the code's rule)"})

    def check(self) -> None:
        if not 0.0 <= self.lambda_max <= 1.0:
            raise OffsiteError(f"lambda_max must be in [0, 1] (got {self.lambda_max})")
        if not 0.0 <= self.minimum < 1.0:
            raise OffsiteError(f"the GU minimum must be in [0, 1) (got {self.minimum})")
        if self.length not in ("estimate", "reference"):
            raise OffsiteError(f"length must be 'estimate' or 'reference' (got {self.length!r})")
        if self.length_ratio is not None and not self.length_ratio > 0:
            raise OffsiteError(f"length_ratio must be > 0 (got {self.length_ratio})")


def gu_lambda(t: int, L: int, lambda_max: float, minimum: float = 0.0, gradual: bool = True) -> float:
    """λ_t of the schedule in the module docstring."""
    if lambda_max == 0.0 or t >= L:
        return 0.0
    if t == 0 or not gradual:
        return float(lambda_max)
    cur = lambda_max * (1.0 - t / L)
    return cur * cur * (1.0 - minimum) + minimum


def interpolation_length(prompt_len: int, opts: GUOptions, ratio: float | None,
                         reference_len: int | None = None) -> int:
    """``L`` for a prompt of ``prompt_len`` tokens (without BOS); see the module docstring.
    (With ``lambda_max = 0`` nothing is mixed and ``L`` is irrelevant: 1 is returned.)"""
    if opts.lambda_max == 0.0:
        return 1
    if opts.length == "reference":
        if reference_len is None:
            raise OffsiteError("length='reference' needs the reference targets")
        target = reference_len
    else:
        r = opts.length_ratio if opts.length_ratio is not None else ratio
        if r is None:
            raise OffsiteError("no target/prompt length ratio: pass length_ratio or use a trained PEMA "
                               "(it stores its training pairs' ratio)")
        target = max(1, round(r * prompt_len))
    return max(1, target + (prompt_len if opts.count_prompt else 0))


def mix_logprobs(lm: torch.Tensor, pema: torch.Tensor | None, lam: float) -> torch.Tensor:
    """log(λ·P_PEMA + (1−λ)·P_LM) from log-probabilities; exactly ``lm`` when λ = 0."""
    if lam == 0.0 or pema is None:
        return lm
    if lam == 1.0:
        return pema
    return torch.logsumexp(torch.stack([lm + math.log(1.0 - lam), pema + math.log(lam)]), dim=0)


def pema_logprobs(pema, head, hidden: torch.Tensor) -> torch.Tensor:
    """log P_PEMA for representations ``hidden`` [..., d] (no dropout: call on an eval-mode PEMA)."""
    with torch.no_grad():
        _, h_pd = pema(hidden.float())
        return F.log_softmax(head(h_pd).float(), dim=-1)


def _bos(tokenizer):
    return getattr(tokenizer, "bos_token_id", None)


def _lambdas(n: int, L: int, opts: GUOptions) -> list[float]:
    return [gu_lambda(t, L, opts.lambda_max, opts.minimum, opts.gradual) for t in range(n)]


def generate(backend, prompts: Sequence[str], pema=None, head=None, opts: GUOptions | None = None,
             ratio: float | None = None, max_new_tokens: int = 32, stop_strings: Sequence[str] = (),
             stop_at_eos: bool = True, references: Sequence[str] | None = None, batch_size: int | None = None,
             progress: bool = False) -> list[str]:
    """Greedy generation with GU for each prompt; returns the generated texts (after the prompt).

    Each step sends the whole current sequence (the service is stateless), so a step costs one
    forward over prompt + generated tokens. Generation ends at EOS, at the first of
    ``stop_strings`` (the text is cut there) or after ``max_new_tokens`` tokens.
    """
    opts = opts or GUOptions()
    opts.check()
    tok = backend.tokenizer()
    if opts.lambda_max > 0 and (pema is None or head is None):
        raise OffsiteError("lambda_max > 0 needs a trained PEMA and the owner's shared head")
    from offsite.eval.loglik import encode_pair

    limits = backend.info().get("limits", {})
    bs = min(batch_size or 16, int(limits.get("max_batch", 16)), int(limits.get("max_logprob_rows", 16)))
    eos = getattr(tok, "eos_token_id", None)
    bos = _bos(tok)
    items = []
    for i, p in enumerate(prompts):
        ids = list(tok(p)["input_ids"])
        if not ids:
            raise OffsiteError(f"prompt {i} is empty after tokenisation")
        ref_len = None
        if opts.length == "reference":
            if references is None:
                raise OffsiteError("length='reference' needs the reference targets")
            ref_len = len(encode_pair(tok, p, references[i])[1])
        L = interpolation_length(source_length(ids, bos), opts, ratio, ref_len)
        items.append({"ids": ids, "gen": [], "L": L, "done": False})
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), desc="pema generate", leave=False)
    for i in range(0, len(items), bs):
        group = items[i:i + bs]
        for t in range(max_new_tokens):
            active = [it for it in group if not it["done"]]
            if not active:
                break
            seqs = [it["ids"] + it["gen"] for it in active]
            lams = [gu_lambda(t, it["L"], opts.lambda_max, opts.minimum, opts.gradual) for it in active]
            need_hidden = any(lam > 0 for lam in lams)
            res = backend.forward(seqs, start=[len(s) - 1 for s in seqs], hidden=need_hidden, logprobs=True)
            for it, r, lam in zip(active, res, lams):
                lm = r["logprobs"][-1]
                pp = pema_logprobs(pema, head, r["hidden"][-1]) if lam > 0 else None
                nxt = int(mix_logprobs(lm, pp, lam).argmax())
                it["gen"].append(nxt)
                if stop_at_eos and eos is not None and nxt == eos:
                    it["done"] = True
                elif stop_strings:
                    text = tok.decode(it["gen"], skip_special_tokens=True)
                    if any(s in text for s in stop_strings):
                        it["done"] = True
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    out = []
    for it in items:
        text = tok.decode(it["gen"], skip_special_tokens=True)
        for s in stop_strings:
            k = text.find(s)
            if k != -1:
                text = text[:k]
        out.append(text)
    return out


def score_requests(backend, requests: Sequence[tuple[str, str]], pema=None, head=None,
                   opts: GUOptions | None = None, ratio: float | None = None,
                   progress: bool = False) -> list[tuple[float, bool]]:
    """For each (context, continuation): the sum of the *mixed* log-probabilities of the
    continuation's tokens and whether each is the mixed greedy token — lm-eval's loglikelihood
    request, under GU decoding (the continuation's tokens are steps t = 0, 1, ...; with
    ``length='reference'`` the continuation is the reference)."""
    opts = opts or GUOptions()
    opts.check()
    if opts.lambda_max > 0 and (pema is None or head is None):
        raise OffsiteError("lambda_max > 0 needs a trained PEMA and the owner's shared head")
    from offsite.eval.loglik import encode_pair

    tok = backend.tokenizer()
    bos = _bos(tok)
    limits = backend.info().get("limits", {})
    max_rows, max_batch = int(limits.get("max_logprob_rows", 2048)), int(limits.get("max_batch", 64))
    max_len = int(limits.get("max_seq_len", 1 << 30))
    enc = []
    for ctx, cont in requests:
        c, t = encode_pair(tok, ctx, cont)
        c, t = list(c), list(t)
        if not t:
            raise OffsiteError(f"empty continuation after tokenisation: {cont!r}")
        if len(t) > max_rows:
            raise OffsiteError(f"a continuation of {len(t)} tokens exceeds the service's max_logprob_rows")
        L = interpolation_length(source_length(c, bos), opts, ratio, len(t))
        seq = c + t[:-1]
        if len(seq) > max_len:  # keep the continuation, drop context from the left (as lm-eval)
            cut = len(seq) - max_len
            seq, c = seq[cut:], c[cut:]
        enc.append((seq, len(c) - 1, t, L))
    out: list[tuple[float, bool] | None] = [None] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
    batches, cur, rows = [], [], 0
    for i in order:
        n = len(enc[i][2])
        if cur and (rows + n > max_rows or len(cur) >= max_batch):
            batches.append(cur)
            cur, rows = [], 0
        cur.append(i)
        rows += n
    if cur:
        batches.append(cur)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(enc), desc="pema score", leave=False)
    for b in batches:
        lams = {i: _lambdas(len(enc[i][2]), enc[i][3], opts) for i in b}
        need_hidden = any(any(x > 0 for x in lams[i]) for i in b)
        res = backend.forward([enc[i][0] for i in b], start=[enc[i][1] for i in b], hidden=need_hidden,
                              logprobs=True)
        for i, r in zip(b, res):
            target = torch.tensor(enc[i][2])
            lm = r["logprobs"]
            pp = pema_logprobs(pema, head, r["hidden"]) if need_hidden and any(x > 0 for x in lams[i]) else None
            mixed = torch.stack([mix_logprobs(lm[k], pp[k] if pp is not None else None, lam)
                                 for k, lam in enumerate(lams[i])])
            ll = float(mixed.gather(1, target[:, None]).sum())
            out[i] = (ll, bool((mixed.argmax(-1) == target).all()))
        if bar is not None:
            bar.update(len(b))
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]


def score_webqs_pema(backend, docs, pema=None, head=None, opts: GUOptions | None = None,
                     ratio: float | None = None, progress: bool = False) -> dict:
    """WebQuestions exact match as ``offsite.eval.gen.score_webqs`` (lm-eval's rule: some accepted
    answer is the greedy continuation), with the greedy continuation taken under GU."""
    from offsite.eval.gen import webqs_choices
    from offsite.eval.loglik import mean_stderr

    docs = list(docs)
    if not docs:
        raise OffsiteError("no documents to score")
    choices = [webqs_choices(d.answers) for d in docs]
    reqs = [(d.context, " " + c) for d, cs in zip(docs, choices) for c in cs]
    res = score_requests(backend, reqs, pema, head, opts, ratio, progress)
    em, k = [], 0
    for cs in choices:
        em.append(float(any(g for _, g in res[k:k + len(cs)])))
        k += len(cs)
    return {"exact_match": sum(em) / len(em), "exact_match_stderr": mean_stderr(em), "n": len(docs)}


def score_generation(backend, docs, pema=None, head=None, opts: GUOptions | None = None,
                     ratio: float | None = None, max_new_tokens: int = 32, progress: bool = False,
                     return_predictions: bool = False) -> dict:
    """Free greedy generation (with GU) scored by NQ-open exact match (:mod:`offsite.data.nq_open`)."""
    from offsite.eval.loglik import mean_stderr
    from offsite.data.nq_open import STOP_STRINGS, exact_match

    docs = list(docs)
    if not docs:
        raise OffsiteError("no documents to score")
    opts = opts or GUOptions()
    refs = [" " + d.answers[0] for d in docs] if opts.length == "reference" else None
    preds = generate(backend, [d.context for d in docs], pema, head, opts, ratio, max_new_tokens,
                     STOP_STRINGS, references=refs, progress=progress)
    em = [exact_match(p, d.answers) for p, d in zip(preds, docs)]
    out = {"exact_match": sum(em) / len(em), "exact_match_stderr": mean_stderr(em), "n": len(docs)}
    if return_predictions:
        out["predictions"] = preds
    return out
