"""Agent telemetry: a persistent outbox, collectors and the periodic telemetry service.

An :class:`Outbox` deliberately has no ``__len__``: ``if outbox:`` stays true when it is empty.
"""

from edgefleet.agent.telemetry.outbox import Outbox, OutboxError, OutboxStats
from edgefleet.agent.telemetry.service import TelemetryService, TelemetrySettings

__all__ = ["Outbox", "OutboxError", "OutboxStats", "TelemetryService", "TelemetrySettings"]
