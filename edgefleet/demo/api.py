"""A small client of the controller's HTTP API for the fleet harness (standard library only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from edgefleet.demo.spec import FleetError


class ApiError(FleetError):
    """The controller answered with an HTTP error."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class Api:
    """The controller at ``base``, called with an admin bearer ``token``."""

    base: str
    token: str

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        timeout: float = 60.0,
    ) -> Any:
        """``body`` goes as JSON, ``raw`` as octet-stream; returns the decoded JSON answer."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = (
                "application/octet-stream" if raw is not None else "application/json"
            )
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from e
        return json.loads(payload) if payload else None

    def healthy(self) -> bool:
        """Whether ``/healthz`` answers 200 now."""
        try:
            with urllib.request.urlopen(self.base + "/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False
