"""The scale benchmark at a few dozen devices, so that its code cannot rot between big runs.

It runs ``python -m bench scale`` for real (a Mosquitto, a controller process on SQLite, 40
simulated devices in one worker process) and checks what the big run's table is made of: the
rollout succeeded on every device, every status report's seq and every telemetry record reached
the database, and the baseline measured the same flows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import require

DEVICES, FLOOD, TELEMETRY = 40, 3, 3


@pytest.mark.timeout(120)
def test_scale_bench_small_fleet(tmp_path: Path) -> None:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    out = tmp_path / "scale.json"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "scale",
            f"--devices={DEVICES}",
            "--procs=1",
            f"--flood={FLOOD}",
            f"--telemetry={TELEMETRY}",
            "--timeout=60",
            f"--json={out}",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["skipped"] == "" and row["phase"] == "succeeded"
    assert row["telemetry_rows"] == DEVICES * TELEMETRY * 3  # three records per envelope
    assert row["status_rate"] > 0 and row["telemetry_rate"] > 0
    base = row["baseline"]
    assert base["status_msgs"] == DEVICES * FLOOD
    assert base["telemetry_msgs"] == DEVICES * TELEMETRY
    sizes = report["sizes"]["mosquitto"]
    assert sizes["desired_bytes_max"] > 200  # a signed desired state was received and measured
    assert "scale: 40 devices" in proc.stdout


def test_rollout_only_runs_a_small_rollout_to_its_end(capsys: pytest.CaptureFixture[str]) -> None:
    """`--rollout-only`: the rollout service alone takes every device through three waves."""
    from bench.bench_scale import main

    assert main(["--rollout-only", "--devices=30"]) == 0
    out = capsys.readouterr().out
    assert "sqlite rollout of 30 devices: succeeded, 210 reports" in out, out
