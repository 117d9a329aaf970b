"""Rollouts as the API shows them: summary, detail (devices and events), the list."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.db import iso
from edgefleet.cloud_controller.models import Rollout, RolloutEvent


def summary(state: E.RolloutState) -> dict[str, Any]:
    return {
        "id": state.spec.rollout_id,
        "model": state.spec.model,
        "version": state.spec.version,
        "phase": state.phase.value,
        "paused": state.paused,
        "wave": state.wave,
        "waves": E.planned_waves(state),  # of the planned waves (empty ones are not)
        "wave_sizes": list(state.wave_sizes),
        "reason": state.reason,
        "counts": E.counts(state),
        "created_at": state.created_at,
        "finished_at": state.finished_at,
        "spec": E.spec_to_dict(state.spec),
        "shadow": shadow_evidence(state),
    }


def shadow_evidence(state: E.RolloutState) -> dict[str, Any] | None:
    """The shadow phase's evidence: each judged wave's figures and verdict, and each device's
    newest figures (counts and latencies only: no input ever leaves a device for this)."""
    if state.spec.shadow is None:
        return None
    devices: list[dict[str, Any]] = []
    for d in sorted(state.devices.values(), key=lambda d: (d.wave, d.device_id)):
        f = d.shadow
        if not f:
            continue
        total = f.get("total") or {}
        compared = int(total.get("compared") or 0)
        s95, c95 = f.get("serving_p95_ms"), f.get("candidate_p95_ms")
        devices.append(
            {
                "device_id": d.device_id,
                "wave": d.wave,
                "compared": compared,
                "agreed": int(total.get("agreed") or 0),
                "agreement": round(int(total.get("agreed") or 0) / compared, 6)
                if compared
                else None,
                "candidate_errors": int(total.get("candidate_errors") or 0),
                "dropped": int(total.get("dropped") or 0),
                "serving_p95_ms": s95,
                "candidate_p95_ms": c95,
                "p95_ratio": round(c95 / s95, 4) if s95 and c95 is not None else None,
                "window": f.get("window"),
            }
        )
    return {
        "promoted_waves": list(state.shadow_passed),
        "waves": [dict(w) for w in state.shadow_waves],
        "devices": devices,
    }


def detail(session: Session, state: E.RolloutState) -> dict[str, Any]:
    out = summary(state)
    out["devices"] = [
        E.device_to_dict(d) for d in sorted(state.devices.values(), key=lambda d: d.device_id)
    ]
    events = session.scalars(
        select(RolloutEvent)
        .where(RolloutEvent.rollout_id == state.spec.rollout_id)
        .order_by(RolloutEvent.id)
    )
    out["events"] = [{"at": e.at, "message": e.message} for e in events]
    return out


def list_rollouts(session: Session) -> list[dict[str, Any]]:
    rows = session.scalars(select(Rollout).order_by(Rollout.created_at.desc()))
    return [
        {
            "id": r.id,
            "model": r.model,
            "version": r.version,
            "phase": r.phase,
            "wave": r.state.get("wave"),
            "counts": r.state.get("counts"),
            "reason": r.state.get("reason"),
            "created_at": iso(r.created_at),
            "created_by": r.created_by,
        }
        for r in rows
    ]
