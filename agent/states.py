"""The update state machine: the one transition table, pure.

A removal (`Agent.remove_model`) is an update record too, with its own short path through the same
table: IDLE -> REMOVING -> REMOVED. REMOVING is journaled before anything is deleted, so a restart
finishes it; REMOVED is terminal. The record's `action` ("install" or "remove") says which path the
worker takes from IDLE.
"""

from __future__ import annotations

from edgefleet.wire.states import UpdateState

State = UpdateState
S = State

TRANSITIONS: dict[State, frozenset[State]] = {
    S.IDLE: frozenset({S.DOWNLOADING, S.FAILED, S.REMOVING}),
    S.DOWNLOADING: frozenset({S.VERIFYING, S.FAILED}),
    S.VERIFYING: frozenset({S.INSTALLING, S.FAILED}),
    S.INSTALLING: frozenset({S.VALIDATING, S.FAILED}),
    S.VALIDATING: frozenset({S.ACTIVATING, S.FAILED}),
    # A swap that cannot complete puts the previous version back: that is a rollback.
    S.ACTIVATING: frozenset({S.PROBATION, S.ROLLING_BACK}),
    S.PROBATION: frozenset({S.COMMITTED, S.ROLLING_BACK}),
    S.ROLLING_BACK: frozenset({S.ROLLED_BACK}),
    S.COMMITTED: frozenset(),
    S.FAILED: frozenset(),
    S.ROLLED_BACK: frozenset(),
    # Explicit uninstall: unload, delete pointers and versions; nothing to roll back to.
    S.REMOVING: frozenset({S.REMOVED}),
    S.REMOVED: frozenset(),
}

TERMINAL = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)
# States in which the running model is still the old one and FAILED is allowed.
BEFORE_ACTIVATION = frozenset({S.IDLE, S.DOWNLOADING, S.VERIFYING, S.INSTALLING, S.VALIDATING})


class TransitionError(RuntimeError):
    """A transition the table does not allow."""


def check_transition(current: State, target: State) -> None:
    """Raise TransitionError when `current -> target` is not in the table."""
    if target not in TRANSITIONS[current]:
        raise TransitionError(f"transition {current} -> {target} is not allowed")


def is_terminal(state: State) -> bool:
    return state in TERMINAL
