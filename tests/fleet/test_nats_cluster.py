"""edgefleet on a real three-node NATS cluster: MQTT on every node, sessions and retained
messages in replicated JetStream streams, nodes killed with SIGKILL under devices and the
controller."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.demo.fleet import Fleet
from edgefleet.harness import NatsCluster, die_with_parent, free_port, terminate
from edgefleet.wire.mqtt import subscription, topic
from tests.fleet.conftest import (
    Keys,
    Observer,
    Pkg,
    desired_state,
    model_entry,
    signed,
    wait_until,
)


class _Reader:
    """An MQTT 3.1.1 client on one node that records what it receives."""

    def __init__(self, port: int, client_id: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.connected = False
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        c.on_connect = self._on_connect
        c.on_message = lambda cl, u, m: self.messages.append(
            (m.topic, bytes(m.payload), bool(m.retain))
        )
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _on_connect(self, cl: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connected = not rc.is_failure
        if self.connected:
            cl.subscribe(subscription("desired"), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_retained_desired_state_is_read_on_another_node_and_survives_its_publisher_node(
    nats: NatsCluster, fleet_keys: Keys
) -> None:
    state = desired_state("gw-nats-1", 1, {})
    payload = signed(state, fleet_keys.controller)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ctl", protocol=mqtt.MQTTv311)
    pub.connect("127.0.0.1", nats.mqtt_ports[0])
    pub.loop_start()
    try:
        info = pub.publish(topic("gw-nats-1", "desired"), payload, qos=1, retain=True)
        info.wait_for_publish(10)
        assert info.is_published()
    finally:
        pub.disconnect()
        pub.loop_stop()

    on_n3 = _Reader(nats.mqtt_ports[2], "reader-n3")
    try:
        assert wait_until(lambda: bool(on_n3.messages), 15), (
            "node 3 never served the retained state"
        )
        assert on_n3.messages[0] == (topic("gw-nats-1", "desired"), payload, True)
    finally:
        on_n3.close()

    nats.kill(0)
    # A new session on node 3 after node 1's death: the retained message lives in the
    # replicated $MQTT_rmsgs stream, not on node 1. Stream and consumer leaders that were on
    # node 1 are re-elected within seconds; a session that connects meanwhile may be refused.
    started = time.monotonic()
    deadline = started + 30
    got: list[tuple[str, bytes, bool]] = []
    attempt = 0
    while not got and time.monotonic() < deadline:
        attempt += 1
        reader = _Reader(nats.mqtt_ports[2], f"reader-n3-after-{attempt}")
        try:
            wait_until(lambda r=reader: bool(r.messages), 3)  # type: ignore[misc]
            got = list(reader.messages)
        finally:
            reader.close()
    assert got == [(topic("gw-nats-1", "desired"), payload, True)], nats.log_tail(2)


class _Observer(Observer):
    """`tests.fleet.conftest.Observer` on one node of the cluster, speaking MQTT 3.1.1, that
    reconnects by itself (paho) if its node has a hiccup."""

    def start(self) -> _Observer:
        ready = threading.Event()
        # A persistent session, as the controller's: the cluster keeps what arrives for it
        # while NATS drops its connection (it does, while JetStream re-elects leaders).
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"obs-{time.monotonic_ns()}",
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("edgefleet/v1/devices/#", qos=1)
        c.on_subscribe = lambda cl, u, mid, rcs, p: ready.set()
        c.on_message = self._on_message
        c.reconnect_delay_set(1, 2)
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        self.client = c
        assert ready.wait(20), "observer could not subscribe"
        return self

    def publish_retrying(self, t: str, payload: bytes, timeout: float = 30.0) -> None:
        """Publish retained, QoS 1, until the broker acknowledges it (a node may refuse while
        JetStream re-elects the leaders that were on a dead node)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.client.publish(t, payload, qos=1, retain=True)
                info.wait_for_publish(5)
                if info.is_published():
                    return
            except (RuntimeError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster never took the publish on {t}")
            time.sleep(0.5)


def _agent_config(
    root: Path, device_id: str, urls: list[str], keys: Keys, *, probation_s: float
) -> Path:
    """An agent.toml for a real `edgefleet agent run` process linked to ``urls``."""
    from edgefleet.agent.admin import ensure_token
    from edgefleet.agent.config import dump_config, load_config

    d = root / device_id
    d.mkdir(parents=True)
    path = d / "agent.toml"
    path.write_text(
        dump_config(
            {
                "device_id": device_id,
                "data_dir": str(d / "data"),
                "trusted_keys": [str(keys.packager.public_path)],
                "controller_keys": [str(keys.controller.public_path)],
                "profiles": ["cpu-x86_64"],
                "http_host": "127.0.0.1",
                "http_port": free_port(),
                "admin_port": 0,
                "probation": {"seconds": probation_s},
                "validation": {"bench_runs": 10, "bench_warmup": 2},
                "mqtt": {"urls": urls, "keepalive_s": 5, "broker_kind": "nats"},
                "telemetry": {"enabled": False},
            }
        )
    )
    cfg = load_config(path, env={})
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_token(cfg.admin_token_path)
    return path


FULL_PATH = [
    "DOWNLOADING",
    "VERIFYING",
    "INSTALLING",
    "VALIDATING",
    "ACTIVATING",
    "PROBATION",
    "COMMITTED",
]


def _seen_states(obs: Observer, dev: str, seq: int) -> list[str]:
    return [s["state"] for s in obs.of(dev, "status") if s.get("desired_seq") == seq]


@pytest.mark.slow
def test_agent_fails_over_when_its_node_dies_mid_update_and_converges(
    nats: NatsCluster,
    tmp_path: Path,
    fleet_keys: Keys,
    iris_packages: dict[str, Pkg],
) -> None:
    dev = "gw-failover"
    obs = _Observer(nats.mqtt_ports[2]).start()
    path = _agent_config(tmp_path / "agents", dev, nats.mqtt_urls, fleet_keys, probation_s=2.0)
    log_path = tmp_path / "agent.log"
    with open(log_path, "ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
            preexec_fn=die_with_parent(),
        )
    try:

        def tail() -> str:
            return log_path.read_text(errors="replace")[-4000:]

        assert obs.wait(lambda: any(p["online"] for p in obs.of(dev, "presence")), 60), tail()
        p1, p2 = iris_packages["1.0.0"], iris_packages["1.1.0"]
        desired = topic(dev, "desired")
        obs.publish_retrying(
            desired,
            signed(
                desired_state(dev, 1, {"iris": model_entry(p1, "1.0.0")}), fleet_keys.controller
            ),
        )
        # Mid-update: the download has begun, the commit is at least a probation away.
        assert obs.wait(lambda: bool(_seen_states(obs, dev, 1)), 60), tail()
        assert "COMMITTED" not in _seen_states(obs, dev, 1)
        killed_at = time.monotonic()
        nats.kill(0)  # the node the agent is on (the first of its list)

        def seen() -> str:
            return f"{[(r.get('desired_seq'), r['state']) for r in obs.of(dev, 'status')]}"

        # The update goes on; its reports, queued in the outbox while no node took them, reach
        # the controller's side through another node.
        assert obs.wait(lambda: "COMMITTED" in _seen_states(obs, dev, 1), 90), seen() + tail()
        converged_s = time.monotonic() - killed_at
        assert f"next broker 127.0.0.1:{nats.mqtt_ports[1]}" in tail(), tail()
        assert [s for s in _seen_states(obs, dev, 1) if s in FULL_PATH] == FULL_PATH, seen()

        # The agent is subscribed on its new node: the next desired state, published on node 3
        # with node 1 still dead, reaches it.
        obs.publish_retrying(
            desired,
            signed(
                desired_state(dev, 2, {"iris": model_entry(p2, "1.1.0", rollout_id="r2")}),
                fleet_keys.controller,
            ),
        )
        assert obs.wait(lambda: "COMMITTED" in _seen_states(obs, dev, 2), 90), seen() + tail()
        assert obs.wait(
            lambda: (
                (obs.of(dev, "presence") or [{}])[-1]
                .get("models", {})
                .get("iris", {})
                .get("version")
                == "1.1.0"
            ),
            30,
        ), obs.of(dev, "presence")[-1:]
        # None lost: the report ids (outbox ids, consecutive) have no gap. A report in flight
        # when the node died can arrive twice (delivered, but its PUBACK died with the node, so
        # the outbox sent it again through the next node): at-least-once, and the controller
        # drops the second copy by its seq.
        ids = [s["id"] for s in obs.of(dev, "status")]
        assert sorted(set(ids)) == list(range(min(ids), max(ids) + 1)), f"a report lost: {ids}"
        print(f"{len(ids) - len(set(ids))} report(s) delivered twice across the failover")
        print(f"agent converged {converged_s:.1f}s after its node was killed")
    finally:
        terminate(agent)
        obs.stop()


class _NatsFleet(Fleet):
    """The demo's fleet harness (controller and agents as processes) on a NATS cluster: the
    controller's broker list starts on node 1, every agent's on node 2 or 3 (then the rest)."""

    cluster: NatsCluster

    def broker_url(self, user: str | None = None, password: str | None = None) -> str:
        return ",".join(self.cluster.mqtt_urls)

    def write_agent_config(self, device_id: str) -> Path:
        from edgefleet.agent.config import dump_config

        path = super().write_agent_config(device_id)
        raw = tomllib.loads(path.read_text())
        urls = self.cluster.mqtt_urls
        first = 1 + sum(map(ord, device_id)) % (len(urls) - 1)  # node 2 or 3, never node 1
        raw["mqtt"].pop("url", None)
        raw["mqtt"]["urls"] = urls[first:] + urls[:first]
        raw["mqtt"]["broker_kind"] = "nats"  # QoS 0 subscriptions: no consumer per device
        path.write_text(dump_config(raw))
        return path


def _outbox(path: Path) -> tuple[set[int], int]:
    """(ids of the records still pending, last id ever given) of an agent's on-disk outbox."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        pending = {int(r[0]) for r in db.execute("SELECT id FROM records")}
        last = int(db.execute("SELECT seq FROM sqlite_sequence WHERE name='records'").fetchone()[0])
        return pending, last
    finally:
        db.close()


@pytest.mark.slow
def test_rollout_finishes_when_the_controllers_node_dies_and_no_report_is_lost_or_doubled(
    nats: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet.demo.rollouts import rollout_body
    from edgefleet.demo.spec import FleetSpec

    # NATS speaks MQTT 3.1.1 only (and so has no shared subscriptions): the broker kind says so.
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_BROKER_KIND", "nats")
    # status and telemetry through the cluster's JetStream (cloud_controller/jetstream.py)
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_NATS_URL", ",".join(nats.nats_urls))
    spec = FleetSpec(tmp_path / "fleet", devices=3, probation_s=1.0, telemetry_interval_s=1.0)
    fleet = _NatsFleet(spec)
    fleet.cluster = nats
    try:
        fleet.make_keys()
        fleet.build_packages(("1.0.0",), ())
        fleet.start_controller()
        fleet.register_devices()
        fleet.start_agents()
        fleet.upload(fleet.packages["1.0.0"])
        fleet.wait_online()
        ids = spec.device_ids()
        rid = fleet.create_rollout(rollout_body("1.0.0", ids, waves=[34.0, 100.0]))
        # Wave 1 under way: kill the node the controller is on (the first of its list).
        fleet.wait_rollout(rid, timeout=120, until=lambda d: d["phase"] == "running")
        killed_at = time.monotonic()
        nats.kill(0)
        detail = fleet.wait_rollout(rid, timeout=240)
        finished_s = time.monotonic() - killed_at
        assert detail["phase"] == "succeeded", detail
        assert {d["state"] for d in detail["devices"]} == {"succeeded"}, detail["devices"]
        assert detail["counts"]["states"] == {"succeeded": len(ids)}, detail["counts"]
        # what each device says it runs (its retained presence, sent after the commit)
        assert wait_until(lambda: set(fleet.installed().values()) == {"1.0.0"}, 30, 0.5), (
            fleet.installed()
        )

        # Nothing lost, nothing twice. After a clean stop of every agent, each record its
        # outboxes ever gave is in the database or still pending in the outbox (not yet
        # acknowledged by the cluster), and the database holds each telemetry record once.
        for dev in ids:
            fleet.stop_agent(dev)
        db = sqlite3.connect(str(fleet.controller_dir / "controller.db"), timeout=30)
        try:
            for dev in ids:
                data = fleet.agent_dir(dev) / "data"
                tel_pending, last_tel = _outbox(data / "telemetry" / "outbox.sqlite")
                status_pending, last_status = _outbox(data / "mqtt" / "status-outbox.sqlite")

                def stored(dev: str = dev) -> list[int]:
                    rows = db.execute(
                        "SELECT record_id FROM telemetry_records WHERE device_id = ?"
                        " ORDER BY record_id",
                        (dev,),
                    ).fetchall()
                    return [int(r[0]) for r in rows]

                def missing(dev: str = dev, last: int = last_tel) -> set[int]:
                    rec = stored(dev)
                    return set(range(rec[0] if rec else last, last + 1)) - set(rec)

                # the controller may still be writing the last batch
                wait_until(lambda p=tel_pending, m=missing: m() <= p, 30)  # type: ignore[misc]
                rec = stored()
                assert rec, f"{dev}: no telemetry stored"
                assert len(rec) == len(set(rec)), f"{dev}: a telemetry record stored twice"
                lost = missing() - tel_pending
                assert not lost, f"{dev}: telemetry lost: {sorted(lost)[:10]}"
                (seq,) = db.execute(
                    "SELECT last_status_seq FROM devices WHERE id = ?", (dev,)
                ).fetchone()
                assert seq == last_status or last_status in status_pending, (
                    dev,
                    seq,
                    last_status,
                )
        finally:
            db.close()
        print(f"rollout finished {finished_s:.1f}s after the controller's node was killed")
    finally:
        fleet.close()
