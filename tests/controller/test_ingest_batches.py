"""The bridge's batch ingest, edge by edge (real Mosquitto, SQLite and PostgreSQL).

A batch is applied with a few statements whatever its size (device rows ensured and locked at
once, telemetry inserted in bulk, `last_seen` of telemetry-only devices in one UPDATE), so what
one message did alone now happens beside others of the same batch: the same report twice in
one batch, a device first seen through telemetry, a message the database refuses among good
ones. Each must come out as if the messages had come one by one, and every stored report is
acknowledged to its device after the commit.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select, text

from edgefleet.cloud_controller.drift.models import TelemetryRecord
from edgefleet.cloud_controller.models import DesiredState, Device, DeviceSeqFloor
from edgefleet.keys import KeyPair
from edgefleet.wire.mqtt import TOPIC_PREFIX, parse_ack, verify_desired
from tests.controller.conftest import Running, start_controller, wait_for
from tests.controller.test_rollout_service import SPEC, Clock, seeded_store, service
from tests.support.services import Mosquitto


class AckListener:
    """Every ack the controller publishes, per device: (status ids, telemetry ids)."""

    def __init__(self, broker: Mosquitto) -> None:
        self.got: dict[str, tuple[set[int], set[int]]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"acks-{uuid.uuid4().hex[:6]}"
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._ready.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(f"{TOPIC_PREFIX}/devices/+/ack", qos=1)
        assert self._ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        device = msg.topic.split("/")[-2]
        ack = parse_ack(bytes(msg.payload))
        with self._lock:
            st, tl = self.got.setdefault(device, (set(), set()))
            st.update(ack.status)
            tl.update(ack.telemetry)

    def of(self, device: str) -> tuple[set[int], set[int]]:
        with self._lock:
            st, tl = self.got.get(device, (set(), set()))
            return set(st), set(tl)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def acks(broker: Mosquitto) -> Iterator[AckListener]:
    listener = AckListener(broker)
    try:
        yield listener
    finally:
        listener.close()


def status(seq: int) -> bytes:
    return json.dumps({"seq": seq, "kind": "desired_rejected", "reason": "test"}).encode()


def telemetry(*ids: int) -> bytes:
    at = datetime.now(UTC).isoformat()
    records = [{"id": i, "kind": "system", "at": at, "cpu_percent": 1.5} for i in ids]
    return json.dumps({"records": records}).encode()


def stored(run: Running, device: str) -> list[int]:
    with run.controller.factory() as s:
        q = select(TelemetryRecord.record_id).where(TelemetryRecord.device_id == device)
        return sorted(s.scalars(q))


def started(tmp_path: Path, packager_key: KeyPair, db_url: str, broker: Mosquitto) -> Running:
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], db_url=db_url, broker_url=broker.url
    )
    assert run.controller.bridge is not None and run.controller.bridge.wait_connected()
    return run


def test_the_same_report_twice_in_one_batch_is_stored_once_and_acked(
    tmp_path: Path, packager_key: KeyPair, db_url: str, broker: Mosquitto, acks: AckListener
) -> None:
    run = started(tmp_path, packager_key, db_url, broker)
    tag = uuid.uuid4().hex[:6]
    dup, new = f"dup-{tag}", f"new-{tag}"
    try:
        bridge = run.controller.bridge
        assert bridge is not None
        before = dict(bridge.stats.dropped)
        bridge._process(
            [
                (dup, "status", status(1)),
                (dup, "telemetry", telemetry(1, 2, 3)),
                (dup, "status", status(1)),  # the device sent it again before the ack came
                (dup, "telemetry", telemetry(1, 2, 3)),
                (dup, "status", status(2)),
                (dup, "telemetry", telemetry(3, 4)),
                (new, "telemetry", telemetry(1)),  # a device first heard of by its telemetry
            ]
        )
        with run.controller.factory() as s:
            d = s.get(Device, dup)
            assert d is not None and (d.last_status_seq, d.recent_status_seqs) == (2, [1, 2])
            n = s.get(Device, new)
            assert n is not None and not n.registered and n.last_seen is not None
        assert stored(run, dup) == [1, 2, 3, 4]
        assert stored(run, new) == [1]
        dropped = {k: v - before.get(k, 0) for k, v in bridge.stats.dropped.items()}
        assert {k: v for k, v in dropped.items() if v} == {"status_duplicate": 1}
        wait_for(lambda: acks.of(dup) == ({1, 2}, {1, 2, 3, 4}), what="the acks of dup")
        wait_for(lambda: acks.of(new) == (set(), {1}), what="the ack of new")
    finally:
        run.stop()


def install_telemetry_poison(run: Running, device: str) -> None:
    """A real database refusal the bridge cannot foresee: a trigger on one device's records."""
    engine = run.controller.engine
    with engine.begin() as c:
        if engine.dialect.name == "sqlite":
            c.execute(
                text(
                    "CREATE TRIGGER poison_telemetry BEFORE INSERT ON telemetry_records "
                    f"WHEN NEW.device_id = '{device}' "
                    "BEGIN SELECT RAISE(ABORT, 'poisoned record'); END"
                )
            )
        else:
            c.execute(
                text(
                    "CREATE FUNCTION poison_telemetry() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.device_id = '{device}' THEN RAISE EXCEPTION 'poisoned record'; "
                    "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            c.execute(
                text(
                    "CREATE TRIGGER poison_telemetry BEFORE INSERT ON telemetry_records "
                    "FOR EACH ROW EXECUTE FUNCTION poison_telemetry()"
                )
            )


def test_a_record_the_database_refuses_costs_only_its_own_message(
    tmp_path: Path, packager_key: KeyPair, db_url: str, broker: Mosquitto, acks: AckListener
) -> None:
    run = started(tmp_path, packager_key, db_url, broker)
    tag = uuid.uuid4().hex[:6]
    good, bad = [f"good-{tag}-{i}" for i in range(3)], f"bad-{tag}"
    try:
        install_telemetry_poison(run, bad)
        bridge = run.controller.bridge
        assert bridge is not None
        before = dict(bridge.stats.dropped)
        batch: list[tuple[str, str, bytes]] = []
        for i, d in enumerate(good):
            batch += [(d, "telemetry", telemetry(10 * i + 1, 10 * i + 2)), (d, "status", status(5))]
            if i == 1:
                batch.append((bad, "telemetry", telemetry(7)))
        bridge._process(batch)
        for i, d in enumerate(good):
            assert stored(run, d) == [10 * i + 1, 10 * i + 2]
        assert stored(run, bad) == []
        with run.controller.factory() as s:
            assert all(s.get(Device, d).last_status_seq == 5 for d in good)
        dropped = {k: v - before.get(k, 0) for k, v in bridge.stats.dropped.items()}
        assert {k: v for k, v in dropped.items() if v} == {"telemetry_refused": 1}
        for i, d in enumerate(good):
            want = ({5}, {10 * i + 1, 10 * i + 2})
            wait_for(lambda d=d, w=want: acks.of(d) == w, what=f"the acks of {d}")
        # The refusal is for good (the same bytes would be refused again): acknowledged too, so
        # the device does not send it for ever.
        wait_for(lambda: acks.of(bad) == (set(), {7}), what="the ack of the refused message")
    finally:
        run.stop()


def test_a_wave_issued_in_one_go_continues_above_each_devices_floor(tmp_path: Path) -> None:
    """The rollouts issue a wave's desired states with the rows and floors loaded for the whole
    wave: a device that reports holding seq 7 (a restored database) gets 8, the others 1."""
    store = seeded_store(f"sqlite:///{tmp_path / 's.db'}")
    with store.begin() as s:
        s.add(DeviceSeqFloor(device_id="d2", floor=7, reported_at=datetime.now(UTC)))
    svc, sent = service(store, Clock())
    svc.create({**SPEC, "waves": [100]}, "t")
    with store() as s:
        seqs = {r.device_id: r.seq for r in s.scalars(select(DesiredState))}
    assert seqs == {"d0": 1, "d1": 1, "d2": 8, "d3": 1}
    key = svc._signer.key.public_key()
    published = {
        t.split("/")[-2]: verify_desired(p, [key], device_id=t.split("/")[-2], last_seq=None)["seq"]
        for t, p in sent
    }
    assert published == seqs


def update_status(seq: int, state: str, version: str, desired_seq: int) -> bytes:
    at = datetime.now(UTC).isoformat()
    body = {
        "id": seq, "seq": seq, "at": at, "kind": "update", "model": "iris", "version": version,
        "rollout_id": None, "state": state, "reason_code": None, "reason": None,
        "desired_seq": desired_seq,
    }  # fmt: skip
    return json.dumps(body).encode()


def test_status_rows_come_out_the_same_with_or_without_a_presence_in_the_batch(
    tmp_path: Path, packager_key: KeyPair, db_url: str, broker: Mosquitto, acks: AckListener
) -> None:
    """A device with a presence in the batch is applied through its ORM object, one with status
    reports alone through `devices.StatusRows` (one read, one write for the batch): the same
    reports must leave the same row, the same seq floor and the same sync mark on both."""
    run = started(tmp_path, packager_key, db_url, broker)
    tag = uuid.uuid4().hex[:6]
    orm, core = f"orm-{tag}", f"core-{tag}"
    presence = json.dumps(
        {"online": True, "agent_version": "0.1.0", "installed": {"iris": {"version": "1.0.0"}}}
    ).encode()
    reports = [
        update_status(1, "DOWNLOADING", "1.1.0", 3),
        update_status(3, "COMMITTED", "1.1.0", 4),
        update_status(2, "INSTALLING", "1.1.0", 3),  # late: on record, not the last status
        update_status(3, "COMMITTED", "1.1.0", 4),  # a repeat
    ]
    try:
        bridge = run.controller.bridge
        assert bridge is not None
        with run.controller.factory() as s, s.begin():  # both are to run iris 1.1.0
            for d in (orm, core):
                now = datetime.now(UTC)
                models = {"iris": {"version": "1.1.0"}}
                s.add(DesiredState(device_id=d, seq=4, models=models, remove=None, issued_at=now,
                                   expires_at=now + timedelta(days=7), envelope=b"", published=True))  # fmt: skip
        bridge._process([(orm, "presence", presence), (core, "presence", presence)])
        with run.controller.factory() as s:
            assert all(s.get(Device, d).out_of_sync_since is not None for d in (orm, core))
        batch = [(orm, "presence", presence)]
        for r in reports:
            batch += [(orm, "status", r), (core, "status", r)]
        batch += [(core, "telemetry", telemetry(1))]
        bridge._process(batch)
        with run.controller.factory() as s:
            rows = {d: s.get(Device, d) for d in (orm, core)}
            floors = {d: s.get(DeviceSeqFloor, d) for d in (orm, core)}
            for d in (orm, core):
                dev, floor = rows[d], floors[d]
                assert dev is not None and floor is not None
                assert (dev.last_status_seq, dev.recent_status_seqs) == (3, [1, 2, 3]), d
                assert dev.installed == {
                    "iris": {"version": "1.1.0", "previous": "1.0.0", "state": "COMMITTED"}
                }, d
                assert dev.last_status is not None and dev.last_status["state"] == "COMMITTED"
                assert dev.last_seen is not None and floor.floor == 4
                assert dev.out_of_sync_since is None, d  # in sync again: read after the write
        wait_for(lambda: acks.of(core)[0] == {1, 2, 3}, what="the status acks of core")
    finally:
        run.stop()
