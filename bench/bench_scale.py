"""Scale benchmark: N simulated devices in a few processes, a real controller, a real broker.

``python -m bench scale [--devices=10000] [--procs=4] [--broker=mosquitto|nats|both]
[--db=sqlite|postgres|both] [--replicas=1|2] [--nats-ingest=jetstream|mqtt|both] [--quick]
[--ingest-only] [--json=PATH]``

Per broker (Mosquitto; and the three-node NATS cluster where ``edgefleet.harness.NatsCluster``
exists), one fleet of simulated devices is spread over ``--procs`` worker processes, each one
selector loop over paho clients (`bench.bench_fleet.SimFleet`: the real wire, desired states
verified with the controller's key, seqs, seven status reports per update). Then, in the same
run and on the same broker and devices:

1. **Baseline** (the bare protocol): a plain MQTT client in the controller's place publishes
   signed, retained desired states in the same three waves (1 %, 10 %, 100 %) and waits for every
   status; then every device floods status reports and telemetry envelopes, which it counts.
2. **Controller** (``edgefleet controller serve`` as a child process; per ``--db`` SQLite and/or
   a PostgreSQL database of its own, dropped afterwards): devices registered through the API,
   presence ingested, a package uploaded, a three-wave rollout created and timed to
   ``succeeded``; then the same status flood (timed until every seq is in the database) and
   the same telemetry flood (timed until every record is a row). Controller and broker CPU
   seconds are read from /proc (psutil) for each phase.
3. With ``--replicas=2`` (PostgreSQL only): the same with two controller processes of distinct
   replica ids, when the controller has replicas (``Settings.replica_id``); otherwise the row is
   skipped with the reason.
4. On NATS, ``--nats-ingest=jetstream`` (the default: status and telemetry through the shared
   JetStream consumers), ``mqtt`` (every replica subscribes to every report over MQTT, as
   before JetStream ingest) or ``both`` (a row of each, on the same cluster and devices).

It prints the table with ratios against the baseline, and the per-message figures that
docs/scale.md sizes larger fleets from (payload bytes, database rows and bytes per record,
CPU microseconds per message, connects per second). ``--quick``: 500 devices, smaller floods.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import multiprocessing as mp
import os
import resource
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.bench_fleet import SUCCESS_PATH, SimFleet
from edgefleet.wire.brokerkind import BrokerKind, device_subscription_qos
from edgefleet.wire.mqtt import topic

MODEL = "digits"
VERSION = "1.0.0"
WAVES = (1.0, 10.0, 100.0)
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
TELEMETRY_RECORDS = 3  # system + agent + inference, what an agent without sketches sends
AGENT_TELEMETRY_INTERVAL_S = 10.0  # edgefleet.agent.config.TelemetryConfig.interval_s


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _raise_nofile() -> None:
    """As many sockets as the hard limit allows (a worker holds thousands)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- simulated devices -----------------------------------------------------------------------


class ScaleSim(SimFleet):
    """`SimFleet` plus what the scale benchmark measures: connects in chunks (so that a
    listen backlog never drops SYNs), telemetry envelopes, and the sizes of what goes over the
    wire (desired states received, presence, status and telemetry sent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.telemetry_id: dict[str, int] = {d: 0 for d in self.devices}
        self.telemetry_sent = 0
        self.desired_bytes: list[int] = []
        self.sizes: dict[str, int] = {}
        self._writers: set[str] = set()  # devices whose client still has bytes to send
        # At most ``publish_window`` devices with unacknowledged reports at once, the rest
        # queued here (None: all at once). NATS stores each QoS 1 PUBLISH in a replicated
        # stream before its PUBACK, one at a time per connection, and closes a connection whose
        # store waited over 4 s: thousands of devices publishing at the same instant (a flood
        # from all of them) exceed that on a small cluster. Agents spread their telemetry over
        # their interval; the window stands for that spread, for the baseline and the
        # controller alike.
        self.publish_window: int | None = None
        self._held: dict[str, list[tuple[str, str]]] = {}
        self._publishing: set[str] = set()

    def _publish(self, dev: Any, t: str, body: str) -> None:
        if self.publish_window is None:
            dev.client.publish(t, body, qos=1)
            return
        self._held.setdefault(dev.device_id, []).append((t, body))

    def _release(self) -> None:
        """Devices whose reports are all acknowledged leave the window; held ones enter it."""
        if self.publish_window is None:
            return
        for dev_id in [d for d in self._publishing if not self.devices[d].client._out_messages]:
            self._publishing.discard(dev_id)
        while self._held and len(self._publishing) < self.publish_window:
            dev_id, msgs = next(iter(self._held.items()))
            del self._held[dev_id]
            client = self.devices[dev_id].client
            for t, body in msgs:
                client.publish(t, body, qos=1)
            self._publishing.add(dev_id)
            if client.want_write():
                self._writers.add(dev_id)

    def poll(self, timeout: float = 0.02) -> None:
        """`SimFleet.poll` without its sweep over every device for pending writes, which at
        thousands of devices per process costs a CPU core while the fleet is idle (stolen from
        the controller on a small machine): only the clients known to have unsent packets are
        written, and every client that read something."""
        self._release()
        for dev_id in list(self._writers):
            client = self.devices[dev_id].client
            client.loop_write()
            if not client.want_write():
                self._writers.discard(dev_id)
        for key, _ in self.selector.select(timeout):
            dev = key.data
            dev.client.loop_read(max_packets=10)
            if dev.client.want_write():
                dev.client.loop_write()
                if dev.client.want_write():
                    self._writers.add(dev.device_id)

    def flood(self, per_device: int) -> int:
        sent = super().flood(per_device)
        self._writers.update(d for d, dev in self.devices.items() if dev.client.want_write())
        return sent

    def connect(self, timeout: float = 120.0, chunk: int = 250) -> None:
        import selectors

        ids = list(self.devices)
        deadline = time.monotonic() + timeout
        for i in range(0, len(ids), chunk):
            part = [self.devices[d] for d in ids[i : i + chunk]]
            for dev in part:
                dev.client.connect(self.host, self.port, keepalive=300)
                sock = dev.client.socket()
                assert sock is not None
                self.selector.register(sock, selectors.EVENT_READ, dev)
            left = max(1.0, deadline - time.monotonic())
            if not self.run_until(lambda p=part: all(d.connected for d in p), left):  # type: ignore[misc]
                missing = sum(not d.connected for d in part)
                raise TimeoutError(f"{missing} simulated devices not connected after {timeout}s")

    def _on_message(self, client: mqtt.Client, dev_id: str, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            self.desired_bytes.append(len(msg.payload))
        super()._on_message(client, dev_id, msg)

    def telemetry(self, per_device: int, records: int = TELEMETRY_RECORDS) -> int:
        """Queue ``per_device`` telemetry envelopes of ``records`` records on every device."""
        for dev in self.devices.values():
            for _ in range(per_device):
                recs = []
                for k in range(records):
                    self.telemetry_id[dev.device_id] += 1
                    recs.append(_record(k, self.telemetry_id[dev.device_id]))
                body = json.dumps({"device_id": dev.device_id, "records": recs})
                self.sizes["telemetry"] = len(body)
                self._publish(dev, topic(dev.device_id, "telemetry"), body)
        self.telemetry_sent += per_device * len(self.devices)
        self._writers.update(d for d, dev in self.devices.items() if dev.client.want_write())
        return per_device * len(self.devices)

    def status_seq_sum(self) -> int:
        return sum(d.status_id for d in self.devices.values())


def _record(k: int, rid: int) -> dict[str, Any]:
    """One telemetry record shaped like the agent's (agent.telemetry.collector)."""
    at = _now()
    kind = ("system", "agent", "inference")[k % 3]
    if kind == "system":
        return {
            "id": rid, "at": at, "kind": "system", "cpu_percent": 12.5, "load_1m": 0.42,
            "memory": {"total_mb": 3906.0, "used_mb": 1210.4, "percent": 31.0},
            "disk": {"total_mb": 29000.0, "free_mb": 17000.0, "percent": 41.4},
            "temperature_c": None,
        }  # fmt: skip
    if kind == "agent":
        return {
            "id": rid, "at": at, "kind": "agent", "uptime_s": 3600.0,
            "models": {MODEL: VERSION}, "updates": {}, "last_updates": [],
            "outbox": {"pending": 0, "bytes": 0, "dropped": 0},
        }  # fmt: skip
    return {
        "id": rid, "at": at, "kind": "inference", "model": MODEL, "version": VERSION,
        "window_start": at, "window_end": at, "requests": 100, "errors": 0,
        "latency_ms": {"p50": 0.05, "p95": 0.1, "p99": 0.2, "max": 0.3},
        "latency_hist": [0] * 8 + [100] + [0] * 15,
    }  # fmt: skip


def _worker(
    conn: Connection,
    host: str,
    port: int,
    ids: list[str],
    trusted_pem: bytes,
    desired_qos: int,
    publish_window: int | None,
) -> None:
    """One simulator process: its devices' loop, and commands from the parent between polls."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    from edgefleet.demo.packages import host_profile

    _raise_nofile()
    key = load_pem_public_key(trusted_pem)
    sim = ScaleSim(host, port, ids, [key], profile=host_profile())
    sim.desired_qos = desired_qos
    sim.publish_window = publish_window
    last_misc = time.monotonic()
    try:
        while True:
            while conn.poll(0):
                cmd, *args = conn.recv()
                if cmd == "close":
                    return
                conn.send(_handle(sim, cmd, args))
            sim.poll(0.01)
            if time.monotonic() - last_misc > 1.0:
                for dev in sim.devices.values():
                    dev.client.loop_misc()
                last_misc = time.monotonic()
    finally:
        sim.close()


def _handle(sim: ScaleSim, cmd: str, args: list[Any]) -> Any:
    if cmd == "connect":
        t0 = time.perf_counter()
        sim.connect(timeout=float(args[0]))
        return time.perf_counter() - t0
    if cmd == "reset":
        sim.reset()
        sim.desired_bytes.clear()
        return None
    if cmd == "flood":
        return sim.flood(int(args[0]))
    if cmd == "telemetry":
        return sim.telemetry(int(args[0]))
    if cmd == "counters":
        c = sim.counters
        any_dev = next(iter(sim.devices.values()))
        presence = {
            "device_id": any_dev.device_id, "online": True, "at": _now(), "agent_version": "0.1.0",
            "execution_providers": ["CPUExecutionProvider"], "profiles": [any_dev.profile],
            "hardware": {"simulated": True}, "installed": {MODEL: {"version": VERSION}},
        }  # fmt: skip
        return {
            "desired_received": c.desired_received,
            "desired_ignored": c.desired_ignored,
            "status_sent": c.status_sent,
            "connects": c.connects,
            "telemetry_sent": sim.telemetry_sent,
            "status_seq_sum": sim.status_seq_sum(),
            "desired_bytes": list(sim.desired_bytes),
            "presence_bytes": len(json.dumps(presence)),
            "telemetry_bytes": sim.sizes.get("telemetry", 0),
            "installed": sum(d.installed.get(MODEL) == VERSION for d in sim.devices.values()),
            "connected": sum(d.client.is_connected() for d in sim.devices.values()),
            "unsent": sum(len(d.client._out_packet) for d in sim.devices.values()),
        }
    raise ValueError(f"unknown simulator command {cmd!r}")


class Swarm:
    """The simulator processes, seen from the benchmark: commands go to all, answers come back."""

    def __init__(
        self,
        ids: Sequence[str],
        ports: Sequence[int],
        procs: int,
        pem: bytes,
        desired_qos: int = 1,
        publish_window: int | None = None,
    ) -> None:
        ctx = mp.get_context("fork")  # before any thread of this process starts
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        procs = max(1, min(procs, len(ids)))
        for i in range(procs):
            part = list(ids[i::procs])
            parent, child = ctx.Pipe()
            port = ports[i % len(ports)]
            p = ctx.Process(
                target=_worker,
                args=(
                    child,
                    "127.0.0.1",
                    port,
                    part,
                    pem,
                    desired_qos,
                    None if publish_window is None else max(1, publish_window // procs),
                ),
                daemon=True,
            )
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def call(self, cmd: str, *args: Any, timeout: float = 600.0) -> list[Any]:
        for c in self.conns:
            c.send((cmd, *args))
        out = []
        for c, p in zip(self.conns, self.procs, strict=True):
            if not c.poll(timeout):
                raise TimeoutError(f"simulator {p.pid} did not answer {cmd!r} in {timeout:.0f}s")
            out.append(c.recv())
        return out

    def total(self, key: str) -> int:
        return sum(int(c[key]) for c in self.call("counters"))

    def pids(self) -> list[int]:
        return [int(p.pid) for p in self.procs]

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                c.send(("close",))
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


# --- measurements ----------------------------------------------------------------------------


class Cpu:
    """CPU seconds (user + system) of some processes, read from /proc by psutil."""

    def __init__(self, pids: Sequence[int]) -> None:
        import psutil

        self.procs = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                self.procs.append(psutil.Process(pid))

    def seconds(self) -> float:
        import psutil

        total = 0.0
        for p in self.procs:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total


@dataclass
class Phase:
    """Wall and CPU seconds of one timed phase."""

    wall_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def timed(meters: dict[str, Cpu], out: Phase) -> Iterator[None]:
    before = {k: m.seconds() for k, m in meters.items()}
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out.wall_s = time.perf_counter() - t0
        out.cpu = {k: m.seconds() - before[k] for k, m in meters.items()}


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise TimeoutError(f"{what}: not done after {timeout:.0f}s")


def rate_between(samples: list[tuple[float, int]], total: int) -> float:
    """Steady-state rate: from the sample crossing 10 % of ``total`` to the one crossing 90 %."""
    lo = next((s for s in samples if s[1] >= 0.1 * total), None)
    hi = next((s for s in samples if s[1] >= 0.9 * total), None)
    if lo is None or hi is None or hi[0] <= lo[0]:
        t0, t1 = samples[0][0], samples[-1][0]
        return (samples[-1][1] - samples[0][1]) / max(t1 - t0, 1e-6)
    return (hi[1] - lo[1]) / (hi[0] - lo[0])


def sample_until(
    count: Callable[[], int], total: int, timeout: float, what: str, every: float = 0.1
) -> tuple[float, float]:
    """Poll ``count()`` until it reaches ``total``: (seconds to all, steady-state rate/s)."""
    t0 = time.perf_counter()
    samples = [(0.0, 0)]
    while True:
        n = count()
        now = time.perf_counter() - t0
        samples.append((now, n))
        if n >= total:
            return now, rate_between(samples, total)
        if now > timeout:
            raise TimeoutError(f"{what}: {n}/{total} after {timeout:.0f}s")
        time.sleep(every)


# --- the bare-protocol baseline --------------------------------------------------------------


class Responder:
    """A plain MQTT client in the controller's place: signs and publishes desired states
    (retained, QoS 1), counts status and telemetry messages. No database, no rollout logic."""

    def __init__(self, port: int, key: Any) -> None:
        self.key = key
        self.counts = {"status": 0, "telemetry": 0}
        self._marks: dict[str, tuple[int, int, list[float]]] = {}
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-baseline-{secrets.token_hex(3)}",
            protocol=mqtt.MQTTv311,
        )
        self.client.max_inflight_messages_set(100)  # what the controller's bridge allows
        self.client.max_queued_messages_set(0)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("edgefleet/v1/devices/+/status", 1), ("edgefleet/v1/devices/+/telemetry", 1)]
        )
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(20):
            raise TimeoutError("baseline client did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[-1]
        with self._lock:
            n = self.counts[kind] = self.counts.get(kind, 0) + 1
            mark = self._marks.get(kind)
            if mark is not None and n - mark[0] >= mark[1] * (len(mark[2]) + 1) / 10:
                mark[2].append(time.perf_counter())

    def expect(self, kind: str, total: int) -> None:
        """Note when each tenth of the next ``total`` messages of ``kind`` has arrived."""
        with self._lock:
            self._marks[kind] = (self.counts.get(kind, 0), total, [])

    def steady_rate(self, kind: str, timeout: float) -> float:
        """Wait for the expected messages; their rate from the first tenth to the ninth."""
        _, total, marks = self._marks[kind]
        wait_for(lambda: len(marks) >= 10, timeout, f"baseline {kind}")
        return 0.8 * total / max(marks[8] - marks[0], 1e-6)

    def publish_desired(self, device_ids: Sequence[str], seq: int) -> None:
        from edgefleet.wire.mqtt import sign_desired

        now = datetime.now(UTC)
        for dev in device_ids:
            state = {
                "device_id": dev,
                "seq": seq,
                "issued_at": now.isoformat(),
                "expires_at": (now + timedelta(hours=1)).isoformat(),
                "models": {
                    MODEL: {
                        "version": VERSION,
                        "url": "http://127.0.0.1:9/none",
                        "sha256": "0" * 64,
                        "rollout_id": "baseline",
                    }
                },
            }
            self.client.publish(topic(dev, "desired"), sign_desired(state, self.key), 1, True)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wave_slices(ids: Sequence[str], waves: Sequence[float]) -> list[list[str]]:
    """The devices each cumulative wave adds (at least one device per wave)."""
    out, done = [], 0
    for pct in waves:
        upto = max(done + 1, round(len(ids) * pct / 100.0)) if pct < 100 else len(ids)
        upto = min(upto, len(ids))
        out.append(list(ids[done:upto]))
        done = upto
    return [w for w in out if w]


# --- services: broker(s), database, controller(s) --------------------------------------------


@dataclass
class Brokers:
    """Mosquitto, or the NATS cluster: ports for devices, one URL for the controller, pids."""

    kind: str
    ports: list[int]
    controller_url: str
    pids: list[int]
    stop: Callable[[], None]
    broker_kind: BrokerKind = "mqtt"  # edgefleet.wire.brokerkind: devices' and controller's
    publish_window: int | None = None  # devices publishing at once (ScaleSim.publish_window)
    nats_url: str | None = None  # the cluster's NATS client URLs (the controller's JetStream)


def start_brokers(kind: str, root: Path) -> Brokers:
    from urllib.parse import urlsplit

    from edgefleet import harness

    if kind == "mosquitto":
        from edgefleet.devbroker import embedded_broker

        b = embedded_broker("mosquitto", root / "mosquitto")
        b.start()
        assert b.process is not None
        return Brokers(kind, [b.port], b.url, [b.process.pid], b.stop)
    cluster_cls = getattr(harness, "NatsCluster", None)
    if cluster_cls is None:
        raise Skip("the NATS cluster needs h-nats (edgefleet.harness.NatsCluster)")
    cluster = cluster_cls(root / "nats", nodes=3).__enter__()  # starts all, waits for JetStream
    urls = list(cluster.mqtt_urls)
    ports = [int(urlsplit(u).port or 1883) for u in urls]
    pids = [int(p.pid) for p in cluster.procs if p is not None]
    # Every node's URL, as a deployment gives the controller (failover to the next node).
    return Brokers(
        kind,
        ports,
        ",".join(urls),
        pids,
        cluster.close,
        "nats",
        NATS_PUBLISH_WINDOW,
        ",".join(cluster.nats_urls),
    )


# Devices of the simulated fleet with QoS 1 reports in flight at once on the NATS cluster: about
# what three nodes on this 2-core machine store within NATS's 4 s JetStream request timeout
# (1,000-2,000 stores/s); all 3,000 at once had 2,900 connections closed mid-flood.
NATS_PUBLISH_WINDOW = 1000


def drop_jetstream_consumers(nats_url: str) -> None:
    """Delete the controller's durable JetStream consumers (cloud_controller/jetstream.py)."""
    import asyncio

    import nats

    from edgefleet.cloud_controller.jetstream import KINDS, STREAM, durable_name

    async def drop() -> None:
        nc = await nats.connect(nats_url.split(","))
        try:
            js = nc.jetstream()
            for kind in KINDS:
                with contextlib.suppress(Exception):
                    await js.delete_consumer(STREAM, durable_name(kind))
        finally:
            await nc.close()

    asyncio.run(drop())


class Skip(Exception):
    """A row that cannot run here; the message says why."""


@contextlib.contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    """A fresh database URL of this run's own; a PostgreSQL database is dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{root / 'controller.db'}"
        return
    import psycopg

    name = f"edgefleet_scale_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        raise Skip(f"no PostgreSQL at {PG_ADMIN_URL}: {e}") from e
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def has_replicas() -> bool:
    from edgefleet.cloud_controller.settings import Settings

    return "replica_id" in {f.name for f in dataclasses.fields(Settings)}


class Controllers:
    """One or more ``edgefleet controller serve`` processes on one database and broker."""

    def __init__(
        self,
        root: Path,
        db_url: str,
        broker_url: str | None,
        replicas: int,
        tag: str,
        profile: bool = False,
        broker_kind: BrokerKind = "mqtt",
        nats_url: str | None = None,
    ) -> None:
        """``nats_url``: on NATS, read status and telemetry through JetStream from there (the
        default of broker kind "nats"); None: over MQTT, every replica reading every report."""
        from edgefleet.cloud_controller import auth, db
        from edgefleet.harness import Children, free_port

        self.root, self.db_url = root, db_url
        engine = db.make_engine(db_url)
        try:
            db.upgrade(engine)
            with db.transaction(db.session_factory(engine)) as s:
                self.token = auth.create_token(s, "admin", "bench-admin")
        finally:
            engine.dispose()
        self.children = Children(root / "logs")
        self.ports: list[int] = []
        data = root / "controller"
        for r in range(replicas):
            port = free_port()
            argv = [
                sys.executable, "-m", "edgefleet", "controller", "serve",
                "--data-dir", str(data), "--db", db_url,
                "--packages", str(data / "packages"),
                "--trusted-key", str(root / "keys" / "packager.pub"),
                "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
            if broker_url is not None:
                argv += ["--broker", broker_url]
            if profile:  # the same command under the stack sampler (see `_sample_main`)
                out = root / f"stacks-{r}.json"
                argv = [sys.executable, "-m", "bench.bench_scale", "_sample", str(out), *argv[1:]]
            env = {
                "EDGEFLEET_CONTROLLER_DATA_DIR": str(data),
                "EDGEFLEET_CONTROLLER_MQTT_CLIENT_ID": f"edgefleet-controller-{tag}",
                # On NATS: MQTT 3.1.1 and plain subscriptions from the first CONNECT, with no
                # 5 s probe for shared subscriptions during which reports would go unread.
                "EDGEFLEET_CONTROLLER_BROKER_KIND": broker_kind,
            }
            if broker_kind == "nats":
                env["EDGEFLEET_CONTROLLER_NATS_URL"] = nats_url or ""
                env["EDGEFLEET_CONTROLLER_JETSTREAM_INGEST"] = "1" if nats_url else "0"
            if replicas > 1:
                env["EDGEFLEET_CONTROLLER_REPLICA_ID"] = f"{tag}-r{r}"
                argv += ["--replica-id", f"{tag}-r{r}"]
            self.children.spawn(f"controller-{r}", argv, env)
            self.ports.append(port)
        for r, port in enumerate(self.ports):
            deadline = time.monotonic() + 90
            while not self._healthy(port):
                if not self.children.alive(f"controller-{r}"):
                    raise RuntimeError(
                        "controller exited:\n" + self.children.log_tail(f"controller-{r}")
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError("controller not healthy after 90 s")
                time.sleep(0.2)
        self.conns = threading.local()

    @staticmethod
    def _healthy(port: int) -> bool:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            ok = c.getresponse().status == 200
            c.close()
            return ok
        except OSError:
            return False

    def pids(self) -> list[int]:
        return [p.pid for p in self.children.procs.values()]

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None) -> Any:
        """The API of the first replica over a kept-alive connection (one per thread)."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = "application/octet-stream" if raw else "application/json"
        for attempt in (1, 2):
            conn = getattr(self.conns, "c", None)
            if conn is None:
                conn = self.conns.c = http.client.HTTPConnection("127.0.0.1", self.ports[0], 120)
            try:
                conn.request(method, path, body=data, headers=headers)
                r = conn.getresponse()
                payload = r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()  # a kept-alive connection the server had closed: a new one
                self.conns.c = None
                if attempt == 2:
                    raise
                continue
            if r.will_close:
                conn.close()
                self.conns.c = None
            if r.status >= 400:
                raise ApiError(r.status, f"{method} {path}: HTTP {r.status}: {payload[:300]!r}")
            return json.loads(payload) if payload else None
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.children.close()


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DbProbe:
    """Counts in the controller's database, read from this process (what is committed)."""

    def __init__(self, url: str) -> None:
        from edgefleet.cloud_controller import db

        self.url = url
        self.engine = db.make_engine(url)

    def scalar(self, sql: str) -> int:
        from sqlalchemy import text

        with self.engine.connect() as c:
            return int(c.execute(text(sql)).scalar() or 0)

    def online(self) -> int:
        return self.scalar("SELECT count(*) FROM devices WHERE online")

    def status_seq_sum(self) -> int:
        return self.scalar("SELECT coalesce(sum(last_status_seq), 0) FROM devices")

    def telemetry_rows(self) -> int:
        return self.scalar("SELECT count(*) FROM telemetry_records")

    def telemetry_bytes(self) -> int:
        """Bytes the telemetry table (with its indexes) takes; the whole file on SQLite."""
        if self.url.startswith("sqlite"):
            return self.scalar("PRAGMA page_count") * self.scalar("PRAGMA page_size")
        return self.scalar("SELECT pg_total_relation_size('telemetry_records')")

    def close(self) -> None:
        self.engine.dispose()


# --- the scenario ----------------------------------------------------------------------------


@dataclass
class Baseline:
    rollout: Phase
    status_rate: float
    telemetry_rate: float
    status_msgs: int
    telemetry_msgs: int


@dataclass
class Row:
    broker: str
    db: str
    replicas: int
    devices: int
    register_s: float = 0.0
    online_s: float = 0.0
    rollout: Phase = field(default_factory=Phase)
    phase: str = ""
    status: Phase = field(default_factory=Phase)
    status_rate: float = 0.0
    telemetry: Phase = field(default_factory=Phase)
    telemetry_rate: float = 0.0
    telemetry_rows: int = 0
    telemetry_db_bytes: int = 0
    skipped: str = ""
    ingest: str = ""  # NATS: "jetstream" (shared durable consumers) or "mqtt" (every replica)


@dataclass
class Sizes:
    connect_s: float = 0.0
    connects_per_s: float = 0.0
    desired_bytes_mean: float = 0.0
    desired_bytes_max: int = 0
    presence_bytes: int = 0
    telemetry_bytes: int = 0
    status_bytes: int = 0
    broker_rss_per_device: float = 0.0  # bytes of broker memory per connected device


def rss(pids: Sequence[int]) -> int:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


@dataclass
class Config:
    devices: int
    procs: int
    flood: int
    telemetry: int
    timeout: float
    register: bool
    profile: bool = False
    nats_ingest: tuple[str, ...] = ("jetstream",)  # NATS rows: one per way of reading reports


def make_package(root: Path, key_path: Path) -> Path:
    """A real signed package of a tiny ONNX model: the devices never run it, the controller
    verifies it on upload like any other."""
    import onnx
    from onnx import TensorProto, helper

    from edgefleet.demo.packages import host_profile
    from edgefleet.keys import load_private_key
    from edgefleet.wire.package import build_package

    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "identity",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    onnx.save(model, src / "model.onnx")
    manifest = {
        "format": "edgefleet.package/v1",
        "name": MODEL,
        "version": VERSION,
        "profile": host_profile(),
        "min_agent_version": "0.1.0",
        "model": {"file": "model.onnx", "external_data": []},
        "io": {
            "inputs": [{"name": "X", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": "Y", "dtype": "float32", "shape": [None, 4]}],
        },
        "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
        "cpu_fallback": True,
        "gates": {"max_p95_ms": 1000.0, "max_memory_mb": 512.0},
        "validation": {"agreement": 1.0, "max_abs_error": 0.0},
        "benchmark": {"provider": "CPUExecutionProvider", "p50_ms": 0.05, "p95_ms": 0.1},
        "quantization": {"recipe": {"kind": "none"}},
        "lineage": {"source_sha256": None},
    }
    return build_package(
        root / "packages", manifest, {"model.onnx": src / "model.onnx"}, load_private_key(key_path)
    )


def run_baseline(
    swarm: Swarm,
    brokers: Brokers,
    ids: list[str],
    key: Any,
    cfg: Config,
    say: Callable[[str], None],
) -> Baseline:
    meters = {
        "broker": Cpu(brokers.pids),
        "sims": Cpu(swarm.pids()),
        "responder": Cpu([os.getpid()]),
    }
    responder = Responder(brokers.ports[0], key)
    try:
        rollout = Phase()
        with timed(meters, rollout):
            want = 0
            for wave in wave_slices(ids, WAVES):
                responder.publish_desired(wave, seq=1)
                want += len(SUCCESS_PATH) * len(wave)
                wait_for(lambda w=want: responder.counts["status"] >= w, cfg.timeout, "baseline")  # type: ignore[misc]
        say(f"  baseline rollout {rollout.wall_s:.2f}s")
        sent = cfg.flood * len(ids)
        responder.expect("status", sent)
        swarm.call("flood", cfg.flood)
        status_rate = responder.steady_rate("status", cfg.timeout)
        tsent = cfg.telemetry * len(ids)
        responder.expect("telemetry", tsent)
        swarm.call("telemetry", cfg.telemetry)
        tel_rate = responder.steady_rate("telemetry", cfg.timeout)
        say(f"  baseline status {status_rate:,.0f}/s, telemetry {tel_rate:,.0f} msg/s")
        return Baseline(rollout, status_rate, tel_rate, sent, tsent)
    finally:
        responder.close()


def run_controller(
    swarm: Swarm,
    brokers: Brokers,
    ids: list[str],
    root: Path,
    db_kind: str,
    replicas: int,
    cfg: Config,
    say: Callable[[str], None],
    ingest: str = "",
) -> Row:
    row = Row(brokers.kind, db_kind, replicas, len(ids), ingest=ingest)
    if replicas > 1 and db_kind != "postgres":
        row.skipped = "replicas share a PostgreSQL database"
        return row
    if replicas > 1 and not has_replicas():
        row.skipped = "replicas need h-replicas (no Settings.replica_id in this controller)"
        return row
    tag = f"{brokers.kind}-{db_kind}-{replicas}-{secrets.token_hex(2)}"
    swarm.call("reset")
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(database(db_kind, root / tag))
        except Skip as e:
            row.skipped = str(e)
            return row
        (root / tag / "keys").mkdir(parents=True, exist_ok=True)
        for name in ("packager.pub",):
            (root / tag / "keys" / name).write_bytes((root / "keys" / name).read_bytes())
        ctl_keys = root / tag / "controller" / "keys"
        ctl_keys.mkdir(parents=True, exist_ok=True)
        for name in ("controller.key", "controller.pub"):
            (ctl_keys / name).write_bytes((root / "controller" / "keys" / name).read_bytes())
            (ctl_keys / name).chmod(0o600)
        n = len(ids)
        if cfg.register:
            # Devices are registered before the controller's bridge hears of them, as in a
            # deployment where credentials come first: a registration racing the insert of a
            # device's first presence is refused (HTTP 500), and on PostgreSQL that presence is
            # lost (see the report of this benchmark).
            reg = Controllers(root / tag, url, None, 1, f"{tag}-register")
            try:
                t0 = time.perf_counter()

                def register(part: list[str]) -> None:
                    for dev in part:
                        reg.call("POST", "/api/v1/devices", {"device_id": dev, "groups": ["scale"]})

                with ThreadPoolExecutor(4) as pool:
                    list(pool.map(register, [ids[i::4] for i in range(4)]))
                row.register_s = time.perf_counter() - t0
            finally:
                reg.close()
            say(f"  registered {n} devices through the API in {row.register_s:.1f}s")
        ctls = Controllers(
            root / tag,
            url,
            brokers.controller_url,
            replicas,
            tag,
            cfg.profile,
            brokers.broker_kind,
            brokers.nats_url if ingest == "jetstream" else None,
        )
        if ingest == "jetstream" and brokers.nats_url:
            # after the controllers stopped: the durable consumers would keep every report of
            # the rows that follow on this cluster for the next JetStream row to work off
            stack.callback(drop_jetstream_consumers, brokers.nats_url)
        stack.callback(ctls.close)
        t0 = time.perf_counter()  # healthy: from here the bridge reads the retained presences
        probe = DbProbe(url)
        stack.callback(probe.close)
        meters = {
            "controller": Cpu(ctls.pids()),
            "broker": Cpu(brokers.pids),
            "sims": Cpu(swarm.pids()),
        }
        wait_for(lambda: probe.online() >= n, cfg.timeout, "devices online", every=0.2)
        row.online_s = time.perf_counter() - t0
        ctls.call(
            "POST",
            "/api/v1/packages",
            raw=make_package(root / tag, root / "keys" / "packager.key").read_bytes(),
        )
        target = {"groups": ["scale"]} if cfg.register else {"device_ids": ids}
        body = {
            "model": MODEL,
            "version": VERSION,
            "target": target,
            "waves": list(WAVES),
            "device_timeout_s": cfg.timeout,
            "max_retries": 0,
            "abort_failure_pct": 50.0,
            "seed": 7,
        }
        phase = {"phase": ""}

        def finished() -> bool:
            rows = ctls.call("GET", "/api/v1/rollouts")
            phase["phase"] = rows[0]["phase"] if rows else ""
            return phase["phase"] in ("succeeded", "aborted", "cancelled")

        with timed(meters, row.rollout):
            ctls.call("POST", "/api/v1/rollouts", body)
            wait_for(finished, cfg.timeout, "controller rollout", every=0.25)
        row.phase = phase["phase"]
        say(f"  rollout {row.phase} in {row.rollout.wall_s:.2f}s")

        base_seq = probe.status_seq_sum()
        with timed(meters, row.status):
            sent = sum(swarm.call("flood", cfg.flood))
            target_sum = sum(c["status_seq_sum"] for c in swarm.call("counters"))
            # every report raises its device's last seq by one: the sum counts committed ones
            _, row.status_rate = sample_until(
                lambda: probe.status_seq_sum() - base_seq,
                target_sum - base_seq,
                cfg.timeout,
                "controller status flood",
            )
        base_rows, base_bytes = probe.telemetry_rows(), probe.telemetry_bytes()
        with timed(meters, row.telemetry):
            tsent = sum(swarm.call("telemetry", cfg.telemetry))
            _, rate = sample_until(
                lambda: (probe.telemetry_rows() - base_rows) // TELEMETRY_RECORDS,
                tsent,
                cfg.timeout,
                "controller telemetry",
            )
        row.telemetry_rate = rate
        row.telemetry_rows = probe.telemetry_rows() - base_rows
        row.telemetry_db_bytes = probe.telemetry_bytes() - base_bytes
        say(
            f"  status {row.status_rate:,.0f}/s ({sent} msgs), telemetry {rate:,.0f} msg/s"
            f" ({row.telemetry_rows} rows, {row.telemetry_db_bytes / max(row.telemetry_rows, 1):.0f} B/row)"
        )
    if cfg.profile:
        print_profile(root / tag, say)
    return row


def print_profile(root: Path, say: Callable[[str], None], top: int = 14) -> None:
    """The busiest controller threads and the functions they spent their samples in."""
    for path in sorted(root.glob("stacks-*.json")):
        report = json.loads(path.read_text())
        total = sum(t["samples"] for t in report.values()) or 1
        for name, t in report.items():
            if t["samples"] < 0.02 * total:
                continue
            say(f"  profile {path.stem} thread {name}: {t['samples']} busy samples (5 ms)")
            for fn, n in t["inclusive"][:top]:
                say(f"    {100 * n / t['samples']:5.1f}%  {fn}")
            say("    top frames: " + ", ".join(f"{fn} {n}" for fn, n in t["own"][:6]))


def run_broker(
    kind: str, root: Path, cfg: Config, dbs: list[str], replicas: int, say: Callable[[str], None]
) -> tuple[Baseline | None, list[Row], Sizes]:
    from edgefleet.keys import generate_keypair, load_private_key

    root.mkdir(parents=True, exist_ok=True)
    generate_keypair(root / "keys", "packager")
    generate_keypair(root / "controller" / "keys", "controller")
    pem = (root / "controller" / "keys" / "controller.pub").read_bytes()
    ids = [f"sim-{i:05d}" for i in range(cfg.devices)]
    sizes = Sizes()
    try:
        brokers = start_brokers(kind, root)
    except Skip as e:
        return None, [Row(kind, "-", 1, cfg.devices, skipped=str(e))], sizes
    swarm = Swarm(
        ids,
        brokers.ports,
        cfg.procs,
        pem,
        device_subscription_qos(brokers.broker_kind),
        brokers.publish_window,
    )
    try:
        say(f"{kind}: connecting {cfg.devices} devices in {len(swarm.procs)} processes …")
        rss0 = rss(brokers.pids)
        times = swarm.call("connect", cfg.timeout)
        sizes.broker_rss_per_device = (rss(brokers.pids) - rss0) / cfg.devices
        sizes.connect_s = max(times)
        sizes.connects_per_s = cfg.devices / sizes.connect_s
        say(
            f"  connected in {sizes.connect_s:.1f}s ({sizes.connects_per_s:,.0f}/s);"
            f" broker memory +{sizes.broker_rss_per_device / 1024:.1f} KiB per device"
        )
        key = load_private_key(root / "controller" / "keys" / "controller.key")
        try:
            baseline = run_baseline(swarm, brokers, ids, key, cfg, say)
        except TimeoutError as e:  # the bare protocol did not get through: no row can run
            say(f"  failed: {e}")
            return None, [Row(kind, "-", 1, cfg.devices, skipped=f"failed: {e}")], sizes
        counters = swarm.call("counters")
        sizes.presence_bytes = counters[0]["presence_bytes"]
        sizes.telemetry_bytes = counters[0]["telemetry_bytes"]
        rows = []
        plan = [(d, 1) for d in dbs] + ([("postgres", replicas)] if replicas > 1 else [])
        ingests = cfg.nats_ingest if brokers.broker_kind == "nats" else ("",)
        for db_kind, r in plan:
            for ingest in ingests:
                say(f"{kind} + controller on {db_kind} ×{r} {ingest}…")
                try:
                    rows.append(
                        run_controller(swarm, brokers, ids, root, db_kind, r, cfg, say, ingest)
                    )
                except (TimeoutError, RuntimeError) as e:
                    say(f"  failed: {e}")
                    for log in sorted(root.glob("*/logs/controller-*.log")):
                        say(f"  {log}:\n" + log.read_text(errors="replace")[-3000:])
                    rows.append(
                        Row(kind, db_kind, r, cfg.devices, skipped=f"failed: {e}", ingest=ingest)
                    )
            got = [b for c in swarm.call("counters") for b in c["desired_bytes"]]
            if got:
                sizes.desired_bytes_mean = sum(got) / len(got)
                sizes.desired_bytes_max = max(got)
        return baseline, rows, sizes
    finally:
        swarm.close()
        brokers.stop()


def status_bytes() -> int:
    body = {
        "id": 7, "seq": 7, "device_id": "sim-00000", "at": _now(), "kind": "update",
        "model": MODEL, "version": VERSION, "rollout_id": "r-0123456789ab", "state": "COMMITTED",
        "reason_code": None, "reason": None, "desired_seq": 3,
        "figures": {"p50_ms": 0.05, "p95_ms": 0.1},
    }  # fmt: skip
    return len(json.dumps(body))


def run_ingest_only(
    db_kind: str, root: Path, n: int, rounds: int, say: Callable[[str], None]
) -> None:
    """The bridge worker alone: ``MqttBridge._process`` fed batches of the simulator's status
    reports and telemetry envelopes directly (no broker, no simulators, no acks), on a real
    database; its CPU per message, the part of the controller's cost that batching changes."""
    from datetime import timedelta

    from cryptography.hazmat.primitives.asymmetric import ec

    from edgefleet.cloud_controller import db
    from edgefleet.cloud_controller.desired import Signer
    from edgefleet.cloud_controller.mqtt_bridge import MqttBridge
    from edgefleet.cloud_controller.rollouts import RolloutService

    with database(db_kind, root) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        factory = db.session_factory(engine)
        signer = Signer(ec.generate_private_key(ec.SECP256R1()), timedelta(days=1))
        bridge = MqttBridge(
            "mqtt://127.0.0.1:1", factory, RolloutService(factory, signer, "http://x"), acks=False
        )
        ids = [f"sim-{i:05d}" for i in range(n)]
        presence = {"online": True, "agent_version": "0.1.0", "hardware": {"simulated": True}}
        bridge._process([(d, "presence", json.dumps(presence).encode()) for d in ids])
        counters = dict.fromkeys(ids, 0)

        def status(dev: str) -> bytes:
            counters[dev] += 1
            body = {
                "seq": counters[dev], "device_id": dev, "at": _now(), "kind": "update",
                "model": MODEL, "version": VERSION, "state": "DOWNLOADING", "desired_seq": 3,
            }  # fmt: skip
            return json.dumps(body).encode()

        def telemetry(dev: str) -> bytes:
            recs = []
            for k in range(TELEMETRY_RECORDS):
                counters[dev] += 1
                recs.append(_record(k, counters[dev]))
            return json.dumps({"device_id": dev, "records": recs}).encode()

        for kind, make in (("status", status), ("telemetry", telemetry)):
            msgs = [(d, kind, make(d)) for _ in range(rounds) for d in ids]
            cpu0, t0 = time.process_time(), time.perf_counter()
            for i in range(0, len(msgs), bridge.batch_size):
                bridge._process(msgs[i : i + bridge.batch_size])
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
            say(
                f"  {db_kind} {kind}: {len(msgs)} messages, {cpu / len(msgs) * 1e6:.0f} µs CPU"
                f" each ({len(msgs) / wall:,.0f}/s wall, load {os.getloadavg()[0]:.1f});"
                f" dropped {dict(bridge.stats.dropped)}"
            )
        engine.dispose()


def run_rollout_only(db_kind: str, root: Path, n: int, say: Callable[[str], None]) -> None:
    """The rollout service alone (`RolloutService`: the engine, its database writes, every
    desired state signed): a three-wave rollout (1/10/100 %) of ``n`` devices, each moved by
    the seven status reports of an update, fed in batches of 100 as the bridge hands them
    over; time is a counter (one tick per round). Its CPU per device, at several ``n``, shows
    whether a batch costs what its reports touch or what the fleet holds."""
    from datetime import UTC, datetime, timedelta

    from cryptography.hazmat.primitives.asymmetric import ec

    from edgefleet.cloud_controller import db, devices
    from edgefleet.cloud_controller import rollout_engine as E
    from edgefleet.cloud_controller.desired import Signer
    from edgefleet.cloud_controller.models import Package
    from edgefleet.cloud_controller.rollouts import RolloutService

    states = ("DOWNLOADING", "VERIFYING", "INSTALLING", "VALIDATING", "ACTIVATING",
              "PROBATION", "COMMITTED")  # fmt: skip
    with database(db_kind, root) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        factory = db.session_factory(engine)
        ids = [f"sim-{i:05d}" for i in range(n)]
        with db.transaction(factory) as s:
            for v in (VERSION, "2.0.0"):
                s.add(
                    Package(
                        name=MODEL, version=v, profile="cpu-x86_64", filename=f"{v}.efpkg",
                        sha256=v[0] * 64, size=10, key_id="k", manifest={},
                        uploaded_at=datetime.now(UTC), uploaded_by="bench",
                    )
                )  # fmt: skip
            for d in ids:
                devices.apply_presence(
                    s, d, {"online": True, "profiles": ["cpu-x86_64"],
                           "installed": {MODEL: {"version": VERSION}}},
                )  # fmt: skip
        clock = [2_000_000_000.0]
        svc = RolloutService(
            factory,
            Signer(ec.generate_private_key(ec.SECP256R1()), timedelta(hours=2)),
            "http://bench",
            publish=lambda _t, _p: None,
            clock=lambda: clock[0],
            health=None,
        )
        body = {"model": MODEL, "version": "2.0.0", "target": {"device_ids": ids},
                "waves": [1, 10, 100], "seed": 1}  # fmt: skip
        reports = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        st: E.RolloutState | None = svc.create(body, "bench")
        rid = st.spec.rollout_id
        while st is not None and st.phase in (E.Phase.RUNNING, E.Phase.SOAKING):
            moving = sorted(d for d, p in st.devices.items() if p.state == E.DevState.IN_PROGRESS)
            batch = [(MODEL, E.StatusReport(d, "2.0.0", s)) for s in states for d in moving]
            for i in range(0, len(batch), 100):
                svc.on_status(batch[i : i + 100])
            reports += len(batch)
            clock[0] += 1
            svc.tick()
            st = svc.get_state(rid)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        say(
            f"  {db_kind} rollout of {n} devices: {st.phase if st else None}, {reports} reports,"
            f" {cpu:.2f} s CPU: {cpu / n * 1e3:.2f} ms per device, {cpu / max(1, reports) * 1e6:.0f}"
            f" µs per report ({wall:.1f} s wall, load {os.getloadavg()[0]:.1f})"
        )
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="bench_scale", description=__doc__)
    parser.add_argument("--devices", type=int, default=None, help="default 10000 (500 --quick)")
    parser.add_argument("--procs", type=int, default=4, help="simulator processes")
    parser.add_argument("--broker", choices=("mosquitto", "nats", "both"), default="mosquitto")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument("--replicas", type=int, choices=(1, 2), default=1)
    parser.add_argument(
        "--nats-ingest",
        choices=("jetstream", "mqtt", "both"),
        default="jetstream",
        help="NATS: the controller reads reports through JetStream (shared) or MQTT (each replica"
        " everything), or a row of each",
    )
    parser.add_argument("--quick", action="store_true", help="500 devices, smaller floods")
    parser.add_argument("--flood", type=int, default=None, help="status reports per device")
    parser.add_argument("--telemetry", type=int, default=None, help="envelopes per device")
    parser.add_argument("--no-register", action="store_true", help="devices join by presence")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--profile", action="store_true", help="sample the controller's stacks; print the top"
    )
    parser.add_argument(
        "--ingest-only",
        action="store_true",
        help="the bridge worker alone, fed --devices x 10 messages of each kind directly",
    )
    parser.add_argument(
        "--rollout-only",
        action="store_true",
        help="the rollout service alone: a 1/10/100 %% rollout of --devices, reports fed directly",
    )
    args = parser.parse_args(argv)
    n = args.devices or (500 if args.quick else 10_000)
    budget = 20_000 if args.quick else 50_000  # messages per flood
    cfg = Config(
        devices=n,
        procs=args.procs,
        flood=args.flood or max(2, budget // n),
        telemetry=args.telemetry or max(2, budget // n),
        timeout=args.timeout,
        register=not args.no_register,
        profile=args.profile,
        nats_ingest=("mqtt", "jetstream") if args.nats_ingest == "both" else (args.nats_ingest,),
    )
    console = Console(width=140)
    say = console.print
    if args.rollout_only:
        with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
            for db_kind in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
                try:
                    run_rollout_only(db_kind, Path(tmp) / db_kind, args.devices or 1000, say)
                except Skip as e:
                    say(f"  {db_kind}: skipped ({e})")
        return 0
    if args.ingest_only:
        with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
            for db_kind in ["sqlite", "postgres"] if args.db == "both" else [args.db]:
                try:
                    run_ingest_only(db_kind, Path(tmp) / db_kind, args.devices or 1000, 10, say)
                except Skip as e:
                    say(f"  {db_kind}: skipped ({e})")
        return 0
    _raise_nofile()
    brokers = ["mosquitto", "nats"] if args.broker == "both" else [args.broker]
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    load = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for kind in brokers:
            results.append(
                (kind, *run_broker(kind, Path(tmp) / kind, cfg, dbs, args.replicas, say))
            )
    table = Table(title=f"scale: {n} devices, waves {'/'.join(f'{w:g}' for w in WAVES)} %")
    cols = (
        "broker", "db", "ctl", "rollout s", "base s", "ratio", "ctl CPU", "brk CPU",
        "status/s", "base", "b/c", "telem/s", "base", "b/c",
    )  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    ok = True
    out: dict[str, Any] = {"devices": n, "procs": cfg.procs, "loadavg_start": load, "rows": []}
    notes: list[str] = []
    for kind, baseline, rows, sizes in results:
        for r in rows:
            out["rows"].append(
                {**dataclasses.asdict(r), "baseline": baseline and dataclasses.asdict(baseline)}
            )
            if r.skipped:
                notes.append(f"{kind} {r.db} ×{r.replicas} {r.ingest}: {r.skipped}")
                ok = ok and not r.skipped.startswith("failed")
                continue
            assert baseline is not None
            ok = ok and r.phase == "succeeded"
            table.add_row(
                kind[:4], r.db[:6], f"×{r.replicas}{' ' + r.ingest[:4] if r.ingest else ''}",
                f"{r.rollout.wall_s:.2f}", f"{baseline.rollout.wall_s:.2f}",
                f"{r.rollout.wall_s / baseline.rollout.wall_s:.1f}x",
                f"{r.rollout.cpu['controller']:.1f}", f"{r.rollout.cpu['broker']:.1f}",
                f"{r.status_rate:,.0f}", f"{baseline.status_rate:,.0f}",
                f"{baseline.status_rate / max(r.status_rate, 1e-9):.2f}x",
                f"{r.telemetry_rate:,.0f}", f"{baseline.telemetry_rate:,.0f}",
                f"{baseline.telemetry_rate / max(r.telemetry_rate, 1e-9):.2f}x",
            )  # fmt: skip
            per_row = r.telemetry_db_bytes / max(r.telemetry_rows, 1)
            tel_msgs = max(r.telemetry_rows / TELEMETRY_RECORDS, 1)
            notes.append(
                f"{kind} {r.db} ×{r.replicas} {r.ingest}: {r.phase}; registered {n} in"
                f" {r.register_s:.1f}s"
                f"; all online {r.online_s:.1f}s after the controller was up;"
                f" {per_row:.0f} DB bytes per telemetry record; controller CPU"
                f" {r.telemetry.cpu['controller'] / tel_msgs * 1e6:.0f} µs per telemetry message,"
                f" {r.status.cpu['controller'] / max(cfg.flood * n, 1) * 1e6:.0f} µs per status;"
                f" presence ingest {n / max(r.online_s, 1e-9):,.0f}/s; broker CPU"
                f" {r.status.cpu['broker'] / max(cfg.flood * n, 1) * 1e6:.0f} µs per status,"
                f" {r.telemetry.cpu['broker'] / tel_msgs * 1e6:.0f} µs per telemetry message"
            )
            if n >= 10_000:
                verdict = "meets" if r.rollout.wall_s <= 60 else "misses"
                notes.append(f"  rollout {r.rollout.wall_s:.1f}s {verdict} the 60 s target")
        out.setdefault("sizes", {})[kind] = {
            **dataclasses.asdict(sizes),
            "status_bytes": status_bytes(),
        }
        notes.append(
            f"{kind}: {sizes.connects_per_s:,.0f} connects/s; desired state"
            f" {sizes.desired_bytes_mean:.0f} B (max {sizes.desired_bytes_max}); presence"
            f" {sizes.presence_bytes} B; status {status_bytes()} B; telemetry envelope"
            f" {sizes.telemetry_bytes} B ({TELEMETRY_RECORDS} records)"
        )
    console.print(table)
    console.print(
        "rollout s: create -> succeeded; base s: a plain MQTT client publishing the same signed"
        " desired states in the same waves and waiting for every status. CPU: seconds during the"
        " rollout. status/s, telem/s: steady rate (10..90 % of a flood) committed to the database;"
        " base: received by the plain client; b/c = base/controller (target <= 1.5x)."
    )
    for line in notes:
        console.print(line)
    out["loadavg_end"] = os.getloadavg()
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0 if ok else 1


# --- where the controller spends its time ----------------------------------------------------

IDLE_FRAMES = frozenset({"wait", "select", "poll", "_worker", "accept", "sleep", "get", "_loop"})


def _sample_main(out: str, argv: list[str]) -> None:
    """Run ``python ARGV`` (``-m module ...``) in this process while a thread samples every
    other thread's Python stack every 5 ms; at exit, write the busiest functions per thread
    (inclusive samples, and the top frame's) to ``out`` as JSON. py-spy without py-spy."""
    import atexit
    import collections
    import runpy

    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    own: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    busy: collections.Counter[str] = collections.Counter()

    def where(code: Any) -> str:
        return f"{Path(code.co_filename).name}:{code.co_firstlineno}:{code.co_name}"

    def ours(code: Any) -> bool:  # the project's code, not a library's or the stdlib's
        name = code.co_filename
        return not (name.startswith("<") or "site-packages" in name or "/lib/python3" in name)

    def sample() -> None:
        me = threading.get_ident()
        while True:
            time.sleep(0.005)
            names = {t.ident: t.name for t in threading.enumerate()}
            for tid, frame in sys._current_frames().items():
                if tid == me or frame.f_code.co_name in IDLE_FRAMES:
                    continue
                name = names.get(tid, "?").split(" ")[0]
                busy[name] += 1
                own[name][where(frame.f_code)] += 1
                seen = set()
                f: Any = frame
                while f is not None:
                    if ours(f.f_code) and f.f_code.co_name != "<module>":
                        seen.add(where(f.f_code))
                    f = f.f_back
                inclusive[name].update(seen)

    def dump() -> None:
        report = {
            name: {
                "samples": n,
                "inclusive": inclusive[name].most_common(40),
                "own": own[name].most_common(20),
            }
            for name, n in busy.most_common()
        }
        Path(out).write_text(json.dumps(report, indent=1))

    atexit.register(dump)
    # uvicorn re-raises SIGTERM after its shutdown under the handler it found: exit normally
    import signal

    signal.signal(signal.SIGTERM, lambda *_a: sys.exit(0))
    threading.Thread(target=sample, name="bench-sampler", daemon=True).start()
    if argv[:1] != ["-m"]:
        raise SystemExit("usage: python -m bench.bench_scale _sample OUT -m MODULE ARGS...")
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_sample"]:
        _sample_main(sys.argv[2], sys.argv[3:])
        raise SystemExit(0)
    raise SystemExit(main())
