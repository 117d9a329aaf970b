"""Property tests: the device-message parsers and the controller's request models take any bytes
and either accept them or refuse them with their own error, never a crash or a value the
database cannot store."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgefleet.cloud_controller.api import LabelsRequest, RegisterRequest, RolloutRequest
from edgefleet.wire import ids
from edgefleet.wire.message import MessageError, json_problem, loads_bounded
from edgefleet.wire.presence import parse as parse_presence
from edgefleet.wire.status import parse as parse_status

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)
keys = st.sampled_from(
    ["online", "seq", "kind", "state", "model", "version", "desired_seq", "installed", "models",
     "profiles", "hardware", "agent_version", "reason_code", "device_id", "figures", "at"]
)  # fmt: skip
messages = st.dictionaries(keys, json_values, max_size=8)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200) | messages.map(lambda m: json.dumps(m).encode()))
def test_device_messages_parse_or_refuse_with_their_reason(raw: bytes) -> None:
    for parse in (parse_presence, parse_status):
        try:
            msg = parse(raw, "gw-1")
        except MessageError as e:
            assert e.reason
            continue
        assert json_problem(json.loads(json.dumps(msg.to_dict()))) is None


@settings(max_examples=80, deadline=None)
@given(json_values)
def test_whatever_json_problem_accepts_round_trips(value: object) -> None:
    if json_problem(value) is None:
        raw = json.dumps(value, allow_nan=False)
        assert loads_bounded(raw) == json.loads(raw)


def test_deep_and_huge_values_are_refused_without_recursion() -> None:
    for raw in (b"[" * 200_000 + b"]" * 200_000, b'{"a":' * 50 + b"1" + b"}" * 50):
        try:
            loads_bounded(raw)
        except ValueError as e:
            assert "deeper" in str(e)
        else:
            raise AssertionError("accepted")


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=3))
def test_request_models_accept_only_identifiers(device_id: str, labels: list[str]) -> None:
    try:
        body = RegisterRequest(device_id=device_id, groups=labels, tags=labels)
    except ValidationError:
        assert (
            not ids.is_valid(ids.DEVICE_ID, device_id)
            or device_id in ids.RESERVED_DEVICE_IDS
            or not all(ids.is_valid(ids.GROUP, x) for x in labels)
        )
        return
    assert ids.is_valid(ids.DEVICE_ID, body.device_id)
    assert all(ids.is_valid(ids.GROUP, g) for g in body.groups)
    try:
        LabelsRequest(tags=labels)
    except ValidationError:
        assert not all(ids.is_valid(ids.TAG, x) for x in labels)


@settings(max_examples=80, deadline=None)
@given(st.text(max_size=20), st.text(max_size=20))
def test_rollout_requests_take_only_canonical_names_and_versions(model: str, version: str) -> None:
    spec = {"model": model, "version": version, "target": {"device_ids": ["gw-1"]}}
    try:
        RolloutRequest.model_validate(spec)
    except ValidationError:
        assert not (ids.is_valid(ids.MODEL_NAME, model) and ids.is_valid(ids.VERSION, version))
    else:
        assert ids.is_valid(ids.MODEL_NAME, model) and ids.is_valid(ids.VERSION, version)
