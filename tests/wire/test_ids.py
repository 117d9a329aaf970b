"""The identifier grammar (wire.ids) and the canonical key id (wire.keyid)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from edgefleet.keys import KeyPair, generate_keypair
from edgefleet.wire import ids
from edgefleet.wire.errors import RejectError
from edgefleet.wire.keyid import KeyIdError, canonical_key_id, canonical_key_ids
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.semver import InvalidVersion, parse_version
from edgefleet.wire.trust import TrustStore

GOOD = ["gw-1", "a", "A.b_c-9", "0", "x" * 128]
BAD = [
    "",
    "rt-inj\nedgefleet-controller",
    "gw-1\n",
    "\ngw-1",
    "gw 1",
    "gw:1",
    "gw/1",
    "gw+1",
    "gw#1",
    "gw\x00",
    "-gw",
    ".gw",
    "_gw",
    "gw-\u0660",
    "\u0261w",
    "x" * 129,
]


@pytest.mark.parametrize("value", GOOD)
def test_device_ids_in_the_grammar(value: str) -> None:
    assert ids.device_id(value) == value


@pytest.mark.parametrize("value", [*BAD, "edgefleet-controller", None, 5, ["gw"]])
def test_device_ids_outside_the_grammar_are_refused_with_it(value: object) -> None:
    with pytest.raises(ids.IdentifierError) as e:
        ids.device_id(value)
    assert e.value.code == "invalid_device_id"
    assert "grammar" in str(e.value) or "reserved" in str(e.value) or "string" in str(e.value)


def test_labels_and_names() -> None:
    assert ids.labels(ids.GROUP, ["b", "a", "b"]) == ["a", "b"]
    for grammar in (ids.GROUP, ids.TAG):
        with pytest.raises(ids.IdentifierError):
            ids.labels(grammar, ["ok", "not ok"])
        with pytest.raises(ids.IdentifierError):
            ids.check(grammar, "x" * 65)
    with pytest.raises(ids.IdentifierError):
        ids.model_name("iris\n")
    with pytest.raises(ids.IdentifierError):
        ids.profile("CPU-x86_64")
    assert ids.profile("cpu-x86_64") == "cpu-x86_64"


@given(st.text(max_size=40))
def test_nothing_in_the_grammar_can_break_a_line_or_a_topic(value: str) -> None:
    if ids.is_valid(ids.DEVICE_ID, value):
        assert value.isascii() and value.isprintable()
        assert not set(value) & set(" :/+#\r\n\x00\t")


@pytest.mark.parametrize(
    "text", ["1\u0660.0.0", "\u0661.0.0", "1.0.0\n", " 1.0.0", "1.0.0 ", "01.0.0", "1.0", "v1.0.0"]
)
def test_versions_are_canonical_ascii_semver(text: str) -> None:
    with pytest.raises(InvalidVersion):
        parse_version(text)
    with pytest.raises(ids.IdentifierError):
        ids.version(text)


def test_a_valid_version_still_parses() -> None:
    assert str(parse_version("10.0.0-rc.1+b5")) == "10.0.0-rc.1+b5"
    assert parse_version("10.0.0") > parse_version("9.9.9")


def test_key_ids_have_one_canonical_form(tmp_path: Path) -> None:
    kid = generate_keypair(tmp_path, "k").key_id
    assert canonical_key_id(kid.upper()) == kid
    assert canonical_key_id(f"  {kid}\n") == kid
    with pytest.raises(KeyIdError, match="16-digit short form"):
        canonical_key_id(kid[:16])
    for bad in ("", kid[:-1], kid + "0", kid.replace(kid[0], "g", 1), f"{kid[:32]} {kid[32:]}"):
        with pytest.raises(KeyIdError, match="grammar"):
            canonical_key_id(bad)
    with pytest.raises(KeyIdError):
        canonical_key_ids(kid)  # a single string is not a list


def test_a_revocation_list_that_names_no_key_refuses_rather_than_passes(tmp_path: Path) -> None:
    kid = generate_keypair(tmp_path, "k").key_id
    assert TrustStore([], [kid.upper()]).revoked_key_ids == frozenset({kid})
    with pytest.raises(RejectError) as e:
        TrustStore([], [kid[:16]])
    assert e.value.code == ReasonCode.REVOKED_KEY and "short form" in e.value.message


@pytest.mark.parametrize("spelling", ["upper", "spaced", "short"])
def test_verify_honours_a_revocation_however_the_id_is_spelled(
    keys: KeyPair, good_package: Path, spelling: str
) -> None:
    """The attack: `edgefleet verify --revoked` with the key id in upper case, with a space,
    or as the 16 digits `verify` prints. Each now refuses the package, with the reason."""
    from edgefleet.cli import app

    kid = keys.key_id
    given_id = {"upper": kid.upper(), "spaced": f" {kid} ", "short": kid[:16]}[spelling]
    res = CliRunner().invoke(
        app,
        [
            "verify", str(good_package), "--trust", str(keys.public_path),
            "--revoked", given_id, "--json",
        ],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["ok"] is False and out["code"] == "revoked_key"
    if spelling == "short":
        assert "short form" in out["message"]


def test_the_agent_config_takes_only_a_valid_device_id_and_canonical_key_ids(
    tmp_path: Path, keys: KeyPair
) -> None:
    from edgefleet.agent.config import ConfigError, load_config

    def load(device_id: str, revoked: list[str]) -> object:
        path = tmp_path / "agent.toml"
        path.write_text(
            f"device_id = {json.dumps(device_id)}\ndata_dir = {json.dumps(str(tmp_path / 'd'))}\n"
            f"revoked_key_ids = {json.dumps(revoked)}\n"
        )
        return load_config(path, env={})

    cfg = load("gw-1", [keys.key_id.upper()])
    assert cfg.revoked_key_ids == [keys.key_id]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="device_id"):
        load("gw-1\nedgefleet-controller", [])
    with pytest.raises(ConfigError, match="short form"):
        load("gw-1", [keys.key_id[:16]])
