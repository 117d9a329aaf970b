"""The bridge's pattern: one transaction per batch, one savepoint per message."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.drift import analysis
from edgefleet.cloud_controller.drift.ingest import PENDING_KEY, ingest_telemetry
from edgefleet.cloud_controller.drift.models import DriftEvent, SketchAggregate
from tests.drift.conftest import Hook, iris, sketch_record

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def test_sketches_merge_once_at_commit_and_webhooks_wait_for_the_real_commit(
    factory: sessionmaker[Session], hook: Hook
) -> None:
    ref, x, y = iris()
    with transaction(factory) as s:
        analysis.register_reference(s, "iris", "1.0.0", ref)
        analysis.put_settings(s, "iris", webhook_url=hook.url, webhook_secret="k", scopes=["fleet"])
    shifted = x.copy()
    shifted[:, 2] += 1.2
    with transaction(factory) as s:
        for i in range(6):
            with s.begin_nested():
                ingest_telemetry(s, f"d{i}", {"records": [sketch_record(shifted, y, at=T0)]})
        assert len(s.info[PENDING_KEY]) == 6  # nothing merged per message
        assert not hook.received.is_set()
    assert PENDING_KEY not in s.info
    assert hook.received.wait(timeout=15)  # the bucket (closed long ago) judged at commit
    with factory() as s:
        fleet = s.scalars(select(SketchAggregate).where(SketchAggregate.scope == "fleet")).one()
        assert fleet.n == 900 and fleet.status == "drift"
        assert len(list(s.scalars(select(DriftEvent)))) == 1


def test_a_rolled_back_batch_merges_nothing(factory: sessionmaker[Session]) -> None:
    _, x, y = iris()
    try:
        with transaction(factory) as s:
            ingest_telemetry(s, "d1", {"records": [sketch_record(x, y, at=T0)]})
            raise RuntimeError("the bridge's batch failed")
    except RuntimeError:
        pass
    assert PENDING_KEY not in s.info
    with transaction(factory) as s:
        ingest_telemetry(s, "d1", {"records": [sketch_record(x[:10], y[:10], at=T0)]})
    with factory() as s:
        rid, merged, _ = analysis.merged(s, "iris", since=T0 - timedelta(hours=1))
        assert merged is not None and merged["n"] == 10 and rid == iris()[0]["id"]


def test_reads_in_the_same_session_see_deferred_sketches(factory: sessionmaker[Session]) -> None:
    _, x, y = iris()
    with transaction(factory) as s:
        ingest_telemetry(s, "d1", {"records": [sketch_record(x, y, at=T0)]})
        _, merged, _ = analysis.merged(s, "iris")
        assert merged is not None and merged["n"] == 150
        assert np.sum(merged["counts"]["X[0]"]) == 150
