"""The link's persisted state: last acted-on desired seq and which rollout each update serves.

The highest sequence number acted on is the device's anti-replay floor, so it is kept twice
(as TUF and Uptane keep their version counters): in ``link.json`` with the rest of the state, and
alone in a second file (``SEQ_FILE``, in the data directory, outside the link's folder). Loading
takes the highest valid copy. A copy that is missing or corrupt is not silently reset: the load
says what it found (`LinkState.problem`), the corrupt file is kept aside for inspection, and the
link reports it to the controller.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.wire.atomic import atomic_write_json

#: The redundant copy of the highest sequence number, beside the link's folder.
SEQ_FILE = "desired-seq.json"


def _read(path: Path) -> tuple[Any, str | None]:
    """(JSON object, None), or (None, "missing" | "corrupt")."""
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError):
        return None, "corrupt"
    if not isinstance(raw, dict):
        return None, "corrupt"
    seq = raw.get("last_seq")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 0):
        return None, "corrupt"
    return raw, None


def _keep_aside(path: Path) -> None:
    """A corrupt state file is renamed, not overwritten: someone may want to know why."""
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))


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
    # Not persisted: what loading found wrong, None when both copies were sound (or a new
    # device has neither). E.g. "link.json corrupt; seq 12 recovered from desired-seq.json".
    problem: str | None = None
    # Not persisted: True when no copy held a sequence number although a state file existed
    # or was expected (the anti-replay floor is then only what installed versions give).
    seq_lost: bool = False

    @staticmethod
    def seq_path(path: Path) -> Path:
        return path.parent.parent / SEQ_FILE

    @staticmethod
    def load(path: Path, *, expected: bool = False) -> LinkState:
        """The state in ``path`` and its redundant seq copy.

        ``expected``: the device has acted before (models are installed), so a missing state is
        a loss to report, not a new device.
        """
        main, main_problem = _read(path)
        backup, backup_problem = _read(LinkState.seq_path(path))
        seqs = [
            s
            for s in ((main or {}).get("last_seq"), (backup or {}).get("last_seq"))
            if isinstance(s, int)
        ]
        raw: dict[str, Any] = main or {}
        rollouts = raw.get("rollouts")
        removed = raw.get("removed")
        state = LinkState(
            last_seq=max(seqs) if seqs else None,
            rollouts={
                str(k): (v if isinstance(v, str) else None)
                for k, v in (rollouts.items() if isinstance(rollouts, dict) else [])
            },
            removed=[str(n) for n in (removed if isinstance(removed, list) else [])][-64:],
        )
        problems = []
        for name, problem in ((path.name, main_problem), (SEQ_FILE, backup_problem)):
            if problem == "corrupt":
                problems.append(f"{name} was corrupt")
                _keep_aside(path if name == path.name else LinkState.seq_path(path))
            elif problem == "missing" and (expected or main is not None or backup is not None):
                problems.append(f"{name} was missing")
        if problems:
            found = f"seq {state.last_seq} recovered" if seqs else "no sequence number left"
            state.problem = "; ".join(problems) + f" ({found})"
            state.seq_lost = not seqs
        return state

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the rollout map small: only the most recent entries matter.
        if len(self.rollouts) > 64:
            self.rollouts = dict(list(self.rollouts.items())[-64:])
        # The redundant copy first: a crash between the two writes leaves the seq copy ahead,
        # which loading takes (the highest valid copy), never behind.
        atomic_write_json(LinkState.seq_path(path), {"last_seq": self.last_seq})
        atomic_write_json(
            path,
            {"last_seq": self.last_seq, "rollouts": self.rollouts, "removed": self.removed},
        )
