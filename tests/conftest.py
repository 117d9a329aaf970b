"""Shared fixtures: a real Mosquitto broker per test session, PostgreSQL, example models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support.services import POSTGRES_URL, Mosquitto, mosquitto, postgres_available, require

# Hypothesis profiles. "ci" (the default): the default number of examples, no per-example
# deadline (a busy host is not a bug) and no example database in the checkout. "long": the
# fuzz harness's long run, EDGEFLEET_HYPOTHESIS_PROFILE=long.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", deadline=None, database=None, suppress_health_check=_QUIET)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=20_000)
settings.load_profile(os.environ.get("EDGEFLEET_HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` run only when asked for: ``pytest -m slow``."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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
