"""Controller ingest: duplicates dropped, sketches merged per scope, events, signed webhooks."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import devices
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.drift import analysis
from edgefleet.cloud_controller.drift.ingest import TelemetryError, ingest_batch, ingest_telemetry
from edgefleet.cloud_controller.drift.models import DriftEvent, SketchAggregate, TelemetryRecord
from edgefleet.cloud_controller.drift.webhook import HEADER, verify_signature
from tests.drift.conftest import Hook, inference_record, iris, migrated_factory, sketch_record

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def _count(s: Session, model: type) -> int:
    return int(s.scalar(select(func.count()).select_from(model)) or 0)


def test_duplicate_records_are_dropped_by_device_and_id(factory: sessionmaker[Session]) -> None:
    _, x, y = iris()
    msg = {
        "device_id": "d1",
        "records": [
            sketch_record(x[:50], y[:50], at=T0, rid=1),
            inference_record(np.full(30, 2.0), at=T0, rid=2),
            {"id": 3, "at": T0.isoformat(), "kind": "system", "cpu_percent": 5.0},
        ],
    }
    with transaction(factory) as s:
        assert ingest_telemetry(s, "d1", msg) == 3
    with transaction(factory) as s:  # at-least-once delivery: the same message again
        assert ingest_telemetry(s, "d1", msg) == 0
        assert ingest_telemetry(s, "d2", msg) == 3  # ids are per device
        overlap = {"records": [*msg["records"][1:], {**msg["records"][2], "id": 4}]}
        assert ingest_telemetry(s, "d1", overlap) == 1
    with factory() as s:
        assert _count(s, TelemetryRecord) == 7
        fleet = s.scalars(select(SketchAggregate).where(SketchAggregate.scope == "fleet")).one()
        assert fleet.n == 100  # d1 and d2 once each, the duplicate not merged


def test_a_device_clock_ahead_of_the_controller_counts_as_now(
    factory: sessionmaker[Session],
) -> None:
    _, x, y = iris()
    now = T0 + timedelta(minutes=30)
    msg = {"records": [sketch_record(x, y, at=T0 + timedelta(days=3))]}
    with transaction(factory) as s:
        ingest_batch(s, [("skewed", msg)], now=now)
        rec = s.scalars(select(TelemetryRecord)).one()
        assert analysis.utc(rec.at) == now
        agg = s.scalars(select(SketchAggregate).where(SketchAggregate.scope == "fleet")).one()
        assert analysis.utc(agg.bucket_start) == T0  # the bucket of "now", closes on time


def test_malformed_payloads_are_refused_with_reason(factory: sessionmaker[Session]) -> None:
    with transaction(factory) as s:
        with pytest.raises(TelemetryError, match="no records list"):
            ingest_telemetry(s, "d1", {"device_id": "d1"})
        bad = {
            "records": [{"kind": "system"}, {"id": "x", "kind": "agent"}, {"id": 1, "kind": "?"}]
        }
        assert ingest_telemetry(s, "d1", bad) == 0


def test_sketches_merge_per_device_group_release_and_fleet(factory: sessionmaker[Session]) -> None:
    ref, x, y = iris()
    with transaction(factory) as s:
        devices.set_labels(s, "a", groups=["north"])
        devices.set_labels(s, "b", groups=["north", "lab"])
        analysis.register_reference(s, "iris", "1.0.0", ref)
    batch = [
        ("a", {"records": [sketch_record(x[:60], y[:60], at=T0)]}),
        ("b", {"records": [sketch_record(x[60:], y[60:], at=T0 + timedelta(minutes=5))]}),
        ("b", {"records": [sketch_record(x[:10], y[:10], version="1.1.0", at=T0)]}),
    ]
    with transaction(factory) as s:
        assert ingest_batch(s, batch, now=T0 + timedelta(minutes=10)) == 3
    with factory() as s:
        aggs = {(a.scope, a.scope_key): a for a in s.scalars(select(SketchAggregate))}
        assert {k: a.n for k, a in aggs.items()} == {
            ("device", "a"): 60,
            ("device", "b"): 100,
            ("group", "north"): 160,
            ("group", "lab"): 100,
            ("release", "1.0.0"): 150,
            ("release", "1.1.0"): 10,
            ("fleet", "*"): 160,
        }
        release = aggs[("release", "1.0.0")].sketch
        for f in ref["features"]:  # all of iris counted once = the reference counts
            assert release["counts"][f["name"]] == f["counts"]
        assert aggs[("fleet", "*")].versions == ["1.0.0", "1.1.0"]
        rid, merged, _versions = analysis.merged(s, "iris", scope="group", key="north")
        assert rid == ref["id"] and merged is not None and merged["n"] == 160


def _shifted(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, 2] += 1.2
    return out


def test_closed_drifted_bucket_raises_one_event_and_a_signed_webhook(
    factory: sessionmaker[Session], hook: Hook
) -> None:
    ref, x, y = iris()
    with transaction(factory) as s:
        analysis.register_reference(s, "iris", "1.0.0", ref)
        analysis.put_settings(
            s,
            "iris",
            webhook_url=hook.url,
            webhook_secret="s3cret",
            scopes=["fleet"],
            config={"alpha": 0.01},
        )
    rng = np.random.default_rng(0)
    recs = []
    for i in range(4):  # four devices' windows in the 10:00 bucket, petal length shifted
        idx = rng.integers(0, 150, 100)
        recs.append((f"d{i}", {"records": [sketch_record(_shifted(x[idx]), y[idx], at=T0)]}))
    with transaction(factory) as s:
        ingest_batch(s, recs, now=T0 + timedelta(minutes=30))
        assert _count(s, DriftEvent) == 0  # the bucket is still open
    late = T0 + timedelta(hours=1, minutes=2)
    with transaction(factory) as s:  # the next bucket's first window closes 10:00
        ingest_telemetry(s, "d0", {"records": [sketch_record(x[:20], y[:20], at=late)]})
    assert hook.received.wait(timeout=15), "webhook not called"
    with factory() as s:
        ev = s.scalars(select(DriftEvent)).one()
        assert ev.scope == "fleet" and "X[2]" in ev.features
        assert ev.evidence["n"] == 400 and ev.evidence["status"] == "drift"
    headers, body = hook.calls[0]
    assert verify_signature("s3cret", body, headers[HEADER.lower()])
    assert not verify_signature("wrong", body, headers[HEADER.lower()])
    doc = hook.bodies()[0]
    assert doc["type"] == "edgefleet.drift" and doc["event"]["model"] == "iris"
    feats = {f["name"]: f for f in doc["evidence"]["features"]}
    assert feats["X[2]"]["drifted"] and feats["X[2]"]["psi"] > 0.2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with factory() as s:
            if s.scalars(select(DriftEvent)).one().webhook_state == "delivered":
                break
        time.sleep(0.05)
    with factory() as s:
        assert s.scalars(select(DriftEvent)).one().webhook_state == "delivered"
    with transaction(factory) as s:  # judged once: no second event for the same bucket
        assert analysis.evaluate_due(s, late + timedelta(hours=3)) == []
        # a late window for the closed bucket (an agent back from an outage): merged and
        # judged again, still one event
        idx = rng.integers(0, 150, 100)
        msg = {"records": [sketch_record(_shifted(x[idx]), y[idx], at=T0 + timedelta(minutes=9))]}
        ingest_batch(s, [("d9", msg)], now=late + timedelta(hours=3))
        fleet = s.scalars(
            select(SketchAggregate).where(
                SketchAggregate.scope == "fleet", SketchAggregate.bucket_start == T0
            )
        ).one()
        assert fleet.n == 500 and fleet.evaluated and fleet.status == "drift"
        assert _count(s, DriftEvent) == 1


def test_failed_webhooks_are_retried_later_with_the_error_kept(
    factory: sessionmaker[Session],
) -> None:
    from edgefleet.cloud_controller.drift import ingest as ingest_mod
    from edgefleet.cloud_controller.drift.webhook import deliver_pending

    hook = Hook(fail_first=1)
    try:
        ref, x, y = iris()
        with transaction(factory) as s:
            analysis.register_reference(s, "iris", "1.0.0", ref)
            analysis.put_settings(
                s, "iris", webhook_url=hook.url, webhook_secret="k", scopes=["fleet"]
            )
            msg = {"records": [sketch_record(_shifted(x), y, at=T0)]}
            ingest_batch(s, [("d1", msg)], now=T0 + timedelta(minutes=30))  # bucket still open
            evs = analysis.evaluate_due(s, T0 + timedelta(hours=2))
            assert len(evs) == 1 and evs[0].webhook_state == "pending"
        assert deliver_pending(factory) == 0  # 503: kept pending with the reason
        with factory() as s:
            ev = s.scalars(select(DriftEvent)).one()
            assert (ev.webhook_state, ev.webhook_attempts) == ("pending", 1)
            assert ev.webhook_error is not None and "HTTP 503" in ev.webhook_error
        ingest_mod._last_retry[0] = 0.0  # the retry interval has passed
        later = T0 + timedelta(hours=2, minutes=1)
        with transaction(factory) as s:  # any later sketch batch retries pending webhooks
            ingest_batch(s, [("d2", {"records": [sketch_record(x, y, at=later)]})], now=later)
        assert hook.received.wait(timeout=15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with factory() as s:
                ev = s.scalars(select(DriftEvent)).one()
                if ev.webhook_state == "delivered":
                    break
            time.sleep(0.05)
        assert (ev.webhook_state, ev.webhook_attempts, ev.webhook_error) == ("delivered", 2, None)
    finally:
        hook.close()


def test_undrifted_buckets_are_judged_ok_without_events(factory: sessionmaker[Session]) -> None:
    ref, x, y = iris()
    rng = np.random.default_rng(1)
    with transaction(factory) as s:
        analysis.register_reference(s, "iris", "1.0.0", ref)
        for h in range(3):
            idx = rng.integers(0, 150, 300)
            msg = {"records": [sketch_record(x[idx], y[idx], at=T0 + timedelta(hours=h))]}
            ingest_telemetry(s, "d1", msg)
        analysis.evaluate_due(s, T0 + timedelta(hours=6))
    with factory() as s:
        assert _count(s, DriftEvent) == 0
        hist = analysis.history(s, "iris")
        assert [h["status"] for h in hist] == ["ok", "ok", "ok"] and all(h["closed"] for h in hist)


def test_unknown_reference_waits_until_the_package_arrives(factory: sessionmaker[Session]) -> None:
    ref, x, y = iris()
    with transaction(factory) as s:
        ingest_telemetry(s, "d1", {"records": [sketch_record(_shifted(x), y, at=T0)]})
        assert analysis.evaluate_due(s, T0 + timedelta(hours=3)) == []
        res = analysis.history(s, "iris")[0]
        assert res["status"] == "no_reference"
        analysis.register_reference(s, "iris", "1.0.0", ref)
        evs = analysis.evaluate_due(s, T0 + timedelta(hours=3))
        assert {e.scope for e in evs} == {"fleet", "release"}  # default scopes with data


def test_ingest_on_postgresql(postgres_url: str) -> None:
    import uuid

    import psycopg

    name = f"edgefleet_drift_{uuid.uuid4().hex[:8]}"
    admin = postgres_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        f = migrated_factory(postgres_url.rsplit("/", 1)[0] + "/" + name)
        ref, x, y = iris()
        msg = {"records": [sketch_record(x, y, at=T0), inference_record(np.ones(40), at=T0)]}
        with transaction(f) as s:
            analysis.register_reference(s, "iris", "1.0.0", ref)
            assert ingest_telemetry(s, "pg1", msg) == 2
        with transaction(f) as s:
            assert ingest_telemetry(s, "pg1", msg) == 0
            assert _count(s, TelemetryRecord) == 2
            _rid, merged, _ = analysis.merged(s, "iris")
            assert merged is not None and merged["n"] == 150
        f.kw["bind"].dispose()
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_records_read_back_as_written_and_each_new_one_counts_once(
    factory: sessionmaker[Session],
) -> None:
    """SQLite's insert of plain records (no sketch) goes to the driver with the columns' own
    conversions: the ORM reads back what was sent, and a record twice in one batch, or sent
    again later, is stored and counted once."""
    rec = {"id": 9, "at": T0.isoformat(), "kind": "inference", "model": "iris", "version": "2",
           "requests": 7, "errors": 1, "latency_ms": {"p95": 2.5}, "note": "é\u2603"}  # fmt: skip
    with transaction(factory) as s:
        n = ingest_batch(
            s, [("d1", {"records": [rec]}), ("d1", {"records": [rec, {**rec, "id": 10}]})]
        )
        assert n == 2
    with transaction(factory) as s:
        assert ingest_batch(s, [("d1", {"records": [rec]})]) == 0
    with factory() as s:
        rows = s.scalars(select(TelemetryRecord).order_by(TelemetryRecord.record_id)).all()
        assert [r.record_id for r in rows] == [9, 10]
        r = rows[0]
        assert (r.device_id, r.kind, r.model, r.version, r.requests, r.errors, r.p95_ms) == (
            "d1", "inference", "iris", "2", 7, 1, 2.5,
        )  # fmt: skip
        assert r.at.replace(tzinfo=UTC) == T0 and r.data == rec
