"""End to end: real Mosquitto (per-device passwords and ACL from the controller's generator),
the controller process, five agent processes, packages from the packager pipeline.

The tests share one fleet and run in file order; each reads the versions it starts from.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.demo.fleet import Fleet
from edgefleet.demo.rollouts import rollout_body
from edgefleet.demo.spec import MODEL_NAME
from edgefleet.keys import KeyPair, key_id, load_public_key
from edgefleet.wire.mqtt import topic
from tests.support.packages import make_package


def serving(fleet: Fleet, device_id: str) -> str | None:
    """The version the agent serves over the Open Inference Protocol."""
    url = f"http://127.0.0.1:{fleet.agent_ports[device_id]}/v2/models/{MODEL_NAME}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(json.loads(r.read())["versions"][0])
    except OSError:
        return None


def all_serving(fleet: Fleet) -> dict[str, str | None]:
    return {d: serving(fleet, d) for d in fleet.spec.device_ids()}


def metric(fleet: Fleet, name: str, label: str) -> float:
    """A sample of the controller's Prometheus ``/metrics`` (0 when absent)."""
    assert fleet.api is not None
    with urllib.request.urlopen(fleet.api.base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def dropped(fleet: Fleet, reason: str) -> float:
    """The controller's count of MQTT messages dropped for ``reason``."""
    return metric(fleet, "edgefleet_mqtt_dropped", f'reason="{reason}"')


def states(detail: dict[str, Any]) -> dict[str, str]:
    return {d["device_id"]: d["state"] for d in detail["devices"]}


def create(fleet: Fleet, version: str, **kw: Any) -> str:
    return fleet.create_rollout(rollout_body(version, fleet.spec.device_ids(), **kw))


def test_three_wave_rollout_succeeds(fleet: Fleet) -> None:
    rid = create(fleet, "1.0.0", waves=[20.0, 60.0, 100.0])
    seen_waves: set[int] = set()
    detail = fleet.wait_rollout(rid, timeout=120, on_change=lambda d: seen_waves.add(d["wave"]))
    assert detail["phase"] == "succeeded", detail
    assert detail["wave_sizes"] == [1, 2, 2]
    assert seen_waves >= {1, 2}
    assert set(states(detail).values()) == {"succeeded"}
    assert all(d["attempts"] == 1 for d in detail["devices"])
    assert set(fleet.installed().values()) == {"1.0.0"}
    assert set(all_serving(fleet).values()) == {"1.0.0"}


def test_devices_cannot_read_or_write_each_others_topics(fleet: Fleet) -> None:
    a, b = fleet.spec.device_ids()[:2]
    creds = fleet.credentials[a]
    got: list[str] = []
    subscribed = threading.Event()
    granted: list[Any] = []
    # Same username as the device (the ACL keys on it), another client id so that the real
    # agent stays connected.
    probe = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{a}-probe")
    probe.username_pw_set(creds["mqtt_username"], creds["mqtt_password"])

    def on_connect(c: mqtt.Client, u: Any, f: Any, rc: Any, p: Any) -> None:
        c.subscribe([(topic(b, "desired"), 1), ("edgefleet/v1/devices/+/desired", 1)])

    def on_subscribe(c: mqtt.Client, u: Any, mid: int, rcs: Any, p: Any) -> None:
        granted.extend(rcs)
        subscribed.set()

    probe.on_connect = on_connect
    probe.on_subscribe = on_subscribe
    probe.on_message = lambda c, u, m: got.append(m.topic)
    probe.connect(fleet.broker.host, fleet.broker.port)
    probe.loop_start()
    try:
        assert subscribed.wait(10)
        # Its own retained desired state arrives through the wildcard; the other's never does.
        deadline = time.monotonic() + 10
        while topic(a, "desired") not in got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert topic(a, "desired") in got
        assert topic(b, "desired") not in got
        before = fleet.devices()[b]["last_status"]
        forged = {
            "device_id": b,
            "seq": 2**62,
            "model": MODEL_NAME,
            "version": "9.9.9",
            "state": "COMMITTED",
        }
        probe.publish(topic(b, "status"), json.dumps(forged), qos=1).wait_for_publish(5)
        # Positive control: its own status topic is writable. seq 0 is below anything the
        # device sent, so the controller counts it as a duplicate instead of recording it.
        dup_before = dropped(fleet, "status_duplicate")
        mine = {"device_id": a, "seq": 0, "model": "probe", "version": "0.0.1", "state": "IDLE"}
        probe.publish(topic(a, "status"), json.dumps(mine), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 15
        while dropped(fleet, "status_duplicate") == dup_before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert dropped(fleet, "status_duplicate") == dup_before + 1, "own topic not writable"
        assert fleet.devices()[b]["last_status"] == before, "wrote another device's status"
    finally:
        probe.disconnect()
        probe.loop_stop()

    # A wrong password is refused outright.
    refused = threading.Event()
    intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{b}-intruder")
    intruder.username_pw_set(b, "not-the-password")
    intruder.on_connect = lambda c, u, f, rc, p: refused.set() if rc.is_failure else None
    intruder.connect(fleet.broker.host, fleet.broker.port)
    intruder.loop_start()
    try:
        assert refused.wait(10)
    finally:
        intruder.disconnect()
        intruder.loop_stop()


def test_bad_release_aborts_at_threshold_and_moved_devices_stay_on_previous(
    fleet: Fleet,
) -> None:
    before = fleet.installed()
    assert set(before.values()) == {"1.0.0"}
    # 30 % of a minimum sample of 4: the second failure aborts, not the first
    rid = create(fleet, "1.1.0", waves=[40.0, 100.0], abort_failure_pct=30.0, abort_min_finished=4)
    detail = fleet.wait_rollout(rid, timeout=120)
    assert detail["phase"] == "aborted", detail
    by_state = detail["counts"]["states"]
    assert by_state == {"failed": 2, "skipped": 3}, by_state
    failed = [d for d in detail["devices"] if d["state"] == "failed"]
    assert {d["agent_state"] for d in failed} == {"FAILED"}
    assert {d["reason_code"] for d in failed} == {"latency_gate"}
    assert detail["counts"]["rollback_requested"] == detail["counts"]["rolled_back"] == 2
    assert "30" in str(detail["reason"])
    assert fleet.installed() == before
    assert set(all_serving(fleet).values()) == {"1.0.0"}


def test_controller_restart_mid_rollout_resumes_with_exact_counts(fleet: Fleet) -> None:
    rid = create(fleet, "1.2.0", waves=[20.0, 60.0, 100.0], approval_waves=[1])
    waiting = fleet.wait_rollout(rid, timeout=90, until=lambda d: d["phase"] == "awaiting_approval")
    assert waiting["counts"]["states"] == {"succeeded": 1, "pending": 4}
    fleet.stop_controller(kill=True)
    fleet.start_controller()
    resumed = fleet.rollout(rid)
    assert resumed["phase"] == "awaiting_approval"
    assert resumed["counts"] == waiting["counts"]
    assert states(resumed) == states(waiting)
    assert fleet.api is not None
    fleet.api.call("POST", f"/api/v1/rollouts/{rid}/approve", {})
    done = fleet.wait_rollout(rid, timeout=120)
    assert done["phase"] == "succeeded", done
    assert done["counts"]["states"] == {"succeeded": 5}
    assert done["wave_sizes"] == waiting["wave_sizes"]
    assert {d["device_id"]: d["wave"] for d in done["devices"]} == {
        d["device_id"]: d["wave"] for d in waiting["devices"]
    }
    assert set(all_serving(fleet).values()) == {"1.2.0"}


def test_offline_devices_time_out_abort_rolls_back_and_they_catch_up(fleet: Fleet) -> None:
    ids = fleet.spec.device_ids()
    offline = ids[-2:]
    for dev in offline:
        fleet.stop_agent(dev)
    try:
        rid = create(
            fleet,
            "1.3.0",
            waves=[100.0],
            device_timeout_s=12.0,
            max_retries=0,
            abort_failure_pct=30.0,
            abort_min_finished=5,
        )
        detail = fleet.wait_rollout(rid, timeout=90, until=lambda d: d["phase"] == "aborted")
        st = states(detail)
        assert {st[d] for d in offline} == {"timed_out"}
        assert {st[d] for d in ids[:-2]} == {"succeeded"}
        # Devices that committed 1.3.0 are set back to 1.2.0 and really roll back.
        online = ids[:-2]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(serving(fleet, d) == "1.2.0" for d in online):
                break
            time.sleep(0.3)
        assert {d: serving(fleet, d) for d in online} == dict.fromkeys(online, "1.2.0")
    finally:
        for dev in offline:
            fleet.start_agent(dev)
    # The offline devices catch up from their retained desired state (1.2.0, which they run),
    # and the rollback is confirmed for every moved device.
    settled = fleet.wait_rollout(rid, timeout=90)
    assert settled["counts"]["rollback_requested"] == settled["counts"]["rolled_back"] == 5
    fleet.wait_online()
    assert set(all_serving(fleet).values()) == {"1.2.0"}


def test_device_offline_during_rollout_catches_up_from_retained_state(fleet: Fleet) -> None:
    ids = fleet.spec.device_ids()
    late = ids[0]
    fleet.stop_agent(late)
    try:
        rid = create(fleet, "1.4.0", waves=[100.0], device_timeout_s=90.0)
        fleet.wait_rollout(
            rid,
            timeout=90,
            until=lambda d: d["counts"]["states"].get("succeeded", 0) == len(ids) - 1,
        )
        assert states(fleet.rollout(rid))[late] == "in_progress"
    finally:
        fleet.start_agent(late)
    done = fleet.wait_rollout(rid, timeout=90)
    assert done["phase"] == "succeeded", done
    assert done["counts"]["states"] == {"succeeded": len(ids)}
    fleet.wait_online()
    assert set(all_serving(fleet).values()) == {"1.4.0"}


def test_agent_killed_mid_update_resumes_and_the_rollout_completes(fleet: Fleet) -> None:
    ids = fleet.spec.device_ids()
    victim = ids[2]
    fleet.stop_agent(victim)
    # The agent's test hook holds the update in VALIDATING until the marker file goes.
    fleet.start_agent(victim, env={"EDGEFLEET_AGENT_PAUSE_AT": "VALIDATING"})
    fleet.wait_online([victim])
    rid = create(fleet, "1.5.0", waves=[100.0], device_timeout_s=120.0, max_retries=0)
    marker = fleet.agent_dir(victim) / "data" / "paused-VALIDATING"
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), "the update never reached VALIDATING"
    fleet.stop_agent(victim, kill=True)  # power cut in the middle of the update
    marker.unlink()
    fleet.start_agent(victim)
    done = fleet.wait_rollout(rid, timeout=120)
    assert done["phase"] == "succeeded", done
    assert done["counts"]["states"] == {"succeeded": len(ids)}
    assert {d["device_id"]: d["attempts"] for d in done["devices"]} == dict.fromkeys(ids, 1)
    fleet.wait_online()
    assert set(all_serving(fleet).values()) == {"1.5.0"}


def test_controller_killed_mid_wave_still_finishes_the_rollout(fleet: Fleet) -> None:
    """Reports sent while the controller is down wait in its persistent broker session; were
    one lost, the device timeout and a retry (a new desired seq, answered with where the device
    stands) would still finish the rollout."""
    ids = fleet.spec.device_ids()
    victim = ids[1]
    fleet.stop_agent(victim)
    fleet.start_agent(victim, env={"EDGEFLEET_AGENT_PAUSE_AT": "VALIDATING"})
    fleet.wait_online([victim])
    try:
        rid = create(
            fleet,
            "1.6.0",
            waves=[100.0],
            device_timeout_s=30.0,
            max_retries=2,
            retry_backoff_s=1.0,
        )
        marker = fleet.agent_dir(victim) / "data" / "paused-VALIDATING"
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the update never reached VALIDATING"
        fleet.stop_controller(kill=True)
        marker.unlink()  # the device finishes while the controller is away
        deadline = time.monotonic() + 60
        while serving(fleet, victim) != "1.6.0" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert serving(fleet, victim) == "1.6.0"
        fleet.start_controller()
        done = fleet.wait_rollout(rid, timeout=120)
        assert done["phase"] == "succeeded", done
        assert done["counts"]["states"] == {"succeeded": len(ids)}
    finally:
        fleet.stop_agent(victim)
        fleet.start_agent(victim)
    fleet.wait_online()
    assert set(all_serving(fleet).values()) == {"1.6.0"}


def test_agents_telemetry_reaches_the_controller(fleet: Fleet) -> None:
    """The link drains each agent's telemetry outbox to the controller (interval 5 s)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(fleet, "edgefleet_mqtt_messages", 'kind="telemetry"') > 0:
            break
        time.sleep(0.5)
    assert metric(fleet, "edgefleet_mqtt_messages", 'kind="telemetry"') > 0
    assert dropped(fleet, "telemetry_not_json") == 0


def test_a_rollback_that_cannot_land_is_final_and_loud(fleet: Fleet) -> None:
    """An operator rolls a device back to a version whose files are gone (pruned on the device,
    deleted from the registry's disk): the rollback fails for good, the device keeps serving
    what it ran, and the rollout, the device list and the dashboard all say so."""
    assert fleet.api is not None
    model = "backtrack"
    pub = fleet.keys["packager_pub"]
    key = KeyPair(key_id(load_public_key(pub)), fleet.keys["packager_key"], pub)
    for v in ("1.0.0", "1.1.0"):
        fleet.upload(make_package(fleet.root / f"bt-{v}", name=model, version=v, key=key))
    dev = fleet.spec.device_ids()[0]

    def release(version: str, **kw: Any) -> str:
        body = rollout_body(version, [dev], waves=[100.0], **kw)
        return fleet.create_rollout({**body, "model": model})

    first = fleet.wait_rollout(release("1.0.0"), timeout=90)
    assert first["phase"] == "succeeded", first
    rid = release("1.1.0", soak_s=600)
    fleet.wait_rollout(rid, timeout=90, until=lambda d: d["phase"] == "soaking")
    # the way back is gone: the device's copy of 1.0.0 and the registry's file of it
    shutil.rmtree(fleet.agent_dir(dev) / "data" / "models" / model / "1.0.0", ignore_errors=True)
    aside = fleet.root / "bt-aside"
    aside.mkdir(exist_ok=True)
    digests = {
        p["sha256"]
        for p in fleet.api.call("GET", f"/api/v1/packages?name={model}")
        if p["version"] == "1.0.0"
    }
    moved = [
        p
        for p in (fleet.controller_dir / "packages").rglob("*")
        if p.is_file() and any(d in p.name for d in digests)
    ]
    assert digests and moved, digests
    for p in moved:
        shutil.move(p, aside / p.name)
    try:
        fleet.api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "operator"})
        detail = fleet.wait_rollout(rid, timeout=120)  # every rollback answered
        c = detail["counts"]
        assert (c["rollback_requested"], c["rolled_back"], c["rollback_failed"]) == (1, 0, 1), c
        (row,) = [d for d in detail["devices"] if d["device_id"] == dev]
        assert row["rollback"] == "failed" and row["rollback_reason"], row
        # it still serves what it ran before the rollback
        url = f"http://127.0.0.1:{fleet.agent_ports[dev]}/v2/models/{model}"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert json.loads(r.read())["versions"] == ["1.1.0"]
        shown = fleet.api.call("GET", f"/api/v1/devices/{dev}")
        sync = shown["sync"]
        assert sync["in_sync"] is False and sync["since"], sync
        assert {(m["model"], m["desired"], m["installed"]) for m in sync["models"]} == {
            (model, "1.0.0", "1.1.0")
        }
        listed = {r["id"]: r for r in fleet.api.call("GET", "/api/v1/rollouts")}
        assert listed[rid]["counts"]["rollback_failed"] == 1
        page = urllib.request.Request(
            fleet.api.base + "/dashboard/", headers={"Authorization": f"Bearer {fleet.api.token}"}
        )
        try:
            with urllib.request.urlopen(page, timeout=10) as r:
                html = r.read().decode()
        except urllib.error.HTTPError as e:  # pragma: no cover - the assertion says why
            raise AssertionError(f"dashboard: {e.code}") from e
        assert f"{model}: desired 1.0.0, installed 1.1.0" in html
    finally:
        for p in moved:
            shutil.move(aside / p.name, p)
