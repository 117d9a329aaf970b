"""Fixtures for the MQTT link tests: keys, real signed packages on a real HTTP server, a real
agent, a recording MQTT observer and hand-signed desired states."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

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


C = TypeVar("C", bound=NatsCluster)


def quiet_port(host: str = "127.0.0.1") -> int:
    """A free TCP port below the kernel's ephemeral range: `free_port` picks one inside it,
    which an outgoing connection may take before the server binds it (seen here with ten
    thousand simulated devices of another job connected: a node died with "address already in
    use")."""
    import random
    import socket

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randint(max(1024, low - 12_000), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low - 12_000}, {low})")


def off_ephemeral(cluster: C) -> C:
    """The cluster's ports moved to `quiet_port` ones (before it starts)."""
    if Path("/proc/sys/net/ipv4/ip_local_port_range").exists():
        for ports in (
            cluster.client_ports,
            cluster.cluster_ports,
            cluster.mqtt_ports,
            cluster.monitor_ports,
        ):
            ports[:] = [quiet_port(cluster.host) for _ in ports]
    return cluster


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsCluster]:
    """A three-node NATS cluster (MQTT and JetStream on every node) of the test's own."""
    require(
        nats_server_binary() is not None,
        "nats-server is not installed (apt-get install nats-server)",
    )
    with off_ephemeral(NatsCluster(tmp_path / "nats", nodes=3)) as cluster:
        yield cluster


@dataclass
class NatsSecurity:
    """A CA and the nodes' server certificate (for 127.0.0.1 and localhost), and the users
    (name: password) that the MQTT listener and the NATS client port accept."""

    ca: Path
    cert: Path
    key: Path
    users: dict[str, str]

    @classmethod
    def create(cls, d: Path, users: dict[str, str]) -> NatsSecurity:
        """The controller's own PKI code (`cloud_controller.pki`, what `controller
        mosquitto-config` uses for Mosquitto's TLS) makes the CA and the certificate."""
        from edgefleet.cloud_controller import pki

        ca = pki.CertificateAuthority.load_or_create(d / "ca")
        key = pki.new_key()
        cert = pki.issue_server(
            ca.key, ca.cert, key.public_key(), ["127.0.0.1", "localhost"], datetime.now(UTC)
        )
        (d / "server.crt").write_bytes(pki.cert_pem(cert))
        pki.write_private(d / "server.key", pki.key_pem(key))
        return cls(ca.cert_path, d / "server.crt", d / "server.key", users)


class SecureNatsCluster(NatsCluster):
    """`NatsCluster` with TLS on every node's MQTT listener and NATS client port, and user /
    password authorization on both (the routes between the nodes stay plain, on loopback)."""

    def __init__(self, workdir: Path, security: NatsSecurity, nodes: int = 3) -> None:
        super().__init__(workdir, nodes)
        self.security = security

    def config_text(self, i: int) -> str:
        s = self.security
        tls = f'tls {{\n  cert_file: "{s.cert}"\n  key_file: "{s.key}"\n  timeout: 5\n}}\n'
        users = ", ".join(f'{{user: "{u}", password: "{p}"}}' for u, p in s.users.items())
        base = super().config_text(i).replace("mqtt {\n", "mqtt {\n" + tls)
        return base + tls + f"authorization {{\n  users: [{users}]\n}}\n"

    def mqtts_urls(self, user: str) -> list[str]:
        return [f"mqtts://{user}:{self.security.users[user]}@{u[7:]}" for u in self.mqtt_urls]

    def tls_urls(self, user: str) -> list[str]:
        return [f"tls://{user}:{self.security.users[user]}@{u[7:]}" for u in self.nats_urls]

    def mqtt_client(self, i: int, user: str, password: str | None = None, **kw: Any) -> Any:
        """A paho client (3.1.1) set up for node ``i``'s MQTT listener: TLS, credentials."""
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, **kw)
        c.tls_set(ca_certs=str(self.security.ca))
        c.username_pw_set(user, self.security.users[user] if password is None else password)
        return c

    def wait_ready(self, which: Any = None, timeout: float | None = None) -> None:
        """Every node accepts an MQTT session over TLS with a user's password (the plain
        probe of `NatsCluster` speaks no TLS)."""
        user = next(iter(self.security.users))
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        for i in range(len(self.names)) if which is None else which:
            while self._connack(i, user) != 0:
                for j in range(len(self.names)):  # a node that died cannot take its replica
                    if self.procs[j] is not None and not self.alive(j):
                        raise AssertionError(f"nats node {self.names[j]}: {self.log_tail(j)}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"nats node {self.names[i]}: {self.log_tail(i)}")
                time.sleep(0.3)

    def _connack(self, i: int, user: str) -> int | None:
        got: list[int] = []
        done = threading.Event()

        def on_connect(cl: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
            got.append(int(reason.value))
            done.set()

        c = self.mqtt_client(i, user, client_id=f"probe-{uuid.uuid4().hex[:8]}")
        c.on_connect = on_connect
        try:
            c.connect(self.host, self.mqtt_ports[i], keepalive=10)
        except OSError:
            return None
        c.loop_start()
        done.wait(3)
        c.disconnect()
        c.loop_stop()
        return got[0] if got else None


@pytest.fixture
def secure_nats(tmp_path: Path) -> Iterator[SecureNatsCluster]:
    """A three-node NATS cluster with TLS and passwords on its MQTT and client ports; users
    ``controller`` and ``device``."""
    require(
        nats_server_binary() is not None,
        "nats-server is not installed (apt-get install nats-server)",
    )
    sec = NatsSecurity.create(
        tmp_path / "nats-pki", {"controller": "ctl-Secret-1", "device": "dev-Secret-2"}
    )
    with off_ephemeral(SecureNatsCluster(tmp_path / "nats", sec, nodes=3)) as cluster:
        yield cluster
