"""Early drift looks on the leader's ticker: sliding windows, one event per episode, gauges.

Every ``look_s`` seconds (the model's drift config, default 30) the leader merges each
scope's sketch windows of each window of the plan (the last ``2 * look_s`` and the last
``window_s`` seconds; stored telemetry records, so any replica that leads sees them) and judges
them at the early-look level of :class:`edgefleet.drift.alerts.LookPlan` (the closed bucket keeps the rest of ``alpha``;
docs/drift.md, Alerts in minutes). A drifted look opens an episode and stores a drift event
(one per model, scope, key and episode; its webhook goes out after the commit); later drifted
looks extend the episode (``evidence.episode.last_seen``) without a new event. With the
controller setting ``capture_on_drift`` the event starts a capture on the affected devices
(``edgefleet.cloud_controller.capture.service.start_capture_for_event``, skipped with a log line
where that module is absent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller.drift.analysis import (
    bucket_start,
    get_reference,
    get_settings,
    parse_time,
    summarize,
    utc,
)
from edgefleet.cloud_controller.drift.models import (
    DriftEvent,
    DriftReference,
    DriftSettings,
    SketchAggregate,
    TelemetryRecord,
)
from edgefleet.cloud_controller.drift.webhook import capture_hint
from edgefleet.cloud_controller.models import Device
from edgefleet.drift.alerts import LookPlan, episode_step
from edgefleet.drift.decision import decide
from edgefleet.drift.sketch import SketchError, merge_dicts

log = logging.getLogger("edgefleet.controller.drift")
MAX_WINDOW_S = 3600
MAX_DEVICES_LISTED = 1000


@dataclass
class LookState:
    """The latest look of one (model, scope, key), for the gauges."""

    drift: bool
    statistic: float
    p_value: float
    at: datetime


# (model, scope, key) -> latest look; and model -> last grid slot looked at (this process)
LAST_LOOKS: dict[tuple[str, str, str], LookState] = {}
_last_slot: dict[str, int] = {}
_lock = threading.Lock()


def _scopes_of(dev: str, version: str, groups: dict[str, list[str]]) -> list[tuple[str, str]]:
    keys = [("device", dev), ("release", version), ("fleet", "*")]
    return keys + [("group", g) for g in groups.get(dev, [])]


Window = tuple[dict[str, Any], set[str], set[str], datetime]
Row = tuple[str, str | None, datetime, Any]


def _rows(
    session: Session, model: str, versions: Iterable[str], since: datetime, until: datetime
) -> list[Row]:
    """The sketch records of ``model`` in (since, until]."""
    return [
        (str(r[0]), r[1], r[2], r[3])
        for r in session.execute(
            select(
                TelemetryRecord.device_id,
                TelemetryRecord.version,
                TelemetryRecord.at,
                TelemetryRecord.data,
            ).where(
                TelemetryRecord.kind == "sketch",
                TelemetryRecord.model == model,
                TelemetryRecord.version.in_(sorted(versions)),
                TelemetryRecord.at > since,
                TelemetryRecord.at <= until,
            )
        ).all()
    ]


def _groups(session: Session, rows: list[Row]) -> dict[str, list[str]]:
    devs = {r[0] for r in rows}
    groups: dict[str, list[str]] = {}
    if devs:
        for d in session.scalars(select(Device).where(Device.id.in_(sorted(devs)))):
            groups[d.id] = [str(g) for g in (d.groups or [])]
    return groups


def _windows(
    rows: list[Row], groups: dict[str, list[str]], since: datetime, until: datetime
) -> dict[tuple[str, str, str], Window]:
    """(reference, scope, key) -> (merged sketch, versions, devices, earliest window) of the
    rows in (since, until]."""
    out: dict[tuple[str, str, str], Window] = {}
    for dev, version, at, data in rows:
        at = utc(at) or until
        if not since < at <= until:
            continue
        sk = data.get("sketch") if isinstance(data, dict) else None
        if not isinstance(sk, dict) or not isinstance(sk.get("reference_id"), str):
            continue
        for scope, key in _scopes_of(dev, version or "?", groups):
            k = (str(sk["reference_id"]), scope, key)
            prev = out.get(k)
            try:
                merged = sk if prev is None else merge_dicts(prev[0], sk)
            except SketchError:
                continue
            vers = (prev[1] if prev else set()) | ({version} if version else set())
            out[k] = (
                merged,
                vers,
                (prev[2] if prev else set()) | {dev},
                min(prev[3], at) if prev else at,
            )
    return out


def known_models(session: Session) -> list[str]:
    """Models with a package, a registered reference or drift settings (small tables)."""
    from edgefleet.cloud_controller.models import Package

    names: set[str] = set(session.scalars(select(Package.name).distinct()))
    names.update(session.scalars(select(DriftReference.model).distinct()))
    names.update(session.scalars(select(DriftSettings.model)))
    return sorted(names)


def recent_versions(session: Session, model: str, since: datetime) -> set[str]:
    """Versions whose sketches were merged into buckets starting after ``since`` (through the
    (model, scope, scope_key, bucket_start) index), so records are read by their own index."""
    return set(
        session.scalars(
            select(SketchAggregate.scope_key)
            .where(
                SketchAggregate.model == model,
                SketchAggregate.scope == "release",
                SketchAggregate.bucket_start >= since,
            )
            .distinct()
        )
    )


def _open_episode(session: Session, model: str, scope: str, key: str) -> DriftEvent | None:
    return session.scalars(
        select(DriftEvent)
        .where(DriftEvent.model == model, DriftEvent.scope == scope, DriftEvent.scope_key == key)
        .order_by(DriftEvent.id.desc())
        .limit(1)
    ).first()


def episode_last_seen(ev: DriftEvent) -> float:
    """When the event's episode last saw drift (the event time for closed-bucket events)."""
    ep = (ev.evidence or {}).get("episode") or {}
    at = parse_time(ep.get("last_seen"), utc(ev.at) or datetime.now(UTC))
    return at.timestamp()


def _start_capture(session: Session, ev: DriftEvent) -> str | None:
    try:
        from edgefleet.cloud_controller.capture.service import (  # type: ignore[import-not-found,unused-ignore]
            start_capture_for_event,
        )
    except ImportError:
        log.warning("capture_on_drift is on but capture is not part of this controller; skipped")
        return None
    try:
        with session.begin_nested():
            cid = start_capture_for_event(session, ev)
    except Exception:
        log.exception("starting a capture for drift event %s failed", ev.id)
        return None
    return None if cid is None else str(cid)


def look(
    session: Session,
    now: datetime | None = None,
    *,
    models: Iterable[str] | None = None,
    capture_on_drift: bool = False,
    force: bool = False,
) -> list[DriftEvent]:
    """One round of early looks (each model at most once per grid slot unless ``force``);
    returns the events it opened (stored, not committed)."""
    now = now or datetime.now(UTC)
    # the models and versions with sketches merged lately: the small aggregates table names
    # them, so the records are read through their (model, version, kind, at) index
    names = list(models) if models is not None else known_models(session)
    opened: list[DriftEvent] = []
    for model in names:
        s = get_settings(session, model)
        plan = LookPlan.of(s.config, s.bucket_s)
        if not plan.enabled:
            continue
        slot = plan.slot(now.timestamp())
        with _lock:
            if not force and _last_slot.get(model) == slot:
                continue
            _last_slot[model] = slot
        longest = min(plan.window_s, MAX_WINDOW_S)
        since = now - timedelta(seconds=longest)
        live = recent_versions(session, model, since - timedelta(seconds=s.bucket_s))
        if not live:
            continue
        rows = _rows(session, model, live, since, now)
        groups = _groups(session, rows)
        # each scope judged on every window of the plan, shortest first; the first that drifts
        # is the look's evidence (else the longest window's result, for the gauges)
        judged: dict[tuple[str, str, str], tuple[dict[str, Any], Window, int]] = {}
        refs: dict[str, dict[str, Any] | None] = {}  # one lookup per reference, not per key
        for i, w in enumerate(plan.windows):
            cfg = plan.look_config(s.config, i)
            w_since = now - timedelta(seconds=min(w, MAX_WINDOW_S))
            for k, win in _windows(rows, groups, w_since, now).items():
                if k[1] not in s.scopes or (k in judged and judged[k][0]["status"] == "drift"):
                    continue
                if k[0] not in refs:
                    refs[k[0]] = get_reference(session, model, k[0])
                ref = refs[k[0]]
                if ref is None:
                    continue
                judged[k] = (summarize(decide(ref, win[0], cfg)), win, w)
        for (rid, scope, key), (result, (_sk, versions, devices, first), w) in sorted(
            judged.items()
        ):
            drift = result["status"] == "drift"
            LAST_LOOKS[(model, scope, key)] = LookState(
                drift, float(result["drift_score"]), float(result["min_p_adjusted"]), now
            )
            prev = _open_episode(session, model, scope, key)
            last = episode_last_seen(prev) if prev is not None else None
            action = episode_step(drift, last, now.timestamp(), plan.quiet_s)
            if action == "continue" and prev is not None:
                ev = dict(prev.evidence)
                ep = dict(ev.get("episode") or {})
                ep["last_seen"] = now.isoformat()
                ep["looks"] = int(ep.get("looks", 1)) + 1
                ev["episode"] = ep
                prev.evidence = ev
            elif action == "open":
                result["episode"] = {
                    "first_seen": now.isoformat(),
                    "last_seen": now.isoformat(),
                    "looks": 1,
                    "kind": "look",
                }
                result["window"] = {
                    "start": (now - timedelta(seconds=w)).isoformat(),
                    "end": now.isoformat(),
                    "seconds": w,
                    "first_record": first.isoformat(),
                }
                result["plan"] = plan.to_dict()
                result["devices"] = sorted(devices)[:MAX_DEVICES_LISTED]
                result["devices_total"] = len(devices)
                ev_row = DriftEvent(
                    at=now,
                    model=model,
                    reference_id=rid,
                    scope=scope,
                    scope_key=key,
                    bucket_start=bucket_start(now, s.bucket_s),
                    versions=sorted(versions),
                    features=list(result["drifted_features"]),
                    evidence=result,
                    webhook_state="pending" if s.webhook_url else "none",
                    webhook_attempts=0,
                )
                session.add(ev_row)
                session.flush()  # the id names the event in the capture hint
                capture: dict[str, Any] = {
                    "command": capture_hint(model, scope, key, devices, ev_row.id),
                    "id": None,
                }
                if capture_on_drift:
                    capture["id"] = _start_capture(session, ev_row)
                ev_row.evidence = {**result, "capture": capture}
                opened.append(ev_row)
                log.warning(
                    "drift on %s %s=%s (early look): %s", model, scope, key, result["reason"]
                )
    session.flush()
    return opened


class Looker:
    """What the leader's ticker calls: looks at most every ``poll_s``, then sends webhooks."""

    def __init__(
        self, factory: sessionmaker[Session], capture_on_drift: bool = False, poll_s: float = 2.0
    ) -> None:
        self.factory = factory
        self.capture_on_drift = capture_on_drift
        self.poll_s = poll_s
        self._last = 0.0

    def tick(self) -> list[int]:
        mono = time.monotonic()
        if mono - self._last < self.poll_s:
            return []
        self._last = mono
        with self.factory() as session, session.begin():
            opened = look(session, capture_on_drift=self.capture_on_drift)
            ids = [e.id for e in opened]
            pending = any(e.webhook_state == "pending" for e in opened)
        if pending:
            from edgefleet.cloud_controller.drift.webhook import deliver_pending

            threading.Thread(
                target=deliver_pending, args=(self.factory,), name="drift-webhook", daemon=True
            ).start()
        return ids


def gauges(
    session: Session, now: datetime | None = None
) -> list[tuple[str, str, str, float, float, float]]:
    """(model, scope, key, state 0/1, statistic, p-value) per scope: open episodes from the
    database (any replica), then this process's latest looks for the scopes without one."""
    now = now or datetime.now(UTC)
    out: dict[tuple[str, str, str], tuple[float, float, float]] = {}
    recent = session.scalars(
        select(DriftEvent).where(DriftEvent.at > now - timedelta(hours=24))
    ).all()
    for ev in recent:
        k = (ev.model, ev.scope, ev.scope_key)
        s = get_settings(session, ev.model)
        plan = LookPlan.of(s.config, s.bucket_s)
        quiet = plan.quiet_s if plan.enabled else s.bucket_s
        if now.timestamp() - episode_last_seen(ev) <= quiet:
            evd = ev.evidence or {}
            out[k] = (
                1.0,
                float(evd.get("drift_score", 0.0)),
                float(evd.get("min_p_adjusted", 1.0)),
            )
    for k, st in list(LAST_LOOKS.items()):
        if k in out or (now - st.at).total_seconds() > MAX_WINDOW_S:
            continue
        out[k] = (1.0 if st.drift else 0.0, st.statistic, st.p_value)
    return [(m, sc, key, *v) for (m, sc, key), v in sorted(out.items())]
