"""The project's own example models, built offline from scikit-learn's bundled digits data set.

- ``digits-mlp``: StandardScaler + MLPClassifier (256, 128) on the 64 pixel columns as a table,
  converted with skl2onnx (``zipmap=False``: outputs ``label`` and ``probabilities`` tensors).
- ``digits-cnn``: a two-Conv network trained in numpy on the 8x8 images (see ``convnet``).

Each gets ``calibration.npz`` and ``validation.npz`` (one array per model input, samples on axis 0;
``labels`` in the validation file). Seeds are fixed, so two builds give identical bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from edgefleet.packager.npzio import save_npz

SEED = 0
N_VALIDATION = 450
N_CALIBRATION = 256


@dataclass(frozen=True)
class ExampleModel:
    """Paths of one example model and its data."""

    name: str
    model: Path
    calibration: Path
    validation: Path
    description: str

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "model": str(self.model),
            "calibration": str(self.calibration),
            "validation": str(self.validation),
            "description": self.description,
        }


@dataclass(frozen=True)
class DigitsSplit:
    x_train: NDArray[np.float32]  # [N, 64], pixel values scaled to [0, 1]
    y_train: NDArray[np.int64]
    x_val: NDArray[np.float32]
    y_val: NDArray[np.int64]


def digits_split(seed: int = SEED) -> DigitsSplit:
    """Deterministic train/validation split of scikit-learn's digits (1797 images)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    val, train = order[:N_VALIDATION], order[N_VALIDATION:]
    return DigitsSplit(x[train], y[train], x[val], y[val])


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_mlp(out_dir: Path, split: DigitsSplit) -> ExampleModel:
    """Tabular classifier: skl2onnx Scaler + two MatMul/Add layers + Softmax."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    mlp = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=200, random_state=SEED)
    pipe = Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    pipe.fit(split.x_train, split.y_train)
    onx = convert_sklearn(
        pipe,
        initial_types=[("features", FloatTensorType([None, 64]))],
        options={id(mlp): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.name = "digits_mlp"  # skl2onnx names the graph with a random uuid
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / "model.onnx"
    _write_bytes(model, onx.SerializeToString())
    cal = save_npz(out_dir / "calibration.npz", {"features": split.x_train[:N_CALIBRATION]})
    val = save_npz(out_dir / "validation.npz", {"features": split.x_val, "labels": split.y_val})
    return ExampleModel(
        "digits-mlp", model, cal, val, "MLP (256,128) on digits pixels as a 64-column table"
    )


def build_cnn(out_dir: Path, split: DigitsSplit) -> ExampleModel:
    """Small conv net (2 Conv + Gemm) trained in numpy on the 8x8 digit images."""
    from edgefleet.packager.convnet import to_onnx, train

    x_train = split.x_train.reshape(-1, 1, 8, 8)
    x_val = split.x_val.reshape(-1, 1, 8, 8)
    net = train(x_train, split.y_train, seed=SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / "model.onnx"
    _write_bytes(model, to_onnx(net))
    cal = save_npz(out_dir / "calibration.npz", {"image": x_train[:N_CALIBRATION]})
    val = save_npz(out_dir / "validation.npz", {"image": x_val, "labels": split.y_val})
    return ExampleModel(
        "digits-cnn", model, cal, val, "2-Conv network trained in numpy on 8x8 digit images"
    )


def build_examples(out_dir: Path) -> dict[str, ExampleModel]:
    """Build every example model under ``out_dir/<name>/``; returns them by name."""
    out_dir = Path(out_dir)
    split = digits_split()
    mlp = build_mlp(out_dir / "digits-mlp", split)
    cnn = build_cnn(out_dir / "digits-cnn", split)
    return {mlp.name: mlp, cnn.name: cnn}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
