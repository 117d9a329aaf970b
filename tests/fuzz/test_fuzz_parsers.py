"""Property: every parser of outside bytes accepts its input or refuses it with its own error
type and a reason; never another exception, never a hang, never memory out of proportion to the
input (see `tests.fuzz.targets`). Short runs here (profile "ci"); the long run is
``python -m bench fuzz``."""

from __future__ import annotations

import os

import pytest
from hypothesis import Phase, given, settings

from tests.fuzz import targets as T
from tests.fuzz.strategies import STRATEGIES

TARGETS = T.targets()
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

# The short run does not shrink: a failure names its input, and the known ones have minimal
# reproducers in test_fuzz_known. The long profile shrinks.
if os.environ.get("EDGEFLEET_HYPOTHESIS_PROFILE", "ci") == "ci":
    given_fuzz = settings(phases=[Phase.explicit, Phase.reuse, Phase.generate])
else:
    given_fuzz = settings()


def _check(name: str, data: bytes) -> None:
    T.check(TARGETS[name], data)


# --------------------------------------------------------------------------- the properties


@given_fuzz
@given(STRATEGIES["manifest"])
def test_manifest_validator(data: bytes) -> None:
    _check("manifest", data)


@given_fuzz
@given(STRATEGIES["signature_bundle"])
def test_signature_bundle_verifier(data: bytes) -> None:
    _check("signature_bundle", data)


@given_fuzz
@given(STRATEGIES["package_file"])
def test_package_reader(data: bytes) -> None:
    _check("package_file", data)


@given_fuzz
@given(STRATEGIES["package_signed_manifest"])
def test_package_reader_with_signed_hostile_manifest(data: bytes) -> None:
    _check("package_signed_manifest", data)


@given_fuzz
@given(STRATEGIES["desired_envelope"])
def test_desired_state_envelope(data: bytes) -> None:
    _check("desired_envelope", data)


@given_fuzz
@given(STRATEGIES["desired_signed_state"])
def test_desired_state_with_signed_hostile_payload(data: bytes) -> None:
    _check("desired_signed_state", data)


@given_fuzz
@given(STRATEGIES["status"])
def test_status_parser(data: bytes) -> None:
    _check("status", data)


@given_fuzz
@given(STRATEGIES["presence"])
def test_presence_parser(data: bytes) -> None:
    _check("presence", data)


@given_fuzz
@given(STRATEGIES["telemetry"])
def test_telemetry_parser(data: bytes) -> None:
    _check("telemetry", data)


@given_fuzz
@given(STRATEGIES["infer_json"])
def test_inference_json_request_parser(data: bytes) -> None:
    _check("infer_json", data)


@given_fuzz
@given(STRATEGIES["infer_binary"])
def test_inference_binary_request_parser(data: bytes) -> None:
    _check("infer_binary", data)


@given_fuzz
@given(STRATEGIES["controller_models"])
def test_controller_request_models(data: bytes) -> None:
    _check("controller_models", data)
