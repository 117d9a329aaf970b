"""Broker outage: the agent keeps serving, telemetry waits in the outbox, and afterwards every
record reaches the controller exactly once (real agent, Mosquitto, MQTT link, controller).

The broker is stopped for a minute (EDGEFLEET_TEST_OUTAGE_S). When it is back, the agent's
connection (through a cuttable proxy) is restored only once the controller's bridge is
subscribed again: a device that reconnects first has its QoS 1 telemetry acknowledged by a
broker with no subscriber yet, and those records are lost unless the broker keeps the controller's
session (see docs/drift.md, "Delivery"); this test checks everything else.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from edgefleet.agent.config import AgentConfig, MqttConfig, ProbationConfig
from edgefleet.agent.mqtt.link import MqttLink
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.agent.telemetry.service import TelemetryService, TelemetrySettings
from edgefleet.cloud_controller.drift.models import TelemetryRecord
from edgefleet.keys import generate_keypair, public_pem
from tests.controller.conftest import start_controller
from tests.fleet.conftest import wait_until
from tests.fleet.proxy import CuttableProxy
from tests.support.packages import make_package, model_inputs
from tests.support.services import mosquitto

OUTAGE_S = float(os.environ.get("EDGEFLEET_TEST_OUTAGE_S", "60"))


class RecordingOutbox(Outbox):
    """The real outbox, remembering every id it handed out."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.appended: list[int] = []

    def append(self, record: Any) -> int:
        rid = super().append(record)
        self.appended.append(rid)
        return rid


def _wait_controller_subscribed(port: int, run: Any) -> None:
    """Publish probe telemetry until the controller stores it: its subscription is live."""
    import json

    import paho.mqtt.client as mqtt

    from edgefleet.wire.mqtt import topic

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="outage-probe")
    client.connect("127.0.0.1", port, keepalive=10)
    client.loop_start()

    def probe_stored() -> bool:
        body = {"device_id": "probe", "records": [{"id": 1, "kind": "system", "at": "now"}]}
        client.publish(topic("probe", "telemetry"), json.dumps(body), qos=1)
        with run.controller.factory() as s:
            q = select(func.count()).where(TelemetryRecord.device_id == "probe")
            return bool(s.scalar(q))

    try:
        assert wait_until(probe_stored, 30, step=0.3), "controller did not resubscribe"
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.slow
def test_every_record_arrives_once_after_a_broker_outage(tmp_path: Path) -> None:
    keys = generate_keypair(tmp_path / "keys", "packager")
    pkg = make_package(tmp_path / "pkgs", name="iris", version="1.0.0", key=keys)
    x = model_inputs("iris")
    with mosquitto(tmp_path) as broker:
        proxy = CuttableProxy(broker.port)
        run = start_controller(tmp_path / "ctl", broker_url=broker.url)
        ctl_pub = tmp_path / "controller.pub"
        ctl_pub.write_bytes(public_pem(run.controller.signer.key.public_key()))
        cfg = AgentConfig(
            device_id="out-1",
            data_dir=tmp_path / "agent",
            trusted_keys=[keys.public_path],
            controller_keys=[ctl_pub],
            profiles=["cpu-x86_64"],
            mqtt=MqttConfig(url=proxy.url, keepalive_s=2),
            probation=ProbationConfig(seconds=0.2, min_requests=1),
        )
        agent = Agent(cfg)
        agent.start(serve_http=False, serve_admin=False)
        box = RecordingOutbox(tmp_path / "telemetry.sqlite")
        svc = TelemetryService(agent, TelemetrySettings(interval_s=0.25, system=False), outbox=box)
        link = MqttLink(agent, cfg, telemetry=box, tick_s=0.1)
        served = 0

        def serve(seconds: float) -> None:
            nonlocal served
            end = time.monotonic() + seconds
            for i in range(1_000_000):
                if time.monotonic() >= end:
                    return
                agent.sessions.infer("iris", None, {"X": x[i % 150 : i % 150 + 1]})
                served += 1
                time.sleep(0.002)

        def stored() -> tuple[int, int, int]:
            with run.controller.factory() as s:
                mine = TelemetryRecord.device_id == cfg.device_id
                rows = s.scalar(select(func.count()).where(mine)) or 0
                ids = (
                    s.scalar(
                        select(func.count(func.distinct(TelemetryRecord.record_id))).where(mine)
                    )
                    or 0
                )
                reqs = s.scalar(
                    select(func.coalesce(func.sum(TelemetryRecord.requests), 0)).where(
                        TelemetryRecord.kind == "inference", mine
                    )
                )
                return int(rows), int(ids), int(reqs or 0)

        try:
            uid = agent.submit_update(UpdateRequest(model="", version="", source=str(pkg)))
            assert agent.wait_update(uid, timeout=60)["state"] == "COMMITTED"
            # the device is known to the controller before it connects (as after registration):
            # the bridge's first batch of a brand-new device is not what this test is about
            from edgefleet.cloud_controller import devices
            from edgefleet.cloud_controller.db import transaction

            with transaction(run.controller.factory) as s:
                devices.get_or_create(s, cfg.device_id)
            link.start()
            assert link.wait_connected(15), link.last_connect_error
            svc.start()
            serve(2.0)
            assert wait_until(lambda: stored()[0] > 0, 20), "no telemetry before the outage"
            proxy.cut()
            broker.stop()
            before = len(box.appended)
            serve(OUTAGE_S)  # the agent keeps serving; windows pile up in the outbox
            assert len(box.appended) > before + 3
            assert box.stats().pending > 0
            broker.start()
            _wait_controller_subscribed(broker.port, run)
            proxy.restore()
            serve(2.0)
            svc.stop()  # the last window too
            total = len(box.appended)
            bridge = run.controller.bridge
            assert wait_until(lambda: stored()[0] >= total, 90), (
                stored(),
                total,
                box.stats(),
                link.connected.is_set(),
                bridge.stats if bridge else None,
            )
            assert wait_until(lambda: box.stats().pending == 0, 30)
            rows, distinct, reqs = stored()
            assert rows == distinct == total  # every record once
            with run.controller.factory() as s:
                got = set(
                    s.scalars(
                        select(TelemetryRecord.record_id).where(
                            TelemetryRecord.device_id == cfg.device_id
                        )
                    )
                )
            assert got == set(box.appended)
            assert reqs == served  # every request counted, none twice
            assert box.stats().dropped == 0
        finally:
            proxy.close()
            link.stop()
            svc.stop(final_tick=False)
            agent.stop()
            run.stop()
