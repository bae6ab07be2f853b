"""The paired difference of two rows scored on the same documents (mean and standard error).

Every row of the table is scored on the same documents, so a difference between two rows is best
estimated document by document: the paired standard error is much smaller than the unpaired one
when the two models agree on most documents. The protocol's harm guard (:mod:`offsite.harm`) uses
it; the experiment's statistics (:mod:`offsite.experiment.stats`: transfer, seeds) build on it.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["check_paired", "mean", "paired", "variance"]


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def variance(xs: Sequence[float]) -> float:
    """The sample variance (0 for fewer than two values)."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def check_paired(*rows: Sequence[float]) -> None:
    if not rows[0] or any(len(r) != len(rows[0]) for r in rows):
        raise ValueError("paired samples must be non-empty and of equal length (the same documents)")


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and paired standard error of ``a − b`` (same documents, same order)."""
    check_paired(a, b)
    d = [x - y for x, y in zip(a, b)]
    return mean(d), math.sqrt(variance(d) / len(d))
