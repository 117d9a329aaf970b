"""Delta download: bring a package to disk fetching only the blocks this device lacks.

Order (docs/delta.md): walk the package's tar headers by Range and read its ``manifest.json``
and ``model.sig``; verify the signature against the trusted keys and the manifest against its
signed digest FIRST; then cut the installed version's files into blocks, hashing their bytes
now (no stored index is trusted), plan reuse by hash against the signed block lists, fetch the
missing blocks by Range (adjacent ones coalesced), check each against its signed sha256, and keep
it on disk under its hash so an interrupted delta resumes; fetch the bytes no block list covers
(headers, padding, manifest, signature, trailer); then write the package in file order into a
temp file, every block re-hashed as it is copied, check every member's signed digest and the
package's expected sha256 and size, fsync and rename it into place. The normal install path
verifies the package again.

Any refusal raises `FetchError`; the caller then falls back to the plain full download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from edgefleet.agent.delta import Plan, Span, TarEntry, coalesce, plan, tar_entry
from edgefleet.agent.pace import Clock, Pace
from edgefleet.agent.update.fetcher import FetchError
from edgefleet.wire import signing
from edgefleet.wire.blocks import Block, check_blocks, cut_file
from edgefleet.wire.errors import RejectError
from edgefleet.wire.manifest import MANIFEST_FILE, validate_manifest
from edgefleet.wire.package import MAX_MANIFEST_BYTES
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.trust import TrustStore, parse_manifest_json

HEAD_STEP = 16 * 1024  # the least the head walk asks for at a time
MAX_HEAD_BYTES = 24 * 1024 * 1024  # headers + manifest + signature (+ members before the model)
MAX_ENTRIES = 64
# A package smaller than this is downloaded whole: the header walk (16 KiB or more) and the
# manifest's block lists would cost about as much as a delta could save.
MIN_DELTA_PACKAGE = 256 * 1024
_COPY = 1 << 20


@dataclass(frozen=True)
class DeltaDownloaded:
    """`agent.update.fetcher.Fetched`, with what the delta saved."""

    path: Path
    sha256: str
    size: int
    resumed_from: int
    attempts: int
    figures: dict[str, int] = field(default_factory=dict)


def blocks_dir(dest: Path) -> Path:
    return dest.with_name(dest.name + ".blocks")


def discard(dest: Path) -> None:
    """Remove what an interrupted delta kept for `dest`."""
    shutil.rmtree(blocks_dir(dest), ignore_errors=True)
    dest.with_name(dest.name + ".delta").unlink(missing_ok=True)


class _Ranges:
    """Range GETs of one URL whose total size is known (the signed package size)."""

    def __init__(
        self, client: Any, url: str, token: str | None, total: int, clock: Clock, retries: int
    ) -> None:
        self.client, self.url, self.token, self.total = client, url, token, total
        self.clock, self.retries = clock, retries
        self.fetched = 0
        self.requests = 0

    def get(self, start: int, end: int, sink: Callable[[bytes], object]) -> None:
        """Bytes [start, end) to ``sink`` as they arrive, exactly those bytes, or `FetchError`;
        after a dropped connection the request continues where the bytes stopped."""
        import httpx

        last, done = "", 0
        for attempt in range(self.retries + 1):

            def count(chunk: bytes) -> None:
                nonlocal done
                done += len(chunk)
                sink(chunk)

            try:
                self._once(start + done, end, count)
                return
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                if attempt < self.retries:
                    time.sleep(min(0.2 * 2**attempt, 2.0))
        raise FetchError(
            ReasonCode.DOWNLOAD_INCOMPLETE,
            f"{self.url} bytes {start}-{end - 1}: {last} after {self.retries + 1} attempts",
        )

    def _once(self, start: int, end: int, sink: Callable[[bytes], object]) -> None:
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={start}-{end - 1}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self.requests += 1
        self.clock.restart_window(self.fetched)
        with self.client.stream("GET", self.url, headers=headers) as r:
            if r.status_code != 206:
                raise FetchError(
                    ReasonCode.DELTA_UNAVAILABLE,
                    f"GET {self.url} answered HTTP {r.status_code} to a Range request",
                )
            want = f"bytes {start}-{end - 1}/{self.total}"
            if r.headers.get("content-range") != want:
                raise FetchError(
                    ReasonCode.SIZE_MISMATCH,
                    f"asked for {want}, the server answered {r.headers.get('content-range')!r}",
                )
            n = 0
            for chunk in r.iter_raw():
                if n + len(chunk) > end - start:  # nothing past the asked range is kept
                    raise FetchError(
                        ReasonCode.ENDLESS_DATA, f"more than the {end - start} bytes asked for"
                    )
                n += len(chunk)
                self.fetched += len(chunk)
                sink(chunk)
                self.clock.check(self.fetched)
            if n != end - start:
                raise FetchError(
                    ReasonCode.DOWNLOAD_INCOMPLETE, f"got {n} of {end - start} bytes asked for"
                )


@dataclass(frozen=True)
class _Member:
    """A payload member as the verified manifest and the tar header place it."""

    name: str
    data_at: int
    size: int
    sha256: str
    blocks: list[Block] | None  # package-absolute offsets; None: fetched whole


def _verify_head(
    manifest_bytes: bytes, bundle: bytes, trust: TrustStore, expected_name: str | None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The signature by a trusted key first, then the manifest against its signed digest, then
    the manifest's validation (every block list must tile its member)."""
    signed = signing.verify(bundle, trust.trusted_keys, trust.revoked_key_ids)
    if hashlib.sha256(manifest_bytes).hexdigest() != signed.digests.get(MANIFEST_FILE):
        raise RejectError(
            ReasonCode.DIGEST_MISMATCH, "manifest.json does not match its signed digest"
        )
    manifest = validate_manifest(parse_manifest_json(manifest_bytes))
    if expected_name is not None and manifest["name"] != expected_name:
        raise RejectError(
            ReasonCode.NAME_MISMATCH, f"package is {manifest['name']!r}, not {expected_name!r}"
        )
    return manifest, signed.digests


@dataclass
class _Layout:
    """The package as its headers lay it out, judged against the verified manifest."""

    cache: bytearray  # the package's bytes [0, len(cache)), read from the front
    members: list[_Member]


def _read_layout(ranges: _Ranges, trust: TrustStore, expected_name: str | None) -> _Layout:
    cache = bytearray()

    def read(start: int, end: int) -> bytes:
        if end > ranges.total:
            raise RejectError(ReasonCode.NOT_A_PACKAGE, "the package ends inside a tar member")
        if end > len(cache) and start <= len(cache) and end <= MAX_HEAD_BYTES:
            want = min(max(end, len(cache) + HEAD_STEP), ranges.total, MAX_HEAD_BYTES)
            ranges.get(len(cache), want, cache.extend)
        if end <= len(cache):
            return bytes(cache[start:end])
        buf = bytearray()
        ranges.get(start, end, buf.extend)
        return bytes(buf)

    limits = {MANIFEST_FILE: MAX_MANIFEST_BYTES, signing.SIGNATURE_FILE: signing.MAX_BUNDLE_BYTES}
    entries: dict[str, TarEntry] = {}
    small: dict[str, bytes] = {}
    at = 0
    for _ in range(MAX_ENTRIES):
        entry = tar_entry(read(at, at + 512), at)
        if entry is None:
            break
        if entry.name in entries:
            raise RejectError(ReasonCode.DUPLICATE_MEMBER, f"{entry.name!r} is listed twice")
        if entry.next_header > ranges.total:
            raise RejectError(ReasonCode.NOT_A_PACKAGE, f"{entry.name!r} runs past the package")
        entries[entry.name] = entry
        if entry.name in limits:
            trust_limit = limits[entry.name]
            if entry.size > trust_limit:
                raise RejectError(ReasonCode.TOO_LARGE, f"{entry.name} over {trust_limit} bytes")
            small[entry.name] = read(entry.data_at, entry.data_at + entry.size)
        at = entry.next_header
    else:
        raise RejectError(ReasonCode.DELTA_UNAVAILABLE, f"more than {MAX_ENTRIES} tar entries")
    if MANIFEST_FILE not in small or signing.SIGNATURE_FILE not in small:
        raise RejectError(ReasonCode.MEMBER_MISSING, "no manifest.json and model.sig")
    manifest, digests = _verify_head(
        small[MANIFEST_FILE], small[signing.SIGNATURE_FILE], trust, expected_name
    )
    listed = manifest["members"]
    payload = set(entries) - set(limits)
    if set(listed) != payload:
        raise RejectError(
            ReasonCode.MANIFEST_INVALID,
            f"manifest lists members {sorted(listed)} but the package holds {sorted(payload)}",
        )
    members = []
    for name in sorted(payload, key=lambda n: entries[n].data_at):
        e, info = entries[name], listed[name]
        if digests.get(name) != info["sha256"]:
            raise RejectError(
                ReasonCode.DIGEST_MISMATCH, f"manifest and signature disagree on {name!r}"
            )
        if e.size != info["size"]:
            raise RejectError(
                ReasonCode.SIZE_MISMATCH,
                f"{name!r} is {e.size} bytes, the manifest says {info['size']}",
            )
        bl = info.get("blocks")
        blocks = None
        if bl is not None:
            blocks = [
                Block(e.data_at + b.offset, b.length, b.sha256) for b in check_blocks(bl, e.size)
            ]
        members.append(_Member(name, e.data_at, e.size, info["sha256"], blocks))
    if not any(m.blocks for m in members):
        raise RejectError(ReasonCode.DELTA_UNAVAILABLE, "the manifest lists no blocks")
    return _Layout(cache, members)


def _stored(store: Path) -> dict[str, Path]:
    """Blocks kept by an interrupted delta, each re-hashed now; a file that no longer matches
    its name is deleted."""
    out: dict[str, Path] = {}
    for p in store.glob("*.blk"):
        if hashlib.sha256(p.read_bytes()).hexdigest() == p.stem:
            out[p.stem] = p
        else:
            p.unlink(missing_ok=True)
    return out


def _put(store: Path, block: Block, data: bytes) -> Path:
    dest = store / f"{block.sha256}.blk"
    tmp = store / f".{block.sha256}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return dest


class _Checker:
    """Consumes a span's bytes as they arrive: each block, once whole, is checked against its
    signed sha256 and kept on disk under it (so an interrupted delta resumes)."""

    def __init__(self, span: Span, store: Path, stored: dict[str, Path]) -> None:
        self.pending = list(span.blocks)
        self.buf = bytearray()
        self.store, self.stored = store, stored

    def __call__(self, chunk: bytes) -> None:
        self.buf.extend(chunk)
        while self.pending and len(self.buf) >= self.pending[0].length:
            b = self.pending.pop(0)
            piece = bytes(self.buf[: b.length])
            del self.buf[: b.length]
            got = hashlib.sha256(piece).hexdigest()
            if got != b.sha256:
                raise FetchError(
                    ReasonCode.DIGEST_MISMATCH,
                    f"the server's bytes for block {b.offset}+{b.length} hash to"
                    f" {got}, not the signed {b.sha256}",
                )
            self.stored[b.sha256] = _put(self.store, b, piece)


def _local_files(basis: Path | None, max_bytes: int) -> list[Path]:
    """The regular files of the installed version's directory (links are not followed)."""
    if basis is None or not basis.is_dir():
        return []
    return sorted(
        p
        for p in basis.iterdir()
        if p.is_file() and not p.is_symlink() and 0 < p.stat().st_size <= max_bytes
    )


def _gaps(members: list[_Member], total: int) -> list[tuple[int, int]]:
    """The byte ranges no block list covers: headers, padding, unblocked members, the trailer."""
    out, pos = [], 0
    for m in members:
        if m.blocks is None:
            continue
        if m.data_at > pos:
            out.append((pos, m.data_at))
        pos = m.data_at + m.size
    if pos < total:
        out.append((pos, total))
    return out


def fetch_delta(
    source: str,
    dest: Path,
    *,
    sha256: str,
    size: int,
    max_bytes: int,
    basis: Path | None,
    trust: TrustStore,
    expected_name: str | None = None,
    token: str | None = None,
    timeout_s: float = 30.0,
    retries: int = 3,
    pace: Pace | None = None,
) -> DeltaDownloaded:
    """Bring the package at ``source`` (``sha256``, ``size``: the desired state's) to ``dest``,
    reusing the blocks of the files in ``basis`` (the installed version's directory) whose
    hashes the signed manifest lists. Raises `FetchError` on any refusal (fall back to `fetch`)."""
    import httpx

    if urlparse(source).scheme not in ("http", "https"):
        raise FetchError(ReasonCode.DELTA_UNAVAILABLE, "a delta needs an HTTP(S) source")
    if size > max_bytes:
        raise FetchError(ReasonCode.TOO_LARGE, f"declared size {size} exceeds {max_bytes}")
    if size < MIN_DELTA_PACKAGE:
        raise FetchError(
            ReasonCode.DELTA_UNAVAILABLE, f"{size} bytes: under {MIN_DELTA_PACKAGE}, sent whole"
        )
    store = blocks_dir(dest)
    store.mkdir(parents=True, exist_ok=True)
    clock = Clock(pace or Pace(), source)
    with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
        ranges = _Ranges(client, source, token, size, clock, retries)
        try:
            layout = _read_layout(ranges, trust, expected_name)
        except RejectError as e:
            raise FetchError(e.code, f"delta refused: {e.message}") from e
        new = [b for m in layout.members for b in m.blocks or ()]
        local: dict[tuple[str, int], tuple[Path, Block]] = {}
        for path in _local_files(basis, max_bytes):
            for b in cut_file(path):  # hashed now, from the bytes on disk
                local.setdefault((b.sha256, b.length), (path, b))
        stored = _stored(store)
        p = plan(new, [b for _, b in local.values()])
        resumed = sum(b.length for b in p.fetch if b.sha256 in stored)
        for b in p.fetch:  # bytes the header walk already read need no second request
            if b.sha256 not in stored and b.end <= len(layout.cache):
                _Checker(Span((b,)), store, stored)(bytes(layout.cache[b.offset : b.end]))
        missing = [b for b in p.fetch if b.sha256 not in stored]
        gap_list = _gaps(layout.members, size)
        left = sum(b.length for b in missing) + sum(
            max(0, end - max(start, len(layout.cache))) for start, end in gap_list
        )
        if ranges.fetched + left >= size:  # the delta would not save anything
            raise FetchError(
                ReasonCode.DELTA_UNAVAILABLE,
                f"a delta would fetch {ranges.fetched + left} of the package's {size} bytes",
            )
        for span in coalesce(missing):
            ranges.get(span.start, span.end, _Checker(span, store, stored))
        gaps = []
        for start, end in gap_list:
            gap = store / f"gap-{start}-{end}.bin"
            if end <= len(layout.cache):
                gap.write_bytes(layout.cache[start:end])
            elif not gap.exists() or gap.stat().st_size != end - start:
                part = gap.with_suffix(".tmp")
                with open(part, "wb") as t:
                    ranges.get(start, end, t.write)
                    t.flush()
                    os.fsync(t.fileno())
                os.replace(part, gap)
            gaps.append((start, gap))
        try:
            digest = _assemble(dest, layout, gaps, p, local, stored, sha256, size)
        except FetchError:
            for _, gap in gaps:  # only the final digests vouch for the bytes between blocks
                gap.unlink(missing_ok=True)
            raise
    figures = {
        "blocks": len(new),
        "reused_blocks": len(p.reuse),
        "reused_bytes": p.reuse_bytes,
        "fetched_blocks": len(missing),
        "resumed_bytes": resumed,
        "bytes_over_wire": ranges.fetched,
        "requests": ranges.requests,
        "package_bytes": size,
    }
    shutil.rmtree(store, ignore_errors=True)
    return DeltaDownloaded(dest, digest, size, resumed, ranges.requests, figures)


def _assemble(
    dest: Path,
    layout: _Layout,
    gaps: list[tuple[int, Path]],
    p: Plan,
    local: dict[tuple[str, int], tuple[Path, Block]],
    stored: dict[str, Path],
    sha256: str,
    size: int,
) -> str:
    """Write the package into ``dest``.delta in file order: the bytes between blocks, and every
    block from the installed files or the block store, re-hashed as it is copied; then check
    every member's signed digest and the expected package digest, and rename only when all hold."""
    reused = {b.offset for b, _ in p.reuse}
    pieces: list[tuple[int, Block | Path]] = [(at, gap) for at, gap in gaps]
    pieces += [(b.offset, b) for m in layout.members for b in m.blocks or ()]
    pieces.sort(key=lambda x: x[0])
    part = dest.with_name(dest.name + ".delta")
    pkg = hashlib.sha256()
    hashers = {m.name: hashlib.sha256() for m in layout.members}
    spans = [(m.data_at, m.data_at + m.size, hashers[m.name]) for m in layout.members]
    pos = 0

    def write(out: IO[bytes], data: bytes) -> None:
        nonlocal pos
        pkg.update(data)
        for lo, hi, h in spans:  # the member hashers see exactly their own bytes
            a, b = max(lo, pos), min(hi, pos + len(data))
            if a < b:
                h.update(data[a - pos : b - pos])
        out.write(data)
        pos += len(data)

    try:
        with open(part, "wb") as out, ExitStack() as files:
            fds: dict[Path, int] = {}
            for at, piece in pieces:
                if at != pos:
                    raise FetchError(ReasonCode.NOT_A_PACKAGE, f"layout gap at {pos}")
                if isinstance(piece, Path):
                    with open(piece, "rb") as f:
                        while chunk := f.read(_COPY):
                            write(out, chunk)
                    continue
                b = piece
                if b.offset in reused and (b.sha256, b.length) in local:
                    path, src = local[(b.sha256, b.length)]
                    if path not in fds:
                        fds[path] = files.enter_context(open(path, "rb")).fileno()
                    data = os.pread(fds[path], src.length, src.offset)
                else:
                    data = stored[b.sha256].read_bytes()
                if hashlib.sha256(data).hexdigest() != b.sha256:  # changed since it was planned
                    raise FetchError(
                        ReasonCode.DIGEST_MISMATCH,
                        f"block {b.offset}+{b.length} changed on disk while assembling",
                    )
                write(out, data)
            out.flush()
            os.fsync(out.fileno())
        for m in layout.members:
            if hashers[m.name].hexdigest() != m.sha256:
                raise FetchError(
                    ReasonCode.DIGEST_MISMATCH,
                    f"the reassembled {m.name} does not match its signed digest",
                )
        if pos != size or pkg.hexdigest() != sha256.lower():
            raise FetchError(
                ReasonCode.DIGEST_MISMATCH,
                f"the reassembled package ({pos} bytes, sha256 {pkg.hexdigest()}) is not the"
                f" expected one ({size} bytes, {sha256})",
            )
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return pkg.hexdigest()
