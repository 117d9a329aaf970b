"""Rollout state as plain JSON (one header + one row per device) and its counts."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from typing import Any

from edgefleet.cloud_controller.rollout_types import (
    DeviceProgress,
    DevState,
    Gates,
    Phase,
    RolloutSpec,
    RolloutState,
    ShadowGates,
    Target,
)


def counts(state: RolloutState) -> dict[str, Any]:
    """Per device-state counts, overall and per wave, plus rollback progress (a device whose
    way back failed counts in `rollback_failed`, never as rolled back). From the state's
    tallies: no pass over the devices (the shell writes this header after every batch)."""
    total: Counter[str] = Counter()
    per_wave: list[Counter[str]] = [Counter() for _ in state.wave_sizes]
    assert state.tally is not None and state.rollbacks is not None
    for (wave, st), n in state.tally.items():
        total[st.value] += n
        if 0 <= wave < len(per_wave):
            per_wave[wave][st.value] += n
    waves = [{"size": size, **c} for size, c in zip(state.wave_sizes, per_wave, strict=True)]
    rb = state.rollbacks
    return {
        "total": len(state.devices),
        "states": dict(total),
        "waves": waves,
        "rollback_requested": rb.get("requested", 0) + rb.get("done", 0) + rb.get("failed", 0),
        "rolled_back": rb.get("done", 0),
        "rollback_failed": rb.get("failed", 0),
    }


def spec_to_dict(spec: RolloutSpec) -> dict[str, Any]:
    return asdict(spec)


def spec_from_dict(data: Mapping[str, Any]) -> RolloutSpec:
    d = dict(data)
    t = d.pop("target", {}) or {}
    g = d.pop("gates", {}) or {}
    sh = d.pop("shadow", None)
    return RolloutSpec(
        shadow=ShadowGates(**sh) if sh else None,
        target=Target(**{k: tuple(v) for k, v in t.items()}),
        gates=Gates(**g),
        waves=tuple(float(w) for w in d.pop("waves", (5.0, 25.0, 100.0))),
        approval_waves=tuple(int(w) for w in d.pop("approval_waves", ())),
        **d,
    )


_DEVICE_FIELDS = tuple(f.name for f in fields(DeviceProgress))


def device_to_dict(dev: DeviceProgress) -> dict[str, Any]:
    """`dataclasses.asdict`, without its deep copy of every field: all but ``shadow`` are
    scalars (the rollouts write every device a report moved, thousands per second)."""
    out = {name: getattr(dev, name) for name in _DEVICE_FIELDS}
    if dev.shadow is not None:
        out["shadow"] = copy.deepcopy(dev.shadow)
    return out


def device_from_dict(data: Mapping[str, Any]) -> DeviceProgress:
    d = dict(data)
    d["state"] = DevState(d["state"])
    return DeviceProgress(**d)


def header_to_dict(state: RolloutState) -> dict[str, Any]:
    """Rollout-level fields (devices are stored one row each)."""
    return {
        "wave_sizes": list(state.wave_sizes),
        "phase": state.phase.value,
        "paused": state.paused,
        "wave": state.wave,
        "wave_done_at": state.wave_done_at,
        "approved": list(state.approved),
        "dispatch_times": list(state.dispatch_times),
        "reason": state.reason,
        "created_at": state.created_at,
        "finished_at": state.finished_at,
        "wave_plan": list(state.wave_plan),
        "shadow_passed": list(state.shadow_passed),
        "shadow_started_at": state.shadow_started_at,
        "shadow_waves": [dict(w) for w in state.shadow_waves],
    }


def state_from_parts(
    spec: RolloutSpec, header: Mapping[str, Any], devices: Iterable[DeviceProgress]
) -> RolloutState:
    return RolloutState(
        spec=spec,
        devices={d.device_id: d for d in devices},
        wave_sizes=tuple(header["wave_sizes"]),
        phase=Phase(header["phase"]),
        paused=bool(header["paused"]),
        wave=int(header["wave"]),
        wave_done_at=header["wave_done_at"],
        approved=tuple(header["approved"]),
        dispatch_times=tuple(header["dispatch_times"]),
        reason=header["reason"],
        created_at=float(header["created_at"]),
        finished_at=header["finished_at"],
        wave_plan=tuple(int(w) for w in header.get("wave_plan") or ()),
        shadow_passed=tuple(int(w) for w in header.get("shadow_passed") or ()),
        shadow_started_at=header.get("shadow_started_at"),
        shadow_waves=tuple(header.get("shadow_waves") or ()),
    )
