"""The controller's package download serves a device's delta update (docs/delta.md): Range
requests with the device's download token, against the real controller."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from edgefleet.agent.delta_fetch import fetch_delta
from edgefleet.keys import KeyPair, load_public_key
from edgefleet.wire.trust import TrustStore
from tests.controller.conftest import Running
from tests.controller.test_api import give_desired, upload
from tests.support.delta_models import mlp_bytes, mlp_package


def test_a_device_fetches_a_delta_from_the_controller(
    controller: Running, packager_key: KeyPair, tmp_path: Path
) -> None:
    v2 = mlp_package(tmp_path / "v2", version="1.1.0", key=packager_key, head_seed=1)
    with controller.client() as admin:
        pkg = upload(admin, v2).json()
        creds = admin.post("/api/v1/devices", json={"device_id": "gw-d"}).json()
    give_desired(controller, "gw-d", pkg["id"])
    basis = tmp_path / "installed"
    basis.mkdir()
    (basis / "model.onnx").write_bytes(mlp_bytes(0))
    got = fetch_delta(
        pkg["url"],
        tmp_path / "dl" / "u.efpkg",
        sha256=pkg["sha256"],
        size=pkg["size"],
        max_bytes=1 << 26,
        basis=basis,
        trust=TrustStore([load_public_key(packager_key.public_path)]),
        expected_name="mlp",
        token=creds["download_token"],
    )
    assert hashlib.sha256(got.path.read_bytes()).hexdigest() == pkg["sha256"]
    assert got.figures["bytes_over_wire"] < 0.15 * pkg["size"]
    assert got.figures["reused_blocks"] > 0


def test_without_the_device_token_the_delta_is_refused(
    controller: Running, packager_key: KeyPair, tmp_path: Path
) -> None:
    from edgefleet.agent.update.fetcher import FetchError

    v2 = mlp_package(tmp_path / "v2", version="1.1.0", key=packager_key, head_seed=1)
    with controller.client() as admin:
        pkg = upload(admin, v2).json()
    with pytest.raises(FetchError) as e:
        fetch_delta(
            pkg["url"],
            tmp_path / "u.efpkg",
            sha256=pkg["sha256"],
            size=pkg["size"],
            max_bytes=1 << 26,
            basis=None,
            trust=TrustStore([load_public_key(packager_key.public_path)]),
            token="efd_wrong",
        )
    assert e.value.code == "delta_unavailable" and "401" in e.value.message
