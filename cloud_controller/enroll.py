"""Enrollment tokens, enrollment, certificate renewal and device revocation (the database side).

A token is ``efe_`` + 256 random bits; only its sha256 is stored (like API tokens, `auth`). It
is spent by the single UPDATE that sets ``used_at`` where it is still NULL, so two enrollments
racing with one token cannot both succeed, on SQLite or PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from edgefleet.cloud_controller import auth, pki
from edgefleet.cloud_controller.db import iso
from edgefleet.cloud_controller.models import (
    DesiredState,
    Device,
    DeviceCertificate,
    EnrollmentToken,
)
from edgefleet.wire import ids
from edgefleet.wire.brokerkind import BrokerKind, device_id_for
from edgefleet.wire.reasons import EnrollReason

TOKEN_PREFIX = "efe"
MAX_TTL_S = 30 * 24 * 3600
DEFAULT_TTL_S = 3600


class EnrollRefused(Exception):
    """Enrollment or renewal refused: ``code`` (an `EnrollReason`), HTTP ``status``, message."""

    def __init__(self, code: EnrollReason, status: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    groups: list[str]
    tags: list[str]
    certificate: x509.Certificate
    download_token: str


def create_token(
    session: Session,
    group: str,
    created_by: str,
    ttl_s: int = DEFAULT_TTL_S,
    device_id: str | None = None,
    tags: Sequence[str] = (),
    now: datetime | None = None,
) -> tuple[str, EnrollmentToken]:
    """A new enrollment token (its only plaintext copy) and its row."""
    ids.group(group)
    if device_id is not None:
        ids.device_id(device_id)
    tag_list = ids.labels(ids.TAG, list(tags))
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl must be 1..{MAX_TTL_S} seconds, got {ttl_s}")
    now = now or datetime.now(UTC)
    token = auth.new_secret(TOKEN_PREFIX)
    row = EnrollmentToken(
        token_hash=auth.hash_secret(token),
        group=group,
        device_id=device_id,
        tags=sorted(set(tag_list)),
        created_at=now,
        created_by=created_by[:200],
        expires_at=now + timedelta(seconds=ttl_s),
    )
    session.add(row)
    session.flush()
    return token, row


def token_to_dict(row: EnrollmentToken) -> dict[str, Any]:
    return {
        "id": row.id,
        "group": row.group,
        "device_id": row.device_id,
        "tags": row.tags,
        "created_at": iso(row.created_at),
        "created_by": row.created_by,
        "expires_at": iso(row.expires_at),
        "used_at": iso(row.used_at) if row.used_at else None,
        "used_by": row.used_by,
    }


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)  # SQLite drops the zone


def spend_token(session: Session, token: str, device_id: str, now: datetime) -> EnrollmentToken:
    """Check ``token`` for ``device_id`` and mark it used, once; `EnrollRefused` otherwise."""
    if not token.startswith(TOKEN_PREFIX + "_"):
        raise EnrollRefused(EnrollReason.TOKEN_INVALID, 401, "not an enrollment token (efe_…)")
    row = session.scalar(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == auth.hash_secret(token))
    )
    if row is None:
        raise EnrollRefused(EnrollReason.TOKEN_INVALID, 401, "unknown enrollment token")
    if row.used_at is not None:
        raise EnrollRefused(
            EnrollReason.TOKEN_USED,
            409,
            f"this enrollment token was used at {iso(row.used_at)}: tokens are one-time",
        )
    if _aware(row.expires_at) <= now:
        raise EnrollRefused(
            EnrollReason.TOKEN_EXPIRED,
            401,
            f"this enrollment token expired at {iso(row.expires_at)}",
        )
    if row.device_id is not None and row.device_id != device_id:
        raise EnrollRefused(
            EnrollReason.DEVICE_MISMATCH,
            403,
            f"this enrollment token is for device {row.device_id!r}, not {device_id!r}",
        )
    spent = session.execute(
        update(EnrollmentToken)
        .where(EnrollmentToken.id == row.id, EnrollmentToken.used_at.is_(None))
        .values(used_at=now, used_by=device_id)
    )
    if getattr(spent, "rowcount", 0) != 1:
        raise EnrollRefused(EnrollReason.TOKEN_USED, 409, "this enrollment token was just used")
    session.refresh(row)
    return row


def record_certificate(session: Session, device_id: str, cert: x509.Certificate) -> None:
    session.add(
        DeviceCertificate(
            serial=f"{cert.serial_number:x}",
            device_id=device_id,
            issued_at=datetime.now(UTC),
            not_after=cert.not_valid_after_utc,
        )
    )
    session.flush()


def enroll(
    session: Session,
    ca: pki.CertificateAuthority,
    token: str,
    device_id: str,
    csr_pem: str,
    validity: timedelta,
    now: datetime | None = None,
    *,
    broker_kind: BrokerKind = "mqtt",
) -> Enrolled:
    """Spend ``token``, register ``device_id`` and issue its certificate from ``csr_pem``.

    Everything is checked before the token is spent (a typo in the device id does not burn
    it); the caller's transaction makes the rest all-or-nothing."""
    now = now or datetime.now(UTC)
    try:
        device_id_for(broker_kind, device_id)  # on NATS also without '.' (wire.brokerkind)
    except ids.IdentifierError as e:
        raise EnrollRefused(EnrollReason.INVALID_DEVICE_ID, 422, str(e)) from e
    try:
        csr = pki.check_csr(csr_pem, device_id)
    except pki.PkiError as e:
        raise EnrollRefused(EnrollReason(e.code), 422, str(e)) from e
    known = session.get(Device, device_id)
    if known is not None and known.registered:
        raise EnrollRefused(
            EnrollReason.DEVICE_EXISTS,
            409,
            f"{device_id} is a registered device; `edgefleet devices revoke {device_id}` first "
            "to enroll it again",
        )
    row = spend_token(session, token, device_id, now)
    creds = auth.register_device(
        session, device_id, [row.group], list(row.tags), now=now, mqtt_password=False
    )
    dev = session.get(Device, device_id)
    assert dev is not None
    dev.revoked_at = None
    cert = ca.sign_csr(csr, now, validity)
    record_certificate(session, device_id, cert)
    return Enrolled(device_id, list(dev.groups), list(dev.tags), cert, creds.download_token)


def renew(
    session: Session,
    ca: pki.CertificateAuthority,
    device: Device,
    csr_pem: str,
    validity: timedelta,
    now: datetime | None = None,
) -> x509.Certificate:
    """A new certificate for an enrolled device (authenticated by the caller) from its CSR."""
    if device.revoked_at is not None or not device.registered:
        raise EnrollRefused(EnrollReason.DEVICE_REVOKED, 403, f"{device.id} is revoked")
    try:
        csr = pki.check_csr(csr_pem, device.id)
    except pki.PkiError as e:
        raise EnrollRefused(EnrollReason(e.code), 422, str(e)) from e
    cert = ca.sign_csr(csr, now or datetime.now(UTC), validity)
    record_certificate(session, device.id, cert)
    return cert


def revoke_device(session: Session, device_id: str, now: datetime | None = None) -> Device | None:
    """Cut ``device_id`` off: its credentials are cleared, every certificate it holds is
    revoked (the CRL must be rewritten after the commit: `revoked_serials`), and its desired
    state is withdrawn. None when there is no such device."""
    now = now or datetime.now(UTC)
    dev = session.get(Device, device_id)
    if dev is None:
        return None
    dev.registered = False
    dev.revoked_at = now
    dev.mqtt_password_hash = None
    dev.download_token_hash = None
    session.execute(
        update(DeviceCertificate)
        .where(DeviceCertificate.device_id == device_id, DeviceCertificate.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    session.execute(delete(DesiredState).where(DesiredState.device_id == device_id))
    session.flush()
    return dev


def revoked_serials(session: Session, now: datetime | None = None) -> list[tuple[int, datetime]]:
    """(serial, revoked at) of every revoked certificate that has not expired yet (an
    expired certificate is refused by its dates alone, so the CRL stays short)."""
    now = now or datetime.now(UTC)
    rows = session.execute(
        select(
            DeviceCertificate.serial, DeviceCertificate.revoked_at, DeviceCertificate.not_after
        ).where(DeviceCertificate.revoked_at.is_not(None))
    ).all()
    return [(int(s, 16), _aware(r)) for s, r, n in rows if r is not None and _aware(n) > now]
