"""Device inventory: presence messages, groups and tags, last seen."""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import String, Table, any_, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.db import iso
from edgefleet.cloud_controller.models import DesiredState, Device, DeviceSeqFloor
from edgefleet.cloud_controller.rollout_engine import DeviceInfo
from edgefleet.wire import ids
from edgefleet.wire.presence import InstalledModel, Presence
from edgefleet.wire.presence import parse as parse_presence

# What a device row holds before anything is known of the device: the ORM's new rows
# (`get_or_create`) and the bulk INSERTs below are written from this one table.
_NEW_ROW: dict[str, Any] = {
    "registered": False,
    "groups": [],
    "tags": [],
    "online": False,
    "execution_providers": [],
    "profiles": [],
    "hardware": {},
    "installed": {},
    "recent_status_seqs": [],
}


def _literals(sqlite: bool) -> str:
    """`_NEW_ROW`'s values as SQL literals (constants of this module: nothing from outside)."""
    out = []
    for v in _NEW_ROW.values():
        if isinstance(v, bool):
            out.append(("1" if v else "0") if sqlite else ("true" if v else "false"))
        else:
            out.append(f"'{json.dumps(v)}'")
    return ", ".join(out)


_COLUMNS = ", ".join(_NEW_ROW)
# PostgreSQL: the ids as one array parameter, so the statement's text is the same for every
# batch (an ``IN`` of 500 placeholders, or 500 rows of VALUES, is compiled by SQLAlchemy and
# split by psycopg again each time: that was most of the bridge's time on PostgreSQL).
_PG_ENSURE = text(
    f"INSERT INTO devices (id, {_COLUMNS}) SELECT i, {_literals(sqlite=False)}"
    " FROM unnest(CAST(:ids AS varchar[])) AS i ON CONFLICT (id) DO NOTHING"
)
_SQLITE_ENSURE = text(
    f"INSERT INTO devices (id, {_COLUMNS}) VALUES (:id, {_literals(sqlite=True)})"
    " ON CONFLICT (id) DO NOTHING"
)
_PG_LOCK = text(
    "SELECT id FROM devices WHERE id = ANY(CAST(:ids AS varchar[])) ORDER BY id FOR UPDATE"
)


def ensure_rows(session: Session, device_ids: Collection[str]) -> None:
    """An inventory row for each of these (checked) ids, created if absent without failing when
    another replica creates it at the same moment (``ON CONFLICT DO NOTHING``); one statement
    on PostgreSQL, one executemany on SQLite."""
    ids_ = sorted({ids.device_id(d) for d in device_ids})
    if not ids_:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(_PG_ENSURE, {"ids": ids_})
        return
    if dialect == "sqlite":
        session.execute(_SQLITE_ENSURE, [{"id": d} for d in ids_])
        return
    for d in ids_:  # elsewhere: the ORM's way, one device at a time
        get_or_create(session, d)


def lock_rows(session: Session, device_ids: Collection[str]) -> None:
    """PostgreSQL: lock these devices' rows (``FOR UPDATE``) in id order, so that replicas
    sharing the reports apply one device's reports one after the other (seq dedupe, installed)
    and never wait on each other in a cycle."""
    if device_ids and session.get_bind().dialect.name == "postgresql":
        session.execute(_PG_LOCK, {"ids": sorted(set(device_ids))})


def id_in(column: Any, device_ids: Collection[str], session: Session) -> Any:
    """``column IN ids`` as one array parameter on PostgreSQL (`_PG_ENSURE` says why)."""
    ids_ = sorted(set(device_ids))
    if session.get_bind().dialect.name == "postgresql":
        return column == any_(bindparam(None, ids_, type_=ARRAY(String)))
    return column.in_(ids_)


def touch(session: Session, device_ids: Collection[str], now: datetime) -> None:
    """``last_seen = now`` for these devices, in one UPDATE (telemetry: no other column moves,
    so the rows are not loaded)."""
    if device_ids:
        table = cast(Table, Device.__table__)
        session.execute(
            update(table).where(id_in(table.c.id, device_ids, session)).values(last_seen=now)
        )


def get_or_create(session: Session, device_id: str) -> Device:
    dev = session.get(Device, device_id)
    if dev is None:
        ids.device_id(device_id)  # a device first seen on a topic: the same grammar
        dev = Device(id=device_id, **copy.deepcopy(_NEW_ROW))
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


def apply_presence(
    session: Session,
    device_id: str,
    msg: Presence | Mapping[str, object],
    now: datetime | None = None,
) -> Device:
    """Update the inventory from a presence message (an offline will carries only `online`).

    A raw message is parsed first (`edgefleet.wire.presence.parse`: a wrong type raises its
    `MessageError`); a field the message does not carry leaves the inventory as it was.
    """
    p = msg if isinstance(msg, Presence) else parse_presence(msg, device_id)
    dev = get_or_create(session, device_id)
    dev.online = p.online
    dev.last_seen = now or datetime.now(UTC)
    if p.online:
        if p.agent_version is not None:
            dev.agent_version = p.agent_version[:64]
        if p.execution_providers is not None:
            dev.execution_providers = p.execution_providers
        if p.profiles is not None:
            dev.profiles = p.profiles
        if p.hardware is not None:
            dev.hardware = p.hardware
        if p.models is not None:
            # The inventory the API shows and `device_infos` reads: name -> {"version", ...}.
            dev.installed = {n: _installed_entry(m) for n, m in p.models.items()}
    return dev


def _installed_entry(m: InstalledModel) -> dict[str, str | None]:
    entry: dict[str, str | None] = {"version": m.version}
    if m.previous is not None:
        entry["previous"] = m.previous
    if m.state is not None:
        entry["state"] = m.state
    return entry


def set_labels(
    session: Session,
    device_id: str,
    groups: list[str] | None = None,
    tags: list[str] | None = None,
) -> Device:
    groups = ids.labels(ids.GROUP, groups) if groups is not None else None
    tags = ids.labels(ids.TAG, tags) if tags is not None else None
    dev = get_or_create(session, device_id)
    if groups is not None:
        dev.groups = groups
    if tags is not None:
        dev.tags = tags
    return dev


class SeqBatch:
    """The seq floors and desired seqs of a batch's devices, read with two queries and written
    with one statement per kind (`write`): the bridge applies hundreds of reports per batch, and
    one SELECT, or one ORM object, per report each was most of its time."""

    def __init__(self, session: Session, device_ids: Collection[str]) -> None:
        ids_ = sorted(set(device_ids))
        floors = cast(Table, DeviceSeqFloor.__table__)
        self.floors: dict[str, int] = {
            d: f
            for d, f in session.execute(
                select(floors.c.device_id, floors.c.floor).where(
                    id_in(floors.c.device_id, ids_, session)
                )
            )
        }
        self.desired: dict[str, int] = {
            d: q
            for d, q in session.execute(
                select(DesiredState.device_id, DesiredState.seq).where(
                    id_in(DesiredState.device_id, ids_, session)
                )
            )
        }
        self._new: dict[str, tuple[int, datetime]] = {}  # floors to insert
        self._raised: dict[str, tuple[int, datetime]] = {}  # floors to raise

    def note(self, device_id: str, seq: int, now: datetime) -> None:
        """The device says it accepted ``seq``: its floor, created or raised (never lowered)."""
        floor = self.floors.get(device_id)
        if floor is None:
            self._new[device_id] = (seq, now)
        elif seq > floor:  # only when it rises: every status report carries it (no UPDATE)
            (self._new if device_id in self._new else self._raised)[device_id] = (seq, now)
        else:
            return
        self.floors[device_id] = seq

    def write(self, session: Session) -> None:
        """The floors noted since the last write: one INSERT and one UPDATE (executemany)."""
        table = cast(Table, DeviceSeqFloor.__table__)
        if self._new:
            session.execute(
                table.insert(),
                [{"device_id": d, "floor": f, "reported_at": t} for d, (f, t) in self._new.items()],
            )
        if self._raised:
            session.execute(
                update(table)
                .where(table.c.device_id == bindparam("b_id"))
                .values(floor=bindparam("b_floor"), reported_at=bindparam("b_at")),
                [{"b_id": d, "b_floor": f, "b_at": t} for d, (f, t) in self._raised.items()],
            )
        self._new, self._raised = {}, {}


def note_device_seq(
    session: Session, device_id: str, seq: int, now: datetime, batch: SeqBatch | None = None
) -> bool:
    """Record the highest desired seq the device reports accepting; True when it is above the
    controller's own sequence for it (the database went backwards: the device would drop every
    new state until the controller continues above it). ``batch``: preloaded rows, whose
    `SeqBatch.write` the caller runs; without one, the floor is written at once."""
    own_batch = batch is None
    batch = batch if batch is not None else SeqBatch(session, [device_id])
    batch.note(device_id, seq, now)
    if own_batch:
        batch.write(session)
    own = batch.desired.get(device_id)
    return own is not None and own < seq


class StatusRows:
    """The columns of a device row that its status reports move, read for many devices with
    one query and written back with one statement per shape (`write`): the bridge's way for the
    devices whose batch holds nothing but status reports and telemetry (the ORM costs several
    times as much per row). Each `StatusRow` is what `_status` reads and writes."""

    def __init__(self, session: Session, device_ids: Collection[str]) -> None:
        t = cast(Table, Device.__table__)
        q = select(t.c.id, t.c.last_status_seq, t.c.recent_status_seqs, t.c.installed).where(
            id_in(t.c.id, device_ids, session)
        )
        self.rows: dict[str, StatusRow] = {
            d: StatusRow(seq, list(recent or []), dict(installed or {}))
            for d, seq, recent, installed in session.execute(q)
        }

    def write(self, session: Session) -> None:
        """Every row a report moved: one executemany per set of columns written."""
        t = cast(Table, Device.__table__)
        shapes: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for d, row in self.rows.items():
            if row.last_seen is None:
                continue  # no fresh report: nothing moved
            values: dict[str, Any] = {
                "last_status_seq": row.last_status_seq,
                "recent_status_seqs": row.recent_status_seqs,
                "installed": row.installed,
                "last_seen": row.last_seen,
            }
            if row.last_status is not None:
                values["last_status"] = row.last_status
            shapes.setdefault(tuple(values), []).append(
                {"b_id": d, **{f"b_{k}": v for k, v in values.items()}}
            )
        for columns, params in shapes.items():
            stmt = (
                update(t)
                .where(t.c.id == bindparam("b_id"))
                .values({c: bindparam(f"b_{c}", type_=t.c[c].type) for c in columns})
            )
            session.execute(stmt, params)


class StatusRow:
    """A device's status bookkeeping, as `StatusRows` read it (the ORM `Device` has the same
    attributes): ``last_status`` and ``last_seen`` are only written (None: not moved)."""

    __slots__ = ("installed", "last_seen", "last_status", "last_status_seq", "recent_status_seqs")

    def __init__(self, seq: int | None, recent: list[int], installed: dict[str, Any]) -> None:
        self.last_status_seq = seq
        self.recent_status_seqs = recent
        self.installed = installed
        self.last_status: dict[str, Any] | None = None
        self.last_seen: datetime | None = None


def stale_sequences(session: Session) -> dict[str, tuple[int, int | None]]:
    """Devices whose reported seq is above the controller's: id -> (device's, controller's)."""
    rows = session.execute(
        select(DeviceSeqFloor.device_id, DeviceSeqFloor.floor, DesiredState.seq).join(
            DesiredState, DesiredState.device_id == DeviceSeqFloor.device_id, isouter=True
        )
    ).all()
    return {d: (f, s) for d, f, s in rows if f > 0 and (s is None or s < f)}


def raise_floor(session: Session, floor: int, now: datetime) -> int:
    """An operator's lower bound for every known device's sequence (`controller resync
    --floor`), for devices that have not reported since a restore; the number of devices."""
    ids_ = set(session.scalars(select(Device.id))) | set(
        session.scalars(select(DesiredState.device_id))
    )
    for device_id in ids_:
        f = session.get(DeviceSeqFloor, device_id)
        if f is None:
            session.add(DeviceSeqFloor(device_id=device_id, floor=floor, reported_at=now))
        elif f.floor < floor:
            f.floor = floor
    session.flush()
    return len(ids_)


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
        "revoked_at": iso(dev.revoked_at) if dev.revoked_at else None,
    }
    floor = object_session_floor(dev)
    if floor is not None:
        out["reported_desired_seq"] = floor.floor
        out["stale_sequence"] = desired is not None and desired.seq < floor.floor
    if desired is not None:
        out["desired"] = {
            "seq": desired.seq,
            "models": desired.models,
            "remove": desired.remove or [],
        }
    return out


def object_session_floor(dev: Device) -> DeviceSeqFloor | None:
    from sqlalchemy.orm import object_session

    s = object_session(dev)
    return s.get(DeviceSeqFloor, dev.id) if s is not None else None


def list_devices(session: Session) -> list[Device]:
    return list(session.scalars(select(Device).order_by(Device.id)))


def device_infos(session: Session, model: str) -> list[DeviceInfo]:
    """Inventory as the rollout engine sees it; the previous version is the desired one if
    the controller set one, else what the device reports installed."""
    desired = {d.device_id: d for d in session.scalars(select(DesiredState))}
    infos = []
    for dev in list_devices(session):
        if dev.revoked_at is not None:  # cut off by `devices revoke`: in no new rollout
            continue
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
