"""`loads_bounded` refuses what no store can hold, whatever encoding json.loads detects.

Its fast path reads the raw bytes for the patterns of an unstorable value (``\\u0000``, 19-digit
runs, exponents, brackets): UTF-16 and UTF-32, which json.loads also accepts, hide them.
"""

from __future__ import annotations

import json

import pytest

from edgefleet.wire.message import (
    MAX_DEPTH,
    CheckedObject,
    MessageError,
    decode_object,
    loads_bounded,
    loads_object,
)

UNSTORABLE = {
    "overflowing float": ('{"a": 1e400}', "not finite"),
    "NUL in a string": ('{"a": "x\\u0000y"}', "NUL"),
    "NUL in a key": ('{"x\\u0000": 1}', "NUL"),
    "integer beyond int64": ('{"a": 99999999999999999999999}', "64-bit"),
    "too deep": ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "deeper"),
}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
@pytest.mark.parametrize("name", sorted(UNSTORABLE))
def test_unstorable_values_are_refused_in_every_encoding(name: str, encoding: str) -> None:
    text, why = UNSTORABLE[name]
    raw = text.encode(encoding)
    with pytest.raises(ValueError, match=why):
        loads_bounded(raw)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
def test_a_plain_message_decodes_in_every_encoding(encoding: str) -> None:
    value = {"device_id": "gw-1", "seq": 123456789012345678, "p95": 1.5, "tags": ["a", "b"]}
    assert loads_bounded(json.dumps(value).encode(encoding)) == value


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-32"])
@pytest.mark.parametrize("name", sorted(UNSTORABLE))
def test_an_object_checked_once_is_refused_like_loads_bounded(name: str, encoding: str) -> None:
    """The bridge decodes each message once (`loads_object`) and its parsers do not walk it
    again: what `loads_bounded` refuses, `loads_object` refuses, in every encoding."""
    text, why = UNSTORABLE[name]
    with pytest.raises(ValueError, match=why):
        loads_object(text.encode(encoding))


def test_only_a_checked_object_skips_the_walk() -> None:
    checked = loads_object('{"records": [{"id": 1}]}'.encode("utf-16"))
    assert isinstance(checked, CheckedObject) and checked == {"records": [{"id": 1}]}
    assert decode_object("telemetry", checked) is checked
    assert loads_object(b"[1, 2]") is None  # JSON, not an object
    # a mapping from anywhere else is walked as before
    with pytest.raises(MessageError, match="NUL"):
        decode_object("telemetry", {"records": [{"id": 1, "x": "a\x00b"}]})
