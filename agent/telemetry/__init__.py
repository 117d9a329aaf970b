"""Agent telemetry: a persistent outbox, collectors and the periodic telemetry service."""

from agent.telemetry.outbox import Outbox, OutboxError, OutboxStats

__all__ = ["Outbox", "OutboxError", "OutboxStats"]
