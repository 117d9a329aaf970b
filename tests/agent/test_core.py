"""Pure parts: the transition table, recovery decisions, journal, config, OIP codec, gates."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent import oip
from edgefleet.agent.config import ConfigError, load_config
from edgefleet.agent.journal import Journal, Recovery, UpdateRecord, decide_recovery
from edgefleet.agent.sessions import plan_swap
from edgefleet.agent.states import (
    BEFORE_ACTIVATION,
    ROUTES,
    TERMINAL,
    TRANSITIONS,
    OnRestart,
    State,
    TransitionError,
    check_transition,
    end_of_rollback,
    failure_route,
)
from edgefleet.agent.store import ModelStore, Pointers
from edgefleet.agent.validation import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    Figures,
    judge,
    sample_agreement,
    sample_tolerances,
)
from edgefleet.wire.states import TERMINAL_STATES

HAPPY = [
    "IDLE",
    "DOWNLOADING",
    "VERIFYING",
    "INSTALLING",
    "VALIDATING",
    "ACTIVATING",
    "PROBATION",
    "COMMITTED",
]


def test_happy_path_and_failures_follow_the_table() -> None:
    for a, b in itertools.pairwise(HAPPY):
        check_transition(State(a), State(b))
    for s in ["IDLE", "DOWNLOADING", "VERIFYING", "INSTALLING", "VALIDATING"]:
        check_transition(State(s), State.FAILED)
    check_transition(State.PROBATION, State.ROLLING_BACK)
    check_transition(State.ROLLING_BACK, State.ROLLED_BACK)
    with pytest.raises(TransitionError):
        check_transition(State.ACTIVATING, State.FAILED)  # the old model no longer serves alone
    with pytest.raises(TransitionError):
        check_transition(State.VALIDATING, State.PROBATION)
    check_transition(State.IDLE, State.REMOVING)
    check_transition(State.REMOVING, State.REMOVED)
    with pytest.raises(TransitionError):
        check_transition(State.REMOVING, State.FAILED)  # a removal is finished, never abandoned
    terminal = {State.COMMITTED, State.FAILED, State.ROLLED_BACK, State.REMOVED}
    assert terminal | {State.ROLLBACK_FAILED} == TERMINAL
    assert set(TRANSITIONS) == set(State)


@pytest.mark.parametrize(
    ("state", "resumes", "action"),
    [
        ("IDLE", 0, Recovery.RESUME),
        ("DOWNLOADING", 0, Recovery.RESUME),
        ("VALIDATING", 2, Recovery.RESUME),
        ("VALIDATING", 3, Recovery.FAIL),
        ("ACTIVATING", 0, Recovery.RESUME),
        ("ACTIVATING", 3, Recovery.ROLL_BACK),
        ("PROBATION", 0, Recovery.ROLL_BACK),
        ("PROBATION", -1, Recovery.RESUME),  # -1: stopped gracefully, 0 resumes so far
        ("PROBATION", -3, Recovery.ROLL_BACK),  # stopped gracefully, but resumed 3 times
        ("ROLLING_BACK", 0, Recovery.FINISH_ROLLBACK),
        ("COMMITTED", 0, Recovery.NONE),
        ("FAILED", 9, Recovery.NONE),
    ],
)
def test_decide_recovery(state: str, resumes: int, action: Recovery) -> None:
    graceful = resumes < 0
    assert decide_recovery(State(state), abs(resumes), stopped_gracefully=graceful) is action


def test_walk_the_table_every_failure_route_and_restart() -> None:
    """Every state reachable, each failure route an edge of the table ending in a terminal
    state, and crash recovery giving up exactly along that route."""
    seen, todo = {State.IDLE}, [State.IDLE]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(State)
    give_up = {State.FAILED: Recovery.FAIL, State.ROLLING_BACK: Recovery.ROLL_BACK}
    for state, route in ROUTES.items():
        fail = failure_route(state)
        if state in TERMINAL:
            assert fail is None and route.restart is OnRestart.NOTHING
            assert decide_recovery(state, 0) is Recovery.NONE
            continue
        if fail is None:  # only finishing is left to do: a restart finishes it
            assert route.restart in (OnRestart.FINISH_ROLLBACK, OnRestart.FINISH_REMOVAL)
            assert decide_recovery(state, 99) is Recovery(route.restart.value)
            continue
        check_transition(state, fail)
        end = fail
        if end is State.ROLLING_BACK:  # it ends ROLLED_BACK (ROLLBACK_FAILED for a rollback)
            assert TRANSITIONS[end] == {end_of_rollback(False), end_of_rollback(True)}
            end = end_of_rollback(False)
        assert end in (State.FAILED, State.ROLLED_BACK)
        # a rollback update fails loudly instead: ROLLBACK_FAILED, never a plain FAILED
        assert failure_route(state, rollback=True) is (
            State.ROLLBACK_FAILED if fail is State.FAILED else fail
        )
        check_transition(state, failure_route(state, rollback=True))  # type: ignore[arg-type]
        # FAILED only while the old model still serves alone; from ACTIVATING on, a rollback.
        assert (fail is State.FAILED) == (state in BEFORE_ACTIVATION)
        assert decide_recovery(state, 99) is give_up[fail]
        first = decide_recovery(state, 0)
        assert first is (Recovery.RESUME if route.restart is OnRestart.RESUME else give_up[fail])
    assert failure_route(State.ACTIVATING) is State.ROLLING_BACK
    assert failure_route(State.VALIDATING) is State.FAILED
    # What the controller reads as "over" is exactly what the agent's table ends in.
    assert TERMINAL == TERMINAL_STATES


def test_decide_recovery_of_a_rollback() -> None:
    # a restart in PROBATION is a reason to distrust a new version, not one this device committed
    assert decide_recovery(State.PROBATION, 0) is Recovery.ROLL_BACK
    assert decide_recovery(State.PROBATION, 0, rollback=True) is Recovery.RESUME
    assert decide_recovery(State.PROBATION, 3, rollback=True) is Recovery.ROLL_BACK
    assert end_of_rollback(True) is State.ROLLBACK_FAILED


def test_decide_recovery_of_a_removal() -> None:
    assert decide_recovery(State.REMOVING, 0) is Recovery.FINISH_REMOVAL
    assert decide_recovery(State.REMOVING, 9) is Recovery.FINISH_REMOVAL
    assert decide_recovery(State.IDLE, 9, removal=True) is Recovery.RESUME  # never given up
    assert decide_recovery(State.REMOVED, 0, removal=True) is Recovery.NONE


def test_journal_persists_before_memory_and_refuses_bad_transitions(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    rec = UpdateRecord(id="u1", model="m", version="1.0.0", source="/x")
    j.create(rec)
    j.transition(rec, State.DOWNLOADING)
    on_disk = json.loads(j.path("u1").read_text())
    assert on_disk["state"] == "DOWNLOADING" and len(on_disk["history"]) == 2
    with pytest.raises(TransitionError):
        j.transition(rec, State.COMMITTED)
    assert rec.state == "DOWNLOADING" and j.load("u1").state == "DOWNLOADING"  # type: ignore[union-attr]
    j.transition(rec, State.FAILED, "x", "because")
    assert j.unfinished() == [] and j.all()[0].history[-1].reason == "because"
    for i in range(3):
        r = UpdateRecord(id=f"v{i}", model="m", version="1.0.0", source="/x")
        j.create(r)
        if i < 2:
            j.transition(r, State.FAILED, "x", "y")
    assert j.prune(1) == 2  # the oldest finished ones go; the unfinished one stays
    assert sorted(r.id for r in j.all()) == ["v1", "v2"]
    (tmp_path / "updates" / ".u2.json.abcd.tmp").write_text("{half")  # an interrupted write
    assert len(Journal(tmp_path).all()) == 2
    assert not (tmp_path / "updates" / ".u2.json.abcd.tmp").exists()


def test_store_pointers_and_prune(tmp_path: Path) -> None:
    s = ModelStore(tmp_path)
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        s.version_dir("m", v).mkdir(parents=True)
        (s.version_dir("m", v) / "model.onnx").write_bytes(v.encode())
        s.record_install("m", v, {"member_digests": {}})
    s.version_dir("m", "2.0.0").mkdir()  # interrupted install: no record
    s.set_pointers("m", Pointers("1.2.0", "1.1.0"))
    s.discard_incomplete("m")
    assert not s.version_dir("m", "2.0.0").exists()
    assert s.prune("m") == ["1.0.0"]
    assert s.installed_versions("m") == ["1.1.0", "1.2.0"]
    with pytest.raises(ValueError):
        s.remove_version("m", "1.1.0")


def test_config_toml_env_and_errors(tmp_path: Path) -> None:
    p = tmp_path / "agent.toml"
    p.write_text(
        'device_id = "gw"\ndata_dir = "data"\ntrusted_keys = ["k/a.pem"]\n[probation]\nseconds = 2.5\n'
    )
    cfg = load_config(
        p,
        env={
            "EDGEFLEET_AGENT_HTTP_PORT": "9999",
            "EDGEFLEET_AGENT_MQTT_URL": "mqtt://127.0.0.1:1883",
            "EDGEFLEET_AGENT_SWAP_MODE": "unload_first",
        },
    )
    assert cfg.data_dir == tmp_path / "data" and cfg.trusted_keys == [tmp_path / "k/a.pem"]
    assert cfg.http_port == 9999 and cfg.mqtt.url == "mqtt://127.0.0.1:1883"
    assert cfg.probation.seconds == 2.5 and cfg.swap.mode == "unload_first"
    with pytest.raises(ConfigError, match="http_port"):
        load_config(p, env={"EDGEFLEET_AGENT_HTTP_PORT": "eighty"})
    p.write_text('device_id = "gw"\ndata_dir = "d"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="bogus"):
        load_config(p, env={})
    with pytest.raises(ConfigError, match="device_id"):
        load_config(None, env={"EDGEFLEET_AGENT_DATA_DIR": "/tmp/x"})


def test_oip_json_and_binary_roundtrip() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for binary in (False, True):
        body, headers = oip.encode_request({"X": x}, binary=binary, binary_outputs=binary)
        req = oip.parse_request(body, int(headers[oip.HEADER_LENGTH]) if binary else None)
        assert np.array_equal(req.inputs["X"], x) and req.inputs["X"].dtype == np.float32
        out = {"y": x * 2, "label": np.array([1, 2, 3], np.int64)}
        rbody, rheaders = oip.encode_response("m", "1", req, out)
        got = oip.decode_response(rbody, rheaders)
        assert np.array_equal(got["y"], x * 2) and got["label"].dtype == np.int64
        assert (oip.HEADER_LENGTH in rheaders) is binary


@pytest.mark.parametrize(
    ("body", "hl", "msg"),
    [
        (b"not json", None, "not JSON"),
        (b'{"inputs": []}', None, "non-empty"),
        (
            b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "data": [1]}]}',
            None,
            "does not fit",
        ),
        (
            b'{"inputs": [{"name": "X", "datatype": "NOPE", "shape": [1], "data": [1]}]}',
            None,
            "datatype",
        ),
    ],
)
def test_oip_malformed_requests(body: bytes, hl: int | None, msg: str) -> None:
    with pytest.raises(oip.ProtocolError, match=msg):
        oip.parse_request(body, hl)


def test_oip_binary_data_past_the_body() -> None:
    j = b'{"inputs": [{"name": "X", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}'
    with pytest.raises(oip.ProtocolError, match="runs past"):
        oip.parse_request(j + b"abcd", len(j))
    assert oip.parse_request(j + b"abcdefgh", len(j)).inputs["X"].shape == (2,)


def test_validation_gates() -> None:
    exp = {"p": np.array([[0.1, 0.9], [0.5, 0.5]], np.float32), "l": np.array([1, 0])}
    got = {"p": np.array([[0.1, 0.9], [0.6, 0.4]], np.float32), "l": np.array([1, 0])}
    agree, err, n = sample_agreement(exp, got, 1e-4, 1e-3)
    assert (agree, n) == (0.5, 2) and err == pytest.approx(0.1, abs=1e-6)
    f = Figures(samples=2, agreement=agree, p95_ms=3.0, memory_growth_mb=10)
    assert judge(f, {"min_sample_agreement": 0.5}) is None
    assert judge(f, {}).code == "sample_mismatch"  # type: ignore[union-attr]
    assert judge(f, {"min_sample_agreement": 0.5, "max_p95_ms": 2.0}).code == "latency_gate"  # type: ignore[union-attr]
    assert judge(f, {"min_sample_agreement": 0.5, "max_memory_mb": 5}).code == "memory_gate"  # type: ignore[union-attr]


def test_a_zero_sample_tolerance_stays_zero() -> None:
    # Every shipped CPU profile sets sample_rtol = 0.0; it used to become 1e-3 on the device.
    assert sample_tolerances({"sample_atol": 0.05, "sample_rtol": 0.0}) == (0.05, 0.0)
    assert sample_tolerances({"sample_atol": 0, "sample_rtol": 0}) == (0.0, 0.0)
    assert sample_tolerances({}) == (DEFAULT_ATOL, DEFAULT_RTOL)
    assert sample_tolerances({"sample_atol": None}) == (DEFAULT_ATOL, DEFAULT_RTOL)
    exp = {"y": np.array([[100.0]])}
    got = {"y": np.array([[100.05]])}  # within rtol 1e-3 of 100, outside atol 0.01
    atol, rtol = sample_tolerances({"sample_atol": 0.01, "sample_rtol": 0.0})
    assert sample_agreement(exp, got, atol, rtol)[0] == 0.0
    assert sample_agreement(exp, got, atol, DEFAULT_RTOL)[0] == 1.0


def test_swap_decisions() -> None:
    assert plan_swap("auto", 1000, 100, 50) == "overlap"
    assert plan_swap("auto", 120, 100, 50) == "unload_first"
    assert plan_swap("overlap", 0, 100, 50) == "overlap"


def test_device_resources_are_judged_purely() -> None:
    from edgefleet.agent.update.checks import Resources, check_resources
    from edgefleet.agent.update.events import StepFailed

    mb = 2**20
    m = {
        "members": {"model.onnx": {"size": 10 * mb}, "samples.npz": {"size": mb}},
        "model": {"file": "model.onnx"},
    }
    check_resources(
        m, Resources(free_disk=12 * mb, available_mb=21.0, disk_headroom=0, memory_headroom_mb=1)
    )
    for have, code in [
        (Resources(free_disk=11 * mb, available_mb=99, disk_headroom=1, memory_headroom_mb=0), "disk_full"),
        (Resources(free_disk=None, available_mb=20.5, disk_headroom=0, memory_headroom_mb=1), "memory_insufficient"),
    ]:  # fmt: skip
        with pytest.raises(StepFailed) as ei:
            check_resources(m, have)
        assert ei.value.code == code
