from __future__ import annotations

import itertools

import pytest

from edgefleet.wire.semver import InvalidVersion, parse_version


def test_precedence_per_semver_spec() -> None:
    order = [
        "1.0.0-alpha",
        "1.0.0-alpha.1",
        "1.0.0-alpha.beta",
        "1.0.0-beta",
        "1.0.0-beta.2",
        "1.0.0-beta.11",
        "1.0.0-rc.1",
        "1.0.0",
        "1.0.1",
        "1.2.0",
        "1.10.0",
        "2.0.0",
    ]
    parsed = [parse_version(v) for v in order]
    assert parsed == sorted(parsed)
    assert all(a < b for a, b in itertools.pairwise(parsed))
    assert parse_version("1.0.0+build.5") == parse_version("1.0.0")
    assert str(parse_version("1.2.3-rc.1+b7")) == "1.2.3-rc.1+b7"


@pytest.mark.parametrize("bad", ["1", "1.2", "01.2.3", "1.2.3-", "v1.2.3", "1.2.3-01", ""])
def test_invalid(bad: str) -> None:
    with pytest.raises(InvalidVersion):
        parse_version(bad)
