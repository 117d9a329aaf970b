"""Local admin endpoint: loopback HTTP, bearer token from DATA_DIR/admin.token (mode 0600).

POST /admin/updates {model?, version?, source, sha256?, size?, rollout_id?, allow_downgrade?,
                     max_p95_ratio?}
GET  /admin/updates/ID, GET /admin/updates, GET /admin/status. The bound port goes to
DATA_DIR/admin.json so that `edgefleet agent install/status` find it.
"""

from __future__ import annotations

import hmac
import json
import math
import os
import re
import secrets
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from edgefleet.agent.fsio import atomic_write_bytes, atomic_write_json
from edgefleet.agent.ports import AdminPort
from edgefleet.agent.server import CappedServer
from edgefleet.agent.update.events import UpdateRequest

MAX_BODY = 64 * 1024
_UPDATE_RE = re.compile(r"^/admin/updates/([A-Za-z0-9T_-]+)$")
_MODEL_RE = re.compile(r"^/admin/models/([A-Za-z0-9][A-Za-z0-9._-]{0,127})$")


def _ratio(value: object) -> float | None:
    """An optional positive, finite probation latency ratio."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("'max_p95_ratio' must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError("'max_p95_ratio' must be a positive, finite number")
    return float(value)


def ensure_token(path: Path) -> str:
    """The admin token, created (random, 0600) when absent."""
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    atomic_write_bytes(path, token.encode(), mode=0o600)
    return token


class AdminServer(CappedServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, agent: AdminPort) -> None:
        cfg = agent.config
        if cfg.admin_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"admin_host {cfg.admin_host!r} is not a loopback address")
        super().__init__(
            (cfg.admin_host, cfg.admin_port),
            _Handler,
            max_connections=cfg.admin_max_connections,
            timeout_s=cfg.admin_timeout_s,
        )
        self.agent = agent
        self.token = ensure_token(cfg.admin_token_path)
        atomic_write_json(
            cfg.admin_info_path,
            {"host": cfg.admin_host, "port": self.server_address[1], "pid": os.getpid()},
        )

    def forget(self) -> None:
        self.agent.config.admin_info_path.unlink(missing_ok=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: AdminServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def _json(self, status: int, obj: object) -> None:
        """``obj``: JSON values and the TypedDict views of `agent.ports`; others as str()."""
        body = json.dumps(obj, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        got = self.headers.get("Authorization", "")
        want = f"Bearer {self.server.token}"
        if hmac.compare_digest(got.encode(), want.encode()):
            return True
        self._json(401, {"error": "missing or wrong admin token"})
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        agent = self.server.agent
        if self.path == "/admin/status":
            return self._json(200, {**agent.inventory(), "updates": agent.updates(10)})
        if self.path == "/admin/updates":
            return self._json(200, agent.updates(50))
        m = _UPDATE_RE.match(self.path)
        if m:
            view = agent.update(m.group(1))
            if view is None:
                return self._json(404, {"error": f"no update {m.group(1)}"})
            return self._json(200, view)
        self._json(404, {"error": f"no such endpoint: GET {self.path}"})

    def do_DELETE(self) -> None:
        """``DELETE /admin/models/NAME``: uninstall a model (an update record; 202 + its id)."""
        if not self._authorized():
            return
        m = _MODEL_RE.match(self.path)
        if not m:
            return self._json(404, {"error": f"no such endpoint: DELETE {self.path}"})
        try:
            uid = self.server.agent.remove_model(m.group(1))
        except ValueError as e:
            return self._json(400, {"error": str(e)})
        self._json(202, {"id": uid})

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if 0 < length <= MAX_BODY else b""
        if not self._authorized():
            return
        if self.path != "/admin/updates":
            return self._json(404, {"error": f"no such endpoint: POST {self.path}"})
        try:
            d = json.loads(body)
            if not isinstance(d, dict) or not isinstance(d.get("source"), str):
                raise ValueError("'source' (a URL or path) is required")
            req = UpdateRequest(
                model=str(d.get("model") or ""),
                version=str(d.get("version") or ""),
                source=d["source"],
                sha256=d.get("sha256"),
                size=int(d["size"]) if d.get("size") is not None else None,
                rollout_id=d.get("rollout_id"),
                allow_downgrade=bool(d.get("allow_downgrade", False)),
                max_p95_ratio=_ratio(d.get("max_p95_ratio")),
            )
        except (ValueError, TypeError) as e:
            return self._json(400, {"error": f"bad update request: {e}"})
        uid = self.server.agent.submit_update(req)
        self._json(202, {"id": uid})
