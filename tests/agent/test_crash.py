"""kill -9 of the agent process at every state and at random instants; the restarted agent
serves a verified model and finishes or rolls back the update."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from agent.store import ModelStore
from edgefleet.keys import KeyPair
from tests.agent.helpers import AgentProcess, OipClient, served_version, wait_for, write_config

STATES = ["DOWNLOADING", "VERIFYING", "INSTALLING", "VALIDATING", "ACTIVATING", "PROBATION"]


def _config(tmp_path: Path, v1_data: Path, keys: dict[str, KeyPair], **extra: object) -> Path:
    data = tmp_path / "data"
    shutil.copytree(v1_data, data)
    return write_config(tmp_path / "cfg", data, [keys["trusted"].public_path], **extra)


def _assert_verified_serving(port: int, data: Path, x: np.ndarray, expect: str) -> None:
    assert served_version(port, "iris", x) == expect
    store = ModelStore(data)
    assert store.pointers("iris").current == expect
    store.check_integrity("iris", expect)  # every member matches the digests verified at install
    assert not [p for p in (data / "models" / "iris").iterdir() if p.name.startswith(".")]
    assert not list((data / "downloads").iterdir())  # no package or .part left behind


@pytest.mark.parametrize("state", STATES)
def test_kill_at_every_state(
    state: str,
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    cfg = _config(tmp_path, v1_data, keys)
    agent = AgentProcess(cfg, pause_at=state)
    try:
        uid = agent.submit(pkgs["v2"])
        wait_for(
            lambda: (agent.data_dir / f"paused-{state}").exists(), 60, what=f"pause at {state}"
        )
    finally:
        agent.kill()
    (agent.data_dir / f"paused-{state}").unlink()
    agent = AgentProcess(cfg)
    try:
        view = agent.wait_terminal(uid)
        expect = "ROLLED_BACK" if state == "PROBATION" else "COMMITTED"
        assert view["state"] == expect, view
        if state == "PROBATION":
            assert view["reason_code"] == "interrupted_probation"
        assert view["resumes"] == (0 if state == "PROBATION" else 1)
        _assert_verified_serving(
            agent.port, agent.data_dir, x_iris, "1.1.0" if expect == "COMMITTED" else "1.0.0"
        )
    finally:
        agent.stop()


def test_kill_while_rolling_back(
    tmp_path: Path, keys: dict[str, KeyPair], pkgs: dict[str, Path]
) -> None:
    """A probation breach starts a rollback; killed there, the restart finishes it."""
    data = tmp_path / "data"
    cfg = write_config(
        tmp_path / "cfg",
        data,
        [keys["trusted"].public_path],
        probation={
            "seconds": 30.0,
            "min_requests": 3,
            "max_error_rate": 0.1,
            "commit_after_requests": 5,
        },
    )
    agent = AgentProcess(cfg, pause_at="ROLLING_BACK")
    try:
        # 1.0.0 commits after 5 healthy requests (commit_after_requests)
        uid1 = agent.submit(pkgs["lookup1"])
        x_ok = np.array([1.0, 2.0], np.float32)
        c = OipClient(agent.port)
        wait_for(lambda: c.infer("lookup", {"X": x_ok})[0] == 200, 60, 0.1, "lookup 1.0.0 serving")
        for _ in range(5):
            assert c.infer("lookup", {"X": x_ok})[0] == 200
        assert agent.wait_terminal(uid1)["state"] == "COMMITTED"
        uid2 = agent.submit(pkgs["lookup2"])
        wait_for(
            lambda: c.infer("lookup", {"X": x_ok})[1].get("model_version") == "2.0.0",
            60,
            0.1,
            "lookup 2.0.0 serving",
        )
        for _ in range(5):  # index 50 is out of the table: a runtime error of the model
            c.infer("lookup", {"X": np.array([50.0], np.float32)})
        c.close()
        wait_for(lambda: (data / "paused-ROLLING_BACK").exists(), 60, what="pause at ROLLING_BACK")
    finally:
        agent.kill()
    (data / "paused-ROLLING_BACK").unlink()
    agent = AgentProcess(cfg)
    try:
        view = agent.wait_terminal(uid2)
        assert view["state"] == "ROLLED_BACK", view
        assert view["reason_code"] == "probation_error_rate"
        assert served_version(agent.port, "lookup", np.array([3.0], np.float32)) == "1.0.0"
    finally:
        agent.stop()


def test_kill_at_random_instants(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    rng = random.Random(1234)
    for i in range(4):  # bounded: 4 power cuts at random instants of an update
        cfg = _config(tmp_path / f"run{i}", v1_data, keys)
        agent = AgentProcess(cfg)
        try:
            uid = agent.submit(pkgs["v2"])
            delay = rng.uniform(0.0, 0.6)
            time.sleep(delay)
        finally:
            agent.kill()
        agent = AgentProcess(cfg)
        try:
            view = agent.wait_terminal(uid)
            assert view["state"] in ("COMMITTED", "ROLLED_BACK"), view
            expect = "1.1.0" if view["state"] == "COMMITTED" else "1.0.0"
            _assert_verified_serving(agent.port, agent.data_dir, x_iris, expect)
        finally:
            agent.stop()
