"""Capture on demand on the wire (docs/capture.md).

Controller -> device: a desired model entry may carry ``capture``, signed with the rest of the
desired state::

    "capture": {"id": "cap-…", "rows": 200, "sample_rate": 0.1,
                "max_rows_per_minute": 60, "until": "2026-11-29T12:00:00Z"}

Device -> controller, on ``edgefleet/v1/devices/DEV/capture`` (QoS 1, acknowledged on ``ack``
under ``"capture"`` like telemetry): ``{"device_id", "records": [...]}``, each record one of

- ``{"id", "kind": "row", "capture_id", "model", "version", "ts",
  "inputs": {name: {"dtype", "shape", "data"}}, "outputs": {...}}``: one sampled request, its
  tensors as raw little-endian bytes in base64; its rows are the leading dimension, the same
  for every input;
- ``{"id", "kind": "refused", "capture_id", "model", "reason": "capture_forbidden"}``: the
  device's config forbids capture (sent once per capture; no raw data ever follows);
- ``{"id", "kind": "done", "capture_id", "model", "rows", "why"}``: the device stopped
  (``rows`` reached, ``until`` passed, or the capture was ``withdrawn``).

Every bound is checked before anything is allocated from a declared size: the dtype against
:data:`DTYPES`, the product of the shape (stopping as soon as it passes the cap) times the
item size against :data:`MAX_RECORD_BYTES` and against the length the base64 text must then
have; only then is the text decoded. Pure: no numpy, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from edgefleet.wire import ids
from edgefleet.wire.manifest import parse_time
from edgefleet.wire.message import Fields, JsonObject, decode_object
from edgefleet.wire.reasons import CaptureReason

#: dtype name -> item size. Little-endian, no objects, no strings (nothing a loader could run).
DTYPES: dict[str, int] = {
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "int32": 4,
    "uint32": 4,
    "int64": 8,
    "uint64": 8,
    "bool": 1,
}
MAX_RECORD_BYTES = 256 * 1024  # raw tensor bytes of one record, inputs and outputs together
MAX_TENSORS = 16  # inputs + outputs of one record
MAX_DIMS = 8
MAX_ROWS_PER_RECORD = 1024
MAX_ROWS = 1_000_000  # the most rows a spec may ask of one device
MAX_RATE = 60_000  # max_rows_per_minute at most
MAX_RECORDS = 64  # records in one capture message
CAPTURE_ID_RE = re.compile(r"cap-[0-9a-f]{16}")
WHY_DONE = ("rows", "until", "withdrawn")

RecordKind = Literal["row", "refused", "done"]


class CaptureError(ValueError):
    """A capture spec or record that does not hold; ``code`` classifies it."""

    def __init__(self, code: CaptureReason, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def is_capture_id(value: object) -> bool:
    return isinstance(value, str) and CAPTURE_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class CaptureSpec:
    id: str
    rows: int  # rows wanted from this device
    until: str  # ISO time: the device stops capturing then
    sample_rate: float = 0.1  # fraction of requests sampled, (0, 1]
    max_rows_per_minute: int = 60

    def to_dict(self) -> JsonObject:
        return {
            "id": self.id,
            "rows": self.rows,
            "sample_rate": self.sample_rate,
            "max_rows_per_minute": self.max_rows_per_minute,
            "until": self.until,
        }


def _malformed(msg: str) -> CaptureError:
    return CaptureError(CaptureReason.MALFORMED, msg)


def _int(v: object, lo: int, hi: int, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _malformed(f"{where}: an integer in [{lo}, {hi}]")
    return v


def parse_spec(value: object) -> CaptureSpec | None:
    """The ``capture`` entry of a desired model, None when absent; CaptureError otherwise."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise _malformed("capture: not an object")
    unknown = set(value) - set(CaptureSpec.__dataclass_fields__)
    if unknown:
        raise _malformed(f"capture: unknown fields {sorted(unknown)}")
    cid = value.get("id")
    if not is_capture_id(cid):
        raise _malformed(f"capture.id: {cid!r} is not a capture id (cap- and 16 hex digits)")
    until = value.get("until")
    if not isinstance(until, str):
        raise _malformed("capture.until: missing or not a string")
    try:
        parse_time(until)
    except ValueError as e:
        raise _malformed(f"capture.until: {e}") from e
    rate = value.get("sample_rate", CaptureSpec.sample_rate)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate):
        raise _malformed("capture.sample_rate: not a finite number")
    if not 0 < rate <= 1:
        raise _malformed("capture.sample_rate: must be in (0, 1]")
    return CaptureSpec(
        id=str(cid),
        rows=_int(value.get("rows"), 1, MAX_ROWS, "capture.rows"),
        until=until,
        sample_rate=float(rate),
        max_rows_per_minute=_int(
            value.get("max_rows_per_minute", CaptureSpec.max_rows_per_minute),
            1,
            MAX_RATE,
            "capture.max_rows_per_minute",
        ),
    )


# --- tensors -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_dict(self) -> JsonObject:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data": base64.b64encode(self.data).decode("ascii"),
        }


def encode_tensor(dtype: str, shape: tuple[int, ...], data: bytes) -> JsonObject:
    """The wire form of raw little-endian bytes (the agent passes ``arr.tobytes()``)."""
    return Tensor(dtype, shape, data).to_dict()


def _declared_size(
    dtype: object, shape: object, where: str, budget: int
) -> tuple[str, tuple[int, ...], int]:
    """(dtype, shape, bytes) from the declarations alone, refused past ``budget`` bytes."""
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: dtype {dtype!r} is not allowed")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: shape: a list of <= {MAX_DIMS}")
    size = DTYPES[dtype]
    dims: list[int] = []
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: shape {shape!r}")
        size *= d
        if size > budget:  # stop before the product grows any further
            raise CaptureError(
                CaptureReason.TOO_LARGE, f"{where}: declares more than {budget} bytes"
            )
        dims.append(d)
    return dtype, tuple(dims), size


def decode_tensor(value: object, where: str, budget: int) -> Tensor:
    """One tensor, its declarations checked before its data is decoded; ``budget``: the bytes
    the record may still hold."""
    if not isinstance(value, Mapping):
        raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: not an object")
    dtype, shape, size = _declared_size(value.get("dtype"), value.get("shape"), where, budget)
    text = value.get("data")
    if not isinstance(text, str):
        raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: data is not a string")
    if len(text) != 4 * ((size + 2) // 3):  # the length the declared size needs, exactly
        raise CaptureError(
            CaptureReason.BAD_TENSOR,
            f"{where}: {len(text)} base64 characters for {size} declared bytes",
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: data is not base64") from e
    if len(data) != size:
        raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: {len(data)} bytes, not {size}")
    return Tensor(dtype, shape, data)


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptureRow:
    record_id: int
    capture_id: str
    model: str
    version: str
    ts: str
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]

    @property
    def rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(len(t.data) for t in (*self.inputs.values(), *self.outputs.values()))

    def tensors_dict(self) -> JsonObject:
        return {
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
        }


@dataclass(frozen=True)
class CaptureNote:
    """A ``refused`` or ``done`` record."""

    record_id: int
    kind: Literal["refused", "done"]
    capture_id: str
    model: str
    reason: str | None = None  # refused: the device's reason code
    rows: int = 0  # done: rows the device sent
    why: str | None = None  # done: rows | until | withdrawn


def row_record(
    capture_id: str,
    model: str,
    version: str,
    ts: str,
    inputs: Mapping[str, JsonObject],
    outputs: Mapping[str, JsonObject],
) -> JsonObject:
    """A ``row`` record (without its ``id``: the outbox adds it)."""
    return {
        "kind": "row",
        "capture_id": capture_id,
        "model": model,
        "version": version,
        "ts": ts,
        "inputs": dict(inputs),
        "outputs": dict(outputs),
    }


def refused_record(capture_id: str, model: str) -> JsonObject:
    return {
        "kind": "refused",
        "capture_id": capture_id,
        "model": model,
        "reason": CaptureReason.FORBIDDEN.value,
    }


def done_record(capture_id: str, model: str, rows: int, why: str) -> JsonObject:
    return {"kind": "done", "capture_id": capture_id, "model": model, "rows": rows, "why": why}


def record_id(value: Mapping[str, object]) -> int | None:
    """The outbox id of a record, None when it has none a controller could ack."""
    rid = value.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int) or not 0 <= rid <= 2**63 - 1:
        return None
    return rid


def _tensors(value: object, where: str, budget: int) -> tuple[dict[str, Tensor], int]:
    if not isinstance(value, Mapping) or len(value) > MAX_TENSORS:
        raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: an object of <= {MAX_TENSORS}")
    out: dict[str, Tensor] = {}
    for name, t in value.items():
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise CaptureError(CaptureReason.BAD_TENSOR, f"{where}: bad tensor name")
        tensor = decode_tensor(t, f"{where}.{name}", budget)
        budget -= len(tensor.data)
        out[name] = tensor
    return out, budget


def parse_record(value: object, max_bytes: int = MAX_RECORD_BYTES) -> CaptureRow | CaptureNote:
    """One record of a capture message; CaptureError (with its code) otherwise."""
    if not isinstance(value, Mapping):
        raise _malformed("record: not an object")
    rid = record_id(value)
    if rid is None:
        raise _malformed("record: no integer id")
    kind, cid, model = value.get("kind"), value.get("capture_id"), value.get("model")
    if not is_capture_id(cid):
        raise _malformed(f"record: capture_id {cid!r}")
    if not ids.is_valid(ids.MODEL_NAME, model):
        raise _malformed(f"record: model {model!r}")
    assert isinstance(cid, str) and isinstance(model, str)
    if kind == "refused":
        reason = value.get("reason")
        if not isinstance(reason, str) or len(reason) > 64:
            raise _malformed("refused: reason")
        return CaptureNote(rid, "refused", cid, model, reason=reason)
    if kind == "done":
        why = value.get("why")
        if why not in WHY_DONE:
            raise _malformed(f"done: why {why!r}")
        return CaptureNote(
            rid,
            "done",
            cid,
            model,
            rows=_int(value.get("rows"), 0, MAX_ROWS, "done.rows"),
            why=str(why),
        )
    if kind != "row":
        raise _malformed(f"record: kind {kind!r}")
    version, ts = value.get("version"), value.get("ts")
    if not ids.is_valid(ids.VERSION, version) or not isinstance(ts, str) or len(ts) > 40:
        raise _malformed("row: version or ts")
    assert isinstance(version, str)
    inputs, budget = _tensors(value.get("inputs"), "inputs", max_bytes)
    outputs, _ = _tensors(value.get("outputs"), "outputs", budget)
    if not inputs:
        raise CaptureError(CaptureReason.BAD_TENSOR, "row: no inputs")
    leading = {t.shape[0] if t.shape else -1 for t in inputs.values()}
    if len(leading) != 1 or not 1 <= min(leading) <= MAX_ROWS_PER_RECORD:
        raise CaptureError(
            CaptureReason.BAD_TENSOR,
            f"row: inputs need one leading dimension in [1, {MAX_ROWS_PER_RECORD}]",
        )
    return CaptureRow(rid, cid, model, version, ts, inputs, outputs)


@dataclass(frozen=True)
class CaptureEnvelope:
    device_id: str | None
    records: list[Mapping[str, object]]
    skipped: int = 0

    def to_dict(self) -> JsonObject:
        out: JsonObject = {"records": [cast(JsonObject, dict(r)) for r in self.records]}
        if self.device_id is not None:
            out["device_id"] = self.device_id
        return out


def parse_envelope(
    raw: bytes | str | Mapping[str, object], device_id: str | None
) -> CaptureEnvelope:
    """A capture message: the device id checked against the topic's, at most
    :data:`MAX_RECORDS` records (MessageError otherwise); records are parsed one by one with
    :func:`parse_record` so one bad record costs only itself."""
    f = Fields("capture", decode_object("capture", raw))
    dev = f.device_id(device_id)
    records = f.obj.get("records")
    if not isinstance(records, list) or len(records) > MAX_RECORDS:
        raise f.bad("records", f"not a list of at most {MAX_RECORDS}")
    objs = [r for r in records if isinstance(r, Mapping)]
    return CaptureEnvelope(dev, objs, len(records) - len(objs))
