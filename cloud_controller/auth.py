"""API tokens with roles, per-device credentials, and Mosquitto password/ACL files.

Tokens are 256-bit random strings, so a plain sha256 is enough to store them: nobody can
brute-force a 2^256 space, and a fast hash lets every request look its token up by index.
(A slow KDF only matters for low-entropy secrets such as human passwords.)
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.models import ApiToken, Device
from edgefleet.wire import ids

CONTROLLER_MQTT_USER = ids.CONTROLLER_USER
TOPIC_ROOT = "edgefleet/v1"


class Role(StrEnum):
    ADMIN = "admin"
    PUBLISHER = "publisher"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Perm(StrEnum):
    READ = "read"
    UPLOAD = "upload"  # packages
    OPERATE = "operate"  # devices and rollouts
    ADMIN = "admin"  # tokens, audit log


ROLE_PERMS: dict[Role, frozenset[Perm]] = {
    Role.VIEWER: frozenset({Perm.READ}),
    Role.PUBLISHER: frozenset({Perm.READ, Perm.UPLOAD}),
    Role.OPERATOR: frozenset({Perm.READ, Perm.OPERATE}),
    Role.ADMIN: frozenset(Perm),
}


def allowed(role: str, perm: Perm) -> bool:
    try:
        return perm in ROLE_PERMS[Role(role)]
    except ValueError:
        return False


def new_secret(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, role: str, name: str, now: datetime | None = None) -> str:
    """Store a new token (hashed) and return its only plaintext copy."""
    role = Role(role).value
    ids.token_name(name)  # shown in every audit entry as the actor: one line, one grammar
    token = new_secret("eft")
    session.add(
        ApiToken(
            name=name, role=role, token_hash=hash_secret(token), created_at=now or datetime.now(UTC)
        )
    )
    session.flush()
    return token


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, token_id: int, now: datetime | None = None) -> ApiToken | None:
    """Mark token ``token_id`` revoked (kept for the audit trail); None when there is none."""
    row = session.get(ApiToken, token_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = now or datetime.now(UTC)
        session.flush()
    return row


def token_to_dict(row: ApiToken) -> dict[str, object]:
    from edgefleet.cloud_controller.db import iso

    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "created_at": iso(row.created_at),
        "revoked_at": iso(row.revoked_at) if row.revoked_at else None,
    }


def lookup_token(session: Session, token: str) -> ApiToken | None:
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(token)))
    if row is None or row.revoked_at is not None:
        return None
    return row


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2 password-file hash (`$7$`: PBKDF2-HMAC-SHA512), so no plaintext is kept."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    salt_b64, digest_b64 = (base64.b64encode(b).decode() for b in (salt, digest))
    return f"$7${iterations}${salt_b64}${digest_b64}"


@dataclass(frozen=True)
class DeviceCredentials:
    device_id: str
    mqtt_username: str
    mqtt_password: str
    download_token: str


def register_device(
    session: Session,
    device_id: str,
    groups: list[str] | None = None,
    tags: list[str] | None = None,
    now: datetime | None = None,
    *,
    mqtt_password: bool = True,
) -> DeviceCredentials:
    """Create (or re-key) a device; the plaintext credentials are returned once.

    ``mqtt_password=False`` (an enrolled device, which authenticates to the broker with its
    certificate): no broker password is made, and any old one is cleared."""
    ids.device_id(device_id)  # the grammar of wire.ids: no newline, ':', '/', '+', '#', ...
    groups = ids.labels(ids.GROUP, groups) if groups is not None else None
    tags = ids.labels(ids.TAG, tags) if tags is not None else None
    now = now or datetime.now(UTC)
    dev = session.get(Device, device_id)
    if dev is None:
        dev = Device(
            id=device_id,
            groups=[],
            tags=[],
            execution_providers=[],
            profiles=[],
            hardware={},
            installed={},
            online=False,
            recent_status_seqs=[],
        )
        try:
            with session.begin_nested():  # the device's first presence may insert it meanwhile
                session.add(dev)
        except IntegrityError:
            found = session.get(Device, device_id)
            if found is None:
                raise
            dev = found
    password, token = (new_secret("efm") if mqtt_password else ""), new_secret("efd")
    dev.registered = True
    dev.registered_at = now
    dev.revoked_at = None
    dev.mqtt_password_hash = mosquitto_hash(password) if mqtt_password else None
    dev.download_token_hash = hash_secret(token)
    if groups is not None:
        dev.groups = sorted(set(groups))
    if tags is not None:
        dev.tags = sorted(set(tags))
    session.flush()
    return DeviceCredentials(device_id, device_id, password, token)


def device_for_download_token(session: Session, token: str) -> Device | None:
    return session.scalar(select(Device).where(Device.download_token_hash == hash_secret(token)))


_MOSQUITTO_HASH = re.compile(
    r"\$7\$[0-9]{1,7}\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}", re.ASCII
)


class GeneratedFileError(ValueError):
    """A value that would change a generated file's meaning (a new line, a new user)."""


def _config_value(what: str, value: str, grammar: re.Pattern[str] | None = None) -> str:
    """A value for a line of a generated Mosquitto file: refused, never escaped, when it could
    end the line or start a directive."""
    if grammar is not None and grammar.fullmatch(value) is None:
        raise GeneratedFileError(f"{what} {value!r} is not allowed in a generated Mosquitto file")
    if any(c in value for c in "\r\n\x00") or value != value.strip():
        raise GeneratedFileError(f"{what} {value!r} would add a line to a generated Mosquitto file")
    return value


def mosquitto_acl(controller_user: str = CONTROLLER_MQTT_USER) -> str:
    """ACL text: the controller reads/writes everything; a device (user = its id) only its own."""
    _config_value("controller user", controller_user, ids.DEVICE_ID.pattern)
    dev = f"{TOPIC_ROOT}/devices/%u"
    return "\n".join(
        [
            "# generated by `edgefleet controller mosquitto-config`",
            f"user {controller_user}",
            f"topic readwrite {TOPIC_ROOT}/#",
            "",
            "# every other user is a device whose username is its device id",
            f"pattern read {dev}/desired",
            f"pattern read {dev}/ack",  # the controller's acknowledgements (wire.mqtt)
            f"pattern write {dev}/status",
            f"pattern write {dev}/telemetry",
            f"pattern write {dev}/capture",  # opt-in captured rows (docs/capture.md)
            f"pattern write {dev}/presence",
            "",
        ]
    )


def mosquitto_passwords(
    session: Session, controller_password: str, controller_user: str = CONTROLLER_MQTT_USER
) -> str:
    """Password file text for the controller and every registered device.

    Each line is ``user:hash``; every user is checked again against the device id grammar
    (a row written before the grammar existed, or by hand, is refused here, not copied) and
    every hash against Mosquitto's ``$7$`` form, so that no value can add a line or a user.
    The controller's user appears once, and no device may take its name.
    """
    _config_value("controller user", controller_user, ids.DEVICE_ID.pattern)
    lines = [f"{controller_user}:{mosquitto_hash(controller_password)}"]
    rows = session.scalars(
        select(Device).where(Device.mqtt_password_hash.is_not(None)).order_by(Device.id)
    )
    for d in rows:
        try:
            ids.device_id(d.id)
        except ids.IdentifierError as e:
            raise GeneratedFileError(f"refusing to write the password file: {e}") from e
        if d.id == controller_user:
            raise GeneratedFileError(f"device {d.id!r} takes the controller's broker user")
        lines.append(
            f"{_config_value('device id', d.id)}:"
            f"{_config_value(f'password hash of {d.id!r}', str(d.mqtt_password_hash), _MOSQUITTO_HASH)}"
        )
    return "\n".join(lines) + "\n"
