"""Distances and tests between two binned distributions (reference counts vs live counts).

- ``psi``: population stability index, sum (p - q) ln(p / q), empty bins floored at ``eps``.
- ``js_distance``: Jensen–Shannon distance (square root of the divergence), base 2: in [0, 1].
- ``binned_ks``: the largest gap between the two cumulative distributions over the bin edges
  (what ``ks_2samp`` gives on the binned samples); only meaningful for ordered (numeric) bins.
- ``chi2_homogeneity``: the two-sample chi-square test of the 2 x K table (reference, live),
  which accounts for the reference being a finite sample too; adjacent bins are pooled until every
  expected cell count is >= ``min_expected`` so the chi-square approximation holds.
- ``exceedance_p``: the exact tail of the number of live values beyond the reference's maximum
  (or minimum) under exchangeability, for the range test; ``binom_sf``, ``chi2_isf`` and
  ``ncx2_sf`` serve the power figures of :mod:`edgefleet.drift.power`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


def _proportions(counts: ArrayLike, eps: float) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        raise ValueError("empty distribution: no counts")
    p = np.maximum(c / total, eps)
    return p / p.sum()


def psi(reference: ArrayLike, live: ArrayLike, eps: float = 1e-4) -> float:
    """Population stability index of ``live`` against ``reference`` (counts per bin)."""
    p = _proportions(live, eps)
    q = _proportions(reference, eps)
    return float(np.sum((p - q) * np.log(p / q)))


def js_distance(reference: ArrayLike, live: ArrayLike, base: float = 2.0) -> float:
    """Jensen–Shannon distance between the two count vectors' distributions."""
    p = np.asarray(live, dtype=np.float64)
    q = np.asarray(reference, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("empty distribution: no counts")
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    div = 0.5 * (kl(p) + kl(q)) / math.log(base)
    return math.sqrt(max(div, 0.0))


def binned_ks(reference: ArrayLike, live: ArrayLike) -> float:
    """Max |F_ref - F_live| over the bin boundaries (bins in order)."""
    p = np.asarray(live, dtype=np.float64)
    q = np.asarray(reference, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("empty distribution: no counts")
    return float(np.max(np.abs(np.cumsum(p) / p.sum() - np.cumsum(q) / q.sum())))


def gammaincc(a: float, x: float) -> float:
    """Regularised upper incomplete gamma Q(a, x) (series / continued fraction)."""
    if x < 0 or a <= 0:
        raise ValueError(f"gammaincc needs a > 0, x >= 0 (got a={a}, x={x})")
    if x == 0:
        return 1.0
    lg = math.lgamma(a)
    if x < a + 1.0:
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * math.exp(-x + a * math.log(x) - lg))
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return min(1.0, math.exp(-x + a * math.log(x) - lg) * h)


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for a chi-square variable with ``df`` degrees of freedom."""
    if df <= 0:
        return 1.0
    return gammaincc(df / 2.0, max(x, 0.0) / 2.0)


@dataclass(frozen=True)
class Chi2Result:
    statistic: float
    df: int
    p_value: float
    pooled_bins: int


def pool_bins(reference: np.ndarray, live: np.ndarray, min_expected: float) -> np.ndarray:
    """Group adjacent bins until each group's expected count (smaller sample) >= min_expected.

    Returns a (2, K') table. Bins empty in both samples are dropped.
    """
    ref = np.asarray(reference, dtype=np.float64)
    liv = np.asarray(live, dtype=np.float64)
    keep = (ref + liv) > 0
    ref, liv = ref[keep], liv[keep]
    n_r, n_l = ref.sum(), liv.sum()
    n = n_r + n_l
    need = min_expected * n / max(min(n_r, n_l), 1e-12)  # column total needed
    cols_r: list[float] = []
    cols_l: list[float] = []
    acc_r = acc_l = 0.0
    for r, l_ in zip(ref, liv, strict=True):
        acc_r += r
        acc_l += l_
        if acc_r + acc_l >= need:
            cols_r.append(acc_r)
            cols_l.append(acc_l)
            acc_r = acc_l = 0.0
    if acc_r + acc_l > 0:
        if cols_r:
            cols_r[-1] += acc_r
            cols_l[-1] += acc_l
        else:
            cols_r.append(acc_r)
            cols_l.append(acc_l)
    return np.array([cols_r, cols_l])


def chi2_homogeneity(
    reference: ArrayLike, live: ArrayLike, min_expected: float = 5.0
) -> Chi2Result:
    """Two-sample chi-square test that ``live`` and ``reference`` counts share one distribution."""
    table = pool_bins(np.asarray(reference), np.asarray(live), min_expected)
    k = table.shape[1]
    if k < 2 or table[0].sum() <= 0 or table[1].sum() <= 0:
        return Chi2Result(0.0, 0, 1.0, k)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(np.sum((table - expected) ** 2 / expected))
    df = k - 1
    return Chi2Result(stat, df, chi2_sf(stat, df), k)


def chi2_permutation_p(
    reference: ArrayLike,
    live: ArrayLike,
    min_expected: float = 5.0,
    draws: int = 20_000,
    seed: int = 0,
) -> float:
    """Monte Carlo p-value of the same statistic under the exact permutation null.

    Live counts are redrawn from the multivariate hypergeometric distribution given both
    margins (the pooled table's column totals and the live total), which is exact for small
    samples where the chi-square tail is too light. The result is (1 + hits) / (1 + draws).
    """
    table = pool_bins(np.asarray(reference), np.asarray(live), min_expected).astype(np.int64)
    k = table.shape[1]
    n_r, n_l = int(table[0].sum()), int(table[1].sum())
    if k < 2 or n_r <= 0 or n_l <= 0:
        return 1.0
    totals = table.sum(axis=0)
    n = n_r + n_l
    e_l = n_l * totals / n
    e_r = n_r * totals / n

    def stat(l_counts: np.ndarray) -> np.ndarray:
        r_counts = totals - l_counts
        return ((l_counts - e_l) ** 2 / e_l).sum(axis=-1) + ((r_counts - e_r) ** 2 / e_r).sum(
            axis=-1
        )

    observed = float(stat(table[1].astype(np.float64)))
    rng = np.random.default_rng(seed)
    if draws <= 20_000:  # the historical single batch (same seeds, same p-values)
        sims = rng.multivariate_hypergeometric(totals, n_l, size=draws).astype(np.float64)
        hits = int((stat(sims) >= observed - 1e-9).sum())
        return (1 + hits) / (1 + draws)
    # More draws (a small level, e.g. an early look): batches of 20,000, stopping once
    # STOP_HITS exceed the observed statistic (Besag & Clifford's sequential Monte Carlo
    # p-value, hits / draws so far, valid and then far above any small level).
    done = hits = 0
    while done < draws:
        size = min(20_000, draws - done)
        sims = rng.multivariate_hypergeometric(totals, n_l, size=size).astype(np.float64)
        hits += int((stat(sims) >= observed - 1e-9).sum())
        done += size
        if hits >= STOP_HITS:
            return hits / done
    return (1 + hits) / (1 + done)


STOP_HITS = 50


def bonferroni(p_values: ArrayLike) -> np.ndarray:
    p = np.asarray(p_values, dtype=np.float64)
    return np.minimum(p * max(len(p), 1), 1.0)


def benjamini_hochberg(p_values: ArrayLike) -> np.ndarray:
    """BH-adjusted p-values (reject where adjusted <= alpha)."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p)
    ranked = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


# --- the range test: exact tails under exchangeability -----------------------------------------


def _log_comb(n: float, k: float) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def exceedance_p(k: int, m: int, n: int) -> float:
    """P(K >= k): K live values of ``m`` lie strictly above the maximum of ``n`` reference values.

    Exact when the n + m values are exchangeable (the reference and the window come from one
    distribution; every ordering equally likely): the top k of all n + m values must all be
    live, so P(K >= k) = C(m, k) / C(n + m, k). With ties (discrete data) strict exceedance is
    rarer, so the value is an upper bound and the test stays valid. The same holds below the
    minimum. It is the beta-binomial tail (K | tail mass p ~ Binomial(m, p), p ~ Beta(1, n)),
    not a binomial with p = 1/(n+1): the counts share one reference maximum, so they are
    overdispersed and a binomial tail would false-alarm in large windows.
    """
    if k <= 0:
        return 1.0
    if k > m or n < 0:
        return 0.0 if k > m else 1.0
    return min(1.0, math.exp(_log_comb(m, k) - _log_comb(n + m, k)))


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    x = np.arange(k, n + 1, dtype=np.float64)
    lg = np.vectorize(math.lgamma)
    logp = lg(n + 1.0) - lg(x + 1) - lg(n - x + 1) + x * math.log(p) + (n - x) * math.log1p(-p)
    return float(min(1.0, np.exp(logp).sum()))


# --- power of the binned test --------------------------------------------------------------------


def chi2_isf(p: float, df: float) -> float:
    """The x with P(chi2_df >= x) = p (bisection on the regularised gamma)."""
    lo, hi = 0.0, max(10.0, df)
    while gammaincc(df / 2.0, hi / 2.0) > p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gammaincc(df / 2.0, mid / 2.0) > p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-9 * hi:
            break
    return hi


def ncx2_sf(x: float, df: float, nc: float) -> float:
    """P(X >= x) for a noncentral chi-square (Patnaik's two-moment approximation)."""
    if nc <= 0:
        return gammaincc(df / 2.0, max(x, 0.0) / 2.0)
    scale = (df + 2 * nc) / (df + nc)
    nu = (df + nc) ** 2 / (df + 2 * nc)
    return gammaincc(nu / 2.0, max(x, 0.0) / scale / 2.0)
