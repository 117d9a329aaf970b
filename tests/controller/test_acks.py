"""Nothing lost whatever the broker keeps: the controller's application-level ack.

The broker here keeps nothing for the controller (Mosquitto ``persistence false``, and the
controller's bridge connects with a clean session), so every report published while the
controller is down is dropped by the broker. Devices whose outbox waits for the controller's ack
send them again once it is back, and each lands exactly once; a device that releases on PUBACK
(``acks="off"``, the behaviour for controllers that never ack) loses them, which shows that
the broker really dropped them.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from edgefleet.cloud_controller.drift.models import TelemetryRecord
from edgefleet.cloud_controller.models import Device
from edgefleet.keys import KeyPair
from tests.controller.conftest import start_controller, wait_for
from tests.controller.simdevice import SimDevice
from tests.support.services import Mosquitto


def test_reports_sent_while_the_controller_is_down_arrive_exactly_once(
    tmp_path: Path, broker: Mosquitto, packager_key: KeyPair
) -> None:
    common = {
        "trusted": [packager_key.public_path],
        "broker_url": broker.url,
        "client_id": f"ctl-ack-{uuid.uuid4().hex[:6]}",
    }
    a = start_controller(tmp_path / "ctl", **common)  # type: ignore[arg-type]
    assert a.controller.bridge is not None and a.controller.bridge.shared  # clean session
    key = a.controller.signer.key.public_key()
    tag = uuid.uuid4().hex[:6]
    acked = [
        SimDevice(f"ack-{tag}-{i}", broker.host, broker.port, key, resend_after_s=1.0).start()
        for i in range(3)
    ]
    old = SimDevice(f"ack-{tag}-puback", broker.host, broker.port, key, acks="off").start()
    sims = [*acked, old]
    b = None
    try:

        def known() -> bool:
            with a.controller.factory() as s:
                return all((d := s.get(Device, x.device_id)) and d.online for x in sims)

        wait_for(known, what="presence")
        for d in sims:
            d.telemetry(5)
        wait_for(lambda: all(d.backlog() == (0, 0) for d in sims), what="first reports acked")
        a.stop()
        for d in sims:  # while the controller is away: the broker drops all of these
            d.telemetry(7)
            d.install_locally("1.0.1")
        wait_for(lambda: old.backlog() == (0, 0), what="PUBACK releases the old way")
        time.sleep(2.5)  # past resend_after_s: handed out again, still no controller
        assert all(d.backlog() == (1, 7) for d in acked), [d.backlog() for d in acked]
        assert all(d.delivery.resent >= 8 for d in acked)
        b = start_controller(tmp_path / "ctl", **common)  # type: ignore[arg-type]
        wait_for(lambda: all(d.backlog() == (0, 0) for d in acked), what="resent after restart")
        time.sleep(1.5)  # a duplicate still on its way would land now
        with b.controller.factory() as s:
            counts = dict(
                s.execute(
                    select(TelemetryRecord.device_id, func.count()).group_by(
                        TelemetryRecord.device_id
                    )
                ).all()
            )
            for d in acked:
                assert counts[d.device_id] == 12  # 5 + 7, each once
                dev = s.get(Device, d.device_id)
                assert dev is not None and dev.last_status_seq == d.status_box.stats().last_id
                assert dev.installed["iris"]["version"] == "1.0.1"
            assert counts[old.device_id] == 5  # the 7 sent while away were lost
            dev = s.get(Device, old.device_id)
            assert dev is not None and dev.last_status_seq != old.status_box.stats().last_id
    finally:
        for d in sims:
            d.stop()
        if b is not None:
            b.stop()


def test_status_reports_of_a_failed_rollout_step_stay_unacknowledged(
    tmp_path: Path, broker: Mosquitto, packager_key: KeyPair
) -> None:
    """The bridge commits a batch, then hands its status reports to the rollouts. When that
    step fails (here: its first call raises, as when the database goes away mid-step), the
    reports are stored but no rollout has seen them: they are not acknowledged, so the device
    sends them again and the repeated report reaches the rollouts. The batch's telemetry is
    acknowledged as usual: it is all in the database."""
    a = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url
    )
    bridge = a.controller.bridge
    assert bridge is not None
    key = a.controller.signer.key.public_key()
    d = SimDevice(
        f"step-{uuid.uuid4().hex[:6]}", broker.host, broker.port, key, resend_after_s=1.0
    ).start()
    rollouts = a.controller.rollouts
    real = rollouts.on_status
    seen: list[str] = []

    def failing_once(reports: Any) -> None:
        reports = list(reports)
        seen.extend(f"{r.device_id}:{r.state}" for _, r in reports)
        if len(seen) == len(reports):  # the first batch with reports
            raise RuntimeError("database connection lost (injected)")
        real(reports)

    rollouts.on_status = failing_once  # type: ignore[method-assign]
    try:

        def known() -> bool:
            with a.controller.factory() as s:
                return s.get(Device, d.device_id) is not None

        wait_for(known, what="presence")
        d.telemetry(2)
        d.install_locally("1.0.1")
        wait_for(lambda: bridge.stats.rollout_step_failures == 1, what="the failed step")
        wait_for(lambda: d.backlog() == (0, 0), what="the status report resent and acked")
        assert seen == [f"{d.device_id}:COMMITTED"] * 2, seen  # failed, then applied
        assert d.delivery.resent >= 1
    finally:
        d.stop()
        a.stop()
