"""Refusals: every refusal of a package or a desired state names a `ReasonCode`."""

from __future__ import annotations

from typing import Any

from edgefleet.wire.reasons import ReasonCode


class RejectError(Exception):
    """A refusal with a machine-readable code and a message a person can act on."""

    def __init__(self, code: ReasonCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message}


class ReplayError(RejectError):
    """A desired state whose sequence number is not newer than the last one acted on."""

    def __init__(self, message: str) -> None:
        super().__init__(ReasonCode.REPLAYED, message)
