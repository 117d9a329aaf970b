"""The update state machine: the one table of transitions and failure routes, pure.

Each state's `Route` says where its step may lead, where a failure in it leads, and what a
restarted agent does with an update found in it. The worker's failure handling and the crash
recovery (`agent.journal.decide_recovery`) both read this table; neither decides on its own.

A rollback to a version this device committed (`UpdateRecord.rollback`) takes the install path
without the forward gates (benchmark, probation); where it would fail it ends ROLLBACK_FAILED,
final and loud, with what served before it still serving.

A removal (`Agent.remove_model`) is an update record too, with its own short path through the same
table: IDLE -> REMOVING -> REMOVED. REMOVING is journaled before anything is deleted, so a restart
finishes it; REMOVED is terminal. The record's `action` ("install" or "remove") says which path the
worker takes from IDLE.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from edgefleet.wire.states import UpdateState

State = UpdateState
S = State


class OnRestart(StrEnum):
    """What a restarted agent does first with an update it finds in a state."""

    NOTHING = "nothing"  # terminal: the update is over
    RESUME = "resume"  # re-run the state's step (idempotent); too many times: the failure route
    DISTRUST = "distrust"  # the new version was serving: the failure route, unless stopped in order
    FINISH_ROLLBACK = "finish_rollback"  # finish putting the previous version back
    FINISH_REMOVAL = "finish_removal"  # finish deleting; a removal is never abandoned


@dataclass(frozen=True)
class Route:
    """A state's edges: where its step may lead, where a failure leads, what a restart does."""

    next: frozenset[State]
    failure: State | None  # None: nothing in this state can fail (terminal, or it only finishes)
    restart: OnRestart


def _route(failure: State | None, restart: OnRestart, *nxt: State) -> Route:
    return Route(frozenset(nxt), failure, restart)


R = OnRestart
#: The one table: every edge of an update, the failure route of every state included.
#: Before activation a failure is FAILED (the old model never stopped serving); from ACTIVATING
#: on the new version may serve, so a failure (or giving up after crashes) is a rollback.
ROUTES: dict[State, Route] = {
    S.IDLE: _route(S.FAILED, R.RESUME, S.DOWNLOADING, S.FAILED, S.REMOVING, S.ROLLBACK_FAILED),
    S.DOWNLOADING: _route(S.FAILED, R.RESUME, S.VERIFYING, S.FAILED, S.ROLLBACK_FAILED),
    S.VERIFYING: _route(S.FAILED, R.RESUME, S.INSTALLING, S.FAILED, S.ROLLBACK_FAILED),
    S.INSTALLING: _route(S.FAILED, R.RESUME, S.VALIDATING, S.FAILED, S.ROLLBACK_FAILED),
    S.VALIDATING: _route(S.FAILED, R.RESUME, S.ACTIVATING, S.FAILED, S.ROLLBACK_FAILED),
    # A swap that cannot complete puts the previous version back: that is a rollback.
    S.ACTIVATING: _route(S.ROLLING_BACK, R.RESUME, S.PROBATION, S.ROLLING_BACK),
    # A crash while the new version serves is a reason to distrust it; an orderly stop (e.g. a
    # restart to change the config) only restarts the probation window.
    S.PROBATION: _route(S.ROLLING_BACK, R.DISTRUST, S.COMMITTED, S.ROLLING_BACK),
    # A rollback (to a version committed here) that could not land ends ROLLBACK_FAILED, after
    # putting back what served before it when it got as far as activating.
    S.ROLLING_BACK: _route(None, R.FINISH_ROLLBACK, S.ROLLED_BACK, S.ROLLBACK_FAILED),
    S.COMMITTED: _route(None, R.NOTHING),
    S.FAILED: _route(None, R.NOTHING),
    S.ROLLED_BACK: _route(None, R.NOTHING),
    # Explicit uninstall: unload, delete pointers and versions; nothing to roll back to.
    S.REMOVING: _route(None, R.FINISH_REMOVAL, S.REMOVED),
    S.REMOVED: _route(None, R.NOTHING),
    S.ROLLBACK_FAILED: _route(None, R.NOTHING),
}
TRANSITIONS: dict[State, frozenset[State]] = {s: r.next for s, r in ROUTES.items()}
TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
# States in which the running model is still the old one: a failure there is FAILED.
BEFORE_ACTIVATION = frozenset(s for s, r in ROUTES.items() if r.failure is S.FAILED)


def failure_route(state: State, rollback: bool = False) -> State | None:
    """Where a failure in ``state`` leads: FAILED, ROLLING_BACK, or None (it cannot fail).

    For a rollback to a version committed here, FAILED is ROLLBACK_FAILED: the update was the
    way back, and it did not land.
    """
    target = ROUTES[state].failure
    return S.ROLLBACK_FAILED if rollback and target is S.FAILED else target


def end_of_rollback(rollback: bool) -> State:
    """Where ROLLING_BACK ends: ROLLED_BACK, or ROLLBACK_FAILED for a rollback update."""
    return S.ROLLBACK_FAILED if rollback else S.ROLLED_BACK


class TransitionError(RuntimeError):
    """A transition the table does not allow."""


def check_transition(current: State, target: State) -> None:
    """Raise TransitionError when `current -> target` is not in the table."""
    if target not in TRANSITIONS[current]:
        raise TransitionError(f"transition {current} -> {target} is not allowed")


def is_terminal(state: State) -> bool:
    return state in TERMINAL
