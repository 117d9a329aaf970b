"""The reference range: recorded, counted on the device, judged by an exact test, old forms kept."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.agent.telemetry.collector import SketchWindow
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.drift import analysis
from edgefleet.cloud_controller.drift.ingest import ingest_batch
from edgefleet.drift import (
    DriftConfig,
    ReferenceError,
    Sketch,
    SketchError,
    build_reference,
    decide,
    detectability,
    merge_dicts,
    reference_warnings,
    validate_reference,
)
from edgefleet.drift.sketch import LOOP_ROWS
from edgefleet.drift.stats import binom_sf, chi2_isf, exceedance_p, ncx2_sf
from edgefleet.wire.telemetry import RANGE_SLOTS, TelemetryEnvelope, parse

RANGE_KEYS = ("min", "max", "mean", "std", "inf", "distinct", "constant", "low_cardinality")


def _window(ref: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
    sk = Sketch(ref)
    sk.update({"x": x})
    return sk.to_dict()


def _old(ref: dict[str, Any]) -> dict[str, Any]:
    """The reference as packages signed before ranges were recorded carry it."""
    old = copy.deepcopy(ref)
    for f in old["features"]:
        for k in RANGE_KEYS:
            f.pop(k, None)
    return old


def _binned_only(sketch: dict[str, Any]) -> dict[str, Any]:
    """The window as an agent that predates range counting sends it."""
    return {k: v for k, v in sketch.items() if k != "range"}


# --- the cases ----------------------------------------------------------------------------


def test_a_constant_feature_that_changes_is_drift() -> None:
    ref = build_reference({"x": np.zeros((500, 1))}, {})
    f = ref["features"][0]
    assert f["edges"] == [] and f["constant"] and f["min"] == f["max"] == 0.0
    live = _window(ref, np.full((500, 1), 7.0))
    assert live["range"]["x"] == [500, 0, 500, 0, 0]
    dec = decide(ref, live)
    assert dec.status == "drift" and dec.drifted_features == ["x"]
    assert "500 above" in dec.reason
    assert decide(ref, _binned_only(live)).status == "ok"  # what the bins alone see
    assert decide(ref, _window(ref, np.zeros((500, 1)))).status == "ok"
    # the rollout gates' drift score: one bin means JS 0, so the out-of-range share counts
    assert analysis.summarize(dec)["drift_score"] == 1.0


def test_five_percent_far_outside_the_range_is_drift() -> None:
    rng = np.random.default_rng(0)
    ref = build_reference({"x": rng.normal(size=(5000, 10))}, {})
    live = rng.normal(size=(1000, 10))
    live[:50, 3] = 50.0
    win = _window(ref, live)
    dec = decide(ref, win)
    assert dec.status == "drift" and dec.drifted_features == ["x[3]"]
    f3 = next(f for f in dec.features if f.name == "x[3]")
    fresh_above = int((live[50:, 3] > ref["features"][3]["max"]).sum())  # fresh draws may too
    assert (f3.above, f3.range_checked) == (50 + fresh_above, 1000)
    assert f3.out_of_range == f3.above / 1000
    assert f3.p_range is not None and f3.p_range < 1e-20
    assert decide(ref, _binned_only(win)).status == "ok"  # the blind spot the range test closes


def test_a_handful_out_of_range_is_flagged_only_where_the_reference_vouches_for_its_range() -> None:
    rng = np.random.default_rng(1)
    big = build_reference({"x": rng.normal(size=(20_000, 1))}, {})
    live = rng.normal(size=(2000, 1))
    live[:5, 0] = 9.0
    assert decide(big, _window(big, live)).status == "drift"
    # A 500-row reference's maximum is exceeded by ~4 of 2000 fresh values on average: five
    # such values are no evidence (the documented tolerance for a finite reference).
    small = build_reference({"x": rng.normal(size=(500, 1))}, {})
    assert decide(small, _window(small, live)).status == "ok"


def test_nan_and_inf_are_counted_in_their_own_slots_and_flagged() -> None:
    rng = np.random.default_rng(2)
    ref = build_reference({"x": rng.normal(size=(5000, 1))}, {})
    live = rng.normal(size=(1000, 1))
    live[:3, 0] = np.nan
    live[3:5, 0] = np.inf
    live[5, 0] = -np.inf
    win = _window(ref, live)
    f = ref["features"][0]
    below, above = (
        int((live < f["min"]).sum()) - 1,
        int((live[~np.isnan(live)] > f["max"]).sum()) - 2,
    )
    assert win["range"]["x"] == [1000, below, above, 3, 3]
    assert win["missing"]["x"] == 3
    dec = decide(ref, win)
    assert dec.status == "drift" and "3 NaN, 3 inf" in dec.reason


def test_a_reference_with_nan_judges_live_nan_by_its_bins_and_the_range_on_finite_values() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4000, 1))
    x[::100, 0] = np.nan  # 1 % missing in the reference
    ref = build_reference({"x": x}, {})
    live = rng.normal(size=(1000, 1))
    live[::100, 0] = np.nan
    assert decide(ref, _window(ref, live)).status == "ok"
    live[:40, 0] = 30.0
    assert decide(ref, _window(ref, live)).status == "drift"


# --- the exact test ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "m", "n"), [(1, 100, 221), (5, 100, 221), (30, 10_000, 221), (3, 5, 5)]
)
def test_exceedance_is_the_beta_binomial_tail(k: int, m: int, n: int) -> None:
    assert exceedance_p(k, m, n) == pytest.approx(float(sps.betabinom.sf(k - 1, m, 1, n)), rel=1e-9)
    assert exceedance_p(0, m, n) == 1.0 and exceedance_p(m + 1, m, n) == 0.0


def test_exceedance_is_exact_for_exchangeable_samples_by_simulation() -> None:
    rng = np.random.default_rng(4)
    n, m, trials = 30, 20, 40_000
    draws = rng.random((trials, n + m))
    k = (draws[:, n:] > draws[:, :n].max(axis=1, keepdims=True)).sum(axis=1)
    for kk in (1, 2, 4):
        expected = exceedance_p(kk, m, n)
        se = math.sqrt(expected * (1 - expected) / trials)
        assert abs((k >= kk).mean() - expected) < 4 * se


def test_power_helpers_match_scipy() -> None:
    assert chi2_isf(1e-4, 7) == pytest.approx(float(sps.chi2.isf(1e-4, 7)), rel=1e-6)
    assert binom_sf(6, 200, 0.01) == pytest.approx(float(sps.binom.sf(5, 200, 0.01)), rel=1e-9)
    for df, nc in ((4, 5.0), (9, 25.0)):  # Patnaik's approximation: within a few percent
        x = float(sps.chi2.isf(1e-3, df))
        assert ncx2_sf(x, df, nc) == pytest.approx(float(sps.ncx2.sf(x, df, nc)), abs=0.03)


# --- reference, sketch and wire forms -------------------------------------------------------------


def test_reference_records_range_constancy_and_cardinality() -> None:
    from sklearn.datasets import load_digits

    x = load_digits().data
    ref = build_reference({"x": x}, {})
    validate_reference(ref)
    first, some = ref["features"][0], ref["features"][20]
    assert first["constant"] and first["min"] == first["max"] == 0.0
    assert some["low_cardinality"] and not some["constant"] and some["distinct"] <= 17
    assert some["min"] == float(x[:, 20].min()) and some["max"] == float(x[:, 20].max())


def test_validate_reference_refuses_a_broken_range() -> None:
    ref = build_reference({"x": np.random.default_rng(5).normal(size=(200, 2))}, {})
    for change, needle in (
        ({"min": 5.0, "max": 1.0}, "not finite"),
        ({"max": None}, "both"),
        ({"min": 0.5}, "outside"),
        ({"max": float("inf")}, "not finite"),
    ):
        bad = copy.deepcopy(ref)
        bad["features"][0].update(change)
        with pytest.raises(ReferenceError, match=needle):
            validate_reference(bad)


def test_range_is_not_part_of_the_reference_id() -> None:
    ref = build_reference({"x": np.random.default_rng(6).normal(size=(300, 3))}, {})
    old = _old(ref)
    validate_reference(old)  # an old package's reference still loads, with the same id
    assert old["id"] == ref["id"]


def test_old_reference_is_judged_exactly_as_before() -> None:
    rng = np.random.default_rng(7)
    ref = build_reference({"x": rng.normal(size=(2000, 4))}, {})
    old = _old(ref)
    live = rng.normal(size=(500, 4))
    live[:30, 1] = 40.0
    win_old = _window(old, live)
    assert "range" not in win_old  # nothing new on the wire for an old reference
    dec_old = decide(old, win_old)
    dec_binned = decide(ref, _binned_only(_window(ref, live)))
    assert dec_old.to_dict() == dec_binned.to_dict()
    assert all(f.p_range is None and f.p_value == f.p_binned for f in dec_old.features)


def test_small_and_large_batches_count_ranges_alike() -> None:
    rng = np.random.default_rng(8)
    ref = build_reference({"x": rng.normal(size=(1000, 5))}, {})
    live = rng.normal(scale=2.0, size=(300, 5))
    live[::7, 2] = np.nan
    whole = Sketch(ref)
    whole.update({"x": live})
    pieces = Sketch(ref)
    for i in range(0, 300, LOOP_ROWS // 4):  # below LOOP_ROWS: the broadcast path
        pieces.update({"x": live[i : i + LOOP_ROWS // 4]})
    assert whole.to_dict() == pieces.to_dict()
    assert whole.range_counts("x[0]")[0] == 300


def test_old_agent_sketches_merge_with_new_ones_and_still_decode() -> None:
    rng = np.random.default_rng(9)
    ref = build_reference({"x": rng.normal(size=(1000, 2))}, {})
    new = _window(ref, rng.normal(size=(100, 2)) + 10)
    old = _binned_only(_window(ref, rng.normal(size=(200, 2))))
    merged = merge_dicts(old, new)
    assert merged["n"] == 300 and merged["range"] == new["range"]  # checked: the new part only
    assert merge_dicts(new, new)["range"]["x[0]"][0] == 200
    assert Sketch.from_dict(ref, old).to_dict()["range"]["x[0]"] == [0] * len(RANGE_SLOTS)
    assert decide(ref, old).features[0].p_range is None  # nothing checked: bins alone
    assert decide(ref, merged).status == "drift"


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ([1, 2, 3], "needs 5"),
        ([10, -1, 0, 0, 0], "non-negative"),
        ([10, 6, 6, 0, 0], "more out-of-range"),
        ([True, 0, 0, 0, 0], "non-negative integers"),
    ],
)
def test_bad_range_counts_are_refused(row: list[Any], needle: str) -> None:
    ref = build_reference({"x": np.random.default_rng(10).normal(size=(100, 1))}, {})
    win = _window(ref, np.zeros((10, 1)))
    win["range"] = {"x": row}
    with pytest.raises(SketchError, match=needle):
        Sketch.from_dict(ref, win)
    with pytest.raises(SketchError, match=needle):
        merge_dicts(win, win)


def test_collector_record_and_telemetry_envelope_carry_the_range_and_old_messages_parse() -> None:
    rng = np.random.default_rng(11)
    ref = build_reference({"x": rng.normal(size=(500, 2))}, {})
    win = SketchWindow("m", "1.0.0", Sketch(ref))
    win.add({"x": np.array([[0.0, 99.0], [np.nan, 0.0]])}, {})
    rec = win.record("2026-01-01T00:00:00+00:00")
    assert rec["sketch"]["range"] == {"x[0]": [2, 0, 0, 1, 0], "x[1]": [2, 0, 1, 0, 0]}
    env = parse(TelemetryEnvelope("d", [{"id": 1, **rec}]).to_dict(), device_id="d")
    got: Any = env.records[0]["sketch"]
    assert got["range"] == rec["sketch"]["range"]
    old_rec = {"id": 2, **rec, "sketch": _binned_only(rec["sketch"])}
    old = parse({"device_id": "d", "records": [old_rec]}, device_id="d")
    got = old.records[0]["sketch"]
    assert "range" not in got and old.skipped == 0


def test_controller_merges_range_counts_from_new_and_old_agents(
    factory: sessionmaker[Session],
) -> None:
    rng = np.random.default_rng(12)
    ref = build_reference({"x": rng.normal(size=(3000, 2))}, {})
    at = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)

    def message(rid: int, x: np.ndarray, old: bool) -> dict[str, Any]:
        sk = _window(ref, x)
        return {
            "records": [
                {
                    "id": rid,
                    "at": at.isoformat(),
                    "kind": "sketch",
                    "model": "m",
                    "version": "1.0.0",
                    "window_start": at.isoformat(),
                    "window_end": at.isoformat(),
                    "sketch": _binned_only(sk) if old else sk,
                }
            ]
        }

    far = rng.normal(size=(400, 2))
    far[:20, 0] = 25.0
    with transaction(factory) as s:
        analysis.register_reference(s, "m", "1.0.0", ref)
        ingest_batch(
            s,
            [("new", message(1, far, False)), ("old", message(2, rng.normal(size=(600, 2)), True))],
            now=at,
        )
    with factory() as s:
        _, sk, _ = analysis.merged(s, "m")
        assert sk is not None and sk["n"] == 1000
        assert sk["range"]["x[0]"] == [400, 0, 20, 0, 0]
        result = analysis.judge(s, "m", ref["id"], sk, DriftConfig())
    assert result["status"] == "drift" and result["drifted_features"] == ["x[0]"]


# --- detectability and packaging warnings ------------------------------------------------------------


def test_detectability_shrinks_with_the_window_and_names_what_it_cannot_see() -> None:
    rng = np.random.default_rng(13)
    x = rng.normal(size=(2000, 3))
    x[:, 2] = 4.0
    ref = build_reference({"x": x}, {})
    small, large = detectability(ref, 100), detectability(ref, 10_000)
    s0, l0 = small["x[0]"], large["x[0]"]
    assert s0.min_shift_std is not None and l0.min_shift_std is not None
    assert l0.min_shift_std < s0.min_shift_std < 1.5
    assert s0.min_out_of_range is not None and l0.min_out_of_range is not None
    assert large["x[2]"].min_shift_std is None and "constant (4)" in large["x[2]"].note
    coarse = build_reference({"x": rng.integers(0, 5, size=(2000, 1)).astype(float)}, {})
    assert "5 distinct values" in detectability(coarse, 100)["x"].note
    old = detectability(_old(ref), 100)["x[0]"]
    assert old.min_shift_std is None and "predates" in old.note


def test_predicted_shift_is_detected_about_80_percent_of_the_time() -> None:
    rng = np.random.default_rng(14)
    ref = build_reference({"x": rng.normal(size=(3000, 1))}, {})
    n = 200
    shift = detectability(ref, n)["x"].min_shift_std
    assert shift is not None
    hits = sum(decide(ref, _window(ref, rng.normal(size=(n, 1)) + shift)).drift for _ in range(150))
    assert 0.6 <= hits / 150 <= 0.97  # an approximation (binned CDF, Patnaik), not a promise


def test_reference_warnings_name_features_too_thin_to_watch() -> None:
    rng = np.random.default_rng(15)
    x = rng.normal(size=(5000, 2))
    x[:, 1] = 0.0
    warns = reference_warnings(build_reference({"x": x}, {}))
    assert len(warns) == 1 and warns[0].startswith("x[1]: constant (0)")
    tiny = reference_warnings(build_reference({"x": rng.normal(size=(12, 3))}, {}))
    assert len(tiny) == 3 and all("too few to watch" in w for w in tiny)
    assert reference_warnings(_old(build_reference({"x": x}, {}))) == []


def test_packager_stores_and_logs_the_reference_warnings(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from edgefleet.packager.pipeline import _drift_reference

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)[:300]
    clf = LogisticRegression(max_iter=200).fit(x, y[:300])
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    model = tmp_path / "digits.onnx"
    model.write_bytes(onx.SerializeToString())
    src = SimpleNamespace(model=model, calibration={"X": x})
    with caplog.at_level("WARNING", logger="edgefleet.packager.pipeline"):
        ref = _drift_reference(src, {"threads": 1}, "digits 1.0.0")  # type: ignore[arg-type]
    assert ref["warnings"] and ref["warnings"][0].startswith("X[0]: constant (0)")
    # one line at packaging time, however many features: the count and the first names
    assert len(caplog.records) == 1
    logged = caplog.records[0].getMessage()
    assert logged.startswith(f"digits 1.0.0: drift reference: {len(ref['warnings'])} feature(s)")
    assert "X[0]" in logged
    validate_reference(ref)
