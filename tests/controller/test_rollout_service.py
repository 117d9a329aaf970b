"""The rollout shell on a SQLite file with a controllable clock (time is an input)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import db, devices
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.desired import Signer
from edgefleet.cloud_controller.models import DesiredState, Package
from edgefleet.cloud_controller.rollouts import RolloutService, default_health
from edgefleet.wire.mqtt import verify_desired

T0 = 1_900_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def seeded_store(url: str) -> sessionmaker[Session]:
    """A migrated database holding iris 1.0.0 and 2.0.0 for cpu-x86_64 and four online devices
    d0..d3 that run 1.0.0."""
    engine = db.make_engine(url)
    db.upgrade(engine)
    factory = db.session_factory(engine)
    now = datetime.now(UTC)
    with db.transaction(factory) as s:
        for v in ("1.0.0", "2.0.0"):
            s.add(
                Package(
                    name="iris", version=v, profile="cpu-x86_64", filename=f"{v}.efpkg",
                    sha256=v[0] * 64, size=10, key_id="k", manifest={}, uploaded_at=now,
                    uploaded_by="t",
                )
            )  # fmt: skip
        for i in range(4):
            devices.apply_presence(
                s, f"d{i}", {"online": True, "profiles": ["cpu-x86_64"],
                             "installed": {"iris": {"version": "1.0.0"}}},
            )  # fmt: skip
    return factory


@pytest.fixture
def store(tmp_path: Path) -> sessionmaker[Session]:
    return seeded_store(f"sqlite:///{tmp_path / 's.db'}")


def service(
    factory: sessionmaker[Session], clock: Clock, **kw: Any
) -> tuple[RolloutService, list[tuple[str, bytes]]]:
    sent: list[tuple[str, bytes]] = []
    key = ec.generate_private_key(ec.SECP256R1())
    svc = RolloutService(
        factory,
        Signer(key, timedelta(hours=2)),
        "http://ctl",
        publish=lambda t, p: sent.append((t, p)),
        clock=clock,
        **kw,
    )
    return svc, sent


SPEC = {
    "model": "iris",
    "version": "2.0.0",
    "target": {"groups": [], "tags": [], "device_ids": ["d0", "d1", "d2", "d3"]},
    "on_abort": "rollback",
}


def test_health_gates_are_asked_only_while_soaking_and_abort(store: sessionmaker[Session]) -> None:
    clock = Clock()
    calls: list[str] = []

    def health(_s: Session, st: E.RolloutState) -> E.Health:
        calls.append(st.phase.value)
        return E.Health(p95_ratio=2.0 if clock.now > T0 + 5 else 1.0)

    svc, _ = service(store, clock, health=health)
    st = svc.create(
        {**SPEC, "waves": [50, 100], "soak_s": 60, "gates": {"max_p95_ratio": 1.5}, "seed": 1},
        "t",
    )
    svc.tick()
    assert calls == []  # running: nobody looks at gates
    moved = [d for d, p in st.devices.items() if p.state == E.DevState.IN_PROGRESS]
    svc.on_status([("iris", E.StatusReport(d, "2.0.0", "COMMITTED")) for d in moved])
    svc.tick()
    assert calls == ["soaking"] and svc.get_state(st.spec.rollout_id).phase == E.Phase.SOAKING
    clock.now += 10
    svc.tick()
    final = svc.get_state(st.spec.rollout_id)
    assert final is not None and final.phase == E.Phase.ABORTED
    assert "p95 latency ratio 2 > 1.5" in (final.reason or "")
    with store() as s:
        for d in moved:
            row = s.get(DesiredState, d)
            assert row is not None and row.models["iris"]["version"] == "1.0.0"


def test_default_health_reads_the_drift_figures(store: sessionmaker[Session]) -> None:
    clock = Clock()
    svc, _ = service(store, clock)
    st = svc.create({**SPEC, "waves": [100]}, "t")
    with store() as s:
        h = default_health(s, st)
    # the drift analysis's figures are read; no telemetry yet: unknown, which trips no gate
    assert h == E.Health(None, None, None)
    assert E.gate_violation(E.Gates(1.0, 0.0, 0.0), h) is None


def test_retry_republishes_with_a_higher_seq(store: sessionmaker[Session]) -> None:
    clock = Clock()
    svc, sent = service(store, clock)
    st = svc.create(
        {**SPEC, "target": {"device_ids": ["d0"]}, "waves": [100], "max_retries": 1,
         "retry_backoff_s": 5, "device_timeout_s": 100},
        "t",
    )  # fmt: skip
    pub = svc._signer.key.public_key()
    first = verify_desired(sent[-1][1], [pub], device_id="d0", last_seq=None)
    assert first["models"]["iris"]["attempt"] == 1
    svc.on_status([("iris", E.StatusReport("d0", "2.0.0", "FAILED", "download_failed"))])
    clock.now += 5
    svc.tick()
    second = verify_desired(sent[-1][1], [pub], device_id="d0", last_seq=first["seq"])
    assert second["seq"] == first["seq"] + 1 and second["models"]["iris"]["attempt"] == 2
    assert second["models"]["iris"]["url"].startswith("http://ctl/api/v1/packages/")
    assert svc.get_state(st.spec.rollout_id).devices["d0"].attempts == 2


def test_rate_limit_through_the_shell(store: sessionmaker[Session]) -> None:
    clock = Clock()
    svc, sent = service(store, clock)
    st = svc.create({**SPEC, "waves": [100], "rate_per_min": 2}, "t")
    assert len(sent) == 2
    clock.now += 30
    svc.tick()
    assert len(sent) == 2
    clock.now += 31
    svc.tick()
    assert len(sent) == 4
    counts = E.counts(svc.get_state(st.spec.rollout_id))
    assert counts["states"] == {"in_progress": 4}


def test_expiring_desired_states_are_resigned(store: sessionmaker[Session]) -> None:
    clock = Clock()
    svc, sent = service(store, clock)
    svc.create({**SPEC, "waves": [100]}, "t")
    with store() as s:
        before = {r.device_id: r.seq for r in s.query(DesiredState)}
    n = len(sent)
    svc.tick()  # first tick after start: refresh pass, nothing near expiry (ttl 2 h)
    assert len(sent) == n
    # make the rows old: issued 1.5 h ago (past half of the 2 h lifetime)
    old = datetime.now(UTC) - timedelta(minutes=30)
    with db.transaction(store) as s:
        for r in s.query(DesiredState):
            r.expires_at = old + timedelta(hours=1)
    svc._last_refresh = 0.0
    svc.tick()
    assert len(sent) == n + 4
    with store() as s:
        after = {r.device_id: r.seq for r in s.query(DesiredState)}
    assert all(after[d] == before[d] + 1 for d in before)


def test_abort_without_a_package_of_the_previous_version_is_reported(
    store: sessionmaker[Session],
) -> None:
    with db.transaction(store) as s:
        devices.apply_presence(
            s, "old", {"online": True, "profiles": ["cpu-x86_64"],
                       "installed": {"iris": {"version": "0.9.0"}}},
        )  # fmt: skip
    clock = Clock()
    svc, _ = service(store, clock)
    st = svc.create({**SPEC, "target": {"device_ids": ["old", "d0"]}, "waves": [100]}, "t")
    rid = st.spec.rollout_id
    after = svc.control(rid, E.Abort("test"))
    assert E.counts(after)["rollback_requested"] == 2 and E.counts(after)["rolled_back"] == 0
    with store() as s:
        from sqlalchemy import select

        from edgefleet.cloud_controller.models import RolloutEvent

        msgs = [
            e.message for e in s.scalars(select(RolloutEvent).where(RolloutEvent.rollout_id == rid))
        ]
        old = s.get(DesiredState, "old")
        d0 = s.get(DesiredState, "d0")
    assert any(m.startswith("warning: 1 devices run 0.9.0") for m in msgs)
    assert any("old: cannot revert to 0.9.0" in m for m in msgs)
    assert old is not None and "iris" not in old.models  # never an entry the agent must refuse
    assert not old.remove  # installed outside the registry: never uninstalled by an abort
    assert d0 is not None and d0.models["iris"]["version"] == "1.0.0"


def test_abort_of_a_first_install_asks_for_removal_and_a_new_rollout_drops_it(
    store: sessionmaker[Session],
) -> None:
    with db.transaction(store) as s:
        devices.apply_presence(s, "new", {"online": True, "profiles": ["cpu-x86_64"]})
    clock = Clock()
    svc, sent = service(store, clock)
    pub = svc._signer.key.public_key()
    st = svc.create(
        {
            **SPEC,
            "target": {"device_ids": ["new", "d0"]},
            "waves": [100],
            "remove_first_installs": True,
        },
        "t",
    )
    rid = st.spec.rollout_id
    assert st.devices["new"].previous_version is None
    svc.on_status([("iris", E.StatusReport("new", "2.0.0", "COMMITTED", rollout_id=rid))])
    after = svc.control(rid, E.Abort("operator"))
    assert E.counts(after)["rollback_requested"] == 2 and E.counts(after)["rolled_back"] == 0
    (raw,) = [p for t, p in sent if t.endswith("/new/desired")][-1:]
    got = verify_desired(raw, [pub], device_id="new", last_seq=None)
    assert got["models"] == {} and got["remove"] == ["iris"]
    d0 = verify_desired(
        [p for t, p in sent if t.endswith("/d0/desired")][-1], [pub], device_id="d0", last_seq=None
    )
    assert "remove" not in d0 and d0["models"]["iris"]["version"] == "1.0.0"
    # Re-signing (expiry refresh) keeps the removal.
    with db.transaction(store) as s:
        for r in s.query(DesiredState):
            r.expires_at = datetime.now(UTC) + timedelta(minutes=10)
    svc._last_refresh = 0.0
    svc.tick()
    resigned = verify_desired(
        [p for t, p in sent if t.endswith("/new/desired")][-1], [pub], device_id="new",
        last_seq=got["seq"],
    )  # fmt: skip
    assert resigned["remove"] == ["iris"]
    # The device's REMOVED confirms its rollback; the rollout stays open for d0 only.
    svc.on_status([("iris", E.StatusReport("new", "2.0.0", "REMOVED", model="iris"))])
    svc.on_status([("iris", E.StatusReport("d0", "1.0.0", "COMMITTED", model="iris"))])
    done = svc.get_state(rid)
    assert done is not None and E.counts(done)["rolled_back"] == 2
    # A later rollout of the model to that device takes it off `remove` again.
    svc.create({**SPEC, "target": {"device_ids": ["new"]}, "waves": [100]}, "t")
    again = verify_desired(
        [p for t, p in sent if t.endswith("/new/desired")][-1], [pub], device_id="new",
        last_seq=resigned["seq"],
    )  # fmt: skip
    assert "remove" not in again and again["models"]["iris"]["version"] == "2.0.0"
    with store() as s:
        row = s.get(DesiredState, "new")
        assert row is not None and not row.remove


@pytest.fixture
def shared_store(db_url: str) -> sessionmaker[Session]:
    """The `store` contents on the parametrized database (SQLite file, PostgreSQL schema)."""
    return seeded_store(db_url)


def test_two_replicas_on_one_database_keep_exact_counts(
    shared_store: sessionmaker[Session],
) -> None:
    clock = Clock()
    key = ec.generate_private_key(ec.SECP256R1())
    sent: list[tuple[str, bytes]] = []

    def replica() -> RolloutService:
        return RolloutService(
            shared_store, Signer(key, timedelta(hours=2)), "http://ctl",
            publish=lambda t, p: sent.append((t, p)), clock=clock, health=None,
        )  # fmt: skip

    a = replica()
    st = a.create({**SPEC, "waves": [50, 100], "seed": 2}, "t")
    rid = st.spec.rollout_id
    b = replica()  # starts after the rollout exists
    first = sorted(d for d, p in st.devices.items() if p.wave == 0)
    second = sorted(d for d, p in st.devices.items() if p.wave == 1)
    a.on_status([("iris", E.StatusReport(first[0], "2.0.0", "COMMITTED"))])
    # b's copy is one revision behind: it must notice, reload, then apply
    b.on_status([("iris", E.StatusReport(first[1], "2.0.0", "COMMITTED"))])
    mid = b.get_state(rid)
    assert mid is not None and mid.wave == 1
    assert E.counts(mid)["states"] == {"succeeded": 2, "in_progress": 2}
    # a is stale too; its tick must not dispatch wave 2 a second time
    clock.now += 3
    a.tick()
    a.on_status([("iris", E.StatusReport(d, "2.0.0", "COMMITTED")) for d in second])
    for svc in (a, b):
        clock.now += 3
        svc.tick()
    with shared_store() as s:
        from sqlalchemy import select

        from edgefleet.cloud_controller.models import Rollout

        row = s.get(Rollout, rid)
        seqs = {r.device_id: r.seq for r in s.scalars(select(DesiredState))}
    assert row is not None and row.phase == "succeeded"
    assert row.state["counts"]["states"] == {"succeeded": 4}
    assert seqs == {d: 1 for d in first + second}  # each device dispatched exactly once
    assert b.get_state(rid).phase == E.Phase.SUCCEEDED  # type: ignore[union-attr]
    # a rollout created on one replica is picked up by the other's sync
    st2 = b.create({**SPEC, "version": "1.0.0", "waves": [100]}, "t")
    assert st2.spec.rollout_id not in a.active_ids()
    clock.now += 3
    a.tick()
    assert st2.spec.rollout_id in a.active_ids()


def _last_desired(svc: RolloutService, sent: list[tuple[str, bytes]], dev: str) -> dict[str, Any]:
    raw = [p for t, p in sent if t.endswith(f"/{dev}/desired")][-1]
    return verify_desired(raw, [svc._signer.key.public_key()], device_id=dev, last_seq=None)


def test_abort_of_a_first_install_never_removes_it_from_a_device_that_committed_it(
    shared_store: sessionmaker[Session],
) -> None:
    """The default (halt) and an explicit rollback both leave a committed first install alone:
    no `remove`, its desired entry stays; a device that failed it gets nothing to install."""
    from edgefleet.cloud_controller.models import Device

    with db.transaction(shared_store) as s:
        for d in ("gw-001", "gw-002"):
            devices.apply_presence(s, d, {"online": True, "profiles": ["cpu-x86_64"]})
    for mode in ("halt", "rollback"):
        svc, sent = service(shared_store, Clock())
        body = {
            "model": "iris",
            "version": "2.0.0" if mode == "halt" else "1.0.0",
            "target": {"device_ids": ["gw-001", "gw-002"]},
            "waves": [100],
            "on_abort": mode,
        }
        st = svc.create(body, "t")
        rid, v = st.spec.rollout_id, st.spec.version
        assert st.devices["gw-001"].previous_version is None or mode == "rollback"
        svc.on_status([("iris", E.StatusReport("gw-001", v, "COMMITTED", rollout_id=rid))])
        after = svc.control(rid, E.Abort("operator"))
        assert after.phase == E.Phase.ABORTED
        kept = _last_desired(svc, sent, "gw-001")
        assert "remove" not in kept and kept["models"]["iris"]["version"] == v, mode
        with shared_store() as s:
            row = s.get(DesiredState, "gw-001")
            assert row is not None and not row.remove
            dev = s.get(Device, "gw-001")
            assert dev is not None
        msgs = [e["message"] for e in _events(shared_store, rid)]
        assert not any("iris removed" in m for m in msgs), msgs
        assert mode == "halt" or any("gw-001: keeps" in m for m in msgs), msgs
        # the device still at work: followed (halt) or its entry withdrawn, never removed
        other = _last_desired(svc, sent, "gw-002")
        assert "remove" not in other
        with db.transaction(shared_store) as s:  # make the next round a first install again
            for d in ("gw-001", "gw-002"):
                r = s.get(DesiredState, d)
                if r is not None:
                    s.delete(r)
            s.query(Device).filter(Device.id.in_(["gw-001", "gw-002"])).update(
                {"installed": {}}, synchronize_session=False
            )


def _events(factory: sessionmaker[Session], rid: str) -> list[dict[str, Any]]:
    from edgefleet.cloud_controller.models import RolloutEvent

    with factory() as s:
        rows = (
            s.query(RolloutEvent).filter(RolloutEvent.rollout_id == rid).order_by(RolloutEvent.id)
        )
        return [{"message": r.message} for r in rows]


def test_spec_thresholds_reach_the_desired_state_and_rollbacks_are_marked(
    store: sessionmaker[Session],
) -> None:
    svc, sent = service(store, Clock())
    body = {**SPEC, "waves": [100], "gates": {"max_p95_ratio": 1.3}, "on_abort": "rollback"}
    st = svc.create(body, "t")
    entry = _last_desired(svc, sent, "d0")["models"]["iris"]
    assert entry["max_p95_ratio"] == 1.3 and "rollback" not in entry
    svc.control(st.spec.rollout_id, E.Abort())
    back = _last_desired(svc, sent, "d0")["models"]["iris"]
    assert back["version"] == "1.0.0" and back["rollback"] is True and "max_p95_ratio" not in back
    # without the gate no ratio is sent (the agent's own configuration applies)
    svc2, sent2 = service(store, Clock())
    svc2.create({**SPEC, "version": "1.0.0", "waves": [100]}, "t")
    assert "max_p95_ratio" not in _last_desired(svc2, sent2, "d0")["models"]["iris"]


def test_ids_by_unique_prefix_and_approve_with_nothing_to_approve_is_refused(
    store: sessionmaker[Session],
) -> None:
    from edgefleet.cloud_controller.rollouts import RolloutError

    svc, _ = service(store, Clock())
    st = svc.create({**SPEC, "waves": [50, 100], "approval_waves": [1], "seed": 2}, "t")
    rid = st.spec.rollout_id
    assert svc.get_state(rid[:4]) is not None and svc.get_state("zz-none") is None
    with pytest.raises(RolloutError) as e:
        svc.control(rid[:5], E.Approve())
    assert e.value.code == "nothing_to_approve" and e.value.status == 409
    with pytest.raises(RolloutError) as e:
        svc.control(rid, E.Approve(0))  # the running wave needs no approval
    assert e.value.code == "nothing_to_approve"
    with pytest.raises(RolloutError) as e:
        svc.control(rid, E.Resume())
    assert e.value.code == "not_paused"
    assert 1 in svc.control(rid, E.Approve(1)).approved  # a wave ahead: approved now
    with pytest.raises(RolloutError) as e:
        svc.control(rid, E.Approve(1))
    assert e.value.code == "nothing_to_approve"  # twice: nothing left to approve


def test_out_of_sync_since_follows_desired_and_reported(store: sessionmaker[Session]) -> None:
    from edgefleet.cloud_controller import desired
    from edgefleet.cloud_controller.models import Device

    svc, _ = service(store, Clock())
    with store() as s:
        dev = s.get(Device, "d0")
        assert dev is not None and dev.out_of_sync_since is None
        assert desired.sync_view(dev, s.get(DesiredState, "d0"))["managed"] is False
    svc.create({**SPEC, "waves": [100]}, "t")
    with store() as s:
        dev, row = s.get(Device, "d0"), s.get(DesiredState, "d0")
        assert dev is not None and dev.out_of_sync_since is not None
        view = desired.sync_view(dev, row)
        assert not view["in_sync"] and view["since"]
        assert view["models"] == [
            {
                "model": "iris",
                "desired": "2.0.0",
                "installed": "1.0.0",
                "local": False,
                "rollback_failed": False,
            }
        ]
        assert desired.sync_text(view).startswith("no: iris 1.0.0≠2.0.0 since ")
    now = datetime.now(UTC)
    with db.transaction(store) as s:
        devices.apply_presence(
            s, "d0", {"online": True, "installed": {"iris": {"version": "2.0.0"}}}, now
        )
        desired.note_sync_many(s, ["d0"], now)
    with store() as s:
        dev = s.get(Device, "d0")
        assert dev is not None and dev.out_of_sync_since is None
        assert desired.sync_text(desired.sync_view(dev, s.get(DesiredState, "d0"))) == "yes"
    # a version installed by hand (reported as a local install) is out of sync, and says so
    with db.transaction(store) as s:
        devices.apply_presence(
            s, "d0", {"online": True, "installed": {"iris": {"version": "9.0.0"}}}, now
        )
        dev = s.get(Device, "d0")
        assert dev is not None
        dev.last_status = {"model": "iris", "version": "9.0.0", "local": True}
        desired.note_sync_many(s, ["d0"], now)
    with store() as s:
        dev = s.get(Device, "d0")
        assert dev is not None
        text = desired.sync_text(desired.sync_view(dev, s.get(DesiredState, "d0")))
        assert text.startswith("no: iris 9.0.0≠2.0.0 (local install) since")


@pytest.mark.parametrize("ratio", [-1.0, 0, True, "1.3", float("inf")])
def test_a_malformed_probation_ratio_is_refused_when_signed(ratio: object) -> None:
    from edgefleet.wire.errors import RejectError
    from edgefleet.wire.mqtt import sign_desired

    entry = {"version": "1.0.0", "url": "http://x/1", "sha256": "a" * 64, "max_p95_ratio": ratio}
    state = {"device_id": "d", "seq": 1, "issued_at": "2026-01-01T00:00:00Z",
             "expires_at": "2026-01-02T00:00:00Z", "models": {"iris": entry}}  # fmt: skip
    with pytest.raises(RejectError, match="max_p95_ratio"):
        sign_desired(state, ec.generate_private_key(ec.SECP256R1()))


def test_replicas_applying_reports_at_once_never_give_up_on_a_batch(postgres_url: str) -> None:
    """Replicas sharing the ingest step the same rollout at once, each from its own copy. A
    step that found the rollout moved on reloaded it and tried again, five times at most, then
    raised `conflict`: the bridge had already stored those reports and acknowledged them to
    their devices, so the rollout never heard of them (the devices waited for their timeout).
    Now a step locks the rollout's row and reloads under the lock: it always goes through."""
    import threading

    from tests.controller.conftest import pg_schema

    with pg_schema(postgres_url) as url:
        factory = seeded_store(url)
        ids = [f"g{i:03d}" for i in range(48)]
        with db.transaction(factory) as s:
            for d in ids:
                devices.apply_presence(
                    s,
                    d,
                    {
                        "online": True,
                        "profiles": ["cpu-x86_64"],
                        "installed": {"iris": {"version": "1.0.0"}},
                    },
                )
        clock = Clock()
        key = ec.generate_private_key(ec.SECP256R1())
        replicas = [
            RolloutService(
                factory,
                Signer(key, timedelta(hours=2)),
                "http://ctl",
                publish=None,
                clock=clock,
                health=None,
            )
            for _ in range(4)
        ]
        spec = {**SPEC, "target": {"device_ids": ids}, "waves": [100]}
        rid = replicas[0].create(spec, "t").spec.rollout_id
        for r in replicas[1:]:
            r.sync()
        errors: list[BaseException] = []
        states = ("DOWNLOADING", "VERIFYING", "INSTALLING", "COMMITTED")

        def feed(svc: RolloutService, mine: list[str]) -> None:
            try:
                for state in states:
                    for d in mine:  # one report per step: as many steps as can collide
                        svc.on_status([("iris", E.StatusReport(d, "2.0.0", state))])
            except BaseException as e:
                errors.append(e)

        threads = [
            threading.Thread(target=feed, args=(svc, ids[i::4])) for i, svc in enumerate(replicas)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        with factory() as s:
            from edgefleet.cloud_controller.models import Rollout

            row = s.get(Rollout, rid)
            assert row is not None and row.phase == "succeeded", row and row.state["counts"]
            assert row.state["counts"]["states"] == {"succeeded": 48}


def test_a_replica_behind_reads_only_the_rows_written_since_its_copy(
    shared_store: sessionmaker[Session],
) -> None:
    """A replica whose copy of a rollout is behind reloads under the row lock the device rows
    written since its revision (each row carries the revision that wrote it), not all of them;
    the state it gets is the one a full read gives."""
    clock = Clock()
    key = ec.generate_private_key(ec.SECP256R1())

    def replica() -> RolloutService:
        return RolloutService(
            shared_store, Signer(key, timedelta(hours=2)), "http://ctl", publish=None,
            clock=clock, health=None,
        )  # fmt: skip

    a = replica()
    st = a.create({**SPEC, "waves": [50, 100], "seed": 2}, "t")
    rid = st.spec.rollout_id
    b = replica()
    b.sync()
    first = sorted(d for d, p in st.devices.items() if p.wave == 0)
    a.on_status([("iris", E.StatusReport(first[0], "2.0.0", "DOWNLOADING"))])
    a.on_status([("iris", E.StatusReport(first[0], "2.0.0", "COMMITTED"))])
    with shared_store() as s:
        from sqlalchemy import func, select

        from edgefleet.cloud_controller.models import Rollout, RolloutDevice

        rev = s.scalar(select(Rollout.revision).where(Rollout.id == rid))
        newer = s.scalar(
            select(func.count()).where(RolloutDevice.rollout_id == rid, RolloutDevice.revision > 1)
        )
    assert rev == 3 and newer == 1  # a's two steps wrote first[0]'s row only
    b.on_status([("iris", E.StatusReport(first[1], "2.0.0", "COMMITTED"))])  # b is 2 behind
    got = b.get_state(rid)
    full = replica().get_state(rid)  # a fresh replica reads every row
    assert got is not None and full is not None
    assert E.header_to_dict(got) == E.header_to_dict(full)
    assert got.devices == full.devices
    assert E.counts(got) == E.counts(full)
    assert E.counts(got)["states"] == {"succeeded": 2, "in_progress": 2}
