"""The inference API: Open Inference Protocol (KServe v2) REST, plus Prometheus /metrics.

A stdlib ThreadingHTTPServer (HTTP/1.1 keep-alive, one thread per connection) keeps the request
path lean and the agent's memory small; ONNX Runtime releases the GIL while it runs.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from edgefleet.agent import oip
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.sessions import BadInput, ModelError, ModelNotFound, ServerBusy, SessionManager
from edgefleet.wire.message import JsonValue

MAX_BODY = 512 * 1024 * 1024
_MODEL_RE = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer)?/?$")


log = logging.getLogger("edgefleet.agent.server")


class QuietServer(ThreadingHTTPServer):
    """A threading HTTP server that does not print a traceback when a client goes away.

    Clients at the edge drop connections all the time; socketserver's default prints each one
    to stderr. A reset or broken pipe is ignored; any other error is logged once, with its stack.
    """

    def handle_error(
        self, request: socket.socket | tuple[bytes, socket.socket], client_address: object
    ) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError | TimeoutError):
            return
        log.error("error serving %s", client_address, exc_info=err)


class InferenceServer(QuietServer):
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
    ) -> None:
        super().__init__(addr, _Handler)
        self.sessions = sessions
        self.metrics = metrics
        self.server_name = server_name
        self.server_version = server_version
        self.ready = ready


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small responses must not wait for the client's delayed ACK
    server: InferenceServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        hdrs = headers or {"Content-Type": "application/json"}
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        # headers and body in one write: one segment for small responses
        buf: list[bytes] = self._headers_buffer  # type: ignore[attr-defined]
        buf.append(b"\r\n")
        if self.command != "HEAD":
            buf.append(body)
        self.flush_headers()

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
        path = self.path.split("?", 1)[0]
        m = _MODEL_RE.match(path)
        try:
            body = self._read_body()
        except ValueError as e:
            self.close_connection = True
            return self._error(413 if "exceeds" in str(e) else 400, str(e))
        if not m or m.group(3) != "/infer":
            return self._error(404, f"no such endpoint: POST {path}")
        self._infer(m.group(1), m.group(2), body)

    def _read_body(self) -> bytes:
        """The request body, by Content-Length or chunked transfer encoding, at most MAX_BODY."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            total = 0
            for _ in range(1 << 20):  # bounded: at most a million chunks
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError as e:
                    raise ValueError(f"bad chunk size line {line[:40]!r}") from e
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                total += size
                if total > MAX_BODY:
                    raise ValueError(f"chunked request body exceeds {MAX_BODY} bytes")
                parts.append(self.rfile.read(size))
                self.rfile.readline(8)
            raise ValueError("too many chunks")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError as e:
            raise ValueError("Content-Length is not a number") from e
        if length < 0 or length > MAX_BODY:
            raise ValueError(f"request body of {length} bytes exceeds {MAX_BODY}")
        return self.rfile.read(length) if length else b""

    def _infer(self, name: str, version: str | None, body: bytes) -> None:
        srv = self.server
        metrics = srv.metrics
        t0 = time.perf_counter()
        hl = self.headers.get(oip.HEADER_LENGTH)
        try:
            req = oip.parse_request(body, int(hl) if hl is not None else None)
            lm, outputs = srv.sessions.infer(name, version, req.inputs, req.outputs)
            payload, headers = oip.encode_response(lm.name, lm.version, req, outputs)
        except (oip.ProtocolError, BadInput, ValueError) as e:
            metrics.errors.labels(name, "bad_request").inc()
            return self._error(400, str(e))
        except ModelNotFound as e:
            metrics.errors.labels(name, "not_found").inc()
            return self._error(404, str(e))
        except ServerBusy as e:
            metrics.errors.labels(name, "busy").inc()
            return self._error(503, str(e))
        except ModelError as e:
            metrics.errors.labels(name, "model_error").inc()
            return self._error(500, str(e))
        self._send(200, payload, headers)
        metrics.requests.labels(name, lm.version, "binary" if hl else "json").inc()
        metrics.latency.labels(name).observe(time.perf_counter() - t0)
