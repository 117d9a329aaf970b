"""A small HTTP file server with single-range Range support, an optional bandwidth limit (a
throttled link for `bench_delta`) and hooks that misbehave on purpose (the delta trust tests).

Files are served from a dict of URL path -> file path; the bytes sent are counted."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)\Z")

#: (url path, first byte offset, bytes) -> the bytes to send instead
Tamper = Callable[[str, int, bytes], bytes]


class RangeServer:
    def __init__(
        self,
        files: dict[str, Path] | None = None,
        *,
        rate: float | None = None,
        ranges: bool = True,
        tamper: Tamper | None = None,
    ) -> None:
        self.files: dict[str, Path] = dict(files or {})
        self.rate = rate  # bytes per second over all connections; None: unthrottled
        self.ranges = ranges
        self.tamper = tamper
        self.sent = 0
        self.requests: list[tuple[str, str | None, int]] = []  # (path, Range, status)
        self._lock = threading.Lock()
        self._budget_t = time.monotonic()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def __enter__(self) -> RangeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _pace(self, n: int) -> None:
        """Sleep so that the bytes sent by every connection together stay under `rate`."""
        if not self.rate:
            return
        with self._lock:
            now = time.monotonic()
            self._budget_t = max(self._budget_t, now) + n / self.rate
            wait = self._budget_t - now
        if wait > 0:
            time.sleep(wait)

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        path = self.files.get(h.path)
        rng = h.headers.get("Range")
        if path is None:
            self.requests.append((h.path, rng, 404))
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        total = path.stat().st_size
        start, end, status = 0, total, 200
        m = _RANGE.match(rng or "") if self.ranges else None
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, total) if m.group(2) else total
            if start >= total or end <= start:
                self.requests.append((h.path, rng, 416))
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{total}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            status = 206
        self.requests.append((h.path, rng, status))
        h.send_response(status)
        h.send_header("Content-Length", str(end - start))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end - 1}/{total}")
        h.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            pos = start
            while pos < end:
                data = f.read(min(64 * 1024, end - pos))
                if not data:
                    break
                if self.tamper is not None:
                    try:
                        data = self.tamper(h.path, pos, data)
                    except ConnectionError:  # the hook drops the link here
                        h.close_connection = True
                        return
                self._pace(len(data))
                try:
                    h.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    return
                with self._lock:
                    self.sent += len(data)
                pos += len(data)
