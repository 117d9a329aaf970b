"""The agent's capture service alone: opt-in, rows, rate, until, restart, a full queue.

Real outbox files, real numpy arrays; the desired state is the dict `verify_desired` returns."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.capture import CaptureService
from edgefleet.agent.config import AgentConfig, CaptureConfig
from edgefleet.wire import capture as wc
from edgefleet.wire.manifest import format_time, now_utc

CID = "cap-" + "ab" * 8


def _svc(tmp: Path, allowed: bool, queue: int = 64) -> CaptureService:
    cfg = AgentConfig(
        device_id="gw-1", data_dir=tmp, capture=CaptureConfig(allowed=allowed, queue=queue)
    )
    return CaptureService(None, cfg, rng=random.Random(0))


def _desired(
    rows: int = 5, rate: int = 600, until_s: float = 3600, cid: str = CID
) -> dict[str, Any]:
    from datetime import timedelta

    spec = wc.CaptureSpec(
        id=cid, rows=rows, until=format_time(now_utc() + timedelta(seconds=until_s)),
        sample_rate=1.0, max_rows_per_minute=rate,
    )  # fmt: skip
    return {"models": {"m": {"version": "1.0.0", "capture": spec.to_dict()}}}


def _serve(svc: CaptureService, n: int, batch: int = 1) -> None:
    for _ in range(n):
        x = np.ones((batch, 3), np.float32)
        svc.observe("m", "1.0.0", {"x": x}, {"y": np.zeros((batch,), np.int64)}, 0.001, True)
        svc.drain()


def _records(svc: CaptureService) -> list[dict[str, Any]]:
    return [r for _, r in svc.outbox.pending(1000)]


def test_forbidden_refuses_once_and_never_captures(tmp_path: Path) -> None:
    svc = _svc(tmp_path, allowed=False)
    svc.apply(_desired())
    svc.apply(_desired())  # the same capture again: no second refusal
    _serve(svc, 20)
    assert [r["kind"] for r in _records(svc)] == ["refused"]
    assert _records(svc)[0]["reason"] == "capture_forbidden"
    svc.stop()
    again = _svc(tmp_path, allowed=False)  # a restart does not repeat it either
    again.apply(_desired())
    assert [r["kind"] for r in _records(again)] == ["refused"]
    again.stop()


def test_rows_stop_at_the_quota_and_survive_a_restart(tmp_path: Path) -> None:
    svc = _svc(tmp_path, allowed=True)
    svc.apply(_desired(rows=6))
    _serve(svc, 3, batch=1)
    svc.stop()
    again = _svc(tmp_path, allowed=True)  # the retained desired state is a replay: resumed
    _serve(again, 10, batch=2)  # a batch past what is left is cut to it
    recs = _records(again)
    rows = [r for r in recs if r["kind"] == "row"]
    assert [r["inputs"]["x"]["shape"][0] for r in rows] == [1, 1, 1, 2, 1]
    assert rows[-1]["outputs"]["y"]["shape"] == [1]  # outputs cut with the inputs
    assert recs[-1]["kind"] == "done" and recs[-1]["why"] == "rows" and recs[-1]["rows"] == 6
    for r in rows:  # every record passes the controller's own parser
        assert isinstance(wc.parse_record({**r, "id": 1}), wc.CaptureRow)
    again.stop()


def test_rate_until_withdrawal_and_a_full_queue(tmp_path: Path) -> None:
    svc = _svc(tmp_path, allowed=True, queue=2)
    svc.apply(_desired(rows=1000, rate=4))
    _serve(svc, 10)
    assert sum(r["kind"] == "row" for r in _records(svc)) == 4  # 4 rows per minute
    # the request path never waits: past the queue, samples are dropped and counted
    svc2 = _svc(tmp_path / "b", allowed=True, queue=2)
    svc2.apply(_desired(rows=1000, rate=1000))
    t0 = time.perf_counter()
    for _ in range(50):
        svc2.observe("m", "1.0.0", {"x": np.ones((1, 3), np.float32)}, {}, 0.001, True)
    assert time.perf_counter() - t0 < 0.5 and svc2.dropped == 48
    svc2.stop()
    # withdrawn by the controller: a done record, no more rows
    svc.apply({"models": {"m": {"version": "1.0.0"}}})
    _serve(svc, 3)
    assert _records(svc)[-1]["why"] == "withdrawn"
    # past until: done, nothing captured
    svc3 = _svc(tmp_path / "c", allowed=True)
    svc3.apply(_desired(until_s=-1))
    _serve(svc3, 3)
    assert [r["kind"] for r in _records(svc3)] == ["done"] and _records(svc3)[0]["why"] == "until"
    svc3.stop()
    svc.stop()
