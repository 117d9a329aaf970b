"""Telemetry building blocks: mergeable latency histograms, inference and sketch windows."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.agent.ports import Inventory, serving_versions
from edgefleet.agent.telemetry.collector import InferenceWindow, SketchWindow
from edgefleet.drift import latency as lat
from edgefleet.drift.reference import build_reference
from edgefleet.drift.sketch import Sketch


@pytest.mark.parametrize("q", [0.5, 0.9, 0.95, 0.99])
def test_histogram_quantiles_are_within_a_bucket_of_exact(q: float) -> None:
    x = np.random.default_rng(0).lognormal(0.5, 0.8, 20_000)
    got = lat.quantile(lat.histogram(x), q)
    assert got is not None and abs(got / np.quantile(x, q) - 1) < 0.13


def test_histograms_merge_by_addition_across_devices() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.lognormal(0, 0.3, 500), rng.lognormal(1, 0.3, 700)
    merged = lat.merge(lat.histogram(a), lat.histogram(b))
    assert merged == lat.histogram(np.concatenate([a, b]))
    assert lat.quantile([0] * lat.NBUCKETS, 0.5) is None
    with pytest.raises(ValueError, match="buckets"):
        lat.merge([1, 2], [1])
    assert lat.bucket_of(1e9) == lat.NBUCKETS - 1  # overflow bucket


def test_inference_window_counts_errors_and_exact_quantiles() -> None:
    w = InferenceWindow("m", "1.0.0")
    lats = np.random.default_rng(2).uniform(0.001, 0.003, 1000)
    for s in lats:
        w.observe(float(s), True)
    w.observe(0.5, False)
    rec = w.record("t")
    assert (rec["requests"], rec["errors"]) == (1001, 1)
    assert sum(rec["latency_hist"]) == 1000  # failed requests have no latency sample
    assert rec["latency_ms"]["p95"] == pytest.approx(np.quantile(lats * 1000, 0.95))


def test_sketch_window_buffers_image_bytes_and_counts_in_one_pass() -> None:
    rng = np.random.default_rng(3)
    imgs = rng.normal(size=(20, 3, 8, 8)).astype(np.float32)
    ref = build_reference({"img": imgs}, {})
    win = SketchWindow("cnn", "1", Sketch(ref))
    for i in range(3):
        win.add({"img": imgs[i : i + 1]}, {})
    assert win.pending_rows == 3 and win.pending_bytes == 3 * imgs[0].nbytes
    rec = win.record("t")
    assert rec["sketch"]["n"] == 3 and win.pending_bytes == 0 and win.pending == []


def test_serving_versions_reads_the_agent_inventory() -> None:
    entry = {"previous": None, "state": "COMMITTED", "serving": True, "profile": None}
    inv: Inventory = {
        "device_id": "d",
        "agent_version": "0.1.0",
        "execution_providers": [],
        "hardware": {},
        "profiles": [],
        "models": {
            "iris": {**entry, "version": "1.0.0", "providers": []},  # type: ignore[typeddict-item]
            "x": {**entry, "version": "2.1.0", "providers": []},  # type: ignore[typeddict-item]
        },
    }
    assert serving_versions(inv) == {"iris": "1.0.0", "x": "2.1.0"}
    assert serving_versions({**inv, "models": {}}) == {}
