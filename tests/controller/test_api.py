"""The HTTP API against a real uvicorn server on loopback with a SQLite file."""

from __future__ import annotations

from pathlib import Path

import httpx

from edgefleet.cloud_controller import devices
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.models import DesiredState
from edgefleet.keys import KeyPair, generate_keypair
from tests.controller.conftest import Running


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    return client.post(
        "/api/v1/packages",
        content=path.read_bytes(),
        headers={"Content-Type": "application/octet-stream"},
    )


def presence(
    run: Running, device_id: str, profiles: list[str], installed: str | None = None
) -> None:
    msg = {
        "device_id": device_id,
        "online": True,
        "agent_version": "0.1.0",
        "execution_providers": ["CPUExecutionProvider"],
        "profiles": profiles,
        "hardware": {"cpu_count": 2},
        "installed": {"iris": {"version": installed, "previous": None, "state": "COMMITTED"}}
        if installed
        else {},
    }
    with transaction(run.controller.factory) as s:
        devices.apply_presence(s, device_id, msg)


def test_tokens_roles_and_audit(controller: Running, packages: dict[str, Path]) -> None:
    anon = httpx.Client(base_url=controller.url, timeout=30)
    r = anon.get("/api/v1/devices")
    assert r.status_code == 401 and r.json()["detail"]["code"] == "unauthenticated"
    bad = httpx.Client(
        base_url=controller.url, headers={"Authorization": "Bearer nope"}, timeout=30
    )
    assert bad.get("/api/v1/devices").json()["detail"]["code"] == "invalid_token"
    with controller.client("viewer") as viewer:
        assert viewer.get("/api/v1/devices").status_code == 200
        r = upload(viewer, packages["1.0.0/cpu-x86_64"])
        assert r.status_code == 403 and r.json()["detail"]["code"] == "forbidden"
        assert viewer.post("/api/v1/devices", json={"device_id": "x"}).status_code == 403
        assert viewer.get("/api/v1/audit").status_code == 403
    with controller.client("publisher") as pub:
        assert upload(pub, packages["1.0.0/cpu-x86_64"]).status_code == 201
        assert pub.post("/api/v1/rollouts", json={}).status_code == 403
    with controller.client() as admin:
        r = admin.post("/api/v1/tokens", json={"role": "operator", "name": "ci"})
        assert r.status_code == 201
        new = r.json()["token"]
        op = httpx.Client(base_url=controller.url, headers={"Authorization": f"Bearer {new}"})
        assert op.post("/api/v1/devices", json={"device_id": "gw-1"}).status_code == 201
        log = admin.get("/api/v1/audit").json()
    actions = [(e["actor"], e["action"], e["outcome"]) for e in log]
    assert ("token:test-publisher#2", "POST /api/v1/packages", 201) in actions
    assert any(a[1] == "POST /api/v1/packages" and a[2] == 403 for a in actions)
    assert any(a[0].startswith("token:ci#") and a[1] == "POST /api/v1/devices" for a in actions)
    assert ("token:test-admin#1", "POST /api/v1/tokens", 201) in actions
    # nothing stored in clear
    from sqlalchemy import select

    from edgefleet.cloud_controller.models import ApiToken, Device

    with controller.controller.factory() as s:
        hashes = set(s.scalars(select(ApiToken.token_hash)))
        dev = s.get(Device, "gw-1")
    assert new not in hashes and len(hashes) == 5
    assert dev is not None and dev.mqtt_password_hash and dev.mqtt_password_hash.startswith("$7$")


def test_upload_verifies_and_refuses_with_reason(
    any_controller: Running, packages: dict[str, Path], tmp_path: Path, packager_key: KeyPair
) -> None:
    controller = any_controller
    from tests.support.packages import make_package

    with controller.client("publisher") as pub:
        r = upload(pub, packages["2.0.0/cpu-x86_64"])
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["created"] and body["name"] == "iris" and body["profile"] == "cpu-x86_64"
        again = upload(pub, packages["2.0.0/cpu-x86_64"])
        assert again.status_code == 201 and again.json()["created"] is False
        assert upload(pub, packages["2.0.0/cpu-arm64"]).status_code == 201
        stranger = generate_keypair(tmp_path / "k", "stranger")
        foreign = make_package(tmp_path / "p", name="iris", version="3.0.0", key=stranger)
        r = upload(pub, foreign)
        assert r.status_code == 422 and r.json()["detail"]["code"] == "untrusted_key"
        r = pub.post("/api/v1/packages", files={"file": ("x.efpkg", b"abc")})
        assert r.status_code == 415 and r.json()["detail"]["code"] == "unsupported_media_type"
        garbage = tmp_path / "junk.efpkg"
        garbage.write_bytes(b"not a tar" * 100)
        r = upload(pub, garbage)
        assert r.status_code == 422 and r.json()["detail"]["code"] == "not_a_package"
        # same name/version/profile, different bytes: versions are immutable
        other = make_package(tmp_path / "q", name="iris", version="2.0.0", key=packager_key, seed=3)
        r = upload(pub, other)
        assert r.status_code == 409 and r.json()["detail"]["code"] == "already_exists"
        rel = pub.get("/api/v1/releases").json()
        assert rel == [
            {
                "name": "iris",
                "version": "2.0.0",
                "profiles": ["cpu-arm64", "cpu-x86_64"],
                "uploaded_at": rel[0]["uploaded_at"],
            }
        ]
        listed = pub.get("/api/v1/packages").json()
        assert len(listed) == 2
        assert pub.get(f"/api/v1/packages/{listed[0]['id']}").json()["manifest"]["name"] == "iris"
    # stored by content: one file per digest, nothing for the refused uploads
    stored = list((controller.controller.settings.package_dir / "sha256").iterdir())
    assert sorted(p.name for p in stored) == sorted(f"{p['sha256']}.efpkg" for p in listed)


def give_desired(controller: Running, device_id: str, package_id: int) -> None:
    """Name package `package_id` in the device's desired state, as a rollout would."""
    from edgefleet.cloud_controller import desired, registry
    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.models import Package

    ctl = controller.controller
    with transaction(ctl.factory) as s:
        p = s.get(Package, package_id)
        assert p is not None
        entry = registry.desired_entry(p, ctl.settings.base_url, None, False)
        desired.set_model(s, ctl.signer, device_id, p.name, entry)


def test_device_download_with_range(controller: Running, packages: dict[str, Path]) -> None:
    src = packages["1.0.0/cpu-x86_64"]
    data = src.read_bytes()
    with controller.client() as admin:
        pkg = upload(admin, src).json()
        creds = admin.post(
            "/api/v1/devices", json={"device_id": "gw-7", "groups": ["lab"], "tags": ["x"]}
        ).json()
    assert creds["mqtt_username"] == "gw-7" and creds["download_token"].startswith("efd_")
    dev = httpx.Client(
        base_url=controller.url,
        headers={"Authorization": f"Bearer {creds['download_token']}"},
        timeout=30,
    )
    url = pkg["url"].replace(controller.controller.settings.base_url, "")
    # a device's token reaches only what its desired state names
    r = dev.get(url)
    assert r.status_code == 403 and r.json()["detail"]["code"] == "not_in_desired_state"
    give_desired(controller, "gw-7", pkg["id"])
    full = dev.get(url)
    assert full.status_code == 200 and full.content == data
    assert full.headers["x-sha256"] == pkg["sha256"]
    part = dev.get(url, headers={"Range": "bytes=100-1099"})
    assert part.status_code == 206 and part.content == data[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{len(data)}"
    tail = dev.get(url, headers={"Range": f"bytes={len(data) - 10}-"})
    assert tail.content == data[-10:]
    # a device token is only good for downloads
    assert dev.get("/api/v1/devices").status_code == 401
    assert (
        httpx.get(controller.url + url, headers={"Authorization": "Bearer efd_wrong"}).status_code
        == 401
    )


def test_devices_inventory_and_labels(controller: Running) -> None:
    presence(controller, "gw-a", ["cpu-x86_64"], installed="1.0.0")
    with controller.client("operator") as op:
        op.post("/api/v1/devices", json={"device_id": "gw-b", "groups": ["lab"]})
        r = op.patch("/api/v1/devices/gw-a", json={"groups": ["lab", "eu"], "tags": ["pilot"]})
        assert r.status_code == 200 and r.json()["groups"] == ["eu", "lab"]
        assert op.patch("/api/v1/devices/none", json={"tags": []}).status_code == 404
        lab = op.get("/api/v1/devices", params={"group": "lab"}).json()
        assert [d["device_id"] for d in lab] == ["gw-a", "gw-b"]
        pilot = op.get("/api/v1/devices", params={"tag": "pilot"}).json()
        assert [d["device_id"] for d in pilot] == ["gw-a"]
        a = op.get("/api/v1/devices/gw-a").json()
        assert a["online"] and a["agent_version"] == "0.1.0" and a["profiles"] == ["cpu-x86_64"]
        assert a["installed"]["iris"]["version"] == "1.0.0"
        assert op.get("/api/v1/devices/zzz").status_code == 404
        r = op.post("/api/v1/devices", json={"device_id": "bad/id"})
        assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_device_id"


def test_rollout_over_the_api_with_signed_desired_states(
    any_controller: Running, packages: dict[str, Path]
) -> None:
    controller = any_controller
    from edgefleet.keys import load_public_key  # noqa: F401
    from edgefleet.wire.mqtt import verify_desired

    with controller.client("publisher") as pub:
        for k in ("1.0.0/cpu-x86_64", "2.0.0/cpu-x86_64"):
            assert upload(pub, packages[k]).status_code == 201
    for i in range(6):
        presence(controller, f"gw-{i}", ["cpu-x86_64"], installed="1.0.0")
    presence(controller, "gw-npu", ["npu-qnn"], installed="1.0.0")
    spec = {
        "model": "iris",
        "version": "2.0.0",
        "target": {
            "tags": [],
            "groups": [],
            "device_ids": [f"gw-{i}" for i in range(6)] + ["gw-npu"],
        },
        "waves": [34, 100],
        "device_timeout_s": 300,
        "approval_waves": [1],
        "seed": 11,
    }
    with controller.client("operator") as op:
        assert op.post("/api/v1/rollouts", json={**spec, "bogus": 1}).status_code == 422
        r = op.post("/api/v1/rollouts", json={**spec, "version": "9.9.9"})
        assert r.status_code == 404 and r.json()["detail"]["code"] == "release_not_found"
        r = op.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 201, r.text
        ro = r.json()
        rid = ro["id"]
        assert ro["wave_sizes"] == [3, 3] and ro["spec"]["seed"] == 11
        assert ro["counts"]["states"] == {"in_progress": 3, "pending": 3, "incompatible": 1}
        r = op.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 409 and r.json()["detail"]["code"] == "rollout_conflict"
        key_pem = op.get("/api/v1/keys/controller").json()["pem"].encode()
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    pub_key = load_pem_public_key(key_pem)
    moved = [
        d
        for d, p in controller.controller.rollouts.get_state(rid).devices.items()
        if p.state == E.DevState.IN_PROGRESS
    ]
    with controller.controller.factory() as s:
        for dev in moved:
            row = s.get(DesiredState, dev)
            assert row is not None
            state = verify_desired(row.envelope, [pub_key], device_id=dev, last_seq=0)  # type: ignore[list-item]
            entry = state["models"]["iris"]
            assert entry["version"] == "2.0.0" and entry["rollout_id"] == rid
            assert entry["profile"] == "cpu-x86_64" and not entry["allow_downgrade"]
            assert entry["url"].endswith("/download") and len(entry["sha256"]) == 64
    svc = controller.controller.rollouts
    svc.on_status(
        [("iris", E.StatusReport(d, "2.0.0", "COMMITTED", rollout_id=rid)) for d in moved]
    )
    with controller.client("operator") as op:
        shown = op.get(f"/api/v1/rollouts/{rid}").json()
        assert shown["phase"] == "awaiting_approval" and shown["wave"] == 1
        assert any("waiting for approval" in e["message"] for e in shown["events"])
        assert op.post(f"/api/v1/rollouts/{rid}/pause").json()["paused"] is True
        assert op.post(f"/api/v1/rollouts/{rid}/approve").json()["phase"] == "running"
        r = op.post(f"/api/v1/rollouts/{rid}/resume").json()
        assert r["counts"]["states"]["in_progress"] == 3
        assert op.post(f"/api/v1/rollouts/{rid}/explode").status_code == 404
        listed = op.get("/api/v1/rollouts").json()
        assert listed[0]["id"] == rid and listed[0]["phase"] == "running"
        body = {"reason": "test", "on_abort": "rollback"}
        r = op.post(f"/api/v1/rollouts/{rid}/abort", json=body).json()
        assert r["phase"] == "aborted" and r["counts"]["rollback_requested"] == 6
        r = op.post(f"/api/v1/rollouts/{rid}/pause")
        assert r.status_code == 409 and r.json()["detail"]["code"] == "finished"
    with controller.controller.factory() as s:
        for dev in (f"gw-{i}" for i in range(6)):
            row = s.get(DesiredState, dev)
            assert row is not None
            entry = row.models["iris"]
            assert entry["version"] == "1.0.0" and entry["allow_downgrade"] is True
        assert s.get(DesiredState, "gw-npu") is None


def test_metrics_and_openapi(controller: Running) -> None:
    presence(controller, "gw-m", ["cpu-x86_64"])
    text = httpx.get(controller.url + "/metrics", timeout=30).text
    assert 'edgefleet_devices{online="true"} 1.0' in text
    spec = httpx.get(controller.url + "/openapi.json", timeout=30).json()
    assert "/api/v1/rollouts/{rollout_id}/{action}" in spec["paths"]
    assert httpx.get(controller.url + "/healthz", timeout=30).json()["ok"] is True
