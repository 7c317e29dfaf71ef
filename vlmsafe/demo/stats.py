"""Rates with 95% intervals and counts, as every figure of the demo is reported.

The interval of a rate is a percentile bootstrap over prompts (items resampled with replacement,
2,000 resamples, fixed seed, so a report is reproducible). A bootstrap cannot vary when every
prompt had the same outcome (0 of 532 resamples to 0 every time), which would print a false
``[0.0, 0.0]``; there the interval is the Wilson score interval instead, so ``0/532`` reads
``[0.0, 0.7]``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

N_BOOT = 2000
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes out of ``n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(flags: Sequence[bool], *, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``flags`` (Wilson when all are equal)."""
    x = np.asarray(flags, dtype=np.float64)
    n, k = len(x), int(x.sum())
    if n == 0:
        return (math.nan, math.nan)
    if k in (0, n):
        return wilson(k, n)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return (float(lo), float(hi))


def rate(flags: Sequence[bool]) -> dict[str, Any]:
    """``{"rate", "ci": [lo, hi], "count", "n"}`` of boolean ``flags`` (rate ``None`` when empty)."""
    n, k = len(flags), int(sum(bool(f) for f in flags))
    lo, hi = bootstrap_interval([bool(f) for f in flags])
    return {"rate": k / n if n else None, "ci": [lo, hi] if n else None, "count": k, "n": n}
