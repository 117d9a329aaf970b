"""Shadow benchmark: what mirroring live requests to a candidate costs the serving path.

One agent (in this process: its HTTP server, update worker and shadow slot) serves a real model
(an MLP trained on scikit-learn's digits); a separate client process sends closed-loop KServe v2
requests. In the same run, interleaved in rounds: no shadow, a candidate in shadow with 100 %
of requests mirrored, and with 10 %. Reported: serving p50/p99 per mode (pooled over rounds),
p99 against no shadow, requests compared by the candidate and mirrors dropped (full queue).

python -m bench shadow [--quick]
Target: p99 with mirroring at most a few percent above no shadow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.bench_agent import _package
from edgefleet.harness import free_port

REPO = Path(__file__).resolve().parents[1]

CLIENT = r"""
import http.client, json, sys, threading, time
import numpy as np
from edgefleet.agent import oip
port, n, conc, xfile, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
x = np.load(xfile)
lat, failed, lock = [], [0], threading.Lock()
def work(k):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(n // conc + 20):
        row = x[(k * 7919 + i) % len(x)][None, :]
        body, headers = oip.encode_request({"X": row})
        t0 = time.perf_counter()
        c.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
        r = c.getresponse(); r.read()
        ms = (time.perf_counter() - t0) * 1000
        with lock:
            if r.status != 200: failed[0] += 1
            elif i >= 20: lat.append(ms)
ts = [threading.Thread(target=work, args=(k,)) for k in range(conc)]
[t.start() for t in ts]; [t.join() for t in ts]
json.dump({"lat": lat, "failed": failed[0]}, open(out, "w"))
"""


def _mlp() -> tuple[bytes, np.ndarray]:
    """An MLP (128, 64) on the digits (pixels in [0, 1]), as ONNX with input ``X``."""
    import warnings

    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter reached: accurate enough for timing
        clf = MLPClassifier((128, 64), max_iter=60, random_state=0).fit(x, d.target)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    return onx.SerializeToString(), x


def _pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q)) if a else float("nan")


def _client(port: int, n: int, conc: int, xfile: Path, work: Path) -> tuple[list[float], int]:
    out = work / f"client-{time.monotonic_ns()}.json"
    subprocess.run(
        [sys.executable, "-c", CLIENT, str(port), str(n), str(conc), str(xfile), str(out)],
        check=True,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=600,
    )
    res = json.loads(out.read_text())
    return list(res["lat"]), int(res["failed"])


def _wait(pred: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    from edgefleet.agent import shadow as shadow_mod
    from edgefleet.agent.config import AgentConfig, ProbationConfig, TelemetryConfig
    from edgefleet.agent.runtime import Agent, UpdateEvent, UpdateRequest
    from edgefleet.keys import generate_keypair
    from edgefleet.wire.shadow import ShadowSpec, parse_figures

    quick = "--quick" in (argv or [])
    n, rounds, conc = (1500, 2, 2) if quick else (2000, 6, 2)
    # The request thread's own cost of mirroring: the observer's time per request (the client's
    # latency also holds the candidate's CPU use, and this machine's noise).
    hook_us: dict[float, list[float]] = {}
    observe = shadow_mod.ShadowSlot.observe

    def timed(self: Any, *a: Any) -> None:
        t0 = time.perf_counter()
        observe(self, *a)
        hook_us.setdefault(self.spec.sample, []).append((time.perf_counter() - t0) * 1e6)

    shadow_mod.ShadowSlot.observe = timed  # type: ignore[method-assign,assignment]
    onnx_bytes, x = _mlp()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = generate_keypair(work / "keys", "bench")
        v1 = _package(work / "p1", key, "digits", "1.0.0", onnx_bytes, x[:32])
        v2 = _package(work / "p2", key, "digits", "1.1.0", onnx_bytes, x[:32])
        xfile = work / "x.npy"
        np.save(xfile, x)
        port = free_port()
        agent = Agent(
            AgentConfig(
                device_id="bench",
                data_dir=work / "data",
                trusted_keys=[key.public_path],
                http_port=port,
                admin_port=0,
                probation=ProbationConfig(seconds=0.2, min_requests=0),
                telemetry=TelemetryConfig(enabled=False),
            )
        )
        agent.start()
        events: list[UpdateEvent] = []
        agent.add_listener(events.append)
        try:
            view = agent.wait_update(agent.submit_update(UpdateRequest("digits", "", str(v1))), 60)
            assert view["state"] == "COMMITTED", view
            results: dict[str, dict[str, Any]] = {}
            for _ in range(rounds):
                for mode in ("off", "100%", "10%"):
                    r = results.setdefault(mode, {"lat": [], "failed": 0, "compared": 0, "drop": 0})
                    uid = None
                    if mode != "off":
                        sample = 1.0 if mode == "100%" else 0.1
                        spec = ShadowSpec(requests=10**6, sample=sample, window_s=1.0)
                        observers = len(agent.sessions.observers)
                        agent.steer_shadow("digits", "1.1.0", True)
                        uid = agent.submit_update(
                            UpdateRequest("digits", "1.1.0", str(v2), shadow=spec.to_dict())
                        )
                        _wait(lambda o=observers: len(agent.sessions.observers) > o, 60)
                        events.clear()
                    lat, failed = _client(port, n, conc, xfile, work)
                    r["lat"] += lat
                    r["failed"] += failed
                    if uid is not None:
                        agent.steer_shadow("digits", "1.0.0", False)  # drop it
                        done = agent.wait_update(uid, 60)
                        assert done["state"] == "FAILED", done
                        figs = [e.figures for e in events if e.kind == "shadow" and e.figures]
                        if figs:
                            final = parse_figures(figs[-1])
                            r["compared"] += final.total.compared
                            r["drop"] += final.total.dropped
        finally:
            agent.stop()
            shadow_mod.ShadowSlot.observe = observe  # type: ignore[method-assign]
    base = _pct(results["off"]["lat"], 99)
    base95 = _pct(results["off"]["lat"], 95)
    print(f"model: digits MLP (128, 64), {conc} client connections, {rounds} rounds x {n} requests")
    print(
        f"{'mode':<6} {'requests':>8} {'failed':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'p95 vs off':>10} {'p99 vs off':>10} {'compared':>9} {'dropped':>8} "
        f"{'hook p50 us':>11} {'hook p99 us':>11}"
    )
    ok = True
    for mode, r in results.items():
        p95, p99 = _pct(r["lat"], 95), _pct(r["lat"], 99)
        ratio = p99 / base if base else float("nan")
        hook = hook_us.get({"100%": 1.0, "10%": 0.1}.get(mode, -1.0), [])
        print(
            f"{mode:<6} {len(r['lat']):>8} {r['failed']:>6} {_pct(r['lat'], 50):>8.3f} "
            f"{p95:>8.3f} {p99:>8.3f} {p95 / base95:>10.3f} {ratio:>10.3f} {r['compared']:>9} "
            f"{r['drop']:>8} {_pct(hook, 50) if hook else 0:>11.1f} "
            f"{_pct(hook, 99) if hook else 0:>11.1f}"
        )
        ok = ok and r["failed"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
