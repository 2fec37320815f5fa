"""The statistics of a study's table: mean and sample standard deviation over seeds, and Welch's t interval for
the difference of two variants' means (unequal variances, Welch-Satterthwaite degrees of freedom).

The t quantile is computed here (scipy is not a dependency): with x = sqrt(v) tan(theta), Student's t density
with v degrees of freedom integrates to P(0 < T < x) = c * integral_0^theta cos(u)^(v-1) du, with
c = Gamma((v+1)/2) / (Gamma(v/2) sqrt(pi)); a smooth integrand on [0, pi/2) for v >= 1, integrated by Simpson's
rule and inverted by bisection, accurate to about 1e-9 (compared with scipy in tests/test_study.py).
"""
import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

_SIMPSON_INTERVALS = 2048


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (n - 1 in the denominator; nan for fewer than 2 values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def _central_mass(theta: float, df: float) -> float:
    """P(0 < T < sqrt(df) tan(theta)) for Student's t with ``df`` degrees of freedom."""
    u = np.linspace(0.0, theta, _SIMPSON_INTERVALS + 1)
    f = np.cos(u) ** (df - 1.0)
    weights = np.ones_like(u)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    integral = float(np.dot(weights, f)) * (theta / _SIMPSON_INTERVALS) / 3.0
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi) * integral


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` >= 1 degrees of freedom (``df`` need not be whole)."""
    if not 0 < p < 1:
        raise ValueError(f"t_quantile: p={p} must be in (0, 1)")
    if not df >= 1:
        raise ValueError(f"t_quantile: df={df} must be >= 1")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    target, lo, hi = p - 0.5, 0.0, math.pi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _central_mass(mid, df) < target else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


@dataclasses.dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with its two-sided interval at ``confidence`` and Welch's degrees of freedom."""

    diff: float
    low: float
    high: float
    df: float
    confidence: float


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Optional[Difference]:
    """Welch's t interval for mean(a) - mean(b); None when either sample has fewer than 2 values."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 2 or b.size < 2:
        return None
    diff = float(a.mean() - b.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:  # both samples constant: no spread to scale an interval by
        return Difference(diff, diff, diff, math.inf, confidence)
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = t_quantile(0.5 + confidence / 2, df) * se
    return Difference(diff, diff - half, diff + half, float(df), confidence)
