"""Delta updates, the pure part: which blocks of a new model to reuse and which to fetch, how
to coalesce the fetches into Range requests, and how to read a tar header (docs/delta.md).

The I/O (Range requests, the block store, reassembly) is `edgefleet.agent.delta_fetch`'s. Every
hash handed to `plan` as local must have been computed over the local bytes just now: the
planner trusts its inputs, so the caller never feeds it a stored index.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from edgefleet.wire.blocks import Block
from edgefleet.wire.errors import RejectError
from edgefleet.wire.reasons import ReasonCode

MAX_RANGE_BYTES = 4 * 1024 * 1024  # one Range request covers at most this many bytes
TAR_BLOCK = 512


@dataclass(frozen=True)
class Span:
    """Consecutive blocks of the new model fetched with one Range request."""

    blocks: tuple[Block, ...]

    @property
    def start(self) -> int:
        return self.blocks[0].offset

    @property
    def end(self) -> int:
        return self.blocks[-1].end


@dataclass(frozen=True)
class Plan:
    reuse: list[tuple[Block, Block]] = field(default_factory=list)  # (new block, local source)
    fetch: list[Block] = field(default_factory=list)

    @property
    def reuse_bytes(self) -> int:
        return sum(b.length for b, _ in self.reuse)

    @property
    def fetch_bytes(self) -> int:
        return sum(b.length for b in self.fetch)


def plan(new_blocks: Sequence[Block], local_blocks: Iterable[Block]) -> Plan:
    """Reuse each new block whose sha256 and length a local block has (hash-matched, never by
    offset); fetch the rest. ``local_blocks`` are hashes of bytes the device holds, computed now."""
    have: dict[tuple[str, int], Block] = {}
    for b in local_blocks:
        have.setdefault((b.sha256, b.length), b)
    out = Plan()
    for b in new_blocks:
        src = have.get((b.sha256, b.length))
        if src is None:
            out.fetch.append(b)
        else:
            out.reuse.append((b, src))
    return out


def coalesce(blocks: Iterable[Block], max_bytes: int = MAX_RANGE_BYTES) -> list[Span]:
    """Adjacent blocks (in new-file order) joined into spans of at most ``max_bytes`` (a block
    larger than that is a span of its own)."""
    spans: list[list[Block]] = []
    for b in sorted(blocks, key=lambda b: b.offset):
        last = spans[-1] if spans else None
        if last and last[-1].end == b.offset and b.end - last[0].offset <= max_bytes:
            last.append(b)
        else:
            spans.append([b])
    return [Span(tuple(s)) for s in spans]


@dataclass(frozen=True)
class TarEntry:
    name: str
    header_at: int
    data_at: int
    size: int

    @property
    def next_header(self) -> int:
        return self.data_at + -(-self.size // TAR_BLOCK) * TAR_BLOCK


def tar_entry(header: bytes, at: int) -> TarEntry | None:
    """The regular-file entry whose 512-byte ustar header is ``header`` at offset ``at``; None
    at the end-of-archive marker. Anything else (a PAX or GNU extension header, a link, a bad
    checksum) is refused: the delta path reads only the plain headers `build_package` writes,
    and falls back to a full download otherwise."""
    if len(header) != TAR_BLOCK:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"tar header at {at} is truncated")
    if header == bytes(TAR_BLOCK):
        return None
    try:
        ti = tarfile.TarInfo.frombuf(header, "utf-8", "strict")
    except (tarfile.HeaderError, UnicodeDecodeError, ValueError) as e:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"bad tar header at {at}: {e}") from e
    if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
        raise RejectError(
            ReasonCode.NOT_A_PACKAGE, f"tar header at {at} is of type {ti.type!r}, not a file"
        )
    if ti.size < 0:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"tar header at {at} has a negative size")
    return TarEntry(ti.name, at, at + TAR_BLOCK, ti.size)
