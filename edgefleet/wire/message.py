"""What every device message parser shares: the JSON value types and one refusal.

A message that crosses a process is parsed field by field; a field of the wrong type is refused
with a :class:`MessageError` that names the message and the field, so the receiver can count the
reason (``status_bad_state``) rather than guess it from a traceback. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeAlias, TypeVar, cast

JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
JsonObject: TypeAlias = dict[str, JsonValue]
E = TypeVar("E", bound=StrEnum)


def now_iso() -> str:
    """Now, as every message's ``at`` and every journal entry writes it: RFC 3339, UTC, ms."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def member_named(enum: type[E], text: object) -> E | None:
    """The member of ``enum`` whose value is ``text``, or None when it names none."""
    if not isinstance(text, str):
        return None
    try:
        return enum(text)
    except ValueError:
        return None


class MessageError(ValueError):
    """A message refused by its parser; ``message`` and ``field`` say which part is wrong."""

    def __init__(self, message: str, field: str, problem: str) -> None:
        super().__init__(f"{message} {field}: {problem}")
        self.message = message
        self.field = field
        self.problem = problem

    @property
    def reason(self) -> str:
        """A short counter name: ``<message>_bad_<field>``."""
        return f"{self.message}_bad_{self.field}"


MAX_DEPTH = 32  # nesting of any message from outside; real ones stay under 8
INT64 = (-(2**63), 2**63 - 1)


def json_problem(value: object, max_depth: int = MAX_DEPTH) -> str | None:
    """Why a decoded JSON value cannot be stored as it is, or None when it can.

    Every store the controller writes to takes it: nesting at most ``max_depth``, no NUL
    character in a string or key (PostgreSQL text refuses it), integers within int64 (a
    BIGINT column refuses more), finite numbers only (NaN passes no comparison, so a gate of
    NaN would never trip). The walk stops descending at ``max_depth``, so a deep value cannot
    exhaust the stack. Every device message goes through it (the controller's bridge reads
    thousands a second): the exact types JSON decodes to are checked inline, anything else
    (a subclass, a foreign type) by `_problem_of`.
    """
    return _items_problem((value,), 1, max_depth)


def _items_problem(items: Iterable[object], depth: int, max_depth: int) -> str | None:
    """The first problem among ``items``, each at nesting ``depth`` (1: the value itself)."""
    for v in items:
        t = type(v)
        if t is str:
            if "\x00" in v:  # type: ignore[operator]
                return "a string holds a NUL character"
        elif t is int:
            if not INT64[0] <= v <= INT64[1]:  # type: ignore[operator]
                return f"integer {v} is outside the 64-bit range"
        elif t is float:
            if not math.isfinite(v):  # type: ignore[arg-type]
                return f"number {v} is not finite"
        elif t is bool or v is None:
            continue
        elif t is dict:
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            for k in v:  # type: ignore[attr-defined]
                if not isinstance(k, str) or "\x00" in k:
                    return "a key is not a string without NUL"
            problem = _items_problem(v.values(), depth + 1, max_depth)  # type: ignore[attr-defined]
            if problem is not None:
                return problem
        elif t is list:
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            problem = _items_problem(v, depth + 1, max_depth)  # type: ignore[arg-type]
            if problem is not None:
                return problem
        else:
            problem = _problem_of(v, depth, max_depth)
            if problem is not None:
                return problem
    return None


def _problem_of(v: object, depth: int, max_depth: int) -> str | None:
    """`json_problem` of one value that is not of an exact JSON type (subclasses included)."""
    if isinstance(v, str):
        return "a string holds a NUL character" if "\x00" in v else None
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, int):
        return None if INT64[0] <= v <= INT64[1] else f"integer {v} is outside the 64-bit range"
    if isinstance(v, float):
        return None if math.isfinite(v) else f"number {v} is not finite"
    if isinstance(v, dict | list):
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        if isinstance(v, dict):
            for k in v:
                if not isinstance(k, str) or "\x00" in k:
                    return "a key is not a string without NUL"
            return _items_problem(v.values(), depth + 1, max_depth)
        return _items_problem(v, depth + 1, max_depth)
    return f"holds a {type(v).__name__}, which is not JSON"


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def json_depth_ok(value: object, limit: int = MAX_DEPTH) -> bool:
    """True when ``value`` nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                return False
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return True


def loads_bounded(raw: bytes | str, max_depth: int = MAX_DEPTH) -> object:
    """``json.loads`` for bytes from outside: NaN/Infinity refused, a nesting too deep for the
    decoder's stack refused, then :func:`json_problem`; raises ``ValueError`` naming why."""
    try:
        # json.loads, less its new decoder per call (thousands of messages a second)
        if isinstance(raw, str):
            if raw.startswith("\ufeff"):
                raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", raw, 0)
            text = raw
        else:
            text = raw.decode(json.detect_encoding(raw), "surrogatepass")
        value: object = _DECODER.decode(text)
    except RecursionError as e:
        raise ValueError(f"nested deeper than {max_depth} levels") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON: {e}") from e
    except ValueError as e:  # NaN/Infinity, or an integer of more than 4300 digits
        raise ValueError(f"not storable JSON: {e}") from e
    if isinstance(raw, bytes) and _plainly_storable(raw, max_depth):
        return value
    problem = json_problem(value, max_depth)
    if problem is not None:
        raise ValueError(problem)
    return value


# What could make a decoded value unstorable, as it must appear in the bytes: a NUL can only be
# written ``\u0000`` (a raw control character is not JSON), an integer beyond int64 takes 19
# digits or more, a float beyond the finite range an exponent or over 300 digits. Every digit
# is read as 0 (bytes.translate: faster than a regular expression, and than the walk).
_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_NINETEEN = b"0" * 19


def _plainly_storable(raw: bytes, max_depth: int) -> bool:
    """True when UTF-8 bytes that decoded cannot hold anything `json_problem` refuses: fewer brackets
    than ``max_depth`` (so no deeper nesting), no ``\\u0000``, no 19-digit run, no exponent. A
    miss only means that the value is walked (most device messages are not: the controller
    reads thousands a second)."""
    if b"\x00" in raw:
        # Not UTF-8: json.loads also reads UTF-16 and UTF-32, whose bytes put a NUL beside
        # every ASCII character, so none of the patterns below would be seen; walk it.
        return False
    if raw.count(b"[") + raw.count(b"{") > max_depth or b"\\u0000" in raw:
        return False
    digits = raw.translate(_ZEROS)
    return not (_NINETEEN in digits or b"0e" in digits or b"0E" in digits)


class CheckedObject(dict[str, object]):
    """A JSON object decoded by :func:`loads_object`, which :func:`json_problem` passed (or
    whose bytes could not hold what it refuses): :func:`decode_object` takes it without walking
    it a second time. Read it, never change it: the check holds for what was decoded."""

    __slots__ = ()


def loads_object(raw: bytes | str, max_depth: int = MAX_DEPTH) -> CheckedObject | None:
    """:func:`loads_bounded`, for a message that must be a JSON object: None when the JSON
    is another value; ``ValueError`` as there."""
    value = loads_bounded(raw, max_depth)
    return CheckedObject(value) if type(value) is dict else None


def decode_object(
    message: str, raw: bytes | str | Mapping[str, object], max_bytes: int | None = None
) -> Mapping[str, object]:
    """The JSON object in ``raw`` (bytes, text, or an already decoded mapping), refused when
    over ``max_bytes``, or when :func:`json_problem` finds it cannot be stored (a
    :class:`CheckedObject` was checked when it was decoded)."""
    if type(raw) is CheckedObject:
        return raw
    if isinstance(raw, Mapping):
        problem = json_problem(dict(raw))
        if problem is not None:
            raise MessageError(message, "payload", problem)
        return raw
    if max_bytes is not None and len(raw) > max_bytes:
        raise MessageError(message, "payload", f"{len(raw)} bytes, over the {max_bytes} limit")
    try:
        value = loads_bounded(raw)
    except ValueError as e:
        raise MessageError(message, "payload", str(e)) from e
    if not isinstance(value, dict):
        raise MessageError(message, "payload", "not a JSON object")
    return value


def encode(obj: Mapping[str, JsonValue]) -> bytes:
    """Compact JSON bytes, as published."""
    return json.dumps(obj, separators=(",", ":")).encode()


class Fields:
    """Typed reads of one decoded message's fields; each refusal names the field."""

    def __init__(self, message: str, obj: Mapping[str, object]) -> None:
        self.message = message
        self.obj = obj

    def bad(self, field: str, problem: str) -> MessageError:
        return MessageError(self.message, field, problem)

    def device_id(self, on_topic: str | None) -> str:
        """The message's ``device_id``, checked against the topic's: a message without one gets
        the topic's, one that names another device is refused."""
        dev = self.opt_string("device_id")
        if dev is None:
            if on_topic is None:
                raise self.bad("device_id", "missing or not a string")
            return on_topic
        if on_topic is not None and dev != on_topic:
            raise self.bad("device_id", f"{dev!r} on the topic of {on_topic!r}")
        return dev

    def string(self, field: str) -> str:
        value = self.obj.get(field)
        if not isinstance(value, str):
            raise self.bad(field, "missing or not a string")
        return value

    def opt_string(self, field: str) -> str | None:
        value = self.obj.get(field)
        if value is not None and not isinstance(value, str):
            raise self.bad(field, "not a string")
        return value

    def integer(self, field: str) -> int:
        value = self.obj.get(field)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(field, "missing or not an integer")
        return value

    def opt_integer(self, field: str) -> int | None:
        value = self.obj.get(field)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.bad(field, "not an integer")
        return value

    def boolean(self, field: str, default: bool) -> bool:
        value = self.obj.get(field, default)
        if not isinstance(value, bool):
            raise self.bad(field, "not a boolean")
        return value

    def timestamp(self, field: str) -> str | float | None:
        """An ISO 8601 string from an agent, or epoch seconds from a simulator."""
        value = self.obj.get(field)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise self.bad(field, "not a time (ISO 8601 text or epoch seconds)")

    def string_list(self, field: str) -> list[str] | None:
        """None when absent; a list of strings when present."""
        if field not in self.obj:
            return None
        value = self.obj[field]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.bad(field, "not a list of strings")
        return [str(v) for v in value]

    def json_object(self, field: str) -> JsonObject | None:
        """None when absent or null; a JSON object when present."""
        value = self.obj.get(field)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.bad(field, "not an object")
        return _json_object(value)


def _json_object(value: dict[object, object]) -> JsonObject:
    # Decoded JSON: keys are strings and values JSON values by construction.
    return cast(JsonObject, {str(k): v for k, v in value.items()})
