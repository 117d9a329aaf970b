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
