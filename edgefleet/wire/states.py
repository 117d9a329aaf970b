"""The update state names every process uses: the agent journals them, reports them in its
status messages, and the controller reads them back. Defined here once.

The allowed transitions and the failure route of each state are the agent's business
(`edgefleet.agent.states`); this module only names the states and groups them as the controller
sees them.
"""

from __future__ import annotations

from enum import StrEnum

from edgefleet.wire.message import member_named


class UpdateState(StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    INSTALLING = "INSTALLING"
    VALIDATING = "VALIDATING"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"
    REMOVING = "REMOVING"
    REMOVED = "REMOVED"
    # A rollback to a version the device had committed could not land (its files are gone or
    # altered, its key is no longer trusted, it does not load): the device still runs what it
    # ran before the rollback. Final and loud: an operator must act.
    ROLLBACK_FAILED = "ROLLBACK_FAILED"


#: An update in one of these states is over: nothing more happens to it.
TERMINAL_STATES = frozenset(
    {
        UpdateState.COMMITTED,
        UpdateState.FAILED,
        UpdateState.ROLLED_BACK,
        UpdateState.REMOVED,
        UpdateState.ROLLBACK_FAILED,
    }
)
#: The new version serves and has passed probation.
SUCCESS_STATES = frozenset({UpdateState.COMMITTED})
#: The new version does not serve: refused before activation, or rolled back after it.
FAILURE_STATES = frozenset(
    {UpdateState.FAILED, UpdateState.ROLLED_BACK, UpdateState.ROLLBACK_FAILED}
)


def parse_state(text: object) -> UpdateState | None:
    """The state named by ``text``, or None when it names none."""
    return member_named(UpdateState, text)
