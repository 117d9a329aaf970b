"""kill -9 of the agent process at every state and at random instants; the restarted agent
serves a verified model and finishes or rolls back the update."""

from __future__ import annotations

import random
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from edgefleet.agent.server import QuietServer
from edgefleet.agent.store import ModelStore
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


class _SlowHandler(BaseHTTPRequestHandler):
    """Serves one package slowly, honouring Range, and records the Range headers it saw."""

    protocol_version = "HTTP/1.1"
    data = b""
    ranges: ClassVar[list[str]] = []

    def log_message(self, *args: object) -> None:
        return

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        type(self).ranges.append(rng or "")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = self.data[start:]
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header(
                "Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
            )
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for i in range(0, len(body), 512):  # ~10 KB/s: a kill lands mid-download
                self.wfile.write(body[i : i + 512])
                self.wfile.flush()
                time.sleep(0.05)
        except OSError:
            return


def test_kill_mid_download_resumes_with_range(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    _SlowHandler.data = pkgs["v2"].read_bytes()
    _SlowHandler.ranges = []
    srv = QuietServer(("127.0.0.1", 0), _SlowHandler)  # the killed agent hangs up: no error
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/iris-1.1.0.efpkg"
    try:
        cfg = _config(tmp_path, v1_data, keys)
        agent = AgentProcess(cfg)
        try:
            uid = agent.submit(url)
            parts = agent.data_dir / "downloads"
            wait_for(
                lambda: any(p.stat().st_size >= 3000 for p in parts.glob("*.part")),
                30,
                0.02,
                "a partly downloaded package",
            )
        finally:
            agent.kill()
        cut_at = max(p.stat().st_size for p in parts.glob("*.part"))
        agent = AgentProcess(cfg)
        try:
            view = agent.wait_terminal(uid)
            assert view["state"] == "COMMITTED", view
            resumed = int(_SlowHandler.ranges[-1].split("=")[1].rstrip("-"))
            assert _SlowHandler.ranges[0] == "" and resumed >= cut_at > 0
            verifying = next(t for t in view["history"] if t["state"] == "VERIFYING")
            assert verifying["figures"]["resumed_from"] == resumed
            _assert_verified_serving(agent.port, agent.data_dir, x_iris, "1.1.0")
        finally:
            agent.stop()
    finally:
        srv.shutdown()
        srv.server_close()
