"""A simulated device speaking the real MQTT wire (no ONNX): for controller tests.

It verifies each desired state with the controller's public key, ignores replays, and answers
with status messages: COMMITTED for versions it accepts, FAILED for versions in `fail_versions`,
ROLLED_BACK (probation_latency: a noisy host) for versions in `noisy_versions`, and
`ROLLBACK_FAILED` when asked to go back to a version in `unrestorable`.

Status reports and telemetry records go through the agent's own outboxes and delivery
(`agent.telemetry.outbox.Outbox` in memory, `agent.mqtt.delivery.Delivery`): kept until the
controller's ack, handed out again after ``resend_after_s`` of connected time without one.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.agent.mqtt.delivery import AckMode, Delivery
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.wire.errors import RejectError, ReplayError
from edgefleet.wire.mqtt import Kind, offline_will, topic, verify_desired


class SimDevice:
    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        controller_key: ec.EllipticCurvePublicKey,
        *,
        profiles: tuple[str, ...] = ("cpu-x86_64",),
        installed: str | None = "1.0.0",
        fail_versions: frozenset[str] = frozenset(),
        noisy_versions: frozenset[str] = frozenset(),
        unrestorable: frozenset[str] = frozenset(),
        flaky: int = 0,
        username: str | None = None,
        password: str | None = None,
        hold: bool = False,
        acks: AckMode = "on",
        resend_after_s: float = 2.0,
    ) -> None:
        self.device_id, self.key = device_id, controller_key
        self.profiles, self.fail_versions = profiles, fail_versions
        self.noisy_versions, self.unrestorable = noisy_versions, unrestorable
        self.entries: list[dict[str, Any]] = []  # every desired entry acted on
        self.removed = 0
        self.flaky = flaky  # the next `flaky` downloads break off (a link that drops)
        self.version = installed
        self.previous: str | None = None
        self.last_seq: int | None = None
        self.status_seq = 0
        self.rejected: list[str] = []
        self.replays = 0
        self.seen_desired = 0
        self.desired_by_seq: dict[int, set[str]] = {}  # seq -> digests of its envelopes
        self.conflicts = 0  # desired states that differed from another of the same seq
        self.hold = hold  # keep desired states until release(): a device that is slow to act
        self.held: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.status_box = Outbox(":memory:")
        self.telemetry_box = Outbox(":memory:")
        self.delivery = Delivery(
            device_id,
            self.status_box,
            self.telemetry_box,
            telemetry_batch=200,
            resend_after_s=resend_after_s,
            acks=acks,
        )
        self._jobs: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()  # acks; None: flush
        self._connected_since = 0.0
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._pump: threading.Thread | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        if username:
            self.client.username_pw_set(username, password)
        self.client.will_set(topic(device_id, "presence"), offline_will(device_id), 1, True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self._connected.clear()
        self.client.on_message = self._on_message
        self.client.on_publish = lambda _c, _u, mid, *_a: self.delivery.on_puback(mid)
        self.host, self.port = host, port

    def start(self) -> SimDevice:
        self._pump = threading.Thread(target=self._run, name=f"sim-{self.device_id}", daemon=True)
        self._pump.start()
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._jobs.put(None)
        if self._pump is not None:
            self._pump.join(5)
        self.client.disconnect()
        self.client.loop_stop()

    def backlog(self) -> tuple[int, int]:
        """(status reports, telemetry records) not acknowledged by the controller yet."""
        return self.status_box.stats().pending, self.telemetry_box.stats().pending

    def telemetry(self, n: int) -> list[int]:
        """Queue ``n`` telemetry records (kind ``system``); their record ids."""
        ids = [self.telemetry_box.append({"kind": "system", "cpu_percent": 1.0}) for _ in range(n)]
        self._jobs.put(None)
        return ids

    def _run(self) -> None:
        """The agent link's worker, reduced: acks, PUBACKs, flush, resend."""
        while not self._stopping.is_set():
            try:
                job = self._jobs.get(timeout=0.2)
            except queue.Empty:
                job = None
            self.delivery.drain_acks()
            if job is not None:
                self.delivery.on_ack_message(job)
            if self._connected.is_set():
                self.delivery.flush(self._publish_kind, self._connected_since)

    def _publish_kind(self, kind: Kind, payload: bytes) -> int:
        return self.client.publish(topic(self.device_id, kind), payload, qos=1).mid

    def presence(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "online": True,
            "agent_version": "0.1.0",
            "execution_providers": ["CPUExecutionProvider"],
            "profiles": list(self.profiles),
            "hardware": {"sim": True},
            "installed": {
                "iris": {"version": self.version, "previous": self.previous, "state": "COMMITTED"}
            }
            if self.version
            else {},
            "at": time.time(),
        }

    def _on_connect(self, client: Any, *_a: Any) -> None:
        client.subscribe([(topic(self.device_id, "desired"), 1), (topic(self.device_id, "ack"), 1)])
        self._connected_since = time.monotonic()
        self._connected.set()
        self._jobs.put(None)
        client.publish(
            topic(self.device_id, "presence"), json.dumps(self.presence()), qos=1, retain=True
        )

    def _status(
        self, entry: dict[str, Any], state: str, reason_code: str | None = None, **extra: Any
    ) -> None:
        self.status_seq += 1
        msg = {
            "device_id": self.device_id,
            "update_id": f"u{self.status_seq}",
            "model": "iris",
            "version": entry["version"],
            "rollout_id": entry.get("rollout_id"),
            "state": state,
            "reason_code": reason_code,
            "reason": reason_code and f"simulated {reason_code}",
            "at": time.time(),
            "benchmark": {"p95_ms": 1.0},
            **extra,
        }
        self.status_box.append(msg)  # its outbox id becomes its seq (as on the agent)
        self._jobs.put(None)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        if msg.topic == topic(self.device_id, "ack"):
            self._jobs.put(bytes(msg.payload))
            return
        with self._lock:
            self._note_desired(bytes(msg.payload))
            try:
                state = verify_desired(
                    msg.payload, [self.key], device_id=self.device_id, last_seq=self.last_seq
                )
            except ReplayError:
                self.replays += 1  # the controller re-publishes on reconnect: same seq, ignored
                return
            except RejectError as e:
                self.rejected.append(str(e.code))
                return
            self.last_seq = state["seq"]
            self.seen_desired += 1
            if "iris" in state.get("remove", []) and self.version is not None:
                self.removed += 1
                self._status({"version": self.version}, "REMOVED")
                self.previous, self.version = self.version, None
                self._publish_presence()
                return
            entry = state["models"].get("iris")
            if entry is None or entry["version"] == self.version:
                return
            if self.hold:
                self.held.append(entry)
                return
            self._act(entry)

    def _note_desired(self, raw: bytes) -> None:
        """Every verified desired state by seq: two different ones under one seq conflict."""
        try:
            state = verify_desired(raw, [self.key], device_id=self.device_id, last_seq=None)
        except RejectError:
            return
        seen = self.desired_by_seq.setdefault(state["seq"], set())
        seen.add(hashlib.sha256(raw).hexdigest())
        if len(seen) > 1:
            self.conflicts += 1

    def release(self) -> int:
        """Act on the held desired states now; returns how many."""
        with self._lock:
            held, self.held, self.hold = self.held, [], False
            for entry in held:
                self._act(entry)
            return len(held)

    def _publish_presence(self) -> None:
        self.client.publish(
            topic(self.device_id, "presence"), json.dumps(self.presence()), qos=1, retain=True
        )

    def install_locally(self, version: str) -> None:
        """What `agent install --force` does on a managed device: install by hand, report it
        to the controller as a local install."""
        with self._lock:
            self.previous, self.version = self.version, version
            self._status({"version": version}, "COMMITTED", local=True)
            self._publish_presence()

    def _act(self, entry: dict[str, Any]) -> None:
        self.entries.append(entry)
        self._status(entry, "DOWNLOADING")
        if entry.get("rollback") and entry["version"] in self.unrestorable:
            self._status(entry, "ROLLBACK_FAILED", "integrity")
            return
        if self.flaky > 0:
            self.flaky -= 1
            self._status(entry, "FAILED", "download_incomplete")
            return
        if entry["version"] in self.fail_versions:
            self._status(entry, "FAILED", "validation_failed")
            return
        if entry["version"] in self.noisy_versions:
            self._status(entry, "ROLLED_BACK", "probation_latency")
            return
        self.previous, self.version = self.version, entry["version"]
        self._status(entry, "COMMITTED")
        self._publish_presence()
