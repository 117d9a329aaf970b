"""The link's persisted state: last acted-on desired seq and which rollout each update serves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.wire.atomic import atomic_write_json


@dataclass
class LinkState:
    """Written atomically (write, fsync, rename) before the link acts on a desired state."""

    last_seq: int | None = None
    # "name@version" -> rollout id, so that events of an update resumed after a restart
    # still name the rollout they belong to.
    rollouts: dict[str, str | None] = field(default_factory=dict)
    # Models whose removal this device has done and reported (REMOVED) and that no desired
    # state has asked for since: a `remove` list naming them again needs no new report.
    removed: list[str] = field(default_factory=list)

    @staticmethod
    def load(path: Path) -> LinkState:
        try:
            raw: Any = json.loads(path.read_text())
        except FileNotFoundError:
            return LinkState()
        except (OSError, ValueError):
            # A corrupt file cannot come from an atomic write; start from nothing rather
            # than refuse every desired state forever.
            return LinkState()
        seq = raw.get("last_seq")
        return LinkState(
            last_seq=int(seq) if isinstance(seq, int) else None,
            rollouts={str(k): v for k, v in dict(raw.get("rollouts", {})).items()},
            removed=[str(n) for n in raw.get("removed", []) if isinstance(n, str)],
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the rollout map small: only the most recent entries matter.
        if len(self.rollouts) > 64:
            self.rollouts = dict(list(self.rollouts.items())[-64:])
        atomic_write_json(
            path,
            {"last_seq": self.last_seq, "rollouts": self.rollouts, "removed": self.removed},
        )
