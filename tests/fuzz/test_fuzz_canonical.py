"""What a parser accepts is canonical: the names, versions, numbers and shapes it lets through are
the ones the rest of the system can use as they are (a file name, a topic, a comparison, a gate,
an allocation), not look-alikes it coerced or did not notice."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent import oip
from edgefleet.wire.errors import RejectError
from edgefleet.wire.manifest import validate_manifest
from edgefleet.wire.mqtt import validate_desired
from edgefleet.wire.semver import parse_version
from tests.fuzz import targets as T
from tests.fuzz.strategies import nasty_floats, nasty_text


def _plain(text: str) -> bool:
    return text.isascii() and text.isprintable() and not any(c.isspace() for c in text)


versions = nasty_text | st.sampled_from(
    ["1.0.0\n", "1\u0660.0.0", "\uff11.0.0", " 1.0.0", "1.0.0 ", "01.0.0", "1.0.0-\u0661"]
)
names = nasty_text | st.sampled_from(["iris\n", "iris ", "ir\u0131s", "iris\x00"])


@given(name=names, version=versions, agent=versions)
def test_manifest_accepts_only_plain_names_and_versions(
    name: str, version: str, agent: str
) -> None:
    m = {**T.valid_manifest(), "name": name, "version": version, "min_agent_version": agent}
    try:
        validate_manifest(m)
    except RejectError:
        return
    for value in (name, version, agent):
        assert _plain(value), f"accepted {value!r}"
    assert str(parse_version(version)) == version, (
        f"accepted {version!r} as {parse_version(version)}"
    )


@given(
    st.dictionaries(st.sampled_from(["max_p95_ms", "max_memory_mb", "sample_atol"]), nasty_floats)
)
def test_manifest_gates_are_finite(gates: dict[str, float]) -> None:
    try:
        validate_manifest({**T.valid_manifest(), "gates": gates})
    except RejectError:
        return
    assert all(math.isfinite(v) for v in gates.values()), f"accepted gates {gates}"


@given(name=names, version=versions)
def test_desired_state_accepts_only_plain_names_and_versions(name: str, version: str) -> None:
    state = T.valid_desired_state()
    state["models"] = {name: {**state["models"]["iris"], "version": version}}
    state["remove"] = []
    try:
        validate_desired(state)
    except RejectError:
        return
    assert _plain(name) and _plain(version), f"accepted {name!r} {version!r}"


dims = st.one_of(
    st.integers(0, 4),
    st.sampled_from([1.0, 2.5, True, False, "2", "\u0662", 2.0**60]),
)


@given(st.lists(dims, min_size=1, max_size=3))
def test_inference_shapes_are_integers(shape: list[Any]) -> None:
    count = math.prod(int(d) for d in shape) if all(isinstance(d, int) for d in shape) else 1
    body = json.dumps(
        {"inputs": [{"name": "X", "datatype": "FP32", "shape": shape, "data": [0.5] * count}]}
    ).encode()
    try:
        oip.parse_request(body, None)
    except (oip.ProtocolError, ValueError, TypeError, OverflowError):
        return  # refusals (and crashes, which test_fuzz_parsers judges) are not this test's
    assert all(type(d) is int for d in shape), f"accepted shape {shape!r}"
