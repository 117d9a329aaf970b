"""Per-channel arithmetic after a convolution is folded into it, exactly, and only when safe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.packager import zoo
from edgefleet.packager.evaluate import run_all, session
from edgefleet.packager.fold import fold_conv_affine
from edgefleet.packager.npzio import load_npz
from edgefleet.packager.quantize import preprocess
from tests.support.services import require

C = 4


def _model(
    steps: list[tuple[str, np.ndarray, bool]], *, bias: bool = True, extra_use: bool = False
) -> onnx.ModelProto:
    """x -> Conv -> steps (op, constant, constant first?) -> y; optionally the conv output is
    also a graph output (then nothing may be folded)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.normal(size=(C, 3, 3, 3)).astype(np.float32), "w")]
    conv_in = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "b"))
        conv_in.append("b")
    nodes = [helper.make_node("Conv", conv_in, ["t0"], name="conv", pads=[1, 1, 1, 1])]
    for i, (op, const, first) in enumerate(steps):
        inits.append(numpy_helper.from_array(const.astype(np.float32), f"c{i}"))
        ins = [f"c{i}", f"t{i}"] if first else [f"t{i}", f"c{i}"]
        nodes.append(helper.make_node(op, ins, [f"t{i + 1}"], name=f"step{i}"))
    nodes.append(helper.make_node("Relu", [f"t{len(steps)}"], ["y"], name="relu"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])]
    if extra_use:
        outputs.append(helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, C, 8, 8]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        outputs,
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["y"], {"x": x})[0])


X = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
PER_CHANNEL = np.array([0.5, -2.0, 3.0, 0.25]).reshape(1, C, 1, 1)


@pytest.mark.parametrize("bias", [True, False])
def test_a_decomposed_batch_norm_folds_into_the_convolution_exactly(bias: bool) -> None:
    steps = [
        ("Sub", np.array([0.1, 0.2, -0.3, 0.4]).reshape(1, C, 1, 1), False),
        ("Mul", PER_CHANNEL, False),
        ("Add", np.array([1.0, -1.0, 0.5, 0.0]).reshape(C, 1, 1), True),
        ("Div", np.array(2.0), False),
    ]
    model = _model(steps, bias=bias)
    want = _run(model, X)
    assert fold_conv_affine(model) == 4
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu"]
    assert {t.name for t in model.graph.initializer} == {"w", "b" if bias else "conv_folded_bias"}
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, X), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("steps", "extra_use", "left"),
    [
        ([("Sub", PER_CHANNEL, True)], False, "c - conv(x) is not an affine step of the conv"),
        ([("Div", PER_CHANNEL, True)], False, "c / conv(x) is not affine"),
        ([("Mul", np.linspace(0.5, 1.5, 8).reshape(1, 1, 8, 1), False)], False, "varies by row"),
        ([("Add", np.arange(C * 64.0).reshape(1, C, 8, 8), False)], False, "per element"),
        ([("Div", np.array([1.0, 0.0, 1.0, 1.0]).reshape(1, C, 1, 1), False)], False, "by 0"),
        ([("Mul", PER_CHANNEL, False)], True, "the conv output is read elsewhere"),
    ],
)
def test_steps_that_are_not_a_per_channel_affine_of_an_unshared_output_stay(
    steps: list[tuple[str, np.ndarray, bool]], extra_use: bool, left: str
) -> None:
    model = _model(steps, extra_use=extra_use)
    want = _run(model, X)
    assert fold_conv_affine(model) == 0, left
    assert len(model.graph.node) == 3
    np.testing.assert_allclose(_run(model, X), want)


def test_open_nsfw_batch_norms_are_folded_by_the_pre_processing(tmp_path: Path) -> None:
    """The ResNet-50 carries its batch norms as Sub/Mul/Add; pre-processing folds them all and
    the model computes the same."""
    reason = zoo.unavailable("open-nsfw")
    require(reason is None, reason or "")
    zs = zoo.prepare("open-nsfw", tmp_path / "zoo", n_calibration=4, n_validation=4)
    prepared, info = preprocess(zs.model, tmp_path / "prep.onnx", external=False)
    assert info["applied"] and info["conv_affine_folded"] >= 150
    ops = [n.op_type for n in onnx.load(str(prepared)).graph.node]
    assert ops.count("Conv") == 53
    data = load_npz(zs.confident)
    names = [i.name for i in session(zs.model).get_inputs()]
    data = {n: data[n] for n in names}
    ref, got = run_all(session(zs.model), data), run_all(session(prepared), data)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=1e-5)
