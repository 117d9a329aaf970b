"""Fleet benchmark: a three-wave rollout over N simulated devices, and status throughput.

``python -m bench fleet [--quick]`` (``--quick``: 100 devices; default 100 and 1,000). Each size
runs twice against the same Mosquitto broker and simulated devices: first a *baseline* with a
plain MQTT client in place of the controller (it signs every desired state and waits for every
status: the protocol's own cost), then the real controller process (SQLite, rollout engine,
MQTT bridge) running a three-wave rollout (5 %, 25 %, 100 %). Then every device floods status
messages, counted by the baseline client and by the controller's ``/metrics``.

The simulated agents: one real MQTT connection per device, all in one thread.

Each device connects with its id, publishes retained presence, subscribes to its desired state,
verifies it like the real agent (controller signature, newer seq) and answers with the status
transitions of an update (DOWNLOADING ... COMMITTED, or FAILED at VALIDATING for versions in
``fail_versions``). The sockets are driven by one selector loop (paho's external loop API), so
a thousand devices cost a thousand sockets, not a thousand threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.wire.errors import RejectError
from edgefleet.wire.mqtt import topic, verify_desired

SUCCESS_PATH = (
    "DOWNLOADING",
    "VERIFYING",
    "INSTALLING",
    "VALIDATING",
    "ACTIVATING",
    "PROBATION",
    "COMMITTED",
)
FAIL_PATH = ("DOWNLOADING", "VERIFYING", "INSTALLING", "VALIDATING", "FAILED")


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class SimDevice:
    device_id: str
    client: mqtt.Client
    profile: str
    installed: dict[str, str] = field(default_factory=dict)
    last_seq: int | None = None
    status_id: int = 0
    connected: bool = False


@dataclass
class SimCounters:
    desired_received: int = 0
    desired_ignored: int = 0
    status_sent: int = 0
    connects: int = 0


class SimFleet:
    """``SimFleet(host, port, ids, trusted).connect()``, then ``run_until(pred, timeout)``."""

    # The QoS of each device's desired-state subscription, as the agent's for the broker kind
    # (`edgefleet.wire.brokerkind.device_subscription_qos`: 0 on NATS).
    desired_qos = 1

    def __init__(
        self,
        host: str,
        port: int,
        device_ids: Sequence[str],
        trusted: Sequence[Any],
        *,
        profile: str = "cpu-x86_64",
        fail_versions: Collection[str] = (),
        agent_version: str = "0.1.0",
        credentials: Callable[[str], tuple[str, str]] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.trusted = list(trusted)
        self.fail_versions = set(fail_versions)
        self.agent_version = agent_version
        self.counters = SimCounters()
        self.selector = selectors.DefaultSelector()
        self.devices: dict[str, SimDevice] = {}
        for dev_id in device_ids:
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=dev_id,
                clean_session=True,
                protocol=mqtt.MQTTv311,
                userdata=dev_id,
            )
            if credentials is not None:
                client.username_pw_set(*credentials(dev_id))
            client.will_set(
                topic(dev_id, "presence"),
                json.dumps({"device_id": dev_id, "online": False}),
                qos=1,
                retain=True,
            )
            client.max_inflight_messages_set(0)  # unlimited: status bursts do not queue
            client.on_connect = self._on_connect
            client.on_message = self._on_message
            self.devices[dev_id] = SimDevice(dev_id, client, profile)

    # -- connection management --------------------------------------------------------------
    def connect(self, timeout: float = 60.0) -> None:
        """Open every connection and wait until all are acknowledged."""
        for dev in self.devices.values():
            dev.client.connect(self.host, self.port, keepalive=60)
            sock = dev.client.socket()
            assert sock is not None
            self.selector.register(sock, selectors.EVENT_READ, dev)
        ok = self.run_until(lambda: all(d.connected for d in self.devices.values()), timeout)
        if not ok:
            missing = sum(not d.connected for d in self.devices.values())
            raise TimeoutError(f"{missing} simulated devices not connected after {timeout}s")

    def close(self) -> None:
        for dev in self.devices.values():
            try:
                dev.client.disconnect()
                dev.client.loop_write()
            except (OSError, ValueError):
                pass
            sock = dev.client.socket()
            if sock is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.selector.unregister(sock)
        self.selector.close()

    def poll(self, timeout: float = 0.02) -> None:
        """One round of the event loop: writes, reads, keepalives."""
        for dev in self.devices.values():
            if dev.client.want_write():
                dev.client.loop_write()
        for key, _ in self.selector.select(timeout):
            dev = key.data
            dev.client.loop_read(max_packets=10)
            if dev.client.want_write():
                dev.client.loop_write()

    def run_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        last_misc = 0.0
        while time.monotonic() < deadline:
            self.poll()
            if time.monotonic() - last_misc > 1.0:
                for dev in self.devices.values():
                    dev.client.loop_misc()
                last_misc = time.monotonic()
            if predicate():
                return True
        return predicate()

    # -- behaviour --------------------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, dev_id: str, flags: Any, rc: Any, p: Any) -> None:
        dev = self.devices[dev_id]
        if rc.is_failure:
            return
        dev.connected = True
        self.counters.connects += 1
        client.subscribe(topic(dev_id, "desired"), qos=self.desired_qos)
        presence = {
            "device_id": dev_id,
            "online": True,
            "at": _now(),
            "agent_version": self.agent_version,
            "execution_providers": ["CPUExecutionProvider"],
            "profiles": [dev.profile],
            "hardware": {"simulated": True},
            "installed": {m: {"version": v} for m, v in dev.installed.items()},
        }
        client.publish(topic(dev_id, "presence"), json.dumps(presence), qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, dev_id: str, msg: mqtt.MQTTMessage) -> None:
        dev = self.devices[dev_id]
        if not msg.payload:
            return
        self.counters.desired_received += 1
        try:
            state = verify_desired(
                bytes(msg.payload), self.trusted, device_id=dev_id, last_seq=dev.last_seq
            )
        except RejectError:
            self.counters.desired_ignored += 1
            return
        dev.last_seq = int(state["seq"])
        for name, spec in sorted(state["models"].items()):
            version = str(spec["version"])
            rollout_id = spec.get("rollout_id")
            if dev.installed.get(name) == version:
                self._status(dev, name, version, rollout_id, "COMMITTED", "already")
                continue
            failing = version in self.fail_versions
            for st in FAIL_PATH if failing else SUCCESS_PATH:
                reason = "latency gate: p95 above max_p95_ms" if st == "FAILED" else None
                code = "gate_failed" if st == "FAILED" else None
                self._status(dev, name, version, rollout_id, st, code, reason)
            if not failing:
                dev.installed[name] = version

    def reset(self) -> None:
        """Forget installed versions and seqs (between the baseline and the controller run)."""
        for dev in self.devices.values():
            dev.installed.clear()
            dev.last_seq = None

    def flood(self, per_device: int) -> int:
        """Queue ``per_device`` status messages on every device; returns how many."""
        for dev in self.devices.values():
            for _ in range(per_device):
                self._status(dev, "bench-flood", "0.0.1", None, "IDLE", None)
        return per_device * len(self.devices)

    def _status(
        self,
        dev: SimDevice,
        model: str,
        version: str,
        rollout_id: Any,
        state: str,
        code: str | None,
        reason: str | None = None,
    ) -> None:
        dev.status_id += 1
        body = {
            "id": dev.status_id,
            "seq": dev.status_id,
            "device_id": dev.device_id,
            "at": _now(),
            "kind": "update",
            "model": model,
            "version": version,
            "rollout_id": rollout_id,
            "state": state,
            "reason_code": code,
            "reason": reason,
            "desired_seq": dev.last_seq,
        }
        if state == "COMMITTED" and code is None:
            body["figures"] = {"p50_ms": 0.05, "p95_ms": 0.1}
        self._publish(dev, topic(dev.device_id, "status"), json.dumps(body))
        self.counters.status_sent += 1

    def _publish(self, dev: SimDevice, t: str, body: str) -> None:
        """Send one QoS 1 report of ``dev`` (a subclass may hold it back: bench_scale)."""
        dev.client.publish(t, body, qos=1)


# --- the benchmark ---------------------------------------------------------------------------


class StatusCounter:
    """A plain MQTT client in the controller's place: counts statuses, publishes desired."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="bench-baseline", protocol=mqtt.MQTTv311
        )
        self.client.max_inflight_messages_set(0)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            "edgefleet/v1/devices/+/status", qos=1
        )
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not ready.wait(10):
            raise TimeoutError("baseline client did not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.count += 1

    def publish_desired(self, device_ids: Sequence[str], version: str, key: Any) -> None:
        from datetime import timedelta

        from edgefleet.wire.mqtt import sign_desired

        now = datetime.now(UTC)
        for dev in device_ids:
            state = {
                "device_id": dev,
                "seq": 1,
                "issued_at": now.isoformat(),
                "expires_at": (now + timedelta(hours=1)).isoformat(),
                "models": {
                    "digits": {
                        "version": version,
                        "url": "http://127.0.0.1:9/none",
                        "sha256": "0" * 64,
                        "rollout_id": "baseline",
                    }
                },
            }
            self.client.publish(topic(dev, "desired"), sign_desired(state, key), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _metric(base: str, name: str, label: str) -> float:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Poller:
    """Polls a condition in a thread so that the simulator's loop keeps the main thread."""

    def __init__(self, check: Callable[[], bool], every: float = 0.2) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None

        def run() -> None:
            while not self.done.is_set():
                try:
                    if check():
                        self.done.set()
                        return
                except Exception as e:  # reported by the caller
                    self.error = e
                time.sleep(every)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.done.set()
        self.thread.join(5)


@dataclass
class SizeResult:
    devices: int
    connect_s: float
    baseline_rollout_s: float
    rollout_s: float
    rollout_phase: str
    status_messages: int
    baseline_msgs_per_s: float
    controller_msgs_per_s: float


def run_size(
    n: int, flood_per_device: int, root: Path, timeout: float, broker: str = "mosquitto"
) -> SizeResult:
    from edgefleet.demo.fleet import Fleet
    from edgefleet.demo.rollouts import rollout_body
    from edgefleet.demo.spec import FleetSpec
    from edgefleet.keys import load_private_key, load_public_key

    fleet = Fleet(FleetSpec(root, devices=0, broker=broker))
    sim: SimFleet | None = None
    counter: StatusCounter | None = None
    try:
        fleet.make_keys()
        fleet.build_packages(("1.0.0",), ())
        fleet.start_broker()
        ctl_key = fleet.root / "controller" / "keys" / "controller.key"
        trusted = [load_public_key(fleet.keys["controller_pub"])]
        ids = [f"sim-{i:05d}" for i in range(n)]
        sim = SimFleet("127.0.0.1", fleet.broker.port, ids, trusted)
        t0 = time.perf_counter()
        sim.connect(timeout=120)
        connect_s = time.perf_counter() - t0

        # Baseline: the same protocol with a plain client in the controller's place.
        counter = StatusCounter(fleet.broker.port)
        t0 = time.perf_counter()
        counter.publish_desired(ids, "0.9.0", load_private_key(ctl_key))
        want = len(SUCCESS_PATH) * n
        if not sim.run_until(lambda: counter is not None and counter.count >= want, timeout):
            raise TimeoutError(f"baseline: {counter.count}/{want} statuses")
        baseline_rollout_s = time.perf_counter() - t0
        start = counter.count
        t0 = time.perf_counter()
        flood = sim.flood(flood_per_device)
        sim.run_until(lambda: counter is not None and counter.count >= start + flood, timeout)
        baseline_rate = (counter.count - start) / (time.perf_counter() - t0)
        counter.close()
        counter = None
        sim.reset()

        # The controller: SQLite, MQTT bridge, rollout engine, in its own process.
        fleet.start_controller()
        fleet.upload(fleet.packages["1.0.0"])
        api = fleet.api
        assert api is not None
        online = Poller(
            lambda: sum(d["online"] for d in api.call("GET", "/api/v1/devices")) >= n, every=0.5
        )
        sim.run_until(online.done.is_set, timeout)
        online.stop()
        if not online.done.is_set():
            raise TimeoutError(f"controller did not see {n} devices online: {online.error}")
        body = rollout_body("1.0.0", ids, waves=[5.0, 25.0, 100.0], device_timeout_s=timeout)
        body["max_retries"] = 0
        phase: dict[str, str] = {}

        def finished() -> bool:
            detail = api.call("GET", f"/api/v1/rollouts/{rid}")
            phase["phase"] = detail["phase"]
            return detail["phase"] in ("succeeded", "aborted", "cancelled")

        t0 = time.perf_counter()
        rid = fleet.create_rollout(body)
        poll = Poller(finished)
        sim.run_until(poll.done.is_set, timeout)
        rollout_s = time.perf_counter() - t0
        poll.stop()

        base = api.base
        name = "edgefleet_mqtt_messages"
        before = _metric(base, name, 'kind="status"')
        t0 = time.perf_counter()
        flood = sim.flood(flood_per_device)
        absorbed = Poller(lambda: _metric(base, name, 'kind="status"') >= before + flood, 0.1)
        sim.run_until(absorbed.done.is_set, timeout)
        elapsed = time.perf_counter() - t0
        absorbed.stop()
        got = _metric(base, name, 'kind="status"') - before
        return SizeResult(
            n,
            connect_s,
            baseline_rollout_s,
            rollout_s,
            phase.get("phase", "unknown"),
            flood,
            baseline_rate,
            got / elapsed,
        )
    finally:
        if counter is not None:
            counter.close()
        if sim is not None:
            sim.close()
        fleet.close()


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="bench_fleet", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 devices only")
    parser.add_argument("--devices", type=int, nargs="*", help="fleet sizes (default 100 1000)")
    parser.add_argument("--flood", type=int, default=0, help="status messages per device")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--broker", choices=("mosquitto", "amqtt"), default="mosquitto")
    args = parser.parse_args(argv)
    sizes = args.devices or ([100] if args.quick else [100, 1000])
    console = Console(width=120)
    results = []
    for n in sizes:
        flood = args.flood or max(10, 20_000 // n)
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            console.print(f"fleet of {n} simulated devices …")
            results.append(run_size(n, flood, Path(tmp), args.timeout, args.broker))
    table = Table(
        title=f"fleet: three-wave rollout (5/25/100 %) and status throughput ({args.broker})"
    )
    for col in (
        "devices",
        "connect s",
        "rollout s",
        "baseline s",
        "ratio",
        "phase",
        "status/s",
        "baseline/s",
        "ratio",
    ):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            str(r.devices),
            f"{r.connect_s:.1f}",
            f"{r.rollout_s:.1f}",
            f"{r.baseline_rollout_s:.2f}",
            f"{r.rollout_s / r.baseline_rollout_s:.1f}x",
            r.rollout_phase,
            f"{r.controller_msgs_per_s:,.0f}",
            f"{r.baseline_msgs_per_s:,.0f}",
            f"{r.controller_msgs_per_s / r.baseline_msgs_per_s:.2f}x",
        )
    console.print(table)
    console.print(
        "rollout s: controller process, create -> succeeded; baseline s: the same desired/status"
        " flow with a plain MQTT client in the controller's place; status/s: status messages"
        " the controller's bridge absorbed (its /metrics) vs. the plain client."
    )
    big = [r for r in results if r.devices >= 1000]
    for r in big:
        verdict = "meets" if r.rollout_s <= 60 else "misses"
        console.print(f"{r.devices} devices: rollout {r.rollout_s:.1f}s {verdict} the 60 s target")
    return 0 if all(r.rollout_phase == "succeeded" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
