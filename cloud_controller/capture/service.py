"""Capture on demand, the controller's side (docs/capture.md).

A capture is a row of ``capture_sessions``. Starting one (`start_capture`, the API, or
`start_capture_for_event` for a drift event) writes it ``pending``; `activate` (the API at
once, else the leader's ticker) puts a ``capture`` entry into the desired state of each target
device and marks it ``active``. The bridge hands every capture message to `ingest`, which
checks each record against the capture (known, this device targeted, this model, still open,
within the device's rows, the per-minute rate, the byte budgets) before storing it: a refused
record is counted per capture and device under its reason (`wire.reasons.CaptureReason`),
never stored, and acknowledged like a stored one so the device lets it go. `tick` (the
leader's ticker) ends captures whose window passed or whose rows are in, withdraws their
desired entries, and deletes ended captures past the retention. `export` turns the rows into
.npz files the packager takes, stored as a versioned dataset with its lineage.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import secrets
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller import desired as desired_mod
from edgefleet.cloud_controller.db import iso
from edgefleet.cloud_controller.desired import Signer
from edgefleet.cloud_controller.models import (
    CaptureDataset,
    CapturedRow,
    CaptureSession,
    DesiredState,
    Device,
)
from edgefleet.wire import capture as wc
from edgefleet.wire import ids
from edgefleet.wire.manifest import format_time
from edgefleet.wire.reasons import CaptureReason

log = logging.getLogger(__name__)

OPEN = ("pending", "active")
STATES = ("pending", "active", "complete", "stopped", "expired")
PARTS = ("calibration", "holdout")
MAX_DEVICES = 1000  # targets of one capture


class CaptureRequestError(ValueError):
    """A capture the controller refuses to start, stop or export; ``code`` for the API."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class CaptureLimits:
    """docs/limits.md, Capture."""

    on_drift: bool = False
    on_drift_rows: int = 500
    on_drift_sample_rate: float = 0.1
    on_drift_rows_per_minute: int = 60
    max_rows: int = 100_000
    max_bytes: int = 256 * 1024**2
    total_bytes: int = 2 * 1024**3
    retention_days: float = 30.0

    @classmethod
    def from_settings(cls, s: Any) -> CaptureLimits:
        return cls(
            on_drift=bool(s.capture_on_drift),
            on_drift_rows=int(s.capture_on_drift_rows),
            on_drift_sample_rate=float(s.capture_on_drift_sample_rate),
            on_drift_rows_per_minute=int(s.capture_on_drift_rows_per_minute),
            max_rows=int(s.capture_max_rows),
            max_bytes=int(s.capture_max_bytes),
            total_bytes=int(s.capture_total_bytes),
            retention_days=float(s.capture_retention_days),
        )


# The controller's limits, set once at start (`Controller.build`): `start_capture_for_event`
# is called from the drift code with a session and an event only.
_limits = CaptureLimits()


def configure(limits: CaptureLimits) -> None:
    global _limits
    _limits = limits


def limits() -> CaptureLimits:
    return _limits


def new_capture_id() -> str:
    return "cap-" + secrets.token_hex(8)


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


# --- start, activate, stop ------------------------------------------------------------------


def _managed(session: Session, model: str, device_ids: Iterable[str]) -> dict[str, DesiredState]:
    rows = session.scalars(select(DesiredState).where(DesiredState.device_id.in_(list(device_ids))))
    return {r.device_id: r for r in rows if model in (r.models or {})}


def resolve_targets(
    session: Session, model: str, devices: list[str] | None, group: str | None
) -> list[str]:
    """The devices a capture asks: those named (each must have the model in its desired
    state: the capture entry travels there), or the group's devices that do."""
    if bool(devices) == bool(group):
        raise CaptureRequestError("capture_targets", "give either devices or a group")
    if devices:
        wanted = sorted(set(ids.labels(ids.DEVICE_ID, devices)))
        if len(wanted) > MAX_DEVICES:
            raise CaptureRequestError("capture_targets", f"at most {MAX_DEVICES} devices")
        have = _managed(session, model, wanted)
        missing = [d for d in wanted if d not in have]
        if missing:
            raise CaptureRequestError(
                "capture_not_managed",
                f"no desired state names {model} on {missing}: a capture needs the controller"
                " to manage the model there",
            )
        return wanted
    ids.group(group)
    members = [
        d.id
        for d in session.scalars(select(Device).order_by(Device.id))
        if group in (d.groups or [])
    ]
    out = sorted(_managed(session, model, members))
    if not out:
        raise CaptureRequestError(
            "capture_no_targets", f"no device of group {group!r} has {model} in its desired state"
        )
    return out[:MAX_DEVICES]


def start_capture(
    session: Session,
    *,
    model: str,
    devices: list[str] | None = None,
    group: str | None = None,
    rows: int,
    sample_rate: float = 0.1,
    max_rows_per_minute: int = 60,
    hours: float = 24.0,
    drift_event_id: int | None = None,
    created_by: str,
    now: datetime | None = None,
    lim: CaptureLimits | None = None,
) -> CaptureSession:
    """A new ``pending`` capture (`activate` sends it to the devices)."""
    lim = lim or _limits
    now = now or datetime.now(UTC)
    ids.model_name(model)
    if isinstance(rows, bool) or not 1 <= rows <= lim.max_rows:
        raise CaptureRequestError("capture_rows", f"rows must be in [1, {lim.max_rows}]")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise CaptureRequestError("capture_sample_rate", "sample rate must be in (0, 1]")
    if not 1 <= max_rows_per_minute <= wc.MAX_RATE:
        raise CaptureRequestError(
            "capture_rate", f"max rows per minute must be in [1, {wc.MAX_RATE}]"
        )
    if not (math.isfinite(hours) and 0 < hours <= 24 * 30):
        raise CaptureRequestError("capture_hours", "hours must be in (0, 720]")
    targets = resolve_targets(session, model, devices, group)
    per_device = min(wc.MAX_ROWS, -(-rows // len(targets)))
    row = CaptureSession(
        id=new_capture_id(),
        model=model,
        devices=targets,
        group=group,
        rows_wanted=rows,
        rows_per_device=per_device,
        sample_rate=float(sample_rate),
        max_rows_per_minute=int(max_rows_per_minute),
        state="pending",
        created_by=created_by,
        drift_event_id=drift_event_id,
        created_at=now,
        until=now + timedelta(hours=hours),
        rows=0,
        bytes=0,
        stats={d: _empty_stats() for d in targets},
    )
    session.add(row)
    session.flush()
    return row


def _empty_stats() -> dict[str, Any]:
    return {"rows": 0, "bytes": 0, "refused": {}, "forbidden": False, "done": None}


def spec_of(cap: CaptureSession) -> wc.CaptureSpec:
    return wc.CaptureSpec(
        id=cap.id,
        rows=cap.rows_per_device,
        until=format_time(_utc(cap.until)),
        sample_rate=cap.sample_rate,
        max_rows_per_minute=cap.max_rows_per_minute,
    )


def activate(session: Session, signer: Signer, now: datetime | None = None) -> list[DesiredState]:
    """Put every pending capture into its devices' desired states; the rows to publish."""
    now = now or datetime.now(UTC)
    out: list[DesiredState] = []
    pending = session.scalars(
        select(CaptureSession).where(CaptureSession.state == "pending").with_for_update()
    )
    for cap in list(pending):
        spec = spec_of(cap).to_dict()
        for device_id in cap.devices:
            row = session.get(DesiredState, device_id, with_for_update=True)
            entry = (row.models or {}).get(cap.model) if row is not None else None
            if not isinstance(entry, dict):
                continue  # the model left this device's desired state meanwhile
            out.append(
                desired_mod.set_model(
                    session, signer, device_id, cap.model, {**entry, "capture": spec}, now
                )
            )
        cap.state = "active"
    return out


def _withdraw(
    session: Session, signer: Signer, cap: CaptureSession, now: datetime
) -> list[DesiredState]:
    out: list[DesiredState] = []
    for device_id in cap.devices:
        row = session.get(DesiredState, device_id, with_for_update=True)
        entry = (row.models or {}).get(cap.model) if row is not None else None
        if not isinstance(entry, dict) or (entry.get("capture") or {}).get("id") != cap.id:
            continue
        clean = {k: v for k, v in entry.items() if k != "capture"}
        out.append(desired_mod.set_model(session, signer, device_id, cap.model, clean, now))
    return out


def stop_capture(
    session: Session, signer: Signer, capture_id: str, now: datetime | None = None
) -> tuple[CaptureSession, list[DesiredState]]:
    now = now or datetime.now(UTC)
    cap = get(session, capture_id, lock=True)
    if cap.state not in OPEN:
        return cap, []
    rows = _withdraw(session, signer, cap, now)
    cap.state, cap.ended_at = "stopped", now
    return cap, rows


def get(session: Session, capture_id: str, lock: bool = False) -> CaptureSession:
    cap = (
        session.get(CaptureSession, capture_id, with_for_update=lock)
        if wc.is_capture_id(capture_id)
        else None
    )
    if cap is None:
        raise CaptureRequestError("capture_not_found", f"no capture {capture_id!r}", 404)
    return cap


def start_capture_for_event(session: Session, event: Any) -> str | None:
    """For a drift event (``cloud_controller.drift.models.DriftEvent``): start a capture of
    ``capture_on_drift_rows`` rows (sampling ``capture_on_drift_sample_rate`` of the requests,
    at most ``capture_on_drift_rows_per_minute`` a minute a device) on the devices its scope names, when the controller's
    ``capture_on_drift`` setting is on. Returns the capture id, None when the setting is off,
    the event already has a capture, or no device of its scope has the model in its desired
    state. The capture is ``pending``: the leader's ticker sends it to the devices."""
    lim = _limits
    if not lim.on_drift:
        return None
    event_id = int(event.id)
    existing = session.scalar(
        select(CaptureSession.id).where(CaptureSession.drift_event_id == event_id)
    )
    if existing is not None:
        return str(existing)
    scope, key, model = str(event.scope), str(event.scope_key), str(event.model)
    try:
        if scope == "device":
            devices: list[str] | None = [key]
            group: str | None = None
        elif scope == "group":
            devices, group = None, key
        else:  # fleet or release: every device with the model, up to MAX_DEVICES
            rows = session.scalars(select(DesiredState)).all()
            devices = sorted(r.device_id for r in rows if model in (r.models or {}))[:MAX_DEVICES]
            group = None
            if not devices:
                return None
        cap = start_capture(
            session,
            model=model,
            devices=devices,
            group=group,
            rows=min(lim.on_drift_rows, lim.max_rows),
            sample_rate=lim.on_drift_sample_rate,
            max_rows_per_minute=lim.on_drift_rows_per_minute,
            drift_event_id=event_id,
            created_by=f"drift-event:{event_id}",
        )
    except (CaptureRequestError, ids.IdentifierError) as e:
        log.info("drift event %s: no capture (%s)", event_id, e)
        return None
    return cap.id


# --- ingest -----------------------------------------------------------------------------------


@dataclass
class RateWindow:
    """Rows accepted per (capture, device) over the last minute, read from the stored rows:
    refuses a flood on every replica together. Each replica's bridge holds one, but the count
    is the database's (``captured_rows`` by capture, ``received_at``), and ``ingest`` holds the
    capture's row lock (``FOR UPDATE``) while it counts and stores, so two replicas taking one
    device's records at the same moment are serialized: N replicas let through the limit, not
    N times it. ``used`` keeps the count of the current ``ingest`` call (rows it added)."""

    used: dict[tuple[str, str], int] = field(default_factory=dict)

    def begin(self) -> None:
        self.used = {}

    def allow(
        self,
        session: Session,
        key: tuple[str, str],
        rows: int,
        limit: int,
        now: datetime,
    ) -> bool:
        if key not in self.used:
            cid, dev = key
            session.flush()  # rows an earlier message of the same batch stored count too
            self.used[key] = int(
                session.scalar(
                    select(func.coalesce(func.sum(CapturedRow.rows), 0)).where(
                        CapturedRow.capture_id == cid,
                        CapturedRow.device_id == dev,
                        CapturedRow.received_at > now - timedelta(seconds=60),
                    )
                )
                or 0
            )
        # twice the device's own limit (its records never carry more rows than that limit):
        # a backlog sent after a reconnect passes, a device that ignores its limit does not
        if self.used[key] + rows > 2 * limit:
            return False
        self.used[key] += rows
        return True


@dataclass
class IngestResult:
    acked: list[int] = field(default_factory=list)  # record ids stored, duplicate or refused
    stored: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # reason -> records

    def refuse(self, code: str, rid: int | None) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        if rid is not None:
            self.acked.append(rid)


def total_bytes(session: Session) -> int:
    return int(session.scalar(select(func.coalesce(func.sum(CaptureSession.bytes), 0))) or 0)


def ingest(
    session: Session,
    device_id: str,
    records: list[Mapping[str, object]],
    now: datetime,
    rate: RateWindow,
    lim: CaptureLimits | None = None,
) -> IngestResult:
    """Check and store one device's capture records (one transaction, the caller's)."""
    lim = lim or _limits
    res = IngestResult()
    parsed: list[wc.CaptureRow | wc.CaptureNote] = []
    for raw in records:
        rid = wc.record_id(raw)
        try:
            parsed.append(wc.parse_record(raw))
        except wc.CaptureError as e:
            res.refuse(e.code.value, rid)
    if not parsed:
        return res
    caps: dict[str, CaptureSession] = {}
    for cid in sorted({p.capture_id for p in parsed}):
        cap = session.get(CaptureSession, cid, with_for_update=True)
        if cap is not None:
            caps[cid] = cap
    row_ids = [p.record_id for p in parsed if isinstance(p, wc.CaptureRow)]
    seen: set[int] = set()
    if row_ids:
        seen = set(
            session.scalars(
                select(CapturedRow.record_id).where(
                    CapturedRow.device_id == device_id, CapturedRow.record_id.in_(row_ids)
                )
            )
        )
    budget_left = lim.total_bytes - total_bytes(session)
    versions = _known_versions(session, device_id, {c.model for c in caps.values()})
    rate.begin()
    for p in parsed:
        cap = caps.get(p.capture_id)
        if cap is None or device_id not in (cap.devices or []):
            res.refuse(CaptureReason.UNKNOWN.value, p.record_id)  # counted by the bridge only
            continue
        stats = {k: dict(v) for k, v in (cap.stats or {}).items()}
        st = stats.setdefault(device_id, _empty_stats())
        st["refused"] = dict(st.get("refused") or {})

        def refuse(code: CaptureReason, st: dict[str, Any] = st, rid: int = p.record_id) -> None:
            st["refused"][code.value] = st["refused"].get(code.value, 0) + 1
            res.refuse(code.value, rid)

        if p.model != cap.model:
            refuse(CaptureReason.WRONG_MODEL)
        elif isinstance(p, wc.CaptureNote):
            if p.kind == "refused":
                st["forbidden"] = True
            else:
                st["done"] = p.why
            res.acked.append(p.record_id)
        elif p.record_id in seen:
            res.acked.append(p.record_id)  # a resend: stored already
        elif p.version not in versions.get(cap.model, ()):
            refuse(CaptureReason.WRONG_VERSION)
        elif st["rows"] + p.rows > cap.rows_per_device:
            refuse(CaptureReason.OVER_QUOTA)
        elif cap.state not in OPEN or _utc(cap.until) + timedelta(minutes=5) < now:
            refuse(CaptureReason.CLOSED)
        elif not rate.allow(session, (cap.id, device_id), p.rows, cap.max_rows_per_minute, now):
            refuse(CaptureReason.RATE)
        elif cap.bytes + p.nbytes > lim.max_bytes or p.nbytes > budget_left:
            refuse(CaptureReason.BYTES_LIMIT)
        else:
            payload = json.dumps(p.tensors_dict(), separators=(",", ":")).encode()
            session.add(
                CapturedRow(
                    capture_id=cap.id,
                    device_id=device_id,
                    record_id=p.record_id,
                    version=p.version,
                    rows=p.rows,
                    nbytes=p.nbytes,
                    captured_at=p.ts,
                    received_at=now,
                    payload=payload,
                )
            )
            seen.add(p.record_id)
            st["rows"] += p.rows
            st["bytes"] += p.nbytes
            cap.rows += p.rows
            cap.bytes += p.nbytes
            budget_left -= p.nbytes
            res.stored += 1
            res.acked.append(p.record_id)
            if cap.rows >= cap.rows_wanted:
                cap.state, cap.ended_at = "complete", now  # the ticker withdraws the entries
        cap.stats = stats
    return res


def _known_versions(session: Session, device_id: str, models: set[str]) -> dict[str, set[str]]:
    """Per model, the versions a row from this device may name: the one its desired state
    names, and those it reported installed (the current and the previous one)."""
    out: dict[str, set[str]] = {m: set() for m in models}
    row = session.get(DesiredState, device_id)
    dev = session.get(Device, device_id)
    for m in models:
        entry = (row.models or {}).get(m) if row is not None else None
        if isinstance(entry, dict) and isinstance(entry.get("version"), str):
            out[m].add(entry["version"])
        info = (dev.installed or {}).get(m) if dev is not None else None
        if isinstance(info, dict):
            out[m].update(
                v for v in (info.get("version"), info.get("previous")) if isinstance(v, str)
            )
    return out


# --- the leader's ticker ----------------------------------------------------------------------


def tick(
    session: Session, signer: Signer, now: datetime | None = None, lim: CaptureLimits | None = None
) -> tuple[list[DesiredState], dict[str, int]]:
    """Activate pending captures, end those past their window, withdraw the desired entries
    of ended ones, delete what is past the retention. (desired rows to publish, counts)."""
    lim = lim or _limits
    now = now or datetime.now(UTC)
    out = activate(session, signer, now)
    counts = {"activated": len(out), "expired": 0, "withdrawn": 0, "deleted": 0}
    for cap in session.scalars(select(CaptureSession).where(CaptureSession.state == "active")):
        if _utc(cap.until) <= now:
            cap.state, cap.ended_at = "expired", now
            counts["expired"] += 1
            continue
        # a rollout that rewrote a device's entry took the capture out of it: put it back
        spec = spec_of(cap).to_dict()
        for device_id in cap.devices:
            row = session.get(DesiredState, device_id)
            entry = (row.models or {}).get(cap.model) if row is not None else None
            if isinstance(entry, dict) and (entry.get("capture") or {}).get("id") != cap.id:
                out.append(
                    desired_mod.set_model(
                        session, signer, device_id, cap.model, {**entry, "capture": spec}, now
                    )
                )
    # ended captures whose entries may still be in desired states
    ended = session.scalars(
        select(CaptureSession).where(
            CaptureSession.state.in_(("complete", "expired")),
            CaptureSession.ended_at >= now - timedelta(days=1),
        )
    )
    for cap in ended:
        rows = _withdraw(session, signer, cap, now)
        counts["withdrawn"] += len(rows)
        out += rows
    counts["deleted"] = purge(session, now, lim)
    return out, counts


def purge(session: Session, now: datetime, lim: CaptureLimits | None = None) -> int:
    """Delete ended captures (with their rows and datasets) older than the retention."""
    lim = lim or _limits
    cutoff = now - timedelta(days=lim.retention_days)
    old = list(
        session.scalars(
            select(CaptureSession.id).where(
                CaptureSession.state.not_in(OPEN), CaptureSession.ended_at < cutoff
            )
        )
    )
    # and rows of any capture received before the cutoff (a capture open for longer)
    session.execute(delete(CapturedRow).where(CapturedRow.received_at < cutoff))
    if old:
        session.execute(delete(CapturedRow).where(CapturedRow.capture_id.in_(old)))
        session.execute(delete(CaptureDataset).where(CaptureDataset.capture_id.in_(old)))
        session.execute(delete(CaptureSession).where(CaptureSession.id.in_(old)))
    return len(old)


# --- views ------------------------------------------------------------------------------------


def view(cap: CaptureSession) -> dict[str, Any]:
    return {
        "id": cap.id,
        "model": cap.model,
        "state": cap.state,
        "devices": list(cap.devices or []),
        "group": cap.group,
        "rows_wanted": cap.rows_wanted,
        "rows_per_device": cap.rows_per_device,
        "rows": cap.rows,
        "bytes": cap.bytes,
        "sample_rate": cap.sample_rate,
        "max_rows_per_minute": cap.max_rows_per_minute,
        "created_by": cap.created_by,
        "created_at": iso(_utc(cap.created_at)),
        "until": iso(_utc(cap.until)),
        "ended_at": iso(_utc(cap.ended_at)) if cap.ended_at else None,
        "drift_event_id": cap.drift_event_id,
        "per_device": cap.stats or {},
    }


def dataset_view(ds: CaptureDataset) -> dict[str, Any]:
    return {
        "id": ds.id,
        "capture_id": ds.capture_id,
        "version": ds.version,
        "part": ds.part,
        "model": ds.model,
        "rows": ds.rows,
        "sha256": ds.sha256,
        "size": ds.size,
        "created_at": iso(_utc(ds.created_at)),
        "created_by": ds.created_by,
        "lineage": ds.lineage,
    }


# --- export -----------------------------------------------------------------------------------

_EPOCH = (1980, 1, 1, 0, 0, 0)


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed .npz with fixed timestamps (the packager's npzio format), in memory."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


def _arrays(payloads: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Rows of every record concatenated per tensor: inputs by name, outputs as
    ``output:NAME``. Records whose tensors do not line up with the first (another version
    with another signature) are left out."""
    import base64

    def arr(t: Mapping[str, Any]) -> np.ndarray:
        # checked on ingest: dtype whitelisted, len(data) == prod(shape) * itemsize
        a = np.frombuffer(base64.b64decode(t["data"]), dtype=np.dtype(t["dtype"]).newbyteorder("<"))
        return a.reshape(tuple(t["shape"]))

    parts: dict[str, list[np.ndarray]] = {}
    first: dict[str, tuple[str, tuple[int, ...]]] | None = None
    for p in payloads:
        named = {k: arr(v) for k, v in p["inputs"].items()}
        named.update({f"output:{k}": arr(v) for k, v in p["outputs"].items()})
        sig = {k: (str(v.dtype), v.shape[1:]) for k, v in named.items()}
        if first is None:
            first = sig
        if sig != first:
            continue
        for k, v in named.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def export(
    session: Session,
    capture_id: str,
    *,
    holdout: float = 0.0,
    seed: int = 0,
    created_by: str,
    now: datetime | None = None,
) -> list[CaptureDataset]:
    """A new dataset version of a capture: the calibration part and, with ``holdout``, a
    held-out part (that fraction of the rows, chosen with ``seed``)."""
    now = now or datetime.now(UTC)
    cap = get(session, capture_id, lock=True)
    if not 0 <= holdout < 1:
        raise CaptureRequestError("capture_holdout", "holdout must be in [0, 1)")
    rows = list(
        session.scalars(
            select(CapturedRow).where(CapturedRow.capture_id == cap.id).order_by(CapturedRow.id)
        )
    )
    if not rows:
        raise CaptureRequestError("capture_empty", f"capture {cap.id} has no rows yet", 409)
    arrays = _arrays([json.loads(r.payload) for r in rows])
    n = len(next(iter(arrays.values())))
    order = np.random.default_rng(seed).permutation(n)
    n_hold = round(n * holdout) if holdout else 0
    if holdout and not 0 < n_hold < n:
        raise CaptureRequestError(
            "capture_holdout", f"a holdout of {holdout} leaves an empty part of {n} rows"
        )
    version = 1 + int(
        session.scalar(
            select(func.coalesce(func.max(CaptureDataset.version), 0)).where(
                CaptureDataset.capture_id == cap.id
            )
        )
        or 0
    )
    times = sorted(r.received_at for r in rows)
    lineage = {
        "capture_id": cap.id,
        "model": cap.model,
        "devices": sorted({r.device_id for r in rows}),
        "versions": sorted({r.version for r in rows}),
        "window": {"start": iso(_utc(times[0])), "end": iso(_utc(times[-1]))},
        "captured_at": {
            "first": min(r.captured_at for r in rows),
            "last": max(r.captured_at for r in rows),
        },
        "drift_event_id": cap.drift_event_id,
        "records": len(rows),
        "holdout": holdout,
        "seed": seed,
    }
    split = {"calibration": np.sort(order[n_hold:]), "holdout": np.sort(order[:n_hold])}
    out: list[CaptureDataset] = []
    for part in PARTS:
        idx = split[part]
        if part == "holdout" and not n_hold:
            continue
        data = npz_bytes({k: v[idx] for k, v in arrays.items()})
        ds = CaptureDataset(
            id="ds-" + secrets.token_hex(8),
            capture_id=cap.id,
            version=version,
            part=part,
            model=cap.model,
            created_at=now,
            created_by=created_by,
            lineage={**lineage, "part": part},
            rows=len(idx),
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            npz=data,
        )
        session.add(ds)
        out.append(ds)
    session.flush()
    return out
