"""Device inventory: presence messages, groups and tags, last seen."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.db import iso
from edgefleet.cloud_controller.models import DesiredState, Device
from edgefleet.cloud_controller.rollout_engine import DeviceInfo


def get_or_create(session: Session, device_id: str) -> Device:
    dev = session.get(Device, device_id)
    if dev is None:
        dev = Device(
            id=device_id,
            registered=False,
            groups=[],
            tags=[],
            online=False,
            execution_providers=[],
            profiles=[],
            hardware={},
            installed={},
            recent_status_seqs=[],
        )
        session.add(dev)
        # Flush now so the row is in the identity map: callers (the MQTT bridge) run whole
        # batches with autoflush off, and a second lookup would otherwise insert it again.
        session.flush()
    return dev


SEQ_WINDOW = 128


def accept_seq(
    last: int | None, recent: list[int], seq: int, window: int = SEQ_WINDOW
) -> tuple[bool, int, list[int]]:
    """Duplicate check for a device's status seq (pure): (new?, highest seq, recent seqs).

    A set of the last `window` seqs rather than a high-water mark, so that a report re-sent
    after a reconnect (older seq, never seen) still counts, while a repeat does not. Anything
    older than the window is taken as seen.
    """
    if seq in recent or (last is not None and seq <= last - window):
        return False, last if last is not None else seq, recent
    top = seq if last is None else max(last, seq)
    kept = sorted(s for s in (*recent, seq) if s > top - window)
    return True, top, kept


def _str_list(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def apply_presence(
    session: Session, device_id: str, msg: dict[str, Any], now: datetime | None = None
) -> Device:
    """Update the inventory from a presence message (an offline will carries only `online`)."""
    dev = get_or_create(session, device_id)
    dev.online = bool(msg.get("online", False))
    dev.last_seen = now or datetime.now(UTC)
    if dev.online:
        if "agent_version" in msg:
            dev.agent_version = str(msg["agent_version"])[:64]
        if "execution_providers" in msg:
            dev.execution_providers = _str_list(msg["execution_providers"])
        if "profiles" in msg:
            dev.profiles = _str_list(msg["profiles"])
        if isinstance(msg.get("hardware"), dict):
            dev.hardware = msg["hardware"]
        if isinstance(msg.get("installed"), dict):
            dev.installed = msg["installed"]
    return dev


def set_labels(
    session: Session,
    device_id: str,
    groups: list[str] | None = None,
    tags: list[str] | None = None,
) -> Device:
    dev = get_or_create(session, device_id)
    if groups is not None:
        dev.groups = sorted(set(groups))
    if tags is not None:
        dev.tags = sorted(set(tags))
    return dev


def to_dict(dev: Device, desired: DesiredState | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "device_id": dev.id,
        "registered": dev.registered,
        "online": dev.online,
        "agent_version": dev.agent_version,
        "execution_providers": dev.execution_providers,
        "profiles": dev.profiles,
        "hardware": dev.hardware,
        "installed": dev.installed,
        "groups": dev.groups,
        "tags": dev.tags,
        "last_seen": iso(dev.last_seen) if dev.last_seen else None,
        "last_status": dev.last_status,
    }
    if desired is not None:
        out["desired"] = {
            "seq": desired.seq,
            "models": desired.models,
            "remove": desired.remove or [],
        }
    return out


def list_devices(session: Session) -> list[Device]:
    return list(session.scalars(select(Device).order_by(Device.id)))


def device_infos(session: Session, model: str) -> list[DeviceInfo]:
    """Inventory as the rollout engine sees it; the previous version is the desired one if
    the controller set one, else what the device reports installed."""
    desired = {d.device_id: d for d in session.scalars(select(DesiredState))}
    infos = []
    for dev in list_devices(session):
        prev: str | None = None
        ds = desired.get(dev.id)
        if ds is not None and model in ds.models:
            prev = ds.models[model].get("version")
        elif isinstance(dev.installed.get(model), dict):
            prev = dev.installed[model].get("version")
        infos.append(
            DeviceInfo(dev.id, tuple(dev.profiles), tuple(dev.groups), tuple(dev.tags), prev)
        )
    return infos
