"""The pure rollout decision engine: no I/O, no clock reads (time is an input).

`plan(...)` builds the initial state of a rollout; `handle(state, event, now)` returns the next
state and the actions the I/O shell (`cloud_controller.rollouts`) must apply. The vocabulary is
in `cloud_controller.rollout_types`, the JSON form in `cloud_controller.rollout_codec`; both are
re-exported here so that `from cloud_controller import rollout_engine as E` is all one needs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from edgefleet.cloud_controller.rollout_codec import (
    counts,
    device_from_dict,
    device_to_dict,
    header_to_dict,
    spec_from_dict,
    spec_to_dict,
    state_from_parts,
)
from edgefleet.cloud_controller.rollout_types import (
    ABORT_MIN_FLOOR,
    ABORT_MIN_PCT,
    DEFAULT_RETRIES,
    FAILURES,
    FINISHED,
    MOVED,
    TERMINAL_PHASES,
    Abort,
    Action,
    Approve,
    Cancel,
    Decision,
    DeviceInfo,
    DeviceProgress,
    DevState,
    Dispatch,
    Event,
    Gates,
    Health,
    Log,
    OnAbort,
    Pause,
    Phase,
    Resume,
    Revert,
    RolloutSpec,
    RolloutState,
    ShadowGates,
    ShadowReport,
    SpecError,
    StatusReport,
    Target,
    Tick,
    rollbacks_of,
    tally_of,
)
from edgefleet.wire.reasons import ReasonCode, is_transient
from edgefleet.wire.states import FAILURE_STATES, SUCCESS_STATES, UpdateState

__all__ = [
    "ABORT_MIN_FLOOR",
    "ABORT_MIN_PCT",
    "DEFAULT_RETRIES",
    "FAILURES",
    "FINISHED",
    "MOVED",
    "TERMINAL_PHASES",
    "Abort",
    "Action",
    "Approve",
    "Cancel",
    "Decision",
    "DevState",
    "DeviceInfo",
    "DeviceProgress",
    "Dispatch",
    "Event",
    "Gates",
    "Health",
    "Log",
    "OnAbort",
    "Pause",
    "Phase",
    "Resume",
    "Revert",
    "RolloutSpec",
    "RolloutState",
    "ShadowGates",
    "ShadowReport",
    "SpecError",
    "StatusReport",
    "Target",
    "Tick",
    "abort_min",
    "choose_profile",
    "counts",
    "device_from_dict",
    "device_shadow",
    "device_to_dict",
    "gate_violation",
    "handle",
    "handle_all",
    "header_to_dict",
    "plan",
    "planned_waves",
    "resolve_target",
    "rollbacks_of",
    "shadow_verdict",
    "spec_from_dict",
    "spec_to_dict",
    "state_from_parts",
    "tally_of",
    "validate_spec",
    "wave_sizes",
]


def _tally(state: RolloutState) -> Mapping[tuple[int, DevState], int]:
    assert state.tally is not None
    return state.tally


class _Devices(dict[str, DeviceProgress]):
    """A rollout's devices while one call of the engine owns them (`_open`): written in place
    by `_put`, each write recorded, so that a batch of reports costs what its reports touch,
    not a copy of every device per report. Sealed when the call returns: the state it gave
    back is never written again (the next call copies it first)."""

    __slots__ = ("changed", "open")

    def __init__(self, devices: Mapping[str, DeviceProgress]) -> None:
        super().__init__(devices)
        self.open = True
        self.changed: set[str] = set()


def _open(state: RolloutState) -> RolloutState:
    """A private copy of `state` the engine may write: one copy of the device map (C speed),
    the derived tallies copied too. The caller's state is left as it was."""
    assert state.rollbacks is not None
    return replace(
        state,
        devices=_Devices(state.devices),
        tally=dict(_tally(state)),
        rollbacks=dict(state.rollbacks),
    )


def _seal(state: RolloutState, actions: Iterable[Action]) -> Decision:
    devices = state.devices
    assert isinstance(devices, _Devices)
    devices.open = False
    return Decision(state, tuple(actions), frozenset(devices.changed))


# --- planning ------------------------------------------------------------------------------


def validate_spec(spec: RolloutSpec) -> None:
    if not spec.waves:
        raise SpecError("waves: at least one wave is required")
    prev = 0.0
    for pct in spec.waves:
        if not 0 < pct <= 100 or pct <= prev:
            raise SpecError(f"waves: must increase within (0, 100], got {list(spec.waves)}")
        prev = pct
    if spec.waves[-1] != 100:
        raise SpecError("waves: the last wave must be 100 %")
    if spec.device_timeout_s <= 0:
        raise SpecError("device_timeout_s: must be > 0")
    if spec.max_retries < 0 or spec.retry_backoff_s < 0:
        raise SpecError("max_retries/retry_backoff_s: must be >= 0")
    if not 0 <= spec.success_threshold_pct <= 100:
        raise SpecError("success_threshold_pct: must be within [0, 100]")
    if not 0 <= spec.abort_failure_pct <= 100:
        raise SpecError("abort_failure_pct: must be within [0, 100]")
    if spec.abort_min_finished is not None and spec.abort_min_finished < 1:
        raise SpecError("abort_min_finished: must be >= 1 (or absent for the default)")
    if spec.on_abort not in {m.value for m in OnAbort}:
        raise SpecError(f"on_abort: {spec.on_abort!r}; use one of {[m.value for m in OnAbort]}")
    if spec.rate_per_min is not None and spec.rate_per_min < 1:
        raise SpecError("rate_per_min: must be >= 1")
    if spec.soak_s < 0:
        raise SpecError("soak_s: must be >= 0")
    if any(w < 0 or w >= len(spec.waves) for w in spec.approval_waves):
        raise SpecError("approval_waves: wave index out of range")
    if spec.shadow is not None:
        _validate_shadow(spec.shadow)


def _validate_shadow(s: ShadowGates) -> None:
    from edgefleet.wire.shadow import ShadowError, parse_spec

    if not 0 <= s.min_agreement <= 1:
        raise SpecError("shadow.min_agreement: must be within [0, 1]")
    if not (s.max_p95_ratio > 0 and math.isfinite(s.max_p95_ratio)):
        raise SpecError("shadow.max_p95_ratio: must be a positive number")
    if not (s.timeout_s > 0 and math.isfinite(s.timeout_s)):
        raise SpecError("shadow.timeout_s: must be > 0")
    try:  # what the devices will be sent must hold on the wire
        parse_spec(device_shadow(s))
    except ShadowError as e:
        raise SpecError(str(e)) from e


def device_shadow(s: ShadowGates) -> dict[str, Any]:
    """The desired state's ``shadow`` entry for this rollout (`edgefleet.wire.shadow`)."""
    return {
        "requests": s.requests,
        "sample": s.sample,
        "window_s": s.window_s,
        "rtol": s.rtol,
        "atol": s.atol,
        "compare": s.compare,
    }


def resolve_target(devices: Iterable[DeviceInfo], target: Target) -> list[DeviceInfo]:
    """Devices named by id, or in any of the groups, or carrying any of the tags (sorted)."""
    ids, groups, tags = set(target.device_ids), set(target.groups), set(target.tags)
    chosen = [
        d
        for d in devices
        if d.device_id in ids or groups.intersection(d.groups) or tags.intersection(d.tags)
    ]
    return sorted(chosen, key=lambda d: d.device_id)


def choose_profile(device: DeviceInfo, release_profiles: Iterable[str]) -> str | None:
    """The device's first profile (its order of preference) that the release has a package for."""
    available = set(release_profiles)
    return next((p for p in device.profiles if p in available), None)


def wave_sizes(n: int, waves: Sequence[float]) -> tuple[int, ...]:
    """Devices per wave for `n` devices and cumulative percentages (each wave >= 1 when possible)."""
    sizes: list[int] = []
    done = 0
    for pct in waves:
        cum = min(n, max(done + (1 if done < n else 0), math.ceil(n * pct / 100 - 1e-9)))
        sizes.append(cum - done)
        done = cum
    return tuple(sizes)


def abort_min(spec: RolloutSpec, planned: int) -> int:
    """The abort rule's minimum sample: the spec's, else max(floor, % of planned devices)."""
    if spec.abort_min_finished is not None:
        return spec.abort_min_finished
    return max(ABORT_MIN_FLOOR, math.ceil(planned * ABORT_MIN_PCT / 100 - 1e-9))


def _abort_due(state: RolloutState, finished: int, failures: int) -> bool:
    """Failures over the abort percentage of max(finished, minimum sample): a small sample
    cannot abort on one noisy device, a broken release still aborts on its first failures."""
    spec = state.spec
    sample = max(finished, abort_min(spec, sum(state.wave_sizes)))
    return failures > 0 and failures * 100 > spec.abort_failure_pct * sample


def planned_waves(state: RolloutState) -> list[float]:
    """The cumulative percentage of each planned wave."""
    plan = state.wave_plan or tuple(range(len(state.wave_sizes)))
    return [state.spec.waves[i] for i in plan]


def plan(
    spec: RolloutSpec,
    devices: Iterable[DeviceInfo],
    release_profiles: Iterable[str],
    now: float,
) -> Decision:
    """Resolve the target, shuffle compatible devices with the spec's seed, assign waves."""
    validate_spec(spec)
    profiles = list(release_profiles)
    targets = resolve_target(devices, spec.target)
    compatible: list[tuple[DeviceInfo, str]] = []
    progress: dict[str, DeviceProgress] = {}
    for d in targets:
        profile = choose_profile(d, profiles)
        if profile is None:
            progress[d.device_id] = DeviceProgress(
                d.device_id,
                -1,
                None,
                d.previous_version,
                DevState.INCOMPATIBLE,
                reason_code=ReasonCode.PROFILE_INCOMPATIBLE,
                reason=f"no package for profiles {list(d.profiles)}",
            )
        else:
            compatible.append((d, profile))
    random.Random(spec.seed).shuffle(compatible)
    # More waves than devices: the waves that would be empty are not planned.
    keep = tuple(w for w, n in enumerate(wave_sizes(len(compatible), spec.waves)) if n)
    sizes = tuple(wave_sizes(len(compatible), spec.waves)[w] for w in keep)
    i = 0
    for wave, size in enumerate(sizes):
        for d, profile in compatible[i : i + size]:
            progress[d.device_id] = DeviceProgress(d.device_id, wave, profile, d.previous_version)
        i += size
    state = RolloutState(
        spec=spec, devices=_Devices(progress), wave_sizes=sizes, created_at=now, wave_plan=keep
    )
    logs: list[Action] = [
        Log(
            f"planned {len(targets)} target devices: {len(compatible)} compatible in waves "
            f"{list(sizes)} (seed {spec.seed}), {len(targets) - len(compatible)} incompatible"
            + (
                f"; {len(spec.waves) - len(keep)} empty waves not planned"
                if compatible and len(keep) < len(spec.waves)
                else ""
            )
        )
    ]
    if not compatible:
        state = replace(
            state, phase=Phase.ABORTED, reason="no compatible target devices", finished_at=now
        )
        logs.append(Log("aborted: no compatible target devices"))
        return _seal(state, logs)
    state = _enter_wave(state, 0, now, logs)
    return _seal(_advance(state, now, None, logs).state, logs)


# --- event handling ------------------------------------------------------------------------


def handle(state: RolloutState, event: Event, now: float) -> Decision:
    """Apply one event at time `now` and advance the rollout as far as it can go."""
    return handle_all(state, (event,), now)


def handle_all(state: RolloutState, events: Iterable[Event], now: float) -> Decision:
    """`handle` each event in order; the actions of all of them, in order. The state given is
    not changed: it is copied once for the whole batch (`_open`), which the events then write
    in place, so a batch costs one copy of the device map plus what its events touch."""
    state = _open(state)
    actions: list[Action] = []
    for ev in events:
        d = _handle(state, ev, now)
        state = d.state
        actions.extend(d.actions)
    return _seal(state, actions)


def _handle(state: RolloutState, event: Event, now: float) -> Decision:
    actions: list[Action] = []
    health: Health | None = None
    if isinstance(event, Tick):
        health = event.health
    elif isinstance(event, StatusReport):
        before = state.devices.get(event.device_id)
        state = _on_status(state, event, now, actions)
        after = state.devices.get(event.device_id)
        if state.phase in TERMINAL_PHASES or (
            before is not None and after is not None and before.state == after.state
        ):  # progress only (DOWNLOADING...): nothing to decide
            return Decision(state, tuple(actions))
        if after is not None and after.state != DevState.WAITING_RETRY:
            light = _after_result(state, now, actions)
            if light is not None:
                return light
    elif isinstance(event, ShadowReport):
        state = _on_shadow(state, event)
        if state.phase in TERMINAL_PHASES:
            return Decision(state, tuple(actions))
    elif state.phase in TERMINAL_PHASES:
        actions.append(Log(f"ignored {type(event).__name__.lower()}: rollout is {state.phase}"))
        return Decision(state, tuple(actions))
    elif isinstance(event, Approve):
        wave = state.wave if event.wave is None else event.wave
        if wave not in state.approved:
            state = replace(state, approved=(*state.approved, wave))
            actions.append(Log(f"wave {wave + 1} approved"))
    elif isinstance(event, Pause):
        if not state.paused:
            state = replace(state, paused=True)
            actions.append(Log("paused"))
    elif isinstance(event, Resume):
        if state.paused:
            state = replace(state, paused=False)
            actions.append(Log("resumed"))
    elif isinstance(event, Cancel):
        mode = OnAbort.ROLLBACK if event.rollback else OnAbort.HALT
        return Decision(*_finish(state, Phase.CANCELLED, "cancelled", now, mode, actions))
    elif isinstance(event, Abort):
        mode = OnAbort(event.on_abort or state.spec.on_abort)
        return Decision(*_finish(state, Phase.ABORTED, event.reason, now, mode, actions))
    if state.phase in TERMINAL_PHASES:
        return Decision(state, tuple(actions))
    return _advance(state, now, health, actions)


def _on_status(
    state: RolloutState, ev: StatusReport, now: float, actions: list[Action]
) -> RolloutState:
    dev = state.devices.get(ev.device_id)
    if dev is None or dev.wave < 0:
        return state
    spec = state.spec
    # After an abort/cancel-with-rollback: confirmation that the device is back.
    if dev.rollback == "requested":
        if ev.model is not None and ev.model != spec.model:
            return state
        back = ev.version == dev.previous_version and ev.state in SUCCESS_STATES
        self_rolled = ev.version == spec.version and ev.state == UpdateState.ROLLED_BACK
        if ev.state == UpdateState.ROLLBACK_FAILED or (
            ev.version == dev.previous_version and ev.state in FAILURE_STATES
        ):
            return _put(state, _rollback_failed(spec, dev, ev, actions))
        # A first install is undone by an explicit removal (the model was in `remove`).
        removed = dev.previous_version is None and ev.state == UpdateState.REMOVED
        if removed:
            actions.append(
                Log(f"{dev.device_id}: {spec.model} removed (it had no previous version)")
            )
            return _put(state, replace(dev, rollback="done"))
        if back or self_rolled:
            actions.append(Log(f"{dev.device_id}: back on {dev.previous_version}"))
            return _put(state, replace(dev, rollback="done"))
        return state
    if ev.version != spec.version or (ev.rollout_id and ev.rollout_id != spec.rollout_id):
        return state
    if dev.state not in (DevState.IN_PROGRESS, DevState.WAITING_RETRY):
        return state
    if state.phase in TERMINAL_PHASES and dev.state != DevState.IN_PROGRESS:
        return state  # after a plain cancel only the devices still at work are followed
    dev = replace(dev, agent_state=ev.state)
    if ev.state in SUCCESS_STATES:
        actions.append(Log(f"{dev.device_id}: succeeded (attempt {dev.attempts})"))
        return _put(
            state,
            replace(
                dev,
                state=DevState.SUCCEEDED,
                finished_at=now,
                retry_at=None,
                reason_code=None,
                reason=None,
            ),
        )
    if ev.state == UpdateState.ROLLBACK_FAILED and dev.state == DevState.IN_PROGRESS:
        # The release failed and so did the device's own way back: final, and loud.
        code = ev.reason_code or "rollback_failed"
        final = replace(spec, max_retries=0)
        dev = _fail(final, dev, DevState.FAILED, code, ev.reason, now, actions)
        why = f"{code}: {ev.reason}" if ev.reason else str(code)
        actions.append(Log(f"{dev.device_id}: ROLLBACK FAILED ({why})"))
        return _put(state, replace(dev, rollback="failed", rollback_reason=why))
    if ev.state in FAILURE_STATES and dev.state == DevState.IN_PROGRESS:
        code = ev.reason_code or ev.state.lower()
        ended = state.phase in TERMINAL_PHASES  # no retry once the rollout is over
        spec_ = replace(spec, max_retries=0) if ended else spec
        if ended and dev.rollback is None:
            # followed after a halt: it does not run the release, so it must not get it later
            actions.append(Revert(dev.device_id, dev.profile, dev.previous_version))
        return _put(state, _fail(spec_, dev, DevState.FAILED, code, ev.reason, now, actions))
    return _put(state, dev)


def _on_shadow(state: RolloutState, ev: ShadowReport) -> RolloutState:
    """Keep the device's newest shadow figures (they count since its shadow began)."""
    dev = state.devices.get(ev.device_id)
    spec = state.spec
    if dev is None or dev.wave < 0 or spec.shadow is None or ev.version != spec.version:
        return state
    if ev.rollout_id and ev.rollout_id != spec.rollout_id:
        return state
    if dev.state != DevState.IN_PROGRESS and state.phase not in TERMINAL_PHASES:
        return state
    return _put(state, replace(dev, shadow=dict(ev.figures)))


def _fig_int(fig: Mapping[str, object] | None, key: str) -> int:
    total = fig.get("total") if fig else None
    v = total.get(key) if isinstance(total, Mapping) else None
    return v if isinstance(v, int) else 0


def _fig_ratio(fig: Mapping[str, object] | None) -> float | None:
    if not fig:
        return None
    s, c = fig.get("serving_p95_ms"), fig.get("candidate_p95_ms")
    if not isinstance(s, int | float) or not isinstance(c, int | float) or s <= 0:
        return None
    return float(c) / float(s)


def shadow_verdict(
    gates: ShadowGates, figures: Sequence[Mapping[str, object] | None]
) -> tuple[str | None, dict[str, object]]:
    """(None to promote, else the reason code; the wave's figures) from its devices' newest
    shadow figures: agreement pooled over the wave's compared requests, the p95 ratio the
    worst device's (a candidate slow on one gateway is slow there)."""
    compared = sum(_fig_int(f, "compared") for f in figures)
    agreed = sum(_fig_int(f, "agreed") for f in figures)
    errors = sum(_fig_int(f, "candidate_errors") for f in figures)
    dropped = sum(_fig_int(f, "dropped") for f in figures)
    ratios = [r for r in (_fig_ratio(f) for f in figures) if r is not None]
    agreement = agreed / compared if compared else None
    ratio = max(ratios) if ratios else None
    out: dict[str, object] = {
        "devices": len(figures),
        "compared": compared,
        "agreed": agreed,
        "candidate_errors": errors,
        "dropped": dropped,
        "agreement": round(agreement, 6) if agreement is not None else None,
        "p95_ratio": round(ratio, 4) if ratio is not None else None,
        "min_agreement": gates.min_agreement,
        "max_p95_ratio": gates.max_p95_ratio,
    }
    if not compared:
        return ReasonCode.SHADOW_NO_TRAFFIC.value, out
    # a mirrored request the candidate failed on is a disagreement
    if agreed < gates.min_agreement * (compared + errors):
        return ReasonCode.SHADOW_DISAGREEMENT.value, out
    if ratio is not None and ratio > gates.max_p95_ratio:
        return ReasonCode.SHADOW_TOO_SLOW.value, out
    return None, out


def _shadow_gate(
    state: RolloutState, now: float, actions: list[Action]
) -> tuple[RolloutState, Decision | None]:
    """Judge the current wave's shadow once every device in it compared enough requests (or
    the shadow timed out): promote it (the devices get the release without shadow) or abort
    (the candidate is dropped: the devices are put back on the version they serve)."""
    gates = state.spec.shadow
    assert gates is not None
    wave = [d for d in state.devices.values() if d.wave == state.wave]
    if any(d.state in (DevState.PENDING, DevState.WAITING_RETRY) for d in wave):
        return state, None
    shadowing = [d for d in wave if d.state == DevState.IN_PROGRESS]
    if not shadowing or state.shadow_started_at is None:
        return state, None  # all finished (failed): the wave rules decide
    enough = all(_fig_int(d.shadow, "compared") >= gates.requests for d in shadowing)
    timed_out = now >= state.shadow_started_at + gates.timeout_s
    if not (enough or timed_out):
        return state, None
    code, figures = shadow_verdict(gates, [d.shadow for d in shadowing])
    figures = {
        "wave": state.wave,
        "verdict": code or "promoted",
        "at": now,
        "timed_out": timed_out and not enough,
        **figures,
    }
    state = replace(state, shadow_waves=(*state.shadow_waves, figures))
    desc = (
        f"wave {state.wave + 1} shadow: {figures['compared']} compared on {len(shadowing)}"
        f" devices, agreement {figures['agreement']}, p95 ratio {figures['p95_ratio']}"
    )
    if code is None:
        actions.append(Log(f"{desc}: promoted"))
        for d in sorted(shadowing, key=lambda d: d.device_id):
            assert d.profile is not None
            state = _put(state, replace(d, deadline=now + state.spec.device_timeout_s))
            actions.append(Dispatch(d.device_id, d.profile, d.attempts, shadow=False))
        state = replace(state, shadow_passed=(*state.shadow_passed, state.wave))
        return state, None
    why = {
        ReasonCode.SHADOW_NO_TRAFFIC.value: "no request compared before the shadow timeout",
        ReasonCode.SHADOW_DISAGREEMENT.value: f"agreement below {gates.min_agreement:g}",
        ReasonCode.SHADOW_TOO_SLOW.value: f"p95 ratio above {gates.max_p95_ratio:g}",
    }[code]
    actions.append(Log(f"{desc}: {code} ({why}); the candidate is dropped"))
    for d in shadowing:
        state = _put(
            state,
            replace(d, state=DevState.FAILED, finished_at=now, reason_code=code, reason=why),
        )
    # halt: the failed devices get their serving version back as desired (the candidate is
    # dropped); rollback: earlier waves' devices go back too.
    return state, Decision(
        *_finish(state, Phase.ABORTED, f"{code}: {desc}", now, _mode(state.spec), actions)
    )


def _rollback_failed(
    spec: RolloutSpec, dev: DeviceProgress, ev: StatusReport, actions: list[Action]
) -> DeviceProgress:
    """A device could not go back to its previous version: asked again when the reason is
    transient (within the spec's retries), else a final, loud `rollback="failed"`."""
    code = ev.reason_code or ev.state.lower()
    why = f"{code}: {ev.reason}" if ev.reason else code
    if is_transient(code) and dev.rollback_attempts < max(1, spec.max_retries):
        actions.append(Log(f"{dev.device_id}: rollback to {dev.previous_version}: {why}; again"))
        actions.append(Revert(dev.device_id, dev.profile, dev.previous_version))
        return replace(dev, rollback_attempts=dev.rollback_attempts + 1, rollback_reason=why)
    actions.append(Log(f"{dev.device_id}: ROLLBACK FAILED to {dev.previous_version} ({why})"))
    return replace(dev, rollback="failed", rollback_reason=why)


def _fail(
    spec: RolloutSpec,
    dev: DeviceProgress,
    final: DevState,
    code: str,
    reason: str | None,
    now: float,
    actions: list[Action],
) -> DeviceProgress:
    retryable = final == DevState.TIMED_OUT or is_transient(code)
    if retryable and dev.attempts <= spec.max_retries:
        delay = spec.retry_backoff_s * (2 ** (dev.attempts - 1))
        actions.append(Log(f"{dev.device_id}: {code}, retry in {delay:g}s"))
        return replace(
            dev,
            state=DevState.WAITING_RETRY,
            retry_at=now + delay,
            deadline=None,
            reason_code=code,
            reason=reason,
        )
    actions.append(Log(f"{dev.device_id}: {final} ({code}{': ' + reason if reason else ''})"))
    return replace(
        dev, state=final, finished_at=now, retry_at=None, reason_code=code, reason=reason
    )


def _put(state: RolloutState, dev: DeviceProgress) -> RolloutState:
    """Write one device's progress into the state the current call owns (`_open`), and keep
    its tallies: no copy, no pass over the other devices."""
    devices = state.devices
    if not (isinstance(devices, _Devices) and devices.open):
        state = _open(state)  # not ours to write (a state handed in from outside)
        devices = state.devices
        assert isinstance(devices, _Devices)
    old = devices[dev.device_id]
    if old is dev:
        return state
    devices[dev.device_id] = dev
    devices.changed.add(dev.device_id)
    if (old.wave, old.state) != (dev.wave, dev.state):
        tally = cast(dict[tuple[int, DevState], int], state.tally)
        k = (old.wave, old.state)
        tally[k] -= 1
        if not tally[k]:
            del tally[k]
        k = (dev.wave, dev.state)
        tally[k] = tally.get(k, 0) + 1
    if old.rollback != dev.rollback:
        rollbacks = cast(dict[str, int], state.rollbacks)
        if old.rollback:
            rollbacks[old.rollback] -= 1
            if not rollbacks[old.rollback]:
                del rollbacks[old.rollback]
        if dev.rollback:
            rollbacks[dev.rollback] = rollbacks.get(dev.rollback, 0) + 1
    return state


def _enter_wave(state: RolloutState, wave: int, now: float, actions: list[Action]) -> RolloutState:
    """Move to `wave`, skipping empty waves; wait for approval when the spec asks for it."""
    while wave < len(state.wave_sizes) and state.wave_sizes[wave] == 0:
        wave += 1
    if wave >= len(state.wave_sizes):
        actions.append(Log("all waves passed"))
        return replace(
            state, wave=len(state.wave_sizes) - 1, phase=Phase.SUCCEEDED, finished_at=now
        )
    spec_wave = state.wave_plan[wave] if state.wave_plan else wave
    phase = (
        Phase.AWAITING_APPROVAL
        if spec_wave in state.spec.approval_waves and wave not in state.approved
        else Phase.RUNNING
    )
    actions.append(
        Log(
            f"wave {wave + 1}/{len(state.wave_sizes)} ({state.wave_sizes[wave]} devices)"
            + (": waiting for approval" if phase == Phase.AWAITING_APPROVAL else " started")
        )
    )
    return replace(state, wave=wave, phase=phase, wave_done_at=None, shadow_started_at=None)


def _after_result(state: RolloutState, now: float, actions: list[Action]) -> Decision | None:
    """A device finished: the abort rule from the tally, without a pass over the devices.
    None when its wave is complete (the full `_advance` decides the wave). Time-based work
    (timeouts, due retries, rate-limited dispatch) is left to the next tick."""
    tally = _tally(state)
    finished = sum(n for (_, st), n in tally.items() if st in FINISHED)
    failures = sum(n for (_, st), n in tally.items() if st in FAILURES)
    if _abort_due(state, finished, failures):
        return None  # the full pass aborts, with its message
    if state.phase in (Phase.RUNNING, Phase.SOAKING):
        in_wave = sum(n for (w, _), n in tally.items() if w == state.wave)
        done = sum(n for (w, st), n in tally.items() if w == state.wave and st in FINISHED)
        if in_wave and done == in_wave:
            return None
    return Decision(state, tuple(actions))


@dataclass
class _Scan:
    """One pass over the devices: what `_advance` needs to decide."""

    finished: int = 0
    failures: int = 0
    wave_n: int = 0
    wave_finished: int = 0
    wave_ok: int = 0
    expired: list[DeviceProgress] = field(default_factory=list)
    due: list[DeviceProgress] = field(default_factory=list)


def _scan(state: RolloutState, now: float) -> _Scan:
    sc = _Scan()
    retries: list[DeviceProgress] = []
    pending: list[DeviceProgress] = []
    for d in state.devices.values():
        st = d.state
        if st in FINISHED:
            sc.finished += 1
            if st != DevState.SUCCEEDED:
                sc.failures += 1
        elif st == DevState.IN_PROGRESS:
            if d.deadline is not None and now >= d.deadline:
                sc.expired.append(d)
        elif st == DevState.WAITING_RETRY and d.retry_at is not None and now >= d.retry_at:
            retries.append(d)
        if d.wave == state.wave:
            sc.wave_n += 1
            if st in FINISHED:
                sc.wave_finished += 1
                if st == DevState.SUCCEEDED:
                    sc.wave_ok += 1
            elif st == DevState.PENDING:
                pending.append(d)
    retries.sort(key=lambda d: d.device_id)
    pending.sort(key=lambda d: d.device_id)
    sc.due = retries + pending
    return sc


def _advance(
    state: RolloutState, now: float, health: Health | None, actions: list[Action]
) -> Decision:
    spec = state.spec
    sc = _scan(state, now)
    # 1. Timeouts (they run while paused too: the device was already asked).
    if sc.expired:
        for dev in sc.expired:
            why = f"no result within {spec.device_timeout_s:g}s"
            state = _put(
                state, _fail(spec, dev, DevState.TIMED_OUT, ReasonCode.TIMEOUT, why, now, actions)
            )
        sc = _scan(state, now)
    # 2. The abort rule, over every device finished so far.
    finished, failures = sc.finished, sc.failures
    minimum = abort_min(spec, sum(state.wave_sizes))
    if _abort_due(state, finished, failures):
        reason = (
            f"failures {failures}/{finished} finished over {spec.abort_failure_pct:g} % of "
            f"max(finished, minimum sample {minimum})"
        )
        return Decision(*_finish(state, Phase.ABORTED, reason, now, _mode(spec), actions))
    if state.phase == Phase.AWAITING_APPROVAL and state.wave in state.approved:
        state = replace(state, phase=Phase.RUNNING)
        actions.append(Log(f"wave {state.wave + 1} started"))
    # 3. Shadow: the wave's candidate is judged before it may serve.
    spec_shadow = spec.shadow is not None and state.wave not in state.shadow_passed
    if spec_shadow and state.phase == Phase.RUNNING:
        state, verdict = _shadow_gate(state, now, actions)
        if verdict is not None:
            return verdict
        sc = _scan(state, now)
    # 4. Wave completion -> success threshold -> soak -> health gates -> next wave.
    if (
        state.phase in (Phase.RUNNING, Phase.SOAKING)
        and sc.wave_n
        and (sc.wave_finished == sc.wave_n)
    ):
        ok, n = sc.wave_ok, sc.wave_n
        below = ok * 100 < spec.success_threshold_pct * n
        if below and finished >= minimum:
            reason = (
                f"wave {state.wave + 1}: {ok}/{n} succeeded, below {spec.success_threshold_pct:g} %"
            )
            return Decision(*_finish(state, Phase.ABORTED, reason, now, _mode(spec), actions))
        if below and state.phase == Phase.RUNNING:
            actions.append(
                Log(
                    f"wave {state.wave + 1}: {ok}/{n} succeeded, below "
                    f"{spec.success_threshold_pct:g} %, but {finished} finished is under the "
                    f"minimum sample {minimum}: the abort rule decides"
                )
            )
        if state.phase == Phase.RUNNING:
            state = replace(state, phase=Phase.SOAKING, wave_done_at=now)
            actions.append(Log(f"wave {state.wave + 1} done ({ok}/{n}), soak {spec.soak_s:g}s"))
        violated = gate_violation(spec.gates, health)
        if violated:
            why = f"health gate: {violated}"
            return Decision(*_finish(state, Phase.ABORTED, why, now, _mode(spec), actions))
        done_at = state.wave_done_at if state.wave_done_at is not None else now
        if now >= done_at + spec.soak_s and not state.paused:
            state = _enter_wave(state, state.wave + 1, now, actions)
            if state.phase == Phase.SUCCEEDED:
                return Decision(state, tuple(actions))
            return _advance(state, now, health, actions)
    # 5. Dispatch: pending devices of the current wave, retries that are due; rate limited.
    if state.phase == Phase.RUNNING and not state.paused:
        state = _dispatch(state, sc.due, now, actions)
    return Decision(state, tuple(actions))


def gate_violation(gates: Gates, health: Health | None) -> str | None:
    """The first violated health gate, or None (missing figures do not violate)."""
    if health is None:
        return None
    checks = (
        ("p95 latency ratio", health.p95_ratio, gates.max_p95_ratio),
        ("error rate", health.error_rate, gates.max_error_rate),
        ("drift", health.drift, gates.max_drift),
    )
    for name, value, limit in checks:
        if value is not None and limit is not None and value > limit:
            return f"{name} {value:g} > {limit:g}"
    return None


def _dispatch(
    state: RolloutState, due: list[DeviceProgress], now: float, actions: list[Action]
) -> RolloutState:
    """Send retries that are due, then pending devices of the current wave (sorted by id)."""
    spec = state.spec
    recent = tuple(t for t in state.dispatch_times if t > now - 60.0)
    budget = (spec.rate_per_min - len(recent)) if spec.rate_per_min else None
    if budget is not None:
        due = due[: max(0, budget)]
    if not due:
        return replace(state, dispatch_times=recent) if spec.rate_per_min else state
    shadow = spec.shadow is not None and state.wave not in state.shadow_passed
    extra = spec.shadow.timeout_s if shadow and spec.shadow is not None else 0.0
    for dev in due:
        attempt = dev.attempts + 1
        # a device of a wave already promoted (a retry) gets the release without shadow
        in_shadow = shadow and dev.wave == state.wave
        state = _put(
            state,
            replace(
                dev,
                state=DevState.IN_PROGRESS,
                attempts=attempt,
                started_at=dev.started_at if dev.started_at is not None else now,
                deadline=now + spec.device_timeout_s + (extra if in_shadow else 0.0),
                retry_at=None,
            ),
        )
        assert dev.profile is not None
        actions.append(Dispatch(dev.device_id, dev.profile, attempt, shadow=in_shadow))
    times = (*recent, *([now] * len(due))) if spec.rate_per_min else ()
    started = state.shadow_started_at
    if shadow and started is None:
        started = now
    return replace(state, dispatch_times=times, shadow_started_at=started)


def _mode(spec: RolloutSpec) -> OnAbort:
    return OnAbort(spec.on_abort)


def _finish(
    state: RolloutState,
    phase: Phase,
    reason: str,
    now: float,
    mode: OnAbort,
    actions: list[Action],
) -> tuple[RolloutState, tuple[Action, ...]]:
    """End the rollout. No device is dispatched after this (the spread stops at once).

    `halt`: devices that took the release keep it; devices still at work are followed; the
    desired state of devices known not to run it (failed, timed out, waiting for a retry) is
    set back to their previous version, so none picks it up later. `rollback`: every moved
    device with a previous version is put back on it. A first install (no previous version)
    is never uninstalled from a device that committed it, unless the spec says
    `remove_first_installs`: without it, such a device keeps the release.
    """
    spec = state.spec
    rollback = mode == OnAbort.ROLLBACK
    reverted = kept = 0
    for dev in list(state.devices.values()):
        if dev.state == DevState.PENDING:
            state = _put(state, replace(dev, state=DevState.SKIPPED))
            continue
        if dev.state not in MOVED or dev.rollback is not None:
            continue
        new = dev
        if dev.state == DevState.WAITING_RETRY and not rollback:
            # no retry will come: the last failure stands
            new = replace(dev, state=DevState.FAILED, finished_at=now, retry_at=None)
        elif rollback and dev.state in (DevState.IN_PROGRESS, DevState.WAITING_RETRY):
            new = replace(
                dev,
                state=DevState.FAILED,
                finished_at=now,
                retry_at=None,
                reason_code="rollout_" + phase.value,
                reason=reason,
            )
        # Failed before activating, or rolled itself back: it still runs the previous version.
        runs_previous = dev.state in (DevState.FAILED, DevState.WAITING_RETRY) and (
            dev.agent_state in FAILURE_STATES
        )
        first = dev.previous_version is None
        if not rollback:
            if dev.state in (DevState.SUCCEEDED, DevState.IN_PROGRESS):
                state = _put(state, new)
                continue  # it took the release (or is taking it): left alone, followed
            # It does not run the release (or we do not know): it must not pick it up later.
            actions.append(Revert(dev.device_id, dev.profile, dev.previous_version))
        elif first and not spec.remove_first_installs:
            if dev.state == DevState.SUCCEEDED:
                kept += 1
                actions.append(
                    Log(f"{dev.device_id}: keeps {spec.version} (a first install is not removed)")
                )
            else:
                actions.append(Revert(dev.device_id, dev.profile, None))
        else:
            actions.append(Revert(dev.device_id, dev.profile, dev.previous_version, remove=first))
            new = replace(new, rollback="done" if runs_previous else "requested")
            reverted += 1
        state = _put(state, new)
    what = f"; reverting {reverted} devices" if rollback else "; halted (moved devices keep it)"
    if kept:
        what += f"; {kept} first installs kept"
    actions.append(Log(f"{phase}: {reason}{what}"))
    state = replace(state, phase=phase, reason=reason, finished_at=now, paused=False)
    return state, tuple(actions)
