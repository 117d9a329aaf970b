"""Drift benchmarks: controller ingest rate, sketch cost per inference, detection power.

``python -m bench.bench_drift [--quick]``

1. Telemetry messages per second the controller ingests into SQLite (a message = one telemetry
   tick of one device: system, agent, inference and sketch records), one message per
   transaction (baseline) against ``ingest_batch`` with 500 messages per transaction.
2. Sketch cost per inference against the inference itself (ONNX Runtime, batch 1): counting
   each request directly, and the agent's buffered path (observe + amortised batch count).
3. A 0.5 sigma shift in one of 64 features: detection rate and false alarms per window for
   the calibrated decision (chi-square + BH, alpha 0.01) against fixed PSI cut-offs.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

console = Console()


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_drift", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller runs (under a minute)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()

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
    console.print(f"bench_drift done in {time.perf_counter() - t0:.1f}s (per-call: best of 3)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
