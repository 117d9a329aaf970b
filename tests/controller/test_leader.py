"""Leader election and fencing: the pure decisions, then the lease row on PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, text, update
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.leader import AlwaysLeader, Fenced, LeaseElector
from edgefleet.cloud_controller.leader_decide import (
    Acquire,
    Follow,
    LeaseRow,
    Renew,
    decide,
    still_leader,
)
from edgefleet.cloud_controller.models import ControllerLease
from tests.controller.conftest import pg_schema

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(seconds=5)
EARLIER = NOW - timedelta(seconds=1)


def test_decide() -> None:
    assert decide(LeaseRow(None, 0, EARLIER), "a", None, NOW) == Acquire(0, "no holder")
    assert decide(LeaseRow("a", 4, LATER), "a", 4, NOW) == Renew(4)
    # mine by epoch even when it ran out: nobody else took it (the UPDATE checks the epoch)
    assert decide(LeaseRow("a", 4, EARLIER), "a", 4, NOW) == Renew(4)
    assert decide(LeaseRow("b", 4, LATER), "a", None, NOW) == Follow("b", 4, LATER)
    assert decide(LeaseRow("b", 4, LATER), "a", 3, NOW) == Follow("b", 4, LATER)
    took = decide(LeaseRow("b", 4, NOW), "a", None, NOW)  # expires_at == now: expired
    assert isinstance(took, Acquire) and took.seen_epoch == 4
    # my id, another epoch: an earlier process of this replica
    again = decide(LeaseRow("a", 4, LATER), "a", None, NOW)
    assert isinstance(again, Acquire) and "earlier process" in again.why


def test_still_leader() -> None:
    assert not still_leader(None, 0.0, 1.0)
    assert still_leader(10.0, 8.9, 1.0)
    assert not still_leader(10.0, 9.0, 1.0)


def test_sqlite_controller_is_always_leader() -> None:
    el = AlwaysLeader("one")
    assert el.is_leader() and el.epoch() == 0


@pytest.fixture
def pg(postgres_url: str) -> Iterator[tuple[Engine, sessionmaker[Session]]]:
    with pg_schema(postgres_url) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        try:
            yield engine, db.session_factory(engine)
        finally:
            engine.dispose()


def _expire(factory: sessionmaker[Session]) -> None:
    with db.transaction(factory) as s:
        s.execute(update(ControllerLease).values(expires_at=datetime(1970, 1, 1, tzinfo=UTC)))


def test_one_leader_and_epochs_rise(pg: tuple[Engine, sessionmaker[Session]]) -> None:
    _, factory = pg
    a = LeaseElector(factory, "a", ttl_s=30, renew_s=1)
    b = LeaseElector(factory, "b", ttl_s=30, renew_s=1)
    assert a.step() and not b.step()
    assert a.epoch() == 1 and b.epoch() is None
    assert a.step() and a.epoch() == 1  # renewed, same epoch
    _expire(factory)
    assert b.step() and b.epoch() == 2  # took over: the epoch rose
    assert not a.step() and a.epoch() is None  # a learns it was deposed
    b.stop()  # gives the lease up: a takes it at once
    assert a.step() and a.epoch() == 3


def test_deposed_leaders_write_is_refused(
    pg: tuple[Engine, sessionmaker[Session]], tmp_path: Path
) -> None:
    """a still believes it leads (its lease time has not run out on its own clock) when b
    takes over; a's next fenced write is refused and rolled back."""
    engine, factory = pg
    with engine.begin() as c:
        c.execute(text("CREATE TABLE fenced_writes (who TEXT)"))
    a = LeaseElector(factory, "a", ttl_s=30, renew_s=1)
    b = LeaseElector(factory, "b", ttl_s=30, renew_s=1)
    assert a.step()

    def write(el: LeaseElector) -> None:
        with db.transaction(factory) as s:
            el.fence(s)
            s.execute(text("INSERT INTO fenced_writes VALUES (:w)"), {"w": el.replica_id})

    write(a)
    _expire(factory)
    assert b.step() and b.epoch() == 2
    assert a.is_leader()  # a has not noticed
    with pytest.raises(Fenced, match="deposed"):
        write(a)
    write(b)
    with engine.connect() as c:
        assert [r[0] for r in c.execute(text("SELECT who FROM fenced_writes"))] == ["a", "b"]


def test_takeover_waits_for_the_leaders_open_write(
    pg: tuple[Engine, sessionmaker[Session]],
) -> None:
    """The fence holds the lease row for share: a takeover's UPDATE waits until the old
    leader's transaction ends, so its write lands before the new epoch, never after."""
    _, factory = pg
    a = LeaseElector(factory, "a", ttl_s=30, renew_s=1)
    b = LeaseElector(factory, "b", ttl_s=30, renew_s=1)
    assert a.step()
    _expire(factory)
    took = threading.Event()
    with db.transaction(factory) as s:
        a.fence(s)
        t = threading.Thread(target=lambda: b.step() and took.set())
        t.start()
        assert not took.wait(1.0), "the takeover did not wait for the open fenced write"
    t.join(10)
    assert took.is_set() and b.epoch() == 2


def test_deposed_leaders_rollout_tick_is_refused(postgres_url: str) -> None:
    """The ticker's own writes: after a takeover, the old leader's tick changes nothing and
    publishes nothing; the new leader's tick goes on."""
    from edgefleet.cloud_controller.models import Rollout
    from tests.controller.test_rollout_service import SPEC, Clock, seeded_store, service

    with pg_schema(postgres_url) as url:
        factory = seeded_store(url)
        a = LeaseElector(factory, "a", ttl_s=30, renew_s=1)
        b = LeaseElector(factory, "b", ttl_s=30, renew_s=1)
        assert a.step()
        clock = Clock()
        old, old_sent = service(factory, clock)
        old.fence, old.may_publish = a.fence, a.is_leader
        st = old.create({**SPEC, "waves": [50, 100], "device_timeout_s": 10}, "t")
        rid = st.spec.rollout_id
        _expire(factory)
        assert b.step()
        new, _ = service(factory, clock)
        new.fence, new.may_publish = b.fence, b.is_leader
        with factory() as s:
            row = s.get(Rollout, rid)
            assert row is not None
            before = row.revision
        clock.now += 60  # wave 1 times out: a tick has work to write
        published = len(old_sent)
        with pytest.raises(Fenced):
            old.tick()
        with factory() as s:
            row = s.get(Rollout, rid)
            assert row is not None and row.revision == before
        assert len(old_sent) == published
        new.tick()
        with factory() as s:
            row = s.get(Rollout, rid)
            assert row is not None and row.revision > before


def test_a_report_reaching_a_replica_with_an_old_copy_is_applied_to_the_current_rollout(
    postgres_url: str,
) -> None:
    """With shared ingest a follower applies reports too. Its copy of a rollout may be older
    than the leader's (a wave the leader has dispatched since): a report judged on that copy
    was ignored, then acknowledged, and the rollout never finished. It is applied to the
    rollout as it stands in the database."""
    from edgefleet.cloud_controller import rollout_engine as E
    from edgefleet.cloud_controller.models import RolloutDevice
    from tests.controller.test_rollout_service import SPEC, Clock, seeded_store, service

    with pg_schema(postgres_url) as url:
        factory = seeded_store(url)
        clock = Clock()
        leader, _ = service(factory, clock)
        follower, _ = service(factory, clock)
        st = leader.create({**SPEC, "waves": [50, 100], "device_timeout_s": 600}, "t")
        rid = st.spec.rollout_id
        follower.sync()  # the follower's copy: wave 1 at work, wave 2 not yet
        first = sorted(d for d, p in st.devices.items() if p.state == E.DevState.IN_PROGRESS)
        assert len(first) == 2

        def done(device: str) -> tuple[str, E.StatusReport]:
            return "iris", E.StatusReport(
                device, "2.0.0", "COMMITTED", rollout_id=rid, model="iris"
            )

        leader.on_status([done(d) for d in first])
        for _ in range(5):
            clock.now += 5
            leader.tick()
        second = sorted(
            d for d, p in leader._active[rid].devices.items() if p.state == E.DevState.IN_PROGRESS
        )
        assert second and not set(second) & set(first)  # the leader dispatched wave 2
        follower.on_status([done(second[0])])  # its share of the reports
        with factory() as s:
            row = s.get(RolloutDevice, (rid, second[0]))
            assert row is not None and row.state == E.DevState.SUCCEEDED.value
