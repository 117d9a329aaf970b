"""Content addresses of a package's members: the block lists the signed manifest carries (pure).

``manifest.members.NAME.blocks`` lists byte ranges of member NAME as ``[offset, length,
sha256]`` triples that tile it exactly, in order (written by `edgefleet.wire.package.
build_package` for every member). For an ONNX model the ranges are cut at tensor boundaries:
every graph initializer (the whole ``TensorProto`` field, header and data) is its own run, and
the protobuf bytes between initializers (nodes, names, graph structure) are runs of their own;
a run longer than `CHUNK` is split into `CHUNK`-sized pieces, and consecutive pieces under
`SMALL` are joined. A new version that changes only some tensors therefore changes only their
blocks; a tensor that merely moved keeps its hash. Matching is by hash, never by offset. Any
other file (``samples.npz``, external data) is cut into plain `CHUNK`-sized blocks.

`cut` is what the packager writes and what a device computes over the files it already holds,
so both sides draw the same boundaries. It never fails. `check_blocks` is the validation of a
list read from a manifest.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from edgefleet.wire.errors import RejectError
from edgefleet.wire.protowire import Malformed, length_delimited
from edgefleet.wire.reasons import ReasonCode

CHUNK = 256 * 1024  # a large tensor is split into blocks of this size
SMALL = 16 * 1024  # consecutive pieces under this size are joined into one block
MAX_BLOCK_BYTES = 16 * 1024 * 1024  # the largest block a manifest may list
MAX_BLOCKS = 1 << 20

_MODEL_GRAPH = 7  # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer


class Block(NamedTuple):
    offset: int
    length: int
    sha256: str

    @property
    def end(self) -> int:
        return self.offset + self.length

    def to_json(self) -> list[int | str]:
        return [self.offset, self.length, self.sha256]


def tensor_spans(model: bytes | memoryview) -> list[tuple[int, int]]:
    """(start, end) of every graph initializer field in an ONNX model's bytes, in file order;
    [] when the bytes are not a readable ModelProto."""
    buf = memoryview(model)
    try:
        spans = []
        for number, _, vstart, vend in length_delimited(buf, 0, len(buf)):
            if number != _MODEL_GRAPH:
                continue
            for n2, tag, _, end in length_delimited(buf, vstart, vend):
                if n2 == _GRAPH_INITIALIZER:
                    spans.append((tag, end))
        return spans
    except Malformed:
        return []


def _pieces(n: int, spans: list[tuple[int, int]], chunk: int) -> list[tuple[int, int]]:
    """(start, end) of the initializer runs and of the runs between them, each split into
    ``chunk``-sized pieces."""
    runs: list[tuple[int, int]] = []
    pos = 0
    for start, end in spans:
        if start < pos:  # overlapping spans cannot come from a well-formed message
            break
        if start > pos:
            runs.append((pos, start))
        runs.append((start, end))
        pos = end
    if pos < n:
        runs.append((pos, n))
    return [(o, min(o + chunk, e)) for s, e in runs for o in range(s, e, chunk)]


def cut(model: bytes | memoryview, chunk: int = CHUNK, small: int = SMALL) -> list[Block]:
    """The block list of ``model``'s bytes: initializers and the bytes between them as runs,
    each split into ``chunk``-sized pieces; consecutive pieces under ``small`` bytes (a QDQ
    model's many scales and zero points, names, node bytes) are joined until the block reaches
    ``small``, so the list stays short. Always tiles ``model`` exactly."""
    buf = memoryview(model)
    blocks: list[tuple[int, int]] = []
    for start, end in _pieces(len(buf), tensor_spans(buf), chunk):
        if blocks and end - start < small and blocks[-1][1] - blocks[-1][0] < small:
            blocks[-1] = (blocks[-1][0], end)
        else:
            blocks.append((start, end))
    return [Block(s, e - s, hashlib.sha256(buf[s:e]).hexdigest()) for s, e in blocks]


def cut_file(path: Path) -> list[Block]:
    """`cut` of a file's bytes, read through a memory map."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            return cut(view)


def check_blocks(value: object, size: int, field: str = "blocks") -> list[Block]:
    """``members.NAME.blocks`` as read from a manifest: a list of ``[offset, length, sha256]`` that
    tiles ``[0, size)`` in order with no gap or overlap; else ``MANIFEST_INVALID``."""

    def _bad(why: str) -> RejectError:
        return RejectError(ReasonCode.MANIFEST_INVALID, f"manifest field {field!r} {why}")

    if not isinstance(value, list):
        raise _bad("must be a list of [offset, length, sha256]")
    if len(value) > MAX_BLOCKS:
        raise _bad(f"lists {len(value)} blocks, over {MAX_BLOCKS}")
    out: list[Block] = []
    pos = 0
    for i, item in enumerate(value):
        if not isinstance(item, list) or len(item) != 3:
            raise _bad(f"[{i}] is not [offset, length, sha256]")
        offset, length, digest = item
        for v in (offset, length):
            if not isinstance(v, int) or isinstance(v, bool):
                raise _bad(f"[{i}] has a non-integer offset or length")
        if not isinstance(digest, str) or not _is_hex64(digest):
            raise _bad(f"[{i}] has no sha256 hex digest")
        if offset != pos:
            raise _bad(f"[{i}] starts at {offset}, expected {pos}: the blocks must tile the file")
        if not 0 < length <= MAX_BLOCK_BYTES:
            raise _bad(f"[{i}] has length {length}, outside 1..{MAX_BLOCK_BYTES}")
        out.append(Block(offset, length, digest))
        pos += length
    if pos != size:
        raise _bad(f"covers {pos} bytes but the model file is {size}: they must tile it")
    return out


def to_json(blocks: Sequence[Block]) -> list[list[int | str]]:
    return [b.to_json() for b in blocks]


def _is_hex64(s: str) -> bool:
    return len(s) == 64 and all(c in "0123456789abcdef" for c in s)
