"""edgefleet on a real three-node NATS cluster: MQTT on every node, sessions and retained
messages in replicated JetStream streams, nodes killed with SIGKILL under devices and the
controller."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.harness import NatsCluster, nats_server_binary
from edgefleet.wire.mqtt import subscription, topic
from tests.fleet.conftest import Keys, desired_state, signed, wait_until
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
