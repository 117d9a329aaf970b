"""The agent's telemetry outbox: durable across kill -9, bounded with a visible drop count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from edgefleet.agent.telemetry.outbox import Outbox, OutboxError


def test_append_pending_ack_and_ids_increase_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    with Outbox(path) as ob:
        ids = [ob.append({"kind": "system", "n": i}) for i in range(5)]
        assert ids == sorted(ids) and len(set(ids)) == 5
        got = ob.pending(3)
        assert [i for i, _ in got] == ids[:3]
        assert got[0][1] == {"kind": "system", "n": 0, "id": ids[0]}
        assert ob.ack(ids[:3]) == 3
        assert ob.ack(ids[:3]) == 0
    with Outbox(path) as ob:
        assert [r["n"] for _, r in ob.pending(10)] == [3, 4]
        new = ob.append({"kind": "agent"})
        assert new > ids[-1]
        ob.ack([i for i, _ in ob.pending(10)])
        assert ob.stats().pending == 0
    with Outbox(path) as ob:  # ids never reused even after everything was acked
        assert ob.append({"kind": "agent"}) > new


def test_a_wiped_outbox_starts_above_old_ids(tmp_path: Path) -> None:
    with Outbox(tmp_path / "a.sqlite") as ob:
        first = ob.append({"x": 1})
    (tmp_path / "a.sqlite").unlink()
    with Outbox(tmp_path / "a.sqlite") as ob:
        assert ob.append({"x": 1}) > first


def test_bounded_size_drops_oldest_and_counts_them(tmp_path: Path) -> None:
    path = tmp_path / "small.sqlite"
    with Outbox(path, max_bytes=2000) as ob:
        for i in range(100):
            ob.append({"kind": "inference", "i": i, "pad": "x" * 50})
        st = ob.stats()
        assert st.bytes <= 2000 and st.pending > 0
        assert st.dropped == 100 - st.pending
        kept = [r["i"] for _, r in ob.pending(1000)]
        assert kept == list(range(100 - st.pending, 100))  # the newest survive
        with pytest.raises(OutboxError, match="exceeds the outbox limit"):
            ob.append({"pad": "y" * 5000})
        assert ob.dropped == st.dropped + 1
    with Outbox(path, max_bytes=2000) as ob:
        assert ob.stats().dropped == st.dropped + 1  # persisted


def test_concurrent_appenders_and_drainer_lose_nothing(tmp_path: Path) -> None:
    ob = Outbox(tmp_path / "c.sqlite")
    seen: list[int] = []
    stop = threading.Event()

    def drain() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            batch = ob.pending(50)
            seen.extend(r["n"] for _, r in batch)
            ob.ack(i for i, _ in batch)
            if not batch and stop.is_set():
                return

    def produce(base: int) -> None:
        for i in range(200):
            ob.append({"n": base + i})

    drainer = threading.Thread(target=drain)
    drainer.start()
    producers = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(3)]
    for t in producers:
        t.start()
    for t in producers:
        t.join(timeout=30)
    stop.set()
    drainer.join(timeout=30)
    ob.close()
    assert sorted(seen) == sorted(k * 1000 + i for k in range(3) for i in range(200))


_WRITER = textwrap.dedent(
    """
    import sys
    from edgefleet.agent.telemetry.outbox import Outbox
    ob = Outbox(sys.argv[1])
    for i in range(1_000_000):
        rid = ob.append({"kind": "system", "i": i})
        print(rid, flush=True)
    """
)


def test_records_survive_kill_9_mid_append(tmp_path: Path) -> None:
    path = tmp_path / "killed.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    confirmed: list[int] = []
    deadline = time.monotonic() + 60
    while len(confirmed) < 300 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        confirmed.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert len(confirmed) >= 300, "writer did not start"
    with Outbox(path) as ob:
        stored = {rid for rid, _ in ob.pending(1_000_000)}
        assert set(confirmed) <= stored  # every append that returned is on disk
        nxt = ob.append({"kind": "after-restart"})
        assert nxt > max(stored)
