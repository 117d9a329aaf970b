"""FastAPI dependencies shared by every router (the drift and dashboard routers included).

`app.state.controller` is the running `cloud_controller.controller.Controller`; `session` yields a
SQLAlchemy session on its database; `need(Perm.X)` authenticates the bearer token and checks
its role, returning the `Principal`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.auth import Perm, allowed, device_for_download_token, lookup_token

if TYPE_CHECKING:
    from edgefleet.cloud_controller.controller import Controller


@dataclass(frozen=True)
class Principal:
    actor: str  # "token:NAME#ID" or "device:ID"
    role: str  # a Role value, or "device"
    device_id: str | None = None


def controller(request: Request) -> Controller:
    return request.app.state.controller  # type: ignore[no-any-return,unused-ignore]


def session(request: Request) -> Iterator[Session]:
    with controller(request).factory() as s:
        yield s


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _error(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message})


def authenticate(request: Request, *, devices_ok: bool = False) -> Principal:
    token = _bearer(request)
    if token is None:
        raise _error(401, "unauthenticated", "send Authorization: Bearer <token>")
    with controller(request).factory() as s:
        row = lookup_token(s, token)
        if row is not None:
            p = Principal(f"token:{row.name}#{row.id}", row.role)
        elif devices_ok and (dev := device_for_download_token(s, token)) is not None:
            p = Principal(f"device:{dev.id}", "device", dev.id)
        else:
            raise _error(401, "invalid_token", "unknown or revoked token")
    request.state.actor = p.actor
    return p


def need(perm: Perm, *, devices_ok: bool = False) -> Callable[[Request], Principal]:
    """Dependency: a token whose role grants `perm` (or a device token, when `devices_ok`)."""

    def dep(request: Request) -> Principal:
        p = authenticate(request, devices_ok=devices_ok)
        if p.role == "device" or allowed(p.role, perm):
            return p
        raise _error(403, "forbidden", f"role {p.role} may not {perm.value}")

    return dep


def audit_detail(request: Request, **detail: Any) -> None:
    """Extra facts for this request's audit-log entry (ids created, counts)."""
    current = getattr(request.state, "audit", None) or {}
    current.update(detail)
    request.state.audit = current
