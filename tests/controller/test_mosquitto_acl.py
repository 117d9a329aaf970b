"""Generated Mosquitto password + ACL files, enforced by a real Mosquitto process."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.cloud_controller import auth
from edgefleet.cloud_controller import db as dbm
from edgefleet.harness import terminate
from edgefleet.wire.mqtt import topic
from tests.support.services import free_port, require, wait_port

CTL_PW = "controller-secret-pw"


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[tuple[int, dict[str, str], Callable[[], None]]]:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    url = f"sqlite:///{tmp_path / 'c.db'}"
    engine = dbm.make_engine(url)
    dbm.upgrade(engine)
    with dbm.transaction(dbm.session_factory(engine)) as s:
        creds = {d: auth.register_device(s, d).mqtt_password for d in ("gw-1", "gw-2")}
    engine.dispose()
    port = free_port()
    out = tmp_path / "mq"
    res = CliRunner().invoke(
        app,
        [
            "controller", "mosquitto-config", "--out", str(out), "--db", url,
            "--data-dir", str(tmp_path / "ctl"), "--auth", "password",
            "--controller-password", CTL_PW, "--port", str(free_port()),
            "--bind", "127.0.0.1", "--plaintext-port", str(port),
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    passwd = (out / "passwd").read_text()
    assert "gw-1:$7$" in passwd and creds["gw-1"] not in passwd and CTL_PW not in passwd
    conf = (out / "mosquitto.conf").read_text()  # plaintext: loopback only
    assert f"listener {port} 127.0.0.1" in conf
    if os.geteuid() == 0:  # as root Mosquitto drops to user `mosquitto`, who cannot enter tmp_path
        conf = conf.replace("\nuser mosquitto\n", "\nuser root\n")
    (out / "mosquitto.conf").write_text(conf)
    log = open(out / "log", "wb")  # noqa: SIM115
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        procs.append(
            subprocess.Popen(
                ["mosquitto", "-c", str(out / "mosquitto.conf")], stdout=log, stderr=log
            )
        )
        wait_port(port)

    def restart() -> None:
        terminate(procs[-1])  # an orderly stop (SIGTERM): Mosquitto saves its persistence file
        start()

    try:
        start()
        yield port, creds, restart
    finally:
        terminate(procs[-1])
        log.close()


class Conn:
    def __init__(self, port: int, user: str, pw: str, clean: bool = True) -> None:
        self.msgs: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connected: queue.Queue[Any] = queue.Queue()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-t", clean_session=clean
        )
        self.c.username_pw_set(user, pw)
        self.c.on_connect = lambda *a: self.connected.put(a[3])
        self.c.on_message = lambda _c, _u, m: self.msgs.put((m.topic, bytes(m.payload)))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.rc = self.connected.get(timeout=10)

    def sub(self, t: str) -> None:
        self.c.subscribe(t, qos=1)

    def pub(self, t: str, payload: dict[str, Any], retain: bool = False) -> None:
        self.c.publish(t, json.dumps(payload), qos=1, retain=retain).wait_for_publish(10)

    def drain(self, seconds: float = 1.0) -> list[str]:
        out = []
        try:
            while True:
                out.append(self.msgs.get(timeout=seconds)[0])
        except queue.Empty:
            return out

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_acl_confines_each_device_to_its_own_topics(
    secured: tuple[int, dict[str, str], Callable[[], None]],
) -> None:
    port, creds, _ = secured
    ctl = Conn(port, auth.CONTROLLER_MQTT_USER, CTL_PW)
    gw1 = Conn(port, "gw-1", creds["gw-1"])
    gw2 = Conn(port, "gw-2", creds["gw-2"])
    wrong = Conn(port, "gw-1", creds["gw-2"])
    try:
        assert not ctl.rc.is_failure and not gw1.rc.is_failure and not gw2.rc.is_failure
        assert wrong.rc.is_failure  # gw-2's password does not open gw-1
        ctl.sub("edgefleet/v1/devices/+/status")
        ctl.sub("edgefleet/v1/devices/+/presence")
        ctl.sub("edgefleet/v1/devices/+/telemetry")
        gw1.sub("edgefleet/v1/devices/+/desired")  # wildcard: must still see only its own
        gw1.sub(topic("gw-2", "desired"))
        gw1.sub(topic("gw-2", "status"))
        gw2.sub(topic("gw-2", "desired"))
        ctl.drain(0.3), gw1.drain(0.3), gw2.drain(0.3)
        # the controller writes both devices' desired states
        ctl.pub(topic("gw-1", "desired"), {"for": "gw-1"}, retain=True)
        ctl.pub(topic("gw-2", "desired"), {"for": "gw-2"}, retain=True)
        assert gw1.drain() == [topic("gw-1", "desired")]
        assert gw2.drain() == [topic("gw-2", "desired")]
        # gw-1 may write its own status/telemetry/presence, not gw-2's, nor any desired state
        gw1.pub(topic("gw-1", "status"), {"seq": 1})
        gw1.pub(topic("gw-1", "telemetry"), {"records": []})
        gw1.pub(topic("gw-1", "presence"), {"online": True})
        gw1.pub(topic("gw-2", "status"), {"forged": True})
        gw1.pub(topic("gw-2", "presence"), {"forged": True})
        gw1.pub(topic("gw-2", "desired"), {"forged": True}, retain=True)
        gw1.pub(topic("gw-1", "desired"), {"forged": True}, retain=True)
        got = sorted(ctl.drain())
        assert got == sorted(
            [topic("gw-1", "status"), topic("gw-1", "telemetry"), topic("gw-1", "presence")]
        )
        assert gw2.drain() == []  # no forged desired state reached gw-2
        assert gw1.drain(0.5) == []  # and gw-1 did not overwrite its own either
        # the retained desired states are still the controller's
        late = Conn(port, "gw-2", creds["gw-2"])
        late.sub(topic("gw-2", "desired"))
        payload = late.msgs.get(timeout=5)[1]
        assert json.loads(payload) == {"for": "gw-2"}
        late.close()
    finally:
        for c in (ctl, gw1, gw2, wrong):
            c.close()


def test_reports_sent_while_the_controller_is_away_survive_a_broker_restart(
    secured: tuple[int, dict[str, str], Callable[[], None]],
) -> None:
    """The generated config persists the controller's session: a device's QoS 1 report that
    the broker acknowledged while the controller was disconnected is still delivered to it
    after the broker itself restarted."""
    port, creds, restart = secured
    ctl = Conn(port, auth.CONTROLLER_MQTT_USER, CTL_PW, clean=False)
    ctl.sub("edgefleet/v1/devices/+/status")
    ctl.drain(0.3)
    ctl.close()  # the controller goes away; its session stays on the broker
    gw1 = Conn(port, "gw-1", creds["gw-1"])
    gw1.pub(topic("gw-1", "status"), {"seq": 7, "state": "COMMITTED"})  # PUBACKed by the broker
    gw1.close()
    restart()
    ctl = Conn(port, auth.CONTROLLER_MQTT_USER, CTL_PW, clean=False)
    try:
        t, payload = ctl.msgs.get(timeout=10)
        assert t == topic("gw-1", "status") and json.loads(payload)["seq"] == 7
    finally:
        ctl.close()


INJECTIONS = [
    "rt-inj\nedgefleet-controller",
    "rt-inj\r\nedgefleet-controller",
    "edgefleet-controller",
    "gw:1",
    "gw 1",
    "gw\x00",
    "gw/1",
    "gw+",
    "#",
    "gw-\u0660",  # a Unicode digit
    "\u0261w-1",  # a look-alike letter
    "-gw",
    "g" * 129,
]


def test_device_id_injection_cannot_take_the_controllers_broker_identity(
    tmp_path: Path, packager_key: Any
) -> None:
    """The attack: register "rt-inj\\nedgefleet-controller", generate the Mosquitto files, log
    in as the controller with that device's password. Refused at the API with the grammar; a
    row that got into the database anyway stops the generator; and the generated files let no
    device password open the controller's user (real controller over HTTP, real Mosquitto)."""
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    from tests.controller.conftest import start_controller

    db_url = f"sqlite:///{tmp_path / 'c.db'}"
    run = start_controller(tmp_path / "ctl", trusted=[packager_key.public_path], db_url=db_url)
    try:
        with run.client("operator") as op:
            for bad in INJECTIONS:
                r = op.post("/api/v1/devices", json={"device_id": bad})
                assert r.status_code == 422, (bad, r.text)
                detail = r.json()["detail"]
                assert detail["code"] == "invalid_device_id", bad
                assert "grammar" in detail["message"] or "reserved" in detail["message"]
            r = op.post("/api/v1/devices", json={"device_id": "gw-1", "groups": ["a\nuser x"]})
            assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_group"
            r = op.patch("/api/v1/devices/gw-1", json={"tags": ["x y"]})
            assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_tag"
            gw1 = op.post("/api/v1/devices", json={"device_id": "gw-1"}).json()
        with run.client() as admin:
            audit = admin.get("/api/v1/audit").json()
            assert any(a["outcome"] == 422 and a["action"] == "POST /api/v1/devices" for a in audit)
    finally:
        run.stop()

    out = tmp_path / "mq"
    port = free_port()

    def generate() -> Any:
        return CliRunner().invoke(
            app,
            [
                "controller", "mosquitto-config", "--out", str(out), "--db", db_url,
                "--data-dir", str(tmp_path / "ctl"), "--auth", "password",
                "--controller-password", CTL_PW, "--port", str(free_port()),
                "--bind", "127.0.0.1", "--plaintext-port", str(port),
            ],
        )  # fmt: skip

    # A row that bypassed the API (an older release, a hand edit) is refused at generation.
    engine = dbm.make_engine(db_url)
    with engine.begin() as c:
        from sqlalchemy import text

        c.execute(
            text(
                "INSERT INTO devices (id, registered, mqtt_password_hash, groups, tags, online, "
                "execution_providers, profiles, hardware, installed, recent_status_seqs) "
                "SELECT :evil, 1, mqtt_password_hash, '[]', '[]', 0, '[]', '[]', '{}', '{}', '[]' "
                "FROM devices WHERE id = 'gw-1'"
            ),
            {"evil": "rt-inj\nedgefleet-controller"},
        )
    res = generate()
    assert res.exit_code == 2 and "grammar" in res.output, res.output
    assert not (out / "passwd").exists()
    with engine.begin() as c:
        c.execute(text("DELETE FROM devices WHERE id LIKE 'rt-inj%'"))
    engine.dispose()

    res = generate()
    assert res.exit_code == 0, res.output
    passwd = (out / "passwd").read_text().splitlines()
    users = [line.split(":", 1)[0] for line in passwd]
    assert users == [auth.CONTROLLER_MQTT_USER, "gw-1"]
    conf = (out / "mosquitto.conf").read_text()  # plaintext: loopback only
    assert f"listener {port} 127.0.0.1" in conf
    if os.geteuid() == 0:  # as root Mosquitto drops to user `mosquitto`, who cannot enter tmp_path
        conf = conf.replace("\nuser mosquitto\n", "\nuser root\n")
    (out / "mosquitto.conf").write_text(conf)
    log = open(out / "log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(out / "mosquitto.conf")], stdout=log, stderr=log
    )
    conns: list[Conn] = []
    try:
        wait_port(port)
        takeover = Conn(port, auth.CONTROLLER_MQTT_USER, gw1["mqtt_password"])
        conns.append(takeover)
        assert takeover.rc.is_failure  # the device's password does not open the controller
        real = Conn(port, auth.CONTROLLER_MQTT_USER, CTL_PW)
        conns.append(real)
        assert not real.rc.is_failure  # and the controller is not locked out
        dev = Conn(port, "gw-1", gw1["mqtt_password"])
        conns.append(dev)
        assert not dev.rc.is_failure
    finally:
        for c in conns:
            c.close()
        terminate(proc)
        log.close()


def test_ack_topic_is_read_by_its_device_and_written_by_the_controller_only(
    secured: tuple[int, dict[str, str], Callable[[], None]],
) -> None:
    port, creds, _ = secured
    ctl = Conn(port, auth.CONTROLLER_MQTT_USER, CTL_PW)
    gw1 = Conn(port, "gw-1", creds["gw-1"])
    gw2 = Conn(port, "gw-2", creds["gw-2"])
    try:
        # the controller's shared subscription passes the ACL like the plain one
        ctl.sub("$share/edgefleet/edgefleet/v1/devices/+/status")
        gw1.sub(topic("gw-1", "ack"))
        gw1.sub(topic("gw-2", "ack"))  # another device's acks: refused
        gw2.sub(topic("gw-2", "ack"))
        ctl.drain(0.3), gw1.drain(0.3), gw2.drain(0.3)
        ctl.pub(topic("gw-1", "ack"), {"v": 1, "status": [1]})
        ctl.pub(topic("gw-2", "ack"), {"v": 1, "status": [1]})
        assert gw1.drain() == [topic("gw-1", "ack")]
        assert gw2.drain() == [topic("gw-2", "ack")]
        # a device cannot forge an ack, not even its own (it would release its outbox)
        gw1.pub(topic("gw-2", "ack"), {"v": 1, "status": [2]})
        gw1.pub(topic("gw-1", "ack"), {"v": 1, "status": [2]})
        assert gw2.drain() == [] and gw1.drain(0.5) == []
        gw1.pub(topic("gw-1", "status"), {"seq": 1})
        assert ctl.drain() == [topic("gw-1", "status")]
    finally:
        for c in (ctl, gw1, gw2):
            c.close()
