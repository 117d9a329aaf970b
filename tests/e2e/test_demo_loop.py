"""`edgefleet demo --loop` as a user runs it: every step of the loop prints its line, the
dashboard record of the iteration is written, and drift on the shifted devices is back to
normal at the end. Marked slow: a fleet, two packagings and a retraining (a few minutes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_loop_closes_the_loop(tmp_path: Path) -> None:
    workdir = tmp_path / "loop"
    run = subprocess.run(
        [sys.executable, "-m", "edgefleet", "demo", "--loop", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    out = " ".join((run.stdout + run.stderr).split())  # rich wraps lines at the width
    assert run.returncode == 0, out[-4000:]
    for n in range(1, 8):
        assert f"[step {n}]" in out, f"step {n} missing:\n{out[-4000:]}"
    assert "webhook: digits" in out  # the receiver printed the payload summary
    m = re.search(r"shift to first event ([0-9.]+) s", out)
    assert m and float(m.group(1)) < 120, out[-4000:]
    m = re.search(r"holdout accuracy 1\.0\.0 ([0-9.]+) -> 1\.2\.0 ([0-9.]+)", out)
    assert m and float(m.group(2)) > float(m.group(1)), out[-4000:]
    assert "drift state after: normal" in out
    assert "loop done: end to end" in out
    rec = json.loads((workdir / "controller" / "loops" / "1.json").read_text())
    assert [s["step"] for s in rec["steps"]] == list(range(1, 8)) and rec["state"] == "normal"
    assert rec["steps"][3]["figures"]["rows_total"] > 0
