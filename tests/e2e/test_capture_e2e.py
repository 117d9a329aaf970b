"""Capture on demand end to end with real processes: Mosquitto with the generated ACL, the
controller process, two `edgefleet agent run` processes serving the example model (one with
``[capture] allowed = true`` through its environment, one with the default), live HTTP
requests, and the CLI: `capture start` → rows from the allowed agent only → `capture export` →
files the packager's reader takes. Marked slow (packaging and a fleet: about a minute)."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.demo.fleet import Fleet
from edgefleet.demo.rollouts import rollout_body
from edgefleet.demo.spec import MODEL_NAME, FleetSpec
from tests.support.services import require

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _infer(port: int, row: np.ndarray) -> None:
    body = {
        "inputs": [
            {
                "name": "features",
                "shape": [1, 64],
                "datatype": "FP32",
                "data": [float(v) for v in row],
            }
        ]
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/{MODEL_NAME}/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def test_real_agents_capture_only_where_allowed(tmp_path: Path) -> None:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    from edgefleet.cli import app
    from edgefleet.packager.examples import digits_split
    from edgefleet.packager.pipeline import _load_data

    f = Fleet(FleetSpec(tmp_path, devices=2, broker="mosquitto", secure=True, probation_s=0.5))
    try:
        f.make_keys()
        f.build_packages(("1.0.0",), ())
        f.start_controller()
        f.register_devices()
        f.start_broker()
        allowed, forbidden = f.spec.device_ids()
        f.start_agent(allowed, {"EDGEFLEET_AGENT_CAPTURE_ALLOWED": "true"})
        f.start_agent(forbidden)
        for path in f.packages.values():
            f.upload(path)
        f.wait_online()
        rid = f.create_rollout(rollout_body("1.0.0", f.spec.device_ids(), waves=[100.0]))
        assert f.wait_rollout(rid, timeout=120)["phase"] == "succeeded"
        assert f.api is not None
        cli = ["--url", f.api.base, "--token", f.api.token]
        run = CliRunner().invoke(
            app,
            ["capture", "start", MODEL_NAME, "--devices", f"{allowed},{forbidden}",
             "--rows", "60", "--sample-rate", "0.5", "--max-rows-per-minute", "600", *cli],
        )  # fmt: skip
        assert run.exit_code == 0, run.output
        cid = run.output.strip()
        rows = digits_split().x_val
        t0 = time.monotonic()
        shown: dict[str, object] = {}
        for i in range(2000):
            for dev in (allowed, forbidden):
                _infer(f.agent_ports[dev], rows[i % len(rows)])
            if i % 20 == 0:
                shown = f.api.call("GET", f"/api/v1/captures/{cid}")
                per = shown["per_device"]  # type: ignore[index]
                if per[allowed]["rows"] >= 30 and per[forbidden]["forbidden"]:
                    break
        per = shown["per_device"]  # type: ignore[index]
        assert per[allowed]["rows"] == 30 and per[allowed]["done"] == "rows", shown
        assert per[forbidden]["forbidden"] and per[forbidden]["rows"] == 0, shown
        took = time.monotonic() - t0
        cal, val = tmp_path / "cal.npz", tmp_path / "val.npz"
        run = CliRunner().invoke(
            app,
            ["capture", "export", cid, "--out", str(cal), "--holdout", "0.2",
             "--holdout-out", str(val), *cli],
        )  # fmt: skip
        assert run.exit_code == 0, run.output
        c, v = _load_data(cal, ["features"], "cal"), _load_data(val, ["features"], "val")
        assert c["features"].shape == (24, 64) and v["features"].shape == (6, 64)
        print(f"real agent: 30 rows captured in {took:.1f}s at sample rate 0.5")
    finally:
        f.close()
