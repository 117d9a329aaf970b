"""`/api/v1/drift/...`: drift per feature, history, events, settings, health gates and A/B."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.auth import Perm
from edgefleet.cloud_controller.deps import Principal, need, session
from edgefleet.cloud_controller.drift import analysis, health
from edgefleet.drift.power import Detectability, detectability, reference_warnings
from edgefleet.drift.reference import ReferenceError

router = APIRouter(prefix="/api/v1/drift", tags=["drift"])


def _error(status: int, code: str, message: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message})


def drift_view(
    s: Session,
    model: str,
    *,
    device: str | None = None,
    scope: str = "fleet",
    key: str = "*",
    hours: float = 24.0,
) -> dict[str, Any]:
    """The merged sketch of a scope over the last ``hours`` judged feature by feature."""
    if device is not None:
        scope, key = "device", device
    if scope not in analysis.SCOPES:
        raise ValueError(f"scope must be one of {list(analysis.SCOPES)}, got {scope!r}")
    since = datetime.now(UTC) - timedelta(hours=hours)
    settings = analysis.get_settings(s, model)
    rid, sketch, versions = analysis.merged(s, model, scope=scope, key=key, since=since)
    base: dict[str, Any] = {
        "model": model,
        "scope": scope,
        "key": key,
        "hours": hours,
        "reference_id": rid,
        "versions": versions,
        "settings": settings.to_dict(),
        "events": analysis.events(s, model, limit=20),
    }
    if rid is None or sketch is None:
        return {
            **base,
            "status": "no_data",
            "n": 0,
            "features": [],
            "drifted_features": [],
            "reason": f"no sketches of {model} for {scope} {key} in the last {hours:g} h",
        }
    result = analysis.judge(s, model, rid, sketch, settings.config)
    ref = analysis.get_reference(s, model, rid)
    if ref is not None:  # histograms for the page: reference and live counts per feature
        live = sketch.get("counts", {})
        by_name = {f["name"]: f for f in ref["features"]}
        n = int(result.get("n") or sketch.get("n") or 0)
        det = _detectability(rid, ref, n, settings.config.alpha)
        for f in result.get("features", []):
            spec = by_name.get(f["name"], {})
            f["reference_counts"] = spec.get("counts")
            f["live_counts"] = live.get(f["name"])
            f["edges"] = spec.get("edges")
            f["categories"] = spec.get("categories")
            f["reference_range"] = {
                k: spec.get(k) for k in ("min", "max", "constant", "low_cardinality")
            }
            d = det.get(f["name"])
            f["detectability"] = None if d is None else d.to_dict()
        warnings = ref.get("warnings")
        base["reference_warnings"] = (
            warnings if isinstance(warnings, list) else reference_warnings(ref)
        )
    return {**base, **result}


_DETECTABILITY: dict[tuple[str, int, float], dict[str, Detectability]] = {}


def _detectability(rid: str, ref: dict[str, Any], n: int, alpha: float) -> dict[str, Detectability]:
    """What the reference can detect at this window size; cached per (reference, n, alpha)
    with n rounded to two significant digits (the figures move slowly with n)."""
    if n <= 0:
        return {}
    rounded = int(float(f"{n:.2g}"))
    key = (rid, rounded, alpha)
    hit = _DETECTABILITY.get(key)
    if hit is None:
        if len(_DETECTABILITY) >= 256:
            _DETECTABILITY.clear()
        hit = _DETECTABILITY[key] = detectability(ref, rounded, alpha)
    return hit


@router.get("/{model}")
def get_drift(
    model: str,
    device: str | None = Query(None, description="one device instead of the fleet"),
    scope: str = Query("fleet", description="device | group | release | fleet"),
    key: str = Query("*", description="the device id, group name or version of the scope"),
    hours: float = Query(24.0, gt=0, le=24 * 90),
    s: Session = Depends(session),
    _p: Principal = Depends(need(Perm.READ)),
) -> dict[str, Any]:
    if not _known_model(s, model):
        raise _error(
            404, "unknown_model", f"no package, reference or telemetry of a model named {model!r}"
        )
    bucket_s = analysis.get_settings(s, model).bucket_s
    if hours * 3600 < bucket_s:
        raise _error(
            422,
            "window_shorter_than_bucket",
            f"a window of {hours:g} h is shorter than {model}'s drift bucket of"
            f" {bucket_s / 3600:g} h; sketches are merged per bucket, so the finest window is"
            " one bucket",
        )
    try:
        return drift_view(s, model, device=device, scope=scope, key=key, hours=hours)
    except ValueError as e:
        raise _error(422, "invalid_query", str(e)) from e


def _known_model(s: Session, model: str) -> bool:
    """A model the controller has heard of: a package, a drift reference or a sketch names it."""
    from edgefleet.cloud_controller.drift.models import DriftReference, SketchAggregate
    from edgefleet.cloud_controller.models import Package

    return any(
        s.scalar(select(column).where(column == model).limit(1)) is not None
        for column in (Package.name, DriftReference.model, SketchAggregate.model)
    )


@router.get("/{model}/history")
def get_history(
    model: str,
    scope: str = "fleet",
    key: str = "*",
    limit: int = Query(48, ge=1, le=1000),
    s: Session = Depends(session),
    _p: Principal = Depends(need(Perm.READ)),
) -> dict[str, Any]:
    return {
        "model": model,
        "scope": scope,
        "key": key,
        "buckets": analysis.history(s, model, scope=scope, key=key, limit=limit),
    }


@router.get("/{model}/events")
def get_events(
    model: str,
    limit: int = Query(50, ge=1, le=1000),
    s: Session = Depends(session),
    _p: Principal = Depends(need(Perm.READ)),
) -> dict[str, Any]:
    return {"model": model, "events": analysis.events(s, model, limit)}


@router.get("/{model}/health")
def get_health(
    model: str,
    version: str,
    previous: str | None = None,
    devices: str = Query("", description="comma-separated device ids"),
    hours: float = Query(24.0, gt=0),
    s: Session = Depends(session),
    _p: Principal = Depends(need(Perm.READ)),
) -> dict[str, Any]:
    ids = [d for d in devices.split(",") if d]
    since = datetime.now(UTC) - timedelta(hours=hours)
    return health.wave_health(s, model, version, previous, ids, since)


@router.get("/{model}/ab")
def get_ab(
    model: str,
    a: str,
    b: str,
    devices_a: str = "",
    devices_b: str = "",
    hours: float = Query(24.0, gt=0),
    s: Session = Depends(session),
    _p: Principal = Depends(need(Perm.READ)),
) -> dict[str, Any]:
    return health.compare_versions(
        s,
        model,
        a,
        b,
        since=datetime.now(UTC) - timedelta(hours=hours),
        devices_a=[d for d in devices_a.split(",") if d] or None,
        devices_b=[d for d in devices_b.split(",") if d] or None,
    )


@router.get("/{model}/settings")
def get_settings(
    model: str, s: Session = Depends(session), _p: Principal = Depends(need(Perm.READ))
) -> dict[str, Any]:
    return analysis.get_settings(s, model).to_dict()


@router.put("/{model}/settings")
def put_settings(
    model: str,
    body: dict[str, Any] = Body(...),
    s: Session = Depends(session),
    _p: Principal = Depends(need(Perm.OPERATE)),
) -> dict[str, Any]:
    allowed = {"config", "bucket_s", "scopes", "webhook_url", "webhook_secret"}
    unknown = set(body) - allowed
    if unknown:
        raise _error(422, "invalid_settings", f"unknown fields: {sorted(unknown)}")
    try:
        out = analysis.put_settings(s, model, **body)
    except (TypeError, ValueError) as e:
        raise _error(422, "invalid_settings", str(e)) from e
    s.commit()
    return out.to_dict()


@router.post("/{model}/references")
def post_reference(
    model: str,
    body: dict[str, Any] = Body(...),
    s: Session = Depends(session),
    _p: Principal = Depends(need(Perm.UPLOAD)),
) -> dict[str, Any]:
    """Register a reference by hand (packages uploaded to the registry need not)."""
    version, ref = body.get("version"), body.get("reference")
    if not isinstance(version, str) or not isinstance(ref, dict):
        raise _error(422, "invalid_reference", "send {version, reference}")
    try:
        rid = analysis.register_reference(s, model, version, ref)
    except ReferenceError as e:
        raise _error(422, "invalid_reference", str(e)) from e
    s.commit()
    return {"model": model, "version": version, "reference_id": rid}


@router.post("/evaluate")
def post_evaluate(
    s: Session = Depends(session), _p: Principal = Depends(need(Perm.OPERATE))
) -> dict[str, Any]:
    """Judge every closed bucket now (ingest does this as telemetry arrives)."""
    evs = analysis.evaluate_due(s)
    s.commit()
    pending = any(e.webhook_state == "pending" for e in evs)
    if pending:
        from sqlalchemy.orm import sessionmaker

        from edgefleet.cloud_controller.drift.webhook import deliver_pending

        deliver_pending(sessionmaker(s.get_bind(), expire_on_commit=False))
    return {"events": [analysis.event_dict(e) for e in evs]}
