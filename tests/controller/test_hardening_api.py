"""Attacks on the controller's HTTP API, each against a real controller over loopback."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import text
from typer.testing import CliRunner

from edgefleet.keys import KeyPair
from tests.controller.conftest import Running
from tests.controller.test_api import give_desired, upload
from tests.support.packages import make_package
from tests.wire.tamper import Member, edit_manifest, read_members, resign, rewrite, write_members


def raw_request(run: Running, head: str, body_part: bytes) -> str:
    """Send headers and only the start of the body; return the first reply line."""
    port = int(run.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body_part)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def test_no_body_is_read_before_the_token_is_checked(controller: Running) -> None:
    """A 40 MB upload without (or with a wrong) token is answered 401 after 64 KB were sent:
    the controller did not wait for, buffer or parse the rest."""
    head = (
        "POST /api/v1/packages HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 41943040"
    )
    assert raw_request(controller, head, b"\0" * 65536).endswith("401 Unauthorized")
    wrong = head + "\r\nAuthorization: Bearer eft_wrong"
    assert raw_request(controller, wrong, b"\0" * 65536).endswith("401 Unauthorized")
    # JSON routes have a small body limit, refused from the declared length ...
    token = controller.tokens["operator"]
    big = (
        "POST /api/v1/devices HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token}\r\nContent-Length: {8 * 1024**2}"
    )
    assert raw_request(controller, big, b"{").endswith("413 Request Entity Too Large")

    # ... and while it streams when no length is declared (chunked).
    def chunks() -> Iterator[bytes]:
        yield b'{"device_id": "gw-1", "tags": ["'
        for _ in range(40):
            yield b"x" * 65536

    with controller.client("operator") as op:
        r = op.post(
            "/api/v1/devices", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413 and r.json()["detail"]["code"] == "too_large"
        # a body under the limit still works
        assert op.post("/api/v1/devices", json={"device_id": "gw-1"}).status_code == 201
    with controller.client() as admin:
        audit = admin.get("/api/v1/audit").json()
    outcomes = [(a["actor"], a["outcome"]) for a in audit if a["target"] == "/api/v1/packages"]
    assert ("anonymous", 401) in outcomes


def test_a_call_that_ends_in_500_and_every_download_are_audited(
    controller: Running, packages: dict[str, Path]
) -> None:
    engine = controller.controller.engine
    with engine.begin() as c:  # a real database failure in the middle of a call
        c.execute(
            text(
                "CREATE TRIGGER boom BEFORE INSERT ON api_tokens "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        )
    with controller.client() as admin:  # (the server closes a connection after a 500)
        r = admin.post("/api/v1/tokens", json={"role": "viewer", "name": "doomed"})
        assert r.status_code == 500
    with engine.begin() as c:
        c.execute(text("DROP TRIGGER boom"))
    with controller.client() as admin:
        pkg = upload(admin, packages["1.0.0/cpu-x86_64"]).json()
        creds = admin.post("/api/v1/devices", json={"device_id": "gw-7"}).json()
        give_desired(controller, "gw-7", pkg["id"])
        dev = httpx.Client(
            base_url=controller.url,
            headers={"Authorization": f"Bearer {creds['download_token']}"},
            timeout=30,
        )
        assert dev.get(f"/api/v1/packages/{pkg['id']}/download").status_code == 200
        assert admin.get(f"/api/v1/packages/{pkg['id']}/download").status_code == 200
        audit = admin.get("/api/v1/audit").json()
    failed = [a for a in audit if a["action"] == "POST /api/v1/tokens"]
    assert [a["outcome"] for a in failed] == [500]
    assert failed[0]["actor"].startswith("token:test-admin#")
    downloads = [a for a in audit if a["action"].endswith("/download")]
    assert sorted(a["actor"].split(":")[0] for a in downloads) == ["device", "token"]
    assert all(a["outcome"] == 200 and a["detail"]["sha256"] == pkg["sha256"] for a in downloads)


def test_a_device_token_downloads_only_what_its_desired_state_names(
    controller: Running, packages: dict[str, Path]
) -> None:
    with controller.client() as admin:
        p1 = upload(admin, packages["1.0.0/cpu-x86_64"]).json()
        p2 = upload(admin, packages["2.0.0/cpu-x86_64"]).json()
        a = admin.post("/api/v1/devices", json={"device_id": "gw-a"}).json()
        b = admin.post("/api/v1/devices", json={"device_id": "gw-b"}).json()
    give_desired(controller, "gw-a", p1["id"])

    def get(creds: dict[str, Any], pkg: dict[str, Any]) -> int:
        h = {"Authorization": f"Bearer {creds['download_token']}"}
        return httpx.get(
            f"{controller.url}/api/v1/packages/{pkg['id']}/download", headers=h
        ).status_code

    assert (get(a, p1), get(a, p2), get(b, p1), get(b, p2)) == (200, 403, 403, 403)
    give_desired(controller, "gw-a", p2["id"])  # the desired state moved on: so does the token
    assert (get(a, p1), get(a, p2)) == (403, 200)


def test_tokens_can_be_listed_and_revoked_over_the_api_and_the_cli(controller: Running) -> None:
    from edgefleet.cli import app

    with controller.client() as admin:
        made = admin.post("/api/v1/tokens", json={"role": "viewer", "name": "ci-bot"}).json()
        r = admin.post("/api/v1/tokens", json={"role": "viewer", "name": "bad\nname"})
        assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_token_name"
        viewer = httpx.Client(
            base_url=controller.url, headers={"Authorization": f"Bearer {made['token']}"}
        )
        assert viewer.get("/api/v1/packages").status_code == 200
        listed = admin.get("/api/v1/tokens").json()
        row = next(t for t in listed if t["name"] == "ci-bot")
        assert "token" not in row and row["revoked_at"] is None
        r = admin.delete(f"/api/v1/tokens/{row['id']}")
        assert r.status_code == 200 and r.json()["revoked_at"] is not None
        assert viewer.get("/api/v1/packages").status_code == 401
        assert admin.delete("/api/v1/tokens/999999").status_code == 404
        assert admin.delete(f"/api/v1/tokens/{2**64}").status_code == 422
        with controller.client("viewer") as v:
            assert v.delete(f"/api/v1/tokens/{row['id']}").status_code == 403
    # the CLI works on the database directly (for when no admin token is left)
    db_url = controller.controller.settings.database_url
    listed_cli = CliRunner().invoke(app, ["controller", "token", "list", "--db", db_url, "--json"])
    assert listed_cli.exit_code == 0, listed_cli.output
    operator = next(t for t in json.loads(listed_cli.output) if t["name"] == "test-operator")
    res = CliRunner().invoke(
        app, ["controller", "token", "revoke", str(operator["id"]), "--db", db_url]
    )
    assert res.exit_code == 0, res.output
    with controller.client("operator") as op:
        assert op.get("/api/v1/devices").status_code == 401
    res = CliRunner().invoke(app, ["controller", "token", "revoke", "424242", "--db", db_url])
    assert res.exit_code == 1 and "not_found" in res.output


def test_a_package_id_beyond_int64_is_a_clean_refusal(controller: Running) -> None:
    with controller.client() as admin:
        for pid in (2**63, 2**64, 10**30):
            assert admin.get(f"/api/v1/packages/{pid}").status_code == 422
            assert admin.get(f"/api/v1/packages/{pid}/download").status_code == 422
        assert admin.get(f"/api/v1/packages/{2**63 - 1}").status_code == 404
        assert admin.get("/api/v1/packages/0").status_code == 422


def test_concurrent_uploads_of_one_version_have_one_winner(
    any_controller: Running, packager_key: KeyPair, tmp_path: Path
) -> None:
    """Two different packages with the same name/version/profile uploaded at once: one 201,
    one 409, and the registry serves exactly the bytes whose sha256 it advertises."""
    run = any_controller
    rounds = 5
    pairs = [
        tuple(
            make_package(
                tmp_path / f"r{r}s{s}", name="race", version=f"1.{r}.0", key=packager_key, seed=s
            )
            for s in (1, 2)
        )
        for r in range(rounds)
    ]
    with run.client("publisher") as pub:
        for a, b in pairs:
            barrier = threading.Barrier(2)
            results: dict[Path, int] = {}

            def go(
                p: Path, results: dict[Path, int] = results, barrier: threading.Barrier = barrier
            ) -> None:
                with run.client("publisher") as c:
                    data = p.read_bytes()
                    barrier.wait()
                    results[p] = c.post(
                        "/api/v1/packages",
                        content=data,
                        headers={"Content-Type": "application/octet-stream"},
                    ).status_code

            threads = [threading.Thread(target=go, args=(p,)) for p in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(results.values()) == [201, 409], results
        listed = pub.get("/api/v1/packages", params={"name": "race"}).json()
        assert len(listed) == rounds
        for p in listed:
            served = pub.get(f"/api/v1/packages/{p['id']}/download")
            assert served.status_code == 200
            assert hashlib.sha256(served.content).hexdigest() == p["sha256"]
            assert served.headers["x-sha256"] == p["sha256"]


def _deep_manifest(members: list[Member], depth: int) -> list[Member]:
    out = []
    for ti, d in members:
        if ti.name == "manifest.json" and d is not None:
            m = json.loads(d)
            raw = json.dumps(m)[:-1] + ', "lineage": ' + "[" * depth + "]" * depth + "}"
            d = raw.encode()
        out.append((ti, d))
    return out


def _hint(value: Any) -> Callable[[list[Member]], list[Member]]:
    def edit(members: list[Member]) -> list[Member]:
        out = []
        for ti, d in members:
            if ti.name == "model.sig" and d is not None:
                b = json.loads(d)
                b["verificationMaterial"]["publicKey"]["hint"] = value
                d = json.dumps(b).encode()
            out.append((ti, d))
        return out

    return edit


def test_signed_but_malformed_manifests_are_refused_cleanly(
    controller: Running, packages: dict[str, Path], packager_key: KeyPair, tmp_path: Path
) -> None:
    """A trusted signer's package with a non-canonical name or version, a NaN gate, a deeply
    nested manifest or a key hint that is not a string: 422 with the reason, never a 500."""
    src = packages["1.0.0/cpu-x86_64"]

    def signed(change: Callable[[dict[str, Any]], None]) -> Callable[[list[Member]], list[Member]]:
        return lambda ms: resign(edit_manifest(ms, change), packager_key)

    def setter(k: str, v: Any) -> Callable[[dict[str, Any]], None]:
        return lambda m: m.__setitem__(k, v)

    cases: dict[str, tuple[Callable[[list[Member]], list[Member]], str]] = {
        "name-newline": (signed(setter("name", "iris\n")), "manifest_invalid"),
        "arabic-digit": (signed(setter("version", "1\u0660.0.0")), "manifest_invalid"),
        "padded-version": (signed(setter("version", " 1.0.0")), "manifest_invalid"),
        "nan-gate": (
            signed(lambda m: m["gates"].__setitem__("max_p95_ms", float("nan"))),
            "manifest_invalid",
        ),
        "inf-gate": (
            signed(lambda m: m["gates"].__setitem__("max_memory_mb", float("inf"))),
            "manifest_invalid",
        ),
        "deep-40": (lambda ms: resign(_deep_manifest(ms, 40), packager_key), "manifest_invalid"),
        "deep-50k": (lambda ms: resign(_deep_manifest(ms, 50_000), packager_key), ""),
        "hint-list": (_hint(["a"]), "signature_invalid"),
        "hint-dict": (_hint({"a": 1}), "signature_invalid"),
    }
    with controller.client("publisher") as pub:
        for label, (edit, code) in cases.items():
            bad = rewrite(src, tmp_path / f"{label}.efpkg", edit)
            r = upload(pub, bad)
            assert r.status_code == 422, (label, r.status_code, r.text)
            if code:
                assert r.json()["detail"]["code"] == code, (label, r.text)
        assert pub.get("/api/v1/packages").json() == []
    write_members  # noqa: B018 (re-exported helper kept in use by other tests)
    read_members  # noqa: B018
