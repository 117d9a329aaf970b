"""What fleet to run, and the example model every part of the demo talks about."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgefleet.harness import HarnessError

MODEL_NAME = "digits"
GOOD, BAD = "1.0.0", "1.1.0"


class FleetError(HarnessError):
    """A step of the fleet harness failed; the message says which and why."""


@dataclass
class FleetSpec:
    """A fleet on this machine: where it lives, how many agents, which broker."""

    workdir: Path
    devices: int = 5
    broker: str = "amqtt"  # amqtt | mosquitto
    secure: bool = False  # per-device passwords and ACLs (Mosquitto only)
    probation_s: float = 1.0
    telemetry_interval_s: float = 5.0
    device_prefix: str = "gw"
    db_url: str | None = None

    def device_ids(self) -> list[str]:
        return [f"{self.device_prefix}-{i + 1:02d}" for i in range(self.devices)]
