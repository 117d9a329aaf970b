"""Child processes for the top floor (the demo, the dev broker) and the tests: free ports,
children that die with their parent, waiting for a port, stopping without leftovers.

Standard library only, so that ``python -m edgefleet.devbroker`` starts quickly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


class HarnessError(RuntimeError):
    """A child process could not be started or did not come up; the message says why."""


class NotListening(HarnessError, TimeoutError):
    """Nothing listened on the awaited port in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None

    # Resolved here, in the parent: between fork and exec the child only makes the call (no
    # dlopen, whose loader lock another thread of the parent may have held at fork time).
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    sigterm = int(signal.SIGTERM)

    def _set() -> None:
        prctl(1, sigterm)  # PR_SET_PDEATHSIG

    return _set


def stop_processes(
    processes: Iterable[subprocess.Popen[bytes]], *, timeout: float = 10.0, kill: bool = False
) -> None:
    """SIGTERM (SIGKILL with ``kill``) every live one at once, wait, then SIGKILL stragglers:
    they are all gone when this returns."""
    live = [p for p in processes if p.poll() is None]
    for p in live:
        if kill:
            p.kill()
        else:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)


def terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
    stop_processes([process], timeout=timeout)


def wait_listening(
    host: str,
    port: int,
    process: subprocess.Popen[bytes] | None = None,
    *,
    timeout: float = 10.0,
    log: Path | None = None,
    name: str = "process",
) -> None:
    """Return once ``host:port`` accepts connections.

    Raises `HarnessError` (with the tail of ``log``) if ``process`` exits first, `NotListening`
    when time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise HarnessError(f"{name} exited with {process.returncode} before listening: {tail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NotListening(f"{name} not listening on {host}:{port} after {timeout:.0f}s")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C while inside, so the `finally` that stops the children runs."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Children:
    """Named child processes, each logging to ``<log_dir>/<name>.log``; `close()` stops them all.

    Every child gets SIGTERM when this process dies, however it dies (`die_with_parent`)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` as child ``name`` with ``env`` over this process's environment."""
        if self.alive(name):
            raise HarnessError(f"{name} is already running")
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                preexec_fn=die_with_parent(),
            )

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def stop(self, name: str, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop child ``name`` (SIGKILL at once with ``kill``, as a crash would)."""
        p = self.procs.get(name)
        if p is not None:
            stop_processes([p], timeout=timeout, kill=kill)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self) -> None:
        stop_processes(self.procs.values(), timeout=15.0)


# ---------------------------------------------------------------------------------------------
# A NATS Server cluster: N real nats-server processes on loopback, each with clustered JetStream
# and an MQTT listener. Devices and controllers reach any node; sessions and retained messages
# live in JetStream streams replicated across the nodes, so they survive a node's death.

NATS_SERVER = os.environ.get("EDGEFLEET_NATS_SERVER", "/usr/sbin/nats-server")


def nats_server_binary() -> str | None:
    """The nats-server executable, or None when it is not installed."""
    import shutil

    if os.path.isfile(NATS_SERVER) and os.access(NATS_SERVER, os.X_OK):
        return NATS_SERVER
    return shutil.which("nats-server")


def _mqtt_connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT (clean session, keepalive 30 s) for ``client_id``."""
    cid = client_id.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x1e"
    payload = len(cid).to_bytes(2, "big") + cid
    body = variable + payload
    assert len(body) < 128  # one-byte remaining length is enough for a probe
    return bytes([0x10, len(body)]) + body


def mqtt_probe(host: str, port: int, *, timeout: float = 3.0) -> int | None:
    """Connect with MQTT 3.1.1 and return the CONNACK return code (0: accepted), or None when
    the server closed the connection or said nothing (NATS does either while its JetStream
    cluster has no meta leader yet). Standard library only."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(_mqtt_connect_packet(f"edgefleet-probe-{os.getpid()}-{port}"))
            reply = b""
            while len(reply) < 4:
                chunk = s.recv(4 - len(reply))
                if not chunk:
                    return None
                reply += chunk
            with contextlib.suppress(OSError):
                s.sendall(b"\xe0\x00")  # DISCONNECT
            if reply[0] != 0x20 or reply[1] != 0x02:
                return None
            return reply[3]
    except OSError:
        return None


class NatsCluster:
    """``nodes`` nats-server processes routed to each other, with JetStream and MQTT on each.

    Use as a context manager; the nodes are stopped (and their stores kept under ``workdir``)
    on exit. Ports are chosen once, so `restart` brings a node back where it was, with its own
    JetStream store. `wait_ready` returns once every live node accepts an MQTT session, which on
    NATS needs an elected JetStream meta leader (MQTT sessions and retained messages are
    JetStream streams)."""

    def __init__(
        self,
        workdir: Path,
        nodes: int = 3,
        *,
        host: str = "127.0.0.1",
        cluster_name: str = "edgefleet",
        ready_timeout: float = 60.0,
        consumer_replicas: int | None = None,
        consumer_memory_storage: bool = False,
    ) -> None:
        """``consumer_replicas``: replicas of the JetStream consumer behind each QoS 1 MQTT
        subscription (default: as many as the streams, up to 3); ``consumer_memory_storage``:
        keep those consumers in memory. There is one per QoS 1 subscription; devices of a NATS
        deployment subscribe at QoS 0 and have none (`edgefleet.wire.brokerkind`), so the
        defaults only concern the controller's few, which stay replicated on every node."""
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.workdir = Path(workdir)
        self.host = host
        self.cluster_name = cluster_name
        self.ready_timeout = ready_timeout
        self.names = [f"n{i + 1}" for i in range(nodes)]
        self.client_ports = [free_port(host) for _ in self.names]
        self.cluster_ports = [free_port(host) for _ in self.names]
        self.mqtt_ports = [free_port(host) for _ in self.names]
        self.monitor_ports = [free_port(host) for _ in self.names]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes
        # Pinned, not left to NATS: it sizes the MQTT streams by the servers it sees when the
        # first MQTT client connects, and a node that connected before its routes were all up
        # created them R2 in a three-node cluster, so one dead node took the quorum with it.
        self.replicas = min(3, nodes)
        self.consumer_replicas = self.replicas if consumer_replicas is None else consumer_replicas
        if not 1 <= self.consumer_replicas <= self.replicas:
            raise ValueError(f"consumer_replicas must be 1..{self.replicas}")
        self.consumer_memory_storage = consumer_memory_storage

    # -- layout --------------------------------------------------------------------------------

    @property
    def mqtt_urls(self) -> list[str]:
        return [f"mqtt://{self.host}:{p}" for p in self.mqtt_ports]

    @property
    def nats_urls(self) -> list[str]:
        return [f"nats://{self.host}:{p}" for p in self.client_ports]

    @property
    def monitor_urls(self) -> list[str]:
        """Each node's HTTP monitoring endpoint (``/varz``, ``/jsz``, ``/connz``, ``/healthz``)."""
        return [f"http://{self.host}:{p}" for p in self.monitor_ports]

    def monitor(self, i: int, path: str, timeout: float = 5.0) -> Any:
        """GET ``path`` (e.g. ``"/jsz?consumers=true"``) from node ``i``'s monitoring endpoint,
        parsed from JSON."""
        import json
        import urllib.request

        with urllib.request.urlopen(self.monitor_urls[i] + path, timeout=timeout) as r:
            return json.loads(r.read())

    def log_path(self, i: int) -> Path:
        return self.workdir / f"{self.names[i]}.log"

    def log_tail(self, i: int, chars: int = 3000) -> str:
        path = self.log_path(i)
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def config_text(self, i: int) -> str:
        routes = ", ".join(
            f'"nats-route://{self.host}:{p}"' for j, p in enumerate(self.cluster_ports) if j != i
        )
        store = self.workdir / f"{self.names[i]}-js"
        cluster = (
            f"cluster {{\n  name: {self.cluster_name}\n"
            f"  listen: {self.host}:{self.cluster_ports[i]}\n  routes: [{routes}]\n}}\n"
            if len(self.names) > 1
            else ""
        )
        return (
            f"server_name: {self.names[i]}\n"
            f"listen: {self.host}:{self.client_ports[i]}\n"
            f"http: {self.host}:{self.monitor_ports[i]}\n"
            f'jetstream {{\n  store_dir: "{store}"\n}}\n'
            f"{cluster}"
            f"mqtt {{\n  listen: {self.host}:{self.mqtt_ports[i]}\n"
            f"  stream_replicas: {self.replicas}\n  consumer_replicas: {self.consumer_replicas}\n"
            f"  consumer_memory_storage: {str(self.consumer_memory_storage).lower()}\n}}\n"
        )

    # -- processes -----------------------------------------------------------------------------

    def start(self, i: int) -> None:
        """Start node ``i`` (no wait: see `wait_ready`)."""
        if self.alive(i):
            raise HarnessError(f"nats node {self.names[i]} is already running")
        binary = nats_server_binary()
        if binary is None:
            raise HarnessError("nats-server is not installed (apt-get install nats-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / f"{self.names[i]}.conf"
        conf.write_text(self.config_text(i))
        with open(self.log_path(i), "ab") as log:
            self.procs[i] = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent(),
            )

    def alive(self, i: int) -> bool:
        p = self.procs[i]
        return p is not None and p.poll() is None

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``, as a crash would; returns once it is gone."""
        p = self.procs[i]
        if p is not None:
            stop_processes([p], kill=True)

    def stop(self, i: int) -> None:
        """Stop node ``i`` cleanly (SIGTERM: NATS leaves the cluster in order)."""
        p = self.procs[i]
        if p is not None:
            stop_processes([p])

    def restart(self, i: int, *, wait: bool = True) -> None:
        """Bring node ``i`` back on its ports with its store (killing it first if it runs)."""
        self.kill(i)
        self.start(i)
        if wait:
            self.wait_ready([i])

    def wait_ready(self, which: Iterable[int] | None = None, timeout: float | None = None) -> None:
        """Return once each node in ``which`` (default: every live node) accepts an MQTT session.

        Raises `HarnessError` with the node's log tail if it exits or never accepts one."""
        indices = list(range(len(self.names)) if which is None else which)
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        for i in indices:
            if which is None and self.procs[i] is None:
                continue
            wait_listening(
                self.host,
                self.mqtt_ports[i],
                self.procs[i],
                timeout=max(0.1, deadline - time.monotonic()),
                log=self.log_path(i),
                name=f"nats node {self.names[i]}",
            )
            while True:
                if not self.alive(i):
                    raise HarnessError(f"nats node {self.names[i]} exited: {self.log_tail(i)}")
                if mqtt_probe(self.host, self.mqtt_ports[i]) == 0:
                    break
                if time.monotonic() > deadline:
                    raise NotListening(
                        f"nats node {self.names[i]} accepts no MQTT session (no JetStream "
                        f"meta leader?): {self.log_tail(i)}"
                    )
                time.sleep(0.2)

    def __enter__(self) -> NatsCluster:
        try:
            for i in range(len(self.names)):
                self.start(i)
            self.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        stop_processes([p for p in self.procs if p is not None])
