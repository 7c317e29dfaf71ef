"""Rates with their 95% intervals and counts: the one place vlmsafe computes them.

A rate without its count hides its noise: 2 of 4 and 500 of 1,000 both read "50%". Every rate
vlmsafe reports therefore travels as a :class:`Rate` (``k`` of ``n``) and prints as
``62.5% [55.1–69.4] (n=100)``: the point estimate, the Wilson score interval and the denominator.

The Wilson interval (Wilson, 1927) is used rather than the normal ("Wald") approximation
``p ± 1.96 sqrt(p(1-p)/n)`` because the latter collapses to ``[0, 0]`` when no item is unsafe and
overshoots [0, 1] near the ends, exactly where safety rates live (Brown, Cai & DasGupta 2001,
"Interval Estimation for a Binomial Proportion", recommend Wilson for small ``n`` and extreme ``p``).

:func:`bootstrap_rate` is the percentile bootstrap over prompts (Efron & Tibshirani 1993, ch. 13)
that the demo reports, with the same fields as :meth:`Rate.to_dict`. A bootstrap cannot vary
when every prompt had the same outcome (0 of 532 resamples to 0 every time) and would print a
false ``[0, 0]``; there it falls back to the Wilson interval, so ``0/532`` reads ``[0.0, 0.7]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from vlmsafe.errors import InputError


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of ``k`` successes out of ``n`` trials, as fractions in [0, 1].

    ``wilson_interval(0, 20)`` is ``(0.0, 0.161)``: no unsafe answer in 20 still allows a true rate
    of up to 16%. With ``n == 0`` there is nothing to estimate and the interval is ``(nan, nan)``.

    Raises:
        InputError: ``k`` or ``n`` is not a whole number with ``0 <= k <= n``, or ``confidence``
            is not in (0, 1).
    """
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n or not 0 <= k <= n:
        raise InputError(
            f"wilson_interval: need whole numbers 0 <= k <= n, got k={k!r}, n={n!r}; pass counts, not rates"
        )
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise InputError(f"wilson_interval: confidence must be in (0, 1), got {confidence!r}; pass e.g. 0.95")
    if n == 0:
        return (math.nan, math.nan)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # k == 0 and k == n give exact 0 / 1 ends; clamp away the last ulp of rounding.
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n``, with its value and 95% Wilson interval (``None`` when ``n == 0``)."""

    k: int
    n: int

    def __post_init__(self) -> None:
        wilson_interval(self.k, self.n)  # validates the counts

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.k, self.n) if self.n else None

    def to_dict(self) -> dict[str, Any]:
        """``{"rate", "ci95": [low, high], "k", "n"}``; rate and interval are ``None`` when ``n == 0``."""
        ci = self.interval
        return {"rate": self.value, "ci95": None if ci is None else [ci[0], ci[1]], "k": self.k, "n": self.n}

    def __str__(self) -> str:
        """``62.5% [55.1–69.4] (n=100)``; ``- (n=0)`` when there is nothing to count."""
        if not self.n:
            return "- (n=0)"
        low, high = wilson_interval(self.k, self.n)
        return f"{100 * self.k / self.n:.1f}% [{100 * low:.1f}\u2013{100 * high:.1f}] (n={self.n})"


#: Resamples of :func:`bootstrap_interval` (a fixed seed makes every report reproducible).
N_BOOTSTRAP = 2000


def bootstrap_interval(
    flags: Sequence[bool], *, n_boot: int = N_BOOTSTRAP, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the share of true ``flags`` (resampling the flags, i.e.
    the prompts, with replacement); the Wilson interval when all flags are equal or ``n == 0``.

    Raises:
        InputError: ``n_boot`` is not a positive whole number or ``confidence`` is not in (0, 1).
    """
    import numpy as np

    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise InputError(f"bootstrap_interval: n_boot must be a positive whole number, got {n_boot!r}; pass e.g. 2000")
    x = np.asarray([bool(f) for f in flags], dtype=np.float64)
    n, k = len(x), int(x.sum())
    if k in (0, n):
        return wilson_interval(k, n, confidence)
    wilson_interval(k, n, confidence)  # validates confidence
    means = x[np.random.default_rng(seed).integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return (float(lo), float(hi))


def bootstrap_rate(flags: Sequence[bool], **kwargs: Any) -> dict[str, Any]:
    """``{"rate", "ci95", "k", "n"}`` (the fields of :meth:`Rate.to_dict`) of boolean ``flags``, with
    the :func:`bootstrap_interval`; rate and interval are ``None`` when ``flags`` is empty."""
    k, n = sum(bool(f) for f in flags), len(flags)
    if not n:
        return Rate(0, 0).to_dict()
    lo, hi = bootstrap_interval(flags, **kwargs)
    return {"rate": k / n, "ci95": [lo, hi], "k": k, "n": n}
