"""Shadow evaluation on the agent: real packages and sessions, the update worker's shadow phase,
the comparison rules, the bounded mirror queue and the wire format of its figures."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.config import ShadowConfig
from edgefleet.agent.runtime import Agent, UpdateEvent, UpdateRequest
from edgefleet.agent.shadow import ShadowBoard, ShadowSlot, memory_refusal, outputs_agree
from edgefleet.wire.shadow import ShadowError, ShadowSpec, parse_figures, parse_spec
from edgefleet.wire.status import parse as parse_status

SPEC = ShadowSpec(requests=5, sample=1.0, window_s=0.2).to_dict()


def wait(pred: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())


def state_of(a: Agent, uid: str) -> str | None:
    view = a.update(uid)
    return view["state"] if view else None


# --- pure parts --------------------------------------------------------------------------------


def test_class_outputs_agree_on_top1_scores_within_tolerance() -> None:
    p = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    q = np.array([[0.3, 0.4, 0.3]], dtype=np.float32)  # same argmax, other scores
    assert outputs_agree({"probabilities": p}, {"probabilities": q}, 1e-3, 1e-4)
    other = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)  # another class wins
    assert not outputs_agree({"p": p}, {"p": other}, 1e-3, 1e-4)
    r = np.array([[1.0]], dtype=np.float32)  # a regression output: tolerance
    assert outputs_agree({"y": r}, {"y": r + 1e-5}, 1e-3, 1e-4)
    assert not outputs_agree({"y": r}, {"y": r + 0.1}, 1e-3, 1e-4)
    assert not outputs_agree({"p": p}, {"p": q}, 1e-3, 1e-4, rule="tolerance")
    labels = np.array([1, 2], dtype=np.int64)
    assert not outputs_agree({"label": labels}, {"label": labels[::-1].copy()}, 0, 0)
    assert not outputs_agree({"label": labels}, {}, 0, 0)  # an output missing: no agreement


def test_memory_refusal_weighs_size_factor_and_headroom() -> None:
    assert memory_refusal(100, 2.0, 300, 32) is None
    why = memory_refusal(100, 2.0, 200, 32)
    assert why is not None and "232.0 MB" in why


def test_board_keeps_promotes_or_drops() -> None:
    b = ShadowBoard()
    assert b.decision("m", "2") == "shadow"  # nothing said yet (a resumed shadow): keep going
    b.steer("m", "2", True)
    assert b.decision("m", "2") == "shadow"
    b.steer("m", "2", False)
    assert b.decision("m", "2") == "promote"
    b.steer("m", "1", False)
    assert b.decision("m", "2") == "drop"
    b.steer("m", None, False)
    assert b.decision("m", "2") == "drop"


def test_spec_and_figures_are_bounded_and_checked() -> None:
    assert parse_spec(None) is None
    assert parse_spec(SPEC) == ShadowSpec(requests=5, sample=1.0, window_s=0.2)
    for bad in (
        {"requests": 0},
        {"requests": True},
        {"sample": 0},
        {"sample": 1.5},
        {"window_s": 1e9},
        {"rtol": float("nan")},
        {"compare": "vibes"},
        {"extra": 1},
        [],
    ):
        with pytest.raises(ShadowError):
            parse_spec(bad)
    good = {"window": 1, "total": {"compared": 3, "agreed": 2}, "last": {"compared": 1}}
    assert parse_figures(good).agreement == pytest.approx(2 / 3)
    for bad_fig in (
        {**good, "total": {"compared": 1, "agreed": 2}},  # agreed > compared
        {**good, "total": {"compared": -1}},
        {**good, "total": {"compared": 2**41}},
        {**good, "window": 0},
        {**good, "serving_p95_ms": "fast"},
        {**good, "serving_p95_ms": 1e12},
        {**good, "last": {"compared": 9}},  # more in the window than in total
    ):
        with pytest.raises(ShadowError):
            parse_figures(bad_fig)
    msg = {
        "device_id": "gw-1",
        "kind": "shadow",
        "state": "SHADOW",
        "model": "iris",
        "version": "1.1.0",
        "seq": 4,
        "figures": good,
    }
    rep = parse_status(msg)
    assert rep.kind == "shadow" and rep.state is None and rep.to_dict()["state"] == "SHADOW"
    with pytest.raises(ValueError):
        parse_status({**msg, "figures": {**good, "window": -1}})
    with pytest.raises(ValueError):
        parse_status({**msg, "state": "COMMITTED"})


class _Slow:
    """A LoadedModel stand-in whose run blocks until released: the queue fills."""

    name, version = "iris", "2"

    def __init__(self) -> None:
        from edgefleet.agent.sessions import TensorSpec

        self.inputs = [TensorSpec("X", np.float32, (None, 4), "tensor(float)")]
        self.release = threading.Event()

    def check_inputs(self, feed: Any) -> None:
        pass

    def run(self, feed: Any, names: list[str]) -> list[object]:
        self.release.wait(5)
        return [feed["X"] for _ in names]


def test_a_full_queue_drops_and_counts_never_blocks() -> None:
    slow = _Slow()
    out: list[Any] = []
    slot = ShadowSlot(slow, "1", ShadowSpec(requests=1, window_s=60), out.append, queue_max=2)  # type: ignore[arg-type]
    slot.start()
    x = np.ones((1, 4), dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(50):
        slot.observe("iris", "1", {"X": x}, {"y": x}, 0.001, True)
    assert time.perf_counter() - t0 < 0.5  # the request path never waited
    slot.observe("iris", "0", {"X": x}, {"y": x}, 0.001, True)  # another version: ignored
    slow.release.set()
    assert wait(lambda: slot.compared >= 2, 5)
    slot.stop()
    fig = slot.report()
    assert fig.total.dropped >= 45 and fig.total.compared + fig.total.dropped == 50
    assert fig.total.agreed == fig.total.compared and fig.done


def test_sampling_mirrors_the_asked_share() -> None:
    slow = _Slow()
    slow.release.set()
    slot = ShadowSlot(slow, "1", ShadowSpec(sample=0.1, window_s=60), lambda f: None, queue_max=64)  # type: ignore[arg-type]
    slot.start()
    x = np.ones((1, 4), dtype=np.float32)
    for _ in range(200):
        slot.observe("iris", "1", {"X": x}, {"y": x}, 0.001, True)
    assert wait(lambda: slot.compared == 20, 5)
    # the candidate's thread yields the cores to serving (Linux: per-thread niceness)
    tid = slot._thread.native_id
    assert tid is not None
    assert os.getpriority(os.PRIO_PROCESS, tid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    slot.stop()


# --- the update worker's shadow phase, with real packages ----------------------------------------


def _shadow_events(events: list[UpdateEvent]) -> list[dict[str, Any]]:
    return [dict(e.figures or {}) for e in events if e.kind == "shadow"]


def _start(agent_factory: Any, v1_copy: Path, **kw: Any) -> tuple[Agent, list[UpdateEvent]]:
    a: Agent = agent_factory(data_dir=v1_copy, **kw)
    events: list[UpdateEvent] = []
    a.add_listener(events.append)
    return a, events


def _load(a: Agent, x: np.ndarray, stop: threading.Event, seen: set[str]) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            lm, _ = a.sessions.infer("iris", None, {"X": x})
            seen.add(lm.version)
            time.sleep(0.002)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_candidate_shadows_then_is_promoted(
    agent_factory: Any, v1_copy: Path, pkgs: dict[str, Path], x_iris: np.ndarray
) -> None:
    a, events = _start(agent_factory, v1_copy)
    a.steer_shadow("iris", "1.1.0", True)
    uid = a.submit_update(UpdateRequest("iris", "1.1.0", str(pkgs["v2"]), shadow=SPEC))
    stop, seen = threading.Event(), set[str]()
    t = _load(a, x_iris[:1], stop, seen)
    try:
        assert wait(lambda: any(f.get("done") for f in _shadow_events(events)), 30)
        assert state_of(a, uid) == "VALIDATING"
        assert seen == {"1.0.0"}  # nobody was answered by the candidate
        a.steer_shadow("iris", "1.1.0", False)
        assert wait(lambda: state_of(a, uid) == "COMMITTED", 30), a.update(uid)
    finally:
        stop.set()
        t.join(5)
    assert a.sessions.get("iris").version == "1.1.0"  # type: ignore[union-attr]
    figs = _shadow_events(events)
    assert all(set(f) >= {"window", "total", "last"} for f in figs)
    for f in figs:  # figures only: nothing of an input or output travels
        parse_figures(f)
    assert figs[-1]["total"]["compared"] >= 5
    activating = next(e for e in events if e.state == "ACTIVATING")
    assert activating.figures and activating.figures["shadow"]["total"]["compared"] >= 5


def test_candidate_dropped_when_the_desired_state_turns_back(
    agent_factory: Any, v1_copy: Path, pkgs: dict[str, Path], x_iris: np.ndarray
) -> None:
    a, events = _start(agent_factory, v1_copy)
    a.steer_shadow("iris", "1.1.0", True)
    uid = a.submit_update(UpdateRequest("iris", "1.1.0", str(pkgs["v2"]), shadow=SPEC))
    stop, seen = threading.Event(), set[str]()
    t = _load(a, x_iris[:1], stop, seen)
    try:
        assert wait(lambda: len(_shadow_events(events)) >= 1, 30)
        a.steer_shadow("iris", "1.0.0", False)  # the controller reverted it
        assert wait(lambda: state_of(a, uid) == "FAILED", 30)
    finally:
        stop.set()
        t.join(5)
    view = a.update(uid)
    assert view is not None and view["reason_code"] == "shadow_dropped"
    assert seen == {"1.0.0"} and a.sessions.get("iris").version == "1.0.0"  # type: ignore[union-attr]
    assert a.sessions.observers == [o for o in a.sessions.observers if "ShadowSlot" not in repr(o)]


def test_shadow_refused_without_memory_or_without_a_serving_version(
    agent_factory: Any, v1_copy: Path, tmp_path: Path, pkgs: dict[str, Path]
) -> None:
    a, _ = _start(agent_factory, v1_copy, shadow=ShadowConfig(memory_factor=1e9))
    uid = a.submit_update(UpdateRequest("iris", "1.1.0", str(pkgs["v2"]), shadow=SPEC))
    assert wait(lambda: state_of(a, uid) == "FAILED", 30)
    assert a.update(uid)["reason_code"] == "shadow_memory"  # type: ignore[index]
    assert a.sessions.get("iris").version == "1.0.0"  # type: ignore[union-attr]
    b: Agent = agent_factory(data_dir=tmp_path / "empty")
    uid = b.submit_update(UpdateRequest("iris", "1.1.0", str(pkgs["v2"]), shadow=SPEC))
    assert wait(lambda: state_of(b, uid) == "FAILED", 30)
    assert b.update(uid)["reason_code"] == "shadow_no_serving"  # type: ignore[index]


def test_mirrors_are_bounded_in_bytes_too() -> None:
    slow = _Slow()
    slot = ShadowSlot(  # type: ignore[arg-type]
        slow, "1", ShadowSpec(window_s=60), lambda f: None, queue_max=100, queue_bytes=4096
    )
    slot.start()
    big = np.ones((1, 4), dtype=np.float32).repeat(256, axis=0)  # 4 KiB
    for _ in range(5):
        slot.observe("iris", "1", {"X": big}, {"y": big[:1]}, 0.001, True)
    small = np.ones((1, 4), dtype=np.float32)
    slot.observe("iris", "1", {"X": small}, {"y": small}, 0.001, True)
    slow.release.set()
    assert wait(lambda: slot.compared >= 1, 5)
    slot.stop()
    fig = slot.report()
    assert fig.total.dropped == 5 and fig.total.compared == 1


def test_desired_state_shadow_entry_is_validated_and_steers_the_board() -> None:
    from datetime import UTC, datetime, timedelta

    from edgefleet.agent.mqtt.reconcile import parse_targets
    from edgefleet.wire.errors import RejectError
    from edgefleet.wire.mqtt import validate_desired

    now = datetime.now(UTC)
    entry = {"version": "1.1.0", "url": "https://c/x", "sha256": "a" * 64, "shadow": SPEC}
    state = {
        "device_id": "gw-1",
        "seq": 3,
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(hours=1)).isoformat(),
        "models": {"iris": entry},
    }
    validate_desired(state)
    (target,) = parse_targets(state)
    assert target.shadow == parse_spec(SPEC)
    bad = {**state, "models": {"iris": {**entry, "shadow": {"requests": -1}}}}
    with pytest.raises(RejectError) as e:
        validate_desired(bad)
    assert e.value.code == "manifest_invalid" and "shadow.requests" in e.value.message


def test_the_link_steers_shadows_from_each_desired_state(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from edgefleet.agent.mqtt.desired import DesiredStateHandler
    from edgefleet.agent.ports import Inventory
    from edgefleet.keys import generate_keypair, load_private_key, load_public_key
    from edgefleet.wire.mqtt import sign_desired

    class FakeAgent:
        def __init__(self) -> None:
            self.steered: list[tuple[str, str | None, bool]] = []
            self.submitted: list[UpdateRequest] = []

        def submit_update(self, req: UpdateRequest) -> str:
            self.submitted.append(req)
            return "u1"

        def remove_model(self, name: str, rollout_id: str | None = None) -> str:
            return "u2"

        def add_listener(self, cb: Any) -> None: ...

        def remove_listener(self, cb: Any) -> None: ...

        def inventory(self) -> Inventory:
            return {
                "device_id": "gw-1",
                "agent_version": "0",
                "execution_providers": [],
                "hardware": {},
                "profiles": [],
                "models": {
                    "iris": {
                        "version": "1.0.0",
                        "previous": None,
                        "state": "COMMITTED",
                        "serving": True,
                        "profile": None,
                        "providers": [],
                    }
                },
            }

        def unfinished_installs(self) -> dict[str, str]:
            return {}

        def steer_shadow(self, name: str, version: str | None, shadow: bool) -> None:
            self.steered.append((name, version, shadow))

    key = generate_keypair(tmp_path / "k", "ctl")
    agent = FakeAgent()
    h = DesiredStateHandler(
        agent, "gw-1", [load_public_key(key.public_path)], tmp_path / "link.json", lambda r: None
    )
    now = datetime.now(UTC)

    def desired(seq: int, models: dict[str, Any], remove: list[str] | None = None) -> bytes:
        state: dict[str, Any] = {
            "device_id": "gw-1",
            "seq": seq,
            "issued_at": now.isoformat(),
            "expires_at": (now + timedelta(hours=1)).isoformat(),
            "models": models,
        }
        if remove:
            state["remove"] = remove
        return sign_desired(state, load_private_key(key.private_path))

    entry = {"version": "1.1.0", "url": "https://c/x", "sha256": "a" * 64}
    h.handle(desired(1, {"iris": {**entry, "shadow": SPEC}}))
    assert agent.steered == [("iris", "1.1.0", True)]
    assert agent.submitted[0].shadow == parse_spec(SPEC).to_dict()  # type: ignore[union-attr]
    h.handle(desired(2, {"iris": entry}))  # promoted: no second install, the board says so
    assert agent.steered[-1] == ("iris", "1.1.0", False) and len(agent.submitted) == 1
    h.handle(desired(3, {}, remove=["iris"]))
    assert agent.steered[-1] == ("iris", None, False)
