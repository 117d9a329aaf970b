"""Real services for tests: a Mosquitto broker per test session, PostgreSQL on this machine.

A service that is absent fails the test loudly under CI (``CI=true``) and skips elsewhere with
the reason, as the project's rules require.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edgefleet.devbroker import EmbeddedBroker, embedded_broker
from edgefleet.harness import free_port, wait_listening

__all__ = ["POSTGRES_URL", "Mosquitto", "free_port", "mosquitto", "require", "wait_port"]

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
    """Return once something listens on ``host:port``; `TimeoutError` otherwise."""
    wait_listening(host, port, timeout=timeout)


# The product's embedded broker: the same Mosquitto config writer (hashed passwords, ACL, `user
# root` when run as root so Mosquitto can read the 0600 files), start/stop/restart on one port.
Mosquitto = EmbeddedBroker


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
    require(
        shutil.which("mosquitto") is not None,
        "mosquitto is not installed (apt-get install mosquitto)",
    )
    workdir = workdir / f"mosquitto-{uuid.uuid4().hex[:8]}"
    with embedded_broker("mosquitto", workdir, passwords=passwords, acl=acl) as broker:
        yield broker


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
