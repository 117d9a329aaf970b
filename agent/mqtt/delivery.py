"""Outboxes to the broker: at-least-once delivery of status reports and telemetry batches.

Reports and telemetry records wait in on-disk outboxes (`agent.telemetry.outbox.Outbox`) and
leave them only on the broker's PUBACK. `Delivery.flush` hands what is pending to a ``publish``
function (QoS 1) and remembers the message id; `on_puback` (paho's thread) and `drain_acks`
(the worker) acknowledge them. A report without a PUBACK for ``resend_after_s`` of connected
time is handed out again; the controller drops duplicates by ``seq``.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from edgefleet.agent.telemetry.outbox import OutboxStats
from edgefleet.wire.mqtt import Kind
from edgefleet.wire.status import with_seq
from edgefleet.wire.telemetry import TelemetryEnvelope

#: ``publish(kind, payload) -> message id``: one QoS 1 message on this device's topic.
Publish = Callable[[Kind, bytes], int]


class RecordOutbox(Protocol):
    """What delivery needs from an outbox (`agent.telemetry.outbox.Outbox` fits)."""

    def append(self, record: Mapping[str, Any]) -> int: ...

    def pending(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]: ...

    def ack(self, ids: Iterable[int]) -> int: ...

    def stats(self) -> OutboxStats: ...


class Delivery:
    """State of what was handed to the broker; every method but `on_puback` is the worker's."""

    def __init__(
        self,
        device_id: str,
        status: RecordOutbox,
        telemetry: RecordOutbox | None,
        *,
        telemetry_batch: int = 100,
        resend_after_s: float = 15.0,
    ) -> None:
        self.device_id = device_id
        self.status = status
        self.telemetry = telemetry
        self.telemetry_batch = telemetry_batch
        self.resend_after_s = resend_after_s
        self.resent = 0  # records handed to the broker again after no PUBACK in resend_after_s
        # PUBACKed mids, from paho's thread to the worker. paho calls on_publish holding its own
        # message mutex, which publish() needs too: the callback must never wait on a lock the
        # worker holds while publishing, so it only queues.
        self._acked: queue.SimpleQueue[int] = queue.SimpleQueue()
        # mid -> (outbox, record ids, when handed) not yet acknowledged by the broker; paho
        # itself re-sends them after a reconnect, the outbox after a restart.
        self._inflight: dict[int, tuple[RecordOutbox, list[int], float]] = {}
        self._handed: set[tuple[int, int]] = set()  # (id(outbox), record id)

    def on_puback(self, mid: int) -> None:
        """paho's thread: only queue."""
        self._acked.put(mid)

    def drain_acks(self) -> None:
        """Forget acknowledged records (unknown mids are presence messages)."""
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

    def backlog(self) -> int:
        """Status reports on disk that the broker has not acknowledged yet."""
        return self.status.stats().pending

    def _forget_stale(self, connected_since: float) -> None:
        """Reports without a PUBACK for ``resend_after_s`` while connected are handed out again
        (some brokers drop a QoS 1 flow under load); the controller drops duplicates by seq."""
        now = time.monotonic()
        # Only time spent connected counts: paho itself re-sends what it held across a reconnect.
        stale = [
            m
            for m, (_, _, t) in self._inflight.items()
            if now - max(t, connected_since) > self.resend_after_s
        ]
        for mid in stale:
            box, ids, _ = self._inflight.pop(mid)
            self._handed.difference_update((id(box), i) for i in ids)
            self.resent += len(ids)

    def flush(self, publish: Publish, connected_since: float) -> None:
        """Hand every pending report, and one telemetry batch, to ``publish``."""
        self._forget_stale(connected_since)
        for _, record in self._fresh(self.status, 500):
            # The outbox id increases across restarts: it is the status seq the controller
            # uses to drop duplicates of at-least-once delivery.
            body = json.dumps(with_seq(record, record["id"])).encode()
            self._publish(publish, self.status, "status", [record], body)
        if self.telemetry is not None:
            batch = [r for _, r in self._fresh(self.telemetry, self.telemetry_batch)]
            if batch:
                payload = json.dumps(TelemetryEnvelope(self.device_id, batch).to_dict()).encode()
                self._publish(publish, self.telemetry, "telemetry", batch, payload)

    def _fresh(self, box: RecordOutbox, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """Pending records not already handed to paho."""
        handed = {i for b, i in self._handed if b == id(box)}
        return [(i, r) for i, r in box.pending(limit + len(handed)) if i not in handed][:limit]

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
        self._inflight[mid] = (box, ids, time.monotonic())
        self._handed.update((id(box), i) for i in ids)
