"""The embedded broker: amqtt child or Mosquitto with a generated config, no leftovers."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.devbroker import BrokerError, embedded_broker
from tests.support.services import require


def _client(port: int, cid: str, user: str | None = None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311)
    if user:
        c.username_pw_set(user, f"pw-{user}")
    return c


def _roundtrip(port: int) -> bytes:
    pub = _client(port, "pub")
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    pub.publish("edgefleet/v1/devices/d1/desired", b"state", qos=1, retain=True).wait_for_publish(5)
    got: list[bytes] = []
    done = threading.Event()
    sub = _client(port, "sub")
    sub.on_connect = lambda c, u, f, rc, p: c.subscribe("edgefleet/v1/devices/+/desired", qos=1)
    sub.on_message = lambda c, u, m: (got.append(m.payload), done.set())
    sub.connect("127.0.0.1", port)
    sub.loop_start()
    try:
        assert done.wait(10), "retained message never arrived"
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()
    return got[0]


@pytest.mark.parametrize("kind", ["amqtt", "mosquitto"])
def test_broker_delivers_retained_and_stops_cleanly(kind: str, tmp_path: Path) -> None:
    if kind == "mosquitto":
        import shutil

        require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    broker = embedded_broker(kind, tmp_path)  # type: ignore[arg-type]
    with broker:
        assert broker.running
        assert _roundtrip(broker.port) == b"state"
        proc = broker.process
    assert proc is not None and proc.poll() is not None, "broker process outlived stop()"
    assert not broker.running


def test_unknown_broker_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="unknown broker kind"):
        embedded_broker("hivemq", tmp_path)  # type: ignore[arg-type]


def test_amqtt_refuses_credentials(tmp_path: Path) -> None:
    broker = embedded_broker("amqtt", tmp_path, passwords={"d1": "x"})
    with pytest.raises(BrokerError, match="anonymous only"):
        broker.start()


def test_mosquitto_acl_keeps_devices_apart(tmp_path: Path) -> None:
    import shutil

    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    acl = "pattern readwrite edgefleet/v1/devices/%u/#\n"
    broker = embedded_broker(
        "mosquitto", tmp_path, passwords={"d1": "pw-d1", "d2": "pw-d2"}, acl=acl
    )
    with broker:
        got: list[str] = []
        ready = threading.Event()
        spy = _client(broker.port, "d2", "d2")
        spy.on_connect = lambda c, u, f, rc, p: c.subscribe("edgefleet/v1/devices/+/status", qos=1)
        spy.on_subscribe = lambda c, u, mid, rcs, p: ready.set()
        spy.on_message = lambda c, u, m: got.append(m.topic)
        spy.connect("127.0.0.1", broker.port)
        spy.loop_start()
        own = _client(broker.port, "d1", "d1")
        own.connect("127.0.0.1", broker.port)
        own.loop_start()
        try:
            assert ready.wait(10)
            own.publish("edgefleet/v1/devices/d1/status", b"mine", qos=1).wait_for_publish(5)
            own.publish("edgefleet/v1/devices/d2/status", b"forged", qos=1).wait_for_publish(5)
            # d2 reads its own topic: the forged message (denied by the broker) never arrives,
            # and d1's own status is not readable by d2. Wait for a marker to bound the check.
            spy.publish("edgefleet/v1/devices/d2/status", b"marker", qos=1).wait_for_publish(5)
            for _ in range(100):
                if "edgefleet/v1/devices/d2/status" in got:
                    break
                threading.Event().wait(0.05)
            assert got == ["edgefleet/v1/devices/d2/status"]
        finally:
            for c in (spy, own):
                c.disconnect()
                c.loop_stop()
