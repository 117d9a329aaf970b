"""Child processes for the top floor (the demo, the dev broker) and the tests: free ports,
children that die with their parent, waiting for a port, stopping without leftovers.

Standard library only, so that ``python -m edgefleet.devbroker`` starts quickly.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


class HarnessError(RuntimeError):
    """A child process could not be started or did not come up; the message says why."""


class NotListening(HarnessError, TimeoutError):
    """Nothing listened on the awaited port in time."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a child get SIGTERM when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None

    # Resolved here, in the parent: between fork and exec the child only makes the call (no
    # dlopen, whose loader lock another thread of the parent may have held at fork time).
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    sigterm = int(signal.SIGTERM)

    def _set() -> None:
        prctl(1, sigterm)  # PR_SET_PDEATHSIG

    return _set


def stop_processes(
    processes: Iterable[subprocess.Popen[bytes]], *, timeout: float = 10.0, kill: bool = False
) -> None:
    """SIGTERM (SIGKILL with ``kill``) every live one at once, wait, then SIGKILL stragglers:
    they are all gone when this returns."""
    live = [p for p in processes if p.poll() is None]
    for p in live:
        if kill:
            p.kill()
        else:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in live:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)


def terminate(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: the process is gone when this returns."""
    stop_processes([process], timeout=timeout)


def wait_listening(
    host: str,
    port: int,
    process: subprocess.Popen[bytes] | None = None,
    *,
    timeout: float = 10.0,
    log: Path | None = None,
    name: str = "process",
) -> None:
    """Return once ``host:port`` accepts connections.

    Raises `HarnessError` (with the tail of ``log``) if ``process`` exits first, `NotListening`
    when time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise HarnessError(f"{name} exited with {process.returncode} before listening: {tail}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise NotListening(f"{name} not listening on {host}:{port} after {timeout:.0f}s")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C while inside, so the `finally` that stops the children runs."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Children:
    """Named child processes, each logging to ``<log_dir>/<name>.log``; `close()` stops them all.

    Every child gets SIGTERM when this process dies, however it dies (`die_with_parent`)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` as child ``name`` with ``env`` over this process's environment."""
        if self.alive(name):
            raise HarnessError(f"{name} is already running")
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                preexec_fn=die_with_parent(),
            )

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def stop(self, name: str, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop child ``name`` (SIGKILL at once with ``kill``, as a crash would)."""
        p = self.procs.get(name)
        if p is not None:
            stop_processes([p], timeout=timeout, kill=kill)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self) -> None:
        stop_processes(self.procs.values(), timeout=15.0)
