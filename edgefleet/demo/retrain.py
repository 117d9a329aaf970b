"""The retraining steps' reusable core: label (the demo's oracle), retrain the example model,
export it to ONNX, and measure accuracy. ``examples/retrain/retrain.py`` (the pipeline step a
CI job runs) and ``edgefleet demo --loop`` call these same functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

INPUT = "features"  # digits-mlp's input name: the npz arrays are keyed by it


def digits_oracle(x: np.ndarray) -> np.ndarray:
    """The demo's labeller: the true digit of each row, by nearest scikit-learn digits image
    (exact for the demo's captured rows, which are those images, possibly shifted by a
    constant brightness; a real fleet has no such oracle)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    ref = (d.data / 16.0).astype(np.float32)
    xc = x - x.mean(axis=1, keepdims=True)
    rc = ref - ref.mean(axis=1, keepdims=True)
    return np.asarray(d.target[np.argmax(xc @ rc.T, axis=1)], dtype=np.int64)


def retrain(
    x_new: np.ndarray,
    y_new: np.ndarray,
    *,
    hidden: tuple[int, ...] = (256, 128),
    max_iter: int = 200,
    seed: int = 0,
) -> Any:
    """digits-mlp's recipe (``hidden``, ``max_iter``) on its training split plus the captured
    rows (weighted x3, so a few hundred field rows count against ~1,300 originals)."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from edgefleet.packager.examples import digits_split

    split = digits_split()
    x = np.concatenate([split.x_train, *[x_new.reshape(-1, 64).astype(np.float32)] * 3])
    y = np.concatenate([split.y_train, *[y_new.astype(np.int64)] * 3])
    mlp = MLPClassifier(hidden_layer_sizes=hidden, max_iter=max_iter, random_state=seed)
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    pipe.fit(x, y)
    return pipe


def export_onnx(pipe: Any, path: Path) -> Path:
    """``pipe`` as ONNX at ``path`` (input ``features``, class probabilities as a tensor)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    mlp = pipe.named_steps["mlp"]
    onx = convert_sklearn(
        pipe,
        initial_types=[(INPUT, FloatTensorType([None, 64]))],
        options={id(mlp): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.name = "digits_mlp"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    return path


def accuracy(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Share of rows of ``x`` the ONNX ``model`` classifies as ``y``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})
    pred = np.asarray(out[0])
    if pred.ndim == 2:
        pred = pred.argmax(axis=1)
    return float((pred.astype(np.int64) == y).mean())
