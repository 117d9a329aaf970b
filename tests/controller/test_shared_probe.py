"""Shared subscriptions where the broker has them, plain ones where it does not: the bridge
probes on connect (amqtt takes `$share/...` as a topic name and delivers nothing)."""

from __future__ import annotations

import uuid
from pathlib import Path

from edgefleet.cloud_controller.models import Device
from edgefleet.devbroker import embedded_broker
from edgefleet.keys import KeyPair
from tests.controller.conftest import start_controller, wait_for
from tests.controller.simdevice import SimDevice
from tests.support.services import Mosquitto


def test_falls_back_to_plain_subscriptions_on_a_broker_without_shared_ones(
    tmp_path: Path, packager_key: KeyPair
) -> None:
    with embedded_broker("amqtt", tmp_path / "amqtt") as broker:
        run = start_controller(
            tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url
        )
        bridge = run.controller.bridge
        assert bridge is not None
        dev = None
        try:
            wait_for(lambda: bridge.shared_works is False, 15, "the probe to give up")
            assert not any(f.startswith("$share/") for f in bridge.subscriptions())
            key = run.controller.signer.key.public_key()
            dev = SimDevice(f"plain-{uuid.uuid4().hex[:6]}", broker.host, broker.port, key)
            dev.start()
            dev.install_locally("1.0.1")
            wait_for(lambda: dev.backlog() == (0, 0), 20, "the report acknowledged")
            with run.controller.factory() as s:
                row = s.get(Device, dev.device_id)
                assert row is not None and row.installed["iris"]["version"] == "1.0.1"
        finally:
            if dev is not None:
                dev.stop()
            run.stop()


def test_mosquitto_delivers_shared_subscriptions(
    tmp_path: Path, packager_key: KeyPair, broker: Mosquitto
) -> None:
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url
    )
    try:
        bridge = run.controller.bridge
        assert bridge is not None
        wait_for(lambda: bridge.shared_works is True, 10, "the probe back")
        assert [f for f in bridge.subscriptions() if f.startswith("$share/edgefleet/")]
    finally:
        run.stop()
