"""Hot-swap under steady concurrent load from a separate client process: zero failed requests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefleet.agent.config import SwapConfig
from edgefleet.agent.runtime import Agent, UpdateRequest
from tests.agent.helpers import REPO, wait_for


@pytest.mark.parametrize("mode", ["overlap", "unload_first"])
def test_swap_under_load_fails_nothing(
    mode: str,
    tmp_path: Path,
    pkgs: dict[str, Path],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
) -> None:
    agent = agent_factory(v1_copy, swap=SwapConfig(mode=mode, queue_max=64))
    stop, out = tmp_path / "stop", tmp_path / "load.json"
    client = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.agent.load_client",
            str(agent.http_port),
            "iris",
            str(stop),
            str(out),
            "--threads",
            "3",
        ],
        cwd=str(REPO),
    )
    try:
        wait_for(lambda: out.with_suffix(".started").exists(), 30, what="client load started")
        view = agent.wait_update(
            agent.submit_update(UpdateRequest("iris", "1.1.0", str(pkgs["v2"]))), 60
        )
        assert view["state"] == "COMMITTED", view
        swap = next(t for t in view["history"] if t["state"] == "PROBATION")["figures"]["swap"]
        assert swap == mode
        before = agent.sessions.get("iris")
        assert before is not None and before.version == "1.1.0"
        wait_for(lambda: before.stats.snapshot()[0] >= 20, 30, what="requests on 1.1.0")
    finally:
        stop.write_text("stop")
        client.wait(timeout=60)
    res = json.loads(out.read_text())
    assert res["failed"] == 0, res["errors"]
    assert res["versions"].get("1.0.0", 0) > 0 and res["versions"].get("1.1.0", 0) > 0, res[
        "versions"
    ]
