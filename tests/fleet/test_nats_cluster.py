"""edgefleet on a real three-node NATS cluster: MQTT on every node, sessions and retained
messages in replicated JetStream streams, nodes killed with SIGKILL under devices and the
controller."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.harness import NatsCluster, die_with_parent, free_port, nats_server_binary, terminate
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
from tests.support.services import require


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    require(
        nats_server_binary() is not None,
        "nats-server is not installed (apt-get install nats-server)",
    )
    with NatsCluster(tmp_path / "nats", nodes=3) as cluster:
        yield cluster


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
                "mqtt": {"urls": urls, "keepalive_s": 5},
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
        # Each report once: queued once, and it leaves the outbox on its PUBACK.
        ids = [s["id"] for s in obs.of(dev, "status")]
        assert len(ids) == len(set(ids)), f"a report arrived twice: {ids}"
        print(f"agent converged {converged_s:.1f}s after its node was killed")
    finally:
        terminate(agent)
        obs.stop()
