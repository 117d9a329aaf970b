"""Signed packages built to hurt the device that installs them: a zip-bombed samples.npz, a
model whose external data points outside the package. Real signed packages, a real agent."""

from __future__ import annotations

import io
import json
import resource
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.agent.validation import SamplesRejected, load_samples
from edgefleet.keys import KeyPair, load_private_key, load_public_key
from edgefleet.wire.errors import RejectError
from edgefleet.wire.package import VerifyPolicy, build_package, verify_package
from edgefleet.wire.reasons import ReasonCode
from tests.agent.helpers import OipClient, served_version

MB = 1024 * 1024


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def zip_bomb(path: Path, decompressed: int) -> Path:
    """An npz of one honest, highly compressible array of ``decompressed`` bytes."""
    n = decompressed // 4
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("input:X.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((n // 4, 4)))
            block = b"\0" * (4 * MB)
            left = (n // 4) * 16
            while left:
                f.write(block[: min(len(block), left)])
                left -= min(len(block), left)
        zf.writestr("output:label.npy", _npy_header((0,), "<i8"))
    return path


def lying_header(path: Path) -> Path:
    """A 100-byte member whose npy header claims 4 GB."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("input:X.npy", _npy_header((1 << 30, 1)) + b"\0" * 100)
    return path


def test_npz_sizes_are_checked_before_decompression(tmp_path: Path) -> None:
    bomb = zip_bomb(tmp_path / "bomb.npz", 300 * MB)
    assert bomb.stat().st_size < 2 * MB
    before = peak_mb()
    with pytest.raises(SamplesRejected, match=r"declares .* bytes decompressed"):
        load_samples(bomb)
    with pytest.raises(SamplesRejected, match="declares"):
        load_samples(lying_header(tmp_path / "lie.npz"))
    assert peak_mb() - before < 20
    with zipfile.ZipFile(tmp_path / "pickle.npz", "w") as zf:
        zf.writestr("input:X.npy", _npy_header((1,), "|O") + b"\0" * 8)
    with pytest.raises(SamplesRejected, match="objects"):
        load_samples(tmp_path / "pickle.npz")


def test_npz_member_larger_than_its_entry_declares(tmp_path: Path) -> None:
    """A central directory that understates a member: reading stops at the declared size."""
    good = tmp_path / "good.npz"
    np.savez(good, **{"input:X": np.zeros((1000, 4), np.float32)})
    raw = bytearray(good.read_bytes())
    # shrink the declared uncompressed size in both the local and central headers
    data = bytes(raw)
    real = 16_000 + len(_npy_header((1000, 4)))
    patched = data.replace(real.to_bytes(4, "little"), (100).to_bytes(4, "little"))
    (tmp_path / "under.npz").write_bytes(patched)
    with pytest.raises(SamplesRejected):
        load_samples(tmp_path / "under.npz")


def _repackage(src: Path, out: Path, key: KeyPair, files: dict[str, Path], **manifest: Any) -> Path:
    with tarfile.open(src) as tar:
        m = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        model = tar.extractfile("model.onnx").read()  # type: ignore[union-attr]
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(model)
    m.update(manifest)
    m.pop("created", None)
    return build_package(
        out / "pkg",
        m,
        {"model.onnx": out / "model.onnx", **files},
        load_private_key(key.private_path),
    )


def test_agent_refuses_a_signed_package_with_a_zip_bombed_samples_file(
    tmp_path: Path,
    pkgs: dict[str, Path],
    keys: dict[str, KeyPair],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    bomb = zip_bomb(tmp_path / "samples.npz", 300 * MB)
    pkg = _repackage(
        pkgs["v1"], tmp_path / "b", keys["trusted"], {"samples.npz": bomb}, version="1.2.0"
    )
    assert pkg.stat().st_size < 2 * MB
    agent = agent_factory(v1_copy)
    before = peak_mb()
    view = agent.wait_update(agent.submit_update(UpdateRequest("iris", "", str(pkg))), 60)
    assert view["state"] == "FAILED" and view["reason_code"] == "validation_error", view
    assert "decompressed" in view["reason"], view
    assert peak_mb() - before < 100
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.0.0"


# --------------------------------------------------------------------------- external data


def _external_model(path: Path, location: str, *, in_subgraph: bool = False) -> Path:
    """Y = X + W, where W's 13 bytes are external data at ``location`` (optionally inside an If's
    branch, where a scan of the top-level initializers alone would not look)."""
    from onnx import TensorProto, helper

    w = TensorProto()
    w.name, w.data_type = "W", TensorProto.UINT8
    w.dims.append(13)
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "13")):
        e = w.external_data.add()
        e.key, e.value = k, v
    out = helper.make_tensor_value_info("Y", TensorProto.UINT8, [13])
    x = helper.make_tensor_value_info("X", TensorProto.UINT8, [13])
    if in_subgraph:
        branch = helper.make_graph(
            [helper.make_node("Add", ["X", "W"], ["Y"])], "b", [], [out], [w]
        )
        cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
        nodes = [
            helper.make_node("Constant", [], ["cond"], value=cond),
            helper.make_node("If", ["cond"], ["Y"], then_branch=branch, else_branch=branch),
        ]
        graph = helper.make_graph(nodes, "g", [x], [out])
    else:
        graph = helper.make_graph(
            [helper.make_node("Add", ["X", "W"], ["Y"])], "g", [x], [out], [w]
        )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def _external_package(
    tmp: Path, key: KeyPair, location: str, *, in_subgraph: bool = False, version: str = "1.2.0"
) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    model = _external_model(tmp / "model.onnx", location, in_subgraph=in_subgraph)
    (tmp / "weights.bin").write_bytes(b"public-weight")
    y = np.frombuffer(b"public-weight", np.uint8)
    np.savez(tmp / "samples.npz", **{"input:X": np.zeros(13, np.uint8), "output:Y": y})
    manifest: dict[str, Any] = {
        "format": "edgefleet.package/v1",
        "name": "iris",
        "version": version,
        "profile": "cpu-x86_64",
        "min_agent_version": "0.1.0",
        "model": {"file": "model.onnx", "external_data": ["weights.bin"]},
        "io": {
            "inputs": [{"name": "X", "dtype": "uint8", "shape": [13]}],
            "outputs": [{"name": "Y", "dtype": "uint8", "shape": [13]}],
        },
        "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
        "cpu_fallback": True,
        "gates": {"max_p95_ms": 1000.0, "max_memory_mb": 512.0},
    }
    return build_package(
        tmp / "out",
        manifest,
        {
            "model.onnx": model,
            "weights.bin": tmp / "weights.bin",
            "samples.npz": tmp / "samples.npz",
        },
        load_private_key(key.private_path),
    )


ESCAPES = [
    "../../../admin.token",
    "/etc/passwd",
    "agent.toml",
    "sub/../weights.bin",
    "model.onnx",
    "",
]


@pytest.mark.parametrize("location", ESCAPES)
@pytest.mark.parametrize("in_subgraph", [False, True])
def test_verifier_refuses_external_data_outside_the_package(
    tmp_path: Path, keys: dict[str, KeyPair], location: str, in_subgraph: bool
) -> None:
    pkg = _external_package(tmp_path, keys["trusted"], location, in_subgraph=in_subgraph)
    policy = VerifyPolicy([load_public_key(keys["trusted"].public_path)])
    with pytest.raises(RejectError) as e:
        verify_package(pkg, policy)
    assert e.value.code == ReasonCode.UNSAFE_PATH and "external data" in e.value.message
    with pytest.raises(RejectError):
        verify_package(pkg, policy, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_verifier_accepts_external_data_that_is_a_package_file(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    import onnxruntime as ort

    pkg = _external_package(tmp_path, keys["trusted"], "weights.bin", in_subgraph=True)
    policy = VerifyPolicy([load_public_key(keys["trusted"].public_path)])
    got = verify_package(pkg, policy, tmp_path / "x")
    assert got.extracted_to is not None
    sess = ort.InferenceSession(str(got.extracted_to / "model.onnx"))
    assert bytes(sess.run(None, {"X": np.zeros(13, np.uint8)})[0]) == b"public-weight"


def test_agent_never_serves_a_file_outside_its_package(
    tmp_path: Path,
    keys: dict[str, KeyPair],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    agent = agent_factory(v1_copy)
    token = (v1_copy / "admin.token").read_text().strip()
    for i, loc in enumerate(["../../../admin.token", str(v1_copy / "admin.token")]):
        pkg = _external_package(tmp_path / str(i), keys["trusted"], loc)
        view = agent.wait_update(agent.submit_update(UpdateRequest("iris", "", str(pkg))), 60)
        assert view["state"] == "FAILED" and view["reason_code"] == "unsafe_path", view
    assert token and served_version(agent.http_port or 0, "iris", x_iris) == "1.0.0"


def test_malformed_model_protobuf_is_refused() -> None:
    from edgefleet.wire.trust import external_data_locations

    for junk in (b"\x3a\xff\xff\xff\xff\x0f", b"\x0b", b"\x3a\x05ab"):
        with pytest.raises(RejectError) as e:
            external_data_locations(junk)
        assert e.value.code == ReasonCode.NOT_A_PACKAGE

    def ld(field: int, payload: bytes) -> bytes:
        n, size = len(payload), b""
        while True:
            size += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return bytes([field << 3 | 2]) + size + payload

    graph = b""
    for _ in range(40):  # graph -> node -> attribute -> graph ... : 120 messages deep
        graph = ld(1, ld(5, ld(6, graph)))
    with pytest.raises(RejectError, match="deeper"):
        external_data_locations(ld(7, graph))
    assert external_data_locations(b"") == []


def test_installed_version_is_checked_again_before_loading(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    """A version on disk (installed by an older verifier) whose model points outside, or whose
    external data file became a link: refused before a runtime opens it."""
    from edgefleet.wire.package import check_installed_external_data

    good = _external_package(tmp_path / "g", keys["trusted"], "weights.bin")
    policy = VerifyPolicy([load_public_key(keys["trusted"].public_path)])
    vdir = verify_package(good, policy, tmp_path / "v").extracted_to
    assert vdir is not None
    manifest = json.loads((vdir / "manifest.json").read_text())
    check_installed_external_data(vdir, manifest)
    (vdir / "weights.bin").unlink()
    (vdir / "weights.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(RejectError) as e:
        check_installed_external_data(vdir, manifest)
    assert e.value.code == ReasonCode.LINK_MEMBER
    _external_model(vdir / "model.onnx", "../../admin.token")
    with pytest.raises(RejectError) as e:
        check_installed_external_data(vdir, manifest)
    assert e.value.code == ReasonCode.UNSAFE_PATH


def test_agent_refuses_crafted_json_with_its_reason(
    tmp_path: Path,
    pkgs: dict[str, Path],
    keys: dict[str, KeyPair],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    """A key hint given as a list, a manifest nested 100,000 deep: the agent names the reason
    (it answered internal_error)."""
    from tests.wire.tamper import resign, rewrite

    def hint_list(members: list[Any]) -> list[Any]:
        out = []
        for ti, d in members:
            if ti.name == "model.sig":
                b = json.loads(d)
                b["verificationMaterial"]["publicKey"]["hint"] = ["a"]
                d = json.dumps(b).encode()
            out.append((ti, d))
        return out

    def deep(members: list[Any]) -> list[Any]:
        out = []
        for ti, d in members:
            if ti.name == "manifest.json":
                d = d.rstrip()[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            out.append((ti, d))
        return resign(out, keys["trusted"])

    agent = agent_factory(v1_copy)
    for edit, code in ((hint_list, "signature_invalid"), (deep, "manifest_invalid")):
        pkg = rewrite(pkgs["v2"], tmp_path / f"{code}.efpkg", edit)
        view = agent.wait_update(agent.submit_update(UpdateRequest("iris", "", str(pkg))), 60)
        assert view["state"] == "FAILED" and view["reason_code"] == code, view
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.0.0"


def test_agent_does_not_load_an_installed_model_whose_data_escapes(
    tmp_path: Path,
    v1_copy: Path,
    agent_factory: Callable[..., Agent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """iris 1.0.0 as an older verifier would have installed it (its digests recorded as they
    are) with a model whose external data is the admin token: the agent does not load it."""
    import hashlib

    vdir = v1_copy / "models" / "iris" / "1.0.0"
    _external_model(vdir / "model.onnx", "../../../admin.token")
    rec_path = vdir / ".install.json"
    rec = json.loads(rec_path.read_text())
    rec["member_digests"]["model.onnx"] = hashlib.sha256(
        (vdir / "model.onnx").read_bytes()
    ).hexdigest()
    rec_path.write_text(json.dumps(rec))
    agent = agent_factory(v1_copy)
    assert agent.sessions.get("iris") is None
    c = OipClient(agent.http_port or 0)
    status, body, _ = c.request("POST", "/v2/models/iris/infer", b"{}")
    c.close()
    assert status == 404 and b"SECRET" not in body
    # refused by the agent's own check, before any runtime (whatever its version) opened it
    assert "unsafe_path" in caplog.text and "outside the package" in caplog.text
