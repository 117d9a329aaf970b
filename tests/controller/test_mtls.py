"""Enrollment and mutual TLS on a real Mosquitto (docs/security.md).

One controller (with its MQTT bridge over mTLS) and one broker started from the config that
`edgefleet controller mosquitto-config` writes; devices enroll with `agent.enroll.enroll`.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from edgefleet.agent.config import load_config
from edgefleet.agent.enroll import EnrollError, enroll, renew
from edgefleet.cli import app as root_app
from edgefleet.cloud_controller import pki
from edgefleet.cloud_controller.mqtt_bridge import MqttBridge
from edgefleet.keys import KeyPair
from tests.controller.conftest import Running, start_controller, wait_for
from tests.support.services import Mosquitto, free_port, require, wait_port

TOPIC = "edgefleet/v1/devices"


def _token(run: Running, group: str = "lab", **kw: Any) -> str:
    with run.client() as c:
        r = c.post("/api/v1/enroll-tokens", json={"group": group, **kw})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    assert token.startswith("efe_")
    return str(token)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, packager_key: KeyPair
) -> Iterator[dict[str, Any]]:
    """Broker config written by the CLI, Mosquitto running it, a controller bridged over mTLS."""
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    base = tmp_path_factory.mktemp("mtls")
    data = base / "ctl"
    # The broker's user must be able to enter the directory above its files.
    top = Path(tempfile.mkdtemp(prefix="ef-mtls-"))
    top.chmod(0o755)
    out = top / "broker"
    port = free_port()
    runner = CliRunner()
    res = runner.invoke(
        root_app,
        ["controller", "mosquitto-config", "--out", str(out), "--port", str(port),
         "--bind", "127.0.0.1", "--server-name", "localhost", "--server-name", "127.0.0.1",
         "--data-dir", str(data)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    conf = (out / "mosquitto.conf").read_text()
    assert "require_certificate true" in conf and "use_identity_as_username true" in conf
    assert "password_file" not in conf  # no plaintext listener, no passwords by default
    log = open(base / "mosquitto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(out / "mosquitto.conf")], stdout=log, stderr=log
    )
    try:
        wait_port(port, timeout=10)
        run = start_controller(
            data,
            broker_url=f"mqtts://localhost:{port}",
            trusted=[packager_key.public_path],
            device_broker_urls=(f"mqtts://localhost:{port}",),
        )
        try:
            wait_for(lambda: run.controller.bridge.stats.connected, 15, "bridge over mTLS")
            yield {"run": run, "out": out, "port": port, "base": base, "proc": proc}
        finally:
            run.stop()
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(top, ignore_errors=True)


def _connect(
    port: int, ca: Path, cert: Path | None, key: Path | None, client_id: str, tls: bool = True
) -> mqtt.Client:
    """A connected client, or `ConnectionError` with the reason."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    result: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(cl: Any, ud: Any, flags: Any, reason: Any, props: Any) -> None:
        result["reason"] = reason
        done.set()

    def on_disconnect(*a: Any) -> None:
        done.set()

    c.on_connect = on_connect
    c.on_disconnect = on_disconnect
    if tls:
        c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None,
                  keyfile=str(key) if key else None)  # fmt: skip
    try:
        c.connect("localhost", port, keepalive=10)
    except OSError as e:
        raise ConnectionError(str(e)) from e
    c.loop_start()
    done.wait(5)
    if "reason" not in result or result["reason"].is_failure or not c.is_connected():
        c.loop_stop()
        raise ConnectionError(str(result.get("reason", "no CONNACK")))
    return c


def _collect(c: mqtt.Client, topic: str) -> list[bytes]:
    got: list[bytes] = []
    c.on_message = lambda cl, ud, m: got.append(bytes(m.payload))
    c.subscribe(topic, qos=1)
    return got


def _enroll(run: Running, tmp: Path, dev: str, **kw: Any) -> Any:
    return enroll(run.url, _token(run, **kw), tmp / dev, dev)


def test_enroll_writes_a_ready_config(fleet: dict[str, Any], tmp_path: Path) -> None:
    run: Running = fleet["run"]
    runner = CliRunner()
    token = _token(run, tags=["edge"])
    res = runner.invoke(
        root_app,
        ["agent", "enroll", "--controller", run.url, "--token", token, str(tmp_path / "gw"),
         "--device-id", "gw-a"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    cfg_path = tmp_path / "gw" / "agent.toml"
    assert stat.S_IMODE(cfg_path.stat().st_mode) == 0o600
    cfg = load_config(cfg_path, env={})
    assert cfg.device_id == "gw-a" and cfg.mqtt.tls and cfg.download_token.startswith("efd_")
    assert cfg.mqtt.cert_file is not None and cfg.mqtt.key_file is not None
    assert stat.S_IMODE(cfg.mqtt.key_file.stat().st_mode) == 0o600
    assert cfg.controller_keys and cfg.controller_keys[0].read_text().startswith("-----BEGIN")
    assert len(cfg.trusted_keys) == 1  # the controller's trusted packaging key
    # no secret reaches the output: not the token, the download token or the key
    assert token not in res.output and cfg.download_token not in res.output
    assert "PRIVATE KEY" not in res.output
    with run.client() as c:
        dev = c.get("/api/v1/devices/gw-a").json()
    assert dev["registered"] and dev["groups"] == ["lab"] and dev["tags"] == ["edge"]
    # the enrolled device reaches the broker with its certificate alone
    client = _connect(fleet["port"], cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file,  # type: ignore[arg-type]
                      "gw-a")  # fmt: skip
    client.disconnect()
    client.loop_stop()


def test_token_reuse_expiry_binding_and_csr_are_refused(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    run: Running = fleet["run"]
    token = _token(run)
    enroll(run.url, token, tmp_path / "a", "gw-reuse")
    with pytest.raises(EnrollError, match="enroll_token_used"):
        enroll(run.url, token, tmp_path / "b", "gw-reuse2")
    from edgefleet.cloud_controller import enroll as E
    from edgefleet.cloud_controller.db import transaction

    with transaction(run.controller.factory) as s:
        old, _ = E.create_token(s, "lab", "test", 60, now=datetime.now(UTC) - timedelta(hours=1))
    with pytest.raises(EnrollError, match="enroll_token_expired"):
        enroll(run.url, old, tmp_path / "c", "gw-late")
    bound = _token(run, device_id="gw-bound")
    with pytest.raises(EnrollError, match="enroll_device_mismatch"):
        enroll(run.url, bound, tmp_path / "d", "gw-other")
    with pytest.raises(EnrollError, match="enroll_token_invalid"):
        enroll(run.url, "efe_" + "x" * 43, tmp_path / "e", "gw-x")
    # a CSR for another id than the one enrolled; the token is not spent by the refusal
    key = pki.new_key()
    fresh = _token(run)
    r = httpx.post(
        run.url + "/api/v1/enroll",
        json={"token": fresh, "device_id": "gw-csr",
              "csr_pem": pki.csr_pem(pki.build_csr(key, "gw-else")).decode()},
    )  # fmt: skip
    assert r.status_code == 422 and r.json()["detail"]["code"] == "csr_mismatch"
    enroll(run.url, fresh, tmp_path / "f", "gw-csr")
    # a registered id cannot be taken over by enrollment
    with pytest.raises(EnrollError, match="device_exists"):
        enroll(run.url, _token(run), tmp_path / "g", "gw-csr")
    with pytest.raises(EnrollError, match="invalid_device_id"):
        enroll(run.url, _token(run), tmp_path / "h", "bad/id")


def test_wrong_controller_is_a_clear_refusal(tmp_path: Path) -> None:
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Other(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"<html>not here</html>")

        def log_message(self, *a: Any) -> None:
            pass

    srv = HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EnrollError, match="not an edgefleet controller"):
            enroll(f"http://127.0.0.1:{srv.server_port}", "efe_x", tmp_path / "a", "gw-1")
    finally:
        srv.shutdown()
    with pytest.raises(EnrollError, match="cannot reach"):
        enroll(f"http://127.0.0.1:{free_port()}", "efe_x", tmp_path / "b", "gw-1")
    # https to a server that speaks plain HTTP (or a certificate the system does not trust)
    srv2 = HTTPServer(("127.0.0.1", 0), Other)
    threading.Thread(target=srv2.serve_forever, daemon=True).start()
    try:
        with pytest.raises(EnrollError, match="TLS failed"):
            enroll(f"https://127.0.0.1:{srv2.server_port}", "efe_x", tmp_path / "b", "gw-1")
    finally:
        srv2.shutdown()
    runner = CliRunner()
    res = runner.invoke(
        root_app,
        ["agent", "enroll", "--controller", f"http://127.0.0.1:{free_port()}", "--token",
         "efe_secret", str(tmp_path / "c"), "--device-id", "gw-1"],
    )  # fmt: skip
    assert res.exit_code != 0 and "cannot reach" in res.output
    assert not (tmp_path / "c" / "agent.toml").exists()


def test_devices_keep_to_their_topics_and_foreign_or_plain_clients_are_refused(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    run: Running = fleet["run"]
    port = fleet["port"]
    one = load_config(_enroll(run, tmp_path, "gw-one").config_path, env={})
    two = load_config(_enroll(run, tmp_path, "gw-two").config_path, env={})
    ca = one.mqtt.ca_file
    c1 = _connect(port, ca, one.mqtt.cert_file, one.mqtt.key_file, "gw-one")  # type: ignore[arg-type]
    c2 = _connect(port, ca, two.mqtt.cert_file, two.mqtt.key_file, "gw-two")  # type: ignore[arg-type]
    try:
        mine = _collect(c1, f"{TOPIC}/gw-one/desired")
        theirs: list[bytes] = []
        c1.message_callback_add(f"{TOPIC}/gw-two/#", lambda cl, ud, m: theirs.append(m.payload))
        c1.subscribe(f"{TOPIC}/gw-two/#", qos=1)
        seen_by_two = _collect(c2, f"{TOPIC}/gw-two/desired")
        time.sleep(0.3)
        run.controller.bridge.publish(f"{TOPIC}/gw-one/desired", b"for-one")
        run.controller.bridge.publish(f"{TOPIC}/gw-two/desired", b"for-two")
        # gw-one writes into gw-two's desired state: the broker drops it
        c1.publish(f"{TOPIC}/gw-two/desired", b"forged", qos=1).wait_for_publish(5)
        wait_for(lambda: mine and seen_by_two, 10, "desired states delivered")
        time.sleep(0.5)
        assert mine == [b"for-one"]
        assert seen_by_two == [b"for-two"]  # not the forgery
        assert theirs == []  # gw-one reads nothing of gw-two
    finally:
        for c in (c1, c2):
            c.disconnect()
            c.loop_stop()
    # a certificate from another CA
    foreign = pki.CertificateAuthority.load_or_create(tmp_path / "foreign")
    k = pki.new_key()
    crt = pki.issue_client(foreign.key, foreign.cert, "gw-one", k.public_key(), datetime.now(UTC))
    (tmp_path / "f.key").write_bytes(pki.key_pem(k))
    (tmp_path / "f.crt").write_bytes(pki.cert_pem(crt))
    with pytest.raises(ConnectionError):
        _connect(port, ca, tmp_path / "f.crt", tmp_path / "f.key", "gw-one")  # type: ignore[arg-type]
    # no certificate at all; and plaintext on the TLS port
    with pytest.raises(ConnectionError):
        _connect(port, ca, None, None, "anon")  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        _connect(port, ca, None, None, "plain", tls=False)  # type: ignore[arg-type]


def test_revoked_device_is_cut_off_and_renewal_works_before(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    run: Running = fleet["run"]
    port = fleet["port"]
    cfg = load_config(_enroll(run, tmp_path, "gw-rev").config_path, env={})
    old_serial = pki.load_cert_pem(cfg.mqtt.cert_file.read_bytes()).serial_number  # type: ignore[union-attr]
    assert renew(cfg, force=False) is None  # `agent run`'s check: a fresh one is kept
    cfg.renew_fraction = 1.01  # as if less than that fraction of its life were left
    until = renew(cfg, force=False)  # renewal without re-enrolling: a new key and certificate
    assert until is not None
    new_cert = pki.load_cert_pem(cfg.mqtt.cert_file.read_bytes())  # type: ignore[union-attr]
    assert new_cert.serial_number != old_serial
    assert stat.S_IMODE(cfg.mqtt.key_file.stat().st_mode) == 0o600  # type: ignore[union-attr]
    c = _connect(port, cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file, "gw-rev")  # type: ignore[arg-type]
    dropped = threading.Event()
    c.on_disconnect = lambda *a: dropped.set()
    with run.client("operator") as api:
        r = api.post("/api/v1/devices/gw-rev/revoke")
    assert r.status_code == 200, r.text
    assert any("SIGHUP" in s for s in r.json()["steps"]), r.json()
    assert dropped.wait(10), "the revoked device's session was not closed"
    c.loop_stop()
    time.sleep(0.5)  # the broker re-reads its CRL on SIGHUP

    def refused() -> bool:
        try:
            x = _connect(port, cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file,  # type: ignore[arg-type]
                         "gw-rev")  # fmt: skip
        except ConnectionError:
            return True
        x.disconnect()
        x.loop_stop()
        return False

    wait_for(refused, 10, "the revoked certificate refused")
    with pytest.raises(EnrollError, match="invalid_token"):
        renew(cfg)  # its download token is gone too
    crl = (fleet["out"] / "crl.pem").read_bytes()
    assert b"BEGIN X509 CRL" in crl
    with run.client() as api:
        assert api.get("/api/v1/devices/gw-rev").json()["revoked_at"] is not None
    # it may enroll again, with a new token
    again = load_config(
        enroll(run.url, _token(run), tmp_path / "again", "gw-rev").config_path, env={}
    )
    x = _connect(port, again.mqtt.ca_file, again.mqtt.cert_file, again.mqtt.key_file, "gw-rev")  # type: ignore[arg-type]
    x.disconnect()
    x.loop_stop()


def test_generated_files_are_readable_by_the_broker_user(fleet: dict[str, Any]) -> None:
    out: Path = fleet["out"]
    conf = (out / "mosquitto.conf").read_text()
    user = next(line.split()[1] for line in conf.splitlines() if line.startswith("user "))
    import pwd

    pw = pwd.getpwnam(user)
    for name in ("server.key", "acl", "ca.crt", "server.crt", "crl.pem"):
        st = (out / name).stat()
        readable = (
            st.st_uid == pw.pw_uid
            or (st.st_gid == pw.pw_gid and st.st_mode & 0o040)
            or st.st_mode & 0o004
        )
        assert readable, f"{name} is not readable by {user}"
        if name in ("server.key", "acl"):
            assert not st.st_mode & 0o007, f"{name} is readable by everyone"
    # and the broker did start with them (the fixture connected the controller through it)
    assert fleet["proc"].poll() is None


def test_banner_hides_broker_password() -> None:
    from edgefleet.cloud_controller.settings import redact_url

    secret = uuid.uuid4().hex
    shown = redact_url(f"mqtts://edgefleet-controller:{secret}@broker:8883")
    assert secret not in shown and "***" in shown and "broker:8883" in shown
    assert redact_url("mqtts://broker:8883") == "mqtts://broker:8883"


def test_init_from_registration(tmp_path: Path) -> None:
    import json

    reg = {
        "device_id": "gw-reg",
        "mqtt_username": "gw-reg",
        "mqtt_password": "efm_" + uuid.uuid4().hex,
        "download_token": "efd_" + uuid.uuid4().hex,
        "controller_key": {"key_id": "k", "pem": "-----BEGIN PUBLIC KEY-----\n"},
    }
    (tmp_path / "reg.json").write_text(json.dumps(reg))
    trust = tmp_path / "pkg.pub"
    trust.write_text("x")
    res = CliRunner().invoke(
        root_app,
        ["agent", "init", str(tmp_path / "gw"), "--registration", str(tmp_path / "reg.json"),
         "--trust", str(trust), "--mqtt-url", "mqtts://broker:8883"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    path = tmp_path / "gw" / "agent.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    cfg = load_config(path, env={})
    assert cfg.device_id == "gw-reg" and cfg.mqtt.username == "gw-reg"
    assert cfg.mqtt.password == reg["mqtt_password"] and cfg.download_token == reg["download_token"]
    assert reg["mqtt_password"] not in res.output and reg["download_token"] not in res.output
    bad = CliRunner().invoke(
        root_app,
        ["agent", "init", str(tmp_path / "gw2"), "--device-id", "gw-2", "--trust", str(trust),
         "--mqtt-url", "http://broker:8883"],
    )  # fmt: skip
    assert bad.exit_code != 0 and "mqtt" in bad.output


def test_pki_refuses_bad_csrs() -> None:
    key = pki.new_key()
    good = pki.csr_pem(pki.build_csr(key, "gw-1"))
    assert pki.common_name(pki.check_csr(good, "gw-1").subject) == "gw-1"
    with pytest.raises(pki.PkiError) as e:
        pki.check_csr(good, "gw-2")
    assert e.value.code == "csr_mismatch"
    with pytest.raises(pki.PkiError) as e:
        pki.check_csr(b"not a csr", "gw-1")
    assert e.value.code == "csr_invalid"
    from cryptography.hazmat.primitives.asymmetric import ec

    other = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(pki.PkiError) as e:
        pki.check_csr(pki.csr_pem(pki.build_csr(other, "gw-1")), "gw-1")  # type: ignore[arg-type]
    assert e.value.code == "csr_invalid"
    now = datetime.now(UTC)
    ca = pki.build_ca(key, now)
    cert = pki.issue_client(key, ca, "gw-1", pki.new_key().public_key(), now, timedelta(days=90))
    assert not pki.needs_renewal(cert, now)
    assert pki.needs_renewal(cert, now + timedelta(days=61))
    assert os.environ.get("NEVER") is None


def test_enrolled_agent_runs_and_takes_a_rollout_over_mtls(
    fleet: dict[str, Any], tmp_path: Path, packages: dict[str, Path]
) -> None:
    """`agent enroll` -> `agent run --config DIR/agent.toml` (a real process) -> the device
    comes online over mTLS and installs a release rolled out to it (its signed desired state)."""
    import sys

    run: Running = fleet["run"]
    token = _token(run)
    done = enroll(run.url, token, tmp_path / "gw", "gw-e2e", http_port=free_port())
    # the controller's --device-broker-url is in the device's config: nothing to edit
    assert done.broker_urls == [f"mqtts://localhost:{fleet['port']}"]
    with run.client("publisher") as pub:
        body = packages["1.0.0/cpu-x86_64"].read_bytes()
        r = pub.post("/api/v1/packages", content=body,
                     headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        assert r.status_code in (200, 201), r.text
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(done.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        try:
            with run.client("operator") as op:
                wait_for(lambda: op.get("/api/v1/devices/gw-e2e").json()["online"], 30, "online")
                r = op.post(
                    "/api/v1/rollouts",
                    json={"model": "iris", "version": "1.0.0",
                          "target": {"device_ids": ["gw-e2e"]}, "waves": [100.0]},
                )  # fmt: skip
                assert r.status_code == 201, r.text
                rid = r.json()["id"]
                detail = wait_for(
                    lambda: (
                        d
                        if (d := op.get(f"/api/v1/rollouts/{rid}").json())["phase"]
                        in ("succeeded", "aborted", "failed")
                        else None
                    ),
                    90,
                    "the rollout to finish",
                )
                assert detail["phase"] == "succeeded", detail
        finally:
            proc.terminate()
            proc.wait(20)
    out = log_path.read_text()
    cfg = load_config(done.config_path, env={})
    # no secret in the agent's log
    assert cfg.download_token not in out and token not in out and "PRIVATE KEY" not in out


def test_enrollment_on_sqlite_and_postgresql(any_controller: Running, tmp_path: Path) -> None:
    """The 0006 tables (a column named `group`) and the one-time spend on both databases."""
    run = any_controller
    token = _token(run, device_id="gw-db", tags=["t1"])
    done = enroll(run.url, token, tmp_path / "a", "gw-db")
    assert done.groups == ["lab"] and done.broker_urls == []
    with pytest.raises(EnrollError, match="device_exists"):  # checked before the token
        enroll(run.url, token, tmp_path / "b", "gw-db", force=True)
    with run.client() as admin:
        assert admin.post("/api/v1/devices/gw-db/revoke").status_code == 200
    with pytest.raises(EnrollError, match="enroll_token_used"):
        enroll(run.url, token, tmp_path / "b", "gw-db", force=True)
    from edgefleet.cloud_controller import enroll as E
    from edgefleet.cloud_controller.db import transaction

    # a token read before another enrollment spent it still cannot be spent twice
    second = _token(run)
    with transaction(run.controller.factory) as s:
        E.spend_token(s, second, "gw-race-1", datetime.now(UTC))
    with pytest.raises(E.EnrollRefused) as e, transaction(run.controller.factory) as s:
        E.spend_token(s, second, "gw-race-2", datetime.now(UTC))
    assert e.value.code == "enroll_token_used"
    with run.client("viewer") as viewer:  # creating tokens is for admins
        r = viewer.post("/api/v1/enroll-tokens", json={"group": "lab"})
    assert r.status_code == 403


def test_an_interrupted_renewal_is_finished_at_start(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from edgefleet.agent.enroll import finish_renewal

    key, crt = tmp_path / "device.key", tmp_path / "device.crt"
    cfg = SimpleNamespace(mqtt=SimpleNamespace(cert_file=crt, key_file=key))
    key.write_text("old key")
    crt.write_text("old cert")
    # stopped after the new key was renamed, before the certificate was
    (tmp_path / "device.crt.new").write_text("new cert")
    key.write_text("new key")
    assert finish_renewal(cfg)
    assert crt.read_text() == "new cert" and key.read_text() == "new key"
    # stopped before the certificate came back: the lone new key is dropped
    (tmp_path / "device.key.new").write_text("orphan key")
    assert not finish_renewal(cfg)
    assert key.read_text() == "new key" and not (tmp_path / "device.key.new").exists()
    # both written, neither renamed
    (tmp_path / "device.key.new").write_text("k3")
    (tmp_path / "device.crt.new").write_text("c3")
    assert finish_renewal(cfg)
    assert (key.read_text(), crt.read_text()) == ("k3", "c3")
    assert not finish_renewal(cfg)


def test_cli_enroll_token_and_revoke(controller: Running, tmp_path: Path) -> None:
    import json

    runner = CliRunner()
    env = {"EDGEFLEET_URL": controller.url, "EDGEFLEET_TOKEN": controller.admin}
    res = runner.invoke(
        root_app, ["devices", "enroll-token", "create", "--group", "lab", "--ttl", "600"], env=env
    )
    assert res.exit_code == 0, res.output
    token = res.stdout.strip()
    assert token.startswith("efe_") and "\n" not in token  # only the token: `T=$(...)` works
    res = runner.invoke(
        root_app,
        ["devices", "enroll-token", "create", "--group", "lab", "--device-id", "gw-cli", "--json"],
        env=env,
    )
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["device_id"] == "gw-cli" and info["token"].startswith("efe_")
    enroll(controller.url, token, tmp_path / "gw", "gw-cli2")
    res = runner.invoke(root_app, ["devices", "revoke", "gw-cli2"], env=env)
    assert res.exit_code == 0 and "revoked gw-cli2" in res.output, res.output
    res = runner.invoke(root_app, ["devices", "revoke", "nope"], env=env)
    assert res.exit_code == 1 and "not_found" in res.output


def test_a_tls_failure_is_named_and_counted_not_retried_in_silence(
    fleet: dict[str, Any], tmp_path: Path, broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """paho only says that an attempt failed: the bridge names why (a broker certificate its CA
    did not sign; a TLS URL aimed at a plaintext port), logs it once and counts it by reason
    (`edgefleet_broker_connect_failed`)."""
    run: Running = fleet["run"]
    ctl = run.controller
    other = pki.CertificateAuthority.load_or_create(tmp_path / "other-ca")
    cases = [
        (f"mqtts://localhost:{fleet['port']}", other.cert_path, "tls_certificate", "refused"),
        (broker.url.replace("mqtt://", "mqtts://"), ctl.ca.cert_path, "tls", "handshake"),
    ]
    for url, ca, key, words in cases:
        caplog.clear()
        bridge = MqttBridge(url, ctl.factory, ctl.rollouts, tls_files=(ca, None, None))
        with caplog.at_level(logging.DEBUG, logger="edgefleet.cloud_controller.mqtt_bridge"):
            bridge.start()
            try:
                wait_for(lambda b=bridge, k=key: b.stats.connect_failed.get(k, 0) >= 2, 20, key)
            finally:
                bridge.stop()
        assert not bridge.stats.connected and set(bridge.stats.connect_failed) == {key}
        said = [r for r in caplog.records if r.getMessage().startswith("cannot reach broker")]
        assert words in said[0].getMessage(), said[0].getMessage()
        # the same reason again is not a new warning at every retry
        assert [r.levelno for r in said][:2] == [logging.WARNING, logging.DEBUG]
