"""A TCP proxy between the agents and Mosquitto that drops connections at random, one at a time:
a flaky link per device, while the others stay up."""

from __future__ import annotations

import contextlib
import random
import socket
import threading

from tests.fleet.proxy import CuttableProxy


class FlakyProxy(CuttableProxy):
    """`CuttableProxy` plus a thread that drops one random proxied connection every
    ``mean_gap_s`` seconds on average (exponential gaps). The client reconnects through the
    proxy, which lets it in again at once."""

    def __init__(self, target_port: int, *, mean_gap_s: float, seed: int = 0) -> None:
        super().__init__(target_port)
        self.mean_gap_s = mean_gap_s
        self.drops = 0
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._chaos: threading.Thread | None = None

    def start_drops(self) -> None:
        self._chaos = threading.Thread(target=self._drop_loop, name="flaky-proxy", daemon=True)
        self._chaos.start()

    def stop_drops(self) -> None:
        self._stop.set()
        if self._chaos is not None:
            self._chaos.join(5)

    def close(self) -> None:
        self.stop_drops()
        super().close()

    def drop_one(self) -> bool:
        """Close one proxied connection (both of its sockets) abruptly."""
        with self._lock:
            pairs = len(self._socks) // 2
            if not pairs:
                return False
            i = 2 * self._rng.randrange(pairs)
            victims = self._socks[i : i + 2]
            del self._socks[i : i + 2]
        for s in victims:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self.drops += 1
        return True

    def _drop_loop(self) -> None:
        while not self._stop.wait(self._rng.expovariate(1.0 / self.mean_gap_s)):
            self.drop_one()
