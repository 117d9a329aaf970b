"""The signed desired state: only the controller's key, only for this device, only newer."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from edgefleet.keys import KeyPair, load_private_key, load_public_key
from edgefleet.wire.errors import RejectError, ReplayError
from edgefleet.wire.manifest import format_time
from edgefleet.wire.mqtt import (
    parse_topic,
    sign_desired,
    subscription,
    topic,
    validate_desired,
    verify_desired,
)
from edgefleet.wire.reasons import ReasonCode


def state(seq: int = 5, device: str = "gw-1", ttl: timedelta = timedelta(days=1)) -> dict:
    now = datetime.now(UTC)
    return {
        "device_id": device,
        "seq": seq,
        "issued_at": format_time(now),
        "expires_at": format_time(now + ttl),
        "models": {
            "iris": {
                "version": "1.2.0",
                "url": "http://127.0.0.1:8000/packages/iris-1.2.0-cpu-x86_64.efpkg",
                "sha256": "0" * 64,
                "size": 10240,
                "profile": "cpu-x86_64",
                "rollout_id": "r1",
                "allow_downgrade": False,
            }
        },
    }


def test_roundtrip(keys: KeyPair) -> None:
    raw = sign_desired(state(), load_private_key(keys.private_path))
    got = verify_desired(raw, [load_public_key(keys.public_path)], device_id="gw-1", last_seq=4)
    assert got == state() | {"issued_at": got["issued_at"], "expires_at": got["expires_at"]}


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda env: env.pop("sig"), ReasonCode.SIGNATURE_MISSING),
        (
            lambda env: env.update(payload=env["payload"][:-8] + "AAAAAAA="),
            ReasonCode.SIGNATURE_INVALID,
        ),
        (lambda env: env.update(key_id="ab" * 32), ReasonCode.UNTRUSTED_KEY),
        (lambda env: env.update(alg="none"), ReasonCode.SIGNATURE_INVALID),
    ],
)
def test_tampered_envelopes(keys: KeyPair, mutate, code: ReasonCode) -> None:  # type: ignore[no-untyped-def]
    env = json.loads(sign_desired(state(), load_private_key(keys.private_path)))
    mutate(env)
    with pytest.raises(RejectError) as ei:
        verify_desired(
            json.dumps(env).encode(),
            [load_public_key(keys.public_path)],
            device_id="gw-1",
            last_seq=None,
        )
    assert ei.value.code == code


def test_unsigned_plain_json_rejected(keys: KeyPair) -> None:
    with pytest.raises(RejectError) as ei:
        verify_desired(
            json.dumps(state()).encode(),
            [load_public_key(keys.public_path)],
            device_id="gw-1",
            last_seq=None,
        )
    assert ei.value.code == ReasonCode.SIGNATURE_MISSING


def test_other_key_other_device_replay_expired(keys: KeyPair, other_keys: KeyPair) -> None:
    priv, pub = load_private_key(keys.private_path), load_public_key(keys.public_path)
    with pytest.raises(RejectError) as ei:
        verify_desired(
            sign_desired(state(), load_private_key(other_keys.private_path)),
            [pub],
            device_id="gw-1",
            last_seq=None,
        )
    assert ei.value.code == ReasonCode.UNTRUSTED_KEY
    with pytest.raises(RejectError) as ei:
        verify_desired(
            sign_desired(state(device="gw-2"), priv), [pub], device_id="gw-1", last_seq=None
        )
    assert ei.value.code == ReasonCode.DEVICE_MISMATCH
    with pytest.raises(ReplayError):
        verify_desired(sign_desired(state(seq=5), priv), [pub], device_id="gw-1", last_seq=5)
    with pytest.raises(RejectError) as ei:
        verify_desired(
            sign_desired(state(ttl=timedelta(seconds=-1)), priv),
            [pub],
            device_id="gw-1",
            last_seq=None,
        )
    assert ei.value.code == ReasonCode.EXPIRED


def test_topics() -> None:
    assert topic("gw-1", "desired") == "edgefleet/v1/devices/gw-1/desired"
    assert parse_topic("edgefleet/v1/devices/gw-1/status") == ("gw-1", "status")
    assert parse_topic("edgefleet/v1/devices/gw-1/other") is None
    assert subscription("telemetry") == "edgefleet/v1/devices/+/telemetry"
    for bad in ("", "a/b", "a+", "#"):
        with pytest.raises(ValueError):
            topic(bad, "status")


def test_remove_list_signed_and_verified(keys: KeyPair) -> None:
    s = state() | {"remove": ["fraud", "anomaly-v2"]}
    raw = sign_desired(s, load_private_key(keys.private_path))
    got = verify_desired(raw, [load_public_key(keys.public_path)], device_id="gw-1", last_seq=4)
    assert got["remove"] == ["fraud", "anomaly-v2"]
    # Absent means nothing to remove; a model merely missing from `models` is no removal.
    assert "remove" not in validate_desired(state() | {"models": {}})


@pytest.mark.parametrize(
    "remove",
    [
        "fraud",  # not a list
        [""],
        ["../etc"],
        [3],
        ["iris"],  # both desired and to be removed
        ["fraud", "fraud"],
    ],
)
def test_remove_list_rejected(keys: KeyPair, remove: object) -> None:
    with pytest.raises(RejectError) as e:
        validate_desired(state() | {"remove": remove})
    assert e.value.code is ReasonCode.MANIFEST_INVALID
    with pytest.raises(RejectError):
        sign_desired(state() | {"remove": remove}, load_private_key(keys.private_path))
