"""Recipes that win on real models: equal calibration batches, equalization, bias correction,
per-node sensitivity (quantize all but one node) and FP32 nodes kept by the search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgefleet.packager.equalize import (
    bias_correct,
    equalization_pairs,
    equalize,
    input_channel_means,
    quantization_error,
)
from edgefleet.packager.examples import ExampleModel
from edgefleet.packager.npzio import load_npz
from edgefleet.packager.quantize import build_candidate, calibration_batch, preprocess
from edgefleet.packager.recipe import Recipe
from edgefleet.packager.sensitivity import float_except, quantized_nodes, rank


@pytest.fixture(scope="module")
def cnn(
    examples: dict[str, ExampleModel], tmp_path_factory: pytest.TempPathFactory
) -> tuple[ExampleModel, Path]:
    ex = examples["digits-cnn"]
    prepared, info = preprocess(
        ex.model, tmp_path_factory.mktemp("prep") / "m.onnx", external=False
    )
    assert info["applied"]
    return ex, prepared


def _run(model: onnx.ModelProto | Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, feed)[0])


def test_calibration_batches_divide_the_set() -> None:
    assert calibration_batch(66) == 11  # 66 = 8 x 8 + 2 used to crash the histogram calibrators
    assert calibration_batch(64) == 16 and calibration_batch(67) == 1 and calibration_batch(5) == 5


def test_percentile_calibration_survives_a_ragged_set(
    cnn: tuple[ExampleModel, Path], tmp_path: Path
) -> None:
    ex, prepared = cnn
    cal = {k: v[:66] for k, v in load_npz(ex.calibration).items() if k != "labels"}
    recipe = Recipe(
        "p", "static", activation_type="QInt8", power_of_two=True, activation_symmetric=True,
        calibrate_method="Percentile",
    )  # fmt: skip
    out = build_candidate(
        recipe, source=ex.model, prepared=prepared, out=tmp_path / "q.onnx", calibration=cal,
        external=False,
    )  # fmt: skip
    feed = {"image": load_npz(ex.validation)["image"][:8]}
    assert np.all(np.isfinite(_run(out, feed)))


def test_cross_layer_equalization_keeps_the_function_and_equalizes_ranges(
    cnn: tuple[ExampleModel, Path],
) -> None:
    ex, prepared = cnn
    model = onnx.load(str(prepared))
    pairs = equalization_pairs(model.graph)
    assert len(pairs) == 1  # Conv -> Relu -> Conv
    feed = {"image": load_npz(ex.validation)["image"][:32]}
    before = _run(model, feed)
    assert equalize(model) == 1
    after = _run(model, feed)
    assert np.max(np.abs(after - before)) < 1e-4
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    first, second = pairs[0]
    w1, w2 = inits[first.input[1]], inits[second.input[1]]
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1)
    r2 = np.abs(np.moveaxis(w2, 1, 0).reshape(w2.shape[1], -1)).max(axis=1)
    np.testing.assert_allclose(r1, r2, rtol=1e-3)  # each channel's range now matches


def test_bias_correction_removes_the_mean_shift_of_weight_quantization(
    cnn: tuple[ExampleModel, Path],
) -> None:
    ex, prepared = cnn
    cal = {"image": load_npz(ex.calibration)["image"][:64]}
    scheme = {"qtype": "QInt8", "per_channel": False, "symmetric": True, "power_of_two": True}

    def conv_output_means(corrected: bool) -> tuple[np.ndarray, np.ndarray]:
        model = onnx.load(str(prepared))
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        outs = [c.output[0] for c in convs]
        ref = input_channel_means(model, outs, cal)
        if corrected:
            assert bias_correct(model, cal, **scheme) == len(convs)  # type: ignore[arg-type]
        inits = {t.name: t for t in model.graph.initializer}
        for c in convs:  # simulate the quantized weights, keep everything else FP32
            w = numpy_helper.to_array(inits[c.input[1]])
            q = w + quantization_error(w, **scheme)  # type: ignore[arg-type]
            inits[c.input[1]].CopyFrom(numpy_helper.from_array(q.astype(np.float32), c.input[1]))
        got = input_channel_means(model, outs[:1], cal)  # the first conv's input is exact
        return ref[outs[0]], got[outs[0]]

    ref, plain = conv_output_means(False)
    _, fixed = conv_output_means(True)
    assert np.abs(fixed - ref).mean() < 0.2 * np.abs(plain - ref).mean()


def test_quantize_all_but_one_node_and_rank_sensitivity(
    cnn: tuple[ExampleModel, Path], tmp_path: Path
) -> None:
    ex, prepared = cnn
    cal = {"image": load_npz(ex.calibration)["image"][:32]}
    recipe = Recipe(
        "pow2", "static", activation_type="QInt8", power_of_two=True, activation_symmetric=True
    )
    q = build_candidate(
        recipe, source=ex.model, prepared=prepared, out=tmp_path / "q.onnx", calibration=cal,
        external=False,
    )  # fmt: skip
    qmodel, fmodel = onnx.load(str(q)), onnx.load(str(prepared))
    nodes = quantized_nodes(qmodel)
    assert {n.op_type for n in nodes} >= {"Conv", "Gemm"}
    ref = _run(fmodel, cal)
    assert "flatten" not in {n.name for n in nodes}  # moves values: not worth ranking
    every = float_except(qmodel, fmodel, [n.name for n in nodes] + ["flatten"])
    assert np.max(np.abs(_run(every, cal) - ref)) < 1e-5  # every node in FP32: the source again
    assert not any(n.op_type.endswith("QuantizeLinear") for n in every.graph.node)
    # the Softmax kept in FP32 writes the graph output itself (no 8-bit probabilities)
    producers = {o: n.op_type for n in every.graph.node for o in n.output}
    assert producers["probabilities"] == "Softmax"
    assert not any(n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")
                   for n in every.graph.node)  # fmt: skip
    only_softmax = float_except(qmodel, fmodel, ["softmax"])
    # as with nodes_to_exclude: its input from the quantized Gemm stays quantized, its output
    # (read only by the graph output) is no longer quantized
    assert len(only_softmax.graph.node) == len(qmodel.graph.node) - 2
    assert {o: n.op_type for n in only_softmax.graph.node for o in n.output}[
        "probabilities"
    ] == "Softmax"
    base, ranked = rank(q, prepared, cal, {"probabilities": ref})
    assert base > 0 and len(ranked) == len(nodes)
    assert [r.error_removed for r in ranked] == sorted(
        (r.error_removed for r in ranked), reverse=True
    )
    assert ranked[0].error_removed > 0


def test_histogram_calibration_is_bounded_by_memory(cnn: tuple[ExampleModel, Path]) -> None:
    """The histogram calibrators keep every activation of every sample: cap the sample count."""
    from edgefleet.packager.quantize import activation_bytes, histogram_subset

    ex, prepared = cnn
    cal = {"image": load_npz(ex.calibration)["image"][:64]}
    per = activation_bytes(prepared, cal)
    assert per > 64 * 4  # at least the input itself, as float32
    roomy = histogram_subset(prepared, cal, budget=10 * 2**30)
    assert len(roomy["image"]) == 64
    tight = histogram_subset(prepared, cal, budget=int(per * 2 * 10 / 0.3))
    assert 9 <= len(tight["image"]) <= 10
