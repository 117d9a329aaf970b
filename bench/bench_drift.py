"""Drift benchmarks: controller ingest rate, sketch cost per inference, detection power.

``python -m bench.bench_drift [--quick]``

1. Telemetry messages per second the controller ingests into SQLite (a message = one telemetry
   tick of one device: system, agent, inference and sketch records), one message per
   transaction (baseline) against ``ingest_batch`` with 500 messages per transaction.
2. Sketch cost per inference against the inference itself (ONNX Runtime, batch 1): counting
   each request directly, and the agent's buffered path (observe + amortised batch count).
3. A 0.5 sigma shift in one of 64 features: detection rate and false alarms per window for
   the calibrated decision (chi-square + BH, alpha 0.01) against fixed PSI cut-offs.
4. Real data with a valid null (``python -m bench drift --validate`` runs only this): false
   alarms at alpha 1 % and detection of out-of-range values, a constant feature that changes
   and a 0.5 std shift, for the decision with the range test against the binned test alone
   (the baseline: the same sketches without their range counts). See :func:`real_datasets`.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console(width=132)  # tables stay readable when piped to a file


# --- 1. ingest ------------------------------------------------------------------------------


def _iris_reference() -> dict[str, Any]:
    from sklearn.datasets import load_iris

    from edgefleet.drift.reference import build_reference

    x, y = load_iris(return_X_y=True)
    return build_reference({"X": x.astype(np.float32)}, {"label": y})


def _messages(n: int, devices: int, start_id: int) -> list[tuple[str, dict[str, Any]]]:
    from sklearn.datasets import load_iris

    from edgefleet.drift.latency import histogram
    from edgefleet.drift.sketch import Sketch

    x, y = load_iris(return_X_y=True)
    ref = _iris_reference()
    rng = np.random.default_rng(0)
    sk = Sketch(ref)
    sk.update({"X": x[:20].astype(np.float32)}, {"label": y[:20]})
    sketch = sk.to_dict()
    hist = histogram(rng.lognormal(0, 0.3, 200))
    now = datetime.now(UTC)
    ids = itertools.count(start_id)
    out = []
    for i in range(n):
        # every device sends one message per 10 s tick: n messages span n / devices ticks
        at = (now - timedelta(seconds=10 * ((n - i) // devices))).isoformat()
        dev = f"dev-{i % devices}"
        base = {"at": at, "model": "iris", "version": "1.0.0", "window_start": at, "window_end": at}
        recs = [
            {
                "id": next(ids),
                "at": at,
                "kind": "system",
                "cpu_percent": 12.5,
                "memory": {"percent": 40.0},
            },
            {
                "id": next(ids),
                "at": at,
                "kind": "agent",
                "uptime_s": 100.0,
                "models": {"iris": "1.0.0"},
                "outbox": {"dropped": 0},
            },
            {
                "id": next(ids),
                **base,
                "kind": "inference",
                "requests": 200,
                "errors": 0,
                "latency_ms": {"p50": 1.0, "p95": 1.6},
                "latency_hist": hist,
            },
            {"id": next(ids), **base, "kind": "sketch", "sketch": sketch},
        ]
        out.append((dev, {"device_id": dev, "records": recs}))
    return out


def bench_ingest(quick: bool) -> list[tuple[str, float, float, str]]:
    """(path, messages per wall second, per CPU second of this process, ratio) rows."""
    from edgefleet.cloud_controller import db
    from edgefleet.cloud_controller.drift.analysis import register_reference
    from edgefleet.cloud_controller.drift.ingest import ingest_batch, ingest_telemetry

    n = 2000 if quick else 10_000
    rows: list[tuple[str, float, float, str]] = []

    def timed(fn: Any, count: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return count / (time.perf_counter() - t0), count / max(time.process_time() - c0, 1e-9)

    with tempfile.TemporaryDirectory() as tmp:
        engine = db.make_engine(f"sqlite:///{Path(tmp) / 'c.db'}")
        db.upgrade(engine)
        factory = db.session_factory(engine)
        with db.transaction(factory) as s:
            register_reference(s, "iris", "1.0.0", _iris_reference())
        single = _messages(n // 4, 100, 1)

        def one_by_one() -> None:
            for dev, msg in single:
                with db.transaction(factory) as s:
                    ingest_telemetry(s, dev, msg)

        base, base_cpu = timed(one_by_one, len(single))
        rows.append(("ingest: 1 message per transaction (baseline)", base, base_cpu, "1.00x"))
        batched = _messages(n, 100, 10_000_000)

        def batches() -> None:
            for i in range(0, n, 500):
                with db.transaction(factory) as s:
                    ingest_batch(s, batched[i : i + 500])

        rate, cpu = timed(batches, n)
        rows.append(
            ("ingest_batch: 500 messages per transaction", rate, cpu, f"{rate / base:.2f}x")
        )
        bridged = _messages(n, 100, 20_000_000)

        def bridge_pattern() -> None:  # the bridge's fallback for a refused batch: a savepoint each
            for i in range(0, n, 500):
                with db.transaction(factory) as s, s.no_autoflush:
                    for dev, msg in bridged[i : i + 500]:
                        with s.begin_nested():
                            ingest_telemetry(s, dev, msg)

        br, br_cpu = timed(bridge_pattern, n)
        label = "ingest_telemetry one by one (the bridge's fallback: savepoint per message)"
        rows.append((label, br, br_cpu, f"{br / base:.2f}x"))

        def again() -> None:  # the same messages again: all duplicates
            for i in range(0, n, 500):
                with db.transaction(factory) as s:
                    assert ingest_batch(s, batched[i : i + 500]) == 0

        dup, dup_cpu = timed(again, n)
        rows.append(("ingest_batch: duplicates (redelivery)", dup, dup_cpu, f"{dup / base:.2f}x"))
        engine.dispose()
    return rows


# --- 2. sketch cost ----------------------------------------------------------------------------


def _model(kind: str) -> tuple[Any, np.ndarray, dict[str, Any]]:
    import onnxruntime as ort
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits, load_iris
    from sklearn.linear_model import LogisticRegression

    from edgefleet.drift.reference import build_reference

    data = load_iris() if kind == "iris" else load_digits()
    x = data.data.astype(np.float32)
    clf = LogisticRegression(max_iter=300).fit(x, data.target)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"X": x}), strict=True))
    return sess, x, build_reference({"X": x}, outs)


def _per_call_us(fn: Any, n: int) -> float:
    best = []
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        best.append((time.perf_counter() - t0) / n * 1e6)
    return min(best)


def _sketch_rows(kind: str, n: int) -> list[tuple[str, float, str]]:
    from edgefleet.agent.telemetry.collector import SketchWindow
    from edgefleet.drift.sketch import Sketch

    sess, x, ref = _model(kind)
    names = [o.name for o in sess.get_outputs()]
    feeds = [{"X": x[i % len(x) : i % len(x) + 1]} for i in range(n)]
    results = [dict(zip(names, sess.run(None, f), strict=True)) for f in feeds[:200]]
    infer = _per_call_us(lambda i: sess.run(None, feeds[i]), n)
    sk = Sketch(ref)
    direct = _per_call_us(lambda i: sk.update(feeds[i], results[i % 200]), n)
    win = SketchWindow("m", "1", Sketch(ref))

    def buffered(i: int) -> None:
        if win.add(feeds[i], results[i % 200]) >= 1024:
            win.flush()

    buf = _per_call_us(buffered, n)
    full = _observer_us(ref, feeds, results, n)
    nf = len(ref["features"])
    return [
        (f"{kind} ({nf} features): inference, batch 1 (baseline)", infer, "1.00x"),
        (f"{kind}: sketch update per request", direct, f"{direct / infer:.2f}x"),
        (f"{kind}: buffered sketch (agent path)", buf, f"{buf / infer:.2f}x"),
        (f"{kind}: whole observer (counts, latency, sketch)", full, f"{full / infer:.2f}x"),
    ]


class _Served:
    """What TelemetryService asks of an agent: the serving model's reference."""

    def __init__(self, ref: dict[str, Any]) -> None:
        self.ref = ref

    def reference(self, model: str) -> dict[str, Any]:
        return self.ref


def _observer_us(ref: dict[str, Any], feeds: list[Any], results: list[Any], n: int) -> float:
    from edgefleet.agent.telemetry.service import TelemetryService, TelemetrySettings

    with tempfile.TemporaryDirectory() as tmp:
        settings = TelemetrySettings(outbox_path=Path(tmp) / "o.sqlite", system=False)
        svc = TelemetryService(_Served(ref), settings)
        us = _per_call_us(
            lambda i: svc.observe("m", "1", feeds[i], results[i % 200], 1e-4, True), n
        )
        svc.stop(final_tick=False)
    return us


def bench_sketch(quick: bool) -> list[tuple[str, float, str]]:
    n = 1000 if quick else 5000
    return _sketch_rows("iris", n) + _sketch_rows("digits", n)


# --- 3. detection power -----------------------------------------------------------------------


def bench_power(quick: bool) -> list[tuple[str, ...]]:
    from edgefleet.drift.decision import DriftConfig, decide
    from edgefleet.drift.reference import build_reference
    from edgefleet.drift.sketch import Sketch

    rng = np.random.default_rng(7)
    d, n_ref = 64, 5000
    ref = build_reference({"x": rng.normal(size=(n_ref, d))}, {})
    windows = 40 if quick else 200
    cfg = DriftConfig(alpha=0.01)
    shift = np.zeros(d)
    shift[17] = 0.5
    out: list[tuple[str, ...]] = []
    for n in (100, 300, 1000, 3000):
        res: dict[str, list[int]] = {k: [0, 0] for k in ("test", "psi0.1", "psi0.25")}
        for w in range(2 * windows):
            shifted = w >= windows
            data = rng.normal(size=(n, d)) + (shift if shifted else 0)
            sk = Sketch(ref)
            sk.update({"x": data})
            dec = decide(ref, sk.to_dict(), cfg)
            psis = [f.psi for f in dec.features]
            for key, alarm in (
                ("test", dec.drift),
                ("psi0.1", max(psis) > 0.1),
                ("psi0.25", max(psis) > 0.25),
            ):
                res[key][int(shifted)] += int(alarm)
        for key, label in (
            ("test", "chi2+BH a=0.01"),
            ("psi0.1", "max PSI > 0.1"),
            ("psi0.25", "max PSI > 0.25"),
        ):
            fa, hit = res[key][0] / windows, res[key][1] / windows
            out.append((str(n), label, f"{fa:.1%}", f"{hit:.1%}"))
    return out


# --- 4. validation on real data ----------------------------------------------------------------
#
# A valid null needs live windows the reference has not seen, from the same population:
# - "half": the rows of a scikit-learn data set are split at random, the reference is built from
#   one half and windows are drawn WITHOUT replacement from the other; every trial re-splits.
# - "pool": a large population (2x2 RGB patches of scikit-learn's sample photos, china.jpg and
#   flower.jpg, when Pillow can decode them; else 2x2 patches of the digits scans) is permuted,
#   the reference is its first ``ref_size`` rows and the windows are fresh disjoint rows after it.
# Both are exchangeable by construction (sampling without replacement from a finite population),
# so a valid test alarms at most alpha of the time. Detection windows are the same windows with
# one change injected (only at sizes a held-out half can fill without replacement, so the binned
# test's own false alarms do not pass for detections).


@dataclass(frozen=True)
class RealData:
    name: str
    rows: np.ndarray  # (M, d) float64
    split: str  # "half" | "pool"
    ref_size: int


def _photo_patches() -> np.ndarray | None:
    try:
        from sklearn.datasets import load_sample_images

        images = load_sample_images().images
    except ImportError:  # Pillow is needed to decode the JPEGs
        return None
    out = []
    for img in images:
        h, w = (img.shape[0] // 2) * 2, (img.shape[1] // 2) * 2
        a = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).transpose(0, 2, 1, 3, 4)
        out.append(a.reshape(-1, 12))
    return np.concatenate(out).astype(np.float64)


def _digit_patches() -> np.ndarray:
    from sklearn.datasets import load_digits

    img = np.asarray(load_digits().images, dtype=np.float64)  # (1797, 8, 8)
    a = img.reshape(-1, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4)
    return np.ascontiguousarray(a.reshape(-1, 4))


def real_datasets(patches: str = "auto") -> list[RealData]:
    """diabetes, breast_cancer, digits (held-out halves) and one patch population.

    ``patches``: "photos" (needs Pillow), "digits", or "auto" (photos when Pillow is there).
    """
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits

    out = [
        RealData(name, loader().data.astype(np.float64), "half", len(loader().data) // 2)
        for name, loader in (
            ("diabetes", load_diabetes),
            ("breast_cancer", load_breast_cancer),
            ("digits", load_digits),
        )
    ]
    photos = _photo_patches() if patches in ("auto", "photos") else None
    if patches == "photos" and photos is None:
        raise RuntimeError("photo patches need Pillow to decode scikit-learn's sample images")
    if photos is not None:
        out.append(RealData("photo 2x2 RGB patches", photos, "pool", 20_000))
    else:
        out.append(RealData("digits 2x2 patches", _digit_patches(), "pool", 10_000))
    return out


def null_windows(
    data: RealData, n: int, windows: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(reference rows, live window) pairs under the null; windows never reuse a row."""
    done = 0
    while done < windows:
        perm = rng.permutation(len(data.rows))
        ref = data.rows[perm[: data.ref_size]]
        rest = perm[data.ref_size :]
        if data.split == "half":
            rest = rest[: len(data.rows) - data.ref_size]
        per_split = len(rest) // n
        if per_split == 0:
            return
        for w in range(min(per_split, windows - done)):
            yield ref, data.rows[rest[w * n : (w + 1) * n]]
            done += 1


_BUILT: list[Any] = [None, None]  # (rows object, reference) of the last split


def _decide_both(ref_rows: np.ndarray, live: np.ndarray, alpha: float = 0.01) -> tuple[bool, bool]:
    """(alarm with the range test, alarm with the binned test alone) for one window."""
    from edgefleet.drift.decision import DriftConfig, decide
    from edgefleet.drift.reference import build_reference
    from edgefleet.drift.sketch import Sketch

    if _BUILT[0] is not ref_rows:
        _BUILT[:] = [ref_rows, build_reference({"x": ref_rows}, {})]
    ref = _BUILT[1]
    sk = Sketch(ref)
    sk.update({"x": live})
    d = sk.to_dict()
    cfg = DriftConfig(alpha=alpha)
    new = decide(ref, d, cfg).drift
    d.pop("range", None)
    return new, decide(ref, d, cfg).drift


def false_alarms(data: RealData, n: int, windows: int, seed: int = 0) -> tuple[int, int, int]:
    """(alarms with the range test, alarms binned-only, windows) under the null."""
    rng = np.random.default_rng(seed)
    a = b = total = 0
    for ref, live in null_windows(data, n, windows, rng):
        new, old = _decide_both(ref, live)
        a, b, total = a + new, b + old, total + 1
    return a, b, total


CASES = (
    "5% at +50 std",
    "constant 0 -> all 7",
    "constant 0 -> 5% at 7",
    "0.5 std shift",
)


def _inject(case: str, ref: np.ndarray, live: np.ndarray, rng: np.random.Generator) -> Any:
    ref, live = ref.copy(), live.copy()
    std = ref.std(axis=0)
    varying = np.flatnonzero(std > 0)
    n = len(live)
    if case.startswith("constant"):
        const = np.flatnonzero(std == 0)
        j = int(const[0]) if const.size else 0
        if not const.size:  # a dead sensor: the column is 0.0 in the reference
            ref[:, j] = 0.0
        live[:, j] = 0.0
        rows = slice(None) if "all" in case else rng.choice(n, max(1, n // 20), replace=False)
        live[rows, j] = 7.0
    elif case == "5% at +50 std":
        j = int(rng.choice(varying))
        rows = rng.choice(n, max(1, n // 20), replace=False)
        live[rows, j] = ref[:, j].mean() + 50 * std[j]
    else:
        j = int(rng.choice(varying))
        live[:, j] += 0.5 * std[j]
    return ref, live


def detection(
    data: RealData, n: int, case: str, windows: int, seed: int = 1
) -> tuple[int, int, int, bool]:
    """(detected with the range test, binned-only, windows, resampled with replacement)."""
    rng = np.random.default_rng(seed)
    held = len(data.rows) - data.ref_size
    resampled = data.split == "half" and n > held
    a = b = 0
    for _ in range(windows):
        perm = rng.permutation(len(data.rows))
        ref = data.rows[perm[: data.ref_size]]
        rest = perm[data.ref_size :][:held]
        idx = rng.choice(rest, n, replace=True) if resampled else rest[:n]
        r, live = _inject(case, ref, data.rows[idx], rng)
        new, old = _decide_both(r, live)
        a, b = a + new, b + old
    return a, b, windows, resampled


def bench_validation(quick: bool, patches: str = "auto") -> tuple[list[list[str]], list[list[str]]]:
    """(false-alarm rows, detection rows) of the real-data validation."""
    fa_rows: list[list[str]] = []
    det_rows: list[list[str]] = []
    for data in real_datasets(patches):
        sizes = (100, 1000, 10_000) if data.split == "pool" else (100,)
        for n in sizes:
            w = (
                {100: 200, 1000: 100, 10_000: 40}[n]
                if quick
                else {100: 1000, 1000: 400, 10_000: 100}[n]
            )
            a, b, total = false_alarms(data, n, w)
            if total:
                fa_rows.append(
                    [
                        data.name,
                        str(data.ref_size),
                        str(n),
                        str(total),
                        f"{a / total:.1%}",
                        f"{b / total:.1%}",
                    ]
                )
        for n in sizes:
            w = 20 if quick else 100
            for case in CASES:
                a, b, total, _ = detection(data, n, case, max(5, int(w / (n / 100) ** 0.5)))
                det_rows.append(
                    [
                        data.name,
                        str(data.ref_size),
                        str(n),
                        case,
                        f"{a / total:.0%}",
                        f"{b / total:.0%}",
                    ]
                )
    return fa_rows, det_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_drift", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller runs (under a minute)")
    p.add_argument(
        "--validate", action="store_true", help="only the real-data validation (section 4)"
    )
    p.add_argument(
        "--patches",
        choices=("auto", "photos", "digits"),
        default="auto",
        help="patch population for the validation (photos need Pillow)",
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.validate:
        _print_validation(args.quick, args.patches)
        console.print(f"bench_drift done in {time.perf_counter() - t0:.1f}s")
        return 0

    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t = Table(
        title=f"controller telemetry ingest (SQLite file; load average {load:.1f}, "
        f"{os.cpu_count()} CPUs)"
    )
    t.add_column("path")
    t.add_column("messages/s (wall)", justify="right")
    t.add_column("messages per CPU-s", justify="right")
    t.add_column("vs baseline (wall)", justify="right")
    ingest = bench_ingest(args.quick)
    for name, rate, cpu, ratio in ingest:
        t.add_row(name, f"{rate:,.0f}", f"{cpu:,.0f}", ratio)
    console.print(t)
    target = 5000
    _, wall, cpu, _ = ingest[1]
    console.print(
        f"target >= {target:,} messages/s: wall {'met' if wall >= target else 'NOT met'}, "
        f"per CPU-second {'met' if cpu >= target else 'NOT met'} (a message = one tick of one "
        "device: system, agent, inference and sketch records)"
    )

    t = Table(title="sketch cost per inference (CPU, ONNX Runtime)")
    t.add_column("what")
    t.add_column("us/request", justify="right")
    t.add_column("vs inference", justify="right")
    for name, us, ratio in bench_sketch(args.quick):
        t.add_row(name, f"{us:.1f}", ratio)
    console.print(t)

    t = Table(title="0.5 sigma shift in 1 of 64 features (reference n=5000)")
    for c in ("window n", "rule", "false alarms/window", "detected"):
        t.add_column(c, justify="right")
    for row in bench_power(args.quick):
        t.add_row(*row)
    console.print(t)
    _print_validation(args.quick, args.patches)
    console.print(f"bench_drift done in {time.perf_counter() - t0:.1f}s (per-call: best of 3)")
    return 0


def _print_validation(quick: bool, patches: str) -> None:
    fa, det = bench_validation(quick, patches)
    t = Table(title="false alarms at alpha 1 % on held-out real data (no drift; target <= 2 %)")
    for c in ("data", "reference n", "window n", "windows", "range + binned", "binned alone"):
        t.add_column(c, justify="right")
    for row in fa:
        t.add_row(*row)
    console.print(t)
    t = Table(title="detection at alpha 1 % (one feature changed in held-out windows)")
    for c in ("data", "reference n", "window n", "change", "range + binned", "binned alone"):
        t.add_column(c, justify="right")
    for row in det:
        t.add_row(*row)
    console.print(t)


if __name__ == "__main__":
    raise SystemExit(main())
