"""Membership inference against the data owner's adapter (``offsite privacy --side data``).

The question: the model owner receives the tuned adapter (and plugs it into its full model). Can it
tell which examples the data owner trained on? The test is the standard one: take the data owner's
training file (*members*) and a held-out file from the same distribution (*non-members*), score
every example with an attack, and report how well the score separates the two sets:

* **ROC AUC** (0.5: no better than a coin; 1.0: every member scores above every non-member), and
* **TPR at 1 % FPR** (the fraction of members caught when at most 1 % of non-members are wrongly
  flagged: the low-false-positive regime that matters for a real attacker, Carlini et al. 2022).
  With fewer than 100 non-members no false positive is allowed at all: the threshold is then the
  highest non-member score.

Each figure comes with a 95 % percentile bootstrap interval (members and non-members resampled
with replacement, separately, ``bootstrap`` times, seeded).

Attacks (every score: higher means "member"); an example's *loss* is its mean next-token loss over
its target tokens, as the data owner trained it (:func:`offsite.tune.tokenize`):

``loss``
    ``-loss_after`` (Yeom et al. 2018): members were trained on, so their loss is lower.
``loss_ref``
    ``loss_before - loss_after``: the loss attack calibrated by the model before tuning, which the
    model owner has (the full model, or the emulator as shipped): it removes how easy an example is
    anyway and keeps what tuning did to it (Carlini et al. 2022's reference-model idea with the
    best reference there is: the same model untuned).
``min_k``
    Min-k % probability (Shi et al. 2024): the mean log-probability of the k % least likely target
    tokens of the example (default k = 20 %); it needs no reference model.

Targets: ``plugged`` (the owner's full model with the adapter plugged in, reference: the full
model) and ``emulator`` (the bare adapter on the emulator it was tuned on, reference: the emulator
as shipped): the first is what the model owner deploys, the second needs only what crossed.
``before`` gives the same attacks on the untuned full model (``loss``, ``min_k``): with members and
non-members drawn from one distribution it should sit at AUC 0.5, a check of the split itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE
from ..errors import OffsiteError
from ..train import collate

ATTACKS = ("loss", "loss_ref", "min_k")


def token_logprobs(model, examples: list[dict], batch_size: int = 16, pad_id: int = 0) -> list[np.ndarray]:
    """Each example's log-probabilities of its target tokens (labels != -100 after the shift), in
    order, as float64 arrays; examples are scored in batches of similar length."""
    out: list[np.ndarray | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda j: len(examples[j]["input_ids"]))
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            b = collate([examples[j] for j in idx], pad_id, device)
            o = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)
            logits = (o.logits if hasattr(o, "logits") else o[0])[:, :-1].float()
            labels = b["labels"][:, 1:]
            lp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
            for row, j in enumerate(idx):
                keep = labels[row] != IGNORE
                out[j] = lp[row][keep].double().cpu().numpy()
    model.train(was)
    return out  # type: ignore[return-value]


def mean_loss(lp: np.ndarray) -> float:
    return float(-lp.mean()) if lp.size else float("nan")


def min_k(lp: np.ndarray, k: float = 0.2) -> float:
    """Mean of the ``ceil(k * n)`` lowest token log-probabilities (Shi et al.'s Min-k % Prob)."""
    if not lp.size:
        return float("nan")
    n = max(1, math.ceil(k * lp.size))
    return float(np.sort(lp)[:n].mean())


def scores(after: list[np.ndarray], before: list[np.ndarray] | None, k: float = 0.2) -> dict[str, np.ndarray]:
    """Attack scores per example (higher: member)."""
    out = {"loss": np.array([-mean_loss(a) for a in after]), "min_k": np.array([min_k(a, k) for a in after])}
    if before is not None:
        out["loss_ref"] = np.array([mean_loss(b) - mean_loss(a) for a, b in zip(after, before)])
    return out


def roc_auc(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """P(member score > non-member score) + P(tie) / 2 (the Mann-Whitney form of the ROC AUC)."""
    m, n = np.asarray(members, float), np.asarray(nonmembers, float)
    if not len(m) or not len(n):
        return float("nan")
    allv = np.concatenate([m, n])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    # average ranks for ties
    i = 0
    while i < len(allv):
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r = ranks[:len(m)].sum()
    return float((r - len(m) * (len(m) + 1) / 2) / (len(m) * len(n)))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float = 0.01) -> float:
    """The fraction of members scoring above the threshold that flags at most ``fpr`` of the
    non-members (``floor(fpr * n)`` of them; none with fewer than ``1 / fpr`` non-members)."""
    m, n = np.asarray(members, float), np.sort(np.asarray(nonmembers, float))[::-1]
    if not len(m) or not len(n):
        return float("nan")
    allowed = int(math.floor(fpr * len(n) + 1e-9))
    threshold = n[allowed] if allowed < len(n) else -np.inf  # flag scores strictly above it
    return float((m > threshold).mean())


def with_interval(members: np.ndarray, nonmembers: np.ndarray, fn, bootstrap: int = 1000, seed: int = 0) -> dict:
    """``fn(members, nonmembers)`` and its 95 % percentile bootstrap interval."""
    value = fn(members, nonmembers)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        mm = members[rng.integers(0, len(members), len(members))]
        nn = nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))]
        draws.append(fn(mm, nn))
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan")))
    return {"value": value, "ci95": [float(lo), float(hi)]}


def attack_report(member_scores: dict, nonmember_scores: dict, bootstrap: int = 1000, seed: int = 0,
                  fpr: float = 0.01) -> dict:
    """Per attack: ROC AUC and TPR at ``fpr`` FPR, each with its bootstrap interval."""
    out = {}
    for name in member_scores:
        m, n = member_scores[name], nonmember_scores[name]
        out[name] = {"auc": with_interval(m, n, roc_auc, bootstrap, seed),
                     f"tpr_at_{fpr:g}_fpr": with_interval(m, n, lambda a, b: tpr_at_fpr(a, b, fpr), bootstrap, seed)}
    return out


def membership(models: dict, members: list[dict], nonmembers: list[dict], batch_size: int = 16, pad_id: int = 0,
               k: float = 0.2, bootstrap: int = 1000, seed: int = 0, fpr: float = 0.01, logprobs=None) -> dict:
    """Run the attacks. ``models``: ``{target: (tuned model, reference model or None)}``, e.g.
    ``{"plugged": (plugged, full), "emulator": (emulator_with_adapter, emulator_as_shipped)}``;
    ``members``/``nonmembers``: tokenized examples (:func:`offsite.tune.tokenize`). Each model is
    scored once on each set, however many targets name it, by ``logprobs(model, examples,
    batch_size, pad_id)`` (default :func:`token_logprobs`; ``offsite privacy --reference-cache``
    passes one that reads the untuned models' from disk, :mod:`offsite.privacy.reference`). Returns
    ``{target: {attack: {"auc": ..., "tpr_at_0.01_fpr": ...}}}`` plus each target's mean losses."""
    if len(members) < 2 or len(nonmembers) < 2:
        raise OffsiteError(f"membership inference needs at least 2 members and 2 non-members (got {len(members)} "
                           f"and {len(nonmembers)})")
    cache: dict[int, tuple[list, list]] = {}

    def lps(model):
        if id(model) not in cache:
            score = logprobs or token_logprobs
            cache[id(model)] = (score(model, members, batch_size, pad_id), score(model, nonmembers, batch_size, pad_id))
        return cache[id(model)]

    out = {}
    for target, (tuned, ref) in models.items():
        (am, an) = lps(tuned)
        (bm, bn) = lps(ref) if ref is not None else (None, None)
        sm, sn = scores(am, bm, k), scores(an, bn, k)
        out[target] = {"attacks": attack_report(sm, sn, bootstrap, seed, fpr),
                       "mean_loss": {"members": float(np.mean([mean_loss(a) for a in am])),
                                     "nonmembers": float(np.mean([mean_loss(a) for a in an]))}}
    return out
