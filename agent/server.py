"""The inference API: Open Inference Protocol (KServe v2) REST, plus Prometheus /metrics.

A stdlib ThreadingHTTPServer (HTTP/1.1 keep-alive, one thread per connection) keeps the request
path lean and the agent's memory small; ONNX Runtime releases the GIL while it runs.

Every resource a client can make the server spend is bounded (`oip.ServingLimits`, documented in
`docs/limits.md`): connections served at once, the time to send a request's headers and body,
the body's size (by the model's inputs and a configured limit, reserved against a budget shared
by all connections before it is read), each tensor's element count and the JSON nesting, and the
response's size. A declared size is checked before anything is allocated from it; every refusal
is an HTTP answer naming its reason, never a dropped connection.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import re
import socket
import sys
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edgefleet.agent import oip
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.sessions import (
    BadInput,
    LoadedModel,
    ModelError,
    ModelNotFound,
    ServerBusy,
    SessionManager,
)
from edgefleet.wire.message import JsonValue

_MODEL_RE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")
_BUSY_BODY = b'{"error":"too many connections, try again shortly"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_BUSY_BODY), _BUSY_BODY)
)
UNKNOWN_MODEL = "_unknown"  # the metrics label of every request naming no served model


log = logging.getLogger("edgefleet.agent.server")


class RequestRefused(Exception):
    """A request refused before its body was parsed: (HTTP status, reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _DeadlineReader(io.RawIOBase):
    """The socket as the handler reads it, with a deadline over a whole phase (headers, body),
    not only over each read: a client trickling one byte at a time still runs out of time."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = math.inf

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client took too long to send its request")
        self.sock.settimeout(left)
        return self.sock.recv_into(buf)


class AnsweringHandler(BaseHTTPRequestHandler):
    """A request handler that answers every request: an exception escaping a ``do_*`` method
    becomes a JSON error (507 ``disk_full`` when the disk is full, else 500 naming the error)
    rather than a dropped connection and a traceback. `QuietServer` mixes it into any handler.
    """

    _responded = False

    def send_response(self, code: int, message: str | None = None) -> None:
        self._responded = True
        super().send_response(code, message)

    def handle_one_request(self) -> None:
        self._responded = False
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as e:
            self.close_connection = True
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.error(
                "%s %s failed: %s: %s",
                self.command,
                self.path.split("?", 1)[0][:200],
                type(e).__name__,
                e,
            )
            if self._responded:
                return  # part of a response is out: closing is the only honest answer left
            status = 507 if full else 500
            reason = {"error": f"{type(e).__name__}: {e}"}
            if full:
                reason["reason_code"] = "disk_full"
            body = json.dumps(reason).encode()
            with contextlib.suppress(OSError):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()


class QuietServer(ThreadingHTTPServer):
    """A threading HTTP server that answers every request and does not print a traceback when a
    client goes away.

    Clients at the edge drop connections all the time; socketserver's default prints each one
    to stderr. A reset, a broken pipe or a timeout is ignored; any other error is logged once,
    with its stack. The handler is given `AnsweringHandler`'s behaviour when it lacks it.
    """

    def __init__(
        self, server_address: tuple[str, int], handler: type[BaseHTTPRequestHandler]
    ) -> None:
        if not issubclass(handler, AnsweringHandler):
            handler = type(handler.__name__, (AnsweringHandler, handler), {})
        super().__init__(server_address, handler)

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError | TimeoutError):
            return
        log.error("error serving %s", client_address, exc_info=err)


class _SlotServer(QuietServer):
    """At most as many connections handled at once as ``_slots`` allows, one thread each; one
    more is answered 503 at once and closed, without a thread. `_take_slot` says whether a
    new connection gets a slot (a subclass may make room first)."""

    _slots: threading.BoundedSemaphore
    refused_connections: int

    def _take_slot(self) -> bool:
        return self._slots.acquire(blocking=False)

    def process_request(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        if not self._take_slot():
            self.refused_connections += 1
            assert isinstance(request, socket.socket)
            with contextlib.suppress(OSError):  # non-blocking: the accept loop never waits
                request.setblocking(False)
                request.send(_BUSY)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class CappedServer(_SlotServer):
    """A `QuietServer` with bounded resources, for the agent's small local endpoints (admin):

    at most ``max_connections`` connections are handled at once, one thread each; one more is
    answered 503 at once and closed, without a thread. Each read and write on a connection
    waits at most ``timeout_s``, so an idle keep-alive connection, or one trickling its
    request line, frees its slot by then (300 idle sockets cost ``max_connections`` threads
    for ``timeout_s``, not 300 threads for ever). Limits: docs/limits.md, "Admin endpoint".
    """

    request_queue_size = 128  # a burst of connections is accepted (and refused) at once

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        max_connections: int,
        timeout_s: float,
    ) -> None:
        if max_connections < 1 or not timeout_s > 0:
            raise ValueError("max_connections must be >= 1 and timeout_s > 0")
        super().__init__(server_address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)
        self.timeout_s = timeout_s
        self.refused_connections = 0

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = super().get_request()
        sock.settimeout(self.timeout_s)  # kept by the handler (its own `timeout` is None)
        return sock, addr


class InferenceServer(_SlotServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        addr: tuple[str, int],
        sessions: SessionManager,
        metrics: Metrics,
        *,
        server_name: str,
        server_version: str,
        ready: threading.Event,
        limits: oip.ServingLimits | None = None,
    ) -> None:
        super().__init__(addr, _Handler)
        self.sessions = sessions
        self.metrics = metrics
        self.server_name = server_name
        self.server_version = server_version
        self.ready = ready
        self.limits = limits or oip.ServingLimits()
        self._slots = threading.BoundedSemaphore(self.limits.max_connections)
        self._budget_lock = threading.Lock()
        self._inflight_bytes = 0
        self._conn_lock = threading.Lock()
        self._waiting: dict[_Handler, float] = {}
        self.refused_connections = 0
        self.evicted_connections = 0

    # -- connections: at most max_connections served at once -------------------------------
    def _take_slot(self) -> bool:
        # Full: make room by closing the connection that has waited longest for a request (an
        # idle keep-alive one, or one trickling its headers), as long as it has waited longer
        # than a client sending a request at once ever does; else refuse at once.
        return self._slots.acquire(blocking=False) or (
            self._evict_one() and self._slots.acquire(timeout=1.0)
        )

    def track(self, handler: _Handler, waiting_since: float | None) -> None:
        """A connection waits for its next request since ``waiting_since`` (None: it is being
        served, or has ended)."""
        with self._conn_lock:
            if waiting_since is None:
                self._waiting.pop(handler, None)
            else:
                self._waiting[handler] = waiting_since

    def _evict_one(self) -> bool:
        now = time.monotonic()
        with self._conn_lock:
            if not self._waiting:
                return False
            handler, since = min(self._waiting.items(), key=lambda kv: kv[1])
            if now - since < self.limits.evict_after_s:
                return False
            del self._waiting[handler]
        self.evicted_connections += 1
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
        return True

    # -- request bodies: reserved against one budget before they are read -------------------
    def reserve(self, n: int) -> bool:
        with self._budget_lock:
            if self._inflight_bytes + n > self.limits.max_inflight_request_bytes:
                return False
            self._inflight_bytes += n
            return True

    def release(self, n: int) -> None:
        with self._budget_lock:
            self._inflight_bytes -= n

    def serves(self, name: str) -> bool:
        """A model of that name is served (or between two versions in a swap)."""
        return self.sessions.get(name) is not None or name in self.sessions.names()

    def model_label(self, name: str) -> str:
        """``name`` when it is a model served here, else one fixed label: names in URLs are
        the client's, and each label value is a time series kept for good."""
        return name if self.serves(name) else UNKNOWN_MODEL


def model_inputs(lm: LoadedModel) -> dict[str, oip.InputSpec]:
    """The model's inputs as a request must state them."""
    return {
        s.name: oip.InputSpec(s.name, oip.oip_datatype(s.onnx_type), s.shape) for s in lm.inputs
    }


def request_bound(lm: LoadedModel, limits: oip.ServingLimits) -> int:
    """The largest body a request to ``lm`` may have: the configured limit, or less when every
    input's shape is fixed (its binary size, or ~32 bytes per JSON number, plus a header)."""
    fixed = 0
    for s in lm.inputs:
        if any(d is None for d in s.shape) or oip.oip_datatype(s.onnx_type) == "BYTES":
            return limits.max_request_bytes
        n = math.prod(d for d in s.shape if d is not None)
        fixed += n * 32
    return min(limits.max_request_bytes, fixed + 64 * 1024)


class _Handler(AnsweringHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small responses must not wait for the client's delayed ACK
    server: InferenceServer
    _reader: _DeadlineReader
    _unread_body = False

    def setup(self) -> None:
        super().setup()
        self._reader = _DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 64 * 1024)

    def finish(self) -> None:
        self.server.track(self, None)
        super().finish()

    def parse_request(self) -> bool:
        ok = super().parse_request()  # reads the headers
        self.server.track(self, None)  # the request line and headers are in: being served
        return ok

    def handle_one_request(self) -> None:
        lim = self.server.limits
        # The first request of a connection is due at once; a keep-alive one may idle first.
        # Either way the whole request line and headers must arrive within the deadline.
        first = not hasattr(self, "_served")
        self._served = True
        now = time.monotonic()
        self._reader.deadline = now + (
            lim.header_timeout_s if first else lim.idle_timeout_s + lim.header_timeout_s
        )
        self.server.track(self, now)
        self._unread_body = False
        try:
            super().handle_one_request()
            if self._unread_body and self.close_connection:
                self._linger()
        except TimeoutError:
            self.close_connection = True
        except OSError:
            self.close_connection = True

    def _linger(self) -> None:
        """After answering a request whose body was not read (refused, unknown model), let
        the client finish sending for a moment, discarding what comes, so that it reads the
        answer instead of a reset: a bounded time and a fixed buffer, nothing kept."""
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 2.0
        buf = bytearray(64 * 1024)
        left = 256 * 1024 * 1024
        while left > 0:
            wait = deadline - time.monotonic()
            if wait <= 0:
                return
            self.connection.settimeout(wait)
            n = self.connection.recv_into(buf)
            if not n:
                return
            left -= n

    def log_message(self, format: str, *args: object) -> None:
        return

    def _send(
        self,
        status: int,
        body: bytes | list[bytes | memoryview],
        headers: Mapping[str, str] | None = None,
        length: int | None = None,
    ) -> None:
        self.connection.settimeout(self.server.limits.send_timeout_s)
        self.send_response(status)
        hdrs = headers or {"Content-Type": "application/json"}
        for k, v in hdrs.items():
            self.send_header(k, v)
        parts = [body] if isinstance(body, bytes) else body
        n = length if length is not None else sum(len(p) for p in parts if isinstance(p, bytes))
        self.send_header("Content-Length", str(n))
        if self.close_connection:
            self.send_header("Connection", "close")
        buf: list[bytes] = self._headers_buffer  # type: ignore[attr-defined]
        buf.append(b"\r\n")
        if self.command != "HEAD" and len(parts) == 1 and isinstance(parts[0], bytes):
            buf.append(parts[0])  # headers and body in one write: one segment when small
            self.flush_headers()
            return
        self.flush_headers()
        if self.command != "HEAD":
            for p in parts:
                self.wfile.write(p)

    def _json(self, status: int, obj: JsonValue) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode())

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        srv = self.server
        if path == "/v2/health/live":
            return self._json(200, {"live": True})
        if path == "/v2/health/ready":
            ok = srv.ready.is_set()
            return self._json(200 if ok else 503, {"ready": ok})
        if path in ("/v2", "/v2/"):
            return self._json(
                200,
                {
                    "name": srv.server_name,
                    "version": srv.server_version,
                    "extensions": ["binary_tensor_data", "model_repository_health"],
                },
            )
        if path == "/metrics":
            return self._send(200, srv.metrics.render(), {"Content-Type": srv.metrics.content_type})
        m = _MODEL_RE.match(path)
        if not m or m.group(3) == "/infer":
            return self._error(404, f"no such endpoint: GET {path}")
        name, version, tail = m.group(1), m.group(2), m.group(3)
        lm = srv.sessions.get(name)
        if lm is None or (version is not None and version != lm.version):
            if tail == "/ready":
                return self._json(
                    404,
                    {"error": f"model {name!r} version {version} is not served", "ready": False},
                )
            return self._error(
                404,
                f"model {name!r}" + (f" version {version!r}" if version else "") + " is not served",
            )
        if tail == "/ready":
            ok = srv.sessions.is_ready(name)
            return self._json(200 if ok else 503, {"name": name, "ready": ok})
        return self._json(
            200,
            {
                "name": name,
                "versions": [lm.version],
                "platform": "onnxruntime_onnx",
                "inputs": [
                    {
                        "name": s.name,
                        "datatype": oip.oip_datatype(s.onnx_type),
                        "shape": [-1 if d is None else d for d in s.shape],
                    }
                    for s in lm.inputs
                ],
                "outputs": [
                    {
                        "name": s.name,
                        "datatype": oip.oip_datatype(s.onnx_type),
                        "shape": [-1 if d is None else d for d in s.shape],
                    }
                    for s in lm.outputs
                ],
                "parameters": {"profile": lm.manifest.get("profile"), "providers": lm.providers},
            },
        )

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self._unread_body = True
        path = self.path.split("?", 1)[0]
        m = _MODEL_RE.match(path)
        if not m or m.group(3) != "/infer":
            self.close_connection = True  # the body is not read: the connection cannot go on
            return self._error(404, f"no such endpoint: POST {path}")
        try:
            self._infer(m.group(1), m.group(2))
        except (TimeoutError, ConnectionError):
            self.close_connection = True
        except Exception as e:  # any other failure is still an answer, not a dropped connection
            log.error("inference request failed: %s: %s", type(e).__name__, e)
            self.close_connection = True
            self.server.metrics.errors.labels(self.server.model_label(m.group(1)), "internal").inc()
            self._error(500, f"internal error: {type(e).__name__}")

    def _chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body_length(self, limit: int) -> int:
        """The body's declared length, checked against ``limit`` before anything is read."""
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.strip().isdigit() or len(raw.strip()) > 15:
            raise RequestRefused(411 if raw is None else 400, "Content-Length is missing or bad")
        length = int(raw)
        if length > limit:
            raise RequestRefused(413, f"request body of {length} bytes exceeds the {limit} limit")
        return length

    def _body_deadline(self, length: int) -> None:
        lim = self.server.limits
        self._reader.deadline = (
            time.monotonic() + lim.body_timeout_s + length / max(lim.min_body_rate, 1)
        )

    def _read_into(self, buf: bytearray, n: int) -> None:
        """Append ``n`` bytes to ``buf``, as they arrive (the buffer grows with what came)."""
        end = len(buf) + n
        while len(buf) < end:
            chunk = self.rfile.read1(min(end - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("the client closed the connection mid-body")
            buf += chunk

    def _read_chunked(self, limit: int) -> tuple[bytearray, int]:
        """(body, bytes reserved) of a chunked body: each chunk is checked against ``limit`` and
        reserved against the shared budget before it is read."""
        buf = bytearray()
        reserved = 0
        self._body_deadline(limit)
        try:
            while True:
                line = self.rfile.readline(64)
                size_text = line.split(b";", 1)[0].strip()
                if not size_text or len(size_text) > 15:
                    raise RequestRefused(400, f"bad chunk size line {line[:40]!r}")
                try:
                    size = int(size_text, 16)
                except ValueError as e:
                    raise RequestRefused(400, f"bad chunk size line {line[:40]!r}") from e
                if size == 0:
                    for _ in range(64):  # trailers, bounded
                        if self.rfile.readline(1024) in (b"\r\n", b"\n", b""):
                            break
                    return buf, reserved
                if len(buf) + size > limit:
                    raise RequestRefused(413, f"chunked request body exceeds the {limit} limit")
                if not self.server.reserve(size):
                    raise RequestRefused(503, "too many request bytes in flight, try again shortly")
                reserved += size
                self._read_into(buf, size)
                self.rfile.readline(8)
        except BaseException:
            self.server.release(reserved)
            raise

    def _infer(self, name: str, version: str | None) -> None:
        srv = self.server
        metrics = srv.metrics
        lim = srv.limits
        label = srv.model_label(name)
        t0 = time.perf_counter()
        hl = self.headers.get(oip.HEADER_LENGTH)
        reserved = 0
        try:
            lm = srv.sessions.get(name)
            # (in the gap of an unload-first swap the name is served but no model is loaded:
            # the request waits for it in `infer`, checked against the limits alone until then)
            if (lm is None and not srv.serves(name)) or (
                lm is not None and version is not None and version != lm.version
            ):
                self.close_connection = True  # the body is not read
                raise ModelNotFound(
                    f"model {name!r}"
                    + (f" version {version!r}" if version else "")
                    + " is not served here"
                )
            specs = model_inputs(lm) if lm is not None else None
            if hl is not None and (not hl.strip().isdigit() or len(hl.strip()) > 15):
                raise RequestRefused(400, f"{oip.HEADER_LENGTH} is not a number")
            limit = request_bound(lm, lim) if lm is not None else lim.max_request_bytes
            if self._chunked():
                body, reserved = self._read_chunked(limit)
            else:
                length = self._body_length(limit)
                if not srv.reserve(length):
                    raise RequestRefused(503, "too many request bytes in flight, try again shortly")
                reserved = length
                body = bytearray()
                self._body_deadline(length)
                self._read_into(body, length)
            self._unread_body = False
            req = oip.parse_request(
                body, int(hl) if hl is not None else None, model_inputs=specs, limits=lim
            )
            lm, outputs = srv.sessions.infer(name, version, req.inputs, req.outputs)
            del req.inputs, body
            srv.release(reserved)
            reserved = 0
            parts, headers, size = oip.encode_response_parts(
                lm.name, lm.version, req, outputs, lim.max_response_bytes
            )
        except RequestRefused as e:
            self.close_connection = True  # the body was not read
            metrics.errors.labels(label, "too_large" if e.status == 413 else "refused").inc()
            return self._error(e.status, e.reason)
        except oip.ResponseTooLarge as e:
            metrics.errors.labels(label, "too_large").inc()
            return self._error(413, str(e))
        except (oip.ProtocolError, BadInput, ValueError) as e:
            metrics.errors.labels(label, "bad_request").inc()
            return self._error(400, str(e))
        except ModelNotFound as e:
            metrics.errors.labels(label, "not_found").inc()
            return self._error(404, str(e))
        except ServerBusy as e:
            metrics.errors.labels(label, "busy").inc()
            return self._error(503, str(e))
        except ModelError as e:
            metrics.errors.labels(label, "model_error").inc()
            return self._error(500, str(e))
        finally:
            if reserved:
                srv.release(reserved)
        self._send(200, parts, headers, size)
        metrics.requests.labels(lm.name, lm.version, "binary" if hl else "json").inc()
        metrics.latency.labels(lm.name).observe(time.perf_counter() - t0)
