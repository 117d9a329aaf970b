"""`edgefleet demo --loop --quick` on real processes (controller, broker, agents, the packager,
ONNX Runtime), unmarked so CI runs it: drift is announced, the controller's capture_on_drift
starts the captures from the events (lineage: the event), the retrained model passes the holdout
gate, each wave runs in shadow first and is promoted on its figures, the waves' soak is gated
on drift, and drift on the shifted devices returns to normal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def test_quick_loop_closes_the_loop_through_capture_on_drift_and_shadow(tmp_path: Path) -> None:
    workdir = tmp_path / "loop"
    log, doc = tmp_path / "loop.log", tmp_path / "loop.json"
    with log.open("w") as err, doc.open("w") as out_f:  # on a timeout the log shows the step
        run = subprocess.run(
            [sys.executable, "-m", "edgefleet", "demo", "--loop", "--quick", "--json",
             "--workdir", str(workdir)],
            stdout=out_f, stderr=err, text=True, timeout=560, check=False,
        )  # fmt: skip
    out = " ".join(log.read_text().split())  # rich wraps lines at the width
    assert run.returncode == 0, out[-4000:]
    summary = json.loads(doc.read_text())
    assert summary["profile"] == "quick"
    for n in range(1, 8):
        assert f"[step {n}]" in out, f"step {n} missing:\n{out[-4000:]}"
    assert "capture started by the controller: cap-" in out  # the webhook names it
    it = summary["iterations"][0]
    steps = {s["step"]: s["figures"] for s in it["steps"]}
    assert steps[3]["false_alarms"] == [] and steps[3]["shift_to_event_s"] > 0  # timing: bench
    caps = steps[4]["captures"]
    assert sorted(caps) == sorted(steps[2]["devices"])  # one capture per drifting device
    assert steps[4]["rows_total"] > 0 and all(n > 0 for n in steps[4]["rows"].values())
    assert steps[5]["accuracy_new"] > steps[5]["accuracy_old"]
    shadow = steps[6]["shadow"]
    assert [w["verdict"] for w in shadow] == ["promoted", "promoted"]  # both waves
    assert all(w["compared"] >= 10 and w["agreement"] >= steps[6]["min_agreement"] for w in shadow)
    assert steps[6]["max_drift"] > 0
    assert "shadow wave 1:" in out and "agreement" in out
    assert it["state"] == "normal"
    # the capture's lineage names the drift event that started it (the controller's database)
    import sqlite3

    db = sqlite3.connect(workdir / "controller" / "controller.db")
    try:
        got = db.execute("SELECT id, drift_event_id, created_by FROM capture_sessions").fetchall()
    finally:
        db.close()
    # the captures the loop trained on, and any a later episode started (a look stalled past
    # the quiet time on a loaded machine reopens one), were each started by an event
    assert set(caps.values()) <= {c for c, _, _ in got}
    assert all(e is not None and by == f"drift-event:{e}" for _, e, by in got)
    m = re.search(r"loop done: end to end ([0-9.]+) s", out)
    assert m, out[-2000:]
    print(f"\nquick loop: end to end {m.group(1)} s, iteration {it['loop_s']} s")
