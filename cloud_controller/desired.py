"""Per-device desired state: signed, sequence numbered, persisted, published retained QoS 1."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.models import DesiredState

Publish = Callable[[str, bytes], None]  # (topic, payload): retained, QoS 1


@dataclass(frozen=True)
class Signer:
    key: ec.EllipticCurvePrivateKey
    ttl: timedelta


def _issue(
    session: Session,
    signer: Signer,
    device_id: str,
    models: dict[str, Any],
    now: datetime,
    remove: list[str] | None = None,
) -> DesiredState:
    from edgefleet.cloud_controller.devices import seq_floor
    from edgefleet.wire.manifest import format_time
    from edgefleet.wire.mqtt import sign_desired

    row = session.get(DesiredState, device_id)
    # Above the controller's last seq and above what the device reports holding: a database
    # restored from a backup must not issue states the device drops as replays.
    seq = max(row.seq if row is not None else 0, seq_floor(session, device_id)) + 1
    expires = now + signer.ttl
    state = {
        "device_id": device_id,
        "seq": seq,
        "issued_at": format_time(now),
        "expires_at": format_time(expires),
        "models": models,
    }
    remove = sorted(set(remove or ()) - set(models))
    if remove:  # absent when empty: a device without removal support sees no change
        state["remove"] = remove
    envelope = sign_desired(state, signer.key)
    if row is None:
        row = DesiredState(device_id=device_id)
        session.add(row)
    row.seq, row.models, row.issued_at, row.expires_at = seq, models, now, expires
    row.remove = remove or None
    row.envelope, row.published = envelope, False
    session.flush()
    return row


def set_model(
    session: Session,
    signer: Signer,
    device_id: str,
    model: str,
    entry: dict[str, Any] | None,
    now: datetime | None = None,
    *,
    uninstall: bool = False,
) -> DesiredState:
    """Set one model of a device's desired state; seq + 1.

    `entry=None` drops the model from `models` (the device leaves it alone); with
    `uninstall=True` it also goes into the explicit `remove` list, which asks the device to
    unload and delete it. Setting an entry takes the model off `remove` again.
    """
    row = session.get(DesiredState, device_id)
    models = dict(row.models) if row is not None else {}
    remove = set(row.remove or ()) if row is not None else set()
    if entry is None:
        models.pop(model, None)
        if uninstall:
            remove.add(model)
    else:
        models[model] = entry
        remove.discard(model)
    return _issue(
        session, signer, device_id, models, now or datetime.now(UTC), remove=sorted(remove)
    )


def refresh_expiring(session: Session, signer: Signer, now: datetime) -> list[DesiredState]:
    """Re-sign states that pass half their lifetime, so an offline device never finds an expired
    retained state when it comes back."""
    limit = now + signer.ttl / 2
    rows = list(session.scalars(select(DesiredState).where(DesiredState.expires_at < limit)))
    return [
        _issue(session, signer, r.device_id, dict(r.models), now, remove=list(r.remove or ()))
        for r in rows
    ]


def publish_rows(rows: list[DesiredState], publish: Publish) -> None:
    from edgefleet.wire.mqtt import topic

    for row in rows:
        publish(topic(row.device_id, "desired"), row.envelope)
