"""The controller's ack (wire.mqtt): framing, bounds, refusals by reason code."""

from __future__ import annotations

import json

import pytest

from edgefleet.wire.errors import RejectError
from edgefleet.wire.mqtt import MAX_ACK_BYTES, MAX_ACK_IDS, Ack, acks_for, parse_ack, topic
from edgefleet.wire.reasons import ReasonCode


def test_round_trip_and_split() -> None:
    (one,) = acks_for([3, 1, 3], [7])
    assert parse_ack(one) == Ack((1, 3), (7,))
    many = acks_for(list(range(MAX_ACK_IDS + 1)), [])
    assert [len(parse_ack(m).status) for m in many] == [MAX_ACK_IDS, 1]
    assert all(len(m) <= MAX_ACK_BYTES for m in many)
    assert topic("dev-1", "ack") == "edgefleet/v1/devices/dev-1/ack"


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        json.dumps({"status": [1]}).encode(),  # no version
        json.dumps({"v": 1, "status": "1"}).encode(),
        json.dumps({"v": 1, "status": [-1]}).encode(),
        json.dumps({"v": 1, "telemetry": [True]}).encode(),
        json.dumps({"v": 1, "telemetry": [2**63]}).encode(),
        json.dumps({"v": 1, "status": list(range(MAX_ACK_IDS + 1))}).encode(),
        b" " * (MAX_ACK_BYTES + 1),
    ],
)
def test_refused(raw: bytes) -> None:
    with pytest.raises(RejectError) as e:
        parse_ack(raw)
    assert e.value.code == ReasonCode.ACK_INVALID
