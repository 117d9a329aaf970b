"""Fetch a package to disk: HTTP(S) streamed with httpx (sha256 on the way, Range resume after an
interruption, size limit), or a local path / file:// URL copied the same way. `HttpFetcher` is the
`agent.update.fetcher.Fetcher` the agent hands its update worker.

A server is not trusted to behave (TUF's endless-data and slow-retrieval attacks): no byte past
the signed size is written (``endless_data``), and a download slower than a minimum rate over a
window, or longer than a total deadline across every retry, is abandoned (``slow_retrieval``),
so one server cannot hold the single update worker or fill the disk.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from edgefleet.agent.pace import Clock, Pace
from edgefleet.agent.update.fetcher import Fetched, FetchError
from edgefleet.wire.reasons import ReasonCode

if TYPE_CHECKING:
    from edgefleet.wire.trust import TrustStore

_CHUNK = 1 << 16


#: The fetcher contract's error (`agent.update.fetcher.FetchError`), by its historical name.
DownloadError = FetchError


def _over(n: int, size: int | None, max_bytes: int) -> DownloadError:
    if size is not None:
        return DownloadError(
            ReasonCode.ENDLESS_DATA, f"the server sent more than the signed {size} bytes"
        )
    return DownloadError(ReasonCode.TOO_LARGE, f"more than {max_bytes} bytes")


@dataclass(frozen=True)
class Downloaded:
    path: Path
    sha256: str
    size: int
    resumed_from: int  # bytes already on disk when this call started
    attempts: int


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def local_path(source: str) -> Path:
    u = urlparse(source)
    if u.scheme == "file":
        return Path(unquote(u.path))
    return Path(source)


def _hash_existing(path: Path) -> tuple[hashlib._Hash, int]:
    h = hashlib.sha256()
    n = 0
    if path.exists():
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
    return h, n


def _finish(
    part: Path, dest: Path, h: hashlib._Hash, size: int, sha256: str | None, exp_size: int | None
) -> str:
    digest = h.hexdigest()
    if exp_size is not None and size != exp_size:
        part.unlink(missing_ok=True)
        raise DownloadError(ReasonCode.SIZE_MISMATCH, f"got {size} bytes, expected {exp_size}")
    if sha256 is not None and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise DownloadError(
            ReasonCode.DIGEST_MISMATCH, f"sha256 {digest} differs from expected {sha256}"
        )
    with open(part, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    return digest


def fetch(
    source: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_bytes: int,
    timeout_s: float = 30.0,
    retries: int = 5,
    on_progress: Callable[[int], None] | None = None,
    token: str | None = None,
    pace: Pace | None = None,
) -> Downloaded:
    """Download `source` to `dest` (via `dest`.part, kept across restarts for Range resume).

    ``token`` is sent as ``Authorization: Bearer`` on HTTP(S) requests (the controller's
    per-device download token). With a signed ``size`` nothing past it is written; ``pace``
    bounds how slow the server may be."""
    if size is not None and size > max_bytes:
        raise DownloadError(
            ReasonCode.TOO_LARGE, f"declared size {size} exceeds the limit {max_bytes}"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():  # completed before a restart: check it again
        h, n = _hash_existing(dest)
        os.replace(dest, part)
        return Downloaded(dest, _finish(part, dest, h, n, sha256, size), n, n, 0)
    if not is_url(source):
        return _copy_local(local_path(source), part, dest, sha256, size, max_bytes)
    return _http(
        source,
        part,
        dest,
        sha256,
        size,
        max_bytes,
        timeout_s,
        retries,
        on_progress,
        token,
        pace or Pace(),
    )


def _copy_local(
    src: Path, part: Path, dest: Path, sha256: str | None, size: int | None, max_bytes: int
) -> Downloaded:
    if not src.is_file():
        raise DownloadError(ReasonCode.SOURCE_MISSING, f"{src} is not a file")
    if src.stat().st_size > max_bytes:
        raise DownloadError(
            ReasonCode.TOO_LARGE, f"{src.stat().st_size} bytes exceeds the limit {max_bytes}"
        )
    h = hashlib.sha256()
    n = 0
    limit = min(size, max_bytes) if size is not None else max_bytes
    with open(src, "rb") as fi, open(part, "wb") as fo:
        while chunk := fi.read(1 << 20):
            if n + len(chunk) > limit:
                fo.close()
                part.unlink(missing_ok=True)
                raise _over(n + len(chunk), size, max_bytes)
            n += len(chunk)
            h.update(chunk)
            fo.write(chunk)
    return Downloaded(dest, _finish(part, dest, h, n, sha256, size), n, 0, 1)


def _http(
    url: str,
    part: Path,
    dest: Path,
    sha256: str | None,
    size: int | None,
    max_bytes: int,
    timeout_s: float,
    retries: int,
    on_progress: Callable[[int], None] | None,
    token: str | None = None,
    pace: Pace = Pace(),
) -> Downloaded:
    import httpx

    limit = min(size, max_bytes) if size is not None else max_bytes
    clock = Clock(pace, url)
    h, n = _hash_existing(part)
    if n > limit:  # a part file from before (another size): start over
        h, n = hashlib.sha256(), 0
        part.unlink(missing_ok=True)
    resumed_from = n
    last_error = "no attempt made"
    attempts = 0
    with httpx.Client(timeout=timeout_s, follow_redirects=True) as client:
        for attempt in range(retries + 1):
            attempts = attempt + 1
            if size is not None and n == size:
                break
            headers = {"Accept-Encoding": "identity"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            if n:
                headers["Range"] = f"bytes={n}-"
            clock.check(n)
            clock.restart_window(n)
            try:
                with client.stream("GET", url, headers=headers) as r:
                    if r.status_code == 416 and n:  # nothing left: the part file is complete
                        break
                    if r.status_code == 200 and n:  # the server ignored Range: start over
                        h, n = hashlib.sha256(), 0
                        part.unlink(missing_ok=True)
                    elif r.status_code not in (200, 206):
                        raise DownloadError(
                            ReasonCode.HTTP_ERROR, f"GET {url} answered HTTP {r.status_code}"
                        )
                    total = _total_size(r.headers, n)
                    if total is not None and total > max_bytes:
                        raise DownloadError(
                            ReasonCode.TOO_LARGE,
                            f"server announces {total} bytes, limit {max_bytes}",
                        )
                    if total is not None and size is not None and total != size:
                        raise DownloadError(
                            ReasonCode.SIZE_MISMATCH,
                            f"server announces {total} bytes, expected {size}",
                        )
                    with open(part, "ab") as f:
                        for chunk in r.iter_raw():
                            if n + len(chunk) > limit:  # nothing past the limit is written
                                f.close()
                                part.unlink(missing_ok=True)
                                raise _over(n + len(chunk), size, max_bytes)
                            n += len(chunk)
                            h.update(chunk)
                            f.write(chunk)
                            if on_progress is not None:
                                on_progress(n)
                            clock.check(n)
                    if total is None or n >= total:
                        break
                    last_error = f"connection ended after {n} of {total} bytes"
            except httpx.HTTPError as e:
                last_error = f"{type(e).__name__}: {e}"
            if attempt < retries:
                time.sleep(min(0.2 * 2**attempt, 5.0))
                clock.check(n)
        else:
            raise DownloadError(
                ReasonCode.DOWNLOAD_INCOMPLETE, f"{url}: {last_error} after {attempts} attempts"
            )
    return Downloaded(dest, _finish(part, dest, h, n, sha256, size), n, resumed_from, attempts)


def _total_size(headers: object, offset: int) -> int | None:
    get = headers.get  # type: ignore[attr-defined]
    cr = get("content-range")
    if cr and "/" in cr and not cr.endswith("/*"):
        return int(cr.rsplit("/", 1)[1])
    cl = get("content-length")
    if cl is not None and get("content-encoding") in (None, "identity"):
        return offset + int(cl)
    return None


def discard(dest: Path) -> None:
    dest.unlink(missing_ok=True)
    dest.with_name(dest.name + ".part").unlink(missing_ok=True)


@dataclass(frozen=True)
class HttpFetcher:
    """`fetch` and `discard` as the update worker's `Fetcher`, with the configured patience."""

    timeout_s: float = 30.0
    retries: int = 5
    min_rate: int = Pace.min_rate
    rate_window_s: float = Pace.window_s
    deadline_s: float = Pace.deadline_s

    def fetch(
        self,
        source: str,
        dest: Path,
        *,
        sha256: str | None,
        size: int | None,
        max_bytes: int,
        token: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Downloaded:
        return fetch(
            source,
            dest,
            sha256=sha256,
            size=size,
            max_bytes=max_bytes,
            timeout_s=self.timeout_s,
            retries=self.retries,
            on_progress=on_progress,
            token=token,
            pace=Pace(self.min_rate, self.rate_window_s, self.deadline_s),
        )

    def fetch_delta(
        self,
        source: str,
        dest: Path,
        *,
        sha256: str,
        size: int,
        max_bytes: int,
        basis: Path | None,
        trust: TrustStore,
        expected_name: str | None,
        token: str | None = None,
    ) -> Fetched:
        from edgefleet.agent.delta_fetch import fetch_delta

        return fetch_delta(
            source,
            dest,
            sha256=sha256,
            size=size,
            max_bytes=max_bytes,
            basis=basis,
            trust=trust,
            expected_name=expected_name,
            token=token,
            timeout_s=self.timeout_s,
            retries=self.retries,
            pace=Pace(self.min_rate, self.rate_window_s, self.deadline_s),
        )

    def discard(self, dest: Path) -> None:
        from edgefleet.agent.delta_fetch import discard as discard_delta

        discard(dest)
        discard_delta(dest)
