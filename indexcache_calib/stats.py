"""Paired statistics over calibration sequences (pure Python, no SciPy)."""

from __future__ import annotations

import math


def paired_differences(a: dict[int, float], b: dict[int, float]) -> list[float]:
    """a - b on the sequences both were scored on, in sequence order (dicts: sequence id -> loss)."""
    return [a[i] - b[i] for i in sorted(a.keys() & b.keys())]


def mean_se(d: list[float], population: int | None = None) -> tuple[float, float | None]:
    """Mean of `d` and its standard error (None with fewer than two values). With `population`, `d` is
    taken as a sample without replacement from that many values, and the standard error is the one of the
    population's mean (finite-population correction): it is 0 once every value has been seen."""
    n = len(d)
    mean = math.fsum(d) / n
    if n < 2:
        return mean, None
    se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1) / n)
    if population is not None and population > 1:
        se *= math.sqrt(max(0, population - n) / (population - 1))
    return mean, se


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the regularized incomplete beta function (modified Lentz).
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_quantile(p_upper: float, df: int) -> float:
    """The t with P(T > t) = p_upper (0 < p_upper < 1/2), by bisection."""
    if not 0.0 < p_upper < 0.5:
        raise ValueError("p_upper must be in (0, 1/2)")
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > p_upper:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > p_upper:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi
