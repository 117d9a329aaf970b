"""Every candidate's output - ORT's included - meets its target's constraints before it is signed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from edgefleet.keys import KeyPair
from edgefleet.packager.backends.verify import Constraints, combine, recipe_constraints
from edgefleet.packager.cli import _render
from edgefleet.packager.examples import ExampleModel
from edgefleet.packager.profiles import ProfileError, load_profile_file, load_profiles
from edgefleet.packager.recipe import Recipe
from edgefleet.wire.package import read_manifest

POW2_TARGET = """
id = "dpu-like"
cpu_fallback = false
[[execution_providers]]
name = "VitisAIExecutionProvider"
[[quantization.candidates]]
id = "per-channel"
method = "static"
per_channel = true
[[quantization.candidates]]
id = "fp32"
method = "fp32"
[[quantization.candidates]]
id = "pow2"
method = "static"
activation_type = "QInt8"
activation_symmetric = true
power_of_two = true
[constraints]
qdq_only = true
power_of_two = true
per_tensor = true
symmetric = true
activation_bits = 8
weight_bits = 8
[accuracy_gate]
min_agreement = 0.5
max_accuracy_drop = 0.5
[device_gates]
max_p95_ms = 10
max_memory_mb = 100
sample_atol = 0.1
sample_rtol = 0
min_sample_agreement = 0.5
"""


def test_an_ort_candidate_that_breaks_the_target_is_refused_with_its_rule(
    examples: dict[str, ExampleModel], signing_key: KeyPair, tmp_path: Path
) -> None:
    """Per-channel scales from ORT and an unquantized FP32 model cannot run on a power-of-two
    per-tensor target: both are refused, naming the rule; the power-of-two one is signed."""
    from edgefleet.packager.pipeline import package_model

    path = tmp_path / "dpu-like.toml"
    path.write_text(POW2_TARGET)
    ex = examples["digits-cnn"]
    report = package_model(
        ex.model, name="cnn", version="1.0.0", profiles=[load_profile_file(path)],
        calibration=ex.calibration, validation=ex.validation, key=signing_key.private_path,
        out_dir=tmp_path / "out", bench_runs=5, bench_seconds=0.1,
    )  # fmt: skip
    (result,) = report.profiles
    by_id = {c.candidate: c for c in result.candidates}
    per_channel, fp32, pow2 = by_id["per-channel"], by_id["fp32"], by_id["pow2"]
    assert not per_channel.accepted and per_channel.violations
    assert per_channel.reason.startswith("refused: violates the target's constraints")
    assert per_channel.verification is not None
    rules = {v["rule"] for v in per_channel.verification["violations"]}
    assert {"power_of_two", "per_tensor"} <= rules
    assert not fp32.accepted and "quantized" in fp32.reason
    assert pow2.accepted and pow2.chosen and pow2.verification is not None
    assert pow2.verification["passed"] and pow2.verification["constraints"]["power_of_two"]
    assert result.ok and result.package is not None
    search = {c["candidate"]: c for c in read_manifest(result.package)["quantization"]["search"]}
    assert search["per-channel"]["verification"]["passed"] is False
    assert search["pow2"]["verification"]["passed"] is True


def test_no_candidate_meeting_the_constraints_names_them_in_the_failure(
    examples: dict[str, ExampleModel], signing_key: KeyPair, tmp_path: Path
) -> None:
    from edgefleet.packager.pipeline import package_model

    path = tmp_path / "dpu-like.toml"
    text = POW2_TARGET.split('[[quantization.candidates]]\nid = "pow2"')[0]
    path.write_text(text + POW2_TARGET.split("power_of_two = true\n", 1)[1])
    ex = examples["digits-cnn"]
    report = package_model(
        ex.model, name="cnn", version="1.0.0", profiles=[load_profile_file(path)],
        calibration=ex.calibration, validation=ex.validation, key=signing_key.private_path,
        out_dir=tmp_path / "out", bench_runs=5, bench_seconds=0.1,
    )  # fmt: skip
    (result,) = report.profiles
    assert not result.ok and result.package is None and result.failure is not None
    assert set(result.failure["refused"]) == {"per-channel", "fp32"}
    assert "power_of_two" in result.failure["refused"]["per-channel"]


def test_target_and_recipe_constraints_combine() -> None:
    target = Constraints(activation_bits=16, weight_bits=8)
    static = Recipe("s", "static", activation_type="QUInt8", per_channel=False)
    both = combine(target, recipe_constraints(static))
    assert both.activation_bits == 16 and both.per_tensor and both.qdq_only  # the target decides
    fp32 = recipe_constraints(Recipe("f", "fp32"))
    assert fp32.min_quantized_share == 0.0 and not fp32.qdq_only
    assert combine(None, fp32) == fp32
    assert combine(target, fp32).min_quantized_share == 0.5  # a target that needs INT8


def test_shipped_accelerator_profiles_declare_their_constraints() -> None:
    profiles = load_profiles()
    fpga = profiles["fpga-vitisai"].constraints
    assert fpga is not None and fpga.power_of_two and fpga.per_tensor and fpga.symmetric
    qnn = profiles["npu-qnn"].constraints
    assert qnn is not None and qnn.activation_bits == 16
    assert profiles["cpu-x86_64"].constraints is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("colour = true", "unknown key(s) ['colour']"),
        ("activation_bits = 12", "'activation_bits' must be 4, 8 or 16"),
        ("power_of_two = 1", "'power_of_two' must be true or false"),
        ("min_quantized_share = 2", "outside"),
    ],
)
def test_bad_constraints_tables_name_the_field(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "dpu-like.toml"
    path.write_text(POW2_TARGET.split("[constraints]")[0] + f"[constraints]\n{table}\n[accuracy_gate]" + POW2_TARGET.split("[accuracy_gate]")[1])  # fmt: skip
    with pytest.raises(ProfileError, match="constraints") as err:
        load_profile_file(path)
    assert message in str(err.value)


LATE = """
[[quantization.candidates]]
id = "pow2-costly"
method = "static"
activation_type = "QInt8"
activation_symmetric = true
power_of_two = true
calibrate_method = "Percentile"
only_if_needed = true
"""


def test_a_costly_candidate_is_built_only_when_no_earlier_one_met_its_gates(
    examples: dict[str, ExampleModel], signing_key: KeyPair, tmp_path: Path
) -> None:
    """``only_if_needed``: skipped (saying which candidate made it unneeded) once one passed;
    built when every earlier one failed."""
    from edgefleet.packager.pipeline import package_model

    head, tail = POW2_TARGET.split("[constraints]")
    without_pow2 = head.split('[[quantization.candidates]]\nid = "pow2"')[0]
    ex = examples["digits-cnn"]
    reports, full = {}, {}
    for name, candidates in (("after-pow2", head), ("alone", without_pow2)):
        path = tmp_path / name / "dpu-like.toml"
        path.parent.mkdir()
        path.write_text(candidates + LATE + "[constraints]" + tail)
        full[name] = package_model(
            ex.model, name="cnn", version="1.0.0", profiles=[load_profile_file(path)],
            calibration=ex.calibration, validation=ex.validation, key=signing_key.private_path,
            out_dir=tmp_path / name / "out", bench_runs=5, bench_seconds=0.1,
        )  # fmt: skip
        reports[name] = full[name].profiles[0]
    late = {c.candidate: c for c in reports["after-pow2"].candidates}["pow2-costly"]
    assert late.skipped == "not needed: pow2 already met its gates" and late.metrics is None
    # Nothing built it: no backend, no provider (the report said "ort" for a recipe never run).
    assert late.backend is None and late.measured_on is None and late.on_target_provider is None
    package = reports["after-pow2"].package
    assert package is not None
    (listed,) = [
        c
        for c in read_manifest(package)["quantization"]["search"]
        if c["candidate"] == late.candidate
    ]
    assert listed["backend"] is None and listed["skipped"] == late.skipped
    assert listed["reason"] == f"skipped: {late.skipped}" and listed["fidelity"] is None
    assert full["after-pow2"].to_dict()["profiles"][0]["candidates"][-1]["backend"] is None
    console = Console(file=io.StringIO(), width=200)
    _render(full["after-pow2"], console)  # the human report names it, and why
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert f"{late.candidate} not built: not needed: pow2 already met its gates" in text
    assert reports["after-pow2"].chosen == "pow2"
    alone = {c.candidate: c for c in reports["alone"].candidates}["pow2-costly"]
    assert alone.skipped is None and alone.accepted and reports["alone"].chosen == "pow2-costly"


def test_nodes_inside_subgraphs_are_checked_like_the_others() -> None:
    """A Q/DQ pair with a scale of 0.3 inside an If branch (where exporters put e.g. an LSTM
    of Silero VAD) breaks a power-of-two target as much as one outside: the check walked the
    top-level graph only, and passed it."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.packager.backends.verify import verify

    def qdq(scale: float, x: str, y: str, tag: str) -> tuple[list[object], list[object]]:
        inits = [
            numpy_helper.from_array(np.array(scale, np.float32), f"s_{tag}"),
            numpy_helper.from_array(np.array(0, np.int8), f"z_{tag}"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", [x, f"s_{tag}", f"z_{tag}"], [f"q_{tag}"], f"Q_{tag}"),
            helper.make_node("DequantizeLinear", [f"q_{tag}", f"s_{tag}", f"z_{tag}"], [y], f"DQ_{tag}"),
        ]  # fmt: skip
        return nodes, inits

    def branch(scale: float, tag: str) -> object:
        nodes, inits = qdq(scale, "x", f"out_{tag}", tag)
        out = helper.make_tensor_value_info(f"out_{tag}", TensorProto.FLOAT, [1])
        return helper.make_graph(nodes, tag, [], [out], inits)

    top_nodes, top_inits = qdq(0.25, "x", "y", "top")
    cond = helper.make_node(
        "If", ["c"], ["z"], "if", then_branch=branch(0.3, "then"), else_branch=branch(0.5, "else")
    )
    g = helper.make_graph(
        [*top_nodes, cond], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])],
        top_inits,
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    bad = verify(model, Constraints(power_of_two=True, symmetric=True))
    assert [(v.rule, v.node) for v in bad] == [
        ("power_of_two", "Q_then"),
        ("power_of_two", "DQ_then"),
    ]
