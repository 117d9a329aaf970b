"""Outboxes to the controller: status reports and telemetry batches, delivered exactly once.

Reports and telemetry records wait in on-disk outboxes (`agent.telemetry.outbox.Outbox`).
`Delivery.flush` hands what is pending to a ``publish`` function (QoS 1). A record leaves its
outbox on the controller's acknowledgement (``.../ack``, `wire.mqtt.parse_ack`), which the
controller sends after its database transaction committed: a broker that keeps no session for
the controller (or loses it) then loses nothing. The broker's PUBACK is flow control only.
A record without an ack for ``resend_after_s`` of connected time is handed out again; the
controller stores each status seq and telemetry record id once, so a resend is harmless.

Controllers that never ack (older ones): ``acks="off"`` releases on PUBACK, as before;
``"auto"`` (the default) releases on PUBACK until the first ack arrives, then waits for acks
from then on (remembered in ``acks_marker``, so a restart does not forget it).
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from edgefleet.agent.telemetry.outbox import OutboxStats
from edgefleet.wire.errors import RejectError
from edgefleet.wire.mqtt import Ack, Kind, parse_ack
from edgefleet.wire.status import with_seq
from edgefleet.wire.telemetry import TelemetryEnvelope

#: ``publish(kind, payload) -> message id``: one QoS 1 message on this device's topic.
Publish = Callable[[Kind, bytes], int]
AckMode = Literal["auto", "on", "off"]
#: One capture message, its whole JSON payload (docs/limits.md): a record holds at most
#: 256 KiB of tensors (~350 KB as base64), so one always fits. 16 KiB under 1 MiB: NATS's
#: default ``max_payload`` (1 MiB) counts the MQTT topic and JetStream's headers too, and a
#: message over it is refused with the connection.
MAX_CAPTURE_MESSAGE = 1024**2 - 16 * 1024


class RecordOutbox(Protocol):
    """What delivery needs from an outbox (`agent.telemetry.outbox.Outbox` fits)."""

    def append(self, record: Mapping[str, Any]) -> int: ...

    def pending(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]: ...

    def ack(self, ids: Iterable[int]) -> int: ...

    def stats(self) -> OutboxStats: ...


class Delivery:
    """State of what was handed out; every method but `on_puback` is the worker's."""

    def __init__(
        self,
        device_id: str,
        status: RecordOutbox,
        telemetry: RecordOutbox | None,
        *,
        telemetry_batch: int = 100,
        resend_after_s: float = 15.0,
        capture: RecordOutbox | None = None,
        capture_batch: int = 8,
        acks: AckMode = "auto",
        acks_marker: Path | None = None,
    ) -> None:
        if acks not in ("auto", "on", "off"):
            raise ValueError(f"acks must be auto, on or off, not {acks!r}")
        self.device_id = device_id
        self.status = status
        self.telemetry = telemetry
        self.telemetry_batch = telemetry_batch
        self.capture = capture  # captured rows (agent.capture), acked under "capture"
        self.capture_batch = capture_batch
        self.resend_after_s = resend_after_s
        self.acks: AckMode = acks
        self.acks_marker = acks_marker
        self.learned = acks_marker is not None and acks_marker.exists()
        self.resent = 0  # records handed out again after no acknowledgement in resend_after_s
        self.acked = 0  # records released by the controller's ack
        self.ignored_acks = 0  # ack messages refused by parse_ack
        # PUBACKed mids, from paho's thread to the worker. paho calls on_publish holding its own
        # message mutex, which publish() needs too: the callback must never wait on a lock the
        # worker holds while publishing, so it only queues.
        self._pubacked: queue.SimpleQueue[int] = queue.SimpleQueue()
        # mid -> (outbox, record ids) not yet PUBACKed (paho re-sends them after a reconnect)
        self._inflight: dict[int, tuple[RecordOutbox, list[int], float]] = {}
        # (id(outbox), record id) -> when handed out: not to be handed again before its
        # acknowledgement (PUBACK or controller ack, by mode) or resend_after_s
        self._handed: dict[tuple[int, int], float] = {}

    @property
    def awaits_controller(self) -> bool:
        """True when records leave only on the controller's ack."""
        return self.acks == "on" or (self.acks == "auto" and self.learned)

    def on_puback(self, mid: int) -> None:
        """paho's thread: only queue."""
        self._pubacked.put(mid)

    def drain_acks(self) -> None:
        """PUBACKs: flow control; they release records only when the controller does not ack."""
        while True:
            try:
                mid = self._pubacked.get_nowait()
            except queue.Empty:
                return
            entry = self._inflight.pop(mid, None)
            if entry is None or self.awaits_controller:
                continue  # a presence message, or the controller's ack will release them
            box, ids, _ = entry
            box.ack(ids)
            for i in ids:
                self._handed.pop((id(box), i), None)

    def forget_inflight(self) -> None:
        """The connection these were handed to is gone for good (a new client replaced it, so
        paho will not resend them): hand every unacknowledged record out again at once."""
        self.resent += len(self._handed)
        self._inflight.clear()
        self._handed.clear()

    def on_ack_message(self, raw: bytes) -> int:
        """An ack from the controller (worker): release what it names; how many records."""
        try:
            ack = parse_ack(raw)
        except RejectError:
            self.ignored_acks += 1
            return 0
        return self.on_ack(ack)

    def on_ack(self, ack: Ack) -> int:
        if self.acks == "auto" and not self.learned:
            self.learned = True  # this controller acks: from now on wait for its acks
            if self.acks_marker is not None:
                from edgefleet.wire.atomic import atomic_write_bytes

                atomic_write_bytes(self.acks_marker, b"controller acks\n")
        released = 0
        for box, ids in (
            (self.status, ack.status),
            (self.telemetry, ack.telemetry),
            (self.capture, ack.capture),
        ):
            if box is None or not ids:
                continue
            released += box.ack(ids)
            for i in ids:
                self._handed.pop((id(box), i), None)
        self.acked += released
        return released

    def backlog(self) -> int:
        """Status reports on disk not acknowledged yet."""
        return self.status.stats().pending

    def _forget_stale(self, connected_since: float) -> None:
        """Records without their acknowledgement for ``resend_after_s`` of connected time are
        handed out again (a broker may drop a QoS 1 flow under load, a controller may be
        away); the controller drops duplicates by status seq and telemetry record id."""
        now = time.monotonic()

        def stale(t: float) -> bool:
            # Only time spent connected counts: paho itself re-sends what it held across a
            # reconnect.
            return now - max(t, connected_since) > self.resend_after_s

        for mid in [m for m, (_, _, t) in self._inflight.items() if stale(t)]:
            del self._inflight[mid]
        old = [k for k, t in self._handed.items() if stale(t)]
        for k in old:
            del self._handed[k]
        self.resent += len(old)

    def flush(self, publish: Publish, connected_since: float) -> None:
        """Hand every pending report, and one telemetry batch, to ``publish``."""
        self._forget_stale(connected_since)
        for _, record in self._fresh(self.status, 500):
            # The outbox id increases across restarts: it is the status seq the controller
            # uses to drop duplicates and names in its ack.
            body = json.dumps(with_seq(record, record["id"])).encode()
            self._publish(publish, self.status, "status", [record], body)
        if self.telemetry is not None:
            batch = [r for _, r in self._fresh(self.telemetry, self.telemetry_batch)]
            if batch:
                payload = json.dumps(TelemetryEnvelope(self.device_id, batch).to_dict()).encode()
                self._publish(publish, self.telemetry, "telemetry", batch, payload)
        if self.capture is not None:
            # one message stays under MAX_CAPTURE_MESSAGE, its envelope and separators counted
            rows: list[dict[str, Any]] = []
            size = len(json.dumps({"device_id": self.device_id, "records": []}))
            for _, r in self._fresh(self.capture, self.capture_batch):
                n = len(json.dumps(r)) + 2  # ", " between records
                if rows and size + n > MAX_CAPTURE_MESSAGE:
                    break
                rows.append(r)
                size += n
            if rows:
                payload = json.dumps({"device_id": self.device_id, "records": rows}).encode()
                self._publish(publish, self.capture, "capture", rows, payload)

    def _fresh(self, box: RecordOutbox, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Pending records not already handed out."""
        handed = sum(1 for b, _ in self._handed if b == id(box))
        return [(i, r) for i, r in box.pending(limit + handed) if (id(box), i) not in self._handed][
            :limit
        ]

    def _publish(
        self,
        publish: Publish,
        box: RecordOutbox,
        kind: Kind,
        records: list[dict[str, Any]],
        payload: bytes,
    ) -> None:
        ids = [int(r["id"]) for r in records]
        mid = publish(kind, payload)
        now = time.monotonic()
        self._inflight[mid] = (box, ids, now)
        for i in ids:
            self._handed[(id(box), i)] = now
