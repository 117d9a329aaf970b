"""Soak-gate figures: p95 ratio against the previous version on the same kind of devices,
error rate and drift; A/B comparison of two versions on split parts of the fleet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import devices
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.drift import analysis
from edgefleet.cloud_controller.drift.health import compare_versions, rollout_health, wave_health
from edgefleet.cloud_controller.drift.ingest import ingest_batch
from tests.drift.conftest import inference_record, iris, sketch_record

T0 = datetime(2026, 2, 1, 8, 0, tzinfo=UTC)


def _fleet(s: Session) -> None:
    for i in range(6):
        dev = devices.get_or_create(s, f"x{i}")
        dev.profiles = ["cpu-x86_64"]
    for i in range(2):
        devices.get_or_create(s, f"arm{i}").profiles = ["cpu-arm64"]


def _latencies(rng: np.random.Generator, median_ms: float, n: int = 400) -> np.ndarray:
    return rng.lognormal(np.log(median_ms), 0.3, n)


def test_slower_release_shows_in_the_p95_ratio_and_breaks_the_gate(
    factory: sessionmaker[Session],
) -> None:
    rng = np.random.default_rng(0)
    ref, x, y = iris()
    since = T0 + timedelta(hours=2)
    with transaction(factory) as s:
        _fleet(s)
        analysis.register_reference(s, "iris", "1.0.0", ref)
        analysis.register_reference(s, "iris", "2.0.0", ref)
        msgs = []
        for i in range(6):  # the old version before the rollout on every x86 device
            msgs.append(
                (
                    f"x{i}",
                    {
                        "records": [
                            inference_record(_latencies(rng, 2.0), at=T0 + timedelta(hours=1))
                        ]
                    },
                )
            )
        for i in range(2):  # arm devices are slower: they must not be the baseline
            msgs.append(
                (
                    f"arm{i}",
                    {
                        "records": [
                            inference_record(_latencies(rng, 9.0), at=T0 + timedelta(hours=1))
                        ]
                    },
                )
            )
        for i in range(2):  # the new version on the first wave: 1.8x slower, 2 % errors
            msgs.append(
                (
                    f"x{i}",
                    {
                        "records": [
                            inference_record(
                                _latencies(rng, 3.6),
                                errors=8,
                                version="2.0.0",
                                at=since + timedelta(minutes=5),
                            ),
                            sketch_record(x, y, version="2.0.0", at=since + timedelta(minutes=5)),
                        ]
                    },
                )
            )
        ingest_batch(s, msgs, now=since + timedelta(minutes=6))
    with factory() as s:
        h = wave_health(s, "iris", "2.0.0", "1.0.0", ["x0", "x1"], since)
    assert 1.6 < h["p95_ratio"] < 2.0, h
    assert h["baseline"]["devices"] == 6  # the same kind of devices only (no arm)
    assert h["error_rate"] == 16 / 816
    assert h["drift"] == 0.0 and h["new"]["drift_status"] == "ok"
    gates = E.Gates(max_p95_ratio=1.5, max_error_rate=0.05, max_drift=0.2)
    health = E.Health(h["p95_ratio"], h["error_rate"], h["drift"])
    assert (E.gate_violation(gates, health) or "").startswith("p95 latency ratio")
    with factory() as s:  # the ticker's entry point: same figures, reused within its TTL
        again = rollout_health(s, "iris", "2.0.0", "1.0.0", ["x0", "x1"], since)
        assert again["p95_ratio"] == h["p95_ratio"]
        assert rollout_health(s, "iris", "2.0.0", "1.0.0", ["x1", "x0"], since) is again


def test_equal_release_passes_and_missing_figures_do_not_violate(
    factory: sessionmaker[Session],
) -> None:
    rng = np.random.default_rng(1)
    since = T0 + timedelta(hours=2)
    with transaction(factory) as s:
        _fleet(s)
        msgs = [
            (
                f"x{i}",
                {"records": [inference_record(_latencies(rng, 2.0), at=T0 + timedelta(hours=1))]},
            )
            for i in range(6)
        ]
        msgs += [
            (
                f"x{i}",
                {
                    "records": [
                        inference_record(
                            _latencies(rng, 2.0), version="2.0.0", at=since + timedelta(minutes=1)
                        )
                    ]
                },
            )
            for i in range(2)
        ]
        ingest_batch(s, msgs, now=since + timedelta(minutes=2))
    with factory() as s:
        h = wave_health(s, "iris", "2.0.0", "1.0.0", ["x0", "x1"], since)
        assert 0.85 < h["p95_ratio"] < 1.15 and h["error_rate"] == 0.0
        assert h["drift"] is None  # no sketches: no figure, not a violation
        none = wave_health(s, "iris", "3.0.0", "2.0.0", ["x5"], since)
        assert none["p95_ratio"] is None and none["error_rate"] is None
    assert E.gate_violation(E.Gates(1.5, 0.05, 0.2), E.Health(h["p95_ratio"], 0.0, None)) is None


def test_drifted_data_on_the_new_version_gives_a_drift_figure(
    factory: sessionmaker[Session],
) -> None:
    ref, x, y = iris()
    since = T0
    shifted = x.copy()
    shifted[:, 3] *= 1.6
    with transaction(factory) as s:
        analysis.register_reference(s, "iris", "2.0.0", ref)
        msgs = [("x0", {"records": [sketch_record(shifted, y, version="2.0.0", at=T0)]})]
        ingest_batch(s, msgs, now=T0)
    with factory() as s:
        h = wave_health(s, "iris", "2.0.0", None, ["x0"], since - timedelta(minutes=1))
    assert h["drift"] is not None and h["drift"] > 0.2
    assert "X[3]" in h["new"]["drifted_features"]


def test_ab_compares_two_versions_on_split_fleet(factory: sessionmaker[Session]) -> None:
    rng = np.random.default_rng(2)
    now = datetime.now(UTC)
    with transaction(factory) as s:
        msgs = [
            (
                f"a{i}",
                {
                    "records": [
                        inference_record(_latencies(rng, 2.0), errors=2, version="1.0.0", at=now)
                    ]
                },
            )
            for i in range(3)
        ]
        msgs += [
            (
                f"b{i}",
                {
                    "records": [
                        inference_record(_latencies(rng, 1.0), errors=0, version="1.1.0", at=now)
                    ]
                },
            )
            for i in range(3)
        ]
        ingest_batch(s, msgs, now=now)
    with factory() as s:
        ab = compare_versions(s, "iris", "1.0.0", "1.1.0", since=now - timedelta(hours=1))
    assert ab["a"]["devices"] == 3 and ab["b"]["devices"] == 3
    assert 0.4 < ab["p95_ratio"] < 0.6 and ab["error_rate_diff"] < 0
