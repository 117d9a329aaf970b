"""Rollout vocabulary: specs, device progress, rollout state, the engine's actions and events.

Plain frozen dataclasses (no behaviour beyond derived fields); `cloud_controller.rollout_engine`
decides, `cloud_controller.rollout_codec` stores them as JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    SOAKING = "soaking"
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"
    CANCELLED = "cancelled"


TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.ABORTED, Phase.CANCELLED})


class OnAbort(StrEnum):
    """What an abort does to the devices that already took the release (it always stops the
    spread: no device gets it after the abort)."""

    HALT = "halt"  # leave them on it; devices known not to run it get their previous version
    ROLLBACK = "rollback"  # put them back on their previous version


#: The abort rule's minimum sample when the spec gives none: failures are compared with
#: max(finished, this many) devices, so one noisy device in a small group cannot abort.
ABORT_MIN_FLOOR = 5
ABORT_MIN_PCT = 2.0  # ... or this % of the planned devices, when that is more
DEFAULT_RETRIES = 2  # attempts after the first, for transient failures and timeouts


class DevState(StrEnum):
    PENDING = "pending"  # in a wave, not dispatched yet
    IN_PROGRESS = "in_progress"  # desired state published, waiting for the device
    WAITING_RETRY = "waiting_retry"  # failed/timed out, will be dispatched again
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    INCOMPATIBLE = "incompatible"  # no package for any of its profiles: reported, not failed
    SKIPPED = "skipped"  # never dispatched (rollout aborted/cancelled first)


FINISHED = frozenset({DevState.SUCCEEDED, DevState.FAILED, DevState.TIMED_OUT})
FAILURES = frozenset({DevState.FAILED, DevState.TIMED_OUT})
MOVED = frozenset(
    {
        DevState.IN_PROGRESS,
        DevState.WAITING_RETRY,
        DevState.SUCCEEDED,
        DevState.FAILED,
        DevState.TIMED_OUT,
    }
)


@dataclass(frozen=True)
class Target:
    device_ids: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.device_ids or self.groups or self.tags)


@dataclass(frozen=True)
class DeviceInfo:
    """What the engine needs to know about a device when a rollout is planned."""

    device_id: str
    profiles: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    previous_version: str | None = None


@dataclass(frozen=True)
class Gates:
    """Health gates checked during soak; `None` disables a gate."""

    max_p95_ratio: float | None = None
    max_error_rate: float | None = None
    max_drift: float | None = None


@dataclass(frozen=True)
class ShadowGates:
    """Run each wave's candidate in shadow first (docs/shadow.md): the wave is promoted when
    every device in it compared ``requests`` mirrored requests (or ``timeout_s`` after the
    wave's first dispatch), with agreement >= ``min_agreement`` and candidate/serving p95 <=
    ``max_p95_ratio``; otherwise the rollout aborts and the candidate is dropped."""

    requests: int = 200
    min_agreement: float = 0.99
    max_p95_ratio: float = 1.5
    sample: float = 1.0  # fraction of live requests mirrored
    timeout_s: float = 900.0
    window_s: float = 10.0
    rtol: float = 1e-3
    atol: float = 1e-4
    compare: str = "auto"


@dataclass(frozen=True)
class Health:
    """Figures for the new version on the moved devices (the drift analysis computes them)."""

    p95_ratio: float | None = None
    error_rate: float | None = None
    drift: float | None = None


@dataclass(frozen=True)
class RolloutSpec:
    rollout_id: str
    model: str
    version: str
    target: Target = field(default_factory=Target)
    waves: tuple[float, ...] = (5.0, 25.0, 100.0)  # cumulative percentages
    device_timeout_s: float = 600.0
    max_retries: int = DEFAULT_RETRIES  # transient failures and timeouts only
    retry_backoff_s: float = 30.0  # doubled per attempt
    success_threshold_pct: float = 100.0  # of a wave's devices, to pass it
    abort_failure_pct: float = 20.0  # abort when failures > this % ...
    abort_min_finished: int | None = None  # ... of max(finished, this); None = default
    approval_waves: tuple[int, ...] = ()  # wave indexes that wait for approval first
    rate_per_min: int | None = None
    soak_s: float = 0.0
    gates: Gates = field(default_factory=Gates)
    seed: int = 0
    on_abort: str = OnAbort.HALT.value
    remove_first_installs: bool = False  # only then may an abort uninstall a first install
    shadow: ShadowGates | None = None  # None: no shadow phase


@dataclass(frozen=True)
class DeviceProgress:
    device_id: str
    wave: int  # -1 when incompatible
    profile: str | None
    previous_version: str | None
    state: DevState = DevState.PENDING
    attempts: int = 0
    started_at: float | None = None
    deadline: float | None = None
    retry_at: float | None = None
    finished_at: float | None = None
    agent_state: str | None = None
    reason_code: str | None = None
    reason: str | None = None
    rollback: str | None = None  # None | "requested" | "done" | "failed"
    rollback_attempts: int = 0
    rollback_reason: str | None = None  # why the rollback failed (code: text)
    # The newest shadow figures of this device (`edgefleet.wire.shadow.ShadowFigures` JSON).
    shadow: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RolloutState:
    spec: RolloutSpec
    devices: Mapping[str, DeviceProgress]
    wave_sizes: tuple[int, ...]
    phase: Phase = Phase.RUNNING
    paused: bool = False
    wave: int = 0
    wave_done_at: float | None = None
    approved: tuple[int, ...] = ()
    dispatch_times: tuple[float, ...] = ()
    reason: str | None = None
    created_at: float = 0.0
    finished_at: float | None = None
    # The spec wave (index into spec.waves) of each planned wave: waves that would hold no
    # device are not planned. Empty = one planned wave per spec wave (older rows).
    wave_plan: tuple[int, ...] = ()
    # Devices per (wave, state), derived from `devices`: kept up to date by `_put` so that a
    # status report is decided without a pass over every device. None = compute it.
    # Shadow: the planned waves promoted, when the current wave's shadow began (its first
    # dispatch), and each judged wave's evidence (figures and verdict).
    shadow_passed: tuple[int, ...] = ()
    shadow_started_at: float | None = None
    shadow_waves: tuple[Mapping[str, Any], ...] = ()
    tally: Mapping[tuple[int, DevState], int] | None = field(
        default=None, compare=False, repr=False
    )
    # Devices per rollback mark ("requested", "done", "failed"), derived like `tally`: the
    # counts and whether a finished rollout still waits on a device need no pass either.
    rollbacks: Mapping[str, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.tally is None:
            object.__setattr__(self, "tally", tally_of(self.devices))
        if self.rollbacks is None:
            object.__setattr__(self, "rollbacks", rollbacks_of(self.devices))


def tally_of(devices: Mapping[str, DeviceProgress]) -> dict[tuple[int, DevState], int]:
    return dict(Counter((d.wave, d.state) for d in devices.values()))


def rollbacks_of(devices: Mapping[str, DeviceProgress]) -> dict[str, int]:
    return dict(Counter(d.rollback for d in devices.values() if d.rollback))


# --- actions -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dispatch:
    """Set this release as the device's desired version (new seq, so also a retry)."""

    device_id: str
    profile: str
    attempt: int
    shadow: bool = False  # in shadow: install and verify, load beside the serving version


@dataclass(frozen=True)
class Revert:
    """Set the previous version as desired again (allow_downgrade). Without one (a first
    install) the model leaves the desired state: the device keeps what it has, unless `remove`
    (the operator asked for it) puts it on the explicit removal list."""

    device_id: str
    profile: str | None
    previous_version: str | None
    remove: bool = False


@dataclass(frozen=True)
class Log:
    message: str


Action = Dispatch | Revert | Log


@dataclass(frozen=True)
class Decision:
    state: RolloutState
    actions: tuple[Action, ...]
    # The devices whose progress differs from the state the engine was given (the rows the
    # shell writes); None when not known (compare the two states).
    changed: frozenset[str] | None = None


# --- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    health: Health | None = None


@dataclass(frozen=True)
class StatusReport:
    device_id: str
    version: str
    state: str
    reason_code: str | None = None
    reason: str | None = None
    rollout_id: str | None = None
    model: str | None = None  # None: the rollout's model (the shell routes reports by model)


@dataclass(frozen=True)
class ShadowReport:
    """One shadow window of a device (figures as `edgefleet.wire.shadow.parse_figures` read)."""

    device_id: str
    version: str
    figures: Mapping[str, Any]
    rollout_id: str | None = None


@dataclass(frozen=True)
class Approve:
    wave: int | None = None  # None = the wave that waits now


@dataclass(frozen=True)
class Pause:
    pass


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Cancel:
    rollback: bool = False


@dataclass(frozen=True)
class Abort:
    reason: str = "aborted by operator"
    on_abort: str | None = None  # None = the spec's


Event = Tick | StatusReport | ShadowReport | Approve | Pause | Resume | Cancel | Abort


class SpecError(ValueError):
    """A rollout spec that cannot run; the message names the field."""
