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


def connect_failure(exc: BaseException | None, tls: bool) -> tuple[str, str]:
    """Why a connection attempt failed before the broker answered (pure): a short counter name
    (``tls_certificate``, ``tls``, ``refused``, ``timeout``, ``dns``, ``network``, ``unknown``)
    and the reason in words. paho only says that an attempt failed; its network thread calls
    ``on_connect_fail`` inside its ``except OSError`` block, so the exception is at hand there
    (`sys.exc_info`), and a certificate the broker's CA did not sign, or a TLS URL aimed at a
    plaintext port, is named rather than retried in silence. ``tls``: whether the attempt was
    over TLS (a connection reset in the middle of it is then the handshake's)."""
    import socket
    import ssl

    if exc is None:
        return "unknown", "no reason given"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        return "tls_certificate", f"TLS: the broker's certificate was refused ({detail})"
    if isinstance(exc, ssl.SSLError):
        return (
            "tls",
            f"TLS handshake failed ({getattr(exc, 'reason', None) or exc}; a plaintext port?)",
        )
    if isinstance(exc, ConnectionRefusedError):
        return "refused", "connection refused (nothing listens there)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout", "no answer in time"
    if isinstance(exc, socket.gaierror):
        return "dns", f"the host name does not resolve ({exc.strerror or exc})"
    if tls and isinstance(exc, ConnectionResetError | ConnectionAbortedError):
        return (
            "tls",
            f"TLS handshake failed: the broker closed the connection ({exc}; a plaintext port?)",
        )
    return "network", str(exc) or type(exc).__name__
