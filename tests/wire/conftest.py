from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.keys import KeyPair, generate_keypair, load_public_key
from tests.support.packages import make_package


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("keys"), "packager")


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("other"), "stranger")


@pytest.fixture(scope="module")
def good_package(tmp_path_factory: pytest.TempPathFactory, keys: KeyPair) -> Path:
    return make_package(tmp_path_factory.mktemp("pkg"), name="iris", version="1.2.0", key=keys)


@pytest.fixture
def trusted(keys: KeyPair) -> list:
    return [load_public_key(keys.public_path)]
