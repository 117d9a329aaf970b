"""Signed packages of a small three-layer MLP whose versions share most tensors (delta tests).

``mlp_package(out, version, head_seed=...)``: the two hidden layers' weights are always the same
(seeded); ``head_seed`` draws the classifier head, so two versions with different head seeds
share every block but the head's. The manifest carries every member's block list (``with_blocks=False``: none).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.keys import KeyPair, load_private_key
from edgefleet.wire.package import build_package

N_IN, N_HID, N_OUT = 64, 512, 10


def mlp_bytes(head_seed: int = 0) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    body = np.random.default_rng(0)
    head = np.random.default_rng(1000 + head_seed)
    weights = {
        "w1": body.standard_normal((N_IN, N_HID)).astype(np.float32) * 0.1,
        "b1": body.standard_normal(N_HID).astype(np.float32) * 0.1,
        "w2": body.standard_normal((N_HID, N_HID)).astype(np.float32) * 0.05,
        "b2": body.standard_normal(N_HID).astype(np.float32) * 0.1,
        "w3": head.standard_normal((N_HID, N_OUT)).astype(np.float32) * 0.05,
        "b3": head.standard_normal(N_OUT).astype(np.float32) * 0.1,
    }
    nodes = [
        helper.make_node("Gemm", ["X", "w1", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, N_IN])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, N_OUT])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def mlp_package(
    out_dir: Path,
    *,
    version: str,
    key: KeyPair,
    head_seed: int = 0,
    name: str = "mlp",
    with_blocks: bool = True,
    **overrides: Any,
) -> Path:
    import onnxruntime as ort

    onnx_bytes = mlp_bytes(head_seed)
    x = np.random.default_rng(7).random((16, N_IN), dtype=np.float32)
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"X": x})
    model: dict[str, Any] = {"file": "model.onnx", "external_data": []}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "model.onnx").write_bytes(onnx_bytes)
        np.savez(t / "samples.npz", **{"input:X": x, "output:probabilities": y})
        manifest: dict[str, Any] = {
            "format": "edgefleet.package/v1",
            "name": name,
            "version": version,
            "profile": "cpu-x86_64",
            "min_agent_version": "0.1.0",
            "model": model,
            "io": {
                "inputs": [{"name": "X", "dtype": "float32", "shape": [None, N_IN]}],
                "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [None, N_OUT]}],
            },
            "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
            "cpu_fallback": True,
            "gates": {"max_p95_ms": 1000.0, "sample_atol": 1e-4, "sample_rtol": 1e-3},
            "validation": {"agreement": 1.0, "max_abs_error": 0.0},
            "benchmark": {"provider": "CPUExecutionProvider", "p50_ms": 0.05, "p95_ms": 0.1},
            "quantization": {"recipe": {"kind": "none"}},
            "lineage": {"source_sha256": None},
        }
        manifest.update(overrides)
        return build_package(
            out_dir,
            manifest,
            {"model.onnx": t / "model.onnx", "samples.npz": t / "samples.npz"},
            load_private_key(key.private_path),
            block_lists=with_blocks,
        )
