"""Paired statistics over per-document scores: differences of two rows and the transfer ratio.

Every row of the table is scored on the same documents, so a difference between two rows is best
estimated document by document (:func:`offsite.eval.paired.paired`, the paired standard error).

**Transfer** is the share of the adapter's possible gain that survives the emulator::

    transfer = (Plug-in − Full ZS) / (ceiling − Full ZS)

where the *ceiling* is the same adapter tuned on the full model (what a perfect emulator gives).
1 means the emulator carried the whole adaptation; 0 that the plug-in gained nothing. It is a
ratio of two paired means; its standard error is the delta-method (ratio-estimator) one:
with ``a_i = plugin_i − zs_i``, ``b_i = ceiling_i − zs_i`` and ``T = mean(a) / mean(b)``,
``se(T) = sd(a − T·b) / (sqrt(n) · |mean(b)|)``. Over several tasks (independent document sets)
the numerator and denominator are the averages of the per-task means, and the variance adds up
task by task. A ceiling whose gain is within noise of zero makes the ratio meaningless; callers
report it only where the ceiling's gain is at least two standard errors.

**Over training seeds** (:func:`paired_seeds`, :func:`transfer_seeds`) a row is scored once per seed on
the same documents. The estimate is the statistic of the seed-averaged rows; its standard error adds
two parts: the documents' (the paired standard error above, on the seed-averaged per-document scores)
and the seeds' (the variance of the per-seed statistics over the seeds, divided by their number).
The seed part also holds some document noise, so the sum errs on the wide side; with one seed it is
the document part alone.
"""

from __future__ import annotations

import math
from typing import Sequence

from ..eval.paired import check_paired as _check, mean as _mean, paired, variance as _var

__all__ = ["above_noise", "paired_seeds", "transfer", "transfer_seeds"]


def above_noise(t: dict) -> bool:
    """Whether a :func:`transfer` result means anything: the ceiling gains at least two standard
    errors over the row it is measured from (Full ZS, or the floor for transfer beyond the floor)."""
    return t["value"] is not None and t["ceiling_gain"] > 2 * t["ceiling_gain_stderr"]


def transfer(plugin: Sequence[Sequence[float]], zs: Sequence[Sequence[float]],
             ceiling: Sequence[Sequence[float]]) -> dict:
    """Transfer over one or more tasks, each given as per-document scores of the three rows.

    Returns ``{"value", "stderr", "ceiling_gain", "ceiling_gain_stderr", "plugin_gain",
    "plugin_gain_stderr", "n"}`` (the gains: paired means of ceiling − Full ZS and Plug-in − Full ZS,
    averaged over the tasks, with their standard errors); ``value`` and ``stderr`` are ``None`` when
    the ceiling gains nothing.
    """
    if not plugin or not (len(plugin) == len(zs) == len(ceiling)):
        raise ValueError("transfer needs the same tasks for the Plug-in, Full ZS and ceiling rows")
    num, den, parts = [], [], []
    for p, z, c in zip(plugin, zs, ceiling):
        _check(p, z, c)
        a = [x - y for x, y in zip(p, z)]
        b = [x - y for x, y in zip(c, z)]
        num.append(_mean(a))
        den.append(_mean(b))
        parts.append((a, b))
    k = len(parts)
    big_a, big_b = sum(num) / k, sum(den) / k
    gain_se = math.sqrt(sum(_var(b) / len(b) for _, b in parts)) / k
    gains = {"plugin_gain": big_a, "plugin_gain_stderr": math.sqrt(sum(_var(a) / len(a) for a, _ in parts)) / k}
    n = sum(len(a) for a, _ in parts)
    if big_b == 0:
        return {"value": None, "stderr": None, "ceiling_gain": 0.0, "ceiling_gain_stderr": gain_se, **gains, "n": n}
    t = big_a / big_b
    var = sum(_var([x - t * y for x, y in zip(a, b)]) / len(a) for a, b in parts) / k ** 2
    return {"value": t, "stderr": math.sqrt(var) / abs(big_b), "ceiling_gain": big_b,
            "ceiling_gain_stderr": gain_se, **gains, "n": n}


def _seed_mean(rows: Sequence[Sequence[float]]) -> list[float]:
    """Per-document means over seeds of one row (each seed's scores on the same documents)."""
    _check(*rows)
    return [sum(col) / len(rows) for col in zip(*rows)]


def _seed_rows(rows, k: int) -> list:
    """A row given once (seed-independent, like Full ZS) repeated for ``k`` seeds; else as given."""
    rows = list(rows)
    if rows and not isinstance(rows[0], (list, tuple)):
        return [rows] * k
    if len(rows) not in (1, k):
        raise ValueError(f"a row has {len(rows)} seeds where the others have {k}")
    return rows * k if len(rows) == 1 else rows


def paired_seeds(a, b) -> tuple[float, float]:
    """Mean and standard error (documents and seeds, module docstring) of ``a − b`` where each of ``a``
    and ``b`` is a list of per-seed per-document scores, or one per-document list (seed-independent)."""
    k = max(len(r) if r and isinstance(r[0], (list, tuple)) else 1 for r in (a, b))
    a, b = _seed_rows(a, k), _seed_rows(b, k)
    mean, se_doc = paired(_seed_mean(a), _seed_mean(b))
    per_seed = [paired(x, y)[0] for x, y in zip(a, b)]
    return mean, math.sqrt(se_doc ** 2 + _var(per_seed) / k)


def transfer_seeds(plugin, base, ceiling) -> dict:
    """:func:`transfer` of one task over training seeds: rows as in :func:`paired_seeds`. Adds
    ``seeds`` (how many), ``per_seed`` (each seed's transfer) and the seed part of the standard error
    to ``stderr`` and to the two gains' standard errors."""
    k = max(len(r) if r and isinstance(r[0], (list, tuple)) else 1 for r in (plugin, base, ceiling))
    plugin, base, ceiling = (_seed_rows(r, k) for r in (plugin, base, ceiling))
    t = transfer([_seed_mean(plugin)], [_seed_mean(base)], [_seed_mean(ceiling)])
    singles = [transfer([p], [z], [c]) for p, z, c in zip(plugin, base, ceiling)]
    for key, part in (("plugin_gain", "plugin_gain"), ("ceiling_gain", "ceiling_gain")):
        t[f"{key}_stderr"] = math.sqrt(t[f"{key}_stderr"] ** 2 + _var([s[part] for s in singles]) / k)
    t["per_seed"] = [s["value"] for s in singles]
    if t["value"] is not None:
        known = [v for v in t["per_seed"] if v is not None]
        t["stderr"] = math.sqrt(t["stderr"] ** 2 + (_var(known) / k if len(known) == k else math.inf))
    t["seeds"] = k
    return t
