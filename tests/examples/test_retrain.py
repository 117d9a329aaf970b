"""The worked retraining example: export -> retrain -> gate -> package on a captured-format npz.

The npz is what ``edgefleet capture export`` writes (arrays keyed by the model's input name,
samples on axis 0; edgefleet.packager.npzio), built here from digits images whose brightness
and contrast changed in the field. The CLI's capture export itself is joined after merge.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from edgefleet.keys import generate_keypair
from edgefleet.packager.examples import digits_split
from edgefleet.packager.npzio import save_npz

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "retrain_example", ROOT / "examples" / "retrain" / "retrain.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _field(x: np.ndarray) -> np.ndarray:
    """The drift: a camera with less contrast and more light."""
    return (x * 0.6 + 0.3).astype(np.float32)


def test_retrain_step_beats_the_current_model_and_packages(tmp_path: Path) -> None:
    rt = _script()
    split = digits_split()
    small = {"hidden": (64,), "max_iter": 80}  # the recipe, smaller, so the test takes seconds
    none = np.zeros((0, 64), np.float32)
    # the version in the field: trained on the original split only
    current = rt.export_onnx(
        rt.retrain(none, np.zeros(0, np.int64), **small), tmp_path / "cur.onnx"
    )
    captured = save_npz(tmp_path / "captured.npz", {"features": _field(split.x_val[:300])})
    holdout = save_npz(tmp_path / "holdout.npz", {"features": _field(split.x_val[300:])})
    arrays = rt.load_inputs(captured)
    labels = rt.label(arrays, rt.digits_oracle)
    assert (labels == split.y_val[:300]).mean() > 0.95  # the demo's oracle labeller
    t0 = time.monotonic()
    model = rt.export_onnx(rt.retrain(arrays["features"], labels, **small), tmp_path / "new.onnx")
    g = rt.gate(model, current, holdout, rt.digits_oracle)
    print(f"\n{g} (retrain {time.monotonic() - t0:.1f} s)")
    assert g.passed and g.new > g.current + 0.05
    refused = rt.gate(current, current, holdout, rt.digits_oracle)
    assert not refused.passed  # equal is not better: nothing would be uploaded
    key = generate_keypair(tmp_path / "keys", "retrain")
    validation = rt.with_labels(holdout, rt.digits_oracle, tmp_path / "validation.npz")
    t1 = time.monotonic()
    report = rt.package(
        model, "digits-mlp", "1.1.0", captured, validation, key.private_path, tmp_path / "pkg",
        extra=["--bench-runs", "2", "--bench-seconds", "0.1"],
    )  # fmt: skip
    print(f"packaged in {time.monotonic() - t1:.1f} s")
    pkgs = [Path(p["package"]) for p in report["profiles"] if p.get("package")]
    assert pkgs and all(p.exists() for p in pkgs)


def test_event_steps_name_what_is_missing(tmp_path: Path) -> None:
    rt = _script()
    ev = tmp_path / "event.json"
    ev.write_text(json.dumps({"type": "edgefleet.drift", "model": "digits-mlp", "scope": "group",
                              "scope_key": "north", "devices": ["a"],
                              "capture": {"command": "edgefleet capture start …", "id": None}}))  # fmt: skip
    event = rt.load_event(ev)
    with pytest.raises(rt.StepError, match="no capture id"):
        rt.capture_id(event)
    assert rt.capture_id(event, "cap-1") == "cap-1"
    assert rt.rollout_target(event) == ["--group", "north"]
    assert rt.rollout_target({"scope": "fleet", "devices": ["a", "b"]}) == [
        "--device", "a", "--device", "b",
    ]  # fmt: skip
    bad = tmp_path / "other.json"
    bad.write_text("{}")
    with pytest.raises(rt.StepError, match=r"not an edgefleet\.drift event"):
        rt.load_event(bad)
