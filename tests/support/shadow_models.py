"""Real models for shadow tests: the digits MLP, and a variant that answers differently only
where the calibration and validation data never go.

``divergent_mlp`` wraps the example digits MLP: for a row whose mean pixel is above
``threshold`` (saturated images: no digit in scikit-learn's set comes near), its class
probabilities are reversed, so its label differs; everywhere else it is the MLP itself. It
passes every packaging gate on the digits data and disagrees on such live inputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def divergent_mlp(mlp: Path, out: Path, threshold: float = 0.75) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(mlp))
    g = m.graph
    rename = {"label": "label_inner", "probabilities": "probabilities_inner"}
    for node in g.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
        node.input[:] = [rename.get(i, i) for i in node.input]
    feature = g.input[0].name
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array(threshold, dtype=np.float32), "shadow_threshold"),
            numpy_helper.from_array(np.arange(9, -1, -1, dtype=np.int64), "shadow_reversed"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("ReduceMean", [feature], ["shadow_mean"], axes=[1], keepdims=1),
            helper.make_node("Greater", ["shadow_mean", "shadow_threshold"], ["shadow_far"]),
            helper.make_node(
                "Gather", ["probabilities_inner", "shadow_reversed"], ["shadow_rev"], axis=1
            ),
            helper.make_node(
                "Where", ["shadow_far", "shadow_rev", "probabilities_inner"], ["probabilities"]
            ),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ]
    )
    del g.output[:]
    g.output.extend(
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10]),
        ]
    )
    onnx.checker.check_model(m)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(out))
    return out


def saturated_rows(n: int, value: float = 0.95) -> np.ndarray:
    """Inputs the calibration data lacks: every pixel near full."""
    return np.full((n, 64), value, dtype=np.float32)


def digits_lr(out_dir: Path) -> tuple[Path, Path, Path]:
    """(model, calibration, validation): a logistic regression on the digits (pixels scaled
    to [0, 1]), quick to train; its ONNX takes ``features`` [N, 64] like the example MLP."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.linear_model import LogisticRegression

    from edgefleet.packager.examples import digits_split
    from edgefleet.packager.npzio import save_npz

    split = digits_split()
    clf = LogisticRegression(max_iter=300, random_state=0).fit(split.x_train, split.y_train)
    onx = convert_sklearn(
        clf,
        initial_types=[("features", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.graph.name = "digits_lr"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = out_dir / "model.onnx"
    model.write_bytes(onx.SerializeToString())
    cal = save_npz(out_dir / "calibration.npz", {"features": split.x_train[:256]})
    val = save_npz(out_dir / "validation.npz", {"features": split.x_val, "labels": split.y_val})
    return model, cal, val
