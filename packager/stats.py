"""Small-sample statistics for the packager's gates (pure Python, no SciPy).

Every fidelity figure the packager reports is a proportion measured on a finite validation set:
it comes with a confidence interval (Wilson score for agreement, Clopper-Pearson where an exact
bound is needed), the accuracy-drop gate is judged by McNemar's exact test on the discordant
pairs, and :func:`samples_needed` says how large a set would resolve a gate that this one cannot.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Z95 = 1.959963984540054  # two-sided 95 %
ALPHA = 0.05


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
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
        if abs(delta - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0 (cost independent of n)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p) (through the incomplete beta function)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return min(1.0, max(0.0, betainc(n - k, k + 1, 1.0 - p)))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return 1.0 - binom_cdf(k - 1, n, p) if k > 0 else 1.0


def _solve(f: Callable[[float], float], target: float) -> float:
    """p in [0, 1] with f(p) = target, for f decreasing in p (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided ``1 - alpha`` interval for ``k`` successes in ``n``."""
    if n <= 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else 1.0 - _solve(lambda q: binom_sf(k, n, 1.0 - q), alpha / 2)
    hi = 1.0 if k == n else _solve(lambda p: binom_cdf(k, n, p), alpha / 2)
    return lo, hi


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (95 % by default) for ``k`` successes in ``n``."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(lost: int, gained: int) -> float:
    """One-sided exact McNemar p-value that the candidate is worse than the source.

    ``lost``: samples the source got right and the candidate wrong; ``gained``: the reverse.
    Under H0 (no difference) each discordant pair is a fair coin: P(X >= lost | lost + gained, 1/2).
    """
    m = lost + gained
    if m == 0:
        return 1.0
    return binom_sf(lost, m, 0.5)


def drop_upper(lost: int, gained: int, n: int, alpha: float = ALPHA) -> float:
    """A conservative one-sided ``1 - alpha`` upper bound on the accuracy drop.

    drop = (lost - gained) / n = (m / n) * (2 * theta - 1) with m = lost + gained discordant pairs
    and theta = lost / m; each factor is bounded by a Clopper-Pearson bound at ``alpha / 2``
    (Bonferroni), so the product holds at ``1 - alpha``.
    """
    if n <= 0:
        return 1.0
    m = lost + gained
    _, rate_hi = clopper_pearson(m, n, alpha)
    theta_hi = 1.0 if m == 0 else clopper_pearson(lost, m, alpha)[1]
    return max(0.0, rate_hi * (2 * theta_hi - 1))


def samples_needed(resolves: Callable[[int], bool], start: int, cap: int = 1_000_000) -> int | None:
    """The smallest sample count >= ``start`` for which ``resolves(n)`` holds (None past ``cap``).

    ``resolves`` is evaluated at the observed rates scaled to ``n`` samples; it is monotone in
    ``n`` up to rounding, so a doubling search then a bisection finds the answer.
    """
    n = max(1, start)
    if resolves(n):
        return n
    hi = n
    while not resolves(hi):
        if hi >= cap:
            return None
        hi = min(cap, hi * 2)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if resolves(mid):
            hi = mid
        else:
            lo = mid
    return hi
