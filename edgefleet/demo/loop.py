"""`edgefleet demo --loop`: drift on the fleet -> captured field data -> retrained model -> gated
package -> staged rollout -> drift back to normal, once per iteration, on a `Fleet`.

Each step prints one line starting ``[step N]`` with its figures, and each iteration is stored as
``<controller data dir>/loops/<N>.json`` (the dashboard's ``/dashboard/loops/N`` shows it).
Labels for retraining come from the known generating function (the demo knows which digit
image each captured row was made from: `edgefleet.demo.retrain.digits_oracle`); a real fleet has
a labelling step there instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edgefleet.demo.fleet import Fleet
from edgefleet.demo.packages import build_packages
from edgefleet.demo.retrain import INPUT, accuracy, digits_oracle, export_onnx, retrain
from edgefleet.demo.rollouts import rollout_body
from edgefleet.demo.spec import GOOD, MODEL_NAME, FleetError, FleetSpec
from edgefleet.drift.alerts import LookPlan
from edgefleet.harness import free_port, sigterm_as_interrupt

# The demo's drift settings: looks every 5 s (the defaults are 30 s / 300 s), 10-minute buckets,
# one scope per device so each drifting device is named on its own.
LOOK_S, BUCKET_S = 5, 600
BATCH, PERIOD_S = 10, 0.5  # load: 10 rows every 0.5 s per device (20 rows/s)
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class LoopProfile:
    """How long each step of the loop takes its time: ``default`` for people watching, ``quick``
    (`--quick`, what the CI test runs) with shorter windows, fewer shadow requests and a
    shorter packaging benchmark. The story and its gates are the same."""

    name: str
    window_s: int  # the long early-look window (the short one is 2 * LOOK_S)
    serve_s: float  # serving the reference distribution before the shift
    shadow_requests: int  # compared requests each device of a wave must reach in shadow
    soak_s: float  # each wave's soak after activation, gated on the new version's drift
    bench_runs: int
    bench_seconds: float
    retrain_iter: int


PROFILES = {
    "default": LoopProfile("default", 15, 10.0, 30, 6.0, 50, 0.5, 150),
    # the same windows as the default: a 10 s window alone holds too few rows when the
    # agents' sketches come late on a loaded machine (shift to event 30-70 s there)
    "quick": LoopProfile("quick", 15, 5.0, 10, 3.0, 20, 0.2, 100),
}
# The drift gate of the staged rollout: the largest JS distance among features the calibrated
# test flags on the new version's sketches of the moved devices (0 when none is flagged).
MAX_DRIFT = 0.1
# The shadow gate's margin below the agreement the held-out rows predict (requests of BATCH
# rows, as the load sends them): live traffic that agrees less is not what was captured.
AGREEMENT_MARGIN = 0.15
# The shadow's latency gate: the candidate runs on a nice-10 thread beside serving (docs/shadow.md)
# and the demo's whole fleet shares this machine's cores, so its p95 over a few requests says
# more about the machine than the model: only a candidate an order of magnitude slower fails.
MAX_P95_RATIO = 25.0


def field_shift(iteration: int) -> tuple[str, Transform, Transform]:
    """The input shift of ``iteration`` (1-based), what a field camera does to the digits, and
    its inverse: the known generating function the demo labels captured rows with."""
    if iteration % 2 == 1:
        return (
            "contrast x0.6, brightness +0.3",
            lambda x: (x * 0.6 + 0.3).astype(np.float32),
            lambda x: ((x - 0.3) / 0.6).astype(np.float32),
        )
    return (
        "inverted (1 - x)",
        lambda x: (1.0 - x).astype(np.float32),
        lambda x: (1.0 - x).astype(np.float32),
    )


class Hook:
    """A webhook receiver on loopback: every drift event's body with its arrival time."""

    def __init__(self) -> None:
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(n, 4 * 1024 * 1024))
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = None
                if isinstance(doc, dict):
                    with hook.lock:
                        hook.events.append((time.monotonic(), doc))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_a: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/drift"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def since(self, t: float) -> list[tuple[float, dict[str, Any]]]:
        with self.lock:
            return [(at, d) for at, d in self.events if at >= t]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Load:
    """Requests drawn from the reference distribution (digits images) to every device; the
    devices in ``shifted`` get them through ``transform``."""

    def __init__(self, fleet: Fleet, rows: np.ndarray) -> None:
        self.fleet, self.rows = fleet, rows
        self.shifted: set[str] = set()
        self.transform: Transform = lambda x: x
        self.sent = 0
        self.errors = 0
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(dev, i), daemon=True)
            for i, dev in enumerate(fleet.spec.device_ids())
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)

    def _run(self, dev: str, seed: int) -> None:
        # each device cycles through every row in turn (from its own offset): any capture of
        # `len(rows)` consecutive requests holds the whole population the device sees
        at = seed * 37
        url = f"http://127.0.0.1:{self.fleet.agent_ports[dev]}/v2/models/{MODEL_NAME}/infer"
        while not self.stop.wait(PERIOD_S):
            x = self.rows[(at + np.arange(BATCH)) % len(self.rows)]
            at += BATCH
            if dev in self.shifted:
                x = self.transform(x)
            body = {"inputs": [{"name": INPUT, "shape": [BATCH, 64], "datatype": "FP32",
                                "data": [float(v) for v in x.ravel()]}]}  # fmt: skip
            req = urllib.request.Request(
                url, json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    r.read()
                self.sent += BATCH
            except OSError:
                self.errors += 1  # an agent swapping versions may refuse one; the next goes


def drift_states(fleet: Fleet) -> dict[str, float]:
    """``edgefleet_drift_state`` per device scope, from the controller's /metrics."""
    assert fleet.api is not None
    with urllib.request.urlopen(fleet.api.base + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    pat = re.compile(r"^edgefleet_drift_state\{([^}]*)\} ([0-9.eE+-]+)$")
    for line in text.splitlines():
        m = pat.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("model") == MODEL_NAME and labels.get("scope") == "device":
            out[labels["key"]] = float(m.group(2))
    return out


class Record:
    """One loop iteration's steps with timestamps and figures (stored as JSON)."""

    def __init__(self, path: Path, iteration: int, started: float) -> None:
        self.path, self.started = path, started
        self.doc: dict[str, Any] = {"iteration": iteration, "steps": []}

    def step(self, n: int, title: str, **figures: Any) -> None:
        self.doc["steps"].append(
            {
                "step": n,
                "title": title,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "t_s": round(time.monotonic() - self.started, 1),
                "figures": figures,
            }
        )
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2))
        tmp.replace(self.path)  # never a half-written record for the dashboard


def capture_rows(rows: int) -> int:
    """Rows the controller captures on each drifting device: a whole cycle of the load (each
    device cycles through ``rows`` requests' rows, see `Load`) and one batch more."""
    return rows + BATCH


def run_loop(
    devices: int,
    broker: str,
    workdir: Path | None,
    console: Console,
    iterations: int = 1,
    profile: LoopProfile = PROFILES["default"],
) -> dict[str, Any]:
    """The whole loop story; returns the JSON summary (figures per iteration). The fleet is
    closed on every exit path, and the work directory removed unless the caller named one."""
    if devices < 2:
        raise FleetError("the loop needs at least 2 devices (half of them drift)")
    started = time.monotonic()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgefleet-loop-"))

    def say(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:5.1f}s[/dim] {msg}")

    fleet = Fleet(FleetSpec(root, devices=devices, broker=broker, telemetry_interval_s=2.0), say)
    hook = Hook()
    load: Load | None = None
    try:
        with sigterm_as_interrupt():
            fleet.make_keys()
            say(f"packaging the example model digits-mlp as {MODEL_NAME} {GOOD}")
            fleet.packages.update(
                build_packages(
                    root,
                    fleet.keys["packager_key"],
                    (GOOD,),
                    (),
                    bench_runs=profile.bench_runs,
                    bench_seconds=profile.bench_seconds,
                )
            )
            current_onnx = root / "examples" / "digits-mlp" / "model.onnx"
            # the load: the calibration rows, which the package's drift reference was built from
            with np.load(root / "examples" / "digits-mlp" / "calibration.npz") as cal:
                rows = np.asarray(cal[INPUT], dtype=np.float32)
            # the product's capture_on_drift: each drift event starts a capture on the devices
            # it names (per-device scope: one per drifting device), a whole load cycle's rows
            fleet.controller_env.update(
                {
                    "EDGEFLEET_CONTROLLER_CAPTURE_ON_DRIFT": "1",
                    "EDGEFLEET_CONTROLLER_CAPTURE_ON_DRIFT_ROWS": str(capture_rows(len(rows))),
                    "EDGEFLEET_CONTROLLER_CAPTURE_ON_DRIFT_SAMPLE_RATE": "1.0",
                    "EDGEFLEET_CONTROLLER_CAPTURE_ON_DRIFT_ROWS_PER_MINUTE": "3000",
                }
            )
            fleet.start_controller()
            fleet.register_devices()
            fleet.start_broker()
            for dev in fleet.spec.device_ids():  # every gateway opts in to capture
                fleet.start_agent(dev, {"EDGEFLEET_AGENT_CAPTURE_ALLOWED": "true"})
            for path in fleet.packages.values():
                fleet.upload(path)
            fleet.wait_online()
            assert fleet.api is not None
            windows = LookPlan(0.01, BUCKET_S, LOOK_S, profile.window_s, 0.5).windows
            fleet.api.call(
                "PUT",
                f"/api/v1/drift/{MODEL_NAME}/settings",
                {"config": {"look_s": LOOK_S, "window_s": profile.window_s},
                 "bucket_s": BUCKET_S, "scopes": ["device"], "webhook_url": hook.url},
            )  # fmt: skip
            say(
                f"drift settings for the demo ({profile.name}): early looks every {LOOK_S} s over "
                f"the last {' and '.join(f'{w} s' for w in windows)} (defaults every 30 s over "
                f"60 and 300 s), {BUCKET_S // 60}-minute buckets, per-device scope; webhook -> "
                f"{hook.url}; capture_on_drift on ({capture_rows(len(rows))} rows a device)"
            )
            ids = fleet.spec.device_ids()
            rid = fleet.create_rollout(rollout_body(GOOD, ids, waves=[100.0]))
            if fleet.wait_rollout(rid)["phase"] != "succeeded":
                raise FleetError(f"rollout of {GOOD} did not succeed")
            load = Load(fleet, rows)
            load.start()
            shifted = ids[: max(1, devices // 2)]
            version = GOOD
            results = []
            for it in range(1, iterations + 1):
                version, current_onnx, res = _iteration(
                    fleet, hook, load, console, say, root, it, shifted, version, current_onnx,
                    profile,
                )  # fmt: skip
                results.append(res)
            total = round(time.monotonic() - started, 1)
            say(f"[bold]loop done: end to end {total:.1f} s[/bold] ({iterations} iteration(s))")
            return {
                "workdir": str(root),
                "profile": profile.name,
                "elapsed_s": total,
                "iterations": results,
            }
    finally:
        if load is not None:
            load.close()
        hook.close()
        fleet.close()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def _iteration(
    fleet: Fleet,
    hook: Hook,
    load: Load,
    console: Console,
    say: Callable[[str], None],
    root: Path,
    it: int,
    shifted: list[str],
    version: str,
    current_onnx: Path,
    profile: LoopProfile,
) -> tuple[str, Path, dict[str, Any]]:
    from edgefleet.packager.npzio import save_npz

    assert fleet.api is not None
    t0 = time.monotonic()
    rec = Record(fleet.controller_dir / "loops" / f"{it}.json", it, t0)
    ids = fleet.spec.device_ids()
    say(f"[bold]loop iteration {it}[/bold]")
    # 1. serving the reference distribution
    time.sleep(profile.serve_s)
    say(f"\\[step 1] serving {MODEL_NAME} {version} on {len(ids)} devices: {load.sent} rows sent")
    rec.step(1, "fleet serves", version=version, devices=ids, rows_sent=load.sent)
    # 2. the shift
    what, transform, inverse = field_shift(it)
    load.transform = transform
    t_shift = time.monotonic()
    load.shifted = set(shifted)
    say(f"\\[step 2] input shift on {', '.join(shifted)}: {what}")
    rec.step(2, "input shift", devices=shifted, transform=what)
    # 3. drift announced by the early looks (one webhook per drifting device)
    seen: dict[str, float] = {}
    captures: dict[str, str] = {}  # device -> the capture its event started
    first_event: dict[str, Any] | None = None
    deadline = t_shift + 180
    while set(shifted) - set(seen) and time.monotonic() < deadline:
        for at, doc in hook.since(t_shift):
            if doc.get("scope") == "device" and doc.get("scope_key") not in seen:
                seen[str(doc.get("scope_key"))] = at - t_shift
                first_event = first_event or doc
                cid = (doc.get("capture") or {}).get("id")
                if cid:
                    captures[str(doc.get("scope_key"))] = str(cid)
                console.print(
                    f"  webhook: {doc.get('model')} {doc.get('versions')} scope device "
                    f"{doc.get('scope_key')}: {doc.get('statistic', {}).get('name')} "
                    f"{doc.get('statistic', {}).get('value', 0):.2f}, p {doc.get('p_value'):.1e} "
                    f"<= {doc.get('threshold'):.1e}, features {len(doc.get('features') or [])}, "
                    f"capture started by the controller: {cid or 'none'}"
                )
        time.sleep(0.5)
    if first_event is None or set(shifted) - set(seen):
        raise FleetError(f"no drift event for {sorted(set(shifted) - set(seen))} within 180 s")
    false_alarms = sorted(set(seen) - set(shifted))
    shift_to_event = round(min(seen.values()), 1)
    say(
        f"\\[step 3] drift announced: shift to first event {shift_to_event:.1f} s, to the last "
        f"drifting device's {max(seen.values()):.1f} s; events on steady devices: "
        f"{false_alarms or 'none'}"
    )
    rec.step(3, "drift announced", shift_to_event_s=shift_to_event,
             per_device_s={k: round(v, 1) for k, v in seen.items()},
             false_alarms=false_alarms)  # fmt: skip
    # 4. the captures the events started (capture_on_drift), with each event as lineage
    missing = sorted(set(shifted) - set(captures))
    if missing:
        raise FleetError(f"no capture started by the drift events of {missing}")
    t_cap = time.monotonic()
    shown: dict[str, dict[str, Any]] = {}
    while time.monotonic() - t_cap < 120:
        shown = {d: fleet.api.call("GET", f"/api/v1/captures/{c}") for d, c in captures.items()}
        if all(v.get("state") == "complete" for v in shown.values()):
            break
        time.sleep(1.0)
    rows = {
        d: int(((v.get("per_device") or {}).get(d) or {}).get("rows", 0))
        for d, v in sorted(shown.items())
    }
    if sum(rows.values()) == 0:
        raise FleetError(f"the captures got no rows: {shown}")
    cap_s = round(time.monotonic() - t_shift, 1)  # from the shift: they began at the events
    work = root / f"loop-{it}"
    work.mkdir(parents=True, exist_ok=True)
    parts_cap: list[np.ndarray] = []
    parts_hold: list[np.ndarray] = []
    for dev, cid in sorted(captures.items()):
        captured, holdout = work / f"captured-{dev}.npz", work / f"holdout-{dev}.npz"
        cli = [sys.executable, "-m", "edgefleet", "capture", "export", cid, "--out",
               str(captured), "--holdout", "0.25", "--holdout-out", str(holdout),
               "--url", fleet.api.base, "--token", fleet.api.token]  # fmt: skip
        done = subprocess.run(cli, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise FleetError(f"capture export failed: {done.stderr.strip()[-500:]}")
        with np.load(captured, allow_pickle=False) as d:
            parts_cap.append(np.asarray(d[INPUT], dtype=np.float32))
        with np.load(holdout, allow_pickle=False) as d:
            parts_hold.append(np.asarray(d[INPUT], dtype=np.float32))
    x_cap, x_hold = np.concatenate(parts_cap), np.concatenate(parts_hold)
    cid = ", ".join(sorted(captures.values()))
    # calibration (and so the new package's drift reference) = every captured row; the
    # holdout is held out of training and is the validation set and the accuracy gate
    calibration = save_npz(work / "calibration.npz", {INPUT: np.concatenate([x_cap, x_hold])})
    say(
        f"\\[step 4] capture on drift (started by the controller from each event): {cid}: "
        f"{sum(rows.values())} rows captured ({rows}), complete {cap_s:.1f} s after the shift; "
        f"exported {len(x_cap)} for training/calibration, {len(x_hold)} held out"
    )
    rec.step(4, "capture", capture_id=cid, captures=captures, rows=rows,
             rows_total=sum(rows.values()), exported=len(x_cap), holdout=len(x_hold),
             seconds_after_shift=cap_s)  # fmt: skip
    # 5. retrain (labels from the known generating function), gate, package, upload
    t_re = time.monotonic()
    # the devices see the same images: a row of the training part equal to a held-out row
    # would leak the holdout into training, so training keeps only rows the holdout lacks
    held = {r.tobytes() for r in x_hold}
    x_train = x_cap[[r.tobytes() not in held for r in x_cap]]
    # labels: the digit image each row was made from (undo the known shift, find the image)
    y_train, y_hold = digits_oracle(inverse(x_train)), digits_oracle(inverse(x_hold))
    model = export_onnx(
        retrain(x_train, y_train, hidden=(128,), max_iter=profile.retrain_iter), work / "model.onnx"
    )
    acc_old, acc_new = accuracy(current_onnx, x_hold, y_hold), accuracy(model, x_hold, y_hold)
    if not acc_new > acc_old:
        raise FleetError(f"gate refused: holdout accuracy new {acc_new:.3f} <= {acc_old:.3f}")
    new_version = f"1.{it * 2}.0"
    validation = save_npz(work / "validation.npz", {INPUT: x_hold, "labels": y_hold})
    pkg = _package(fleet, model, new_version, calibration, validation, work, profile)
    # what the shadow should see: the share of BATCH-row requests of held-out rows on which
    # both versions give every row the same class (the shadow compares whole requests)
    expected = request_agreement(current_onnx, model, x_hold)
    min_agreement = round(max(0.0, expected - AGREEMENT_MARGIN), 3)
    fleet.upload(pkg)
    say(
        f"\\[step 5] retrained on {len(x_train)} captured rows (labels from the known generating "
        f"function, not from the model): holdout accuracy {version} {acc_old:.3f} -> "
        f"{new_version} {acc_new:.3f}; packaged (calibration = all captured rows, validation = "
        f"held-out) and uploaded in {time.monotonic() - t_re:.1f} s"
    )
    rec.step(5, "retrain, gate, package, upload", version=new_version, trained_on=len(x_train),
             accuracy_old=round(acc_old, 3), accuracy_new=round(acc_new, 3),
             seconds=round(time.monotonic() - t_re, 1))  # fmt: skip
    # 6. shadow first, then the staged rollout to the drifting devices, gated on drift
    t_ro = time.monotonic()
    body = rollout_body(
        new_version,
        shifted,
        waves=[50.0, 100.0],
        shadow={"requests": profile.shadow_requests, "min_agreement": min_agreement,
                "max_p95_ratio": MAX_P95_RATIO, "window_s": 1.0, "timeout_s": 120.0},
        soak_s=profile.soak_s,
        gates={"max_drift": MAX_DRIFT},
    )  # fmt: skip
    rid = fleet.create_rollout(body)
    detail = fleet.wait_rollout(
        rid,
        on_change=lambda d: console.print(
            f"  rollout {rid}: {d['phase']} wave {int(d['wave']) + 1}/{len(d['waves'])}"
        ),
    )
    shadow_waves = list((detail.get("shadow") or {}).get("waves") or [])
    for w in shadow_waves:
        console.print(
            f"  shadow wave {int(w.get('wave', 0)) + 1}: {w.get('devices')} device(s), "
            f"{w.get('compared')} requests compared, agreement {w.get('agreement')} "
            f"(>= {w.get('min_agreement')}), p95 ratio {w.get('p95_ratio')} "
            f"(<= {w.get('max_p95_ratio')}), verdict {w.get('verdict', w.get('reason'))}"
        )
    if detail["phase"] != "succeeded":
        raise FleetError(f"rollout {rid} of {new_version}: {detail['phase']} {detail['reason']}")
    t_rolled = time.monotonic()
    agreement = [w.get("agreement") for w in shadow_waves]
    say(
        f"\\[step 6] rollout {rid}: {new_version} on {', '.join(shifted)}, each wave in shadow "
        f"first (agreement {agreement}, gate >= {min_agreement}: held-out rows predict "
        f"{expected:.3f}), then waves 50/100 % with a {profile.soak_s:g} s soak gated on drift "
        f"<= {MAX_DRIFT}: succeeded in {t_rolled - t_ro:.1f} s"
    )
    rec.step(6, "shadow, then staged rollout", rollout=rid, version=new_version,
             shadow=shadow_waves, min_agreement=min_agreement, expected_agreement=expected,
             max_drift=MAX_DRIFT, seconds=round(t_rolled - t_ro, 1))  # fmt: skip
    # 7. the next looks judge the drifting devices against the new version's reference
    states: dict[str, float] = {}
    while time.monotonic() - t_rolled < 4 * profile.window_s + 60:
        states = drift_states(fleet)
        # the shifted devices' gauges are there (looked at lately) and every one is 0
        if set(shifted) <= set(states) and all(states.get(d, 0.0) == 0.0 for d in ids):
            break
        time.sleep(2.0)
    drifting = sorted(d for d in ids if states.get(d, 0.0) != 0.0)
    state = "normal" if not drifting else f"drift on {', '.join(drifting)}"
    say(
        f"\\[step 7] drift state after: {state} ({time.monotonic() - t_rolled:.1f} s after the "
        f"rollout; an episode closes after {2 * profile.window_s} s without a drifted look)"
    )
    rec.step(7, "drift after", state=state, seconds=round(time.monotonic() - t_rolled, 1))
    loop_s = round(time.monotonic() - t0, 1)
    rec.doc.update(loop_s=loop_s, state=state, version=new_version)
    rec.save()
    say(f"iteration {it}: {loop_s:.1f} s; dashboard page /dashboard/loops/{it}")
    if drifting:
        raise FleetError(f"drift did not return to normal: {state}")
    return new_version, model, rec.doc


def request_agreement(old: Path, new: Path, x: np.ndarray) -> float:
    """Share of BATCH-row requests (consecutive rows of ``x``) on which the two models give
    every row the same class."""
    import onnxruntime as ort

    def classes(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {INPUT: x})
        scores = next(o for o in outs if getattr(o, "ndim", 0) == 2)
        out: np.ndarray = np.asarray(scores).argmax(axis=1)
        return out

    same = classes(old) == classes(new)
    n = len(same) // BATCH
    if n == 0:
        return float(same.mean()) if len(same) else 0.0
    return float(same[: n * BATCH].reshape(n, BATCH).all(axis=1).mean())


def _package(
    fleet: Fleet,
    model: Path,
    version: str,
    calibration: Path,
    validation: Path,
    work: Path,
    profile: LoopProfile,
) -> Path:
    """The real packager (its drift reference comes from the calibration data)."""
    from edgefleet.demo.packages import host_profile
    from edgefleet.packager.pipeline import package_model

    report = package_model(
        model,
        name=MODEL_NAME,
        version=version,
        profiles=[host_profile()],
        calibration=calibration,
        validation=validation,
        key=fleet.keys["packager_key"],
        out_dir=work / "packages",
        bench_runs=profile.bench_runs,
        bench_seconds=profile.bench_seconds,
    )
    result = report.profiles[0]
    if not result.ok or result.package is None:
        raise FleetError(f"packaging {version} failed: {result.failure}")
    return Path(result.package)
