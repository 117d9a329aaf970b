"""Real signed packages for tests, built without the packager pipeline.

``make_package`` trains a small scikit-learn model, converts it with skl2onnx, records samples and
the source outputs, and signs the package with ``edgefleet.wire.package.build_package``. It is for
agent and controller tests that need a valid (or deliberately bad) package quickly.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.keys import KeyPair, load_private_key
from edgefleet.wire.package import build_package

MODELS = ("iris", "digits")


@functools.lru_cache(maxsize=8)
def _model_bytes(model: str, seed: int) -> tuple[bytes, bytes]:
    """(ONNX bytes, npz bytes of inputs) for a tiny trained classifier."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits, load_iris
    from sklearn.linear_model import LogisticRegression

    data = load_iris() if model == "iris" else load_digits()
    x = data.data.astype(np.float32)
    clf = LogisticRegression(max_iter=500, random_state=seed).fit(x, data.target)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    import io

    buf = io.BytesIO()
    np.savez(buf, x=x)
    return onx.SerializeToString(), buf.getvalue()


def model_inputs(model: str = "iris") -> np.ndarray:
    import io

    _, npz = _model_bytes(model, 0)
    return np.load(io.BytesIO(npz))["x"]


def make_package(
    out_dir: Path,
    *,
    name: str,
    version: str,
    key: KeyPair,
    profile: str = "cpu-x86_64",
    model: str = "iris",
    seed: int = 0,
    providers: list[dict[str, Any]] | None = None,
    cpu_fallback: bool = True,
    gates: dict[str, float | None] | None = None,
    corrupt_samples: bool = False,
    **manifest_overrides: Any,
) -> Path:
    """Build a real signed FP32 package; ``corrupt_samples`` records wrong expected outputs."""
    import onnxruntime as ort

    if model not in MODELS:
        raise ValueError(f"unknown test model {model!r}; use one of {MODELS}")
    onnx_bytes, _ = _model_bytes(model, seed)
    x = model_inputs(model)[:32]
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    outs = sess.run(None, {"X": x})
    samples = {"input:X": x}
    for n, o in zip(out_names, outs, strict=True):
        samples[f"output:{n}"] = (o + 1.0) if corrupt_samples and n == "probabilities" else o
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
                "inputs": [{"name": "X", "dtype": "float32", "shape": [None, int(x.shape[1])]}],
                "outputs": [
                    {
                        "name": o.name,
                        "dtype": "int64" if "label" in o.name else "float32",
                        "shape": [None] + ([] if "label" in o.name else [None]),
                    }
                    for o in sess.get_outputs()
                ],
            },
            "execution_providers": providers or [{"name": "CPUExecutionProvider", "options": {}}],
            "cpu_fallback": cpu_fallback,
            "gates": gates
            if gates is not None
            else {
                "max_p95_ms": 1000.0,
                "max_memory_mb": 512.0,
                "sample_atol": 1e-4,
                "sample_rtol": 1e-3,
            },
            "validation": {"agreement": 1.0, "max_abs_error": 0.0},
            "benchmark": {"provider": "CPUExecutionProvider", "p50_ms": 0.05, "p95_ms": 0.1},
            "quantization": {"recipe": {"kind": "none"}},
            "lineage": {"source_sha256": None},
        }
        manifest.update(manifest_overrides)
        return build_package(
            out_dir,
            manifest,
            {"model.onnx": t / "model.onnx", "samples.npz": t / "samples.npz"},
            load_private_key(key.private_path),
        )
