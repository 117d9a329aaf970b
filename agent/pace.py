"""How slow a download may be, and the clock that judges it (TUF's slow-retrieval attack): shared
by the full download (`agent.download`) and the delta download (`agent.delta_fetch`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgefleet.agent.update.fetcher import FetchError
from edgefleet.wire.reasons import ReasonCode


@dataclass(frozen=True)
class Pace:
    """How slow a download may be: at least ``min_rate`` bytes/s averaged over each
    ``window_s``, and all of it (every retry included) within ``deadline_s``."""

    min_rate: int = 1024
    window_s: float = 30.0
    deadline_s: float = 3600.0


class Clock:
    """Judges a download's progress against its `Pace` (monotonic time)."""

    def __init__(self, pace: Pace, url: str) -> None:
        self.pace = pace
        self.url = url
        self.start = time.monotonic()
        self.mark_t = self.start
        self.mark_n = 0

    def restart_window(self, n: int) -> None:
        self.mark_t, self.mark_n = time.monotonic(), n

    def check(self, n: int) -> None:
        now = time.monotonic()
        if now - self.start > self.pace.deadline_s:
            raise FetchError(
                ReasonCode.SLOW_RETRIEVAL,
                f"{self.url}: not done within the {self.pace.deadline_s:g} s deadline ({n} bytes)",
            )
        if now - self.mark_t >= self.pace.window_s:
            rate = (n - self.mark_n) / (now - self.mark_t)
            if rate < self.pace.min_rate:
                raise FetchError(
                    ReasonCode.SLOW_RETRIEVAL,
                    f"{self.url}: {rate:.0f} bytes/s over {now - self.mark_t:.1f} s, below the"
                    f" minimum {self.pace.min_rate} bytes/s",
                )
            self.mark_t, self.mark_n = now, n
