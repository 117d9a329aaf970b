"""Explicit removal (`Agent.remove_model`): through the update worker and journal, idempotent,
finished after a kill -9 in REMOVING."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Agent, UpdateEvent, UpdateRequest
from edgefleet.agent.store import ModelStore
from edgefleet.keys import KeyPair
from tests.agent.helpers import AgentProcess, OipClient, served_version, wait_for, write_config

X_LOOKUP = np.arange(3, dtype=np.float32)


def test_remove_a_served_model_keeps_the_others(
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    agent = agent_factory(v1_copy)
    events: list[UpdateEvent] = []
    agent.add_listener(events.append)
    view = agent.wait_update(agent.submit_update(UpdateRequest("", "", str(pkgs["lookup1"]))))
    assert view["state"] == "COMMITTED", view
    port = agent.http_port
    assert port is not None
    assert served_version(port, "iris", x_iris) == "1.0.0"

    uid = agent.remove_model("iris")
    view = agent.wait_update(uid)
    assert view["state"] == "REMOVED" and view["action"] == "remove", view
    assert view["version"] == "1.0.0" and view["from_version"] == "1.0.0"
    assert [t["state"] for t in view["history"]] == ["IDLE", "REMOVING", "REMOVED"]
    # the journal is written before the listeners hear of it: wait for the last event
    wait_for(lambda: len([e for e in events if e.update_id == uid]) >= 3, 10, what="events")
    assert [e.state for e in events if e.update_id == uid] == ["IDLE", "REMOVING", "REMOVED"]
    assert view["history"][-1]["figures"]["versions_removed"] == ["1.0.0"]

    c = OipClient(port)
    try:
        status, body, _ = c.infer("iris", {"X": x_iris})
        assert status == 404, body
        status, meta, _ = c.infer("lookup", {"X": X_LOOKUP})
        assert status == 200 and meta["model_version"] == "1.0.0", meta
    finally:
        c.close()
    assert not (v1_copy / "models" / "iris").exists()
    assert "iris" not in agent.inventory()["models"]
    assert "lookup" in agent.inventory()["models"]

    # Not installed: a no-op that still reports REMOVED (the controller waits for it).
    again = agent.wait_update(agent.remove_model("iris"))
    assert again["state"] == "REMOVED" and again["version"] == "", again
    assert again["history"][-1]["figures"]["versions_removed"] == []


def test_kill_mid_removal_restart_finishes_it(
    tmp_path: Path, v1_data: Path, keys: dict[str, KeyPair], x_iris: np.ndarray
) -> None:
    data = tmp_path / "data"
    shutil.copytree(v1_data, data)
    cfg = write_config(tmp_path / "cfg", data, [keys["trusted"].public_path])
    agent = AgentProcess(cfg, pause_at="REMOVING")
    try:
        assert served_version(agent.port, "iris", x_iris) == "1.0.0"
        uid = str(agent.admin("DELETE", "/admin/models/iris")["id"])
        wait_for(lambda: (data / "paused-REMOVING").exists(), 60, what="pause in REMOVING")
    finally:
        agent.kill()
    (data / "paused-REMOVING").unlink()
    # Killed after REMOVING was journaled: nothing may bring the model back on restart.
    assert ModelStore(data).pointers("iris").current == "1.0.0"
    agent = AgentProcess(cfg)
    try:
        view: dict[str, Any] = agent.wait_terminal(uid)
        assert view["state"] == "REMOVED", view
        assert [t["state"] for t in view["history"]] == ["IDLE", "REMOVING", "REMOVED"]
        c = OipClient(agent.port)
        try:
            assert c.infer("iris", {"X": x_iris})[0] == 404
        finally:
            c.close()
        assert not (data / "models" / "iris").exists()
        assert ModelStore(data).names() == []
    finally:
        agent.stop()
