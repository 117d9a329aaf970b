"""The session manager's unload-first swap: requests wait through the gap in a bounded queue."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.config import SwapConfig
from edgefleet.agent.sessions import LoadedModel, ModelNotFound, ServerBusy, SessionManager
from edgefleet.agent.store import ModelStore


def _load(data: Path, version: str = "1.0.0") -> LoadedModel:
    store = ModelStore(data)
    rec = store.check_integrity("iris", version)
    return LoadedModel(
        "iris",
        version,
        store.version_dir("iris", version),
        store.manifest("iris", version),
        rec["providers"],
    )


def test_gap_holds_requests_then_serves_them(v1_copy: Path, x_iris: np.ndarray) -> None:
    sm = SessionManager(SwapConfig(queue_max=8, queue_timeout_s=10))
    sm.install(_load(v1_copy), "iris")
    release = threading.Event()
    loading = threading.Event()

    def slow_load() -> LoadedModel:
        loading.set()
        assert release.wait(10)
        return _load(v1_copy)

    swapper = threading.Thread(target=lambda: sm.swap_unload_first("iris", slow_load))
    swapper.start()
    assert loading.wait(10)
    results: list[object] = []

    def request() -> None:
        try:
            _, out = sm.infer("iris", None, {"X": x_iris})
            results.append(out["label"].tolist())
        except Exception as e:
            results.append(e)

    clients = [threading.Thread(target=request) for _ in range(4)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 10
    while sm._slot("iris").waiting < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sm._slot("iris").waiting == 4 and results == []  # held, not failed
    release.set()
    swapper.join(10)
    for c in clients:
        c.join(10)
    assert len(results) == 4 and all(isinstance(r, list) for r in results), results


def test_full_queue_and_timeout_are_named(v1_copy: Path, x_iris: np.ndarray) -> None:
    sm = SessionManager(SwapConfig(queue_max=0, queue_timeout_s=0.2))
    with pytest.raises(ModelNotFound, match="not served"):
        sm.infer("iris", None, {"X": x_iris})
    sm.install(_load(v1_copy), "iris")
    sm.begin_gap("iris")
    with pytest.raises(ServerBusy, match="already wait"):
        sm.infer("iris", None, {"X": x_iris})
    sm.swap_cfg = SwapConfig(queue_max=4, queue_timeout_s=0.2)
    with pytest.raises(ServerBusy, match="queue timeout"):
        sm.infer("iris", None, {"X": x_iris})
    sm.end_gap("iris", None)
    assert sm.infer("iris", "1.0.0", {"X": x_iris})[1]["label"].shape == (3,)
    with pytest.raises(ModelNotFound, match=r"serves version 1\.0\.0"):
        sm.infer("iris", "2.0.0", {"X": x_iris})


def test_in_flight_request_finishes_on_old_session(v1_copy: Path, x_iris: np.ndarray) -> None:
    sm = SessionManager(SwapConfig())
    old = _load(v1_copy)
    sm.install(old, "iris")
    with sm.acquire("iris") as lm:
        new = _load(v1_copy)
        new.version = "9.9.9"
        assert sm.install(new, "iris") is old  # the swap does not wait for us
        assert lm is old and lm.run({"X": x_iris})[0].shape == (3,)  # we still run on old
        assert sm.get("iris") is new
    assert old.inflight == 0
