"""examples/retrain/retrain.py ``main()`` end to end against a running controller (uvicorn, its
bridge on Mosquitto, SQLite and PostgreSQL): a device sends captured rows of a shifted field over
MQTT, then the script exports the capture through the CLI, retrains, gates on the holdout,
packages with the captured rows as calibration, uploads, and starts a shadow rollout on the
event's devices. The rollout exists with the new version, and the capture's datasets carry the
lineage (capture, devices, versions)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgefleet.keys import KeyPair
from edgefleet.packager.examples import digits_split
from edgefleet.wire import capture as wc
from edgefleet.wire.mqtt import topic
from tests.controller.conftest import (  # noqa: F401  (fixtures)
    db_url,
    packager_key,
    start_controller,
)
from tests.examples.test_retrain import _field, _script

pytestmark = pytest.mark.timeout(300)
MODEL, DEV = "digits", "gw-retrain-1"


def _tensor(a: np.ndarray) -> dict[str, Any]:
    return wc.encode_tensor(a.dtype.name, a.shape, a.tobytes())


def test_main_exports_retrains_packages_uploads_and_starts_the_rollout(
    tmp_path: Path,
    broker: Any,
    db_url: str,  # noqa: F811
    packager_key: KeyPair,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edgefleet.cloud_controller import desired
    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.models import Device
    from edgefleet.demo.packages import host_profile

    rt = _script()
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url, db_url=db_url
    )
    admin = run.client("admin")
    try:
        assert run.controller.bridge.wait_connected(10)
        assert admin.post("/api/v1/devices", json={"device_id": DEV}).status_code == 201
        ctl = run.controller
        with transaction(ctl.factory) as s:  # the device serves digits 1.0.0 (its desired state)
            dev = s.get(Device, DEV)
            assert dev is not None
            dev.profiles = [host_profile()]  # what its hello reports
            row = desired.set_model(
                s,
                ctl.signer,
                DEV,
                MODEL,
                {"version": "1.0.0", "url": "http://x/p", "sha256": "0" * 64},
            )
            s.expunge(row)
        ctl.rollouts.publish_committed([row])
        r = admin.post(
            "/api/v1/captures",
            json={"model": MODEL, "devices": [DEV], "rows": 300, "sample_rate": 1.0,
                  "max_rows_per_minute": 3000},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        cid = r.json()["id"]
        # the device's capture records: 30 requests of 10 shifted digits images each
        x = _field(digits_split().x_val[:300])
        records = [
            {"id": i + 1, "kind": "row", "capture_id": cid, "model": MODEL, "version": "1.0.0",
             "ts": "2026-11-29T00:00:00Z", "inputs": {"features": _tensor(x[i * 10 : i * 10 + 10])},
             "outputs": {"label": _tensor(np.zeros(10, np.int64))}}
            for i in range(30)
        ]  # fmt: skip
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEV)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        try:
            for k in range(0, 30, 5):
                pub.publish(
                    topic(DEV, "capture"), json.dumps({"records": records[k : k + 5]}), qos=1
                )
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                cap = admin.get(f"/api/v1/captures/{cid}").json()
                if cap["rows"] >= 300:
                    break
                time.sleep(0.2)
        finally:
            pub.loop_stop()
            pub.disconnect()
        assert cap["rows"] == 300 and cap["state"] == "complete", cap
        # the version in the field: trained on the original split only
        none = np.zeros((0, 64), np.float32)
        current = rt.export_onnx(rt.retrain(none, np.zeros(0, np.int64)), tmp_path / "cur.onnx")
        event = {"type": "edgefleet.drift", "model": MODEL, "scope": "device", "scope_key": DEV,
                 "devices": [DEV], "capture": {"id": cid, "command": "…"}}  # fmt: skip
        (tmp_path / "event.json").write_text(json.dumps(event))
        monkeypatch.setenv("EDGEFLEET_URL", run.url)
        monkeypatch.setenv("EDGEFLEET_TOKEN", run.admin)
        t0 = time.monotonic()
        code = rt.main(
            ["--event", str(tmp_path / "event.json"), "--current", str(current),
             "--version", "1.1.0", "--key", str(packager_key.private_path),
             "--out", str(tmp_path / "out"), "--profile", host_profile()]
        )  # fmt: skip
        print(f"\nretrain.py main(): {time.monotonic() - t0:.1f} s")
        assert code == 0
        rollouts = admin.get("/api/v1/rollouts").json()
        items = rollouts["items"] if isinstance(rollouts, dict) else rollouts
        (ro,) = [x for x in items if x["version"] == "1.1.0"]
        detail = admin.get(f"/api/v1/rollouts/{ro['id']}").json()
        assert detail["model"] == MODEL and detail["phase"] not in ("aborted", "failed")
        assert detail["spec"]["shadow"] is not None  # promoted only on live agreement
        assert [d["device_id"] for d in detail["devices"]] == [DEV]
        pkgs = admin.get("/api/v1/packages", params={"name": MODEL}).json()
        assert [p["version"] for p in pkgs] == ["1.1.0"]  # the script's upload
        # lineage: the datasets the script exported name the capture, device and version
        datasets = admin.get(f"/api/v1/captures/{cid}").json()["datasets"]
        assert {d["part"] for d in datasets} >= {"train", "holdout"} or len(datasets) >= 2
        lin = datasets[0]["lineage"]
        assert lin["capture_id"] == cid and DEV in lin["devices"] and "1.0.0" in lin["versions"]
    finally:
        admin.close()
        run.stop()
