"""What the agent says over MQTT, built from what the agent knows (pure).

A status report from an update event (`status_from_event`) and the presence message from the
inventory (`presence_of`); the message types and their JSON are `edgefleet.wire`'s.
"""

from __future__ import annotations

from edgefleet.agent.ports import Inventory
from edgefleet.agent.update.events import UpdateEvent
from edgefleet.wire.message import now_iso
from edgefleet.wire.presence import InstalledModel, Presence
from edgefleet.wire.reasons import reason_of
from edgefleet.wire.states import parse_state
from edgefleet.wire.status import StatusReport


def status_from_event(
    event: UpdateEvent, device_id: str, *, rollout_id: str | None, desired_seq: int | None
) -> StatusReport | None:
    """The report of one update transition; None for a state this wire does not know (a
    journal from a newer agent), which is not reported rather than reported wrong.

    ``rollout_id`` is the event's own, else the one the link remembers for that update.
    """
    if event.kind == "shadow":
        return StatusReport(
            device_id=device_id,
            at=event.timestamp or now_iso(),
            kind="shadow",
            state=None,
            model=event.model,
            version=event.version,
            rollout_id=event.rollout_id if event.rollout_id is not None else rollout_id,
            update_id=event.update_id,
            from_version=event.from_version,
            desired_seq=desired_seq,
            figures=event.figures or None,
        )
    state = parse_state(event.state)
    if state is None:
        return None
    code = event.reason_code
    return StatusReport(
        device_id=device_id,
        at=event.timestamp or now_iso(),
        kind="update",
        state=state,
        model=event.model,
        version=event.version,
        reason_code=reason_of(code) if code else None,
        reason=event.reason,
        rollout_id=event.rollout_id if event.rollout_id is not None else rollout_id,
        update_id=event.update_id,
        from_version=event.from_version,
        desired_seq=desired_seq,
        local=event.local,
        figures=event.figures or None,
    )


def presence_of(inventory: Inventory, *, at: str) -> Presence:
    """Online, with the device's facts and installed models as `Agent.inventory()` has them."""
    return Presence(
        device_id=inventory["device_id"],
        online=True,
        at=at,
        agent_version=inventory["agent_version"],
        execution_providers=list(inventory["execution_providers"]),
        profiles=list(inventory["profiles"]),
        hardware=inventory["hardware"],
        models={
            name: InstalledModel(m["version"], m["previous"], m["state"])
            for name, m in inventory["models"].items()
        },
    )
