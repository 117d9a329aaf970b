"""One real fleet for the end-to-end tests: Mosquitto with the controller's per-device
passwords and ACL, the controller process on SQLite, five agent processes, and packages built by
the packager pipeline."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.demo.fleet import Fleet
from edgefleet.demo.spec import FleetSpec
from tests.support.services import require

GOOD_VERSIONS = ("1.0.0", "1.2.0", "1.3.0", "1.4.0", "1.5.0", "1.6.0")
BAD_VERSIONS = ("1.1.0",)


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    root: Path = tmp_path_factory.mktemp("e2e-fleet")
    spec = FleetSpec(root, devices=5, broker="mosquitto", secure=True, probation_s=0.5)
    f = Fleet(spec)
    try:
        f.make_keys()
        f.build_packages(GOOD_VERSIONS, BAD_VERSIONS)
        f.start_controller()
        f.register_devices()
        f.start_broker()
        f.start_agents()
        for path in f.packages.values():
            f.upload(path)
        f.wait_online()
        yield f
    finally:
        f.close()
