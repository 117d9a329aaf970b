"""The controller's HTTP API against hostile requests, on a real uvicorn server on loopback
(SQLite): every answer is a success or a 4xx whose JSON names the problem; never a 5xx, never a
dropped connection, never a hang."""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from edgefleet.wire.keyid import public_pem
from tests.controller.conftest import Running, start_controller
from tests.fuzz import targets as T
from tests.fuzz.strategies import (
    byte_sabotage,
    encode,
    hostile_json,
    mutated,
    nasty_ints,
    nasty_text,
)

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")
if os.environ.get("EDGEFLEET_HYPOTHESIS_PROFILE", "ci") == "ci":
    given_fuzz = settings(phases=[Phase.explicit, Phase.reuse, Phase.generate], max_examples=60)
else:
    given_fuzz = settings()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root: Path = tmp_path_factory.mktemp("fuzz-ctl")
    pub = root / "packager.pub"
    pub.write_bytes(public_pem(T.PACKAGER_PUB))
    run = start_controller(root / "data", trusted=[pub])
    with run.client() as c:  # something to refer to
        assert c.post("/api/v1/devices", json={"device_id": "gw-001"}).status_code == 201
    try:
        yield run
    finally:
        run.stop()


def judge(r: httpx.Response, what: str) -> None:
    assert r.status_code < 500, f"{what}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        try:
            body = r.json()
        except ValueError as e:
            raise AssertionError(f"{what}: {r.status_code} without a JSON reason") from e
        assert isinstance(body, dict) and body.get("detail"), f"{what}: no reason in {body!r}"


def send(api: Running, method: str, path: str, body: bytes | None, ctype: str) -> None:
    what = f"{method} {path} {body[:200] if body else b''!r}"
    with httpx.Client(
        base_url=api.url, headers={"Authorization": f"Bearer {api.admin}"}, timeout=20
    ) as c:
        try:
            r = c.request(method, path, content=body, headers={"Content-Type": ctype})
        except httpx.TransportError as e:
            raise AssertionError(f"{what}: no answer ({type(e).__name__}: {e})") from e
    judge(r, what)


path_ids = st.one_of(
    st.sampled_from(["gw-001", "nope", "%00", "a%0Ab", "..", "9" * 30, "-1", "1e9", "%ff"]),
    nasty_ints.map(str),
    nasty_text.filter(bool).map(
        lambda s: urllib.parse.quote(s.encode("utf-8", "surrogatepass"), safe="")
    ),
)
_JSON = "application/json"
_ROLLOUT = T.valid_rollout_request()


@st.composite
def json_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    kind = draw(st.sampled_from(["devices", "labels", "rollouts", "control", "tokens"]))
    if kind == "devices":
        base: dict[str, Any] = {"device_id": "gw-009", "groups": ["lab"], "tags": ["t"]}
        return "POST", "/api/v1/devices", draw(hostile_json(base))
    if kind == "labels":
        return (
            "PATCH",
            f"/api/v1/devices/{draw(path_ids)}",
            draw(hostile_json({"groups": ["lab"], "tags": ["t"]})),
        )
    if kind == "rollouts":
        return "POST", "/api/v1/rollouts", draw(hostile_json(_ROLLOUT))
    if kind == "control":
        action = draw(st.sampled_from(["approve", "pause", "resume", "cancel", "abort", "x"]))
        body = draw(hostile_json({"wave": 0, "rollback": True, "reason": "r"}))
        return "POST", f"/api/v1/rollouts/{draw(path_ids)}/{action}", body
    return "POST", "/api/v1/tokens", draw(hostile_json({"role": "viewer", "name": "fuzz"}))


@st.composite
def reads(draw: st.DrawFn) -> tuple[str, str]:
    kind = draw(st.sampled_from(["package", "download", "device", "rollout", "audit", "list"]))
    ident = draw(path_ids)
    if kind == "package":
        return "GET", f"/api/v1/packages/{ident}"
    if kind == "download":
        return "GET", f"/api/v1/packages/{ident}/download"
    if kind == "device":
        return "GET", f"/api/v1/devices/{ident}"
    if kind == "rollout":
        return "GET", f"/api/v1/rollouts/{ident}"
    if kind == "audit":
        return "GET", f"/api/v1/audit?limit={ident}"
    return "GET", f"/api/v1/devices?group={ident}&tag={ident}"


@given_fuzz
@given(json_requests())
def test_json_bodies(api: Running, req: tuple[str, str, bytes]) -> None:
    method, path, body = req
    send(api, method, path, body, _JSON)


@given_fuzz
@given(reads())
def test_path_and_query_parameters(api: Running, req: tuple[str, str]) -> None:
    send(api, *req, None, _JSON)


@st.composite
def uploads(draw: st.DrawFn) -> bytes:
    """Package uploads signed by a key the controller trusts: hostile manifests reach the
    registry's own checks."""
    if draw(st.booleans()):
        return T.package_bytes(encode(draw(mutated(T.valid_manifest()))))
    return draw(byte_sabotage(_VALID_PACKAGE))


_VALID_PACKAGE = T.valid_package()


@given_fuzz
@given(uploads())
def test_package_uploads(api: Running, body: bytes) -> None:
    send(api, "POST", "/api/v1/packages", body, "application/octet-stream")


_M = T.valid_manifest()
KNOWN = [
    pytest.param(
        "GET",
        "/api/v1/packages/99999999999999999999",
        None,
        id="package-id-over-int64",
    ),
    pytest.param(
        "POST",
        "/api/v1/packages",
        T.package_bytes(b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
        id="upload-deep-manifest",
    ),
    pytest.param(
        "POST",
        "/api/v1/packages",
        T.package_bytes(
            T.encode_json({**_M, "model": {"file": "model.onnx", "external_data": [[]]}})
        ),
        id="upload-external-data-list-entry",
    ),
    pytest.param(
        "PATCH",
        "/api/v1/devices/gw-001",
        b"1e999999",
        id="labels-infinity-body",
    ),
    pytest.param(
        "POST",
        "/api/v1/devices",
        b'{"device_id": NaN}',
        id="register-nan-device-id",
    ),
    pytest.param(
        "POST",
        "/api/v1/devices",
        b'{"device_id": "\\ud800"}',
        id="register-surrogate-device-id",
    ),
    pytest.param(
        "POST",
        "/api/v1/rollouts",
        json.dumps({**_ROLLOUT, "waves": [float("nan")]}).encode(),
        id="rollout-nan-wave",
    ),
    pytest.param(
        "GET",
        "/api/v1/audit?limit=-10873036058438505842998247424",
        None,
        id="audit-limit-below-int64",
    ),
]


@pytest.mark.parametrize(("method", "path", "body"), KNOWN)
def test_known_requests(api: Running, method: str, path: str, body: bytes | None) -> None:
    send(api, method, path, body, "application/octet-stream" if "packages" in path else _JSON)


@given_fuzz
@given(
    st.one_of(
        nasty_text,
        st.text(min_size=1, max_size=20),
        st.sampled_from(["rt-inj\nedgefleet-controller", "gw 1", "gw\t1", "gw-\u0661"]),
    )
)
def test_registered_device_ids_are_plain(api: Running, device_id: str) -> None:
    """A device id the API registers can reach a password file, a topic and a log line: it
    holds no whitespace, no control character and nothing outside ASCII."""
    with api.client() as c:
        body = json.dumps({"device_id": device_id}).encode()  # a lone surrogate as \\udXXX
        r = c.post("/api/v1/devices", content=body, headers={"Content-Type": _JSON})
    judge(r, f"register {device_id!r}")
    if r.status_code == 201:
        assert (
            device_id.isascii()
            and device_id.isprintable()
            and not any(ch.isspace() for ch in device_id)
        ), f"registered {device_id!r}"
