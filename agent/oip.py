"""Open Inference Protocol (KServe v2) REST codec with the binary tensor data extension (pure)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import numpy as np
from numpy.typing import ArrayLike

from edgefleet.wire.message import JsonObject, JsonValue

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


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[str] | None  # None: all
    binary_outputs: set[str]
    binary_default: bool


def _decode_bytes(raw: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    off = 0
    for i in range(count):
        if off + 4 > len(raw):
            raise ProtocolError("BYTES tensor data is truncated")
        (n,) = struct.unpack_from("<I", raw, off)
        out[i] = raw[off + 4 : off + 4 + n]
        off += 4 + n
    return out


class Headers(Protocol):
    """Response headers as a client has them: a dict, or http.client's HTTPMessage."""

    def get(self, name: str, /) -> str | None: ...


def _tensor(spec: Mapping[str, object], raw: bytes | memoryview | None) -> np.ndarray:
    name = spec.get("name")
    dt = spec.get("datatype")
    shape = spec.get("shape")
    # (dt is checked against the table before its type: an unhashable one raises as it did)
    if (
        not isinstance(name, str)
        or dt not in _TO_NP
        or not isinstance(dt, str)
        or not isinstance(shape, list)
    ):
        raise ProtocolError(f"input {name!r} needs name, a known datatype and shape")
    try:
        shape_t = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"input {name!r}: shape {shape!r} is not a list of integers") from e
    if any(d < 0 for d in shape_t):
        raise ProtocolError(f"input {name!r}: negative dimension in {shape_t}")
    count = int(np.prod(shape_t, dtype=np.int64))
    if raw is not None:
        if dt == "BYTES":
            return _decode_bytes(bytes(raw), count).reshape(shape_t)
        np_dt = np.dtype(_TO_NP[dt]).newbyteorder("<")
        if len(raw) != count * np_dt.itemsize:
            raise ProtocolError(
                f"input {name!r}: {len(raw)} bytes do not make {dt} {list(shape_t)}"
            )
        return np.frombuffer(raw, dtype=np_dt).reshape(shape_t)
    value = spec.get("data")
    if value is None:
        raise ProtocolError(f"input {name!r} has no data")
    # JSON data: nested lists of scalars as far as numpy is concerned; whatever does not fit
    # the datatype and shape is refused below (TypeError, ValueError).
    data = cast(ArrayLike, value)
    try:
        if dt == "BYTES":
            arr = np.asarray(
                [d.encode() if isinstance(d, str) else d for d in np.ravel(data)], dtype=object
            )
        else:
            arr = np.asarray(data, dtype=_TO_NP[dt])
        return arr.reshape(shape_t)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"input {name!r}: data does not fit {dt} {list(shape_t)}: {e}") from e


def parse_request(body: bytes, header_length: int | None) -> InferRequest:
    """Parse a JSON or binary-extension inference request."""
    json_part = body if header_length is None else body[:header_length]
    if header_length is not None and not 0 < header_length <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {header_length} does not fit a {len(body)}-byte body")
    try:
        req = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(f"request body is not JSON: {e}") from e
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or not req["inputs"]:
        raise ProtocolError("request needs a non-empty 'inputs' list")
    offset = header_length or 0
    view = memoryview(body)  # binary tensors are read in place, not copied
    inputs: dict[str, np.ndarray] = {}
    for spec in req["inputs"]:
        if not isinstance(spec, dict):
            raise ProtocolError("each input must be an object")
        size = (spec.get("parameters") or {}).get("binary_data_size")
        raw: memoryview | None = None
        if size is not None:
            if header_length is None:
                raise ProtocolError(f"binary_data_size without the {HEADER_LENGTH} header")
            size = int(size)
            if size < 0 or offset + size > len(body):
                raise ProtocolError(f"input {spec.get('name')!r}: binary data runs past the body")
            raw = view[offset : offset + size]
            offset += size
        arr = _tensor(spec, raw)
        if spec["name"] in inputs:
            raise ProtocolError(f"input {spec['name']!r} appears twice")
        inputs[spec["name"]] = arr
    params = req.get("parameters") or {}
    binary_default = bool(params.get("binary_data_output", False))
    outputs = None
    binary_outputs: set[str] = set()
    if isinstance(req.get("outputs"), list):
        outputs = []
        for o in req["outputs"]:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError("each requested output needs a name")
            outputs.append(o["name"])
            b = (o.get("parameters") or {}).get("binary_data")
            if b or (b is None and binary_default):
                binary_outputs.add(o["name"])
    rid = req.get("id")
    return InferRequest(
        str(rid) if rid is not None else None, inputs, outputs, binary_outputs, binary_default
    )


def _bytes_payload(arr: np.ndarray) -> bytes:
    parts = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def encode_response(
    model: str,
    version: str,
    req: InferRequest,
    outputs: dict[str, np.ndarray],
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an inference response; binary outputs go after the JSON header."""
    out_specs: list[JsonValue] = []
    blobs: list[bytes] = []
    for name, arr in outputs.items():
        dt = datatype_of(arr)
        spec: JsonObject = {"name": name, "datatype": dt, "shape": [*arr.shape]}
        if name in req.binary_outputs or (req.outputs is None and req.binary_default):
            blob = (
                _bytes_payload(arr)
                if dt == "BYTES"
                else np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            )
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif dt == "BYTES":
            spec["data"] = [
                x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in arr.ravel()
            ]
        else:
            spec["data"] = arr.ravel().tolist()
        out_specs.append(spec)
    resp: JsonObject = {"model_name": model, "model_version": version, "outputs": out_specs}
    if req.id is not None:
        resp["id"] = req.id
    header = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(header)),
    }


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
