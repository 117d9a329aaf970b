"""What a reference can detect: per feature, at a window size, with 80 % power.

Two figures per numeric feature (``detectability``), both for one feature changing while the
others hold, at the level the decision uses (``alpha`` split over the features, Bonferroni, which
is what Benjamini–Hochberg reduces to with one changed feature, then split between the binned
test (3/4) and the range test (1/4) as the decision splits it):

- ``min_shift_std``: the smallest shift of the feature's mean, in reference standard deviations
  (either direction, the worse of the two), that the binned chi-square test detects with 80 %
  power in a window of ``n`` live values. Method: the reference's distribution is its binned
  histogram with linear interpolation inside the bins (the outer bins end at the observed
  min/max); the shifted distribution's bin probabilities give the noncentrality
  ``n_eff * sum((q - p)^2 / p)`` with ``n_eff = n N / (n + N)`` (N reference values: the finite
  reference caps the power however large the window), bins pooled as the test pools them, and
  the power is read from the noncentral chi-square (Patnaik's approximation). Shifts that move
  values outside the reference range are also seen by the range test, so this is conservative.
  None: not even a ``MAX_SHIFT_STD`` shift is detected (or the feature is constant, or the
  reference predates recorded ranges).
- ``min_out_of_range``: the smallest share of the window's values beyond the reference range
  that the exact range test detects with 80 % power (the count is binomial given the share; the
  critical count comes from :func:`edgefleet.drift.stats.exceedance_p`). None: no range.

:func:`reference_warnings` names the features a reference is too small to watch at all (at an
unlimited window the binned test cannot see a ``WATCH_LIMIT_STD`` shift) and the ones only the
range test watches (constant, no finite values); the packager stores them with the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgefleet.drift.decision import RANGE_SHARE
from edgefleet.drift.reference import has_range
from edgefleet.drift.stats import binom_sf, chi2_isf, exceedance_p, ncx2_sf

POWER = 0.8
MAX_SHIFT_STD = 10.0
WATCH_LIMIT_STD = 1.0  # a feature whose 1-std shift is never detected is not watched
UNLIMITED_WINDOW = 10_000_000


@dataclass(frozen=True)
class Detectability:
    name: str
    kind: str
    n: int
    min_shift_std: float | None
    min_out_of_range: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _groups(p: np.ndarray, threshold: float) -> np.ndarray:
    """Group labels of adjacent bins pooled until each group's probability >= threshold."""
    labels = np.zeros(len(p), dtype=np.int64)
    g, acc = 0, 0.0
    for i, pi in enumerate(p):
        labels[i] = g
        acc += pi
        if acc >= threshold:
            g, acc = g + 1, 0.0
    if acc > 0 and g > 0:  # a short tail joins the last full group
        labels[labels == g] = g - 1
    return labels


def _shift_power(spec: Mapping[str, Any], n: int, level: float, shift: float) -> float:
    counts = np.asarray(spec["counts"], dtype=np.float64)
    edges = np.asarray(spec["edges"], dtype=np.float64)
    total = counts.sum()
    p = counts / total
    xs = np.concatenate([[float(spec["min"])], edges, [float(spec["max"])]])
    cum = np.concatenate([[0.0], np.cumsum(p)])
    # live values = reference values + shift: F_live(x) = F_ref(x - shift)
    inner = np.interp(edges - shift, xs, cum)
    q = np.diff(np.concatenate([[0.0], inner, [1.0]]))
    labels = _groups(p, 5.0 / max(min(n, total), 1.0))
    k = int(labels.max()) + 1
    if k < 2:
        return 0.0
    pg = np.bincount(labels, weights=p, minlength=k)
    qg = np.bincount(labels, weights=q, minlength=k)
    ok = pg > 0
    n_eff = n * total / (n + total)
    nc = float(n_eff * (((qg[ok] - pg[ok]) ** 2) / pg[ok]).sum())
    df = k - 1
    return ncx2_sf(chi2_isf(level, df), df, nc)


def min_shift_std(spec: Mapping[str, Any], n: int, level: float) -> float | None:
    """Smallest mean shift (reference std units, either direction) detected with POWER."""
    std = spec.get("std")
    if not has_range(spec) or not isinstance(std, int | float) or std <= 0:
        return None
    if not spec.get("edges"):
        return None

    def power(delta: float) -> float:
        d = delta * float(std)
        return min(_shift_power(spec, n, level, d), _shift_power(spec, n, level, -d))

    if power(MAX_SHIFT_STD) < POWER:
        return None
    lo, hi = 0.0, MAX_SHIFT_STD
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        if power(mid) >= POWER:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-3:
            break
    return hi


def min_out_of_range(spec: Mapping[str, Any], n: int, level: float) -> float | None:
    """Smallest share of out-of-range live values the range test detects with POWER."""
    if not has_range(spec):
        return None
    n_fin = int(sum(int(c) for c in spec["counts"])) - int(spec.get("inf", 0))
    # the critical count: 2 x exceedance (two sides) <= level
    lo, hi = 1, n
    if 2.0 * exceedance_p(n, n, n_fin) > level:
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if 2.0 * exceedance_p(mid, n, n_fin) <= level:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    flo, fhi = 0.0, 1.0
    for _ in range(40):
        share = 0.5 * (flo + fhi)
        if binom_sf(k, n, share) >= POWER:
            fhi = share
        else:
            flo = share
        if fhi - flo < 1e-5:
            break
    return fhi


def _level(reference: Mapping[str, Any], alpha: float) -> float:
    """The level per feature as the decision spends it (Bonferroni over the features)."""
    return alpha / max(len(reference.get("features", [])), 1)


def detectability(
    reference: Mapping[str, Any], n: int, alpha: float = 0.01
) -> dict[str, Detectability]:
    """Per feature: what the reference can detect in a window of ``n`` live values."""
    level = _level(reference, alpha)
    out: dict[str, Detectability] = {}
    n = max(int(n), 1)
    for spec in reference.get("features", []):
        name, kind = str(spec["name"]), str(spec.get("kind"))
        if kind != "numeric":
            out[name] = Detectability(name, kind, n, None, None, "categorical: not estimated")
            continue
        if not has_range(spec):
            note = (
                "no finite values in the reference"
                if "min" in spec
                else "reference predates recorded ranges"
            )
            out[name] = Detectability(name, kind, n, None, None, note)
            continue
        if not spec.get("edges"):  # one bin: the range test has the feature's whole level
            oor = min_out_of_range(spec, n, level)
            note = f"constant ({spec['min']:g}) in the reference: only a change of value is seen"
            out[name] = Detectability(name, kind, n, None, oor, note)
            continue
        oor = min_out_of_range(spec, n, level * RANGE_SHARE)
        shift = min_shift_std(spec, n, level * (1.0 - RANGE_SHARE))
        note = "" if shift is not None else f"no shift up to {MAX_SHIFT_STD:g} std is detected"
        if spec.get("low_cardinality"):
            few = f"{spec.get('distinct')} distinct values: the shift figure treats them as spread"
            note = f"{note}; {few}" if note else few
        out[name] = Detectability(name, kind, n, shift, oor, note)
    return out


def reference_warnings(reference: Mapping[str, Any], alpha: float = 0.01) -> list[str]:
    """Features this reference is too small to watch by their distribution, one line each."""
    level = _level(reference, alpha)
    samples = int(reference.get("samples", 0))
    warnings: list[str] = []
    for spec in reference.get("features", []):
        if spec.get("kind") != "numeric":
            continue
        name = spec["name"]
        if not has_range(spec):
            if "min" in spec:
                warnings.append(f"{name}: no finite values in the reference; it is not watched")
            continue
        if spec.get("constant"):
            warnings.append(
                f"{name}: constant ({spec['min']:g}) in the reference; only values other than "
                "that are watched (the range test), not its distribution"
            )
            continue
        shift = min_shift_std(spec, UNLIMITED_WINDOW, level * (1.0 - RANGE_SHARE))
        if shift is None or shift > WATCH_LIMIT_STD:
            seen = "no shift up to 10 std" if shift is None else f"only shifts of {shift:.2g} std"
            warnings.append(
                f"{name}: {samples} reference samples are too few to watch its distribution: "
                f"{seen} detected with 80 % power in any window; only values outside its "
                "range are watched"
            )
    return warnings
