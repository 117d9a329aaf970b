"""Telemetry in: dedupe by (device, record id), store windows, merge sketches, judge buckets.

``ingest_telemetry(session, device_id, payload)`` is what the MQTT bridge calls per message
inside its transaction; ``ingest_batch(session, [(device_id, payload), ...])`` does the same for
many messages with one duplicate lookup per device, one bulk insert and one merge per aggregate
(the fast path the benchmark measures). Neither commits. Webhooks of new drift events are sent
after the surrounding transaction commits, from a background thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, event, insert, select, text, update
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.drift.analysis import (
    FLUSH_KEY,
    ModelDriftSettings,
    bucket_start,
    evaluate_due,
    get_settings,
    parse_time,
    utc,
)
from edgefleet.cloud_controller.drift.models import DriftEvent, SketchAggregate, TelemetryRecord
from edgefleet.cloud_controller.models import Device
from edgefleet.drift.sketch import SketchError, merge_dicts
from edgefleet.wire.message import MessageError
from edgefleet.wire.telemetry import TelemetryEnvelope
from edgefleet.wire.telemetry import parse as parse_envelope

log = logging.getLogger("edgefleet.controller.drift")
KINDS = ("system", "agent", "inference", "sketch", "sample")
PENDING_KEY = "edgefleet.drift.pending_sketches"
DELIVER_KEY = "edgefleet.drift.deliver_webhooks"
MAX_RECORDS_PER_MESSAGE = 10_000
CLOCK_SKEW = timedelta(minutes=5)


class TelemetryError(ValueError):
    """A telemetry message that cannot be ingested; the message names why."""


def _records(payload: TelemetryEnvelope | Mapping[str, object]) -> list[dict[str, Any]]:
    """The storable records of one envelope: an integer ``id`` and a known ``kind``."""
    if isinstance(payload, TelemetryEnvelope):
        envelope = payload
    elif isinstance(payload, Mapping):
        try:
            envelope = parse_envelope(payload)
        except MessageError as e:
            raise TelemetryError(str(e)) from e
    else:
        raise TelemetryError("telemetry payload is not a JSON object")
    recs = envelope.records
    if len(recs) > MAX_RECORDS_PER_MESSAGE:
        raise TelemetryError(f"{len(recs)} records in one message, limit {MAX_RECORDS_PER_MESSAGE}")
    good = []
    for r in recs:
        rid = r.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool) or r.get("kind") not in KINDS:
            continue
        good.append(r)
    return good


def ingest_telemetry(
    session: Session, device_id: str, payload: TelemetryEnvelope | Mapping[str, object]
) -> int:
    """Store one telemetry message; returns how many of its records were new.

    The records are written at once; their sketches are merged into the aggregates when the
    surrounding transaction commits (once per transaction, however many messages it holds),
    or earlier when drift is read in the same session.
    """
    return ingest_batch(session, [(device_id, payload)], defer=True)


def ingest_batch(
    session: Session,
    messages: Iterable[tuple[str, TelemetryEnvelope | Mapping[str, object]]],
    *,
    now: datetime | None = None,
    defer: bool = False,
) -> int:
    """Store many messages in the caller's transaction; returns the count of new records."""
    now = now or datetime.now(UTC)
    fresh: dict[tuple[str, int], dict[str, Any]] = {}
    for device_id, payload in messages:
        for r in _records(payload):
            fresh.setdefault((device_id, int(r["id"])), r)
    if not fresh:
        return 0
    rows = [_row(dev, rid, rec, now) for (dev, rid), rec in fresh.items()]
    count, new = _insert_new(session, rows)
    # a sketch is merged once, when its record is new (`new`: the sketch records inserted)
    sketches = [(dev, rec) for (dev, rid), rec in fresh.items() if (dev, rid) in new] if new else []
    if sketches and defer:
        session.info.setdefault(PENDING_KEY, []).append((sketches, now))
        session.info[FLUSH_KEY] = flush_pending
        if not event.contains(session, "before_commit", _before_commit):
            event.listen(session, "before_commit", _before_commit)
            event.listen(session, "after_rollback", _after_rollback)
    elif sketches:
        _merge_sketches(session, sketches, now)
    return count


def flush_pending(session: Session) -> None:
    """Merge the sketches deferred by ``ingest_telemetry`` in this session."""
    pending = session.info.pop(PENDING_KEY, None)
    if not pending:
        return
    sketches = [item for batch, _ in pending for item in batch]
    _merge_sketches(session, sketches, max(now for _, now in pending))


def _before_commit(session: Session) -> None:
    if session.in_nested_transaction() or not session.info.get(PENDING_KEY):
        return  # a savepoint: wait for the real commit
    try:
        with session.begin_nested():
            flush_pending(session)
    except Exception:  # the windows themselves are stored; only their merge is lost
        log.exception("merging deferred drift sketches failed")


def _after_rollback(session: Session) -> None:
    if not session.in_nested_transaction():  # the whole transaction, not a savepoint
        session.info.pop(PENDING_KEY, None)
        session.info.pop(DELIVER_KEY, None)


def _insert_new(session: Session, rows: list[dict[str, Any]]) -> tuple[int, set[tuple[str, int]]]:
    """Insert rows whose (device, record id) is not stored yet: (how many were, and the pairs
    of the ``sketch`` records among them, whose merge must happen once).

    SQLite and PostgreSQL: ``INSERT ... ON CONFLICT DO NOTHING`` (race-free across controller
    replicas); elsewhere a lookup of the stored pairs first. On SQLite only the sketch records
    are inserted with ``RETURNING`` (SQLAlchemy renders, runs and reads back one statement per
    thousand of them); the others, nearly all, go to the driver's ``executemany`` and are
    counted by its row count (`_insert_plain_sqlite`).
    """
    table = TelemetryRecord.__table__
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stored = _insert_new_pg(session, rows)
        return len(stored), stored & _sketch_pairs(rows)
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        stmt = sqlite.insert(table).on_conflict_do_nothing(  # type: ignore[arg-type]
            index_elements=["device_id", "record_id"]
        )
        sketch = [r for r in rows if r["kind"] == "sketch"]
        plain = [r for r in rows if r["kind"] != "sketch"] if sketch else rows
        count = _insert_plain_sqlite(session, plain) if plain else 0
        inserted: set[tuple[str, int]] = set()
        keyed = stmt.returning(table.c.device_id, table.c.record_id)
        for i in range(0, len(sketch), 1000):
            result = session.execute(keyed, sketch[i : i + 1000])
            inserted.update((str(d), int(r)) for d, r in result)
        return count + len(inserted), inserted
    pairs = {(r["device_id"], r["record_id"]) for r in rows}
    devices = sorted({d for d, _ in pairs})
    ids = sorted({i for _, i in pairs})
    for i in range(0, len(ids), 500):
        seen = session.execute(
            select(TelemetryRecord.device_id, TelemetryRecord.record_id).where(
                TelemetryRecord.record_id.in_(ids[i : i + 500]),
                TelemetryRecord.device_id.in_(devices),
            )
        )
        pairs -= {(str(d), int(r)) for d, r in seen}
    todo = [r for r in rows if (r["device_id"], r["record_id"]) in pairs]
    if todo:
        session.execute(insert(table), todo)  # type: ignore[arg-type]
    return len(pairs), pairs & _sketch_pairs(rows)


_COLUMNS = (
    "device_id", "record_id", "kind", "at", "model", "version", "requests", "errors", "p95_ms",
    "data",
)  # fmt: skip
_SQLITE_INSERT = (
    f"INSERT INTO telemetry_records ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * 10)})"
    " ON CONFLICT (device_id, record_id) DO NOTHING"
)


def _insert_plain_sqlite(session: Session, rows: list[dict[str, Any]]) -> int:
    """`_insert_new` on SQLite for rows whose inserted pairs are not needed: one DB-API
    ``executemany`` of one statement text, each row's time and JSON written by their columns'
    own SQLAlchemy bind processors (the stored text is what the ORM writes and reads back),
    without SQLAlchemy's per-row parameter machinery; how many rows were new (the driver's
    row count of an ``executemany`` sums each row's, 0 for a row already stored)."""
    conn = session.connection()
    columns = TelemetryRecord.__table__.c
    at = columns.at.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    data = columns.data.type.dialect_impl(conn.dialect).bind_processor(conn.dialect)
    assert at is not None and data is not None
    params = [
        (
            r["device_id"], r["record_id"], r["kind"], at(r["at"]), r["model"], r["version"],
            r["requests"], r["errors"], r["p95_ms"], data(r["data"]),
        )
        for r in rows
    ]  # fmt: skip
    result = conn.exec_driver_sql(_SQLITE_INSERT, params)
    return int(result.rowcount)


def _sketch_pairs(rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
    return {(r["device_id"], r["record_id"]) for r in rows if r["kind"] == "sketch"}


# PostgreSQL: the rows as one array per column, unnested into one INSERT. The statement's text
# is the same whatever the batch size, so neither SQLAlchemy nor psycopg compile or split a
# new statement of thousands of placeholders per batch (that was most of the ingest's time).
_PG_INSERT = text(
    "INSERT INTO telemetry_records"
    " (device_id, record_id, kind, at, model, version, requests, errors, p95_ms, data)"
    " SELECT * FROM unnest(CAST(:device_id AS varchar[]), CAST(:record_id AS bigint[]),"
    " CAST(:kind AS varchar[]), CAST(:at AS timestamptz[]), CAST(:model AS varchar[]),"
    " CAST(:version AS varchar[]), CAST(:requests AS bigint[]), CAST(:errors AS bigint[]),"
    " CAST(:p95_ms AS float8[]), CAST(:data AS json[]))"
    " ON CONFLICT (device_id, record_id) DO NOTHING RETURNING device_id, record_id"
)
_PG_COLUMNS = (
    "device_id", "record_id", "kind", "at", "model", "version", "requests", "errors", "p95_ms",
)  # fmt: skip


def _insert_new_pg(session: Session, rows: list[dict[str, Any]]) -> set[tuple[str, int]]:
    """`_insert_new` on PostgreSQL: ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO
    NOTHING RETURNING`` (race-free across replicas), in chunks of 5,000 rows."""
    inserted: set[tuple[str, int]] = set()
    for i in range(0, len(rows), 5000):
        chunk = rows[i : i + 5000]
        params: dict[str, Any] = {c: [r[c] for r in chunk] for c in _PG_COLUMNS}
        params["data"] = [json.dumps(r["data"]) for r in chunk]
        result = session.execute(_PG_INSERT, params)
        inserted.update((str(d), int(r)) for d, r in result)
    return inserted


def _row(device_id: str, rid: int, rec: dict[str, Any], now: datetime) -> dict[str, Any]:
    at = record_time(rec, now)
    lat = rec.get("latency_ms") if isinstance(rec.get("latency_ms"), dict) else {}
    p95 = lat.get("p95") if isinstance(lat, dict) else None
    return {
        "device_id": device_id,
        "record_id": rid,
        "kind": rec["kind"],
        "at": at,
        "model": _str(rec.get("model")),
        "version": _str(rec.get("version")),
        "requests": _int(rec.get("requests")),
        "errors": _int(rec.get("errors")),
        "p95_ms": float(p95) if isinstance(p95, int | float) else None,
        "data": rec,
    }


def record_time(rec: Mapping[str, Any], now: datetime) -> datetime:
    """The window's end as the device reports it; a clock ahead of ours counts as now."""
    at = parse_time(rec.get("window_end") or rec.get("at"), now)
    return now if at > now + CLOCK_SKEW else at


def _str(v: Any) -> str | None:
    return str(v)[:200] if isinstance(v, str) and v else None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _device_groups(session: Session, device_ids: Iterable[str]) -> dict[str, list[str]]:
    ids = list(set(device_ids))
    out: dict[str, list[str]] = {}
    for dev in session.scalars(select(Device).where(Device.id.in_(ids))):
        out[dev.id] = [str(g) for g in (dev.groups or [])]
    return out


def _merge_sketches(
    session: Session, sketches: list[tuple[str, dict[str, Any]]], now: datetime
) -> None:
    groups = _device_groups(session, (d for d, _ in sketches))
    settings: dict[str, ModelDriftSettings] = {}
    # 1. one merge per window into (model, reference, device, version, bucket)
    per_device: dict[tuple[str, str, str, str, datetime], dict[str, Any]] = {}
    for dev, rec in sketches:
        sk, model, version = rec.get("sketch"), _str(rec.get("model")), _str(rec.get("version"))
        if not isinstance(sk, dict) or model is None or not isinstance(sk.get("reference_id"), str):
            continue
        s = settings.get(model) or settings.setdefault(model, get_settings(session, model))
        bucket = bucket_start(record_time(rec, now), s.bucket_s)
        k1 = (model, str(sk["reference_id"]), dev, version or "?", bucket)
        prev = per_device.get(k1)
        try:
            per_device[k1] = sk if prev is None else merge_dicts(prev, sk)
        except SketchError:
            continue
    # 2. those into every scope they belong to
    pending: dict[tuple[str, str, str, str, datetime], tuple[dict[str, Any], set[str]]] = {}
    for (model, rid, dev, version, bucket), sk in per_device.items():
        keys = [("device", dev), ("release", version), ("fleet", "*")]
        keys += [("group", g) for g in groups.get(dev, [])]
        for scope, key in keys:
            k = (model, rid, scope, key, bucket)
            prev2 = pending.get(k)
            merged_sk = sk if prev2 is None else merge_dicts(prev2[0], sk)
            pending[k] = (merged_sk, (prev2[1] if prev2 else set()) | {version} - {"?"})
    # the stored aggregates of exactly these keys, as plain rows (no ORM identity map)
    agg = SketchAggregate.__table__.c
    existing: dict[tuple[str, str, str, str, datetime], Any] = {}
    for model in {k[0] for k in pending}:
        mine = [k for k in pending if k[0] == model]
        rows = session.execute(
            select(
                agg.id,
                agg.reference_id,
                agg.scope,
                agg.scope_key,
                agg.bucket_start,
                agg.sketch,
                agg.versions,
            )
            .where(
                agg.model == model,
                agg.reference_id.in_(sorted({k[1] for k in mine})),
                agg.scope_key.in_(sorted({k[3] for k in mine})),
                agg.bucket_start.in_(sorted({k[4] for k in mine})),
            )
            .with_for_update()
        )
        for found in rows:
            start = utc(found.bucket_start)
            assert start is not None
            existing[(model, found.reference_id, found.scope, found.scope_key, start)] = found
    fresh_rows: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    for (model, rid, scope, key, bucket), (sk, versions) in pending.items():
        row = existing.get((model, rid, scope, key, bucket))
        if row is None:
            fresh_rows.append(
                {
                    "model": model,
                    "reference_id": rid,
                    "scope": scope,
                    "scope_key": key,
                    "bucket_start": bucket,
                    "n": int(sk.get("n", 0)),
                    "sketch": sk,
                    "versions": sorted(versions),
                    "evaluated": False,
                    "updated_at": now,
                }
            )
            continue
        try:
            total = merge_dicts(row.sketch, sk)
        except SketchError:
            continue
        updates.append(
            {
                "_id": row.id,
                "sketch": total,
                "n": int(total.get("n", 0)),
                "versions": sorted(set(row.versions) | versions),
                "updated_at": now,
            }
        )
    table = SketchAggregate.__table__
    if fresh_rows:
        session.execute(insert(table), fresh_rows)  # type: ignore[arg-type]
    if updates:  # one executemany; a late window reopens a judged bucket
        session.execute(
            update(table)  # type: ignore[arg-type]
            .where(table.c.id == bindparam("_id"))
            .values(
                sketch=bindparam("sketch"),
                n=bindparam("n"),
                versions=bindparam("versions"),
                updated_at=bindparam("updated_at"),
                evaluated=False,
            ),
            updates,
        )
        # ORM copies loaded elsewhere in this session must not hide the new values
        for obj in list(session.identity_map.values()):
            if isinstance(obj, SketchAggregate):
                session.expire(obj)
    session.flush()
    new_events = evaluate_due(session, now, models=settings)
    if any(e.webhook_state == "pending" for e in new_events) or _retry_due(session):
        _deliver_after_commit(session)


RETRY_EVERY_S = 30.0
_last_retry = [0.0]


def _retry_due(session: Session) -> bool:
    """At most every RETRY_EVERY_S: are webhooks still pending (a receiver that was down)?"""
    mono = time.monotonic()
    if mono - _last_retry[0] < RETRY_EVERY_S:
        return False
    _last_retry[0] = mono
    found = session.scalars(
        select(DriftEvent.id).where(DriftEvent.webhook_state == "pending").limit(1)
    ).first()
    return found is not None


def _deliver_after_commit(session: Session) -> None:
    """Send pending webhooks from a thread once the outermost transaction has committed."""
    session.info[DELIVER_KEY] = True
    if not event.contains(session, "after_commit", _after_commit_deliver):
        event.listen(session, "after_commit", _after_commit_deliver)


def _after_commit_deliver(session: Session) -> None:
    # after_commit fires for savepoints too: only the real commit makes the events visible
    if session.in_nested_transaction() or not session.info.pop(DELIVER_KEY, False):
        return
    from sqlalchemy.orm import sessionmaker

    from edgefleet.cloud_controller.drift.webhook import deliver_pending

    factory = sessionmaker(session.get_bind(), expire_on_commit=False)
    threading.Thread(
        target=deliver_pending, args=(factory,), name="drift-webhook", daemon=True
    ).start()
