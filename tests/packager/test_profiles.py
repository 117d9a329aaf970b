"""Hardware profiles load, carry every required section, and invalid ones say what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.hardware_profiles import device_profiles, load_profile_facts
from edgefleet.packager.profiles import ProfileError, get_profile, load_profile_file, load_profiles

REQUIRED = {
    "cpu-x86_64",
    "cpu-arm64",
    "gpu-cuda",
    "gpu-tensorrt",
    "npu-qnn",
    "npu-openvino",
    "fpga-vitisai",
}

GOOD = """
id = "{id}"
cpu_fallback = true
[[execution_providers]]
name = "CPUExecutionProvider"
[[quantization.candidates]]
id = "s"
method = "static"
[accuracy_gate]
min_agreement = 0.9
max_accuracy_drop = 0.05
[device_gates]
max_p95_ms = 10
max_memory_mb = 100
sample_atol = 0.1
sample_rtol = 0
min_sample_agreement = 0.9
"""


def test_every_required_profile_loads_with_its_documented_recipe() -> None:
    profiles = load_profiles()
    assert set(profiles) >= REQUIRED
    methods = {pid: {c.method for c in p.candidates} for pid, p in profiles.items()}
    assert methods["gpu-cuda"] == {"fp16"}
    assert methods["npu-qnn"] == {"qnn"}
    assert methods["gpu-tensorrt"] == {"fp16", "static"}
    qnn = profiles["npu-qnn"].candidates
    assert all(c.activation_type == "QUInt16" for c in qnn)
    vitis = profiles["fpga-vitisai"].candidates
    assert all(
        c.power_of_two and c.activation_symmetric and c.weight_type == "QInt8" for c in vitis
    )
    arm = [c for c in profiles["cpu-arm64"].candidates if c.method != "optimized"]
    assert all(c.activation_type == "QInt8" and c.format == "QDQ" for c in arm)
    x86_dynamic = [c for c in profiles["cpu-x86_64"].candidates if c.method == "dynamic"]
    assert x86_dynamic and all(set(c.op_types or ()) <= {"MatMul", "Gemm"} for c in x86_dynamic)
    assert all(c.keep_io_types for c in profiles["gpu-cuda"].candidates)
    assert profiles["gpu-cuda"].provider_names == ["CUDAExecutionProvider"]
    assert not profiles["gpu-cuda"].cpu_fallback and profiles["cpu-x86_64"].cpu_fallback


def test_x86_reduce_range_only_for_targets_without_vnni() -> None:
    """reduce_range costs accuracy and buys nothing with VNNI: only the !vnni variants use it."""
    from edgefleet.packager.profiles import resolve_target, unmet_requirements

    x86 = load_profiles()["cpu-x86_64"]
    assert x86.target == {"vnni": "auto"}
    assert x86.candidates[0].method == "optimized"  # never slower than the source
    quantized = [c for c in x86.candidates if c.method in ("static", "dynamic")]
    assert all(c.requires == (("!vnni",) if c.reduce_range else ("vnni",)) for c in quantized)
    assert {c.reduce_range for c in quantized} == {True, False}
    vnni = resolve_target({"vnni": "auto"}, ["avx2", "avx512_vnni"])
    plain = resolve_target({"vnni": "auto"}, ["avx2"])
    assert vnni["vnni"][0] and not plain["vnni"][0] and "detected" in plain["vnni"][1]
    declared = resolve_target({"vnni": False}, ["avx512_vnni"])
    assert declared["vnni"] == (False, "declared vnni = false")
    built = {c.id for c in quantized if unmet_requirements(c.requires, vnni) is None}
    assert built and all(not c.reduce_range for c in quantized if c.id in built)
    skipped = unmet_requirements(("!vnni",), vnni)
    assert skipped is not None and "without vnni" in skipped


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.replace('method = "static"', 'method = "int3"'), "'method' must be one of"),
        (lambda s: s.replace("min_agreement = 0.9", "min_agreement = 1.5"), "min_agreement"),
        (lambda s: s.replace("[accuracy_gate]", "[accuracy_gatez]"), "unknown key"),
        (lambda s: s.replace('name = "CPUExecutionProvider"', 'name = "CPU"'), "is not an EP"),
        (lambda s: s.replace("cpu_fallback = true", "cpu_fallback = 1"), "cpu_fallback"),
        (
            lambda s: s.replace('method = "static"', 'method = "static"\npower_of_two = 1'),
            "true or false",
        ),
        (
            lambda s: s.replace('method = "static"', 'method = "fp16"\npower_of_two = true'),
            "power_of_two",
        ),
        (
            lambda s: s.replace(
                'method = "static"', 'method = "static"\npower_of_two = true\nper_channel = true'
            ),
            "per_channel = false",
        ),
        (lambda s: s + '\n[[quantization.candidates]]\nid = "s"\nmethod = "fp32"\n', "unique"),
        (lambda s: s.replace("max_p95_ms = 10\n", ""), "max_p95_ms"),
        (
            lambda s: s.replace('method = "static"', 'method = "static"\nrequires = ["vnni"]'),
            r"not declared in \[target\]",
        ),
        (lambda s: s + '\n[target]\nvnni = "maybe"\n', 'true, false or "auto"'),
        (lambda s: s + '\n[target]\nfoo = "auto"\n', "cannot be detected"),
        (
            lambda s: s.replace('method = "static"', 'method = "fp16"\nequalize = true'),
            "'equalize'/'bias_correction' need",
        ),
    ],
)
def test_invalid_profiles_name_the_field(tmp_path: Path, edit: object, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(edit(GOOD.format(id="bad")))  # type: ignore[operator]
    with pytest.raises(ProfileError, match=message) as info:
        load_profile_file(path)
    assert "bad.toml" in str(info.value)


def test_id_must_match_file_name_and_unknown_ids_list_known(tmp_path: Path) -> None:
    path = tmp_path / "one.toml"
    path.write_text(GOOD.format(id="two"))
    with pytest.raises(ProfileError, match="does not match the file name"):
        load_profile_file(path)
    with pytest.raises(ProfileError, match=r"known: .*cpu-x86_64"):
        get_profile("no-such-profile")
    path.write_text("id = [")
    with pytest.raises(ProfileError, match="not valid TOML"):
        load_profile_file(path)


def test_profiles_cli_list_and_show() -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["profiles", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert {p["id"] for p in json.loads(listed.stdout)} >= REQUIRED
    shown = runner.invoke(app, ["profiles", "show", "npu-qnn", "--json"])
    assert shown.exit_code == 0
    doc = json.loads(shown.stdout)
    assert doc["execution_providers"][0]["name"] == "QNNExecutionProvider"
    assert doc["candidates"][0]["activation_type"] == "QUInt16"
    missing = runner.invoke(app, ["profiles", "show", "nope"])
    assert missing.exit_code == 2
    assert "unknown profile 'nope'" in missing.stderr


def test_the_profile_files_are_the_one_provider_mapping(tmp_path: Path) -> None:
    """The agent's accepted profiles come from the same TOMLs the packager parses."""
    facts = load_profile_facts()
    packaged = load_profiles()
    assert set(facts) == set(packaged)
    for pid, f in facts.items():
        assert list(f.providers) == packaged[pid].provider_names
    assert facts["cpu-x86_64"].arch == "x86_64" and facts["cpu-arm64"].arch == "arm64"
    accelerators = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert device_profiles(accelerators, "AMD64") == ["gpu-tensorrt", "gpu-cuda", "cpu-x86_64"]
    assert device_profiles(["QNNExecutionProvider", "Nope"], "aarch64") == ["npu-qnn", "cpu-arm64"]
    assert device_profiles([], "riscv64") == ["cpu-riscv64"]
    # A profile added as a file is picked up by the agent's mapping with no code change.
    (tmp_path / "npu-x.toml").write_text(
        GOOD.format(id="npu-x").replace("CPUExecutionProvider", "XExecutionProvider")
    )
    (tmp_path / "cpu-riscv.toml").write_text('arch = "riscv64"\n' + GOOD.format(id="cpu-riscv"))
    assert device_profiles(["XExecutionProvider"], "riscv64", tmp_path) == ["npu-x", "cpu-riscv"]
    assert load_profiles(tmp_path)["cpu-riscv"].provider_names == ["CPUExecutionProvider"]
    (tmp_path / "cpu-riscv.toml").write_text("arch = 3\n" + GOOD.format(id="cpu-riscv"))
    with pytest.raises(ProfileError, match="'arch' must be"):
        load_profile_file(tmp_path / "cpu-riscv.toml")
