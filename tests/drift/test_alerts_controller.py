"""Early looks against a real controller: a shift reaches the webhook within the bound."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller.capture import service as capture_service
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.drift import analysis
from edgefleet.cloud_controller.drift.alerts import look
from edgefleet.cloud_controller.drift.ingest import ingest_batch
from edgefleet.cloud_controller.drift.models import DriftEvent, SketchAggregate
from edgefleet.cloud_controller.drift.webhook import HEADER, verify_signature
from edgefleet.cloud_controller.models import CaptureSession, DesiredState
from tests.drift.conftest import Hook, Served, iris, migrated_factory, sketch_record


def _shifted(x: np.ndarray) -> np.ndarray:
    out = x.copy()
    out[:, 2] += 1.2
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def any_factory(
    request: pytest.FixtureRequest, factory: sessionmaker[Session]
) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        yield factory
        return
    import uuid

    import psycopg

    url: str = request.getfixturevalue("postgres_url")
    name = f"edgefleet_alerts_{uuid.uuid4().hex[:8]}"
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        f = migrated_factory(url.rsplit("/", 1)[0] + "/" + name)
        yield f
        f.kw["bind"].dispose()
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_default_plan_announces_a_shift_within_two_minutes(
    any_factory: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """On SQLite and PostgreSQL. The defaults (look every 30 s over the last 5 minutes, alpha 0.01 per hour-bucket),
    four devices reporting 20 rows every 10 s (the agent's interval), on simulated clock
    time: no event before the shift, one event after it, and one only."""
    factory = any_factory
    ref, x, y = iris()
    with transaction(factory) as s:
        analysis.register_reference(s, "iris", "1.0.0", ref)
        analysis.put_settings(s, "iris", scopes=["fleet"])
        for d in range(4):  # the devices run iris by the controller's desired state
            s.add(
                DesiredState(
                    device_id=f"d{d}",
                    seq=1,
                    models={"iris": {"version": "1.0.0"}},
                    issued_at=datetime(2026, 3, 1, tzinfo=UTC),
                    expires_at=datetime(2027, 3, 1, tzinfo=UTC),
                    envelope=b"{}",
                    published=True,
                )
            )
    limits = capture_service.limits()  # the controller sets these from its settings
    capture_service.configure(replace(limits, on_drift=True, on_drift_rows=300))
    rng = np.random.default_rng(3)
    t0 = datetime(2026, 3, 1, 10, 7, 13, tzinfo=UTC)
    shift_at = t0 + timedelta(minutes=10)
    first_event: datetime | None = None
    for step in range(0, 20 * 60, 10):
        now = t0 + timedelta(seconds=step)
        msgs = []
        for d in range(4):
            idx = rng.integers(0, 150, 20)
            xs = _shifted(x[idx]) if now >= shift_at else x[idx]
            msgs.append((f"d{d}", {"records": [sketch_record(xs, y[idx], at=now)]}))
        with transaction(factory) as s:
            ingest_batch(s, msgs, now=now)
            if step % 30 == 0:
                opened = look(s, now, force=True, capture_on_drift=True)
                fleet = [e for e in opened if e.scope == "fleet"]
                if fleet and first_event is None:
                    first_event = now
                    assert "X[2]" in fleet[0].features
                if now < shift_at:
                    assert not opened, "a false alarm before the shift"
    assert first_event is not None, "the shift was never announced"
    delay = (first_event - shift_at).total_seconds()
    print(f"\ndefault plan: shift to event {delay:.0f} s (simulated clock)")
    assert delay <= 120  # measured: 90 s (4 devices, 20 rows each every 10 s, iris); 150 s
    # with the 300 s window alone
    with factory() as s:  # one event per scope and episode, however many looks saw it
        fleet = s.scalars(select(DriftEvent).where(DriftEvent.scope == "fleet")).all()
        assert len(fleet) == 1
        assert fleet[0].evidence["episode"]["looks"] > 10
        assert fleet[0].evidence["plan"]["look_alpha"] < 0.01 / 200
        assert fleet[0].evidence["plan"]["windows"] == [60, 300]
        capture = fleet[0].evidence["capture"]
        assert capture["command"] == (
            f"edgefleet capture start iris --devices d0,d1,d2,d3 --rows 1000 "
            f"--drift-event {fleet[0].id}"
        )
    with transaction(factory) as s:  # the bucket closes drifted: the episode announced it
        judged = analysis.evaluate_due(s, t0 + timedelta(hours=2))
        assert not [e for e in judged if e.scope == "fleet"]
        closed = s.scalars(
            select(SketchAggregate).where(
                SketchAggregate.scope == "fleet",
                SketchAggregate.bucket_start == datetime(2026, 3, 1, 10, tzinfo=UTC),
            )
        ).one()
        assert closed.evaluated and closed.status == "drift"
    capture_service.configure(limits)
    # capture_on_drift: the event started one capture on the devices it names, with lineage
    with factory() as s:
        (cap,) = s.scalars(select(CaptureSession)).all()
        assert capture["id"] == cap.id and cap.drift_event_id == fleet[0].id
        assert cap.model == "iris" and cap.rows_wanted == 300


def test_shift_reaches_the_webhook_and_the_gauge_of_a_running_controller(
    tmp_path: Path, hook: Hook
) -> None:
    ref, x, y = iris()
    srv = Served(tmp_path / "ctl")
    try:
        with transaction(srv.factory) as s:
            analysis.register_reference(s, "iris", "1.0.0", ref)
            analysis.put_settings(
                s,
                "iris",
                webhook_url=hook.url,
                webhook_secret="k3y",
                scopes=["fleet", "device"],
                bucket_s=600,  # 120 looks a bucket, two windows: the default plan's levels
                config={"look_s": 5, "window_s": 20},
            )
        rng = np.random.default_rng(5)
        started = time.monotonic()
        shift_mono: float | None = None
        while time.monotonic() - started < 60 and not hook.received.is_set():
            now = datetime.now(UTC)
            if shift_mono is None and time.monotonic() - started > 8:
                shift_mono = time.monotonic()
            msgs = []
            for d in range(3):
                idx = rng.integers(0, 150, 20)
                xs = _shifted(x[idx]) if shift_mono is not None else x[idx]
                msgs.append((f"d{d}", {"records": [sketch_record(xs, y[idx], at=now)]}))
            with transaction(srv.factory) as s:  # what the MQTT bridge does with a batch
                ingest_batch(s, msgs, now=now)
            hook.received.wait(1.0)
        assert hook.received.is_set(), "no webhook within 60 s"
        assert shift_mono is not None
        delay = time.monotonic() - shift_mono
        print(f"\nrunning controller (look 5 s, window 20 s): shift to webhook {delay:.1f} s")
        assert delay < 2 * 20 + 5 + 5  # two windows, a look, the poll and delivery
        headers, body = hook.calls[0]
        assert verify_signature("k3y", body, headers[HEADER.lower()])
        doc = hook.bodies()[0]
        assert doc["model"] == "iris" and doc["versions"] == ["1.0.0"]
        assert doc["scope"] in ("fleet", "device") and doc["devices"]
        assert doc["p_value"] <= doc["threshold"] <= 0.8 * 0.01 / 200
        assert doc["statistic"]["value"] > 0 and "X[2]" in doc["features"]
        assert doc["first_seen"] and doc["window"]["seconds"] in (10, 20)
        assert doc["capture"]["command"].startswith("edgefleet capture start iris --devices ")
        assert f"--drift-event {doc['event']['id']}" in doc["capture"]["command"]
        assert doc["capture"]["id"] is None  # capture_on_drift is off
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        # the announced scope's gauge is up (the first event may be a device's or the fleet's)
        gauge = (
            f'edgefleet_drift_state{{key="{doc["scope_key"]}",model="iris",scope="{doc["scope"]}"}}'
        )
        assert f"{gauge} 1.0" in metrics
        assert "edgefleet_drift_statistic{" in metrics
    finally:
        srv.stop()
