"""The update journal: one JSON record per update, rewritten atomically before each transition
takes effect. `decide_recovery` (pure) says what a restarted agent does with a record."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Required, TypedDict, cast

from edgefleet.agent.fsio import atomic_write_json, clean_temp, read_json_object
from edgefleet.agent.states import ROUTES, OnRestart, State, check_transition, is_terminal
from edgefleet.wire.message import JsonObject, now_iso


@dataclass
class Transition:
    state: str
    at: str
    reason_code: str | None = None
    reason: str | None = None
    figures: JsonObject | None = None


class TransitionDict(TypedDict, total=False):
    """A `Transition` as the journal file holds it (`asdict`)."""

    state: Required[str]
    at: Required[str]
    reason_code: str | None
    reason: str | None
    figures: JsonObject | None


class _RecordFields(TypedDict, total=False):
    """An `UpdateRecord`'s fields other than ``history``, as the journal file holds them."""

    id: Required[str]
    model: Required[str]
    version: Required[str]
    source: Required[str]
    sha256: str | None
    size: int | None
    rollout_id: str | None
    allow_downgrade: bool
    controller_source: bool
    max_p95_ratio: float | None
    shadow: JsonObject | None
    rollback: bool
    from_previous: str | None
    action: str
    state: str
    from_version: str | None
    profile: str | None
    resumes: int
    stopped_gracefully: bool


@dataclass
class UpdateRecord:
    id: str
    model: str
    version: str
    source: str
    sha256: str | None = None
    size: int | None = None
    rollout_id: str | None = None
    allow_downgrade: bool = False
    controller_source: bool = False
    # The rollout's probation latency ratio (desired state), else the agent config's.
    max_p95_ratio: float | None = None
    # Shadow first (`agent.shadow`): the desired state's ShadowSpec as JSON; None: no shadow.
    shadow: JsonObject | None = None
    # A rollback to a version this device committed: not held to the forward gates.
    rollback: bool = False
    action: str = "install"  # or "remove": IDLE -> REMOVING -> REMOVED (see agent.states)
    state: str = State.IDLE.value
    from_version: str | None = None  # the version serving when the update started
    from_previous: str | None = None  # the previous pointer then (a rollback restores both)
    profile: str | None = None
    resumes: int = 0
    stopped_gracefully: bool = False  # the agent was stopped (not killed) in this state
    history: list[Transition] = field(default_factory=list)

    @property
    def current(self) -> State:
        return State(self.state)

    def last(self) -> Transition:
        return self.history[-1]

    def to_dict(self) -> JsonObject:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> UpdateRecord:
        """The record `to_dict` wrote. The journal's own files, so the shapes are cast, not
        checked: a foreign key or a missing field still fails here with TypeError."""
        hist = [Transition(**t) for t in cast("list[TransitionDict]", d.get("history", []))]
        fields = cast(_RecordFields, {k: v for k, v in d.items() if k != "history"})
        return cls(**fields, history=hist)


def new_update_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


class Journal:
    """Update records under DATA_DIR/updates/ID.json."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir / "updates"
        self.dir.mkdir(parents=True, exist_ok=True)
        clean_temp(self.dir)

    def path(self, update_id: str) -> Path:
        return self.dir / f"{update_id}.json"

    def save(self, rec: UpdateRecord) -> None:
        atomic_write_json(self.path(rec.id), rec.to_dict())

    def create(self, rec: UpdateRecord) -> None:
        rec.history = [Transition(State.IDLE.value, now_iso())]
        rec.state = State.IDLE.value
        self.save(rec)

    def transition(
        self,
        rec: UpdateRecord,
        target: State,
        reason_code: str | None = None,
        reason: str | None = None,
        figures: JsonObject | None = None,
    ) -> Transition:
        """Persist `target` (atomically, fsynced) and only then update the in-memory record."""
        check_transition(rec.current, target)
        t = Transition(target.value, now_iso(), reason_code, reason, figures)
        data = rec.to_dict()
        data["state"] = target.value
        data["history"] = [*(asdict(h) for h in rec.history), asdict(t)]
        atomic_write_json(self.path(rec.id), data)
        rec.state = target.value
        rec.history.append(t)
        return t

    def load(self, update_id: str) -> UpdateRecord | None:
        p = self.path(update_id)
        if not p.exists():
            return None
        return UpdateRecord.from_dict(read_json_object(p))

    def all(self) -> list[UpdateRecord]:
        recs = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                recs.append(UpdateRecord.from_dict(read_json_object(p)))
            except (ValueError, TypeError, KeyError):
                continue  # unreadable records are never half-written (atomic); skip foreign files
        recs.sort(key=lambda r: (r.history[0].at if r.history else "", r.id))
        return recs

    def prune(self, keep: int) -> int:
        """Delete the oldest finished records beyond `keep` (a gateway runs for months)."""
        done = [r for r in self.all() if is_terminal(r.current)]
        old = done[: max(0, len(done) - keep)]
        for r in old:
            self.path(r.id).unlink(missing_ok=True)
        return len(old)

    def unfinished(self) -> list[UpdateRecord]:
        return [r for r in self.all() if not is_terminal(r.current)]


class Recovery(StrEnum):
    NONE = "none"  # terminal: nothing to do
    RESUME = "resume"  # re-run the recorded state's step (each step is idempotent)
    FAIL = "fail"  # give up along a FAILED failure route: the old model keeps serving
    ROLL_BACK = "roll_back"  # give up along a ROLLING_BACK route: trust the previous version
    FINISH_ROLLBACK = "finish_rollback"
    FINISH_REMOVAL = "finish_removal"  # REMOVING interrupted: delete what is left, REMOVED


#: Giving up on an update: where its state's failure route leads, as a recovery.
_GIVE_UP = {State.FAILED: Recovery.FAIL, State.ROLLING_BACK: Recovery.ROLL_BACK}


def decide_recovery(
    state: State,
    resumes: int,
    max_resumes: int = 3,
    stopped_gracefully: bool = False,
    removal: bool = False,
    rollback: bool = False,
) -> Recovery:
    """What a restarted agent does with an update found in `state` (pure), as the state's route
    in `agent.states.ROUTES` says: resume it (at most `max_resumes` times), finish it, or give
    up along its failure route.

    A removal is never given up: still IDLE, it waits its turn again; in REMOVING it is finished.
    A rollback to a version committed here is not distrusted for a restart in PROBATION (it has
    no probation to pass): it resumes, and commits.
    """
    route = ROUTES[state]
    if route.restart is OnRestart.NOTHING:
        return Recovery.NONE
    if route.restart is OnRestart.FINISH_REMOVAL:
        return Recovery.FINISH_REMOVAL
    if removal:
        return Recovery.RESUME
    if route.restart is OnRestart.FINISH_ROLLBACK:
        return Recovery.FINISH_ROLLBACK
    resumable = (
        route.restart is OnRestart.RESUME
        or stopped_gracefully
        or (rollback and route.restart is OnRestart.DISTRUST)
    )
    if resumable and resumes < max_resumes:
        return Recovery.RESUME
    assert route.failure is not None, f"{state} resumes but has no failure route"
    return _GIVE_UP[route.failure]
