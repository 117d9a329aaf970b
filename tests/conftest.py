"""Shared fixtures: a real Mosquitto broker per test session, PostgreSQL, example models."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import POSTGRES_URL, Mosquitto, mosquitto, postgres_available, require


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """An anonymous Mosquitto broker of this test session, on a free loopback port."""
    with mosquitto(tmp_path_factory.mktemp("broker")) as b:
        yield b


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server on this machine (fails under CI when absent)."""
    require(postgres_available(), f"PostgreSQL not reachable at {POSTGRES_URL}")
    return POSTGRES_URL


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("session")
