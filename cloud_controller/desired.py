"""Per-device desired state: signed, sequence numbered, persisted, published retained QoS 1;
and how far each device is from it ("in sync": desired vs reported, since when)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.db import iso
from edgefleet.cloud_controller.devices import id_in
from edgefleet.cloud_controller.models import DesiredState, Device, DeviceSeqFloor

Publish = Callable[[str, bytes], None]  # (topic, payload): retained, QoS 1


@dataclass(frozen=True)
class Signer:
    key: ec.EllipticCurvePrivateKey
    ttl: timedelta


@dataclass
class Known:
    """The desired-state rows and seq floors of a batch of devices, loaded by the caller in a
    few queries (rollout waves: thousands of devices). Without it each device costs a query
    per row it does not have yet (``session.get`` of an absent row always asks the database)
    and a flush; with it, the rows issued are flushed with the transaction."""

    rows: dict[str, DesiredState | None]
    floors: dict[str, int]


def _issue(
    session: Session,
    signer: Signer,
    device_id: str,
    models: dict[str, Any],
    now: datetime,
    remove: list[str] | None = None,
    known: Known | None = None,
) -> DesiredState:
    from edgefleet.wire.manifest import format_time
    from edgefleet.wire.mqtt import sign_desired

    if known is not None and device_id not in known.rows:
        known = None  # a device the caller did not load: the database is asked
    if known is not None:
        row, floor = known.rows[device_id], known.floors.get(device_id, 0)
    else:
        row, floor = session.get(DesiredState, device_id), seq_floor(session, device_id)
    # Above the controller's last seq and above what the device reports holding: a database
    # restored from a backup must not issue states the device drops as replays.
    seq = max(row.seq if row is not None else 0, floor) + 1
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
    if known is not None:
        known.rows[device_id] = row  # the next lookup of this batch finds it (no flush)
    else:
        session.flush()
    dev = session.get(Device, device_id)
    if dev is not None:
        note_sync(dev, row, now)
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
    known: Known | None = None,
) -> DesiredState:
    """Set one model of a device's desired state; seq + 1.

    `entry=None` drops the model from `models` (the device leaves it alone); with
    `uninstall=True` it also goes into the explicit `remove` list, which asks the device to
    unload and delete it. Setting an entry takes the model off `remove` again.
    """
    if known is not None and device_id in known.rows:
        row = known.rows[device_id]
    else:
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
        session,
        signer,
        device_id,
        models,
        now or datetime.now(UTC),
        remove=sorted(remove),
        known=known,
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


# --- in sync: desired vs reported -------------------------------------------------------------


def _version(info: object) -> str | None:
    v = info.get("version") if isinstance(info, Mapping) else info
    return v if isinstance(v, str) else None


def sync_diff(
    models: Mapping[str, Any] | None,
    remove: Collection[str] | None,
    installed: Mapping[str, Any] | None,
) -> list[dict[str, str | None]]:
    """The models whose installed version is not the desired one (pure): a desired model at
    another version or missing, a model to remove that is still there. Models the controller
    does not name are the device's own business and never differ."""
    have = {name: _version(info) for name, info in (installed or {}).items()}
    out: list[dict[str, str | None]] = []
    for name, entry in sorted((models or {}).items()):
        want = _version(entry)
        if have.get(name) != want:
            out.append({"model": name, "desired": want, "installed": have.get(name)})
    for name in sorted(remove or ()):
        if name in have:
            out.append({"model": name, "desired": None, "installed": have[name]})
    return out


def note_sync(dev: Device, row: DesiredState | None, now: datetime) -> None:
    """Keep `dev.out_of_sync_since`: set when it first differs from its desired state, cleared
    when it matches again (called whenever either side changes)."""
    differs = row is not None and bool(sync_diff(row.models, row.remove, dev.installed))
    if not differs:
        dev.out_of_sync_since = None
    elif dev.out_of_sync_since is None:
        dev.out_of_sync_since = now


def note_sync_many(session: Session, device_ids: Collection[str], now: datetime) -> None:
    """`note_sync` for these devices (one query for their desired states, one for them)."""
    if not device_ids:
        return
    rows = {
        r.device_id: r
        for r in session.scalars(
            select(DesiredState).where(id_in(DesiredState.device_id, device_ids, session))
        )
    }
    # one query for the devices too (one already in the session comes back as it is there)
    for dev in session.scalars(select(Device).where(id_in(Device.id, device_ids, session))):
        note_sync(dev, rows.get(dev.id), now)


def sync_view(dev: Device, row: DesiredState | None) -> dict[str, Any]:
    """The "in sync" column: managed (has a desired state), in sync, since when not, and each
    model that differs (a version the device installed by hand is flagged `local`; one whose
    way back to the desired version failed, `rollback_failed`)."""
    if row is None:
        return {"managed": False, "in_sync": True, "since": None, "models": [], "text": "-"}
    diff: list[dict[str, Any]] = [dict(d) for d in sync_diff(row.models, row.remove, dev.installed)]
    last = dev.last_status if isinstance(dev.last_status, dict) else {}
    for d in diff:
        same = last.get("model") == d["model"]
        d["local"] = bool(last.get("local") and same and last.get("version") == d["installed"])
        d["rollback_failed"] = bool(same and last.get("state") == "ROLLBACK_FAILED")
    since = dev.out_of_sync_since if diff else None
    view: dict[str, Any] = {
        "managed": True,
        "in_sync": not diff,
        "since": iso(since) if since is not None else None,
        "models": diff,
    }
    view["text"] = sync_text(view)
    return view


def sync_text(view: Mapping[str, Any]) -> str:
    """One cell for tables: ``yes``, ``-`` (no desired state) or what differs and since when."""
    if not view.get("managed"):
        return "-"
    if view.get("in_sync"):
        return "yes"
    parts = [
        f"{d['model']} {d['installed'] or 'none'}≠{d['desired'] or 'removed'}"
        + (" (local install)" if d.get("local") else "")
        + (" (ROLLBACK FAILED)" if d.get("rollback_failed") else "")
        for d in view.get("models", [])
    ]
    since = view.get("since")
    return "no: " + ", ".join(parts) + (f" since {str(since)[:19]}" if since else "")


def seq_floor(session: Session, device_id: str) -> int:
    """The lowest seq a new desired state for `device_id` may not go below (0: none known)."""
    f = session.get(DeviceSeqFloor, device_id)
    return f.floor if f is not None else 0


def resync(
    session: Session, signer: Signer, now: datetime, device_ids: Collection[str] | None = None
) -> list[DesiredState]:
    """Issue each stale device's current desired state again (same models, same removals):
    every new state continues above the device's floor (`desired` reads it), so the device
    accepts it instead of dropping it as a replay. The rows issued, to publish."""
    from edgefleet.cloud_controller.devices import stale_sequences

    stale = stale_sequences(session)
    out = []
    for device_id in sorted(stale):
        if device_ids is not None and device_id not in device_ids:
            continue
        row = session.get(DesiredState, device_id, with_for_update=True)
        if row is None:
            continue  # nothing to resend; its next state starts above the floor anyway
        out.append(
            _issue(session, signer, device_id, dict(row.models), now, list(row.remove or ()))
        )
        f = session.get(DeviceSeqFloor, device_id)
        if f is not None:
            f.resynced_at = now
    return out
