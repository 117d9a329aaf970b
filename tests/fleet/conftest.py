"""Fixtures for the MQTT link tests: keys, real signed packages on a real HTTP server, a real
agent, a recording MQTT observer and hand-signed desired states."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from edgefleet.harness import NatsCluster, nats_server_binary
from edgefleet.keys import KeyPair, generate_keypair, load_private_key
from edgefleet.wire.mqtt import sign_desired, topic
from tests.support.services import require


@dataclass
class Keys:
    packager: KeyPair
    controller: KeyPair
    rogue: KeyPair


@dataclass
class Pkg:
    path: Path
    url: str
    sha256: str
    size: int


@pytest.fixture(scope="session")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("fleet-keys")
    return Keys(
        generate_keypair(d, "packager"),
        generate_keypair(d, "controller"),
        generate_keypair(d, "rogue"),
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def iris_packages(
    tmp_path_factory: pytest.TempPathFactory, fleet_keys: Keys
) -> Iterator[dict[str, Pkg]]:
    """iris 1.0.0 and 1.1.0, real signed packages served over HTTP on loopback."""
    from tests.support.packages import make_package

    d = tmp_path_factory.mktemp("fleet-packages")
    paths = {
        v: make_package(d, name="iris", version=v, key=fleet_keys.packager, seed=i)
        for i, v in enumerate(("1.0.0", "1.1.0"))
    }
    handler = functools.partial(_QuietHandler, directory=str(d))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield {
            v: Pkg(
                p, f"{base}/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size
            )
            for v, p in paths.items()
        }
    finally:
        server.shutdown()
        server.server_close()


def desired_state(
    device_id: str, seq: int, models: dict[str, dict[str, Any]], *, ttl_s: float = 3600
) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {
        "device_id": device_id,
        "seq": seq,
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(seconds=ttl_s)).isoformat(),
        "models": models,
    }


def model_entry(pkg: Pkg, version: str, **kw: Any) -> dict[str, Any]:
    return {
        "version": version,
        "url": pkg.url,
        "sha256": pkg.sha256,
        "size": pkg.size,
        "profile": "cpu-x86_64",
        "rollout_id": kw.pop("rollout_id", "r1"),
        "allow_downgrade": kw.pop("allow_downgrade", False),
        **kw,
    }


@dataclass
class Observer:
    """A plain MQTT client that records everything under edgefleet/v1/devices/#."""

    port: int
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    client: Any = None

    def start(self) -> Observer:
        ready = threading.Event()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"obs-{time.monotonic_ns()}")
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe("edgefleet/v1/devices/#", qos=1)
        c.on_subscribe = lambda cl, u, mid, rcs, p: ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        self.client = c
        assert ready.wait(10), "observer could not subscribe"
        return self

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.cond.notify_all()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def of(self, device_id: str, kind: str) -> list[dict[str, Any]]:
        t = topic(device_id, kind)  # type: ignore[arg-type]
        with self.cond:
            return [json.loads(p) for tp, p, _ in self.messages if tp == t and p]

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 0.2))
        return True

    def publish(self, t: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(t, payload, qos=1, retain=retain).wait_for_publish(10)


@pytest.fixture
def observer(broker: Any) -> Iterator[Observer]:
    obs = Observer(broker.port).start()
    yield obs
    obs.stop()


def signed(state: dict[str, Any], key: KeyPair) -> bytes:
    return sign_desired(state, load_private_key(key.private_path))


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    """A three-node NATS cluster (MQTT and JetStream on every node) of the test's own."""
    require(
        nats_server_binary() is not None,
        "nats-server is not installed (apt-get install nats-server)",
    )
    with NatsCluster(tmp_path / "nats", nodes=3) as cluster:
        yield cluster
