"""A controller whose desired-state sequence went backwards (a database restored from a backup)
learns from its devices where to continue, shows them, and continues above them (real
controller, real Mosquitto, SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import queue
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text
from typer.testing import CliRunner

from edgefleet.cloud_controller import desired
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.models import DesiredState
from edgefleet.keys import KeyPair
from edgefleet.wire.errors import ReplayError
from edgefleet.wire.mqtt import topic, verify_desired
from tests.controller.conftest import Running, start_controller, wait_for
from tests.support.services import Mosquitto

DEV = "gw-s"  # the retained topic is per test run: see _fresh_device


def entry(version: str) -> dict[str, object]:
    return {
        "version": version,
        "url": f"http://127.0.0.1:9/{version}",
        "sha256": "0" * 64,
        "size": 1,
        "profile": "cpu-x86_64",
        "rollout_id": None,
        "allow_downgrade": False,
    }


def issue(run: Running, version: str) -> int:
    ctl = run.controller
    with transaction(ctl.factory) as s:
        row = desired.set_model(s, ctl.signer, DEV, "iris", entry(version))
        seq = row.seq
    return seq


def restore(run: Running, seq: int) -> None:
    """What restoring an older backup does to this device's row."""
    with run.controller.engine.begin() as c:
        c.execute(
            text("UPDATE desired_states SET seq = :s WHERE device_id = :d"), {"s": seq, "d": DEV}
        )


def seq_of(run: Running) -> int:
    with run.controller.factory() as s:
        row = s.get(DesiredState, DEV)
        assert row is not None
        return row.seq


class Device:
    """The device's side of MQTT: reads its retained desired state, publishes reports."""

    def __init__(self, broker: Mosquitto) -> None:
        self.msgs: queue.Queue[bytes] = queue.Queue()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{DEV}-dev")
        self.c.on_message = lambda _c, _u, m: self.msgs.put(bytes(m.payload))
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        self.c.subscribe(topic(DEV, "desired"), qos=1)

    def send(self, kind: str, payload: dict[str, object]) -> None:
        self.c.publish(topic(DEV, kind), json.dumps(payload), qos=1).wait_for_publish(10)  # type: ignore[arg-type]

    def latest_seq_above(self, key: object, last_seq: int) -> int:
        """The first desired state the device would accept (seq above `last_seq`)."""
        while True:
            raw = self.msgs.get(timeout=15)
            try:
                return int(verify_desired(raw, [key], device_id=DEV, last_seq=last_seq)["seq"])  # type: ignore[list-item]
            except ReplayError:
                continue

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_a_restored_database_continues_above_what_devices_hold(
    tmp_path: Path, packager_key: KeyPair, db_url: str, broker: Mosquitto
) -> None:
    global DEV
    DEV = f"gw-s-{uuid.uuid4().hex[:8]}"  # the session broker keeps other runs' retained states
    data = tmp_path / "ctl"
    run = start_controller(
        data, trusted=[packager_key.public_path], db_url=db_url, broker_url=broker.url
    )
    dev = Device(broker)
    try:
        bridge = run.controller.bridge
        assert bridge is not None and bridge.wait_connected()
        with run.client() as admin:
            admin.post("/api/v1/devices", json={"device_id": DEV})
            key = load_pem_public_key(admin.get("/api/v1/keys/controller").json()["pem"].encode())
        for v in ("1.0.0", "1.1.0", "1.2.0"):
            held = issue(run, v)
        assert held == 3  # the device accepted seq 3
        restore(run, 1)
        # the restored controller's next state is seq 2: the device would drop it as a replay
        assert issue(run, "1.3.0") == 2
        # the device says what it holds (presence after reconnect) ...
        dev.send("presence", {"online": True, "desired_seq": held})
        wait_for(lambda: seq_of(run) == 4, what="desired state issued above the device's seq")
        assert bridge.stats.stale_sequence == 1
        # ... and receives the current intent (1.3.0) with a seq it accepts
        assert dev.latest_seq_above(key, held) == 4
        with run.client("viewer") as v:
            shown = v.get(f"/api/v1/devices/{DEV}").json()
        assert shown["reported_desired_seq"] == 3 and shown["stale_sequence"] is False
        assert (
            shown["desired"]["seq"] == 4
            and shown["desired"]["models"]["iris"]["version"] == "1.3.0"
        )

        # A refused replay reports the seq the device holds: the same recovery.
        restore(run, 1)
        dev.send(
            "status",
            {"seq": 1, "kind": "desired_rejected", "reason_code": "replayed", "desired_seq": 4},
        )
        wait_for(lambda: seq_of(run) == 5, what="resync after a replayed report")
        # Every later state continues above the floor too, whatever the restored row says.
        restore(run, 1)
        assert issue(run, "1.4.0") == 5
    finally:
        dev.close()
        run.stop()

    # Offline: the operator's path, with the controller stopped.
    restore(run, 1)
    res = CliRunner().invoke(
        __import__("edgefleet.cli", fromlist=["app"]).app,
        ["controller", "resync", "--db", db_url, "--data-dir", str(data), "--json"],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["stale"][DEV] == {"device_seq": 4, "controller_seq": 1}
    assert out["reissued"] == {DEV: 5}
    res = CliRunner().invoke(
        __import__("edgefleet.cli", fromlist=["app"]).app,
        [
            "controller",
            "resync",
            "--db",
            db_url,
            "--data-dir",
            str(data),
            "--floor",
            "100",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["reissued"] == {DEV: 101}


def test_a_restore_is_noticed_at_startup_even_before_any_device_reports(
    tmp_path: Path, packager_key: KeyPair, db_url: str
) -> None:
    """The controller keeps its highest issued seq outside the database (`<data dir>/
    desired_seq_high`): restarted on a restored database, it continues every device above it."""
    global DEV
    DEV = f"gw-r-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "ctl"
    run = start_controller(data, trusted=[packager_key.public_path], db_url=db_url)
    try:
        for v in ("1.0.0", "1.1.0", "1.2.0"):
            issue(run, v)
    finally:
        run.stop()
    assert (data / "desired_seq_high").read_text().strip() == "3"
    restore(run, 1)
    run = start_controller(data, trusted=[packager_key.public_path], db_url=db_url)
    try:
        assert seq_of(run) == 4  # issued again above what the device may hold
        assert issue(run, "1.3.0") == 5
        with run.controller.factory() as s:
            row = s.get(DesiredState, DEV)
            assert row is not None and row.models["iris"]["version"] == "1.3.0"
    finally:
        run.stop()


def test_two_reports_of_a_new_device_in_one_batch_record_one_floor(tmp_path: Path) -> None:
    """The bridge applies a batch under no_autoflush: a floor added for a device earlier in
    the batch must be found again, not inserted twice (an IntegrityError lost the batch)."""
    from datetime import UTC, datetime

    from sqlalchemy.orm import sessionmaker

    from edgefleet.cloud_controller import db as dbm
    from edgefleet.cloud_controller.devices import note_device_seq
    from edgefleet.cloud_controller.models import DeviceSeqFloor

    engine = dbm.make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    dbm.upgrade(engine)
    factory = sessionmaker(engine)
    now = datetime.now(UTC)
    with transaction(factory) as s, s.no_autoflush:
        note_device_seq(s, "gw-new", 1, now)
        note_device_seq(s, "gw-new", 3, now)
        note_device_seq(s, "gw-new", 2, now)
    with factory() as s:
        (row,) = s.query(DeviceSeqFloor).all()
        assert (row.device_id, row.floor) == ("gw-new", 3)
    engine.dispose()
