"""What goes in and out of the update worker: requests, events, and a step's refusal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from edgefleet.wire.message import JsonObject
from edgefleet.wire.reasons import ReasonCode


@dataclass
class UpdateRequest:
    model: str  # "" = take it from the package
    version: str  # "" = take it from the package
    source: str  # http(s) URL, file:// URL or local path
    sha256: str | None = None
    size: int | None = None
    rollout_id: str | None = None
    allow_downgrade: bool = False
    # The source comes from the controller's signed desired state: send the device's download
    # token with it. Never set for operator-given sources, so the token cannot leak elsewhere.
    controller_source: bool = False
    # The rollout's probation latency ratio (desired state `max_p95_ratio`); None: the config's.
    max_p95_ratio: float | None = None
    # Run the version in shadow before activating it (desired state ``shadow``, a
    # `edgefleet.wire.shadow.ShadowSpec` as JSON); None: activate it as soon as it validates.
    shadow: JsonObject | None = None


@dataclass
class UpdateEvent:
    update_id: str
    model: str
    version: str
    rollout_id: str | None
    state: str
    reason_code: str | None
    reason: str | None
    figures: JsonObject | None
    timestamp: str
    from_version: str | None = None
    # Not asked for by the controller's desired state (an operator's `agent install`).
    local: bool = False
    # "update": a state transition; "shadow": one window of a shadow evaluation (``state``
    # SHADOW, ``figures`` a `edgefleet.wire.shadow.ShadowFigures`).
    kind: str = "update"

    def to_dict(self) -> JsonObject:
        return asdict(self)


UpdateListener = Callable[[UpdateEvent], None]
InferenceObserver = Callable[
    [str, str, dict[str, np.ndarray], dict[str, np.ndarray], float, bool], None
]


class StepFailed(Exception):
    """A step's refusal: the update leaves by its state's failure route with this code."""

    def __init__(self, code: ReasonCode, reason: str, figures: JsonObject | None = None) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.figures = figures


def agent_version() -> str:
    from edgefleet import __version__

    return __version__
