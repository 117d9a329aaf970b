"""Hypothesis strategies for hostile input: valid messages mutated field by field, deep nesting,
huge declared sizes and shapes, NaN and infinities, NUL bytes, non-ASCII digits, integers past
int64, wrong JSON types; and plain random bytes.

Values that JSON cannot carry from Python (a 5,000-digit integer, 100,000 levels of nesting, a
float literal that overflows) are written as sentinel strings and substituted in the encoded
text (`encode`).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

from hypothesis import strategies as st

from edgefleet.wire import signing
from tests.fuzz import targets as T

# Substituted in the encoded text: (sentinel, JSON text).
RAW_VALUES = {
    "\u0000@BIGINT": "9" * 5000,
    "\u0000@NEGBIGINT": "-" + "1" * 4400,
    "\u0000@DEEP_LIST": "[" * 100_000 + "]" * 100_000,
    "\u0000@DEEP_OBJ": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "\u0000@MID_DEEP": "[" * 990 + "]" * 990,
    "\u0000@FLOAT_OVERFLOW": "1e999999",
    "\u0000@NAN": "NaN",
    "\u0000@NEG_INF": "-Infinity",
    "\u0000@LONE_SURROGATE": '"\\ud800"',
}

INT64_MAX = 2**63 - 1

nasty_ints = (
    st.sampled_from(
        [0, -1, 1, 2**31, 2**32, INT64_MAX, 2**63, -(2**63) - 1, 2**64, 10**20, 10**30, -(10**20)]
    )
    | st.integers()
)
nasty_floats = st.sampled_from(
    [float("nan"), float("inf"), float("-inf"), -0.0, 1e308, 5e-324, 1.5, 1e20, 5e7, -1.0]
) | st.floats(allow_nan=True, allow_infinity=True)
nasty_text = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "iris\n",
        "rt-inj\nedgefleet-controller",
        "\u0661\u0662",  # Arabic-Indic digits
        "1\u0660.0.0",
        "\uff11.0.0",  # fullwidth digit
        "../../../admin.token",
        "/etc/passwd",
        "x" * 300,
        "COMMITTED",
        "REJECTED",
        "1.2.0",
        "2026-01-01T00:00:00Z",
        "2026-01-01T00:00:00",
        "-1",
        "NaN",
        "CPUExecutionProvider",
        "model.onnx",
        "manifest.json",
        "model.sig",
        "gw-001",
        "BYTES",
        "FP32",
        "\ud800",
        "A" * 64,
        "ab" * 32,
    ]
) | st.text(max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | nasty_ints
    | nasty_floats
    | nasty_text
    | st.sampled_from(list(RAW_VALUES))
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(nasty_text, children, max_size=4)
    ),
    max_leaves=12,
)


def encode(doc: Any) -> bytes:
    """JSON text of ``doc`` with the sentinels replaced by their raw text (NaN allowed)."""
    text = json.dumps(doc, allow_nan=True)
    for sentinel, raw in RAW_VALUES.items():
        quoted = json.dumps(sentinel)
        if quoted in text:
            text = text.replace(quoted, raw)
    return text.encode("utf-8", "surrogatepass")


def _slots(doc: Any, depth: int = 0) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) in ``doc``, a place a value can be replaced or removed."""
    if depth > 20:
        return
    if isinstance(doc, dict):
        for k in list(doc):
            yield doc, k
            yield from _slots(doc[k], depth + 1)
    elif isinstance(doc, list):
        for i in range(len(doc)):
            yield doc, i
            yield from _slots(doc[i], depth + 1)


@st.composite
def mutated(draw: st.DrawFn, base: Any, max_mutations: int = 3) -> Any:
    """``base`` with one to ``max_mutations`` fields replaced, removed, wrapped, or added."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_mutations))):
        slots = list(_slots(doc))
        if not slots or draw(st.integers(0, 30)) == 0:
            return draw(json_values)
        container, key = draw(st.sampled_from(slots))
        op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "wrap", "add"]))
        if op == "replace":
            container[key] = draw(json_values)
        elif op == "delete":
            del container[key]
        elif op == "wrap":
            container[key] = draw(st.sampled_from([[container[key]], {"x": container[key]}]))
        elif isinstance(container, dict):
            container[draw(nasty_text)] = draw(json_values)
        else:
            container.append(draw(json_values))
    return doc


@st.composite
def byte_sabotage(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` truncated, with bytes flipped or inserted (invalid UTF-8 included)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        i = draw(st.integers(0, len(out) - 1))
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete"]))
        if op == "truncate":
            del out[i:]
        elif op == "flip":
            out[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            out[i:i] = draw(st.sampled_from([b"\xff", b"\x00", b"\xc3", b"[", b"{", b'"', b"9"]))
        else:
            del out[i]
    return bytes(out)


def hostile_json(base: Any) -> st.SearchStrategy[bytes]:
    """Bytes for a JSON parser whose valid input is ``base``: mostly structure-aware."""
    valid = encode(base)
    return st.one_of(
        mutated(base).map(encode),
        mutated(base).map(encode),
        mutated(base).map(encode),
        json_values.map(encode),
        byte_sabotage(valid),
        st.sampled_from([v.encode() for v in RAW_VALUES.values()]),
        st.binary(max_size=200),
    )


# --------------------------------------------------------------------------- per target


def _members() -> st.SearchStrategy[dict[str, bytes]]:
    names = nasty_text | st.sampled_from(["model.onnx", "samples.npz", "a", "x" * 101])
    return st.dictionaries(names, st.binary(max_size=64), min_size=1, max_size=4)


@st.composite
def hostile_packages(draw: st.DrawFn) -> bytes:
    """Signed packages whose members and manifest are hostile (names, sizes, member sets)."""
    manifest = draw(mutated(T.valid_manifest()) | st.just(T.valid_manifest()))
    members = draw(_members() | st.just({"model.onnx": T.MODEL_BYTES}))
    try:
        return T.package_bytes(encode(manifest), members)
    except (ValueError, UnicodeEncodeError):  # a name tar itself cannot write
        return T.valid_package()


def _statement() -> dict[str, Any]:
    return signing.make_statement("iris", {"model.onnx": "ab" * 32, "manifest.json": "cd" * 32})


# ECDSA signatures differ on every call: the bases hypothesis mutates are signed once.
_SIGNED_BUNDLE = json.loads(T.sign_bundle("iris", {"model.onnx": "ab" * 32}))
_VALID_PACKAGE = T.valid_package()
_SIGNED_ENVELOPE = json.loads(T.sign_desired_payload(T.desired_payload(T.valid_desired_state())))


@st.composite
def hostile_bundles(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["statement", "hint", "envelope"]))
    if kind == "statement":  # signed: reaches the statement parser
        return T.bundle_for_payload(draw(hostile_json(_statement())))
    if kind == "hint":  # the key hint, read before the signature is checked
        hint = draw(json_values | st.just(T.key_id(T.PACKAGER_PUB)[:16]))
        return T.bundle_for_payload(encode(_statement()), hint=hint)
    return draw(hostile_json(_SIGNED_BUNDLE))


@st.composite
def hostile_envelopes(draw: st.DrawFn) -> bytes:
    valid = _SIGNED_ENVELOPE
    if draw(st.booleans()):
        return T.sign_desired_payload(
            T.desired_payload(T.valid_desired_state()), key_id_value=draw(json_values)
        )
    return draw(hostile_json(valid))


def _tensor_specs() -> st.SearchStrategy[dict[str, Any]]:
    dims = nasty_ints | st.integers(0, 8) | st.sampled_from([1.5, True, "3", "\u0663", None, 5e7])
    return st.fixed_dictionaries(
        {
            "name": st.sampled_from(["X", "tag"]) | nasty_text,
            "datatype": st.sampled_from(["FP32", "BYTES", "INT8", "INT64", "BOOL", "FP16"])
            | json_values,
            "shape": st.lists(dims, max_size=4) | json_values,
        },
        optional={
            "data": json_values | st.lists(nasty_ints | st.floats(), max_size=8),
            "parameters": st.fixed_dictionaries({"binary_data_size": nasty_ints | json_values})
            | json_values,
        },
    )


@st.composite
def hostile_infer_json(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return draw(hostile_json(T.valid_infer_json()))
    req: dict[str, Any] = {"inputs": draw(st.lists(_tensor_specs(), min_size=1, max_size=3))}
    if draw(st.booleans()):
        req["outputs"] = draw(json_values)
    if draw(st.booleans()):
        req["parameters"] = draw(json_values)
    return encode(req)


@st.composite
def hostile_infer_binary(draw: st.DrawFn) -> bytes:
    header, blob = T.valid_infer_binary()
    kind = draw(st.sampled_from(["mutated", "specs", "sabotage", "declared"]))
    if kind == "declared":  # a small, well-formed body that declares a huge tensor
        blob = draw(st.binary(min_size=4, max_size=16))
        dims = st.integers(1, 10**7) | st.sampled_from([5 * 10**7, 2**31, 2**40])
        spec = {
            "name": "tag",
            "datatype": draw(st.sampled_from(["BYTES", "FP32", "INT64"])),
            "shape": draw(st.lists(dims, min_size=1, max_size=2)),
            "parameters": {"binary_data_size": len(blob)},
        }
        hb = encode({"inputs": [spec]})
        return T.binary_request(hb, blob, len(hb))
    if kind == "mutated":
        hb = encode(draw(mutated(header)))
    elif kind == "specs":
        hb = encode({"inputs": draw(st.lists(_tensor_specs(), min_size=1, max_size=3))})
    else:
        hb = draw(byte_sabotage(encode(header)))
    blob = draw(st.just(blob) | st.binary(max_size=64) | byte_sabotage(blob))
    hl = draw(st.just(len(hb)) | st.just(None) | nasty_ints)
    return T.binary_request(hb, blob, hl)


def hostile_controller_bodies() -> st.SearchStrategy[bytes]:
    return st.one_of(
        hostile_json(T.valid_rollout_request()),
        hostile_json({"device_id": "gw-9", "groups": ["lab"], "tags": ["t"]}),
        hostile_json({"role": "viewer", "name": "ci"}),
        hostile_json({"wave": 1, "rollback": True, "reason": "why"}),
    )


STRATEGIES: dict[str, st.SearchStrategy[bytes]] = {
    "manifest": hostile_json(T.valid_manifest()),
    "signature_bundle": hostile_bundles(),
    "package_file": st.one_of(hostile_packages(), byte_sabotage(_VALID_PACKAGE)),
    "package_signed_manifest": hostile_json(T.valid_manifest()),
    "desired_envelope": hostile_envelopes(),
    "desired_signed_state": hostile_json(T.valid_desired_state()),
    "status": hostile_json(T.valid_status()),
    "presence": hostile_json(T.valid_presence()),
    "telemetry": hostile_json(T.valid_telemetry()),
    "infer_json": hostile_infer_json(),
    "infer_binary": hostile_infer_binary(),
    "controller_models": hostile_controller_bodies(),
}
