"""Field health of a release for the rollout engine's soak gates, and A/B comparisons.

``wave_health`` compares the new version on the moved devices with the previous version on
devices of the same kind (same first profile, the moved devices' own history included):

- ``p95_ratio``: p95 latency of the new version / p95 of the previous one, both read from the
  merged latency histograms (``edgefleet.drift.latency``); None until both have
  ``MIN_REQUESTS`` requests.
- ``error_rate``: errors / requests of the new version on the moved devices.
- ``drift``: the largest Jensen–Shannon distance among features the calibrated test flags on
  the merged sketches of the new version on the moved devices (0.0 when none drifted; None
  without a sketch or reference).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.drift.analysis import get_reference, get_settings, summarize
from edgefleet.cloud_controller.drift.models import TelemetryRecord
from edgefleet.drift import latency as lat
from edgefleet.drift.decision import decide
from edgefleet.drift.sketch import SketchError, merge_dicts

MIN_REQUESTS = 20
BASELINE_LOOKBACK = timedelta(days=1)


@dataclass
class VersionFigures:
    version: str | None
    devices: int
    requests: int
    errors: int
    error_rate: float | None
    p50_ms: float | None
    p95_ms: float | None
    drift: float | None
    drift_status: str | None
    drifted_features: list[str]


def _device_kinds(session: Session, device_ids: Sequence[str]) -> dict[str, str]:
    from edgefleet.cloud_controller.models import Device

    out: dict[str, str] = {}
    if not device_ids:
        return out
    for dev in session.scalars(select(Device).where(Device.id.in_(list(device_ids)))):
        profiles = dev.profiles or []
        out[dev.id] = str(profiles[0]) if profiles else str((dev.hardware or {}).get("machine"))
    return out


def _devices_of_kinds(session: Session, kinds: set[str]) -> list[str]:
    from edgefleet.cloud_controller.models import Device

    out = []
    for dev in session.scalars(select(Device)):
        profiles = dev.profiles or []
        kind = str(profiles[0]) if profiles else str((dev.hardware or {}).get("machine"))
        if kind in kinds:
            out.append(dev.id)
    return out


def figures(
    session: Session,
    model: str,
    version: str | None,
    device_ids: Sequence[str] | None,
    since: datetime | None,
) -> VersionFigures:
    """Requests, errors, latency quantiles and drift of one version on some devices."""
    q = select(TelemetryRecord).where(
        TelemetryRecord.model == model,
        TelemetryRecord.kind.in_(("inference", "sketch")),
    )
    if version is not None:
        q = q.where(TelemetryRecord.version == version)
    if device_ids is not None:
        q = q.where(TelemetryRecord.device_id.in_(list(device_ids)))
    if since is not None:
        q = q.where(TelemetryRecord.at >= since)
    hist = [0] * lat.NBUCKETS
    requests = errors = 0
    devices: set[str] = set()
    sketch: dict[str, Any] | None = None
    for rec in session.scalars(q):
        devices.add(rec.device_id)
        if rec.kind == "inference":
            requests += rec.requests or 0
            errors += rec.errors or 0
            h = rec.data.get("latency_hist")
            if isinstance(h, list) and len(h) == lat.NBUCKETS:
                hist = lat.merge(hist, h)
        elif isinstance(rec.data.get("sketch"), dict):
            try:
                sk = rec.data["sketch"]
                sketch = dict(sk) if sketch is None else merge_dicts(sketch, sk)
            except SketchError:
                continue  # another reference (a different build of the version): skip
    drift: float | None = None
    status: str | None = None
    drifted: list[str] = []
    if sketch is not None:
        ref = get_reference(session, model, str(sketch.get("reference_id")))
        if ref is not None:
            res = summarize(decide(ref, sketch, get_settings(session, model).config))
            status = res["status"]
            drifted = list(res["drifted_features"])
            drift = float(res["drift_score"]) if status != "insufficient_data" else None
    ok = sum(hist)
    return VersionFigures(
        version=version,
        devices=len(devices),
        requests=requests,
        errors=errors,
        error_rate=(errors / requests) if requests else None,
        p50_ms=lat.quantile(hist, 0.5) if ok >= MIN_REQUESTS else None,
        p95_ms=lat.quantile(hist, 0.95) if ok >= MIN_REQUESTS else None,
        drift=drift,
        drift_status=status,
        drifted_features=drifted,
    )


def wave_health(
    session: Session,
    model: str,
    version: str,
    previous_version: str | None,
    device_ids: Sequence[str],
    since: datetime | None,
) -> dict[str, Any]:
    """Health figures of ``version`` on the moved devices against ``previous_version``."""
    since = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
    new = figures(session, model, version, list(device_ids), since)
    base: VersionFigures | None = None
    if previous_version:
        kinds = set(_device_kinds(session, device_ids).values())
        peers = _devices_of_kinds(session, kinds) if kinds else list(device_ids)
        base_since = (since - BASELINE_LOOKBACK) if since is not None else None
        base = figures(session, model, previous_version, peers, base_since)
    ratio = None
    if base is not None and new.p95_ms and base.p95_ms:
        ratio = new.p95_ms / base.p95_ms
    return {
        "model": model,
        "version": version,
        "previous_version": previous_version,
        "p95_ratio": ratio,
        "error_rate": new.error_rate,
        "drift": new.drift,
        "new": asdict(new),
        "baseline": asdict(base) if base is not None else None,
    }


HEALTH_TTL_S = 2.0
_cache: dict[tuple[Any, ...], tuple[float, dict[str, Any]]] = {}
_cache_lock = threading.Lock()


def rollout_health(
    session: Session,
    model: str,
    version: str,
    previous_version: str | None,
    device_ids: Sequence[str],
    since: datetime | None,
) -> dict[str, Any]:
    """``wave_health`` for the rollout ticker (called every tick).

    Complete figures are reused for ``HEALTH_TTL_S``; incomplete ones are not cached, so a
    gate sees the new version's first telemetry on the next tick.
    """
    key = (
        id(session.get_bind()),
        model,
        version,
        previous_version,
        tuple(sorted(device_ids)),
        since,
    )
    now = time.monotonic()
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and now - hit[0] < HEALTH_TTL_S:
            return hit[1]
    result = wave_health(session, model, version, previous_version, device_ids, since)
    if result["p95_ratio"] is None or result["error_rate"] is None:
        return result  # figures still arriving: ask again next tick
    with _cache_lock:
        for k in [k for k, (t, _) in _cache.items() if now - t >= HEALTH_TTL_S]:
            del _cache[k]
        _cache[key] = (now, result)
    return result


def compare_versions(
    session: Session,
    model: str,
    version_a: str,
    version_b: str,
    *,
    since: datetime | None = None,
    devices_a: Sequence[str] | None = None,
    devices_b: Sequence[str] | None = None,
) -> dict[str, Any]:
    """A/B: two versions on (split parts of) the fleet side by side, with B/A ratios."""
    since = since or datetime.now(UTC) - BASELINE_LOOKBACK
    a = figures(session, model, version_a, devices_a, since)
    b = figures(session, model, version_b, devices_b, since)

    def ratio(x: float | None, y: float | None) -> float | None:
        return (y / x) if x and y is not None else None

    return {
        "model": model,
        "since": since.isoformat(),
        "a": asdict(a),
        "b": asdict(b),
        "p95_ratio": ratio(a.p95_ms, b.p95_ms),
        "p50_ratio": ratio(a.p50_ms, b.p50_ms),
        "error_rate_diff": (b.error_rate - a.error_rate)
        if a.error_rate is not None and b.error_rate is not None
        else None,
    }
