"""The agent's delivery: records leave the outbox on the controller's ack, not on PUBACK
(modes on / off / auto), and are handed out again after ``resend_after_s`` without one."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet.agent.mqtt.delivery import AckMode, Delivery
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.wire.mqtt import Kind, acks_for


class Wire:
    """What `Delivery.flush` hands to the broker (the publish function, recorded)."""

    def __init__(self) -> None:
        self.sent: list[tuple[Kind, dict[str, object]]] = []

    def publish(self, kind: Kind, payload: bytes) -> int:
        self.sent.append((kind, json.loads(payload)))
        return len(self.sent)


def make(tmp_path: Path, acks: AckMode, resend: float = 60.0) -> tuple[Delivery, Outbox, Outbox]:
    status, tele = Outbox(tmp_path / "s.sqlite"), Outbox(tmp_path / "t.sqlite")
    d = Delivery(
        "dev", status, tele, resend_after_s=resend, acks=acks, acks_marker=tmp_path / "marker"
    )
    return d, status, tele


def test_on_puback_is_flow_control_only(tmp_path: Path) -> None:
    d, status, tele = make(tmp_path, "on")
    seq = status.append({"state": "COMMITTED"})
    rid = tele.append({"kind": "system"})
    w = Wire()
    d.flush(w.publish, time.monotonic())
    assert [k for k, _ in w.sent] == ["status", "telemetry"]
    assert w.sent[0][1]["seq"] == seq
    for mid in (1, 2):
        d.on_puback(mid)
    d.drain_acks()
    assert status.stats().pending == 1 and tele.stats().pending == 1  # kept until the ack
    d.flush(w.publish, time.monotonic())
    assert len(w.sent) == 2  # not handed out twice while waiting
    (ack,) = acks_for([seq], [rid])
    assert d.on_ack_message(ack) == 2
    assert status.stats().pending == 0 and tele.stats().pending == 0
    assert d.on_ack_message(b'{"v": 2}') == 0 and d.ignored_acks == 1


def test_resent_after_the_timeout_without_an_ack(tmp_path: Path) -> None:
    d, status, _ = make(tmp_path, "on", resend=0.05)
    status.append({"state": "FAILED"})
    w = Wire()
    d.flush(w.publish, time.monotonic())
    d.on_puback(1)
    d.drain_acks()
    time.sleep(0.1)
    d.flush(w.publish, time.monotonic() - 1)
    assert len(w.sent) == 2 and w.sent[0][1] == w.sent[1][1] and d.resent == 1
    # time disconnected does not count: connected_since is now
    d2, status2, _ = make(tmp_path / "b", "on", resend=0.05)
    status2.append({"state": "FAILED"})
    w2 = Wire()
    d2.flush(w2.publish, time.monotonic())
    time.sleep(0.1)
    d2.flush(w2.publish, time.monotonic())
    assert len(w2.sent) == 1


def test_off_releases_on_puback(tmp_path: Path) -> None:
    d, status, _ = make(tmp_path, "off")
    status.append({"state": "COMMITTED"})
    d.flush(Wire().publish, time.monotonic())
    d.on_puback(1)
    d.drain_acks()
    assert status.stats().pending == 0


def test_auto_learns_that_the_controller_acks_and_remembers(tmp_path: Path) -> None:
    d, status, _ = make(tmp_path, "auto")
    assert not d.awaits_controller
    first = status.append({"state": "DOWNLOADING"})
    w = Wire()
    d.flush(w.publish, time.monotonic())
    d.on_puback(1)
    d.drain_acks()
    assert status.stats().pending == 0  # released on PUBACK: no ack seen yet
    d.on_ack_message(acks_for([first], [])[0])
    assert d.awaits_controller and (tmp_path / "marker").exists()
    status.append({"state": "COMMITTED"})
    d.flush(w.publish, time.monotonic())
    d.on_puback(2)
    d.drain_acks()
    assert status.stats().pending == 1  # now only the ack releases it
    again, *_ = make(tmp_path, "auto")  # a restart remembers
    assert again.awaits_controller


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="acks"):
        Delivery("dev", Outbox(":memory:"), None, acks="sometimes")  # type: ignore[arg-type]


def test_a_capture_message_stays_under_natss_payload_limit_with_its_envelope(
    tmp_path: Path,
) -> None:
    """Records are added while the whole payload, envelope and separators included, stays 16
    KiB under NATS's default 1 MiB max_payload (which counts the topic and JetStream's headers
    too). Counting the records' JSON alone against 1 MiB sent four records of just under 1 MiB
    together as a message over it."""
    cap = Outbox(tmp_path / "c.sqlite")
    d = Delivery(
        "dev", Outbox(tmp_path / "s.sqlite"), None, capture=cap, capture_batch=64, acks="on"
    )
    for _ in range(4):
        cap.append({"blob": ""})
    one = len(json.dumps(cap.pending(1)[0][1]))  # a record's JSON as delivery measures it
    cap = Outbox(tmp_path / "c2.sqlite")
    d.capture = cap
    for _ in range(4):  # four records whose JSON adds up to 20 bytes under 1 MiB
        cap.append({"blob": "a" * ((1024**2 - 20) // 4 - one)})
    sent: list[dict[str, object]] = []
    sizes: list[int] = []

    def publish(kind: Kind, payload: bytes) -> int:
        sizes.append(len(payload))
        sent.append(json.loads(payload))
        return len(sizes)

    d.flush(publish, time.monotonic())
    assert sizes and all(n <= 1024**2 - 16 * 1024 for n in sizes), sizes
    assert [len(m["records"]) for m in sent] == [3]  # type: ignore[arg-type]  # 4th waits
