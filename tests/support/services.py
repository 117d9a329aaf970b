"""Real services for tests: a Mosquitto broker per test session, PostgreSQL on this machine.

A service that is absent fails the test loudly under CI (``CI=true``) and skips elsewhere with
the reason, as the project's rules require.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet.devbroker import free_port

POSTGRES_URL = os.environ.get(
    "EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip (or fail under CI) when a service the test needs is absent."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"required service missing in CI: {reason}")
    pytest.skip(reason)


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


@dataclass
class Mosquitto:
    host: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def start(self) -> None:
        """(Re)start on the same port with the same config, e.g. after `stop()` in an outage test."""
        if self.process.poll() is None:
            return
        self.process = _spawn(self.workdir)
        wait_port(self.port)


def _spawn(workdir: Path) -> subprocess.Popen[bytes]:
    log = open(workdir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
    return subprocess.Popen(
        ["mosquitto", "-c", str(workdir / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT
    )


@contextmanager
def mosquitto(
    workdir: Path,
    *,
    passwords: dict[str, str] | None = None,
    acl: str | None = None,
) -> Iterator[Mosquitto]:
    """Start a Mosquitto broker of our own on a free loopback port.

    ``passwords`` (user -> password) turns anonymous access off; ``acl`` is the text of a
    Mosquitto ACL file (e.g. ``pattern readwrite edgefleet/v1/devices/%u/#``).
    """
    exe = shutil.which("mosquitto")
    require(exe is not None, "mosquitto is not installed (apt-get install mosquitto)")
    workdir = workdir / f"mosquitto-{uuid.uuid4().hex[:8]}"
    workdir.mkdir(parents=True)
    port = free_port()
    # The same config writer the product's embedded broker uses (hashed passwords, ACL,
    # `user root` when run as root so Mosquitto can read the 0600 files).
    from edgefleet.devbroker import mosquitto_config

    mosquitto_config(workdir, "127.0.0.1", port, passwords=passwords, acl=acl)
    broker = Mosquitto("127.0.0.1", port, workdir, _spawn(workdir))
    try:
        wait_port(port)
        yield broker
    finally:
        broker.stop()


def postgres_available(url: str = POSTGRES_URL) -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    try:
        with psycopg.connect(
            url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=3
        ):
            return True
    except Exception:
        return False
