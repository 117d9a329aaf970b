"""Every recipe the shipped profiles use builds a model ONNX Runtime loads and runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from edgefleet.packager.examples import ExampleModel
from edgefleet.packager.npzio import load_npz
from edgefleet.packager.pipeline import resolve_backend
from edgefleet.packager.profiles import load_profiles
from edgefleet.packager.quantize import build_candidate as build
from edgefleet.packager.quantize import non_power_of_two_scales, pow2_ceil, preprocess
from edgefleet.packager.recipe import Recipe, parse_recipe

RECIPES: dict[str, Recipe] = {}
for _p in load_profiles().values():
    for _c in _p.candidates:
        # A vendor backend whose extra is absent here is built as its ONNX Runtime fallback.
        RECIPES.setdefault(f"{_p.id}/{_c.id}", resolve_backend(_c)[0])


@pytest.fixture(scope="session")
def prepared(
    examples: dict[str, ExampleModel], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict[str, object]]]:
    """Each example pre-processed once (a child process per call)."""
    tmp = tmp_path_factory.mktemp("prepared")
    return {
        name: preprocess(ex.model, tmp / f"{name}.onnx", external=False)
        for name, ex in examples.items()
    }


def _build(
    ex: ExampleModel, recipe: Recipe, tmp: Path, prepared: Path
) -> tuple[Path, onnx.ModelProto]:
    out = build(
        recipe,
        source=ex.model,
        prepared=prepared,
        out=tmp / "out.onnx",
        calibration=load_npz(ex.calibration),
        external=False,
    )
    return out, onnx.load(str(out))


def _check_runs(ex: ExampleModel, model: Path) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    val = load_npz(ex.validation)
    feed = {i.name: val[i.name][:16] for i in sess.get_inputs()}
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed), strict=True))
    probs = outs["probabilities"]
    assert probs.shape == (16, 10) and np.all(np.isfinite(probs))
    return probs


@pytest.mark.parametrize("key", sorted(RECIPES))
def test_recipe_builds_loadable_model(
    key: str,
    examples: dict[str, ExampleModel],
    prepared: dict[str, tuple[Path, dict[str, object]]],
    tmp_path: Path,
) -> None:
    recipe = RECIPES[key]
    ex = examples["digits-cnn"]
    out, model = _build(ex, recipe, tmp_path, prepared["digits-cnn"][0])
    _check_runs(ex, out)
    ops = {n.op_type for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    if recipe.method == "static":
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    if recipe.method == "dynamic":
        assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops
        assert "ConvInteger" not in ops  # dynamic stays off Conv (it is slower than FP32 there)
    if recipe.method == "fp16":
        assert any(t.data_type == TensorProto.FLOAT16 for t in inits.values())
        assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types
    if recipe.method == "qnn":
        zps = [
            numpy_helper.to_array(inits[n.input[2]])
            for n in model.graph.node
            if n.op_type == "QuantizeLinear"
        ]
        assert zps and any(z.dtype == np.uint16 for z in zps)  # 16-bit activations
    if recipe.power_of_two:
        assert non_power_of_two_scales(out) == []
        zps = [
            numpy_helper.to_array(inits[n.input[2]])
            for n in model.graph.node
            if n.op_type == "QuantizeLinear"
        ]
        assert zps and all(int(z.max()) == 0 and z.dtype == np.int8 for z in zps)  # symmetric


def test_skl2onnx_model_quantizes_after_preprocessing_falls_back(
    examples: dict[str, ExampleModel],
    prepared: dict[str, tuple[Path, dict[str, object]]],
    tmp_path: Path,
) -> None:
    ex = examples["digits-mlp"]
    path, info = prepared["digits-mlp"]
    assert info["symbolic_shape_inference"] is False  # skl2onnx's ML ops defeat symbolic inference
    assert info["applied"] is False and "untyped" in str(info["reason"]) and path == ex.model
    assert prepared["digits-cnn"][1]["applied"] is True
    for recipe in (
        parse_recipe({"id": "d", "method": "dynamic"}, "t"),
        parse_recipe({"id": "s", "method": "static", "per_channel": True}, "t"),
    ):
        out, model = _build(ex, recipe, tmp_path / recipe.id, path)
        assert {"MatMulInteger", "QuantizeLinear"} & {n.op_type for n in model.graph.node}
        _check_runs(ex, out)


def test_power_of_two_rounding() -> None:
    assert pow2_ceil(0.3) == 0.5
    assert pow2_ceil(0.25) == 0.25
    assert pow2_ceil(1e-3) == 2**-9
    assert pow2_ceil(0.0) == 1.0


def test_preprocessing_leaves_the_working_directory_clean(
    examples: dict[str, ExampleModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT drops sym_shape_infer_temp.onnx into the cwd when symbolic inference gives up."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    work = tmp_path / "work"
    work.mkdir()
    _, info = preprocess(examples["digits-mlp"].model, work / "prep.onnx", external=False)
    assert info["symbolic_shape_inference"] is False
    assert list(cwd.iterdir()) == []


def _attention(path: Path) -> Path:
    """x [N, 8, 16] -> softmax((x Wq)(x Wk)^T) (x Wv) Wo: two weight MatMuls feed an activation x
    activation MatMul (the scores), whose softmax weights a second one (the values)."""
    from onnx import helper

    rng = np.random.default_rng(0)
    w = {
        k: numpy_helper.from_array(rng.normal(0, 0.3, (16, 16)).astype(np.float32), k)
        for k in "qkvo"
    }
    nodes = [
        helper.make_node("MatMul", ["x", "q"], ["xq"], name="proj_q"),
        helper.make_node("MatMul", ["x", "k"], ["xk"], name="proj_k"),
        helper.make_node("MatMul", ["x", "v"], ["xv"], name="proj_v"),
        helper.make_node("Transpose", ["xk"], ["kt"], name="kt", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["xq", "kt"], ["s"], name="scores"),
        helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "xv"], ["a"], name="weighted"),
        helper.make_node("MatMul", ["a", "o"], ["y"], name="proj_o"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 16])],
        list(w.values()),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, str(path))
    return path


def test_exclude_activation_matmul_keeps_attention_in_fp32(tmp_path: Path) -> None:
    """The weight MatMuls are quantized; the scores, their softmax and the weighted values stay
    FP32 (no Q/DQ pair on them, so ONNX Runtime runs both attention MatMuls in float), and the
    build info names the two (what the manifest records)."""
    src = _attention(tmp_path / "attn.onnx")
    cal = {"x": np.random.default_rng(1).normal(0, 1, (16, 8, 16)).astype(np.float32)}
    recipe = parse_recipe(
        {
            "id": "mm",
            "method": "static",
            "per_channel": True,
            "op_types": ["MatMul"],
            "exclude_activation_matmul": True,
        },
        "test",
    )
    info: dict[str, object] = {}
    out = build(
        recipe, source=src, prepared=src, out=tmp_path / "q.onnx", calibration=cal,
        external=False, info=info,
    )  # fmt: skip
    model = onnx.load(str(out))
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    node = {n.name: n for n in model.graph.node}
    quantized = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    assert info["activation_matmuls_fp32"] == ["scores", "weighted"]
    assert not {"s", "p"} & quantized  # scores and probabilities: no 8-bit rounding
    assert node["softmax"].input[0] == "s" and "p" in node["weighted"].input
    for name in ("proj_q", "proj_k", "proj_v", "proj_o"):
        assert producer[node[name].input[1]] == "DequantizeLinear"  # INT8 weights
    with pytest.raises(ValueError, match="exclude_activation_matmul"):
        parse_recipe({"id": "d", "method": "dynamic", "exclude_activation_matmul": True}, "t")


def test_a_matmul_only_recipe_is_not_refused_for_its_float_convs() -> None:
    """cpu-x86_64 declares no [constraints]: a recipe naming its op types promises those only
    (it was refused: 'only 9 of 51 Conv/MatMul/Gemm ops take a dequantized weight')."""
    from edgefleet.packager.backends.verify import combine, recipe_constraints

    x86 = load_profiles()["cpu-x86_64"]
    mm = next(c for c in x86.candidates if c.id == "static-qdq-u8s8-matmul")
    assert combine(x86.constraints, recipe_constraints(mm)).min_quantized_share == 0.0
    full = next(c for c in x86.candidates if c.id == "static-qdq-u8s8-per-channel-minmax")
    assert combine(x86.constraints, recipe_constraints(full)).min_quantized_share == 0.5
    ov = load_profiles()["npu-openvino"]
    ov_mm = next(c for c in ov.candidates if c.id == "static-qdq-u8s8-matmul")
    assert combine(ov.constraints, recipe_constraints(ov_mm)).min_quantized_share == 0.1
