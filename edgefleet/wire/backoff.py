"""Which broker to try next, and after how long: the failover policy shared by the agent and
the controller (each drives its own MQTT client with it; neither imports the other).

A list of broker URLs is tried in its order, starting with the first: after every lost or
refused connection the next URL is tried (wrapping round), after a delay that doubles with each
consecutive failure up to a cap, with "equal jitter" (half the delay fixed, half random) so that
thousands of devices cut off by the same outage do not come back in the same second, and none
retries at once in a tight loop. A successful connection resets the delay; the link stays on the
node it reached (no fall-back to the first URL, which would move every device twice per outage).

Pure: no I/O, no clock; the random source is injected for tests.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field


def split_urls(value: str | Sequence[str] | None) -> list[str]:
    """``"mqtt://a:1883, mqtt://b:1883"`` or a list -> the URLs, stripped, empties dropped,
    duplicates removed (first kept)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        url = str(item).strip()
        if url and url not in out:
            out.append(url)
    return out


@dataclass
class Failover:
    """Rotation over ``urls`` with jittered exponential backoff.

    ``current`` is the URL to connect to; after a failure `failed()` moves to the next one and
    returns how long to wait before trying it; `connected()` resets the backoff."""

    urls: Sequence[str]
    base_s: float = 0.5
    cap_s: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    index: int = 0
    failures: int = 0  # consecutive, since the last successful connection

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("no broker URL to connect to")
        if not (0 < self.base_s <= self.cap_s):
            raise ValueError("backoff needs 0 < base_s <= cap_s")
        self.index %= len(self.urls)

    @property
    def current(self) -> str:
        return self.urls[self.index]

    def delay(self, failures: int) -> float:
        """The wait before the attempt that follows ``failures`` consecutive failures (>= 1):
        between half and all of ``min(cap, base * 2**(failures-1))``."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(max(failures - 1, 0), 32))
        return ceiling / 2 + self.rng.uniform(0, ceiling / 2)

    def failed(self) -> float:
        """The connection to `current` was lost or refused: move on to the next URL and
        return the seconds to wait before connecting to it."""
        self.failures += 1
        self.index = (self.index + 1) % len(self.urls)
        return self.delay(self.failures)

    def connected(self) -> None:
        """A connection to `current` succeeded: the next failure starts from ``base_s``."""
        self.failures = 0
