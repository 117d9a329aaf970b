"""example-models: real trained models, their data files, and byte-for-byte determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.packager.examples import ExampleModel, file_sha256
from edgefleet.packager.npzio import load_npz


def test_examples_are_trained_models_with_data(examples: dict[str, ExampleModel]) -> None:
    assert set(examples) == {"digits-mlp", "digits-cnn"}
    cnn = onnx.load(str(examples["digits-cnn"].model))
    assert sum(n.op_type == "Conv" for n in cnn.graph.node) >= 2
    mlp = onnx.load(str(examples["digits-mlp"].model))
    assert sum(n.op_type in ("MatMul", "Gemm") for n in mlp.graph.node) >= 2
    for ex in examples.values():
        sess = ort.InferenceSession(str(ex.model), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        cal, val = load_npz(ex.calibration), load_npz(ex.validation)
        assert set(cal) == set(names)
        assert set(val) == {*names, "labels"}
        outs = dict(
            zip(
                [o.name for o in sess.get_outputs()],
                sess.run(None, {n: val[n] for n in names}),
                strict=True,
            )
        )
        probs = outs["probabilities"]
        assert probs.dtype == np.float32 and probs.shape == (len(val["labels"]), 10)
        accuracy = float(np.mean(probs.argmax(1) == val["labels"]))
        assert accuracy > 0.9, (ex.name, accuracy)


def test_example_models_cli_is_deterministic(
    tmp_path: Path, examples: dict[str, ExampleModel]
) -> None:
    result = CliRunner().invoke(app, ["example-models", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.stdout)
    for name, ex in examples.items():
        for kind in ("model", "calibration", "validation"):
            again = Path(paths[name][kind])
            assert again.parent == tmp_path / name
            assert file_sha256(again) == file_sha256(getattr(ex, kind)), (name, kind)
