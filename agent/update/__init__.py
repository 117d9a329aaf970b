"""The update worker, split along its concepts:

- `events`: requests in, events out, a step's refusal;
- `fetcher`: the `Fetcher` seam the worker downloads through (injected, see `agent.download`);
- `context`: the parts every step shares, and the one way to change state;
- `prepare` / `serve`: the steps before and after the new version runs;
- `checks`: disk and memory, judged purely;
- `models`: loading versions, pointers, rollback and cleanup, and the failure route;
- `worker`: `Updater`, recovery and the loop.
"""

from edgefleet.agent.update.events import (
    InferenceObserver,
    UpdateEvent,
    UpdateListener,
    UpdateRequest,
    agent_version,
)
from edgefleet.agent.update.fetcher import Fetcher
from edgefleet.agent.update.worker import Updater

__all__ = [
    "Fetcher",
    "InferenceObserver",
    "UpdateEvent",
    "UpdateListener",
    "UpdateRequest",
    "Updater",
    "agent_version",
]
