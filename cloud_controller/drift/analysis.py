"""Drift settings, references, bucket evaluation and events (database glue around edgefleet.drift).

A scope's sketches are merged per time bucket (``bucket_s``, default one hour). A bucket is
judged once, when it has closed (``bucket_start + bucket_s + grace_s <= now``), so each scope
raises at most one false alarm per bucket with probability ``alpha``; open buckets and merged
ranges are shown on request without raising events.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.drift.models import (
    DriftEvent,
    DriftReference,
    DriftSettings,
    SketchAggregate,
)
from edgefleet.drift.alerts import LookPlan
from edgefleet.drift.decision import DriftConfig, DriftDecision, decide
from edgefleet.drift.reference import ReferenceError, validate_reference
from edgefleet.drift.sketch import SketchError, merge_dicts

SCOPES = ("device", "group", "release", "fleet")
DEFAULT_SCOPES = ("fleet", "release", "group")
GRACE_S = 60.0
FLUSH_KEY = "edgefleet.drift.flush"  # session.info: merges sketches the ingest deferred


def flush_deferred(session: Session) -> None:
    """Sketches ingested in this session but not merged yet are merged before reading."""
    fn = session.info.get(FLUSH_KEY)
    if fn is not None:
        fn(session)


def utc(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they are UTC here."""
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def parse_time(value: Any, default: datetime) -> datetime:
    if isinstance(value, str):
        try:
            return utc(datetime.fromisoformat(value.replace("Z", "+00:00"))) or default
        except ValueError:
            return default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), UTC)
    return default


def bucket_start(at: datetime, bucket_s: int) -> datetime:
    ts = int(at.timestamp())
    return datetime.fromtimestamp(ts - ts % bucket_s, UTC)


@dataclass(frozen=True)
class ModelDriftSettings:
    model: str
    config: DriftConfig = field(default_factory=DriftConfig)
    bucket_s: int = 3600
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    webhook_url: str | None = None
    webhook_secret: str | None = None

    def to_dict(self, *, reveal_secret: bool = False) -> dict[str, Any]:
        return {
            "model": self.model,
            "config": self.config.to_dict(),
            "bucket_s": self.bucket_s,
            "scopes": list(self.scopes),
            "webhook_url": self.webhook_url,
            "webhook_secret": self.webhook_secret if reveal_secret else bool(self.webhook_secret),
        }


_SETTINGS_KEY = "edgefleet.drift.settings"


def get_settings(session: Session, model: str) -> ModelDriftSettings:
    """A model's settings (memoised per session; ``put_settings`` refreshes the memo)."""
    memo: dict[str, ModelDriftSettings] = session.info.setdefault(_SETTINGS_KEY, {})
    if model in memo:
        return memo[model]
    memo[model] = _load_settings(session, model)
    return memo[model]


def _load_settings(session: Session, model: str) -> ModelDriftSettings:
    row = session.get(DriftSettings, model)
    if row is None:
        return ModelDriftSettings(model)
    return ModelDriftSettings(
        model,
        DriftConfig.from_dict(row.config),
        int(row.bucket_s),
        tuple(row.scopes),
        row.webhook_url,
        row.webhook_secret,
    )


def put_settings(
    session: Session,
    model: str,
    *,
    config: Mapping[str, Any] | None = None,
    bucket_s: int | None = None,
    scopes: Iterable[str] | None = None,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> ModelDriftSettings:
    """Create or change a model's drift settings (validated; ValueError names the field)."""
    cur = get_settings(session, model)
    cfg = DriftConfig.from_dict({**cur.config.to_dict(), **dict(config or {})})
    b = int(bucket_s if bucket_s is not None else cur.bucket_s)
    if b < 60:
        raise ValueError(f"bucket_s must be >= 60, got {b}")
    sc = tuple(scopes) if scopes is not None else cur.scopes
    bad = [s for s in sc if s not in SCOPES]
    if bad:
        raise ValueError(f"scopes: unknown {bad}; use {list(SCOPES)}")
    url = webhook_url if webhook_url is not None else cur.webhook_url
    if url and not url.startswith(("http://", "https://")):
        raise ValueError(f"webhook_url must be http(s), got {url!r}")
    row = session.get(DriftSettings, model)
    if row is None:
        row = DriftSettings(model=model)
        session.add(row)
    row.config = cfg.to_dict()
    row.bucket_s = b
    row.scopes = list(sc)
    row.webhook_url = url or None
    row.webhook_secret = webhook_secret if webhook_secret is not None else cur.webhook_secret
    row.updated_at = datetime.now(UTC)
    session.flush()
    session.info.get(_SETTINGS_KEY, {}).pop(model, None)
    return get_settings(session, model)


def register_reference(
    session: Session, model: str, version: str, reference: Mapping[str, Any]
) -> str:
    """Store a reference (validated) so sketches counted against it can be judged."""
    validate_reference(reference)
    rid = str(reference["id"])
    if session.get(DriftReference, rid) is None:
        session.add(
            DriftReference(
                id=rid,
                model=model,
                version=version,
                reference=dict(reference),
                created_at=datetime.now(UTC),
            )
        )
        session.flush()
    return rid


def get_reference(session: Session, model: str, reference_id: str) -> dict[str, Any] | None:
    """The reference by id: registered ones first, then the registry's package manifests."""
    row = session.get(DriftReference, reference_id)
    if row is not None:
        return dict(row.reference)
    try:
        from edgefleet.cloud_controller.models import Package
    except ImportError:  # pragma: no cover - the registry is part of the controller
        return None
    for pkg in session.scalars(select(Package).where(Package.name == model)):
        ref = (pkg.manifest or {}).get("drift_reference")
        if isinstance(ref, dict) and ref.get("id") == reference_id:
            try:
                register_reference(session, model, pkg.version, ref)
            except ReferenceError:
                return None
            return ref
    return None


def latest_reference_id(session: Session, model: str) -> str | None:
    row = session.scalars(
        select(SketchAggregate.reference_id)
        .where(SketchAggregate.model == model, SketchAggregate.scope == "fleet")
        .order_by(SketchAggregate.bucket_start.desc())
        .limit(1)
    ).first()
    return row


def summarize(decision: DriftDecision) -> dict[str, Any]:
    """The stored/API form of a decision: the full per-feature evidence plus headline figures."""
    d = decision.to_dict()
    feats = decision.features
    d["max_psi"] = max((f.psi for f in feats), default=0.0)
    d["max_js"] = max((f.js for f in feats), default=0.0)
    d["min_p_adjusted"] = min((f.p_adjusted for f in feats), default=1.0)
    # a drifted feature's effect: its JS distance, or its share of out-of-range values (a
    # constant feature that changes has one bin, so JS 0), both in [0, 1]
    d["drift_score"] = max((max(f.js, f.out_of_range) for f in feats if f.drifted), default=0.0)
    return d


def judge(
    session: Session,
    model: str,
    reference_id: str,
    sketch: Mapping[str, Any],
    config: DriftConfig,
) -> dict[str, Any]:
    """Decision summary for a merged sketch, or a status naming why there is none."""
    ref = get_reference(session, model, reference_id)
    if ref is None:
        return {
            "status": "no_reference",
            "drift": False,
            "n": int(sketch.get("n", 0)),
            "reason": f"reference {reference_id[:12]} of {model} is not known here",
            "features": [],
            "drifted_features": [],
            "drift_score": 0.0,
        }
    return summarize(decide(ref, sketch, config))


def evaluate_due(
    session: Session,
    now: datetime | None = None,
    model: str | None = None,
    *,
    models: Iterable[str] | None = None,
) -> list[DriftEvent]:
    """Judge every closed, not yet judged bucket; store events for drifted ones."""
    flush_deferred(session)
    now = now or datetime.now(UTC)
    if model is not None:
        names = [model]
    elif models is not None:
        names = list(models)
    else:
        names = list(
            session.scalars(
                select(SketchAggregate.model).where(SketchAggregate.evaluated.is_(False)).distinct()
            )
        )
    events: list[DriftEvent] = []
    for name in names:
        s = get_settings(session, name)
        cutoff = now - timedelta(seconds=s.bucket_s + GRACE_S)
        q = (
            select(SketchAggregate)
            .where(
                SketchAggregate.model == name,
                SketchAggregate.evaluated.is_(False),
                SketchAggregate.bucket_start <= cutoff,
            )
            .order_by(SketchAggregate.bucket_start)
        )
        known: dict[str, bool] = {}
        for agg in session.scalars(q):
            if agg.scope not in s.scopes:  # not judged here; shown on request (history)
                agg.evaluated = True
                agg.status = None
                agg.result = None
                continue
            rid = agg.reference_id
            if rid not in known:
                known[rid] = get_reference(session, agg.model, rid) is not None
            if not known[rid]:
                continue  # judged once the reference arrives
            # with early looks the closed bucket keeps alpha * (1 - early_share) of the level
            close_cfg = LookPlan.of(s.config, s.bucket_s).close_config(s.config)
            result = judge(session, agg.model, rid, agg.sketch, close_cfg)
            agg.evaluated = True
            agg.status = result["status"]
            agg.result = result
            if result["status"] == "drift" and not _has_event(session, agg):
                events.append(_event(session, agg, result, s, now))
    session.flush()
    return events


def _has_event(session: Session, agg: SketchAggregate) -> bool:
    """A bucket re-judged after late data raises no second event, nor does a bucket that an
    early look's episode (edgefleet.drift.alerts) already announced."""
    start = utc(agg.bucket_start) or datetime.now(UTC)
    for ev in session.scalars(
        select(DriftEvent).where(
            DriftEvent.model == agg.model,
            DriftEvent.scope == agg.scope,
            DriftEvent.scope_key == agg.scope_key,
            DriftEvent.at >= start - timedelta(days=1),
        )
    ):
        ep = (ev.evidence or {}).get("episode")
        if isinstance(ep, dict):
            last = parse_time(ep.get("last_seen"), utc(ev.at) or start)
            if last >= start:
                return True
    found = session.scalars(
        select(DriftEvent.id)
        .where(
            DriftEvent.model == agg.model,
            DriftEvent.reference_id == agg.reference_id,
            DriftEvent.scope == agg.scope,
            DriftEvent.scope_key == agg.scope_key,
            DriftEvent.bucket_start == agg.bucket_start,
        )
        .limit(1)
    ).first()
    return found is not None


def _event(
    session: Session,
    agg: SketchAggregate,
    result: dict[str, Any],
    s: ModelDriftSettings,
    now: datetime,
) -> DriftEvent:
    ev = DriftEvent(
        at=now,
        model=agg.model,
        reference_id=agg.reference_id,
        scope=agg.scope,
        scope_key=agg.scope_key,
        bucket_start=agg.bucket_start,
        versions=list(agg.versions),
        features=list(result["drifted_features"]),
        evidence=result,
        webhook_state="pending" if s.webhook_url else "none",
        webhook_attempts=0,
    )
    session.add(ev)
    return ev


def merged(
    session: Session,
    model: str,
    *,
    scope: str = "fleet",
    key: str = "*",
    since: datetime | None = None,
    reference_id: str | None = None,
) -> tuple[str | None, dict[str, Any] | None, list[str]]:
    """(reference id, merged sketch, versions) of a scope's buckets overlapping ``since``..now."""
    flush_deferred(session)
    rid = reference_id or latest_reference_id(session, model)
    if rid is None:
        return None, None, []
    q = select(SketchAggregate).where(
        SketchAggregate.model == model,
        SketchAggregate.reference_id == rid,
        SketchAggregate.scope == scope,
        SketchAggregate.scope_key == key,
    )
    if since is not None:  # every bucket that overlaps [since, now]
        bucket_s = get_settings(session, model).bucket_s
        q = q.where(SketchAggregate.bucket_start > since - timedelta(seconds=bucket_s))
    total: dict[str, Any] | None = None
    versions: set[str] = set()
    for agg in session.scalars(q):
        try:
            total = dict(agg.sketch) if total is None else merge_dicts(total, agg.sketch)
        except SketchError:
            continue
        versions.update(agg.versions)
    return rid, total, sorted(versions)


def history(
    session: Session, model: str, *, scope: str = "fleet", key: str = "*", limit: int = 48
) -> list[dict[str, Any]]:
    """Per bucket: n, status and headline statistics (judging open buckets on the fly)."""
    flush_deferred(session)
    s = get_settings(session, model)
    rows = list(
        session.scalars(
            select(SketchAggregate)
            .where(
                SketchAggregate.model == model,
                SketchAggregate.scope == scope,
                SketchAggregate.scope_key == key,
            )
            .order_by(SketchAggregate.bucket_start.desc())
            .limit(limit)
        )
    )
    out = []
    for agg in reversed(rows):
        res = (
            agg.result
            if agg.evaluated and agg.result
            else judge(session, model, agg.reference_id, agg.sketch, s.config)
        )
        out.append(
            {
                "bucket_start": (utc(agg.bucket_start) or datetime.now(UTC)).isoformat(),
                "closed": bool(agg.evaluated),
                "n": int(agg.n),
                "versions": list(agg.versions),
                "status": res.get("status"),
                "max_psi": res.get("max_psi", 0.0),
                "max_js": res.get("max_js", 0.0),
                "min_p_adjusted": res.get("min_p_adjusted", 1.0),
                "drifted_features": res.get("drifted_features", []),
                "features": {
                    f["name"]: {
                        "psi": f["psi"],
                        "js": f["js"],
                        "ks": f["ks"],
                        "p_adjusted": f["p_adjusted"],
                    }
                    for f in res.get("features", [])
                },
            }
        )
    return out


def events(session: Session, model: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    q = select(DriftEvent).order_by(DriftEvent.id.desc()).limit(limit)
    if model is not None:
        q = q.where(DriftEvent.model == model)
    return [event_dict(e) for e in session.scalars(q)]


def event_dict(e: DriftEvent) -> dict[str, Any]:
    return {
        "id": e.id,
        "at": (utc(e.at) or datetime.now(UTC)).isoformat(),
        "model": e.model,
        "reference_id": e.reference_id,
        "scope": e.scope,
        "scope_key": e.scope_key,
        "bucket_start": (utc(e.bucket_start) or datetime.now(UTC)).isoformat(),
        "versions": e.versions,
        "features": e.features,
        "reason": e.evidence.get("reason"),
        "webhook": {
            "state": e.webhook_state,
            "attempts": e.webhook_attempts,
            "error": e.webhook_error,
        },
    }
