"""Open Inference Protocol (KServe v2) REST codec with the binary tensor data extension (pure)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
from numpy.typing import ArrayLike

from edgefleet.wire.message import JsonObject, JsonValue, json_depth_ok

HEADER_LENGTH = "Inference-Header-Content-Length"

_TO_NP: dict[str, type[np.generic]] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
_FROM_NP = {np.dtype(v).str: k for k, v in _TO_NP.items() if k != "BYTES"}
_ONNX_TO_OIP = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


class ProtocolError(ValueError):
    """A malformed inference request (answered 400)."""


def oip_datatype(onnx_type: str) -> str:
    return _ONNX_TO_OIP.get(onnx_type, "BYTES")


def datatype_of(arr: np.ndarray) -> str:
    if arr.dtype == np.object_ or arr.dtype.kind in ("U", "S"):
        return "BYTES"
    try:
        return _FROM_NP[
            arr.dtype.newbyteorder("<").str if arr.dtype.byteorder == ">" else arr.dtype.str
        ]
    except KeyError as e:
        raise ProtocolError(f"output dtype {arr.dtype} has no OIP datatype") from e


@dataclass(frozen=True)
class ServingLimits:
    """The resource limits of the inference API; `docs/limits.md` gives each one's reason.

    Every size a client declares (Content-Length, a shape, ``binary_data_size``) is checked
    against these and against the model's inputs before anything is allocated from it.
    """

    max_request_bytes: int = 32 * 1024 * 1024  # one request body
    max_response_bytes: int = 64 * 1024 * 1024  # one response body (JSON data included)
    max_inflight_request_bytes: int = 128 * 1024 * 1024  # all bodies being read, together
    max_elements: int = 1 << 24  # elements of one input tensor
    max_json_depth: int = 32  # nesting of the request's JSON
    max_connections: int = 64  # connections served at once (one thread each)
    evict_after_s: float = 1.0  # when full, one waiting this long for its request is closed
    header_timeout_s: float = 10.0  # request line and headers, from the first wait
    idle_timeout_s: float = 15.0  # a keep-alive connection waiting for its next request
    body_timeout_s: float = 10.0  # reading a body: this plus its size at min_body_rate
    min_body_rate: int = 256 * 1024  # bytes per second a client must at least send
    send_timeout_s: float = 30.0  # writing one response


@dataclass(frozen=True)
class InputSpec:
    """One model input as the request must state it: OIP datatype, shape (None: any size)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: all
    binary_outputs: set[str]
    binary_default: bool


def loads_bounded(data: bytes | memoryview, max_depth: int, what: str) -> object:
    """JSON from untrusted bytes: a parse error or nesting deeper than ``max_depth`` is a
    `ProtocolError`, never a RecursionError."""
    try:
        value: object = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an int of 5000 digits
        raise ProtocolError(f"{what} is not JSON: {e}") from e
    except RecursionError as e:
        raise ProtocolError(f"{what} nests deeper than {max_depth} levels") from e
    if not json_depth_ok(value, max_depth):
        raise ProtocolError(f"{what} nests deeper than {max_depth} levels")
    return value


def _decode_bytes(raw: bytes | memoryview, count: int) -> np.ndarray:
    # every element takes at least its 4-byte length prefix: a count the data cannot hold is
    # refused before the object array is allocated
    if count * 4 > len(raw):
        raise ProtocolError(f"BYTES tensor data of {len(raw)} bytes cannot hold {count} elements")
    out = np.empty(count, dtype=object)
    off = 0
    mv = memoryview(raw)
    for i in range(count):
        if off + 4 > len(mv):
            raise ProtocolError("BYTES tensor data is truncated")
        (n,) = struct.unpack_from("<I", mv, off)
        if off + 4 + n > len(mv):
            raise ProtocolError("BYTES tensor element runs past its data")
        out[i] = bytes(mv[off + 4 : off + 4 + n])
        off += 4 + n
    if off != len(mv):
        raise ProtocolError(f"BYTES tensor data has {len(mv) - off} bytes after its elements")
    return out


class Headers(Protocol):
    """Response headers as a client has them: a dict, or http.client's HTTPMessage."""

    def get(self, name: str, /) -> str | None: ...


def _shape(name: object, shape: object, max_elements: int) -> tuple[tuple[int, ...], int]:
    """A declared shape as ints and its element count, checked before anything is allocated:
    only JSON integers (not floats, not booleans), none negative, the product bounded."""
    if not isinstance(shape, list) or len(shape) > 32:
        raise ProtocolError(f"input {name!r}: shape must be a list of at most 32 integers")
    count = 1
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int):
            raise ProtocolError(f"input {name!r}: shape {shape!r} is not a list of integers")
        if d < 0:
            raise ProtocolError(f"input {name!r}: negative dimension in {shape!r}")
        count *= d
        if count > max_elements:
            raise ProtocolError(
                f"input {name!r}: shape {shape!r} has more than {max_elements} elements"
            )
    return tuple(shape), count


def _check_spec(name: str, dt: str, shape: tuple[int, ...], spec: InputSpec | None) -> None:
    if spec is None:
        return
    if dt != spec.datatype:
        have, want = (np.dtype(_TO_NP.get(t, np.object_)).name for t in (dt, spec.datatype))
        raise ProtocolError(
            f"input {name!r} is {dt} ({have}), the model takes {spec.datatype} ({want})"
        )
    if len(shape) != len(spec.shape) or any(
        d is not None and d != a for d, a in zip(spec.shape, shape, strict=True)
    ):
        dims = [-1 if d is None else d for d in spec.shape]
        raise ProtocolError(f"input {name!r} has shape {list(shape)}, the model takes {dims}")


def _params(obj: Mapping[str, object], what: str) -> Mapping[str, object]:
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise ProtocolError(f"{what}: parameters must be an object")
    return p


def _tensor(
    spec: Mapping[str, object],
    raw: bytes | memoryview | None,
    *,
    model: InputSpec | None = None,
    max_elements: int = ServingLimits.max_elements,
    check_model: bool = False,
) -> np.ndarray:
    name = spec.get("name")
    dt = spec.get("datatype")
    if not isinstance(name, str) or not isinstance(dt, str) or dt not in _TO_NP:
        raise ProtocolError(f"input {name!r} needs name, a known datatype and shape")
    shape_t, count = _shape(name, spec.get("shape"), max_elements)
    if check_model:
        _check_spec(name, dt, shape_t, model)
    if raw is not None:
        if dt == "BYTES":
            return _decode_bytes(raw, count).reshape(shape_t)
        np_dt = np.dtype(_TO_NP[dt]).newbyteorder("<")
        if len(raw) != count * np_dt.itemsize:
            raise ProtocolError(
                f"input {name!r}: {len(raw)} bytes do not make {dt} {list(shape_t)}"
            )
        return np.frombuffer(raw, dtype=np_dt).reshape(shape_t)
    value = spec.get("data")
    if value is None:
        raise ProtocolError(f"input {name!r} has no data")
    # JSON data: a flat (row-major) or nested list of scalars. It is flattened without recursion
    # and its element count checked against the shape before numpy converts anything.
    items = _flatten(f"input {name!r}: data does not fit {dt} {list(shape_t)}", value, count)
    try:
        if dt == "BYTES":
            if not all(isinstance(d, str) for d in items):
                raise TypeError("BYTES data must be strings")
            arr = np.empty(count, dtype=object)
            arr[:] = [d.encode() for d in items if isinstance(d, str)]
        elif dt == "BOOL":
            if not all(isinstance(d, bool) for d in items):
                raise TypeError("BOOL data must be true or false")
            arr = np.asarray(items, dtype=np.bool_)
        else:
            integral = dt not in ("FP16", "FP32", "FP64")
            ok = int if integral else int | float
            if not all(isinstance(d, ok) and not isinstance(d, bool) for d in items):
                raise TypeError(f"{dt} data must be {'integers' if integral else 'numbers'}")
            arr = np.asarray(cast(ArrayLike, items), dtype=_TO_NP[dt])
        return arr.reshape(shape_t)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"input {name!r}: data does not fit {dt} {list(shape_t)}: {e}") from e


def _flatten(what: str, value: object, count: int) -> list[object]:
    """The scalars of a (nested) JSON list in row-major order; refused when there are more or
    fewer than ``count``, or when an element is an object."""
    if not isinstance(value, list):
        value = [value]
    out: list[object] = []
    stack: list[Iterator[object]] = [iter(value)]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            if isinstance(v, dict) or v is None:
                raise ProtocolError(f"{what}: it holds {type(v).__name__}, not scalars")
            out.append(v)
            if len(out) > count:
                raise ProtocolError(f"{what}: more than {count} values")
        else:
            stack.pop()
    if len(out) != count:
        raise ProtocolError(f"{what}: {len(out)} values for {count} elements")
    return out


def parse_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    *,
    model_inputs: Mapping[str, InputSpec] | None = None,
    limits: ServingLimits | None = None,
) -> InferRequest:
    """Parse a JSON or binary-extension inference request.

    With ``model_inputs`` (the server always passes them) each input's name, datatype and shape
    are checked against the model before any of its data is decoded; with ``limits`` the JSON
    nesting and each tensor's element count are bounded.
    """
    lim = limits or ServingLimits()
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a {len(body)}-byte body")
    view = memoryview(body)  # binary tensors are read in place, not copied
    json_part = view if header_length is None else view[:header_length]
    req = loads_bounded(json_part, lim.max_json_depth, "request body")
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise ProtocolError("request needs a non-empty 'inputs' list")
    offset = header_length or 0
    inputs: dict[str, np.ndarray] = {}
    for spec in req["inputs"]:
        if not isinstance(spec, dict):
            raise ProtocolError("each input must be an object")
        iname = spec.get("name")
        if not isinstance(iname, str):
            raise ProtocolError("each input needs a name")
        if iname in inputs:
            raise ProtocolError(f"input {iname!r} appears twice")
        model = None
        if model_inputs is not None:
            model = model_inputs.get(iname)
            if model is None:
                raise ProtocolError(
                    f"unknown input {iname!r}; the model takes {sorted(model_inputs)}"
                )
        size = _params(spec, f"input {iname!r}").get("binary_data_size")
        raw: memoryview | None = None
        if size is not None:
            if header_length is None:
                raise ProtocolError(f"binary_data_size without the {HEADER_LENGTH} header")
            if isinstance(size, bool) or not isinstance(size, int):
                raise ProtocolError(f"input {iname!r}: binary_data_size must be an integer")
            if size < 0 or offset + size > len(body):
                raise ProtocolError(f"input {iname!r}: binary data runs past the body")
            raw = view[offset : offset + size]
            offset += size
        inputs[iname] = _tensor(
            spec,
            raw,
            model=model,
            max_elements=lim.max_elements,
            check_model=model_inputs is not None,
        )
    if header_length is not None and offset != len(body):
        raise ProtocolError(f"{len(body) - offset} bytes after the last binary input")
    if model_inputs is not None:
        missing = sorted(set(model_inputs) - set(inputs))
        if missing:
            raise ProtocolError(
                f"missing input(s) {missing}; the model takes {sorted(model_inputs)}"
            )
    params = _params(req, "request")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise ProtocolError("parameters.binary_data_output must be true or false")
    outputs = None
    binary_outputs: set[str] = set()
    req_outputs = req.get("outputs")
    if req_outputs is not None:
        if not isinstance(req_outputs, list):
            raise ProtocolError("'outputs' must be a list")
        outputs = []
        for o in req_outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError("each requested output needs a name")
            outputs.append(o["name"])
            b = _params(o, f"output {o['name']!r}").get("binary_data")
            if b is not None and not isinstance(b, bool):
                raise ProtocolError(f"output {o['name']!r}: binary_data must be true or false")
            if b or (b is None and binary_default):
                binary_outputs.add(o["name"])
    rid = req.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, str | int)):
        raise ProtocolError("'id' must be a string")
    return InferRequest(
        str(rid) if rid is not None else None, inputs, outputs, binary_outputs, binary_default
    )


def _bytes_payload(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


class ResponseTooLarge(ProtocolError):
    """The outputs would make a response over the limit (answered 413)."""


_JSON_SLICE = 1 << 16  # elements per JSON slice: the Python list of one slice is all that exists


def _json_data(arr: np.ndarray, dt: str) -> Iterator[bytes]:
    """``"data":[...]`` of one output, encoded a slice at a time (no whole-tensor list)."""
    flat = arr.reshape(-1)
    yield b'"data":['
    for start in range(0, flat.size, _JSON_SLICE):
        part = flat[start : start + _JSON_SLICE]
        if dt == "BYTES":
            values: list[object] = [
                x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in part
            ]
        else:
            values = part.tolist()
        text = json.dumps(values, separators=(",", ":")).encode()
        yield (b"," if start else b"") + text[1:-1]
    yield b"]"


def _binary_blob(arr: np.ndarray, dt: str) -> bytes | memoryview:
    if dt == "BYTES":
        return _bytes_payload(arr)
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).reshape(-1)
    return le.view(np.uint8).data


def encode_response_parts(
    model: str,
    version: str,
    req: InferRequest,
    outputs: Mapping[str, np.ndarray],
    max_bytes: int | None = None,
) -> tuple[list[bytes | memoryview], dict[str, str], int]:
    """(body pieces, headers, body length) of an inference response, for a streamed write.

    Binary outputs are views of the output arrays, not copies; JSON data is encoded a slice at a
    time. With ``max_bytes`` a response that would be larger is refused (`ResponseTooLarge`):
    before encoding when a lower bound already exceeds it, else as soon as it does.
    """
    plan: list[tuple[str, np.ndarray, str, bool]] = []
    floor = 0
    for name, arr in outputs.items():
        dt = datatype_of(arr)
        binary = name in req.binary_outputs or (req.outputs is None and req.binary_default)
        plan.append((name, arr, dt, binary))
        floor += arr.nbytes if binary and dt != "BYTES" else 2 * arr.size
    if max_bytes is not None and floor > max_bytes:
        raise ResponseTooLarge(
            f"the response would exceed {max_bytes} bytes (at least {floor});"
            " ask for fewer or binary outputs"
        )
    head: list[bytes | memoryview] = []
    blobs: list[bytes | memoryview] = []
    total = 0

    def add(piece: bytes | memoryview, to: list[bytes | memoryview]) -> None:
        nonlocal total
        total += len(piece) if isinstance(piece, bytes) else piece.nbytes
        if max_bytes is not None and total > max_bytes:
            raise ResponseTooLarge(
                f"the response would exceed {max_bytes} bytes; ask for fewer or binary outputs"
            )
        to.append(piece)

    add(
        json.dumps({"model_name": model, "model_version": version}, separators=(",", ":")).encode()[
            :-1
        ]
        + b',"outputs":[',
        head,
    )
    for i, (name, arr, dt, binary) in enumerate(plan):
        spec: JsonObject = {"name": name, "datatype": dt, "shape": [*arr.shape]}
        if binary:
            blob = _binary_blob(arr, dt)
            spec["parameters"] = {
                "binary_data_size": len(blob) if isinstance(blob, bytes) else blob.nbytes
            }
            add(blob, blobs)
        prefix = json.dumps(spec, separators=(",", ":")).encode()
        if binary:
            add((b"," if i else b"") + prefix, head)
        else:
            add((b"," if i else b"") + prefix[:-1] + b",", head)
            for piece in _json_data(arr, dt):
                add(piece, head)
            add(b"}", head)
    tail = b"]" + (b',"id":' + json.dumps(req.id).encode() if req.id is not None else b"") + b"}"
    add(tail, head)
    if not blobs:
        return [*head], {"Content-Type": "application/json"}, total
    header_len = sum(len(h) for h in head if isinstance(h, bytes))
    return (
        [*head, *blobs],
        {
            "Content-Type": "application/octet-stream",
            HEADER_LENGTH: str(header_len),
        },
        total,
    )


def encode_response(
    model: str,
    version: str,
    req: InferRequest,
    outputs: dict[str, np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an inference response; binary outputs go after the JSON header."""
    parts, headers, _ = encode_response_parts(model, version, req, outputs)
    return b"".join(parts), headers


def encode_request(
    inputs: dict[str, np.ndarray], *, binary: bool = False, binary_outputs: bool = False
) -> tuple[bytes, dict[str, str]]:
    """A client-side request body (used by tests, the bench and `agent install` smoke checks)."""
    specs: list[JsonValue] = []
    blobs: list[bytes] = []
    for name, arr in inputs.items():
        spec: JsonObject = {
            "name": name,
            "datatype": datatype_of(arr),
            "shape": [*arr.shape],
        }
        if binary:
            blob = np.ascontiguousarray(arr).tobytes()
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            spec["data"] = arr.ravel().tolist()
        specs.append(spec)
    req: JsonObject = {"inputs": specs}
    if binary_outputs:
        req["parameters"] = {"binary_data_output": True}
    header = json.dumps(req, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


def decode_response(body: bytes, headers: Headers) -> dict[str, np.ndarray]:
    """Client side: the outputs of a JSON or binary response as arrays."""
    hl = headers.get(HEADER_LENGTH)
    n = int(hl) if hl is not None else len(body)
    resp = json.loads(body[:n])
    out: dict[str, np.ndarray] = {}
    off = n
    for spec in resp["outputs"]:
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[spec["name"]] = _tensor(spec, body[off : off + int(size)])
            off += int(size)
        else:
            out[spec["name"]] = _tensor(spec, None)
    return out
