"""The protobuf wire format, read without a protobuf library: varints and the length-delimited
fields of one message (what ONNX's tensors, strings and sub-messages are). Used to check an
ONNX model's external-data locations (`trust`) and to cut it at tensor boundaries (`blocks`);
every read is bounded by the message's end, and anything else is `Malformed`."""

from __future__ import annotations

__all__ = ["Malformed", "length_delimited", "varint"]


class Malformed(Exception):
    """The bytes are not a well-formed protobuf message (the text says where it broke)."""


def varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``pos``, read no further than ``end``."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Malformed("bad varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def length_delimited(buf: memoryview, pos: int, end: int) -> list[tuple[int, int, int, int]]:
    """(field number, start of the tag, start of the value, end of the value) of each
    length-delimited field of the message in ``buf[pos:end]``; fields of other wire types are
    skipped."""
    out = []
    while pos < end:
        start = pos
        key, pos = varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = varint(buf, pos, end)
            if pos + n > end:
                raise Malformed("field runs past its message")
            out.append((number, start, pos, pos + n))
            pos += n
        else:
            raise Malformed(f"wire type {wire}")
        if pos > end:
            raise Malformed("field runs past its message")
    return out
