"""What the agent's satellites need from `Agent`, as typed Protocols, and the inventory's shape.

The MQTT link (`agent.mqtt`), the telemetry service (`agent.telemetry`) and the admin endpoint
(`agent.admin`) depend on these Protocols, not on `agent.runtime`: they can be tested with a
small fake, and `runtime` can build them without an import cycle. `Agent` satisfies every one
(it subclasses them explicitly, so mypy checks every signature against them).
"""

from __future__ import annotations

from typing import Protocol, TypedDict, runtime_checkable

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.update.events import InferenceObserver, UpdateListener, UpdateRequest
from edgefleet.wire.message import JsonObject


class ModelEntry(TypedDict):
    """One installed model, as `Agent.inventory()` reports it."""

    version: str
    previous: str | None
    state: str  # the last update's state, or SERVING / INSTALLED without one
    serving: bool
    profile: str | None
    providers: list[str]


class Inventory(TypedDict):
    """`Agent.inventory()`: what the device is and what it runs."""

    device_id: str
    agent_version: str
    execution_providers: list[str]
    hardware: JsonObject
    profiles: list[str]
    models: dict[str, ModelEntry]


def serving_versions(inventory: Inventory) -> dict[str, str]:
    """model -> the version installed and served: the one reading of the inventory's models."""
    return {name: m["version"] for name, m in inventory["models"].items()}


class UpdateView(TypedDict, total=False):
    """An update record as the admin endpoint shows it (`UpdateRecord.to_dict()` plus the last
    reason); only the fields readers rely on are named."""

    id: str
    model: str
    version: str
    state: str
    reason_code: str | None
    reason: str | None


class UpdateSubmitter(Protocol):
    """Takes updates and removals; each is journaled first and runs after earlier ones."""

    def submit_update(self, req: UpdateRequest) -> str: ...

    def remove_model(self, name: str, rollout_id: str | None = None) -> str: ...


class AgentPort(UpdateSubmitter, Protocol):
    """What the MQTT link needs: updates in, update events and the inventory out."""

    def add_listener(self, cb: UpdateListener) -> None: ...

    def remove_listener(self, cb: UpdateListener) -> None: ...

    def inventory(self) -> Inventory: ...

    def unfinished_installs(self) -> dict[str, str]:
        """model -> version of installs not finished yet (e.g. resumed after a restart)."""
        ...

    def steer_shadow(self, name: str, version: str | None, shadow: bool) -> None:
        """What the newest desired state wants of ``name``: a candidate in shadow is promoted
        (same version, no shadow) or dropped (another version, or None) accordingly."""
        ...


class ReferenceSource(Protocol):
    """The drift reference of a serving model (from its signed manifest), if it has one."""

    def reference(self, model: str) -> JsonObject | None: ...


@runtime_checkable
class ObservedAgent(ReferenceSource, Protocol):
    """What the telemetry service observes: inferences, update events, the inventory."""

    def add_inference_observer(self, cb: InferenceObserver) -> None: ...

    def add_listener(self, cb: UpdateListener) -> None: ...

    def remove_listener(self, cb: UpdateListener) -> None: ...

    def inventory(self) -> Inventory: ...


class AdminPort(UpdateSubmitter, Protocol):
    """What the loopback admin endpoint serves."""

    config: AgentConfig

    def inventory(self) -> Inventory: ...

    def update(self, update_id: str) -> UpdateView | None: ...

    def updates(self, limit: int = 20) -> list[UpdateView]: ...
