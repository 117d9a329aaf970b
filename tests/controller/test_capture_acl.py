"""The generated Mosquitto ACL on the capture topic, enforced by a real Mosquitto: a device
writes its own ``.../capture``, never another's, and reads no one's captured rows."""

from __future__ import annotations

from collections.abc import Callable

from edgefleet.cloud_controller import auth
from edgefleet.wire.mqtt import topic
from tests.controller.test_mosquitto_acl import CTL_PW, Conn, secured

__all__ = ["secured"]  # the fixture, shared with the ACL tests


def test_a_device_writes_only_its_own_capture_topic(
    secured: tuple[int, dict[str, str], Callable[[], None]],
) -> None:
    port, creds, _ = secured
    ctl = Conn(port, auth.CONTROLLER_MQTT_USER, CTL_PW)
    gw1 = Conn(port, "gw-1", creds["gw-1"])
    gw2 = Conn(port, "gw-2", creds["gw-2"])
    try:
        ctl.sub("edgefleet/v1/devices/+/capture")
        gw2.sub("edgefleet/v1/devices/+/capture")  # a device reading others' field data
        ctl.drain(0.3), gw2.drain(0.3)
        gw1.pub(topic("gw-1", "capture"), {"records": []})
        gw1.pub(topic("gw-2", "capture"), {"records": [], "forged": True})
        assert ctl.drain() == [topic("gw-1", "capture")]
        assert gw2.drain(0.5) == []
    finally:
        for c in (ctl, gw1, gw2):
            c.close()
