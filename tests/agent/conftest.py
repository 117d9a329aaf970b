"""Fixtures of the agent tests: keys, real signed packages (built once), in-process agents."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.config import AgentConfig, ProbationConfig, SwapConfig, ValidationConfig
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.keys import KeyPair, generate_keypair
from tests.agent.helpers import lookup_package
from tests.support.packages import make_package, model_inputs


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    return {
        "trusted": generate_keypair(d, "trusted"),
        "second": generate_keypair(d, "second"),  # trusted too, revoked in the revocation test
        "unknown": generate_keypair(d, "unknown"),
    }


@pytest.fixture(scope="session")
def pkgs(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]) -> dict[str, Path]:
    """Real packages, built once per session."""
    d = tmp_path_factory.mktemp("pkgs")
    k = keys["trusted"]
    p: dict[str, Path] = {
        "v1": make_package(d / "v1", name="iris", version="1.0.0", key=k),
        "v2": make_package(d / "v2", name="iris", version="1.1.0", key=k, seed=1),
        "v0": make_package(d / "v0", name="iris", version="0.9.0", key=k),
        "unknown_key": make_package(d / "uk", name="iris", version="1.2.0", key=keys["unknown"]),
        "second_key": make_package(d / "sk", name="iris", version="1.2.0", key=keys["second"]),
        "expired": make_package(
            d / "ex",
            name="iris",
            version="1.2.0",
            key=k,
            created="2020-01-01T00:00:00Z",
            expires="2021-01-01T00:00:00Z",
        ),
        "needs_new_agent": make_package(
            d / "na", name="iris", version="1.2.0", key=k, min_agent_version="9.0.0"
        ),
        "arm": make_package(d / "arm", name="iris", version="1.2.0", key=k, profile="cpu-arm64"),
        "cuda_no_fallback": make_package(
            d / "cu",
            name="iris",
            version="1.2.0",
            key=k,
            providers=[{"name": "CUDAExecutionProvider", "options": {}}],
            cpu_fallback=False,
        ),
        "cuda_fallback": make_package(
            d / "cf",
            name="iris",
            version="1.2.0",
            key=k,
            providers=[{"name": "CUDAExecutionProvider", "options": {}}],
            cpu_fallback=True,
        ),
        "bad_samples": make_package(
            d / "bs", name="iris", version="1.2.0", key=k, corrupt_samples=True
        ),
        "slow_gate": make_package(
            d / "sg",
            name="iris",
            version="1.2.0",
            key=k,
            gates={"max_p95_ms": 0.000001, "max_memory_mb": 512.0},
        ),
        "lookup1": lookup_package(
            d / "l1", name="lookup", version="1.0.0", key=k, table=[float(i) for i in range(10)]
        ),
        "lookup2": lookup_package(
            d / "l2", name="lookup", version="2.0.0", key=k, table=[float(2 * i) for i in range(10)]
        ),
    }
    return p


@pytest.fixture(scope="session")
def x_iris() -> np.ndarray:
    return model_inputs("iris")[:3]


def make_config(data_dir: Path, keys: dict[str, KeyPair], **kw: Any) -> AgentConfig:
    base: dict[str, Any] = {
        "device_id": "gw-1",
        "data_dir": data_dir,
        "trusted_keys": [keys["trusted"].public_path, keys["second"].public_path],
        "http_port": 0,
        "admin_port": 0,
        "probation": ProbationConfig(seconds=0.2, min_requests=0),
        "validation": ValidationConfig(bench_runs=20, bench_warmup=2),
        "swap": SwapConfig(),
    }
    base.update(kw)
    return AgentConfig(**base)


@pytest.fixture
def agent_factory(tmp_path: Path, keys: dict[str, KeyPair]) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def factory(data_dir: Path | None = None, **kw: Any) -> Agent:
        a = Agent(make_config(data_dir or tmp_path / "data", keys, **kw))
        a.start()
        started.append(a)
        return a

    yield factory
    for a in started:
        a.stop()


@pytest.fixture(scope="session")
def v1_data(
    tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair], pkgs: dict[str, Path]
) -> Path:
    """A data directory in which iris 1.0.0 is installed and committed (copy it per test)."""
    d = tmp_path_factory.mktemp("v1data") / "data"
    a = Agent(make_config(d, keys))
    a.start(serve_http=False, serve_admin=False)
    try:
        view = a.wait_update(a.submit_update(UpdateRequest("iris", "1.0.0", str(pkgs["v1"]))), 60)
        assert view["state"] == "COMMITTED", view
    finally:
        a.stop()
    return d


@pytest.fixture
def v1_copy(tmp_path: Path, v1_data: Path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(v1_data, dst)
    return dst
