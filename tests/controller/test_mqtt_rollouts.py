"""Rollouts over a real Mosquitto broker with simulated devices on the real MQTT wire."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.cloud_controller.models import DesiredState, Device
from edgefleet.keys import KeyPair
from edgefleet.wire.mqtt import topic
from tests.controller.conftest import Running, start_controller, wait_for
from tests.controller.simdevice import SimDevice
from tests.controller.test_api import upload
from tests.support.services import Mosquitto


@pytest.fixture
def fleet_ctl(
    tmp_path: Path, packager_key: KeyPair, broker: Mosquitto, packages: dict[str, Path]
) -> Iterator[Running]:
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url
    )
    try:
        assert run.controller.bridge is not None and run.controller.bridge.wait_connected()
        with run.client("publisher") as pub:
            for p in packages.values():
                assert upload(pub, p).status_code == 201
        yield run
    finally:
        run.stop()


def start_devices(run: Running, broker: Mosquitto, ids: list[str], **kw: object) -> list[SimDevice]:
    key = run.controller.signer.key.public_key()
    devs = [SimDevice(d, broker.host, broker.port, key, **kw).start() for d in ids]  # type: ignore[arg-type]

    def known() -> bool:
        with run.controller.factory() as s:
            return all((d := s.get(Device, i)) is not None and d.online for i in ids)

    wait_for(known, what="presence of every device")
    return devs


def rollout(run: Running, **spec: object) -> dict[str, object]:
    with run.client("operator") as op:
        r = op.post("/api/v1/rollouts", json={"model": "iris", **spec})
        assert r.status_code == 201, r.text
        return dict(r.json())


def show(run: Running, rid: str) -> dict[str, object]:
    with run.client("viewer") as v:
        return dict(v.get(f"/api/v1/rollouts/{rid}").json())


def finished(run: Running, rid: str) -> dict[str, object] | None:
    r = show(run, rid)
    return r if r["phase"] in ("succeeded", "aborted", "cancelled") else None


def test_three_wave_rollout_then_bad_release_aborts_and_rolls_back(
    fleet_ctl: Running, broker: Mosquitto, packager_key: KeyPair
) -> None:
    ids = [f"m3-{i:02d}" for i in range(8)]
    devs = start_devices(fleet_ctl, broker, ids, fail_versions=frozenset({"3.0.0"}))
    try:
        good = rollout(
            fleet_ctl,
            version="2.0.0",
            target={"device_ids": ids},
            waves=[15, 50, 100],
            device_timeout_s=30,
            seed=3,
        )
        assert good["wave_sizes"] == [2, 2, 4]
        done = wait_for(lambda: finished(fleet_ctl, str(good["id"])), what="first rollout")
        assert done["phase"] == "succeeded", done
        assert done["counts"]["states"] == {"succeeded": 8}  # type: ignore[index]
        assert all(d.version == "2.0.0" for d in devs)
        events = [e["message"] for e in done["events"]]  # type: ignore[union-attr]
        assert [m.split(" (")[0] for m in events if m.startswith("wave ") and "started" in m] == [
            "wave 1/3",
            "wave 2/3",
            "wave 3/3",
        ]
        # a bad release: every device fails to validate 3.0.0
        with fleet_ctl.client("publisher") as pub:
            from tests.support.packages import make_package

            pkg = make_package(
                fleet_ctl.controller.settings.data_dir / "bad",
                name="iris",
                version="3.0.0",
                key=packager_key,
            )
            assert upload(pub, pkg).status_code == 201
        bad = rollout(
            fleet_ctl,
            version="3.0.0",
            target={"device_ids": ids},
            waves=[25, 50, 100],
            device_timeout_s=30,
            abort_failure_pct=40,
            abort_min_finished=2,
            seed=5,
        )
        done = wait_for(lambda: finished(fleet_ctl, str(bad["id"])), what="bad rollout")
        assert done["phase"] == "aborted"
        counts = done["counts"]
        assert counts["states"] == {"failed": 2, "skipped": 6}  # type: ignore[index]
        # every moved device has 2.0.0 desired again and runs it
        with fleet_ctl.controller.factory() as s:
            for i in ids:
                row = s.get(DesiredState, i)
                assert row is not None and row.models["iris"]["version"] == "2.0.0"
        assert all(d.version == "2.0.0" for d in devs)
        assert not any(d.rejected for d in devs)
    finally:
        for d in devs:
            d.stop()


def test_succeeded_device_is_rolled_back_on_abort_and_confirmed(
    fleet_ctl: Running, broker: Mosquitto
) -> None:
    ids = [f"rb-{i}" for i in range(4)]
    devs = start_devices(fleet_ctl, broker, ids)
    try:
        r = rollout(
            fleet_ctl,
            version="2.0.0",
            target={"device_ids": ids},
            waves=[50, 100],
            approval_waves=[1],
            device_timeout_s=30,
        )
        rid = str(r["id"])
        wait_for(lambda: show(fleet_ctl, rid)["phase"] == "awaiting_approval", what="wave 1")
        with fleet_ctl.client("operator") as op:
            a = op.post(f"/api/v1/rollouts/{rid}/abort", json={"reason": "operator says no"})
            assert a.json()["counts"]["rollback_requested"] == 2
        done = wait_for(
            lambda: (x := show(fleet_ctl, rid))["counts"]["rolled_back"] == 2 and x,  # type: ignore[index]
            what="rollback confirmations",
        )
        assert done["phase"] == "aborted" and "operator says no" in str(done["reason"])
        assert sorted(d.version or "" for d in devs) == ["1.0.0"] * 4
        assert fleet_ctl.controller.rollouts.active_ids() == []
    finally:
        for d in devs:
            d.stop()


def test_status_duplicates_dropped_and_retained_desired_for_late_device(
    fleet_ctl: Running, broker: Mosquitto
) -> None:
    ids = ["late-1", "late-2"]
    devs = start_devices(fleet_ctl, broker, ids[:1])
    # late-2 registered via presence only, then goes offline before the rollout
    late = start_devices(fleet_ctl, broker, ids[1:])[0]
    late.stop()
    try:
        r = rollout(
            fleet_ctl, version="2.0.0", target={"device_ids": ids}, waves=[100], device_timeout_s=60
        )
        wait_for(lambda: devs[0].version == "2.0.0", what="online device updated")
        # a replayed status (same seq) is dropped, not counted twice
        bridge = fleet_ctl.controller.bridge
        assert bridge is not None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="replayer")
        c.connect(broker.host, broker.port)
        c.loop_start()
        dup = {
            "device_id": "late-1",
            "seq": 1,
            "model": "iris",
            "version": "2.0.0",
            "state": "FAILED",
        }
        c.publish(topic("late-1", "status"), json.dumps(dup), qos=1).wait_for_publish(10)
        wait_for(lambda: bridge.stats.dropped.get("status_duplicate", 0) >= 1, what="dup drop")
        # a report that arrives late (older seq, never seen) still counts; its repeat does not
        late_msg = {**dup, "seq": 100, "state": "DOWNLOADING"}
        newer = {**dup, "seq": 101, "state": "PROBATION"}
        for m in (newer, late_msg, late_msg):
            c.publish(topic("late-1", "status"), json.dumps(m), qos=1).wait_for_publish(10)
        wait_for(lambda: bridge.stats.dropped.get("status_duplicate", 0) >= 2, what="repeat")
        with fleet_ctl.controller.factory() as s:
            dev = s.get(Device, "late-1")
            assert dev is not None and dev.last_status_seq == 101
            assert {100, 101} <= set(dev.recent_status_seqs)
            assert dev.last_status is not None and dev.last_status["state"] == "PROBATION"
        c.loop_stop()
        c.disconnect()
        # the offline device comes back and catches up from the retained desired state
        back = SimDevice(
            "late-2", broker.host, broker.port, fleet_ctl.controller.signer.key.public_key()
        ).start()
        devs.append(back)
        done = wait_for(lambda: finished(fleet_ctl, str(r["id"])), what="rollout end")
        assert done["counts"]["states"] == {"succeeded": 2}  # type: ignore[index]
        assert back.version == "2.0.0"
    finally:
        for d in devs:
            d.stop()


def test_offline_device_times_out_and_counts_as_failure(
    fleet_ctl: Running, broker: Mosquitto
) -> None:
    ids = ["to-1", "to-2", "to-3"]
    devs = start_devices(fleet_ctl, broker, ids)
    devs[2].stop()
    time.sleep(0.2)
    try:
        r = rollout(
            fleet_ctl,
            version="2.0.0",
            target={"device_ids": ids},
            waves=[100],
            device_timeout_s=8,  # roomy: the two online devices must not time out under load
            abort_failure_pct=50,
            abort_min_finished=3,
            success_threshold_pct=60,
        )
        done = wait_for(lambda: finished(fleet_ctl, str(r["id"])), what="rollout end")
        assert done["phase"] == "succeeded"  # 2/3 >= 60 %, 1/3 failures <= 50 %
        devs_by_id = {d["device_id"]: d for d in done["devices"]}  # type: ignore[union-attr]
        assert devs_by_id["to-3"]["state"] == "timed_out"
        assert devs_by_id["to-3"]["reason_code"] == "timeout"
    finally:
        for d in devs[:2]:
            d.stop()


def test_telemetry_reaches_the_drift_ingest_once(fleet_ctl: Running, broker: Mosquitto) -> None:
    from sqlalchemy import func, select

    from edgefleet.cloud_controller.drift.models import TelemetryRecord

    bridge = fleet_ctl.controller.bridge
    assert bridge is not None
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tel-pub")
    c.connect(broker.host, broker.port)
    c.loop_start()
    rec = {"kind": "agent", "at": "2026-01-01T00:00:00Z", "model": "iris", "version": "2.0.0",
           "requests": 10, "errors": 1}  # fmt: skip
    msgs = [
        {"device_id": "tel-1", "records": [{**rec, "id": 1}, {**rec, "id": 2}]},
        {"device_id": "tel-1", "records": [{**rec, "id": 2}, {**rec, "id": 3}]},  # 2 repeated
        {"device_id": "tel-1", "records": "not a list"},
        {"device_id": "tel-2", "records": [{**rec, "id": 9}]},  # another device's, on tel-1's topic
    ]
    for m in msgs:
        c.publish(topic("tel-1", "telemetry"), json.dumps(m), qos=1).wait_for_publish(10)
    c.loop_stop()
    c.disconnect()

    def stored() -> int:
        with fleet_ctl.controller.factory() as s:
            q = select(func.count()).select_from(TelemetryRecord)
            return int(s.scalar(q.where(TelemetryRecord.device_id == "tel-1")) or 0)

    wait_for(lambda: bridge.stats.received["telemetry"] >= 4 and bridge.idle(), what="telemetry")
    assert stored() == 3
    assert bridge.stats.dropped.get("telemetry_refused") == 1
    assert bridge.stats.dropped.get("telemetry_device_mismatch") == 1
    with fleet_ctl.controller.factory() as s:
        dev = s.get(Device, "tel-1")
        assert dev is not None and dev.last_seen is not None
        assert s.get(Device, "tel-2") is None


def test_cli_watch_shows_live_progress_until_the_end(fleet_ctl: Running, broker: Mosquitto) -> None:
    from typer.testing import CliRunner

    from edgefleet.cli import app

    ids = ["cw-1", "cw-2", "cw-3"]
    devs = start_devices(fleet_ctl, broker, ids)
    try:
        env = {"EDGEFLEET_URL": fleet_ctl.url, "EDGEFLEET_TOKEN": fleet_ctl.tokens["operator"],
               "COLUMNS": "160"}  # fmt: skip
        args = ["rollout", "create", "iris", "2.0.0", "--waves", "34,100", "--watch",
                "--watch-timeout", "60"] + [a for i in ids for a in ("--device", i)]  # fmt: skip
        res = CliRunner().invoke(app, args, env=env)
        assert res.exit_code == 0, res.output
        assert "succeeded" in res.output and "2 (100 %)" in res.output
        assert all(d.version == "2.0.0" for d in devs)
    finally:
        for d in devs:
            d.stop()


def test_broker_restart_loses_retained_states_and_the_controller_restores_them(
    tmp_path: Path, packager_key: KeyPair, packages: dict[str, Path]
) -> None:
    from tests.support.services import mosquitto

    with mosquitto(tmp_path / "mq") as own:  # persistence off: a restart forgets everything
        run = start_controller(
            tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=own.url
        )
        devs: list[SimDevice] = []
        try:
            bridge = run.controller.bridge
            assert bridge is not None and bridge.wait_connected()
            with run.client() as admin:
                for p in packages.values():
                    assert upload(admin, p).status_code == 201
            first = start_devices(run, own, ["br-1"])
            devs += first
            # br-2 is known (presence) but offline when the rollout starts
            devs += start_devices(run, own, ["br-2"])
            devs[1].stop()
            r = rollout(run, version="2.0.0", target={"device_ids": ["br-1", "br-2"]},
                        waves=[100], device_timeout_s=120)  # fmt: skip
            wait_for(lambda: devs[0].version == "2.0.0", what="online device updated")
            own.stop()
            wait_for(lambda: not bridge.stats.connected, what="bridge sees the outage")
            own.start()
            wait_for(bridge.wait_connected, timeout=30, what="bridge reconnects")
            back = SimDevice("br-2", own.host, own.port, run.controller.signer.key.public_key())
            devs.append(back.start())
            done = wait_for(lambda: finished(run, str(r["id"])), timeout=30, what="rollout end")
            assert done["counts"]["states"] == {"succeeded": 2}  # type: ignore[index]
            assert back.version == "2.0.0" and not back.rejected
        finally:
            for d in devs:
                d.stop()
            run.stop()
