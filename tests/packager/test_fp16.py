"""FP16 keeps in FP32 what FP16 cannot hold, and says which nodes and why.

The model reproduces PP-OCRv4's DB head in small: a convolution whose output reaches about 2e4,
then a batch norm whose running variance (1e8) and mean are ``Constant`` nodes with ``value_info``
entries (as paddle2onnx writes them), then a sigmoid that makes the text map. Converted naively,
onnxconverter-common clamps the variance to 1e4: the map saturates.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.keys import KeyPair
from edgefleet.packager.evaluate import Judging, compare, run_all, session
from edgefleet.packager.fp16 import LIMIT, normalise, out_of_range_nodes
from edgefleet.packager.npzio import save_npz
from edgefleet.packager.profiles import load_profile_file
from edgefleet.packager.quantize import build_candidate
from edgefleet.packager.recipe import Recipe
from edgefleet.wire.package import read_manifest

C = 4


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(value.astype(np.float32), name)
    )


def db_head(path: Path) -> Path:
    """Conv (output up to ~2e4) -> BatchNormalization (variance 1e8 as Constants) -> Sigmoid."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 2500.0, (C, 2, 3, 3)).astype(np.float32)
    params = {
        "bn_scale": rng.uniform(0.5, 1.5, C),
        "bn_bias": rng.uniform(-0.5, 0.5, C),
        "bn_mean": rng.uniform(-500, 500, C),
        "bn_var": np.full(C, 1e8),
    }
    nodes = [
        *(_constant(k, v) for k, v in params.items()),
        helper.make_node("Conv", ["x", "w"], ["feat"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["feat", *params], ["normed"], name="bn", epsilon=1e-5
        ),
        helper.make_node("Conv", ["normed", "w2"], ["logits"], name="head"),
        helper.make_node("Sigmoid", ["logits"], ["maps"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes,
        "db-head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 8, 8])],
        [helper.make_tensor_value_info("maps", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(
            rng.normal(0, 1.0, (1, C, 1, 1)).astype(np.float32), "w2"
        )],
        value_info=[helper.make_tensor_value_info(k, TensorProto.FLOAT, [C]) for k in params],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 2, 8, 8)).astype(np.float32)


def test_fp16_keeps_out_of_range_nodes_in_fp32_and_says_why(tmp_path: Path) -> None:
    model = db_head(tmp_path / "head.onnx")
    cal = {"x": _inputs(32, 1)}
    ref_feat = np.abs(run_all(session(model), cal)["maps"])  # the source runs
    assert ref_feat.size
    info: dict[str, object] = {}
    out = build_candidate(
        Recipe("fp16", "fp16", op_block_list=("Softmax",)),
        source=model,
        prepared=model,
        out=tmp_path / "fp16.onnx",
        calibration=cal,
        external=False,
        info=info,
    )
    val = {"x": _inputs(64, 2)}
    ref, got = run_all(session(model), val), run_all(session(out), val)
    m = compare(ref, got, judging=Judging("map", threshold=0.3))
    # Without the range check the variance is clamped to 1e4: every pixel saturates to 1.
    assert m.max_abs_error < 0.02 and m.agreement == 1.0, m
    kept = {k["node"]: k for k in info["fp32_nodes"]}  # type: ignore[attr-defined]
    assert set(kept) == {"conv", "bn"}
    assert "bn_var" in kept["bn"]["why"] and "1e+08" in kept["bn"]["why"]
    assert kept["conv"]["tensor"] == "feat" and kept["conv"]["max_abs"] > LIMIT
    converted = onnx.load(str(out))
    inits = {t.name: t.data_type for t in converted.graph.initializer}
    assert inits["bn_var"] == TensorProto.FLOAT and inits["w"] == TensorProto.FLOAT
    assert inits["w2"] == TensorProto.FLOAT16  # the rest is FP16
    # Without calibration data only the constant is known: the batch norm alone stays FP32.
    info2: dict[str, object] = {}
    build_candidate(
        Recipe("fp16", "fp16"), source=model, prepared=model, out=tmp_path / "c.onnx",
        calibration={}, external=False, info=info2,
    )  # fmt: skip
    assert [k["node"] for k in info2["fp32_nodes"]] == ["bn"]  # type: ignore[attr-defined]


def test_out_of_range_tensors_keep_their_producer_and_every_reader() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "k"], ["big"], name="mul"),
            helper.make_node("Relu", ["big"], ["a"], name="relu"),
            helper.make_node("Div", ["big", "k"], ["b"], name="div"),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph)
    kept = out_of_range_nodes(model, {"k": 3.0}, {"big": 5e4, "a": 5e4, "b": 1.0, "y": 5e4})
    assert [k.node for k in kept] == ["mul", "relu", "div", "add"]
    assert all("headroom" in k.why for k in kept)
    assert out_of_range_nodes(model, {"k": 3.0}, {"big": 9e3}) == []


def test_normalising_constants_keeps_the_function(tmp_path: Path) -> None:
    path = db_head(tmp_path / "head.onnx")
    proto = onnx.load(str(path))
    done = normalise(proto)
    assert done == {"constants_to_initializers": 4, "initializer_value_info_dropped": 4}
    assert not any(n.op_type == "Constant" for n in proto.graph.node)
    onnx.save(proto, str(tmp_path / "norm.onnx"))
    x = {"x": _inputs(8, 3)}
    a = run_all(session(path), x)["maps"]
    b = run_all(session(tmp_path / "norm.onnx"), x)["maps"]
    np.testing.assert_array_equal(a, b)


def test_gpu_cuda_packages_the_head_and_the_manifest_names_the_fp32_nodes(
    signing_key: KeyPair, tmp_path: Path
) -> None:
    from edgefleet.packager.pipeline import package_model

    model = db_head(tmp_path / "head.onnx")
    save_npz(tmp_path / "cal.npz", {"x": _inputs(32, 1)})
    save_npz(tmp_path / "val.npz", {"x": _inputs(200, 2), "output_kind": np.array("map")})
    profile = load_profile_file(Path(__file__).parents[2] / "hardware_profiles" / "gpu-cuda.toml")
    report = package_model(
        model, name="head", version="1.0.0", profiles=[profile],
        calibration=tmp_path / "cal.npz", validation=tmp_path / "val.npz",
        key=signing_key.private_path, out_dir=tmp_path / "out", bench_runs=5, bench_seconds=0.1,
    )  # fmt: skip
    (result,) = report.profiles
    assert result.ok and result.package is not None, result.failure
    q = read_manifest(result.package)["quantization"]
    assert q["recipe"]["method"] == "fp16"
    assert {n["node"] for n in q["fp32_nodes"]} == {"conv", "bn"}
    assert all(n["why"] for n in q["fp32_nodes"])
    chosen = next(c for c in q["search"] if c["chosen"])
    assert chosen["fidelity"]["agreement"] == pytest.approx(1.0)
