"""The decision on real data with a valid null: false alarms and detection (bench/bench_drift.py).

Windows are drawn without replacement from the held-out half of each scikit-learn data set (the
reference is built from the other half, re-split per trial), or fresh from a large population of
real image patches (scikit-learn's sample photos when Pillow decodes them, else the digits
scans), so reference and window are exchangeable and a valid test alarms at most alpha of the
time. ``python -m bench drift --validate`` runs the fuller version of the same code.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.bench_drift import CASES, RealData, detection, false_alarms, real_datasets
from edgefleet.drift import build_reference, detectability

ALPHA_BOUND = 0.02  # at alpha 1 %


@pytest.fixture(scope="module")
def data() -> dict[str, RealData]:
    return {d.name: d for d in real_datasets("auto")}


def _patches(data: dict[str, RealData]) -> RealData:
    return next(d for d in data.values() if d.split == "pool")


@pytest.mark.parametrize("name", ["diabetes", "breast_cancer", "digits"])
def test_false_alarms_on_held_out_halves(data: dict[str, RealData], name: str) -> None:
    alarms, binned, total = false_alarms(data[name], 100, 100, seed=21)
    assert total == 100
    assert alarms / total <= ALPHA_BOUND, (name, alarms, binned)


@pytest.mark.parametrize(("n", "windows"), [(100, 100), (1000, 50), (10_000, 20)])
def test_false_alarms_on_fresh_image_patches(
    data: dict[str, RealData], n: int, windows: int
) -> None:
    alarms, _, total = false_alarms(_patches(data), n, windows, seed=22)
    assert total == windows and alarms / total <= ALPHA_BOUND


@pytest.mark.parametrize("n", [100, 1000, 10_000])
@pytest.mark.parametrize("case", CASES[:3])
def test_out_of_range_and_constant_cases_detected_on_patches(
    data: dict[str, RealData], n: int, case: str
) -> None:
    hits, binned, total, _ = detection(_patches(data), n, case, 5, seed=23)
    assert hits == total, (case, n, hits, binned)


@pytest.mark.parametrize("case", CASES[:3])
def test_out_of_range_and_constant_cases_detected_on_digits(
    data: dict[str, RealData], case: str
) -> None:
    hits, binned, total, _ = detection(data["digits"], 100, case, 10, seed=24)
    assert hits == total and binned < total, (case, hits, binned)


@pytest.mark.parametrize("name", ["diabetes", "breast_cancer"])
def test_small_references_see_a_constant_feature_change_and_say_what_else_they_cannot(
    data: dict[str, RealData], name: str
) -> None:
    d = data[name]
    hits, binned, total, _ = detection(d, 100, "constant 0 -> all 7", 10, seed=25)
    assert hits == total and binned == 0
    # 5 values beyond a ~250-row reference's range in a 100-row window is no evidence under
    # exchangeability; the reference reports the share it needs instead.
    rng = np.random.default_rng(0)
    ref = build_reference({"x": d.rows[rng.permutation(len(d.rows))[: d.ref_size]]}, {})
    need = [f.min_out_of_range for f in detectability(ref, 100).values()]
    assert all(v is not None and 0.05 < v < 0.2 for v in need)
