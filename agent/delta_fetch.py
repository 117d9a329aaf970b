"""Delta download: bring a package to disk fetching only the model blocks this device lacks.

Order (docs/delta.md): read the package's first tar headers, its ``manifest.json`` and
``model.sig`` by Range; verify the signature against the trusted keys and the manifest against
its signed digest FIRST; then cut the current version's model file into blocks, hashing its bytes
now (no stored index is trusted), plan reuse by hash against the signed block list, fetch the
missing blocks by Range (adjacent ones coalesced), check each against its signed sha256, and keep
it on disk under its hash so an interrupted delta resumes; then write the package (the head
bytes, the model from its blocks, each re-hashed as it is copied, the tail bytes) into a temp
file, check the model's signed digest and the package's expected sha256 and size, fsync and
rename it into place. The normal install path verifies the package again.

Any refusal raises `FetchError`; the caller then falls back to the plain full download.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from edgefleet.agent.delta import Plan, Span, coalesce, plan, tar_entry
from edgefleet.agent.pace import Clock, Pace
from edgefleet.agent.update.fetcher import FetchError
from edgefleet.wire import signing
from edgefleet.wire.blocks import Block, check_blocks, cut
from edgefleet.wire.errors import RejectError
from edgefleet.wire.manifest import MANIFEST_FILE, validate_manifest
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.trust import TrustStore, parse_manifest_json

HEAD_STEP = 16 * 1024  # the least the head walk asks for at a time
MAX_HEAD_BYTES = 24 * 1024 * 1024  # headers + manifest + signature (+ members before the model)
MAX_ENTRIES = 16
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
class _Signed:
    """What the verified manifest says about the model member."""

    model_file: str
    model_sha256: str
    model_size: int
    blocks: list[Block]


def _verify_head(
    manifest_bytes: bytes, bundle: bytes, trust: TrustStore, expected_name: str | None
) -> _Signed:
    """The signature by a trusted key first, then the manifest against its signed digest, then
    the block list (validated: it must tile the model file)."""
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
    model = manifest["model"]
    info = manifest["members"][model["file"]]
    if signed.digests.get(model["file"]) != info["sha256"]:
        raise RejectError(
            ReasonCode.DIGEST_MISMATCH, "manifest and signature disagree on the model"
        )
    if model.get("blocks") is None:
        raise RejectError(ReasonCode.DELTA_UNAVAILABLE, "the manifest lists no model blocks")
    blocks = check_blocks(model["blocks"], info["size"])
    return _Signed(model["file"], info["sha256"], info["size"], blocks)


@dataclass
class _Head:
    """The package's bytes before the model's data, read header by header."""

    data: bytearray
    model_at: int
    signed: _Signed


def _read_head(ranges: _Ranges, trust: TrustStore, expected_name: str | None) -> _Head:
    head = bytearray()

    def ensure(n: int) -> None:
        if n > ranges.total:
            raise RejectError(ReasonCode.NOT_A_PACKAGE, "the package ends inside a tar member")
        if n > MAX_HEAD_BYTES:
            raise RejectError(ReasonCode.TOO_LARGE, f"the model starts past {MAX_HEAD_BYTES}")
        if n > len(head):
            ranges.get(len(head), min(max(n, len(head) + HEAD_STEP), ranges.total), head.extend)

    found: dict[str, tuple[int, int]] = {}
    signed: _Signed | None = None
    at = 0
    for _ in range(MAX_ENTRIES):
        ensure(at + 512)
        entry = tar_entry(bytes(head[at : at + 512]), at)
        if entry is None:
            break
        if entry.name in found:
            raise RejectError(ReasonCode.DUPLICATE_MEMBER, f"{entry.name!r} is listed twice")
        found[entry.name] = (entry.data_at, entry.size)
        if signed is not None and entry.name == signed.model_file:
            if entry.size != signed.model_size:
                raise RejectError(
                    ReasonCode.SIZE_MISMATCH,
                    f"the model member is {entry.size} bytes, the manifest says"
                    f" {signed.model_size}",
                )
            return _Head(head[: entry.data_at], entry.data_at, signed)
        ensure(entry.next_header)
        if signed is None and MANIFEST_FILE in found and signing.SIGNATURE_FILE in found:
            m_at, m_size = found[MANIFEST_FILE]
            s_at, s_size = found[signing.SIGNATURE_FILE]
            signed = _verify_head(
                bytes(head[m_at : m_at + m_size]),
                bytes(head[s_at : s_at + s_size]),
                trust,
                expected_name,
            )
            if signed.model_file in found:  # the model came before manifest or signature
                raise RejectError(ReasonCode.DELTA_UNAVAILABLE, "the model precedes the manifest")
        at = entry.next_header
    raise RejectError(
        ReasonCode.DELTA_UNAVAILABLE, "no signed manifest, signature and model among the headers"
    )


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
                    f"the server's bytes for model block {b.offset}+{b.length} hash to"
                    f" {got}, not the signed {b.sha256}",
                )
            self.stored[b.sha256] = _put(self.store, b, piece)


def _local_blocks(view: memoryview | None) -> list[Block]:
    return cut(view) if view is not None else []


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
    reusing the blocks of ``basis`` (the model file of the version installed now) whose hashes
    the signed manifest lists. Raises `FetchError` on any refusal (fall back to `fetch`)."""
    import httpx

    if urlparse(source).scheme not in ("http", "https"):
        raise FetchError(ReasonCode.DELTA_UNAVAILABLE, "a delta needs an HTTP(S) source")
    if size > max_bytes:
        raise FetchError(ReasonCode.TOO_LARGE, f"declared size {size} exceeds {max_bytes}")
    store = blocks_dir(dest)
    store.mkdir(parents=True, exist_ok=True)
    clock = Clock(pace or Pace(), source)
    with httpx.Client(timeout=timeout_s, follow_redirects=True) as client, ExitStack() as stack:
        ranges = _Ranges(client, source, token, size, clock, retries)
        try:
            head = _read_head(ranges, trust, expected_name)
        except RejectError as e:
            raise FetchError(e.code, f"delta refused: {e.message}") from e
        signed = head.signed
        view: memoryview | None = None
        if basis is not None and basis.is_file() and basis.stat().st_size > 0:
            f = stack.enter_context(open(basis, "rb"))
            mm = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            view = stack.enter_context(memoryview(mm))
        stored = _stored(store)
        p = plan(signed.blocks, _local_blocks(view))
        missing = [b for b in p.fetch if b.sha256 not in stored]
        resumed = sum(b.length for b in p.fetch if b.sha256 in stored)
        for span in coalesce(missing):
            ranges.get(
                head.model_at + span.start, head.model_at + span.end, _Checker(span, store, stored)
            )
        tail_at = head.model_at + signed.model_size
        tail = store / f"tail-{tail_at}-{size}.bin"
        if not tail.exists() or tail.stat().st_size != size - tail_at:
            part = tail.with_suffix(".tmp")
            with open(part, "wb") as t:
                ranges.get(tail_at, size, t.write)
                t.flush()
                os.fsync(t.fileno())
            os.replace(part, tail)
        try:
            digest = _assemble(dest, head, p, stored, view, tail, sha256, size)
        except FetchError:
            tail.unlink(missing_ok=True)  # only the final digest vouches for the tail bytes
            raise
    figures = {
        "blocks": len(signed.blocks),
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
    head: _Head,
    p: Plan,
    stored: dict[str, Path],
    view: memoryview | None,
    tail: Path,
    sha256: str,
    size: int,
) -> str:
    """Write the package into ``dest``.delta, every model block re-hashed as it is copied, then
    check the signed model digest and the expected package digest; rename only when both hold."""
    reuse = {b.offset: src for b, src in p.reuse}
    part = dest.with_name(dest.name + ".delta")
    pkg, model = hashlib.sha256(), hashlib.sha256()
    try:
        with open(part, "wb") as out:

            def write(data: bytes, into_model: bool) -> None:
                pkg.update(data)
                if into_model:
                    model.update(data)
                out.write(data)

            write(bytes(head.data), False)
            for b in head.signed.blocks:
                src = reuse.get(b.offset)
                if src is not None and view is not None:  # a copy: no slice may pin the mapping
                    data = bytes(view[src.offset : src.end])
                else:
                    data = stored[b.sha256].read_bytes()
                if hashlib.sha256(data).hexdigest() != b.sha256:  # changed since it was planned
                    raise FetchError(
                        ReasonCode.DIGEST_MISMATCH,
                        f"model block {b.offset}+{b.length} changed on disk while assembling",
                    )
                write(data, True)
            _copy(tail, write)
            out.flush()
            os.fsync(out.fileno())
            n = out.tell()
        if model.hexdigest() != head.signed.model_sha256:
            raise FetchError(
                ReasonCode.DIGEST_MISMATCH, "the reassembled model does not match its signed digest"
            )
        if n != size or pkg.hexdigest() != sha256.lower():
            raise FetchError(
                ReasonCode.DIGEST_MISMATCH,
                f"the reassembled package ({n} bytes, sha256 {pkg.hexdigest()}) is not the"
                f" expected one ({size} bytes, {sha256})",
            )
        os.replace(part, dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return pkg.hexdigest()


def _copy(path: Path, write: Callable[[bytes, bool], None]) -> None:
    with open(path, "rb") as f:
        _pump(f, write)


def _pump(f: IO[bytes], write: Callable[[bytes, bool], None]) -> None:
    while chunk := f.read(_COPY):
        write(chunk, False)
