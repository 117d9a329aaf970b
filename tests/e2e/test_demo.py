"""`edgefleet demo`, the README's first command: the whole story in one process tree, and
nothing left running afterwards, whether it finishes or is interrupted."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def leftovers(workdir: Path) -> list[str]:
    """Processes whose command line mentions the demo's work directory."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if str(workdir) in cmd and p.pid != os.getpid():
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


def wait_gone(workdir: Path, timeout: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_demo_json_reports_good_then_rolled_back_release(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    argv = [sys.executable, "-m", "edgefleet", "demo", "--devices", "3", "--json"]
    run = subprocess.run(
        [*argv, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout)
    good, bad = summary["rollouts"]
    assert (good["version"], good["phase"]) == ("1.0.0", "succeeded")
    assert {d["state"] for d in good["devices"]} == {"succeeded"}
    assert (bad["version"], bad["phase"]) == ("1.1.0", "aborted")
    failed = [d for d in bad["devices"] if d["state"] == "failed"]
    assert failed and {d["reason_code"] for d in failed} == {"latency_gate"}
    assert {d["rollback"] for d in failed} == {"done"}
    assert bad["counts"]["rollback_requested"] == bad["counts"]["rolled_back"] >= 1
    assert summary["installed"] == dict.fromkeys(summary["installed"], "1.0.0")
    assert len(summary["installed"]) == 3
    assert wait_gone(workdir) == []


def test_demo_interrupted_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "demo", "--devices", "2", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(
        target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")],  # type: ignore[union-attr]
        daemon=True,
    )
    reader.start()
    try:
        deadline = time.monotonic() + 240
        seen = ""
        while "agents:" not in seen and time.monotonic() < deadline:
            try:
                seen += lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, seen
        assert "agents:" in seen, seen
        assert leftovers(workdir), "the demo's children should be running now"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert wait_gone(workdir) == []
