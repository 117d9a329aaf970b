"""The harness itself (its guards catch what they must, valid input passes) and the minimal
reproducers of the violations it found, each checked against the same property.

Every reproducer passes: a defect the harness finds is fixed, and its reproducer stays here.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Any

import pytest

from tests.fuzz import targets as T

TARGETS = T.targets()
DEEP = b"[" * 100_000 + b"]" * 100_000
BIG_INT = b"9" * 5000


# --------------------------------------------------------------------------- the harness


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_accepts_its_valid_seeds(name: str) -> None:
    """The structure-aware inputs start from messages the parser accepts: the signed
    wrappers reach the code past the signature."""
    seeds = TARGETS[name].seeds()
    assert seeds
    for data in seeds:
        out = T.check(TARGETS[name], data)
        assert out.accepted, f"{name} refused its valid seed: {out.error!r}"


def _target(fn: Any) -> T.Target:
    return T.Target("probe", fn, (ValueError,), str)


def test_guard_catches_a_foreign_exception() -> None:
    def boom(data: bytes) -> None:
        raise KeyError("x")

    with pytest.raises(T.Violation, match="KeyError"):
        T.check(_target(boom), b"{}")


def test_guard_catches_a_refusal_without_reason() -> None:
    def silent(data: bytes) -> None:
        raise ValueError("")

    with pytest.raises(T.Violation, match="without a reason"):
        T.check(_target(silent), b"{}")


def test_guard_catches_memory_out_of_proportion() -> None:
    def hog(data: bytes) -> None:
        block = bytearray(T.mem_bound(len(data)) + T.MiB)
        del block

    with pytest.raises(T.Violation, match="peak"):
        T.check(_target(hog), b"{}")


def test_guard_stops_a_runaway_allocation_before_it_reaches_the_machine() -> None:
    def runaway(data: bytes) -> None:
        blocks = []
        while True:
            blocks.append(bytearray(64 * T.MiB))

    out = T.run_bounded(runaway, b"{}")
    assert isinstance(out.error, MemoryError)
    with pytest.raises(T.Violation):
        T.judge(_target(runaway), b"{}", out)


def test_guard_catches_a_hang() -> None:
    stop = threading.Event()

    def spin(data: bytes) -> None:
        while not stop.is_set():
            pass

    try:
        out = T.run_bounded(spin, b"{}", time_limit=0.3)
    finally:
        stop.set()
    assert isinstance(out.error, T.Hang)
    with pytest.raises(T.Violation, match="hang"):
        T.judge(_target(spin), b"{}", out)


# --------------------------------------------------------------------------- reproducers


def _doc(base: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(base))
    at = doc
    for key in path[:-1]:
        at = at[key]
    at[path[-1]] = value
    return doc


def _manifest(path: tuple[Any, ...], value: Any) -> bytes:
    return T.encode_json(_doc(T.valid_manifest(), path, value))


def _bundle_statement(statement: dict[str, Any]) -> bytes:
    return T.bundle_for_payload(json.dumps(statement).encode())


_STATEMENT = {
    "_type": "https://in-toto.io/Statement/v1",
    "predicateType": "https://model_signing/signature/v1.0",
    "subject": [{"name": "iris", "digest": ["sha256"]}],
    "predicate": {"resources": []},
}


def _infer(spec_overrides: dict[str, Any], **top: Any) -> bytes:
    spec = {"name": "X", "datatype": "FP32", "shape": [1], "data": [1.0], **spec_overrides}
    return json.dumps({"inputs": [spec], **top}).encode()


def _binary(spec: dict[str, Any], blob: bytes) -> bytes:
    header = json.dumps({"inputs": [spec]}).encode()
    return T.binary_request(header, blob, len(header))


REPRODUCERS = [
    # wire.message.decode_object: status, presence, telemetry
    pytest.param("status", DEEP, id="status-deep-json"),
    pytest.param("status", b'{"seq":' + BIG_INT + b"}", id="status-big-int"),
    pytest.param("presence", DEEP, id="presence-deep-json"),
    pytest.param("telemetry", DEEP, id="telemetry-deep-json"),
    pytest.param("telemetry", BIG_INT, id="telemetry-big-int"),
    # manifest.json (inspect, upload, agent)
    pytest.param("manifest", DEEP, id="manifest-deep-json"),
    pytest.param("manifest", BIG_INT, id="manifest-big-int"),
    pytest.param("package_signed_manifest", DEEP, id="package-signed-deep-manifest"),
    pytest.param(
        "package_signed_manifest",
        _manifest(("model", "external_data"), [[]]),
        id="package-external-data-list-entry",
    ),
    pytest.param(
        "manifest",
        _manifest(("model", "external_data"), 7),
        id="manifest-external-data-int",
    ),
    # signature bundle (model.sig)
    pytest.param(
        "signature_bundle",
        T.bundle_for_payload(b"{}", hint=["x"]),
        id="bundle-hint-list",
    ),
    pytest.param(
        "signature_bundle",
        T.bundle_for_payload(b"{}", hint={"k": 1}),
        id="bundle-hint-dict",
    ),
    pytest.param(
        "signature_bundle",
        _bundle_statement(_STATEMENT),
        id="bundle-subject-digest-list",
    ),
    pytest.param(
        "signature_bundle",
        T.bundle_for_payload(DEEP),
        id="bundle-statement-deep-json",
    ),
    pytest.param("signature_bundle", DEEP, id="bundle-deep-json"),
    # desired state (MQTT, retained)
    pytest.param("desired_envelope", DEEP, id="desired-envelope-deep-json"),
    pytest.param("desired_envelope", BIG_INT, id="desired-envelope-big-int"),
    pytest.param(
        "desired_signed_state",
        b"\xff",
        id="desired-payload-not-utf8",
    ),
    pytest.param("desired_signed_state", DEEP, id="desired-payload-deep-json"),
    # KServe v2 requests (agent/oip.py)
    pytest.param("infer_json", DEEP, id="oip-deep"),
    pytest.param(
        "infer_json",
        _infer({"parameters": [1]}),
        id="oip-input-parameters-list",
    ),
    pytest.param(
        "infer_json",
        _infer({}, parameters=[1]),
        id="oip-request-parameters-list",
    ),
    pytest.param(
        "infer_json",
        _infer({}, outputs=[{"name": "y", "parameters": [1]}]),
        id="oip-output-parameters-list",
    ),
    pytest.param(
        "infer_json",
        _infer({"datatype": []}),
        id="oip-datatype-list",
    ),
    pytest.param(
        "infer_json",
        _infer({"shape": [10**20]}),
        id="oip-shape-1e20",
    ),
    pytest.param(
        "infer_json",
        b'{"inputs":[{"name":"X","datatype":"FP32","shape":[Infinity],"data":[1]}]}',
        id="oip-shape-infinity",
    ),
    pytest.param(
        "infer_json",
        _infer({"datatype": "INT8", "data": [1000]}),
        id="oip-int8-out-of-range",
    ),
    pytest.param(
        "infer_binary",
        _binary(
            {"name": "X", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": {}}},
            b"\0\0\0\0",
        ),
        id="oip-binary-size-object",
    ),
    pytest.param(
        "infer_binary",
        _binary(
            {
                "name": "t",
                "datatype": "BYTES",
                "shape": [5_000_000],
                "parameters": {"binary_data_size": 4},
            },
            b"\1\0\0\0",
        ),
        id="oip-bytes-declared-shape-allocates",
    ),
]


def _package_with_model(model: bytes) -> bytes:
    manifest = T.valid_manifest()
    manifest["members"]["model.onnx"] = {
        "sha256": hashlib.sha256(model).hexdigest(),
        "size": len(model),
    }
    return T.package_bytes(T.encode_json(manifest), {"model.onnx": model})


REPRODUCERS += [
    # A signed package whose model file is not ONNX at all: accepted or refused with a reason
    # by the verifier, however closely it reads the model (external data locations).
    pytest.param(
        "package_file",
        _package_with_model(b"\x08\x07not onnx"),
        id="package-model-not-onnx",
    ),
    pytest.param("package_file", _package_with_model(b""), id="package-model-empty"),
]


@pytest.mark.parametrize(("name", "data"), REPRODUCERS)
def test_reproducer(name: str, data: bytes) -> None:
    T.check(TARGETS[name], data)
