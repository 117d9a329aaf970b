"""The contract between agent and controller: every reason code an agent can put in a status
report is a `ReasonCode` (so the controller classifies it as transient, final or
informational), and every message the agent builds is one the controller parses back.

The codes are collected statically from the agent's source: a code added to the agent without
a `ReasonCode` member fails here, not in a rollout that never retries it.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from edgefleet.wire import presence, status, telemetry
from edgefleet.wire.message import MessageError
from edgefleet.wire.reasons import FINAL, INFORMATIONAL, TRANSIENT, ReasonCode, is_transient
from edgefleet.wire.states import UpdateState

AGENT = Path(__file__).resolve().parents[2] / "agent"
# Calls whose positional argument at this index is a reason code.
CODE_ARG = {
    "StepFailed": 0,
    "DownloadError": 0,
    "GateFailure": 0,
    "RejectError": 0,
    "_roll_back": 1,
    "_transition": 2,
    "transition": 2,
    "_report_target": None,  # only its code= keyword
}
CODE_KEYWORDS = {"reason_code", "code"}
# Functions returning (code, reason) tuples.
CODE_TUPLE_FUNCTIONS = {"judge_probation"}


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _str(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def codes_in(source: str) -> dict[str, int]:
    """code -> line of one place the agent source produces it."""
    found: dict[str, int] = {}
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _name(node.func)
            index = CODE_ARG.get(name or "")
            if index is not None and len(node.args) > index:
                code = _str(node.args[index])
                if code is not None:
                    found.setdefault(code, node.lineno)
            for kw in node.keywords:
                code = _str(kw.value) if kw.arg in CODE_KEYWORDS else None
                if code is not None:
                    found.setdefault(code, node.lineno)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                code = _str(value) if _str(key) == "reason_code" else None
                if code is not None:
                    found.setdefault(code, node.lineno)
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "ReasonCode":
                found.setdefault(ReasonCode[node.attr].value, node.lineno)
        elif isinstance(node, ast.FunctionDef) and node.name in CODE_TUPLE_FUNCTIONS:
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Tuple):
                    code = _str(ret.value.elts[0])
                    if code is not None:
                        found.setdefault(code, ret.lineno)
    return found


def agent_codes() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(AGENT.rglob("*.py")):
        for code, line in codes_in(path.read_text()).items():
            out.setdefault(code, f"{path.relative_to(AGENT.parent)}:{line}")
    return out


def test_the_scanner_finds_what_it_claims_to() -> None:
    src = """
raise StepFailed("a_code", "why")
raise DownloadError("b_code", "why")
self._transition(rec, State.FAILED, "c_code", "why")
self._roll_back(rec, "d_code", "why")
self._report({"kind": "update", "reason_code": "e_code"})
self._report_target(t, "FAILED", "why", 1, code="f_code")
x = ReasonCode.TIMEOUT
def judge_probation():
    return ("g_code", "why")
"""
    assert set(codes_in(src)) == {f"{c}_code" for c in "abcdefg"} | {"timeout"}


def test_the_agent_source_yields_the_codes_of_each_layer() -> None:
    codes = agent_codes()
    # One from each place the agent decides a failure: the scan must reach them all.
    for expected in (
        "download_incomplete",  # download.py
        "disk_full",  # update/checks.py
        "latency_gate",  # validation.py
        "probation_latency",  # sessions.py
        "resume_limit",  # update/worker.py recovery
        "remove_refused",  # the MQTT link
    ):
        assert expected in codes, expected


def test_every_code_the_agent_produces_is_a_classified_reason_code() -> None:
    unknown = {c: where for c, where in agent_codes().items() if c not in set(ReasonCode)}
    assert not unknown, f"agent reason codes missing from ReasonCode: {unknown}"


def test_classes_partition_the_codes() -> None:
    assert set(ReasonCode) == TRANSIENT | FINAL | INFORMATIONAL
    assert not (TRANSIENT & FINAL or TRANSIENT & INFORMATIONAL or FINAL & INFORMATIONAL)
    # What the agent's downloader retries itself and then gives up on is worth a later retry.
    assert {ReasonCode.HTTP_ERROR, ReasonCode.DOWNLOAD_INCOMPLETE} <= TRANSIENT
    assert is_transient("timeout") and not is_transient("signature_invalid")
    assert not is_transient("code_from_a_newer_agent")


# --- round trips: what the agent builds, the controller parses to the same thing -------------


def _wire(obj: dict[str, object]) -> bytes:
    return json.dumps(obj).encode()


def test_status_round_trip() -> None:
    sent = status.StatusReport(
        device_id="gw-1",
        at="2024-05-01T00:00:00Z",
        kind="update",
        state=UpdateState.ROLLED_BACK,
        model="iris",
        version="1.1.0",
        reason_code=ReasonCode.PROBATION_LATENCY,
        reason="p95 too high",
        rollout_id="r1",
        update_id="u1",
        from_version="1.0.0",
        desired_seq=7,
        figures={"p95_ms": 3.5},
    )
    body = status.with_seq(sent.to_dict(), 42)
    got = status.parse(_wire(body), "gw-1")
    assert got == status.StatusReport(**{**sent.__dict__, "seq": 42})
    assert got.reason_code is ReasonCode.PROBATION_LATENCY and not got.transient


def test_status_rejected_desired_state_round_trip() -> None:
    sent = status.StatusReport(
        device_id="gw-1",
        at="2024-05-01T00:00:00Z",
        kind="desired_rejected",
        state=None,
        reason_code=ReasonCode.UNTRUSTED_KEY,
        reason="unknown key",
    )
    body = sent.to_dict()
    assert body["state"] == "REJECTED" and "model" not in body
    got = status.parse(status.with_seq(body, 3))
    assert got.kind == "desired_rejected" and got.state is None and got.seq == 3


def test_status_from_a_simulator_and_an_unknown_code() -> None:
    raw = {
        "device_id": "sim",
        "seq": 5,
        "model": "iris",
        "version": "2.0.0",
        "state": "FAILED",
        "reason_code": "quantum_flux",
        "at": 1714521600.5,
        "benchmark": {"p95_ms": 1.0},
    }
    got = status.parse(_wire(raw), "sim")
    assert got.kind == "update" and got.state is UpdateState.FAILED
    assert got.reason_code == "quantum_flux" and not got.transient  # kept, final
    assert got.figures == {"p95_ms": 1.0} and got.at == 1714521600.5


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seq": "5"}, "seq"),
        ({"seq": True}, "seq"),
        ({"state": "DANCING"}, "state"),
        ({"state": None}, "state"),
        ({"model": 3}, "model"),
        ({"version": None}, "version"),
        ({"reason_code": 17}, "reason_code"),
        ({"kind": "gossip"}, "kind"),
        ({"figures": [1, 2]}, "figures"),
        ({"at": [2024]}, "at"),
        ({"already_installed": "yes"}, "already_installed"),
        ({"device_id": "other"}, "device_id"),
    ],
)
def test_status_refusals_name_the_field(change: dict[str, object], field: str) -> None:
    good = {"device_id": "gw", "seq": 1, "model": "iris", "version": "1.0.0", "state": "IDLE"}
    status.parse(good, "gw")
    with pytest.raises(MessageError) as e:
        status.parse({**good, **change}, "gw")
    assert e.value.field == field and e.value.reason == f"status_bad_{field}"


def test_presence_round_trip_and_offline_will() -> None:
    sent = presence.Presence(
        device_id="gw-1",
        online=True,
        at="2024-05-01T00:00:00Z",
        agent_version="0.3.0",
        execution_providers=["CPUExecutionProvider"],
        profiles=["cpu-x86_64"],
        hardware={"machine": "x86_64", "memory_mb": 2048},
        models={"iris": presence.InstalledModel("1.1.0", "1.0.0", "COMMITTED")},
    )
    body = sent.to_dict()
    assert body["installed"] == {"iris": {"version": "1.1.0"}}  # what the controller keeps
    assert body["models"] == {
        "iris": {"version": "1.1.0", "previous": "1.0.0", "state": "COMMITTED"}
    }
    assert presence.parse(_wire(body), "gw-1") == presence.Presence(
        **{**sent.__dict__, "models": {"iris": presence.InstalledModel("1.1.0")}}
    )
    will = presence.parse(_wire(presence.offline("gw-1").to_dict()), "gw-1")
    assert will == presence.Presence("gw-1", online=False)
    assert will.models is None and will.profiles is None  # absent: inventory unchanged


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"online": "yes"}, "online"),
        ({"profiles": "cpu"}, "profiles"),
        ({"execution_providers": [1]}, "execution_providers"),
        ({"hardware": "big"}, "hardware"),
        ({"installed": {"iris": "1.0.0"}}, "installed"),
        ({"installed": {"iris": {"version": 1}}}, "installed"),
        ({"agent_version": 3}, "agent_version"),
    ],
)
def test_presence_refusals_name_the_field(change: dict[str, object], field: str) -> None:
    good = {"device_id": "gw", "online": True, "installed": {"iris": {"version": "1.0.0"}}}
    presence.parse(good, "gw")
    with pytest.raises(MessageError) as e:
        presence.parse({**good, **change}, "gw")
    assert e.value.field == field


def test_telemetry_round_trip_and_refusals() -> None:
    records = [{"id": 1, "kind": "agent", "at": "2024-05-01T00:00:00Z"}]
    sent = telemetry.TelemetryEnvelope("gw-1", records)
    got = telemetry.parse(_wire(sent.to_dict()), "gw-1")
    assert got == sent and got.skipped == 0
    assert telemetry.parse({"records": [*records, 7]}, "gw-1").skipped == 1
    for bad, field in (
        ({"records": "not a list"}, "records"),
        ({"device_id": "gw-2", "records": []}, "device_id"),
    ):
        with pytest.raises(MessageError) as e:
            telemetry.parse(bad, "gw-1")
        assert e.value.field == field
    with pytest.raises(MessageError, match="not JSON"):
        telemetry.parse(b"{oops", "gw-1")
