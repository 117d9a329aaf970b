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

        # The abort can come after the first failure (1 of max(1, minimum sample 2) is over
        # 40 %), while the wave's other device is still at work: a halt follows that device
        # until it reports, so wait for it rather than read the counts at the abort.
        def settled() -> dict[str, object] | None:
            r = finished(fleet_ctl, str(bad["id"]))
            states = r["counts"]["states"] if r else {}  # type: ignore[index]
            return r if r and "in_progress" not in states else None

        done = wait_for(settled, what="bad rollout, and the devices it follows")
        assert done["phase"] == "aborted", done
        counts = done["counts"]
        assert counts["states"] == {"failed": 2, "skipped": 6}, json.dumps(done)  # type: ignore[index]
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
            body = {"reason": "operator says no", "on_abort": "rollback"}
            a = op.post(f"/api/v1/rollouts/{rid}/abort", json=body)
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
        # the device's reports carry its outbox ids as seqs: replay the first one it sent
        wait_for(lambda: devs[0].backlog() == (0, 0), what="every report acknowledged")
        first = devs[0].status_box.stats().last_id - devs[0].status_seq + 1
        dup = {
            "device_id": "late-1",
            "seq": first,
            "model": "iris",
            "version": "2.0.0",
            "state": "FAILED",
        }
        c.publish(topic("late-1", "status"), json.dumps(dup), qos=1).wait_for_publish(10)
        wait_for(lambda: bridge.stats.dropped.get("status_duplicate", 0) >= 1, what="dup drop")
        # a report that arrives late (older seq, never seen) still counts; its repeat does not
        top = devs[0].status_box.stats().last_id
        late_msg = {**dup, "seq": top + 100, "state": "DOWNLOADING"}
        newer = {**dup, "seq": top + 101, "state": "PROBATION"}
        for m in (newer, late_msg, late_msg):
            c.publish(topic("late-1", "status"), json.dumps(m), qos=1).wait_for_publish(10)
        wait_for(lambda: bridge.stats.dropped.get("status_duplicate", 0) >= 2, what="repeat")
        with fleet_ctl.controller.factory() as s:
            dev = s.get(Device, "late-1")
            assert dev is not None and dev.last_status_seq == top + 101
            assert {top + 100, top + 101} <= set(dev.recent_status_seqs)
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
            max_retries=0,
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


# --- safety on a real broker, the controller on SQLite and on PostgreSQL ------------------------


@pytest.fixture
def any_fleet_ctl(
    tmp_path: Path,
    packager_key: KeyPair,
    broker: Mosquitto,
    packages: dict[str, Path],
    db_url: str,
) -> Iterator[Running]:
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url, db_url=db_url
    )
    try:
        assert run.controller.bridge is not None and run.controller.bridge.wait_connected()
        with run.client("publisher") as pub:
            for p in packages.values():
                assert upload(pub, p).status_code == 201
        yield run
    finally:
        run.stop()


def cli(run: Running, *args: str) -> tuple[int, str]:
    from typer.testing import CliRunner

    from edgefleet.cli import app

    env = {"EDGEFLEET_URL": run.url, "EDGEFLEET_TOKEN": run.tokens["operator"]}
    res = CliRunner().invoke(app, list(args), env=env)
    return res.exit_code, res.output


def dashboard(run: Running, page: str) -> str:
    with run.client("viewer") as v:
        r = v.get(f"/dashboard/{page}")
        assert r.status_code == 200
        return r.text


def test_readme_fleet_a_noisy_device_neither_aborts_a_good_release_nor_removes_anything(
    any_fleet_ctl: Running, broker: Mosquitto
) -> None:
    """Two gateways, a first install with the README's options: the second device fails its
    probation once on a busy host. The rollout succeeds, the first keeps serving, the spec's
    p95 ratio reached both devices, and a later abort removes nothing."""
    run = any_fleet_ctl
    ids = [f"rm-{run.url[-5:]}-1", f"rm-{run.url[-5:]}-2"]
    a = SimDevice(ids[0], broker.host, broker.port, run.controller.signer.key.public_key(),
                  installed=None)  # fmt: skip
    b = SimDevice(ids[1], broker.host, broker.port, run.controller.signer.key.public_key(),
                  installed=None, noisy_versions=frozenset({"2.0.0"}))  # fmt: skip
    devs = [a.start(), b.start()]
    wait_for(lambda: all(_online(run, i) for i in ids), what="presence")
    try:
        r = rollout(run, version="2.0.0", target={"device_ids": ids}, waves=[5, 25, 100],
                    abort_failure_pct=20, gates={"max_p95_ratio": 1.3}, seed=0,
                    device_timeout_s=30)  # fmt: skip
        assert r["wave_sizes"] == [1, 1]  # the third wave would be empty
        done = wait_for(lambda: finished(run, str(r["id"])), what="rollout end")
        assert done["phase"] == "succeeded", done["reason"]
        assert {d.device_id: d.version for d in devs} == {ids[0]: "2.0.0", ids[1]: None} or {
            d.device_id: d.version for d in devs
        } == {ids[0]: None, ids[1]: "2.0.0"}
        assert all(e["max_p95_ratio"] == 1.3 for d in devs for e in d.entries)
        # an operator abort of the next release keeps the healthy first install where it is
        r2 = rollout(run, version="1.0.0", target={"device_ids": ids}, waves=[50, 100],
                     approval_waves=[1], seed=0, device_timeout_s=30)  # fmt: skip
        wait_for(lambda: show(run, str(r2["id"]))["phase"] == "awaiting_approval", what="wave 1")
        code, out = cli(run, "rollout", "abort", str(r2["id"])[:8])
        assert code == 0 and "aborted" in out
        time.sleep(0.5)
        assert a.removed == b.removed == 0
        with run.controller.factory() as s:
            for i in ids:
                row = s.get(DesiredState, i)
                assert row is None or not row.remove
        events = [e["message"] for e in show(run, str(r2["id"]))["events"]]  # type: ignore[union-attr]
        assert not any("removed (it had no previous version)" in m for m in events)
    finally:
        for d in devs:
            d.stop()


def _online(run: Running, device_id: str) -> bool:
    with run.controller.factory() as s:
        d = s.get(Device, device_id)
        return d is not None and d.online


def test_a_failed_rollback_is_loud_everywhere_and_the_device_shows_out_of_sync(
    any_fleet_ctl: Running, broker: Mosquitto
) -> None:
    run = any_fleet_ctl
    ids = ["rbf-1", "rbf-2"]
    devs = start_devices(run, broker, ids[:1]) + start_devices(
        run, broker, ids[1:], unrestorable=frozenset({"1.0.0"})
    )
    try:
        r = rollout(run, version="2.0.0", target={"device_ids": ids}, waves=[100], soak_s=300,
                    on_abort="rollback", seed=0, device_timeout_s=30)  # fmt: skip
        rid = str(r["id"])
        wait_for(lambda: show(run, rid)["phase"] == "soaking", what="both on 2.0.0")
        code, out = cli(run, "rollout", "abort", rid[:7], "--reason", "p95 doubled")
        assert code == 0, out
        after = wait_for(
            lambda: (
                (x := show(run, rid))["counts"]["rollback_failed"] == 1  # type: ignore[index]
                and x["counts"]["rolled_back"] == 1  # type: ignore[index]
                and x
            ),
            what="rollback answers",
        )
        (bad,) = [d for d in after["devices"] if d["rollback"] == "failed"]  # type: ignore[union-attr]
        assert bad["device_id"] == "rbf-2" and "integrity" in bad["rollback_reason"]
        assert devs[0].version == "1.0.0" and devs[1].version == "2.0.0"
        # rollout show, rollout list, --watch's exit code
        code, out = cli(run, "rollout", "show", rid)
        assert code == 0 and "ROLLBACK FAILED on 1" in out and "rbf-2" in out, out
        code, out = cli(run, "rollout", "list", "--json")
        assert json.loads(out)[0]["counts"]["rollback_failed"] == 1
        code, out = cli(run, "rollout", "list")
        assert code == 0 and rid in out
        code, out = cli(run, "rollout", "show", rid, "--watch", "--watch-timeout", "5")
        assert code == 5, out
        # devices list: desired 1.0.0, installed 2.0.0, since when
        wait_for(lambda: run.controller.bridge.idle(), what="bridge idle")  # type: ignore[union-attr]
        code, out = cli(run, "devices", "list", "--json")
        sync = {d["device_id"]: d["sync"] for d in json.loads(out)}
        assert sync["rbf-1"]["in_sync"] is True
        assert sync["rbf-2"]["in_sync"] is False and sync["rbf-2"]["since"]
        assert sync["rbf-2"]["models"] == [
            {
                "model": "iris",
                "desired": "1.0.0",
                "installed": "2.0.0",
                "local": False,
                "rollback_failed": True,
            }
        ]
        code, out = cli(run, "devices", "list", "--out-of-sync")
        assert "rbf-2" in out and "rbf-1" not in out
        assert "iris 2.0.0≠1.0.0 (ROLLBACK FAILED) since" in out
        # the dashboard: the fleet page says out of sync, the rollouts page says it failed
        fleet_page = dashboard(run, "")
        row = fleet_page.split("rbf-2")[1].split("</tr>")[0]
        assert "out_of_sync" in row and "desired 1.0.0, installed 2.0.0 (rollback failed)" in row
        assert "rollback_failed" in dashboard(run, "rollouts")
        # `agent install --force` by hand on the managed rbf-1: out of sync, flagged local
        devs[0].install_locally("9.9.9")
        wait_for(lambda: "(local install)" in cli(run, "devices", "list")[1], what="local install")
        assert "iris: desired 1.0.0, installed 9.9.9 (local install)" in dashboard(run, "")
    finally:
        for d in devs:
            d.stop()


def test_a_flaky_link_is_retried_and_never_counts_toward_the_abort(
    any_fleet_ctl: Running, broker: Mosquitto
) -> None:
    run = any_fleet_ctl
    devs = start_devices(run, broker, ["fl-1"], flaky=2) + start_devices(run, broker, ["fl-2"])
    try:
        r = rollout(run, version="2.0.0", target={"device_ids": ["fl-1", "fl-2"]}, waves=[100],
                    abort_failure_pct=0, abort_min_finished=1, retry_backoff_s=0.2,
                    seed=0, device_timeout_s=30)  # fmt: skip
        done = wait_for(lambda: finished(run, str(r["id"])), what="rollout end")
        assert done["phase"] == "succeeded", done["reason"]
        by_id = {d["device_id"]: d for d in done["devices"]}  # type: ignore[union-attr]
        assert by_id["fl-1"]["attempts"] == 3 and by_id["fl-1"]["state"] == "succeeded"
        assert all(d.version == "2.0.0" for d in devs)
    finally:
        for d in devs:
            d.stop()


def test_a_success_on_record_but_never_applied_counts_when_the_device_sends_it_again(
    fleet_ctl: Running, broker: Mosquitto
) -> None:
    """A replica that dies after storing a report and before the rollouts used it (nor acked
    it): the device sends it again, and the repeat, a duplicate by seq, still moves the
    rollout when it is the device's newest report and a success."""
    from datetime import UTC, datetime

    devs = start_devices(fleet_ctl, broker, ["lost-1"], hold=True)
    try:
        r = rollout(
            fleet_ctl,
            version="2.0.0",
            target={"device_ids": ["lost-1"]},
            waves=[100],
            device_timeout_s=300,
        )
        wait_for(lambda: devs[0].held, what="dispatched")
        bridge = fleet_ctl.controller.bridge
        assert bridge is not None
        report = {
            "device_id": "lost-1",
            "seq": 10**12,
            "model": "iris",
            "version": "2.0.0",
            "state": "COMMITTED",
            "rollout_id": str(r["id"]),
        }
        raw = json.dumps(report).encode()
        decoded = bridge._decode("lost-1", "status", raw)
        assert decoded is not None
        bridge._apply([decoded], datetime.now(UTC), set())  # stored; the rollouts never saw it
        time.sleep(1.0)
        assert show(fleet_ctl, str(r["id"]))["phase"] == "running"
        before = bridge.stats.dropped.get("status_duplicate", 0)
        bridge._process([("lost-1", "status", raw)])  # the device's resend
        assert bridge.stats.dropped.get("status_duplicate", 0) == before + 1
        done = wait_for(lambda: finished(fleet_ctl, str(r["id"])), what="rollout end")
        assert done["counts"]["states"] == {"succeeded": 1}  # type: ignore[index]
    finally:
        for d in devs:
            d.stop()
