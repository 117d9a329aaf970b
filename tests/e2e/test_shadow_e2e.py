"""Shadow evaluation end to end: real Mosquitto, the controller process, two agent processes,
packages from the packager pipeline, live requests from HTTP clients.

- A candidate that agrees with the serving model (the same classifier, packaged again) is
  promoted wave by wave, and no client saw it answer before its wave was promoted.
- A candidate that passed every packaging gate on the digits data but answers differently on
  saturated images (an input region the calibration and validation data lack) is stopped in
  its first wave with ``shadow_disagreement``: every client answer came from the serving version.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.demo.fleet import Fleet
from edgefleet.demo.packages import host_profile
from edgefleet.demo.rollouts import rollout_body
from edgefleet.demo.spec import MODEL_NAME, FleetSpec
from tests.support.services import require
from tests.support.shadow_models import digits_lr, divergent_mlp, saturated_rows

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def shadow_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    from edgefleet.packager.pipeline import package_model
    from edgefleet.packager.profiles import get_profile

    root: Path = tmp_path_factory.mktemp("shadow-fleet")
    f = Fleet(FleetSpec(root, devices=2, broker="mosquitto", secure=True, probation_s=0.5))
    try:
        f.make_keys()
        model, cal, val = digits_lr(root / "lr")
        divergent = divergent_mlp(model, root / "divergent" / "model.onnx")
        profile = get_profile(host_profile())
        for version, onnx_model in (("1.0.0", model), ("1.1.0", model), ("1.2.0", divergent)):
            report = package_model(
                onnx_model,
                name=MODEL_NAME,
                version=version,
                profiles=[profile],
                calibration=cal,
                validation=val,
                key=f.keys["packager_key"],
                out_dir=root / "packages",
                bench_runs=30,
                bench_seconds=0.3,
            )
            result = report.profiles[0]
            # every version passes its packaging gates, the divergent one included
            assert result.ok and result.package is not None, result.failure
            f.packages[version] = result.package
        f.start_controller()
        f.register_devices()
        f.start_broker()
        f.start_agents()
        for path in f.packages.values():
            f.upload(path)
        f.wait_online()
        rid = f.create_rollout(rollout_body("1.0.0", f.spec.device_ids(), waves=[100.0]))
        assert f.wait_rollout(rid, timeout=90)["phase"] == "succeeded"
        yield f
    finally:
        f.close()


@dataclass
class Load:
    """One client thread per device, each answer recorded as (time, version, label)."""

    fleet: Fleet
    rows: np.ndarray
    answers: dict[str, list[tuple[float, str, int]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for dev in self.fleet.spec.device_ids():
            self.answers[dev] = []
            t = threading.Thread(target=self._run, args=(dev,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _run(self, dev: str) -> None:
        url = f"http://127.0.0.1:{self.fleet.agent_ports[dev]}/v2/models/{MODEL_NAME}/infer"
        i = 0
        while not self.stop.is_set():
            row = self.rows[i % len(self.rows)]
            i += 1
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
                url, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    out = json.loads(r.read())
            except OSError as e:
                self.failures.append(f"{dev}: {e}")
                time.sleep(0.05)
                continue
            label = next(o for o in out["outputs"] if o["name"] == "label")["data"][0]
            self.answers[dev].append((time.time(), str(out["model_version"]), int(label)))
            time.sleep(0.005)

    def versions(self) -> set[str]:
        return {v for a in self.answers.values() for _, v, _ in a}


def _digits(n: int) -> np.ndarray:
    from edgefleet.packager.examples import digits_split

    return digits_split().x_val[:n]


def _shadow(**kw: Any) -> dict[str, Any]:
    return {
        "requests": 30,
        "min_agreement": 0.99,
        "max_p95_ratio": 20.0,  # a shared CI machine: the agreement is what is judged here
        "window_s": 0.5,
        "timeout_s": 60.0,
        **kw,
    }


def test_agreeing_candidate_is_promoted_wave_by_wave(shadow_fleet: Fleet) -> None:
    f = shadow_fleet
    with Load(f, _digits(200)) as load:
        rid = f.create_rollout(
            rollout_body("1.1.0", f.spec.device_ids(), waves=[50.0, 100.0], shadow=_shadow())
        )
        detail = f.wait_rollout(rid, timeout=120)
    assert detail["phase"] == "succeeded", detail
    sh = detail["shadow"]
    assert [w["verdict"] for w in sh["waves"]] == ["promoted", "promoted"], sh
    assert sh["promoted_waves"] == [0, 1]
    for w in sh["waves"]:
        assert w["agreement"] == 1.0 and w["compared"] >= 30, w
    by_dev = {d["device_id"]: d for d in sh["devices"]}
    assert set(by_dev) == set(f.spec.device_ids())
    for d in by_dev.values():  # evidence per device: figures only
        assert d["compared"] >= 30 and d["agreement"] == 1.0, d
        assert d["serving_p95_ms"] is not None and d["candidate_p95_ms"] is not None
    assert set(f.installed().values()) == {"1.1.0"}
    # nobody was answered by the candidate before its wave was promoted
    promoted_at = {w["wave"]: w["at"] for w in sh["waves"]}
    wave_of = {d["device_id"]: d["wave"] for d in detail["devices"]}
    for dev, answers in load.answers.items():
        first_new = min((t for t, v, _ in answers if v == "1.1.0"), default=None)
        assert first_new is not None, f"{dev} never answered with 1.1.0"
        assert first_new >= promoted_at[wave_of[dev]] - 0.5, (dev, first_new, promoted_at)
    assert not load.failures, load.failures[:5]


def test_disagreeing_candidate_is_stopped_before_any_client_sees_it(shadow_fleet: Fleet) -> None:
    f = shadow_fleet
    # live traffic the packaging data lacked: half saturated images, half digits
    rows = np.empty((100, 64), dtype=np.float32)
    rows[0::2], rows[1::2] = _digits(50), saturated_rows(50)
    with Load(f, rows) as load:
        rid = f.create_rollout(
            rollout_body("1.2.0", f.spec.device_ids(), waves=[50.0, 100.0], shadow=_shadow())
        )
        detail = f.wait_rollout(rid, timeout=120)
        time.sleep(1.0)  # answers after the verdict, while the candidate is dropped
    assert detail["phase"] == "aborted", detail
    assert detail["reason"].startswith("shadow_disagreement"), detail["reason"]
    (wave,) = detail["shadow"]["waves"]
    assert wave["verdict"] == "shadow_disagreement" and wave["agreement"] < 0.99, wave
    assert wave["compared"] >= 30
    devs = {d["device_id"]: d for d in detail["devices"]}
    shadowed = [d for d in devs.values() if d["wave"] == 0]
    assert [d["reason_code"] for d in shadowed] == ["shadow_disagreement"]
    assert [d["state"] for d in devs.values() if d["wave"] == 1] == ["skipped"]
    # every client answer came from the serving version; nothing moved
    assert load.versions() == {"1.1.0"}, load.versions()
    assert all(len(a) > 20 for a in load.answers.values())
    assert set(f.installed().values()) == {"1.1.0"}
    assert not load.failures, load.failures[:5]
