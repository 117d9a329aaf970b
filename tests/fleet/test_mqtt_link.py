"""MqttLink with a real agent, a real Mosquitto broker, real packages over HTTP and
hand-signed desired states."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import AgentConfig, MqttConfig, ProbationConfig, ValidationConfig
from edgefleet.agent.mqtt.link import MqttLink
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.wire.mqtt import topic
from tests.fleet.conftest import Keys, Observer, Pkg, desired_state, model_entry, signed, wait_until
from tests.fleet.proxy import CuttableProxy

FULL_PATH = [
    "DOWNLOADING",
    "VERIFYING",
    "INSTALLING",
    "VALIDATING",
    "ACTIVATING",
    "PROBATION",
    "COMMITTED",
]


def agent_config(data_dir: Path, device_id: str, url: str, keys: Keys) -> AgentConfig:
    return AgentConfig(
        device_id=device_id,
        data_dir=data_dir,
        trusted_keys=[keys.packager.public_path],
        controller_keys=[keys.controller.public_path],
        profiles=["cpu-x86_64"],
        mqtt=MqttConfig(url=url, keepalive_s=5),
        probation=ProbationConfig(seconds=0.2),
        validation=ValidationConfig(bench_runs=10, bench_warmup=2),
    )


class Device:
    """A real agent (no HTTP servers) with its MQTT link."""

    def __init__(self, tmp: Path, url: str, keys: Keys) -> None:
        self.id = f"dev-{uuid.uuid4().hex[:8]}"
        self.config = agent_config(tmp / self.id, self.id, url, keys)
        self.agent = Agent(self.config)
        self.agent.start(serve_http=False, serve_admin=False)
        self.link = MqttLink(self.agent, self.config)

    def start_link(self) -> MqttLink:
        self.link.start()
        assert self.link.wait_connected(15), f"link not connected: {self.link.last_connect_error}"
        return self.link

    def new_link(self) -> MqttLink:
        self.link.stop()
        self.link = MqttLink(self.agent, self.config)
        return self.link

    def close(self) -> None:
        self.link.stop()
        self.agent.stop()


@pytest.fixture
def device(tmp_path: Path, broker: Any, fleet_keys: Keys) -> Iterator[Device]:
    d = Device(tmp_path, broker.url, fleet_keys)
    yield d
    d.close()


def states(obs: Observer, dev: str, version: str) -> list[str]:
    return [s["state"] for s in obs.of(dev, "status") if s.get("version") == version]


def queued(dev: Device, state: str) -> bool:
    """The link's outbox holds a report of ``state``. The agent tells its listeners after
    `wait_update` returns, so the report can land a moment later; counting the backlog would
    not do, since it also holds the IDLE report that comes first."""
    return any(r.get("state") == state for _, r in dev.link.outbox.pending(100))


def committed(obs: Observer, dev: str, version: str) -> bool:
    return "COMMITTED" in states(obs, dev, version)


def test_desired_state_installs_reports_and_rolls_back(
    device: Device, observer: Observer, iris_packages: dict[str, Pkg], fleet_keys: Keys
) -> None:
    device.start_link()
    assert observer.wait(lambda: any(p["online"] for p in observer.of(device.id, "presence")))
    desired = topic(device.id, "desired")
    p1, p2 = iris_packages["1.0.0"], iris_packages["1.1.0"]

    observer.publish(
        desired,
        signed(
            desired_state(device.id, 1, {"iris": model_entry(p1, "1.0.0")}), fleet_keys.controller
        ),
    )
    assert observer.wait(lambda: committed(observer, device.id, "1.0.0"), 60), observer.of(
        device.id, "status"
    )
    seen = states(observer, device.id, "1.0.0")
    assert [s for s in seen if s in FULL_PATH] == FULL_PATH
    reports = [s for s in observer.of(device.id, "status") if s["version"] == "1.0.0"]
    assert {r["rollout_id"] for r in reports} == {"r1"}
    ids = [r["id"] for r in reports]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert any(r.get("figures") for r in reports), "no benchmark figures reported"
    # Presence (retained) is republished with the new inventory.
    assert observer.wait(
        lambda: (
            observer.of(device.id, "presence")[-1].get("installed", {}).get("iris")
            == {"version": "1.0.0"}
        )
    )

    # An update, then the controller asks for the previous version back (a rollback).
    observer.publish(
        desired,
        signed(
            desired_state(device.id, 2, {"iris": model_entry(p2, "1.1.0", rollout_id="r2")}),
            fleet_keys.controller,
        ),
    )
    assert observer.wait(lambda: committed(observer, device.id, "1.1.0"), 60)
    back = model_entry(p1, "1.0.0", rollout_id="r2", allow_downgrade=True)
    observer.publish(
        desired, signed(desired_state(device.id, 3, {"iris": back}), fleet_keys.controller)
    )
    assert observer.wait(
        lambda: (
            [s["state"] for s in observer.of(device.id, "status") if s.get("desired_seq") == 3][-1:]
            == ["COMMITTED"]
        ),
        60,
    )
    assert device.agent.inventory()["models"]["iris"]["version"] == "1.0.0"


def test_replayed_forged_and_out_of_order_states_are_ignored(
    device: Device, observer: Observer, iris_packages: dict[str, Pkg], fleet_keys: Keys
) -> None:
    device.start_link()
    desired = topic(device.id, "desired")
    p1, p2 = iris_packages["1.0.0"], iris_packages["1.1.0"]
    good = signed(
        desired_state(device.id, 10, {"iris": model_entry(p1, "1.0.0")}), fleet_keys.controller
    )
    observer.publish(desired, good)
    assert observer.wait(lambda: committed(observer, device.id, "1.0.0"), 60)
    n_updates = len(device.agent.updates())

    to_p2 = {"iris": model_entry(p2, "1.1.0")}
    observer.publish(desired, good)  # replay of the same message
    observer.publish(desired, signed(desired_state(device.id, 7, to_p2), fleet_keys.controller))
    observer.publish(desired, signed(desired_state(device.id, 20, to_p2), fleet_keys.rogue))
    env = json.loads(signed(desired_state(device.id, 21, to_p2), fleet_keys.controller))
    env["payload"] = env["payload"][:-8] + "AAAAAAA="  # tampered payload, original signature
    observer.publish(desired, json.dumps(env).encode())
    observer.publish(desired, b'{"payload": "e30="}')  # unsigned
    other = signed(desired_state("someone-else", 22, to_p2), fleet_keys.controller)
    observer.publish(desired, other)
    # A valid, newer state for the version it already runs: reported, nothing installed.
    observer.publish(
        desired,
        signed(
            desired_state(device.id, 11, {"iris": model_entry(p1, "1.0.0", rollout_id="r9")}),
            fleet_keys.controller,
        ),
    )
    assert observer.wait(
        lambda: any(s.get("desired_seq") == 11 for s in observer.of(device.id, "status")), 30
    )
    (already,) = [s for s in observer.of(device.id, "status") if s.get("desired_seq") == 11]
    assert already["state"] == "COMMITTED" and already["already_installed"]
    assert already["rollout_id"] == "r9"
    assert len(device.agent.updates()) == n_updates, "an ignored desired state started an update"
    assert device.link.ignored == {
        "replayed": 2,
        "untrusted_key": 1,
        "signature_invalid": 1,
        "signature_missing": 1,
        "device_mismatch": 1,
    }
    rejected = [
        s["reason_code"] for s in observer.of(device.id, "status") if s["state"] == "REJECTED"
    ]
    # the same state again is nothing; a lower seq is reported, with the seq the device holds
    assert sorted(rejected) == sorted(
        [
            "untrusted_key",
            "signature_invalid",
            "signature_missing",
            "device_mismatch",
            "seq_regressed",
        ]
    )
    (back,) = [s for s in observer.of(device.id, "status") if s["reason_code"] == "seq_regressed"]
    assert back["desired_seq"] == 7 and back["figures"] == {"last_seq": 10, "received_seq": 7}
    assert json.loads((device.config.data_dir / "mqtt" / "link.json").read_text())["last_seq"] == 11

    # A restarted link gets the retained state again and does not act on it twice.
    link = device.new_link()
    device.start_link()
    assert wait_until(lambda: link.ignored.get("replayed", 0) >= 1, 15)
    assert len(device.agent.updates()) == n_updates


def test_status_survives_broker_outage_and_agent_restart(
    tmp_path: Path,
    broker: Any,
    observer: Observer,
    iris_packages: dict[str, Pkg],
    fleet_keys: Keys,
) -> None:
    proxy = CuttableProxy(broker.port)
    dev = Device(tmp_path, proxy.url, fleet_keys)
    try:
        dev.start_link()
        assert observer.wait(lambda: any(p["online"] for p in observer.of(dev.id, "presence")))

        proxy.cut()  # the broker is gone for this device: its last will says offline
        assert observer.wait(lambda: observer.of(dev.id, "presence")[-1]["online"] is False)
        p1 = iris_packages["1.0.0"]
        uid = dev.agent.submit_update(UpdateRequest("iris", "1.0.0", str(p1.path), p1.sha256))
        assert dev.agent.wait_update(uid, 60)["state"] == "COMMITTED"
        assert wait_until(lambda: queued(dev, "COMMITTED"), 10)
        assert observer.of(dev.id, "status") == []

        proxy.restore()  # paho reconnects with backoff; the outbox drains on PUBACK
        assert observer.wait(lambda: committed(observer, dev.id, "1.0.0"), 60)
        assert wait_until(lambda: dev.link.backlog() == 0, 10)

        # Offline again, and the agent's link restarts before the broker comes back.
        proxy.cut()
        p2 = iris_packages["1.1.0"]
        uid = dev.agent.submit_update(UpdateRequest("iris", "1.1.0", str(p2.path), p2.sha256))
        assert dev.agent.wait_update(uid, 60)["state"] == "COMMITTED"
        assert wait_until(lambda: queued(dev, "COMMITTED"), 10)
        dev.new_link()
        proxy.restore()
        dev.start_link()
        assert observer.wait(lambda: committed(observer, dev.id, "1.1.0"), 60), (
            f"seen: {states(observer, dev.id, '1.1.0')}, presence: "
            f"{[p['online'] for p in observer.of(dev.id, 'presence')]}, connected: "
            f"{dev.link.connected.is_set()}, backlog: {dev.link.backlog()}, "
            f"in flight: {dev.link.delivery._inflight}, handed: {dev.link.delivery._handed}"
        )
        got = states(observer, dev.id, "1.1.0")
        assert [s for s in got if s in FULL_PATH] == FULL_PATH
        # At least once, each report under its own increasing id (the controller's dedup key).
        reports = observer.of(dev.id, "status")
        first_seen = list(dict.fromkeys(r["id"] for r in reports))
        assert first_seen == sorted(first_seen)
        assert {r["seq"] for r in reports} == {r["id"] for r in reports}
    finally:
        dev.close()
        proxy.close()


def test_telemetry_outbox_drains_in_batches_until_acknowledged(
    tmp_path: Path, broker: Any, observer: Observer, fleet_keys: Keys
) -> None:
    from edgefleet.agent.telemetry.outbox import Outbox

    dev = Device(tmp_path, broker.url, fleet_keys)
    box = Outbox(tmp_path / "telemetry.sqlite")
    ids = [box.append({"kind": "system", "n": i}) for i in range(250)]
    dev.link = MqttLink(dev.agent, dev.config, telemetry=box, telemetry_batch=100)
    try:
        dev.start_link()

        def received() -> list[dict[str, Any]]:
            return [r for m in observer.of(dev.id, "telemetry") for r in m["records"]]

        assert observer.wait(lambda: len(received()) >= len(ids), 30)
        batches = observer.of(dev.id, "telemetry")
        assert all(m["device_id"] == dev.id and len(m["records"]) <= 100 for m in batches)
        assert sorted(r["id"] for r in received()) == ids
        assert [r["n"] for r in received()] == list(range(250))
        assert wait_until(lambda: box.stats().pending == 0, 10)
    finally:
        dev.close()
        box.close()


def test_explicit_remove_list_uninstalls_implicit_absence_does_not(
    device: Device, observer: Observer, iris_packages: dict[str, Pkg], fleet_keys: Keys
) -> None:
    device.start_link()
    desired = topic(device.id, "desired")
    p1 = iris_packages["1.0.0"]
    observer.publish(
        desired,
        signed(
            desired_state(device.id, 1, {"iris": model_entry(p1, "1.0.0")}), fleet_keys.controller
        ),
    )
    assert observer.wait(lambda: committed(observer, device.id, "1.0.0"), 60)

    def removed(name: str) -> list[dict[str, Any]]:
        return [
            s
            for s in observer.of(device.id, "status")
            if s.get("model") == name and s.get("state") == "REMOVED"
        ]

    # iris merely missing from `models`: left alone. `ghost` was never here: REMOVED once.
    observer.publish(
        desired,
        signed(desired_state(device.id, 2, {}) | {"remove": ["ghost"]}, fleet_keys.controller),
    )
    assert observer.wait(lambda: bool(removed("ghost")), 30), observer.of(device.id, "status")
    assert device.agent.inventory()["models"]["iris"]["version"] == "1.0.0"

    observer.publish(
        desired,
        signed(
            desired_state(device.id, 3, {}) | {"remove": ["ghost", "iris"]}, fleet_keys.controller
        ),
    )
    assert observer.wait(lambda: bool(removed("iris")), 30), observer.of(device.id, "status")
    (r,) = removed("iris")
    assert r["version"] == "1.0.0" and r["rollout_id"] == "r1" and r["desired_seq"] == 3, r
    assert len(removed("ghost")) == 1  # already confirmed: not removed or reported again
    assert "iris" not in device.agent.inventory()["models"]
    assert observer.wait(
        lambda: "iris" not in observer.of(device.id, "presence")[-1].get("installed", {"iris": 1})
    )


def test_renewed_credentials_reconnect_without_missing_an_update_event(
    device: Device, observer: Observer, iris_packages: dict[str, Pkg], fleet_keys: Keys
) -> None:
    """A certificate renewal reconnects the link while an update runs: the link keeps its
    listener and queue, so every step of the update is reported (a new link in its place
    would leave a moment in which nobody hears the agent)."""
    import threading

    link = device.start_link()
    p1 = iris_packages["1.0.0"]
    done = threading.Event()

    def renew_all_along() -> None:
        while not done.is_set():
            link.renew()
            done.wait(0.01)

    renewer = threading.Thread(target=renew_all_along)
    renewer.start()
    try:
        uid = device.agent.submit_update(UpdateRequest("iris", "1.0.0", str(p1.path), p1.sha256))
        assert device.agent.wait_update(uid, 60)["state"] == "COMMITTED"
    finally:
        done.set()
        renewer.join()
    assert observer.wait(lambda: committed(observer, device.id, "1.0.0"), 60)
    # Each reconnect hands out again what was not acknowledged: at least once, one id each.
    by_id = {
        r["id"]: r["state"] for r in observer.of(device.id, "status") if r["state"] in FULL_PATH
    }
    assert [by_id[i] for i in sorted(by_id)] == FULL_PATH
    assert link.wait_connected(15) and wait_until(lambda: link.backlog() == 0, 30)


def test_updates_stop_before_the_link_so_every_step_taken_is_queued(
    device: Device, iris_packages: dict[str, Pkg]
) -> None:
    """`agent run` stops updates first, then the link: each step the update journaled until
    it stopped has its report in the outbox (the next start resumes the update)."""
    link = device.start_link()
    link.connected.clear()  # nothing leaves the outbox: it shows what was queued
    p1 = iris_packages["1.0.0"]
    uid = device.agent.submit_update(UpdateRequest("iris", "1.0.0", str(p1.path), p1.sha256))
    assert wait_until(lambda: queued(device, "DOWNLOADING"), 30)
    device.agent.stop_updates()
    link.stop()  # its worker turns the events queued before the stop into reports first
    from edgefleet.agent.telemetry.outbox import Outbox

    box = Outbox(link.dir / "status-outbox.sqlite")
    pending = [r for _, r in box.pending(100) if r["state"] in FULL_PATH]
    box.close()
    view = device.agent.update(uid)
    assert view is not None
    journaled = [t["state"] for t in view["history"] if t["state"] in FULL_PATH]
    assert [r["state"] for r in pending] == journaled


def test_a_tls_url_to_a_plaintext_port_says_so(
    tmp_path: Path, broker: Any, fleet_keys: Keys
) -> None:
    """paho only says that an attempt failed: the link keeps why (`last_connect_error`, what
    `wait_connected` failures and the logs show), here a TLS handshake with a plaintext port."""
    d = Device(tmp_path, broker.url.replace("mqtt://", "mqtts://"), fleet_keys)
    try:
        d.link.start()
        assert not d.link.wait_connected(1)
        wait_until(lambda: d.link.last_connect_error is not None, 15)
        assert "TLS" in str(d.link.last_connect_error), d.link.last_connect_error
    finally:
        d.close()
