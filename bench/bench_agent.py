"""Agent benchmark: KServe v2 JSON and binary latency/throughput against raw `session.run` in the
same run; failed requests and p99 during a hot swap under load against steady state; the agent's
RSS without a model and its idle CPU.

python -m bench agent [--quick]
Targets: 0 failed; swap p99 <= 2x steady; JSON p50 <= 1.2x raw + 1 ms (small model);
binary throughput >= 0.7x raw (1 MiB inputs); RSS <= 80 MB.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.harness import free_port
from edgefleet.wire.states import TERMINAL_STATES

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- models and packages


def _iris_model() -> tuple[bytes, np.ndarray]:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    d = load_iris()
    x = d.data.astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(x, d.target)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    return onx.SerializeToString(), x


def _conv_model() -> tuple[bytes, np.ndarray]:
    """A MobileNetV1-class CNN (~0.5 GMAC) on a 1 MiB input [1, 4, 256, 256] float32."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def w(name: str, shape: tuple[int, ...]) -> Any:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)

    nodes, prev = [], "X"
    layers = [("W1", (32, 4, 3, 3), 1), ("W2", (64, 32, 3, 3), 2), ("W3", (64, 64, 3, 3), 2)]
    for i, (name, _shape, stride) in enumerate(layers):
        nodes.append(
            helper.make_node(
                "Conv", [prev, name], [f"c{i}"], pads=[1, 1, 1, 1], strides=[stride, stride]
            )
        )
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    nodes.append(helper.make_node("GlobalAveragePool", [prev], ["Y"]))
    g = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4, 256, 256])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 64, 1, 1])],
        [w(name, shape) for name, shape, _ in layers],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString(), rng.random((8, 4, 256, 256), dtype=np.float32)


def _package(
    out: Path, key: Any, name: str, version: str, onnx_bytes: bytes, x: np.ndarray
) -> Path:
    import onnxruntime as ort

    from edgefleet.keys import load_private_key
    from edgefleet.wire.package import build_package

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"X": x})
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "model.onnx").write_bytes(onnx_bytes)
        samples = {"input:X": x} | {
            f"output:{o.name}": v for o, v in zip(sess.get_outputs(), outs, strict=True)
        }
        np.savez(t / "samples.npz", **samples)
        manifest = {
            "format": "edgefleet.package/v1",
            "name": name,
            "version": version,
            "profile": "cpu-x86_64",
            "min_agent_version": "0.1.0",
            "model": {"file": "model.onnx", "external_data": []},
            "io": {
                "inputs": [{"name": "X", "dtype": "float32", "shape": [None, *x.shape[1:]]}],
                "outputs": [
                    {"name": o.name, "dtype": "float32", "shape": [None]}
                    for o in sess.get_outputs()
                ],
            },
            "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
            "cpu_fallback": True,
            "gates": {"max_p95_ms": 10000.0, "max_memory_mb": 1024.0},
        }
        return build_package(
            out,
            manifest,
            {"model.onnx": t / "model.onnx", "samples.npz": t / "samples.npz"},
            load_private_key(key.private_path),
        )


# --------------------------------------------------------------------------- agent process


class _AgentProc:
    def __init__(self, work: Path, trusted: Path, swap_mode: str = "auto") -> None:
        from edgefleet.agent.config import dump_config

        self.data = work / "data"
        self.port = free_port()
        work.mkdir(parents=True, exist_ok=True)
        cfg = work / "agent.toml"
        cfg.write_text(
            dump_config(
                {
                    "device_id": "bench",
                    "data_dir": str(self.data),
                    "trusted_keys": [str(trusted)],
                    "http_port": self.port,
                    "probation": {"seconds": 0.5, "min_requests": 0},
                    "swap": {"mode": swap_mode},
                    "telemetry": {"enabled": False},
                }
            )
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(cfg)],
            cwd=str(REPO),
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (self.data / "admin.json").exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("agent did not start")
            time.sleep(0.05)

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        info = json.loads((self.data / "admin.json").read_text())
        token = (self.data / "admin.token").read_text().strip()
        c = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=30)
        c.request(
            method,
            path,
            body=json.dumps(body).encode() if body else None,
            headers={"Authorization": f"Bearer {token}"},
        )
        out = json.loads(c.getresponse().read())
        c.close()
        return out

    def install(self, pkg: Path, timeout: float = 120) -> dict[str, Any]:
        uid = self.admin("POST", "/admin/updates", {"source": str(pkg)})["id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.admin("GET", f"/admin/updates/{uid}")
            if v["state"] in TERMINAL_STATES:
                return dict(v)
            time.sleep(0.05)
        raise TimeoutError(f"update {uid} did not finish")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)


# --------------------------------------------------------------------------- measurements


def _pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a), q)) if a else float("nan")


def _raw_latency(onnx_bytes: bytes, x: np.ndarray, n: int) -> list[float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the agent runs it
    s = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
    for _ in range(min(20, n)):
        s.run(None, {"X": x})
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        s.run(None, {"X": x})
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _oip_latency(
    port: int, model: str, x: np.ndarray, n: int, binary: bool
) -> tuple[list[float], int]:
    from edgefleet.agent import oip

    body, headers = oip.encode_request({"X": x}, binary=binary, binary_outputs=binary)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    lat, failed = [], 0
    for i in range(n + min(20, n)):
        t0 = time.perf_counter()
        c.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        r = c.getresponse()
        raw = r.read()
        if r.status != 200:
            failed += 1
        else:
            oip.decode_response(raw, r.headers)
        if i >= min(20, n):
            lat.append((time.perf_counter() - t0) * 1000)
    c.close()
    return lat, failed


def _load(
    port: int,
    model: str,
    x: np.ndarray,
    stop: threading.Event,
    out: list[tuple[float, float, bool]],
    max_s: float,
) -> None:
    from edgefleet.agent import oip

    body, headers = oip.encode_request({"X": x})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    deadline = time.monotonic() + max_s
    while not stop.is_set() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        ok = False
        try:
            c.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
            r = c.getresponse()
            r.read()
            ok = r.status == 200
        except (OSError, http.client.HTTPException):
            c.close()
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out.append((time.monotonic(), (time.perf_counter() - t0) * 1000, ok))
    c.close()


def main(argv: list[str] | None = None) -> int:
    import psutil
    from rich.console import Console
    from rich.table import Table

    from edgefleet.keys import generate_keypair

    args = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in args
    n_small = 300 if quick else 2000
    n_big = 50 if quick else 250
    console = Console()
    rows: list[tuple[str, str, str, str, str]] = []
    ok_all = True

    def row(metric: str, value: str, baseline: str, ratio: str, target: str, ok: bool) -> None:
        nonlocal ok_all
        ok_all &= ok
        rows.append((metric, value, baseline, ratio, f"[{'green' if ok else 'red'}]{target}[/]"))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key = generate_keypair(work / "keys", "bench")
        iris, xi = _iris_model()
        conv, xc = _conv_model()
        p_iris1 = _package(work / "p", key, "iris", "1.0.0", iris, xi[:32])
        p_iris2 = _package(work / "p", key, "iris", "1.1.0", iris, xi[:32])
        p_conv = _package(work / "p", key, "conv", "1.0.0", conv, xc[:2])

        # RSS and idle CPU of an agent without a model
        a = _AgentProc(work / "empty", key.public_path)
        try:
            time.sleep(1.0)
            pr = psutil.Process(a.proc.pid)
            rss = pr.memory_info().rss / 2**20
            c0 = pr.cpu_times()
            idle_s = 2.0 if quick else 5.0
            time.sleep(idle_s)
            c1 = pr.cpu_times()
            cpu = 100 * ((c1.user + c1.system) - (c0.user + c0.system)) / idle_s
        finally:
            a.stop()
        row("agent RSS, no model", f"{rss:.1f} MB", "-", "-", "<= 80 MB", rss <= 80)
        row("agent idle CPU", f"{cpu:.2f} %", "-", "-", "< 1 %", cpu < 1.0)

        a = _AgentProc(work / "serve", key.public_path)
        try:
            for p in (p_iris1, p_conv):
                v = a.install(p)
                if v["state"] != "COMMITTED":
                    raise RuntimeError(f"install of {p.name} ended {v['state']}: {v.get('reason')}")
            x1 = xi[:1]
            raw, js, f1 = [], [], 0
            for _ in range(5):
                raw += _raw_latency(iris, x1, n_small // 5)
                got, f = _oip_latency(a.port, "iris", x1, n_small // 5, binary=False)
                js += got
                f1 += f
            raw50, js50 = _pct(raw, 50), _pct(js, 50)
            row(
                "JSON p50, iris 1 row",
                f"{js50:.3f} ms",
                f"raw {raw50:.3f} ms",
                f"{js50 / raw50:.1f}x",
                "<= 1.2x raw + 1 ms",
                js50 <= 1.2 * raw50 + 1.0 and f1 == 0,
            )
            bn, f2 = _oip_latency(a.port, "iris", x1, n_small, binary=True)
            bn50 = _pct(bn, 50)
            row(
                "binary p50, iris 1 row",
                f"{bn50:.3f} ms",
                f"raw {raw50:.3f} ms",
                f"{bn50 / raw50:.1f}x",
                "(info)",
                f2 == 0,
            )
            xb = xc[:1]
            rawb, bb, f3 = [], [], 0
            for _ in range(5):  # interleaved rounds: load from other processes hits both alike
                rawb += _raw_latency(conv, xb, n_big // 5)
                got, f = _oip_latency(a.port, "conv", xb, n_big // 5, binary=True)
                bb += got
                f3 += f
            thr_raw = 1000.0 / float(np.mean(rawb))
            thr_bin = 1000.0 / float(np.mean(bb))
            row(
                "binary throughput, 1 MiB input",
                f"{thr_bin:.1f} req/s",
                f"raw {thr_raw:.1f} req/s",
                f"{thr_bin / thr_raw:.2f}x",
                ">= 0.7x raw",
                thr_bin >= 0.7 * thr_raw and f3 == 0,
            )
            jb, f4 = _oip_latency(a.port, "conv", xb, max(10, n_big // 4), binary=False)
            thr_js = 1000.0 / float(np.mean(jb))
            row(
                "JSON throughput, 1 MiB input",
                f"{thr_js:.1f} req/s",
                f"raw {thr_raw:.1f} req/s",
                f"{thr_js / thr_raw:.2f}x",
                "(info)",
                f4 == 0,
            )

            # swap under load: 3 client threads, steady window then an update in the middle
            samples: list[tuple[float, float, bool]] = []
            stop = threading.Event()
            threads = [
                threading.Thread(target=_load, args=(a.port, "iris", x1, stop, samples, 120))
                for _ in range(3)
            ]
            for t in threads:
                t.start()
            steady_s = 2.0 if quick else 5.0
            time.sleep(steady_s)
            t_swap0 = time.monotonic()
            v = a.install(p_iris2)
            t_swap1 = time.monotonic()
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(timeout=30)
            if v["state"] != "COMMITTED":
                raise RuntimeError(f"swap update ended {v['state']}: {v.get('reason')}")
            act = next(h for h in v["history"] if h["state"] == "ACTIVATING")
            steady = [ms for ts, ms, ok in samples if ts < t_swap0 - 0.2]
            during = [ms for ts, ms, ok in samples if t_swap0 <= ts <= t_swap1 + 0.2]
            failed = sum(1 for _, _, ok in samples if not ok)
            s99, d99 = _pct(steady, 99), _pct(during, 99)
            row(
                "failed requests during swap",
                f"{failed} of {len(samples)}",
                "-",
                "-",
                "0",
                failed == 0,
            )
            row(
                "p99 during update+swap",
                f"{d99:.3f} ms",
                f"steady {s99:.3f} ms",
                f"{d99 / s99:.2f}x",
                "<= 2x steady",
                d99 <= 2 * s99,
            )
            row(
                "update wall time (local pkg)",
                f"{t_swap1 - t_swap0:.2f} s",
                "-",
                "-",
                f"swap at {act['at'][11:23]}",
                True,
            )
        finally:
            a.stop()

    table = Table(title=f"agent benchmark{' (quick)' if quick else ''}")
    for col in ("metric", "value", "baseline", "ratio", "target"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    console.print(table)
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
