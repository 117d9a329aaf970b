"""Drift statistics checked against an independent computation (scipy)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from edgefleet.drift.stats import (
    benjamini_hochberg,
    binned_ks,
    chi2_homogeneity,
    chi2_sf,
    js_distance,
    pool_bins,
    psi,
)

RNG = np.random.default_rng(42)
CASES = [(RNG.integers(1, 200, size=10), RNG.integers(1, 200, size=10)) for _ in range(20)] + [
    (np.array([50, 50, 0, 10]), np.array([10, 40, 30, 0]))
]


@pytest.mark.parametrize(("ref", "live"), CASES)
def test_js_distance_matches_scipy(ref: np.ndarray, live: np.ndarray) -> None:
    expected = jensenshannon(live / live.sum(), ref / ref.sum(), base=2)
    assert js_distance(ref, live) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("ref", "live"), CASES[:-1])
def test_psi_is_symmetric_kl_as_scipy_computes_it(ref: np.ndarray, live: np.ndarray) -> None:
    p, q = live / live.sum(), ref / ref.sum()
    assert psi(ref, live) == pytest.approx(sps.entropy(p, q) + sps.entropy(q, p), rel=1e-9)


def test_psi_floors_empty_bins_instead_of_infinity() -> None:
    assert np.isfinite(psi([50, 50, 0, 10], [10, 40, 30, 0]))


@pytest.mark.parametrize("seed", range(10))
def test_binned_ks_equals_ks_2samp_on_the_bin_indices(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 10, size=rng.integers(20, 500))
    b = np.minimum(rng.poisson(4 + seed % 3, size=rng.integers(20, 500)), 9)
    ref, live = np.bincount(a, minlength=10), np.bincount(b, minlength=10)
    assert binned_ks(ref, live) == pytest.approx(sps.ks_2samp(a, b).statistic, abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 5, 9, 30, 200])
@pytest.mark.parametrize("x", [0.01, 0.5, 3.0, 9.0, 25.0, 80.0, 400.0])
def test_chi2_survival_matches_scipy(df: int, x: float) -> None:
    assert chi2_sf(x, df) == pytest.approx(sps.chi2.sf(x, df), rel=1e-8, abs=1e-300)


@pytest.mark.parametrize(("ref", "live"), CASES[:-1])
def test_chi2_homogeneity_matches_scipy_contingency(ref: np.ndarray, live: np.ndarray) -> None:
    ours = chi2_homogeneity(ref, live, min_expected=0.0)
    theirs = sps.chi2_contingency(np.array([ref, live]), correction=False)
    assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-9)
    assert ours.df == theirs.dof
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-6, abs=1e-300)


def test_chi2_pools_sparse_bins_until_expected_counts_are_large_enough() -> None:
    ref = np.array([1000, 1000, 1000, 2, 1, 0, 3])
    live = np.array([10, 10, 10, 0, 0, 0, 1])
    table = pool_bins(ref, live, min_expected=5.0)
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    assert expected.min() >= 5.0
    assert table.sum(axis=1).tolist() == [ref.sum(), live.sum()]
    assert chi2_homogeneity(ref, live).pooled_bins == table.shape[1] < 6


def test_benjamini_hochberg_matches_scipy() -> None:
    p = np.random.default_rng(3).random(40) ** 3
    assert benjamini_hochberg(p) == pytest.approx(sps.false_discovery_control(p, method="bh"))


@pytest.mark.parametrize(
    ("ref", "live"), [([40, 10], [3, 7]), ([30, 30], [12, 3]), ([5, 50], [2, 8])]
)
def test_permutation_p_matches_the_exact_hypergeometric_tail(
    ref: list[int], live: list[int]
) -> None:
    from edgefleet.drift.stats import chi2_permutation_p

    t1, n_l = ref[0] + live[0], sum(live)
    n = sum(ref) + n_l
    totals = np.array([t1, n - t1])

    def stat(l1: np.ndarray) -> np.ndarray:
        lc = np.stack([l1, n_l - l1], axis=-1).astype(float)
        rc = totals - lc
        el, er = n_l * totals / n, (n - n_l) * totals / n
        return ((lc - el) ** 2 / el).sum(-1) + ((rc - er) ** 2 / er).sum(-1)

    support = np.arange(max(0, n_l - (n - t1)), min(t1, n_l) + 1)
    pmf = sps.hypergeom(n, t1, n_l).pmf(support)
    exact = float(pmf[stat(support) >= stat(np.array([live[0]]))[0] - 1e-9].sum())
    mc = chi2_permutation_p(ref, live, min_expected=0.0, draws=50_000, seed=1)
    assert mc == pytest.approx(exact, abs=4 * np.sqrt(exact * (1 - exact) / 50_000) + 1e-4)
    assert mc > chi2_homogeneity(ref, live, min_expected=0.0).p_value * 0.5  # same ballpark
