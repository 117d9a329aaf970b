"""A truly slower release: the test classifier with a heavy branch that changes no output.

``probabilities + 0 * sum(tanh(... tanh(tanh(X @ W0) @ W) ... @ W))``: ``layers`` dense
512x512 layers per sample (one shared weight, so the package stays small) that ONNX Runtime must
compute (they depend on the input, so nothing folds them away), and the same answers as the
plain model, so the package's validation samples still agree. 100 layers: about 10-20 ms per
inference on one core, against about 0.02 ms for the plain model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.keys import KeyPair, load_private_key
from edgefleet.wire.package import build_package
from tests.support.packages import _model_bytes, model_inputs

WIDTH = 512


def slow_model_bytes(layers: int, seed: int = 0) -> bytes:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(_model_bytes("digits", seed)[0])
    g = model.graph
    for node in g.node:  # the node that produces the output gets a private name for it
        node.output[:] = ["probabilities_fast" if o == "probabilities" else o for o in node.output]
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((64, WIDTH)) * 0.1).astype(np.float32)
    w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
    inits = [numpy_helper.from_array(w0, "W0"), numpy_helper.from_array(w, "W")]
    nodes = [helper.make_node("MatMul", ["X", "W0"], ["H0"])]
    for i in range(1, layers + 1):
        nodes.append(helper.make_node("MatMul", [f"H{i - 1}", "W"], [f"M{i}"]))
        nodes.append(helper.make_node("Tanh", [f"M{i}"], [f"H{i}"]))
    inits += [
        numpy_helper.from_array(np.array([1], dtype=np.int64), "sum_axes"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
    ]
    nodes += [
        helper.make_node("ReduceSum", [f"H{layers}", "sum_axes"], ["S"], keepdims=1),
        helper.make_node("Mul", ["S", "zero"], ["Z"]),
        helper.make_node("Add", ["probabilities_fast", "Z"], ["probabilities"]),
    ]
    g.initializer.extend(inits)
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def p95_ms(onnx_bytes: bytes, runs: int = 60) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = model_inputs("digits")[:1]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {"X": x})
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 95))


def make_slow_package(
    out_dir: Path, *, name: str, version: str, key: KeyPair, profile: str, layers: int
) -> tuple[Path, float]:
    """A signed package of the slow model (its benchmark recorded honestly); (path, p95 ms)."""
    import onnxruntime as ort

    onnx_bytes = slow_model_bytes(layers)
    x = model_inputs("digits")[:32]
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"X": x})
    samples = {"input:X": x}
    for o, v in zip(sess.get_outputs(), outs, strict=True):
        samples[f"output:{o.name}"] = v
    p95 = p95_ms(onnx_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "model.onnx").write_bytes(onnx_bytes)
        np.savez(t / "samples.npz", **samples)  # type: ignore[arg-type]
        manifest: dict[str, Any] = {
            "format": "edgefleet.package/v1",
            "name": name,
            "version": version,
            "profile": profile,
            "min_agent_version": "0.1.0",
            "model": {"file": "model.onnx", "external_data": []},
            "io": {
                "inputs": [{"name": "X", "dtype": "float32", "shape": [None, 64]}],
                "outputs": [
                    {"name": "label", "dtype": "int64", "shape": [None]},
                    {"name": "probabilities", "dtype": "float32", "shape": [None, None]},
                ],
            },
            "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
            "cpu_fallback": True,
            "gates": {
                "max_p95_ms": 1000.0,
                "max_memory_mb": 512.0,
                "sample_atol": 1e-4,
                "sample_rtol": 1e-3,
            },
            "validation": {"agreement": 1.0, "max_abs_error": 0.0},
            "benchmark": {"provider": "CPUExecutionProvider", "p50_ms": p95, "p95_ms": p95},
            "quantization": {"recipe": {"kind": "none"}},
            "lineage": {"source_sha256": None},
        }
        path = build_package(
            out_dir,
            manifest,
            {"model.onnx": t / "model.onnx", "samples.npz": t / "samples.npz"},
            load_private_key(key.private_path),
        )
    return path, p95
