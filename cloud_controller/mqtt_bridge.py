"""The controller's MQTT client: device presence/status/telemetry in, desired states out.

paho's network thread only queues messages; one worker thread drains the queue in batches, one
transaction per batch, so thousands of status messages a second do not mean thousands of
commits. On every (re)connect the current desired state of every device is published again
(retained, same seq), so a broker that lost its retained messages is repaired.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import desired, devices
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.models import DesiredState, Device
from edgefleet.cloud_controller.rollouts import RolloutService
from edgefleet.wire.message import MessageError
from edgefleet.wire.presence import parse as parse_presence
from edgefleet.wire.states import UpdateState
from edgefleet.wire.status import StatusReport
from edgefleet.wire.status import parse as parse_status
from edgefleet.wire.telemetry import TelemetryEnvelope
from edgefleet.wire.telemetry import parse as parse_telemetry

log = logging.getLogger(__name__)
BATCH = 500
# Refusals counted under the names they had before the wire parsers (dashboards read them).
# Each parser checks the message's device id against its topic's.
_DROP_NAMES = {
    "status_bad_seq": "status_no_seq",
    "telemetry_bad_records": "telemetry_refused",
    **{
        f"{kind}_bad_device_id": f"{kind}_device_mismatch"
        for kind in ("status", "presence", "telemetry")
    },
}


@dataclass
class BridgeStats:
    received: dict[str, int] = field(
        default_factory=lambda: {"status": 0, "presence": 0, "telemetry": 0}
    )
    dropped: dict[str, int] = field(default_factory=dict)
    published: int = 0
    connected: bool = False

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        u = urlsplit(url if "://" in url else "mqtt://" + url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
        tls = u.scheme in ("mqtts", "ssl")
        return cls(
            u.hostname or "127.0.0.1",
            u.port or (8883 if tls else 1883),
            unquote(u.username) if u.username else None,
            unquote(u.password) if u.password else None,
            tls,
        )


class MqttBridge:
    def __init__(
        self,
        broker_url: str,
        factory: sessionmaker[Session],
        rollouts: RolloutService,
        client_id: str | None = None,
        batch_size: int = BATCH,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.batch_size = batch_size
        self.address = BrokerAddress.parse(broker_url)
        self._factory = factory
        self._rollouts = rollouts
        self.stats = BridgeStats()
        self._queue: queue.Queue[tuple[str, str, bytes]] = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        # A fixed client id with a persistent session: the broker keeps the QoS 1 status
        # messages devices send while the controller restarts, so no count is lost.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"edgefleet-controller-{uuid.uuid4().hex[:8]}",
            clean_session=client_id is None,
        )
        if self.address.username:
            self._client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            self._client.tls_set()
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(1, 5)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="mqtt-bridge", daemon=True)
        self._worker.start()
        self._client.connect_async(self.address.host, self.address.port, keepalive=30)
        self._client.loop_start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker is not None:
            self._worker.join(timeout)

    def wait_connected(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats.connected:
                return True
            time.sleep(0.02)
        return False

    def publish(self, topic: str, payload: bytes) -> None:
        """Retained, QoS 1; paho queues it while the broker is away."""
        self._client.publish(topic, payload, qos=1, retain=True)
        self.stats.published += 1

    def idle(self) -> bool:
        """True when every received message has been processed (tests, benchmarks)."""
        return self._queue.unfinished_tasks == 0

    # --- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(self, client: Any, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker refused the controller: %s", reason)
            return
        from edgefleet.wire.mqtt import subscription

        client.subscribe([(subscription(k), 1) for k in ("status", "presence", "telemetry")])
        self.stats.connected = True
        self._queue.put(("", "republish", b""))

    def _on_disconnect(self, *_args: Any) -> None:
        self.stats.connected = False

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        from edgefleet.wire.mqtt import parse_topic

        parsed = parse_topic(msg.topic)
        if parsed is None or parsed[1] == "desired":
            self.stats.drop("unknown_topic")
            return
        self._queue.put((parsed[0], parsed[1], bytes(msg.payload)))

    # --- worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            except Exception:
                log.exception("mqtt batch of %d messages failed", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _process(self, batch: list[tuple[str, str, bytes]]) -> None:
        if any(kind == "republish" for _, kind, _ in batch):
            self._republish_all()
        reports: list[tuple[str, E.StatusReport]] = []
        telemetry: list[tuple[str, TelemetryEnvelope]] = []
        now = datetime.now(UTC)
        with transaction(self._factory) as session, session.no_autoflush:
            ids = sorted({d for d, kind, _ in batch if kind != "republish"})
            # One query; held here so that get_or_create finds them in the identity map.
            loaded = list(session.scalars(select(Device).where(Device.id.in_(ids)))) if ids else []
            for device_id, kind, raw in batch:
                if kind == "republish":
                    continue
                self.stats.received[kind] = self.stats.received.get(kind, 0) + 1
                try:
                    msg = json.loads(raw)
                except (UnicodeDecodeError, json.JSONDecodeError):
                    self.stats.drop(f"{kind}_not_json")
                    continue
                if not isinstance(msg, dict):
                    self.stats.drop(f"{kind}_not_object")
                    continue
                try:
                    if kind == "presence":
                        presence = parse_presence(msg, device_id)
                        devices.apply_presence(session, device_id, presence, now)
                    elif kind == "status":
                        rep = self._status(session, parse_status(msg, device_id), msg, now)
                        if rep is not None:
                            reports.append(rep)
                    elif kind == "telemetry":
                        envelope = parse_telemetry(msg, device_id)
                        devices.get_or_create(session, device_id).last_seen = now
                        telemetry.append((device_id, envelope))
                except MessageError as e:
                    self.stats.drop(_DROP_NAMES.get(e.reason, e.reason))
            # what a device reports installed may now match its desired state, or no longer
            reported = {d for d, kind, _ in batch if kind in ("presence", "status")}
            desired.note_sync_many(session, reported, now)
            if telemetry:
                self._telemetry(session, telemetry)
        del loaded
        if reports:
            self._rollouts.on_status(reports)

    def _status(
        self, session: Session, report: StatusReport, raw: dict[str, Any], now: datetime
    ) -> tuple[str, E.StatusReport] | None:
        """Record a parsed report on its device; the rollout event for an update report."""
        assert report.seq is not None  # parse() requires it
        dev = devices.get_or_create(session, report.device_id)
        fresh, top, recent = devices.accept_seq(
            dev.last_status_seq, list(dev.recent_status_seqs or []), report.seq
        )
        if not fresh:
            self.stats.drop("status_duplicate")
            return None
        if top == report.seq:  # the newest report is the device's last status (a late one is not)
            dev.last_status = raw
        dev.last_status_seq, dev.recent_status_seqs = top, recent
        dev.last_seen = now
        model, version, state = report.model, report.version, report.state
        if model is None or version is None or state is None:
            return None  # a refused desired state: on record, no rollout moves on it
        if state == UpdateState.COMMITTED:
            installed = dict(dev.installed)
            prev = (
                installed.get(model, {}).get("version")
                if isinstance(installed.get(model), dict)
                else None
            )
            installed[model] = {
                "version": version,
                "previous": prev if prev != version else None,
                "state": state.value,
            }
            dev.installed = installed
        elif state == UpdateState.REMOVED and model in (dev.installed or {}):
            dev.installed = {k: v for k, v in dev.installed.items() if k != model}
        code = report.reason_code
        return model, E.StatusReport(
            report.device_id,
            version,
            state.value,
            reason_code=str(code) if code is not None else None,
            reason=report.reason,
            rollout_id=report.rollout_id,
            model=model,
        )

    def _telemetry(self, session: Session, messages: list[tuple[str, TelemetryEnvelope]]) -> None:
        """Hand telemetry to the drift ingest: the batch at once, and message by message (each
        in its own savepoint) only when the batch is refused, to isolate the bad one."""
        from edgefleet.cloud_controller.drift.ingest import ingest_batch, ingest_telemetry

        try:
            with session.begin_nested():
                ingest_batch(session, messages)
            return
        except Exception:
            log.warning("telemetry batch refused; ingesting message by message")
        for device_id, msg in messages:
            try:
                with session.begin_nested():
                    ingest_telemetry(session, device_id, msg)
            except Exception as e:
                log.warning("telemetry from %s refused: %s", device_id, e)
                self.stats.drop("telemetry_refused")

    def _republish_all(self) -> None:
        with self._factory() as session:
            rows = list(session.scalars(select(DesiredState)))
        from edgefleet.wire.mqtt import topic

        for row in rows:
            self.publish(topic(row.device_id, "desired"), row.envelope)
