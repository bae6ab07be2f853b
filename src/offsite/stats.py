"""Paired statistics over per-document scores: differences of two rows and the transfer ratio.

Every row of the table is scored on the same documents, so a difference between two rows is best
estimated document by document: the paired standard error is much smaller than the unpaired one
when the two models agree on most documents.

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
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["above_noise", "paired", "transfer"]


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def _check(*rows: Sequence[float]) -> None:
    if not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("paired samples must be non-empty and of equal length (the same documents)")


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and paired standard error of ``a − b`` (same documents, same order)."""
    _check(a, b)
    d = [x - y for x, y in zip(a, b)]
    return _mean(d), math.sqrt(_var(d) / len(d))


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
