"""Retrain on captured field data: the pipeline step a drift webhook triggers.

    python examples/retrain/retrain.py --event event.json --name digits-mlp \
        --current model.onnx --version 1.1.0 --key signing.key --out build/

Steps (each a function a test or another pipeline can call):

1. ``export_capture``: ``edgefleet capture export ID --out captured.npz --holdout 0.2
   --holdout-out holdout.npz`` (ID from the event's ``capture.id``, or ``--capture``).
2. ``label``: labels for the captured inputs. Real life: a labelling hook (human review, a
   delayed ground truth join, a stronger offline model). Here: ``labels`` in the npz when the
   export carries them, else ``--labeller module:function`` (the demo's
   ``digits_oracle`` knows the true digit of each scikit-learn digits image).
3. ``retrain``: the project's example model (``edgefleet example-models``: digits-mlp, a
   StandardScaler + MLP on 64 pixel columns) fitted on its original training split plus the
   captured rows; ``export_onnx`` writes it with skl2onnx (input ``features``).
4. ``gate``: the new model's accuracy on the holdout against the current model's; refused
   (exit 3, nothing uploaded) unless strictly better.
5. ``package``: ``edgefleet package … --calibration captured.npz --validation holdout.npz``.
6. ``upload`` and ``rollout``: ``edgefleet packages upload`` and ``edgefleet rollout create
   … --shadow`` (or ``--waves``), so the fleet compares it on live traffic before it serves.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# the steps' reusable core, shared with `edgefleet demo --loop`
from edgefleet.demo.retrain import INPUT, accuracy, digits_oracle, export_onnx, retrain

__all__ = ["INPUT", "accuracy", "digits_oracle", "export_onnx", "retrain"]
Labeller = Callable[[np.ndarray], np.ndarray]


def edgefleet_cmd() -> list[str]:
    """How to run the CLI: $EDGEFLEET_CMD (e.g. "edgefleet"), else this interpreter's module."""
    env = os.environ.get("EDGEFLEET_CMD")
    return shlex.split(env) if env else [sys.executable, "-m", "edgefleet"]


def run(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    cmd = [*edgefleet_cmd(), *args]
    print("+", " ".join(shlex.quote(a) for a in cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StepError(f"{args[0]} {args[1] if len(args) > 1 else ''} failed "
                        f"({done.returncode}): {done.stderr.strip()[-2000:]}")  # fmt: skip
    return done


class StepError(RuntimeError):
    """A pipeline step that failed; the message names the step and why."""


def load_event(path: Path) -> dict[str, Any]:
    """The webhook body (docs/retrain.md): ``model``, ``versions``, ``capture`` …"""
    doc = json.loads(Path(path).read_text())
    if doc.get("type") != "edgefleet.drift":
        raise StepError(f"{path}: not an edgefleet.drift event")
    return dict(doc)


def capture_id(event: dict[str, Any], given: str | None = None) -> str:
    cid = given or (event.get("capture") or {}).get("id")
    if not cid:
        hint = (event.get("capture") or {}).get("command")
        raise StepError(f"no capture id in the event; start one first: {hint}")
    return str(cid)


def export_capture(cid: str, workdir: Path, holdout: float = 0.2) -> tuple[Path, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    captured, held = workdir / "captured.npz", workdir / "holdout.npz"
    run(["capture", "export", cid, "--out", str(captured), "--holdout", str(holdout),
         "--holdout-out", str(held)])  # fmt: skip
    return captured, held


def load_inputs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def labeller_from(spec: str | None) -> Labeller:
    if not spec:
        return digits_oracle
    module, _, name = spec.partition(":")
    fn: Labeller = getattr(importlib.import_module(module), name)
    return fn


def label(arrays: dict[str, np.ndarray], labeller: Labeller) -> np.ndarray:
    if "labels" in arrays:
        return np.asarray(arrays["labels"], dtype=np.int64)
    return np.asarray(labeller(arrays[INPUT]), dtype=np.int64)


@dataclass(frozen=True)
class Gate:
    new: float
    current: float

    @property
    def passed(self) -> bool:
        return self.new > self.current

    def __str__(self) -> str:
        verdict = "better" if self.passed else "not better: refused"
        return f"holdout accuracy new {self.new:.3f} vs current {self.current:.3f} ({verdict})"


def gate(new_model: Path, current_model: Path, holdout: Path, labeller: Labeller) -> Gate:
    arrays = load_inputs(holdout)
    y = label(arrays, labeller)
    x = arrays[INPUT]
    return Gate(accuracy(new_model, x, y), accuracy(current_model, x, y))


def package(model: Path, name: str, version: str, calibration: Path, validation: Path,
            key: Path, out: Path, profiles: Sequence[str] = ("cpu-x86_64",),
            extra: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    args = ["package", str(model), "--name", name, "--version", version,
            "--calibration", str(calibration), "--validation", str(validation),
            "--key", str(key), "--out", str(out), "--json", *extra]  # fmt: skip
    for p in profiles:
        args += ["--profile", p]
    report: dict[str, Any] = json.loads(run(args).stdout)
    if not report.get("ok"):
        raise StepError(f"packaging {name} {version} failed its gates")
    return report


def with_labels(validation: Path, labeller: Labeller, out: Path) -> Path:
    """The packager's validation set needs ``labels``: the holdout plus its labels."""
    from edgefleet.packager.npzio import save_npz

    arrays = load_inputs(validation)
    arrays["labels"] = label(arrays, labeller)
    return save_npz(out, arrays)


def upload(packages: Sequence[Path]) -> None:
    if not packages:
        raise StepError("no package to upload")
    run(["packages", "upload", *[str(p) for p in packages]])


def rollout_target(event: dict[str, Any]) -> list[str]:
    """The drifting devices of the event: its group, or each device it lists."""
    if event.get("scope") == "group":
        return ["--group", str(event["scope_key"])]
    out: list[str] = []
    for d in event.get("devices") or []:
        out += ["--device", str(d)]
    if not out:
        raise StepError("the event names no device to roll out to")
    return out


def rollout(
    name: str, version: str, target: Sequence[str], *, max_drift: float = 0.2,
    waves: str | None = None,
) -> str:  # fmt: skip
    """A shadow rollout on the drifting devices, each wave promoted only on agreement and
    latency (docs/shadow.md) and halted when drift on the new version exceeds ``max_drift``
    (the rollout health gate); ``waves`` (e.g. "10,50,100") for a staged one instead."""
    mode = ["--waves", waves] if waves else ["--shadow"]
    args = ["rollout", "create", name, version, *target, *mode, "--max-drift", str(max_drift)]
    return run(args).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--event", type=Path, required=True, help="the webhook body (JSON)")
    ap.add_argument("--capture", help="capture id (default: the event's capture.id)")
    ap.add_argument("--name", default=None, help="model name (default: the event's model)")
    ap.add_argument("--current", type=Path, required=True, help="the current version's ONNX")
    ap.add_argument("--version", required=True, help="the new version")
    ap.add_argument("--key", type=Path, required=True, help="signing key (PEM)")
    ap.add_argument("--out", type=Path, default=Path("retrain-out"))
    ap.add_argument("--labeller", help="module:function labelling captured inputs")
    ap.add_argument("--profile", action="append", default=None)
    ap.add_argument("--no-rollout", action="store_true")
    ap.add_argument("--waves", help="staged waves (e.g. 10,50,100) instead of shadow")
    ap.add_argument("--max-drift", type=float, default=0.2, help="rollout drift gate")
    a = ap.parse_args(argv)
    event = load_event(a.event)
    name = a.name or str(event["model"])
    labeller = labeller_from(a.labeller)
    try:
        captured, holdout = export_capture(capture_id(event, a.capture), a.out)
        arrays = load_inputs(captured)
        model = export_onnx(retrain(arrays[INPUT], label(arrays, labeller)), a.out / "model.onnx")
        g = gate(model, a.current, holdout, labeller)
        print(g)
        if not g.passed:
            return 3
        validation = with_labels(holdout, labeller, a.out / "validation.npz")
        report = package(model, name, a.version, captured, validation, a.key, a.out / "pkg",
                         a.profile or ("cpu-x86_64",))  # fmt: skip
        pkgs = [Path(p["package"]) for p in report["profiles"] if p.get("package")]
        upload(pkgs)
        if not a.no_rollout:
            target = rollout_target(event)
            print(rollout(name, a.version, target, max_drift=a.max_drift, waves=a.waves))
    except StepError as e:
        print(f"retrain: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
