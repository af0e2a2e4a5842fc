"""Small-sample statistics: Student's t quantiles (scipy's) and t-intervals.

Used by `launch.tools.study` (differences over paired seeds) and `launch.tools.bench` (ratios over
paired steps).
"""

from __future__ import annotations

import math

from scipy.stats import t as student_t

CONFIDENCE = 0.95


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with df degrees of freedom."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(student_t.ppf(p, df))


def mean_and_interval(values: list[float], confidence: float = CONFIDENCE) -> tuple[float, list[float] | None]:
    """Mean and the Student t-interval for it; no interval from fewer than two values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, [mean - half, mean + half]
