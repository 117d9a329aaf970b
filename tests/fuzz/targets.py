"""Fuzz targets: every parser that takes bytes from outside, as ``bytes -> None`` callables,
and the property each one must hold on any input.

The property (`check`: `run_bounded`, then `judge`): the parser accepts the input or refuses it with its own error
type carrying a reason (`RejectError` with a code and a message, `MessageError` naming a field,
`ProtocolError` with a message, pydantic's `ValidationError` with its errors); it never raises
anything else, never runs longer than a time bound (CPU time, and wall time for a blocked
one; each input in a thread of its own), and never allocates more than a bound
relative to the input's size (tracemalloc peak; an address-space limit stops a runaway
allocation before it reaches the machine's memory).

Used by the property tests (`tests/fuzz/test_fuzz_*.py`, hypothesis) and the long run
(`python -m bench fuzz`, atheris or hypothesis). Pure parsing, no network: the HTTP API is fuzzed
in `tests/fuzz/test_fuzz_http.py` against a real server.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import resource
import tarfile
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.agent import oip
from edgefleet.wire import mqtt, presence, signing, status, telemetry, trust
from edgefleet.wire.errors import RejectError
from edgefleet.wire.keyid import key_id
from edgefleet.wire.manifest import validate_manifest
from edgefleet.wire.message import MessageError
from edgefleet.wire.package import VerifyPolicy, read_manifest, verify_package

MiB = 1024 * 1024
#: Per input: the parser's allocation peak may be this many times the input's size ...
MEM_FACTOR = 64
#: ... plus this constant (interpreter caches, a signature check, a small package's members).
MEM_BASE = 16 * MiB
#: Per input: seconds of CPU time, and of wall time, before the call counts as a hang.
TIME_LIMIT_S = 5.0
WALL_LIMIT_S = 120.0
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DEVICE = "gw-001"


class Hang(BaseException):
    """Raised into a parser that ran past the time bound (BaseException: a parser's own
    ``except Exception`` must not swallow it)."""


class Violation(AssertionError):
    """A parser broke the property; the message says how, on which input."""


@dataclass
class Outcome:
    accepted: bool
    error: BaseException | None
    peak_bytes: int
    seconds: float


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def _address_space_guard(extra: int) -> Iterator[None]:
    """At most ``extra`` more bytes of address space inside: a runaway allocation raises
    MemoryError here instead of taking the machine's memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_size() + extra
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _call_in_thread(
    fn: Callable[[bytes], object], data: bytes, cpu_limit: float, wall_limit: float
) -> BaseException | None:
    """``fn(data)`` in a thread of its own; its exception, or `Hang` once it has spent
    ``cpu_limit`` seconds of CPU (a parser starved on a busy host is not hung, one spinning
    is) or ``wall_limit`` seconds (one blocked). A fresh thread per input: a RecursionError
    deep in C code can leave its thread's recursion count off (CPython's json scanner), and
    that must not carry over to the next input. A hung thread is left behind (daemon)."""
    box: list[BaseException] = []

    def work() -> None:
        try:
            fn(data)
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=work, name="fuzz-input", daemon=True)
    start = time.monotonic()
    t.start()
    while True:
        t.join(0.05)
        if not t.is_alive():
            return box[0] if box else None
        try:
            assert t.ident is not None
            cpu = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except OSError:  # it ended between the two calls
            continue
        if cpu > cpu_limit:
            return Hang(f"still running after {cpu:.1f}s of CPU time")
        if time.monotonic() - start > wall_limit:
            return Hang(f"no answer after {wall_limit:.0f}s ({cpu:.1f}s of CPU time)")


def mem_bound(size: int) -> int:
    return MEM_FACTOR * size + MEM_BASE


def run_bounded(
    fn: Callable[[bytes], object], data: bytes, *, time_limit: float = TIME_LIMIT_S
) -> Outcome:
    """Call ``fn(data)`` under the time and memory guards; report what happened (no judging)."""
    bound = mem_bound(len(data))
    tracemalloc.start()
    t0 = time.perf_counter()
    error: BaseException | None = None
    try:
        with _address_space_guard(4 * bound + 512 * MiB):
            error = _call_in_thread(fn, data, time_limit, WALL_LIMIT_S)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return Outcome(error is None, error, peak, time.perf_counter() - t0)


def judge(target: Target, data: bytes, out: Outcome) -> None:
    """Raise `Violation` when ``out`` breaks the property for ``target``."""
    shown = data[:300]
    if isinstance(out.error, Hang):
        raise Violation(f"{target.name}: hang ({out.error}) on {len(data)} bytes {shown!r}")
    if out.error is not None:
        if not isinstance(out.error, target.errors):
            raise Violation(
                f"{target.name}: {type(out.error).__name__}: {str(out.error)[:300]}"
                f" on {len(data)} bytes {shown!r}"
            ) from out.error
        reason = target.reason(out.error)
        if not reason:
            raise Violation(f"{target.name}: refusal without a reason on {shown!r}")
    if out.peak_bytes > mem_bound(len(data)):
        raise Violation(
            f"{target.name}: peak {out.peak_bytes / MiB:.1f} MiB for a {len(data)}-byte input"
            f" (bound {mem_bound(len(data)) / MiB:.1f} MiB) on {shown!r}"
        )


def check(target: Target, data: bytes) -> Outcome:
    """The property, for one input (raises `Violation`)."""
    out = run_bounded(target.fn, data)
    judge(target, data, out)
    return out


def crash_signature(err: BaseException) -> str:
    """Exception type and the innermost edgefleet frame: one line per distinct defect."""
    tb = err.__traceback__
    where = "?"
    while tb is not None:
        code = tb.tb_frame.f_code
        if "edgefleet" in code.co_filename or "/agent/" in code.co_filename:
            where = f"{Path(code.co_filename).name}:{tb.tb_lineno} {code.co_name}"
        tb = tb.tb_next
    return f"{type(err).__name__} at {where}"


# --------------------------------------------------------------------------- reasons


def _reject_reason(e: BaseException) -> str:
    assert isinstance(e, RejectError)
    return f"{e.code.value}: {e.message}" if e.code and e.message else ""


def _message_reason(e: BaseException) -> str:
    assert isinstance(e, MessageError)
    return e.reason if e.field and e.problem else ""


def _text_reason(e: BaseException) -> str:
    return str(e)


def _pydantic_reason(e: BaseException) -> str:
    from pydantic import ValidationError

    assert isinstance(e, ValidationError)
    return "; ".join(f"{err['loc']}: {err['msg']}" for err in e.errors())


@dataclass(frozen=True)
class Target:
    name: str
    fn: Callable[[bytes], object]
    errors: tuple[type[BaseException], ...]
    reason: Callable[[BaseException], str]
    seeds: Callable[[], list[bytes]] = field(default=lambda: [])


# --------------------------------------------------------------------------- keys and fixtures


_PACKAGER = ec.generate_private_key(ec.SECP256R1())
_CONTROLLER = ec.generate_private_key(ec.SECP256R1())
PACKAGER_PUB = _PACKAGER.public_key()
CONTROLLER_PUB = _CONTROLLER.public_key()


def _tiny_onnx() -> bytes:
    """A real, minimal ONNX model (Y = X): a verifier that reads the model file gets past it."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


MODEL_BYTES = _tiny_onnx()


def valid_manifest() -> dict[str, Any]:
    """A manifest that `validate_manifest` accepts, for a package holding ``model.onnx``."""
    return {
        "format": "edgefleet.package/v1",
        "name": "iris",
        "version": "1.2.0",
        "min_agent_version": "0.1.0",
        "profile": "cpu-x86_64",
        "created": "2026-01-01T00:00:00Z",
        "expires": None,
        "members": {
            "model.onnx": {
                "sha256": hashlib.sha256(MODEL_BYTES).hexdigest(),
                "size": len(MODEL_BYTES),
            }
        },
        "model": {"file": "model.onnx", "external_data": []},
        "io": {
            "inputs": [{"name": "X", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": "label", "dtype": "int64", "shape": [None]}],
        },
        "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
        "cpu_fallback": True,
        "gates": {"max_p95_ms": 50.0, "sample_atol": 1e-4},
        "validation": {"agreement": 1.0},
        "benchmark": {"p95_ms": 0.1},
        "quantization": {"recipe": {"kind": "none"}},
        "lineage": {"source_sha256": None},
    }


def encode_json(doc: Any) -> bytes:
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def sign_bundle(name: str, digests: dict[str, str], hint: Any = None) -> bytes:
    """A bundle signed by the trusted packager key; ``hint`` replaces the key hint when given."""
    raw = signing.sign(name, digests, _PACKAGER)
    if hint is None:
        return raw
    bundle = json.loads(raw)
    bundle["verificationMaterial"]["publicKey"]["hint"] = hint
    return json.dumps(bundle).encode()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 1_767_225_600, 0o644
    return ti


def package_bytes(manifest_bytes: bytes, members: dict[str, bytes] | None = None) -> bytes:
    """A tar package whose ``manifest.json`` is ``manifest_bytes`` (as given, even if it is not
    a valid manifest), holding ``members`` (default: ``model.onnx``), signed by the trusted
    packager key over every member: the verifier gets past the signature to the manifest."""
    members = {"model.onnx": MODEL_BYTES} if members is None else members
    digests = {n: hashlib.sha256(b).hexdigest() for n, b in members.items()}
    digests["manifest.json"] = hashlib.sha256(manifest_bytes).hexdigest()
    bundle = signing.sign("iris", digests, _PACKAGER)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [
            ("manifest.json", manifest_bytes),
            ("model.sig", bundle),
            *sorted(members.items()),
        ]:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def valid_package() -> bytes:
    return package_bytes(encode_json(valid_manifest()))


def valid_desired_state() -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "seq": 7,
        "issued_at": "2026-06-01T11:00:00Z",
        "expires_at": "2026-06-08T11:00:00Z",
        "models": {
            "iris": {
                "version": "1.2.0",
                "url": "http://127.0.0.1:8080/api/v1/packages/3/download",
                "sha256": "ab" * 32,
                "rollout_id": "r-1",
            }
        },
        "remove": ["old-model"],
    }


def sign_desired_payload(payload: bytes, key_id_value: Any = None) -> bytes:
    """An envelope around ``payload`` as given (even if it is not a valid state), signed by
    the trusted controller key: the verifier gets past the signature to the state."""
    sig = _CONTROLLER.sign(mqtt._signed_bytes(payload), ec.ECDSA(hashes.SHA256()))
    env = {
        "alg": mqtt.DESIRED_ALG,
        "key_id": key_id(CONTROLLER_PUB) if key_id_value is None else key_id_value,
        "payload": base64.b64encode(payload).decode(),
        "sig": base64.b64encode(sig).decode(),
    }
    return json.dumps(env).encode()


def desired_payload(state: Any) -> bytes:
    return json.dumps(state, sort_keys=True, separators=(",", ":")).encode()


def valid_status() -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "at": "2026-06-01T12:00:00.000Z",
        "seq": 42,
        "kind": "update",
        "model": "iris",
        "version": "1.2.0",
        "state": "COMMITTED",
        "reason_code": None,
        "reason": None,
        "rollout_id": "r-1",
        "update_id": "u-1",
        "from_version": "1.1.0",
        "desired_seq": 7,
        "figures": {"p95_ms": 1.5, "requests": 30},
    }


def valid_presence() -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "online": True,
        "at": "2026-06-01T12:00:00.000Z",
        "agent_version": "0.1.0",
        "execution_providers": ["CPUExecutionProvider"],
        "profiles": ["cpu-x86_64"],
        "hardware": {"cpu_count": 2, "memory_mb": 2048},
        "models": {"iris": {"version": "1.2.0", "previous": "1.1.0", "state": "COMMITTED"}},
        "installed": {"iris": {"version": "1.2.0"}},
    }


def valid_telemetry() -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "records": [
            {"id": 1, "kind": "system", "at": "2026-06-01T12:00:00Z", "cpu_pct": 12.5},
            {"id": 2, "kind": "inference", "model": "iris", "version": "1.2.0", "count": 10},
        ],
    }


def valid_infer_json() -> dict[str, Any]:
    return {
        "id": "req-1",
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": [2, 4], "data": [1, 2, 3, 4, 5, 6, 7, 8]},
            {"name": "tag", "datatype": "BYTES", "shape": [1], "data": ["hello"]},
        ],
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
        "parameters": {"binary_data_output": False},
    }


def binary_request(header: bytes, blob: bytes, header_length: int | None) -> bytes:
    """The binary target's input: a 4-byte little-endian header length (0xFFFFFFFF: no
    header), then the body."""
    hl = 0xFFFFFFFF if header_length is None else header_length & 0xFFFFFFFF
    return hl.to_bytes(4, "little") + header + blob


def valid_infer_binary() -> tuple[dict[str, Any], bytes]:
    import numpy as np

    x = np.arange(8, dtype="<f4").tobytes()
    strings = b"".join(len(s).to_bytes(4, "little") + s for s in (b"ab", b"cde"))
    header = {
        "inputs": [
            {
                "name": "X",
                "datatype": "FP32",
                "shape": [2, 4],
                "parameters": {"binary_data_size": len(x)},
            },
            {
                "name": "tag",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": len(strings)},
            },
        ],
        "parameters": {"binary_data_output": True},
    }
    return header, x + strings


def valid_rollout_request() -> dict[str, Any]:
    return {
        "model": "iris",
        "version": "1.2.0",
        "target": {"device_ids": [DEVICE], "groups": ["lab"], "tags": []},
        "waves": [20.0, 100.0],
        "device_timeout_s": 60.0,
        "max_retries": 1,
        "retry_backoff_s": 1.0,
        "success_threshold_pct": 100.0,
        "abort_failure_pct": 20.0,
        "abort_min_finished": 2,
        "approval_waves": [1],
        "rate_per_min": 10,
        "soak_s": 0.0,
        "gates": {"max_p95_ratio": 1.3, "max_error_rate": 0.01, "max_drift": None},
        "seed": 7,
    }


# --------------------------------------------------------------------------- the parsers


def _manifest(data: bytes) -> object:
    return validate_manifest(trust.parse_manifest_json(data))


def _bundle(data: bytes) -> object:
    return signing.verify(data, [PACKAGER_PUB], {"0" * 64})


def _policy() -> VerifyPolicy:
    return VerifyPolicy(
        trusted_keys=[PACKAGER_PUB],
        revoked_key_ids={"0" * 64},
        now=NOW,
        installed_version="1.0.0",
        profiles=["cpu-x86_64"],
        available_providers=["CPUExecutionProvider"],
        agent_version="0.1.0",
        max_package_bytes=64 * MiB,
        max_member_bytes=32 * MiB,
    )


# Packages are written and extracted in memory-backed storage when there is some: the verifier
# fsyncs every member it installs, which on a disk costs more than the parsing under test.
_SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _package_file(data: bytes) -> object:
    with tempfile.TemporaryDirectory(prefix="fuzz-pkg-", dir=_SCRATCH) as tmp:
        path = Path(tmp) / "in.efpkg"
        path.write_bytes(data)
        with contextlib.suppress(RejectError):
            read_manifest(path)  # `inspect`'s unverified reader: the same refusals
        return verify_package(path, _policy(), extract_to=Path(tmp) / "out")


def _signed_manifest(data: bytes) -> object:
    return _package_file(package_bytes(data))


def _desired_envelope(data: bytes) -> object:
    return mqtt.verify_desired(data, [CONTROLLER_PUB], device_id=DEVICE, last_seq=3, now=NOW)


def _desired_signed(data: bytes) -> object:
    return _desired_envelope(sign_desired_payload(data))


def _status(data: bytes) -> object:
    return status.parse(data, DEVICE)


def _presence(data: bytes) -> object:
    return presence.parse(data, DEVICE)


def _telemetry(data: bytes) -> object:
    return telemetry.parse(data, DEVICE)


def _infer_json(data: bytes) -> object:
    return oip.parse_request(data, None)


def split_binary(data: bytes) -> tuple[bytes, int | None]:
    hl = int.from_bytes(data[:4].ljust(4, b"\0"), "little")
    return data[4:], None if hl == 0xFFFFFFFF else hl


def _infer_binary(data: bytes) -> object:
    body, hl = split_binary(data)
    return oip.parse_request(body, hl)


def controller_models() -> dict[str, Any]:
    from edgefleet.cloud_controller import api

    return {
        "rollout": api.RolloutRequest,
        "register": api.RegisterRequest,
        "labels": api.LabelsRequest,
        "token": api.TokenRequest,
        "control": api.ControlRequest,
    }


def _controller_models(data: bytes) -> object:
    # Every request model the API validates bodies with, on the same bytes.
    from pydantic import ValidationError

    accepted = 0
    last: ValidationError | None = None
    for model in controller_models().values():
        try:
            model.model_validate_json(data)
            accepted += 1
        except ValidationError as e:
            last = e
    if accepted == 0 and last is not None:
        raise last
    return accepted


def _seeds_json(*docs: Any) -> Callable[[], list[bytes]]:
    return lambda: [json.dumps(d).encode() for d in docs]


def _binary_seeds() -> list[bytes]:
    header, blob = valid_infer_binary()
    hb = json.dumps(header).encode()
    return [binary_request(hb, blob, len(hb))]


def _pydantic_error() -> type[BaseException]:
    from pydantic import ValidationError

    return ValidationError


def targets() -> dict[str, Target]:
    """Every fuzz target by name."""
    reject = (RejectError,)
    msg = (MessageError,)
    controller_models()  # imported now, not under the first input's time limit
    return {
        t.name: t
        for t in [
            Target(
                "manifest",
                _manifest,
                reject,
                _reject_reason,
                lambda: [encode_json(valid_manifest())],
            ),
            Target(
                "signature_bundle",
                _bundle,
                reject,
                _reject_reason,
                lambda: [sign_bundle("iris", {"model.onnx": "ab" * 32})],
            ),
            Target(
                "package_file", _package_file, reject, _reject_reason, lambda: [valid_package()]
            ),
            Target(
                "package_signed_manifest",
                _signed_manifest,
                reject,
                _reject_reason,
                lambda: [encode_json(valid_manifest())],
            ),
            Target(
                "desired_envelope",
                _desired_envelope,
                reject,
                _reject_reason,
                lambda: [sign_desired_payload(desired_payload(valid_desired_state()))],
            ),
            Target(
                "desired_signed_state",
                _desired_signed,
                reject,
                _reject_reason,
                lambda: [desired_payload(valid_desired_state())],
            ),
            Target("status", _status, msg, _message_reason, _seeds_json(valid_status())),
            Target("presence", _presence, msg, _message_reason, _seeds_json(valid_presence())),
            Target("telemetry", _telemetry, msg, _message_reason, _seeds_json(valid_telemetry())),
            Target(
                "infer_json",
                _infer_json,
                (oip.ProtocolError,),
                _text_reason,
                _seeds_json(valid_infer_json()),
            ),
            Target(
                "infer_binary", _infer_binary, (oip.ProtocolError,), _text_reason, _binary_seeds
            ),
            Target(
                "controller_models",
                _controller_models,
                (_pydantic_error(),),
                _pydantic_reason,
                _seeds_json(valid_rollout_request(), {"device_id": "gw-9", "groups": ["lab"]}),
            ),
        ]
    }


def bundle_for_payload(payload: bytes, hint: Any = None) -> bytes:
    """A bundle whose DSSE payload is ``payload`` as given (even if it is not a statement),
    signed by the trusted packager key: the verifier gets past the signature to the statement."""
    sig = _PACKAGER.sign(signing.pae(signing.PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": signing.BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_id(PACKAGER_PUB) if hint is None else hint},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": signing.PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle).encode()
