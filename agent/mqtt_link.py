"""The agent's MQTT side: presence, signed desired state, status and telemetry over MQTT 3.1.1.

`MqttLink(agent, config)` connects with the device id as client id and a retained last will
(``{"device_id", "online": false}`` on ``.../presence``), publishes its inventory retained on each
connect, subscribes to ``.../desired`` (QoS 1), and hands every desired state that verifies
(controller key, newer seq) to the pure planner in `agent.mqtt.reconcile`, which decides which
models to update through ``agent.submit_update``. Every update event becomes a status report on
``.../status``; reports wait in an on-disk outbox until the broker's PUBACK. Telemetry records
from the drift role's outbox go to ``.../telemetry`` in batches the same way.

Threads: paho's network thread only queues work; one worker thread does everything else, so
the link's state changes in one place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from edgefleet.agent.mqtt.reconcile import (
    DesiredStateError,
    ModelTarget,
    parse_removals,
    parse_targets,
    plan,
    plan_removals,
)
from edgefleet.agent.mqtt.state import LinkState

log = logging.getLogger("edgefleet.agent.mqtt")

TERMINAL_STATES = frozenset({"COMMITTED", "FAILED", "ROLLED_BACK", "REMOVED"})


class AgentLike(Protocol):
    def submit_update(self, request: Any) -> Any: ...

    def add_listener(self, callback: Callable[[Any], None]) -> Any: ...

    def inventory(self) -> Any: ...

    def remove_model(self, name: str, rollout_id: str | None = None) -> Any: ...


class RecordOutbox(Protocol):
    """What the link needs from an outbox (`agent.telemetry.outbox.Outbox` fits)."""

    def append(self, record: Mapping[str, Any]) -> int: ...

    def pending(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]: ...

    def ack(self, ids: Iterable[int]) -> int: ...

    def stats(self) -> Any: ...


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def jsonable(value: Any) -> Any:
    """Dataclasses, enums, paths and datetimes as plain JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    return str(value)


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host:port`` / ``mqtts://host:port`` -> (host, port, tls)."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
    tls = u.scheme in ("mqtts", "ssl")
    return u.hostname or "127.0.0.1", u.port or (8883 if tls else 1883), tls


def hardware_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import psutil

        info["memory_mb"] = round(psutil.virtual_memory().total / 2**20)
    except Exception:  # psutil is an agent dependency, but presence must not fail on it
        pass
    return info


class MqttLink:
    """Connects one agent to the fleet broker; `start()` returns at once, `stop()` is clean."""

    def __init__(
        self,
        agent: AgentLike,
        config: Any,
        *,
        telemetry: RecordOutbox | None = None,
        telemetry_batch: int = 100,
        tick_s: float = 0.5,
        resend_after_s: float = 15.0,
    ) -> None:
        from edgefleet.keys import load_public_key

        self.agent = agent
        self.config = config
        self.device_id: str = str(config.device_id)
        mqtt_cfg = config.mqtt
        if not mqtt_cfg.url:
            raise ValueError("mqtt.url is not set: the agent has no broker to connect to")
        self.host, self.port, tls = parse_broker_url(str(mqtt_cfg.url))
        self.tls = tls or bool(getattr(mqtt_cfg, "tls", False))
        self.trusted = [load_public_key(Path(p)) for p in config.controller_keys]
        if not self.trusted:
            raise ValueError("controller_keys is empty: no desired state could ever verify")
        self.dir = Path(config.data_dir) / "mqtt"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / "link.json"
        self.state = LinkState.load(self.state_path)
        from edgefleet.agent.telemetry.outbox import Outbox

        self.outbox: RecordOutbox = Outbox(self.dir / "status-outbox.sqlite", max_bytes=8 * 2**20)
        self.telemetry = telemetry
        self.telemetry_batch = telemetry_batch
        self.tick_s = tick_s
        self.resend_after_s = resend_after_s
        self.resent = 0  # reports handed to the broker again after no PUBACK in resend_after_s
        self.ignored: dict[str, int] = {}  # reason code -> count of desired states ignored
        self.last_connect_error: str | None = None
        self.connected = threading.Event()
        self._connected_since = 0.0  # monotonic; set by paho's thread on every connect
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        # PUBACKed mids, from paho's thread to the worker. paho calls on_publish holding its own
        # message mutex, which publish() needs too: the callback must never wait on a lock the
        # worker holds while publishing, so it only queues.
        self._acked: queue.SimpleQueue[int] = queue.SimpleQueue()
        # Worker-only: mid -> (outbox, record ids, when handed) not yet acknowledged by the
        # broker; paho itself re-sends them after a reconnect, the outbox after a restart.
        self._inflight: dict[int, tuple[RecordOutbox, list[int], float]] = {}
        self._handed: set[tuple[int, int]] = set()  # (id(outbox), record id)
        self._in_flight_updates: dict[str, str] = {}  # model -> version being installed
        self._worker: threading.Thread | None = None
        self._client: Any = None
        self._stopping = False

    # -- topics -----------------------------------------------------------------------------
    def topic(self, kind: str) -> str:
        from edgefleet.wire.mqtt import topic

        return topic(self.device_id, kind)  # type: ignore[arg-type]

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        import paho.mqtt.client as mqtt

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.mqtt.client_id or self.device_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if self.config.mqtt.username:
            client.username_pw_set(self.config.mqtt.username, self.config.mqtt.password)
        if self.tls:
            ca = getattr(self.config.mqtt, "ca_file", None)
            client.tls_set(ca_certs=str(ca) if ca else None)
        client.will_set(
            self.topic("presence"),
            json.dumps({"device_id": self.device_id, "online": False}),
            qos=1,
            retain=True,
        )
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(50)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client
        from edgefleet.agent.mqtt.agent_port import unfinished_updates

        # An update the agent resumed after a restart is not submitted again by a retry.
        self._in_flight_updates.update(unfinished_updates(self.agent))
        self.agent.add_listener(self._on_event)
        self._worker = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._worker.start()
        client.connect_async(self.host, self.port, keepalive=int(self.config.mqtt.keepalive_s))
        client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say offline (retained), flush what the broker can still take, disconnect."""
        if self._client is None:
            return
        self._stopping = True
        self._jobs.put(("stop", None))
        if self._worker is not None:
            self._worker.join(timeout)
        client = self._client
        if self.connected.is_set():
            try:
                info = client.publish(
                    self.topic("presence"),
                    json.dumps({"device_id": self.device_id, "online": False}),
                    qos=1,
                    retain=True,
                )
                info.wait_for_publish(timeout=min(timeout, 2.0))
            except (RuntimeError, ValueError) as e:
                log.warning("offline presence not sent: %s", e)
        client.disconnect()
        client.loop_stop()
        self._client = None
        close = getattr(self.outbox, "close", None)
        if close is not None:
            close()

    def backlog(self) -> int:
        """Status reports on disk that the broker has not acknowledged yet."""
        return int(self.outbox.stats().pending)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self.connected.wait(timeout)

    # -- paho callbacks (network thread): queue work, nothing else ---------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.last_connect_error = str(reason)
            log.warning("broker refused connection: %s", reason)
            return
        self.last_connect_error = None
        client.subscribe(self.topic("desired"), qos=1)
        self._connected_since = time.monotonic()
        self.connected.set()
        self._jobs.put(("connected", None))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.connected.clear()
        if not self._stopping:
            log.info("disconnected from broker: %s (reconnecting with backoff)", reason)

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if message.topic == self.topic("desired"):
            self._jobs.put(("desired", bytes(message.payload)))

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._acked.put(mid)
        self._jobs.put(("acked", None))

    def _drain_acks(self) -> None:
        """Worker: forget acknowledged records (unknown mids are presence messages)."""
        while True:
            try:
                mid = self._acked.get_nowait()
            except queue.Empty:
                return
            entry = self._inflight.pop(mid, None)
            if entry is None:
                continue
            box, ids, _ = entry
            box.ack(ids)
            self._handed.difference_update((id(box), i) for i in ids)

    def _on_event(self, event: Any) -> None:
        """Agent listener: may be called from any agent thread."""
        self._jobs.put(("event", event))

    # -- worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                kind, arg = self._jobs.get(timeout=self.tick_s)
            except queue.Empty:
                kind, arg = "tick", None
            try:
                self._drain_acks()
                if kind == "stop":
                    self._flush()
                    return
                if kind == "connected":
                    self._publish_presence()
                elif kind == "desired":
                    self._handle_desired(arg)
                elif kind == "event":
                    self._handle_event(arg)
                self._flush()
            except Exception:  # the link must outlive any single bad message
                log.exception("mqtt link: %s job failed", kind)

    # -- desired state ----------------------------------------------------------------------
    def _ignore(self, code: str, message: str) -> None:
        self.ignored[code] = self.ignored.get(code, 0) + 1
        log.warning("desired state ignored (%s): %s", code, message)

    def _handle_desired(self, raw: bytes) -> None:
        from edgefleet.wire.errors import RejectError, ReplayError
        from edgefleet.wire.mqtt import verify_desired

        if not raw:
            return  # retained message cleared by the controller
        try:
            desired = verify_desired(
                raw, self.trusted, device_id=self.device_id, last_seq=self.state.last_seq
            )
        except ReplayError as e:
            self.ignored[e.code.value] = self.ignored.get(e.code.value, 0) + 1
            return
        except RejectError as e:
            self._ignore(e.code.value, e.message)
            self._report(
                {
                    "kind": "desired_rejected",
                    "state": "REJECTED",
                    "reason_code": e.code.value,
                    "reason": e.message,
                }
            )
            return
        except ValueError as e:
            self._ignore("malformed", str(e))
            return
        seq = int(desired["seq"])
        try:
            targets = parse_targets(desired)
            removals = parse_removals(desired)
        except DesiredStateError as e:
            self.state.last_seq = seq
            self.state.save(self.state_path)
            self._ignore("manifest_invalid", str(e))
            self._report(
                {
                    "kind": "desired_rejected",
                    "state": "REJECTED",
                    "reason_code": "manifest_invalid",
                    "reason": str(e),
                    "desired_seq": seq,
                }
            )
            return
        # Persist the seq before acting: a crash after this never acts twice on one state;
        # the agent's own state machine resumes an update it had accepted.
        self.state.last_seq = seq
        for t in targets:
            self.state.rollouts[f"{t.name}@{t.version}"] = t.rollout_id
        desired_names = {t.name for t in targets}
        self.state.removed = [n for n in self.state.removed if n not in desired_names]
        self.state.save(self.state_path)
        installed = self._installed_versions()
        in_flight = dict(self._in_flight_updates)
        for action in plan(targets, installed, in_flight):
            if action.kind == "report":
                self._report_target(
                    action.target, "COMMITTED", action.reason, seq, code="already", already=True
                )
            else:
                self._install(action.target, seq, action.reason)
        for name in plan_removals(removals, installed, in_flight, self.state.removed):
            self._remove(name, installed.get(name) or in_flight.get(name), seq)

    def _remove(self, name: str, version: str | None, seq: int) -> None:
        """Queue an explicit removal; its REMOVED event is reported like any other status, with
        the rollout that installed the model when the link knows it."""
        log.info("desired seq %d: remove %s %s", seq, name, version or "(not installed)")
        rollout_id = self.state.rollouts.get(f"{name}@{version}") if version else None
        try:
            self.agent.remove_model(name, rollout_id=rollout_id)
        except Exception as e:
            self._report(
                {
                    "kind": "update",
                    "model": name,
                    "version": version or "",
                    "rollout_id": rollout_id,
                    "state": "FAILED",
                    "reason_code": "remove_refused",
                    "reason": f"{type(e).__name__}: {e}",
                    "desired_seq": seq,
                }
            )
            return
        # Journaled by the agent now (it finishes after a restart): confirmed on this side.
        if name not in self.state.removed:
            self.state.removed.append(name)
            self.state.removed = self.state.removed[-64:]
            self.state.save(self.state_path)

    def _install(self, target: ModelTarget, seq: int, why: str) -> None:
        from edgefleet.agent.mqtt.agent_port import make_update_request

        log.info("desired seq %d: %s", seq, why)
        try:
            request = make_update_request(target, desired_seq=seq)
            self._in_flight_updates[target.name] = target.version
            self.agent.submit_update(request)
        except Exception as e:
            self._in_flight_updates.pop(target.name, None)
            code = getattr(e, "code", None)
            code = str(getattr(code, "value", code) or "submit_refused")
            message = str(getattr(e, "message", None) or f"{type(e).__name__}: {e}")
            self._report_target(target, "FAILED", message, seq, code=code)

    def _installed_versions(self) -> dict[str, str]:
        from edgefleet.agent.mqtt.agent_port import installed_versions

        return installed_versions(self.agent.inventory())

    # -- status -----------------------------------------------------------------------------
    def _report_target(
        self,
        target: ModelTarget,
        state: str,
        reason: str,
        seq: int,
        *,
        code: str | None = None,
        already: bool = False,
    ) -> None:
        self._report(
            {
                "kind": "update",
                "model": target.name,
                "version": target.version,
                "rollout_id": target.rollout_id,
                "state": state,
                "reason_code": code,
                "reason": reason,
                "desired_seq": seq,
                "already_installed": already,
            }
        )

    def _handle_event(self, event: Any) -> None:
        from edgefleet.agent.mqtt.agent_port import event_status

        status = event_status(event)
        name, version = status.get("model"), status.get("version")
        status.setdefault("rollout_id", self.state.rollouts.get(f"{name}@{version}"))
        status["desired_seq"] = self.state.last_seq
        self._report(status)
        if status.get("state") in TERMINAL_STATES:
            if self._in_flight_updates.get(str(name)) == version:
                self._in_flight_updates.pop(str(name), None)
            self._publish_presence()

    def _report(self, body: dict[str, Any]) -> None:
        """Durably queue a status report; it leaves the outbox on PUBACK.

        The outbox id (increasing, survives restarts) goes out as ``id`` so that the controller
        drops the duplicates at-least-once delivery may bring.
        """
        message = {"device_id": self.device_id, "at": now_iso(), **body}
        self.outbox.append(jsonable(message))

    # -- presence ---------------------------------------------------------------------------
    def presence(self) -> dict[str, Any]:
        from edgefleet.agent.mqtt.agent_port import presence_fields

        body: dict[str, Any] = {
            "device_id": self.device_id,
            "online": True,
            "at": now_iso(),
            "hardware": hardware_info(),
        }
        body.update(presence_fields(self.agent, self.config))
        return body

    def _publish_presence(self) -> None:
        if self._client is None or not self.connected.is_set():
            return
        self._client.publish(
            self.topic("presence"), json.dumps(jsonable(self.presence())), qos=1, retain=True
        )

    # -- outboxes -> broker -----------------------------------------------------------------
    def _forget_stale(self) -> None:
        """Reports without a PUBACK for ``resend_after_s`` while connected are handed out again
        (some brokers drop a QoS 1 flow under load); the controller drops duplicates by seq."""
        now, since = time.monotonic(), self._connected_since
        # Only time spent connected counts: paho itself re-sends what it held across a reconnect.
        stale = [
            m
            for m, (_, _, t) in self._inflight.items()
            if now - max(t, since) > self.resend_after_s
        ]
        for mid in stale:
            box, ids, _ = self._inflight.pop(mid)
            self._handed.difference_update((id(box), i) for i in ids)
            self.resent += len(ids)

    def _flush(self) -> None:
        if self._client is None or not self.connected.is_set():
            return
        self._forget_stale()
        for _, record in self._fresh(self.outbox, 500):
            # The outbox id increases across restarts: it is the status seq the controller
            # uses to drop duplicates of at-least-once delivery.
            body = json.dumps({**record, "seq": record["id"]}).encode()
            self._publish_records(self.outbox, "status", [record], body)
        if self.telemetry is not None:
            batch = [r for _, r in self._fresh(self.telemetry, self.telemetry_batch)]
            if batch:
                envelope = {"device_id": self.device_id, "records": batch}
                payload = json.dumps(envelope).encode()
                self._publish_records(self.telemetry, "telemetry", batch, payload)

    def _fresh(self, box: RecordOutbox, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Pending records not already handed to paho."""
        handed = {i for b, i in self._handed if b == id(box)}
        return [(i, r) for i, r in box.pending(limit + len(handed)) if i not in handed][:limit]

    def _publish_records(
        self, box: RecordOutbox, kind: str, records: list[dict[str, Any]], payload: bytes
    ) -> None:
        ids = [int(r["id"]) for r in records]
        info = self._client.publish(self.topic(kind), payload, qos=1)
        self._inflight[info.mid] = (box, ids, time.monotonic())
        self._handed.update((id(box), i) for i in ids)


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds pass (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()
