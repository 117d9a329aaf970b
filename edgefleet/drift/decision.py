"""The drift decision: calibrated per window size, configurable per model.

Fixed PSI cut-offs are not calibrated: with 10 bins and n live samples PSI's null mean is about
(bins - 1) * (1/n + 1/n_ref), so windows of 100 samples alarm most of the time without drift.
Instead each feature gets a two-sample chi-square test of its live counts against the reference
counts (the reference's own sample size is part of the test), p-values are adjusted across the
features (Benjamini–Hochberg by default, or Bonferroni), and the window is drifted when any
adjusted p-value is <= ``alpha``. Under no drift the chance that a window alarms is then about
``alpha`` whatever n is. On small tables (an expected cell below 20) the features the first pass
flags get an exact permutation p-value (Monte Carlo, hypergeometric given the margins), because
the chi-square tail is too light at the corrected thresholds. ``min_effect`` (a Jensen–Shannon distance) can additionally ignore
significant-but-tiny shifts in very large fleet-wide windows. PSI, JS and KS are reported as
evidence next to the test.

The range test. Where the reference records a numeric feature's observed range and the sketch
counted the live values against it (``range``), a second, exact test asks whether the reference
range holds: under the null (reference and window exchangeable) the number of live values
strictly above the reference maximum has P(K >= k) = C(m, k) / C(n + m, k) (n finite reference
values, m finite live ones; :func:`edgefleet.drift.stats.exceedance_p`), the same below the
minimum (NaN/inf count as above it when the reference has none; see :func:`range_p`).
``p_range`` is 2 x the smaller side (Bonferroni), and the feature's p-value is
min(binned p / 0.75, range p / 0.25) (weighted Bonferroni; the range p alone for a constant
feature, whose binned test cannot reject), so the two tests together keep the feature's false-alarm rate at its level and the
correction across features is unchanged. That tolerance is
what a finite reference allows: a reference of n values has each side exceeded by a new value
with probability 1/(n + 1), so a 100-row window beyond a 221-row reference's maximum is not
surprising until about 5 values are (p ~ 0.003). Features without a range (references built
before it was recorded, categorical features) and sketches without range counts (older agents)
are judged by the binned test alone, exactly as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from edgefleet.drift.reference import has_range
from edgefleet.drift.stats import (
    benjamini_hochberg,
    binned_ks,
    bonferroni,
    chi2_homogeneity,
    chi2_permutation_p,
    exceedance_p,
    js_distance,
    pool_bins,
    psi,
)

Status = Literal["drift", "ok", "insufficient_data"]


@dataclass(frozen=True)
class DriftConfig:
    """Per-model drift settings (``from_dict`` accepts the same keys)."""

    alpha: float = 0.01
    min_samples: int = 100
    correction: Literal["bh", "bonferroni"] = "bh"
    features: Sequence[str] | None = None  # None: every feature of the reference
    min_effect: float = 0.0  # minimum JS distance for a drifted feature
    min_expected: float = 5.0
    # Early looks (edgefleet.drift.alerts): every ``look_s`` seconds the last ``window_s``
    # seconds are judged at alpha * early_share / (looks per bucket); the closed bucket keeps
    # alpha * (1 - early_share). look_s = 0 turns early looks off (closed buckets only, at alpha).
    look_s: int = 30
    window_s: int = 300
    early_share: float = 0.5

    def __post_init__(self) -> None:
        if self.look_s < 0 or (0 < self.look_s < 5):
            raise ValueError(f"look_s must be 0 (off) or >= 5, got {self.look_s}")
        if self.look_s and self.window_s < self.look_s:
            raise ValueError(f"window_s must be >= look_s, got {self.window_s} < {self.look_s}")
        if not 0 < self.early_share < 1:
            raise ValueError(f"early_share must be in (0, 1), got {self.early_share}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples}")
        if self.correction not in ("bh", "bonferroni"):
            raise ValueError(f"correction must be 'bh' or 'bonferroni', got {self.correction!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> DriftConfig:
        d = dict(d or {})
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown drift settings: {', '.join(sorted(unknown))}")
        if known.get("features") is not None:
            known["features"] = tuple(known["features"])
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(self.features) if self.features is not None else None
        return d


@dataclass
class FeatureDrift:
    name: str
    role: str
    kind: str
    n: int
    psi: float
    js: float
    ks: float | None
    chi2: float
    df: int
    p_value: float
    p_adjusted: float = 1.0
    drifted: bool = False
    p_binned: float | None = None  # the binned test's p (p_value combines it with p_range)
    p_range: float | None = None  # None: no range recorded or counted for this feature
    range_checked: int = 0  # live values checked against the reference range
    below: int = 0  # finite live values below the reference minimum
    above: int = 0  # ... above its maximum
    nan: int = 0
    inf: int = 0
    out_of_range: float = 0.0  # (below + above + nan + inf) / range_checked


@dataclass
class DriftDecision:
    status: Status
    reason: str
    n: int
    n_reference: int
    alpha: float
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def drift(self) -> bool:
        return self.status == "drift"

    @property
    def drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "drift": self.drift,
            "reason": self.reason,
            "n": self.n,
            "n_reference": self.n_reference,
            "alpha": self.alpha,
            "drifted_features": self.drifted_features,
            "features": [asdict(f) for f in self.features],
        }


def _with_missing(counts: Sequence[int], missing: int) -> np.ndarray:
    return np.append(np.asarray(counts, dtype=np.float64), float(missing))


def range_p(spec: Mapping[str, Any], row: Sequence[int]) -> float:
    """p-value of the range test for one feature: live ``[checked, below, above, nan, inf]``.

    Exact under exchangeability (:func:`edgefleet.drift.stats.exceedance_p`), two-sided by
    Bonferroni. When the reference has no NaN/inf, a live NaN or inf counts as above the
    maximum (any fixed map of the values keeps them exchangeable); when it has some, the test
    is on the finite values alone (still exchangeable given which values are finite) and
    NaN/inf are left to the binned test's missing slot and outer bins.
    """
    checked, below, above, nan, inf = (int(x) for x in row)
    ref_finite = int(sum(int(c) for c in spec["counts"])) - int(spec.get("inf", 0))
    ref_nonfinite = int(spec.get("inf", 0)) + int(spec.get("missing", 0))
    if ref_nonfinite == 0:
        m, n, high = checked, ref_finite, above + nan + inf
    else:
        m, n, high = checked - nan - inf, ref_finite, above
    return min(1.0, 2.0 * min(exceedance_p(below, m, n), exceedance_p(high, m, n)))


RANGE_SHARE = 0.25  # of a feature's level, for the range test (the binned test keeps 0.75)


def _combine(f: FeatureDrift, binned_blind: bool) -> None:
    """The feature's p-value from its binned p and, where there is one, its range p.

    Weighted Bonferroni over the two tests (reject when p_binned <= 0.75 level or
    p_range <= 0.25 level): the range test's evidence is all-or-nothing (out-of-range counts
    far beyond the tolerance give tiny p-values), so a small share costs it little while the
    binned test keeps most of its power for shifts inside the range. A feature whose reference has a single bin (constant) has a
    binned test that cannot reject, so the range test gets the whole level there.
    """
    assert f.p_binned is not None
    if f.p_range is None:
        f.p_value = f.p_binned
    elif binned_blind:
        f.p_value = f.p_range
    else:
        f.p_value = min(1.0, f.p_binned / (1.0 - RANGE_SHARE), f.p_range / RANGE_SHARE)


def compare_feature(
    spec: Mapping[str, Any],
    live_counts: Sequence[int],
    live_missing: int = 0,
    min_expected: float = 5.0,
    live_range: Sequence[int] | None = None,
) -> FeatureDrift:
    """Statistics of one feature: reference spec (from the reference) vs live counts.

    ``live_range`` is the sketch's ``[checked, below, above, nan, inf]`` for the feature; with
    it (and a recorded range in ``spec``) the feature is judged by the range test too.
    """
    ref = _with_missing(spec["counts"], int(spec.get("missing", 0)))
    live = _with_missing(live_counts, live_missing)
    if len(ref) != len(live):
        raise ValueError(
            f"feature {spec['name']!r}: {len(live) - 1} live bins, reference has {len(ref) - 1}"
        )
    test = chi2_homogeneity(ref, live, min_expected)
    p_value = test.p_value
    numeric = spec.get("kind") == "numeric"
    out = FeatureDrift(
        name=str(spec["name"]),
        role=str(spec.get("role", "input")),
        kind=str(spec.get("kind")),
        n=int(live.sum()),
        psi=psi(ref, live) if live.sum() > 0 else 0.0,
        js=js_distance(ref, live) if live.sum() > 0 else 0.0,
        ks=binned_ks(ref[:-1], live[:-1]) if numeric and live[:-1].sum() > 0 else None,
        chi2=test.statistic,
        df=test.df,
        p_value=p_value,
        p_binned=p_value,
    )
    if live_range is not None and has_range(spec) and int(live_range[0]) > 0:
        checked, below, above, nan, inf = (int(x) for x in live_range)
        out.p_range = range_p(spec, live_range)
        out.range_checked, out.below, out.above, out.nan, out.inf = checked, below, above, nan, inf
        out.out_of_range = (below + above + nan + inf) / checked
        _combine(out, binned_blind(spec))
    return out


def binned_blind(spec: Mapping[str, Any]) -> bool:
    """A numeric feature with one bin (constant in the reference): its binned test never rejects."""
    return spec.get("kind") == "numeric" and not spec.get("edges")


EXACT_BELOW = 20.0  # pooled tables with a smaller expected cell get the permutation p-value


def _small(ref: np.ndarray, live: np.ndarray, min_expected: float) -> bool:
    table = pool_bins(ref, live, min_expected)
    if table.shape[1] < 2:
        return False
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    return bool(expected.min() < EXACT_BELOW)


def _adjust(feats: list[FeatureDrift], cfg: DriftConfig) -> None:
    p = [f.p_value for f in feats]
    adjusted = benjamini_hochberg(p) if cfg.correction == "bh" else bonferroni(p)
    for f, adj in zip(feats, adjusted, strict=True):
        f.p_adjusted = float(adj)
        effect = max(f.js, f.out_of_range)  # min_effect applies to either kind of change
        f.drifted = bool(adj <= cfg.alpha and effect >= cfg.min_effect)


def decide(
    reference: Mapping[str, Any], sketch: Mapping[str, Any], config: DriftConfig | None = None
) -> DriftDecision:
    """Drift decision for one window: ``sketch`` is a wire sketch (``Sketch.to_dict()``)."""
    cfg = config or DriftConfig()
    n_ref = int(reference.get("samples", 0))
    if sketch.get("reference_id") != reference.get("id"):
        return DriftDecision(
            "insufficient_data", "sketch was counted against another reference", 0, n_ref, cfg.alpha
        )
    n = int(sketch.get("n", 0))
    if n < cfg.min_samples:
        return DriftDecision(
            "insufficient_data",
            f"{n} samples, fewer than min_samples {cfg.min_samples}",
            n,
            n_ref,
            cfg.alpha,
        )
    wanted = set(cfg.features) if cfg.features is not None else None
    counts = sketch.get("counts", {})
    missing = sketch.get("missing", {})
    ranges = sketch.get("range") or {}
    feats: list[FeatureDrift] = []
    for spec in reference["features"]:
        name = spec["name"]
        if (wanted is not None and name not in wanted) or name not in counts:
            continue
        row = ranges.get(name) if isinstance(ranges, Mapping) else None
        feats.append(
            compare_feature(
                spec, counts[name], int(missing.get(name, 0)), cfg.min_expected, live_range=row
            )
        )
    if not feats:
        return DriftDecision(
            "insufficient_data", "no feature of the reference was counted", n, n_ref, cfg.alpha
        )
    _adjust(feats, cfg)
    # Small tables: the chi-square tail is too light where corrected thresholds sit, so the
    # features the first pass rejects get the exact permutation p-value (never smaller), and
    # the adjustment is redone. Raising p-values cannot create new rejections (BH and
    # Bonferroni are monotone), so refining only those features is enough.
    refined = False
    by_name = {sp["name"]: sp for sp in reference["features"]}
    for f in feats:
        if not f.drifted:
            continue
        spec = by_name[f.name]
        if binned_blind(spec) or (
            f.p_range is not None and f.p_range / RANGE_SHARE <= f.p_value
        ):  # the range test decides: a larger binned p cannot change the feature's p
            continue
        ref = _with_missing(spec["counts"], int(spec.get("missing", 0)))
        live = _with_missing(counts[f.name], int(missing.get(f.name, 0)))
        if _small(ref, live, cfg.min_expected):
            seed = int(live.sum() * 1_000_003 + ref.sum()) % 2**32
            assert f.p_binned is not None
            perm = chi2_permutation_p(ref, live, cfg.min_expected, seed=seed)
            # 20,000 redraws cannot resolve a p below ~1e-4: where the level one feature
            # gets is that small (an early look, docs/drift.md; a wide model) and the first
            # run leaves it open (p <= 1e-3), an independent run with enough redraws (up to
            # 200,000) replaces it. Still valid: a rejection needs the second p to be small.
            level = cfg.alpha * (1.0 - RANGE_SHARE) / len(feats)
            draws = int(min(200_000, math.ceil(20.0 / level)))
            if draws >= 100_000 and perm <= 1e-3:
                perm = chi2_permutation_p(
                    ref, live, cfg.min_expected, draws=draws, seed=(seed + 1) % 2**32
                )
            f.p_binned = max(f.p_binned, perm)
            _combine(f, binned_blind(spec))
            refined = True
    if refined:
        _adjust(feats, cfg)
    drifted = [f for f in feats if f.drifted]
    if drifted:
        worst = min(drifted, key=lambda f: f.p_adjusted)
        reason = (
            f"{len(drifted)} of {len(feats)} features drifted (alpha {cfg.alpha}, "
            f"{cfg.correction}); strongest {worst.name}: p={worst.p_adjusted:.2g}, "
            f"PSI={worst.psi:.3f}, JS={worst.js:.3f}"
        )
        if worst.p_range is not None and worst.p_range <= (worst.p_binned or 1.0):
            reason += (
                f"; outside the reference range: {worst.below} below, {worst.above} above, "
                f"{worst.nan} NaN, {worst.inf} inf of {worst.range_checked}"
            )
        return DriftDecision("drift", reason, n, n_ref, cfg.alpha, feats)
    return DriftDecision(
        "ok",
        f"no feature drifted at alpha {cfg.alpha} ({cfg.correction}, {len(feats)} features)",
        n,
        n_ref,
        cfg.alpha,
        feats,
    )
