"""`edgefleet agent check` and the refusals of `agent init` / `agent run`: real Mosquitto, real
sockets and HTTP where the check talks to the world; injected probes for the decisions."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.agent import check
from edgefleet.agent.check import AUTH_HINT, Probes, Result
from edgefleet.agent.config import dump_config, load_config
from edgefleet.cli import app
from edgefleet.keys import KeyPair
from tests.support.services import free_port, mosquitto


def _write(tmp: Path, keys: dict[str, KeyPair], mqtt: dict[str, object], **top: object) -> Path:
    values: dict[str, object] = {
        "device_id": "gw-check",
        "data_dir": "data",
        "trusted_keys": [str(keys["trusted"].public_path)],
        "controller_keys": [str(keys["trusted"].public_path)],
        **top,
        "mqtt": mqtt,
    }
    (tmp / "data").mkdir(exist_ok=True)
    path = tmp / "agent.toml"
    path.write_text(dump_config(values))
    return path


def _by_name(results: list[Result]) -> dict[str, Result]:
    return {r.name: r for r in results}


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with mosquitto(
        tmp_path_factory.mktemp("check-broker"),
        passwords={"gw-check": "right-password"},
        acl="pattern readwrite edgefleet/v1/devices/%u/#\n",
    ) as b:
        yield b.url


def test_check_logs_in_to_a_real_broker_and_names_a_refused_login(
    tmp_path: Path, keys: dict[str, KeyPair], password_broker: str
) -> None:
    good = _write(
        tmp_path,
        keys,
        {"url": password_broker, "username": "gw-check", "password": "right-password"},
    )
    res = CliRunner().invoke(app, ["agent", "check", "--config", str(good)])
    lines = res.output.splitlines()
    assert res.exit_code == 0, res.output
    assert any(line.startswith("ok   mqtt login:") for line in lines), res.output
    assert any(line.startswith("ok   broker tcp:") for line in lines)
    assert all(line.split()[0] in ("ok", "warn", "FAIL") for line in lines), res.output
    assert "right-password" not in res.output  # a secret never printed

    bad = _write(tmp_path, keys, {"url": password_broker, "username": "gw-check", "password": "x"})
    res = CliRunner().invoke(app, ["agent", "check", "--config", str(bad)])
    assert res.exit_code == 1
    assert f"FAIL mqtt login: {AUTH_HINT}" in res.output, res.output


def test_check_fails_on_an_unreachable_broker_and_a_tls_url_to_a_plaintext_port(
    tmp_path: Path, keys: dict[str, KeyPair], password_broker: str
) -> None:
    cfg = load_config(_write(tmp_path, keys, {"url": f"mqtt://127.0.0.1:{free_port()}"}))
    r = _by_name(check.broker_results(cfg, Probes(timeout=2)))
    assert r["broker tcp"].status == "FAIL" and "unreachable" in r["broker tcp"].reason
    tls_url = password_broker.replace("mqtt://", "mqtts://")
    cfg = load_config(_write(tmp_path, keys, {"url": tls_url}))
    r = _by_name(check.broker_results(cfg, Probes(timeout=2)))
    assert r["broker tcp"].status == "ok" and r["broker tls"].status == "FAIL"
    assert "TLS handshake" in r["broker tls"].reason


class _DateHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_controller_reachability_and_clock_skew(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DateHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        cfg = load_config(_write(tmp_path, keys, {}, controller_url=url))
        r = _by_name(check.controller_results(cfg, Probes()))
        assert r["controller"].status == "ok" and r["clock"].status == "ok", r
        # this gateway's clock two minutes ahead of the controller's
        ahead = Probes(now=lambda: datetime.now(UTC) + timedelta(minutes=2))
        r = _by_name(check.controller_results(cfg, ahead))
        assert r["clock"].status == "FAIL" and r["clock"].reason.startswith(("+120 s", "+121 s"))
    finally:
        srv.shutdown()
        srv.server_close()
    r = _by_name(check.controller_results(cfg, Probes(timeout=2)))
    assert r["controller"].status == "FAIL" and "unreachable" in r["controller"].reason


def test_skew_disk_providers_and_connack_decisions(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert check.skew_result(format_datetime(now, usegmt=True), now, now).status == "ok"
    late = format_datetime(now - timedelta(seconds=20), usegmt=True)
    assert check.skew_result(late, now, now).status == "warn"
    assert check.skew_result(None, now, now).status == "warn"
    cfg = load_config(_write(tmp_path, keys, {}, profiles=["cpu-x86_64", "gpu-cuda"]))
    assert check.disk_result(cfg, Probes(disk_free=lambda p: 10 * 1024**2)).status == "FAIL"
    assert check.disk_result(cfg, Probes(disk_free=lambda p: 10 * 1024**3)).status == "ok"
    cpu_only = check.provider_result(cfg, Probes(providers=lambda: ["CPUExecutionProvider"]))
    assert cpu_only.status == "FAIL" and "gpu-cuda needs CUDAExecutionProvider" in cpu_only.reason
    both = Probes(providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert check.provider_result(cfg, both).status == "ok"
    assert check.connack_result(b"\x20\x02\x00\x05").reason == AUTH_HINT
    assert check.connack_result(b"\x20\x02\x00\x00").status == "ok"
    assert check.connack_result(b"").status == "FAIL"


def _certificate(tmp: Path, not_after: datetime) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-check")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - timedelta(days=365))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    c, k = tmp / "device.crt", tmp / "device.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return c, k


def test_client_certificate_expiry(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    now = datetime.now(UTC)
    for days, status in ((90, "ok"), (5, "warn"), (-1, "FAIL")):
        c, k = _certificate(tmp_path, now + timedelta(days=days))
        cfg = load_config(
            _write(
                tmp_path, keys, {"url": "mqtts://h:8883", "cert_file": str(c), "key_file": str(k)}
            )
        )
        r = check.certificate_result(cfg, now)
        assert r is not None and r.status == status, (days, r)
        assert "CN=gw-check" in r.reason


def test_init_refuses_an_http_broker_url_and_writes_nothing(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    res = CliRunner().invoke(
        app,
        ["agent", "init", str(tmp_path / "gw"), "--device-id", "gw-1",
         "--trust", str(keys["trusted"].public_path), "--mqtt-url", "http://fleet.example:8400"],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "scheme 'http' is not mqtt:// or mqtts://" in res.output, res.output
    assert not (tmp_path / "gw").exists()


@pytest.mark.parametrize(
    ("mqtt", "top", "reason"),
    [
        ({"url": "http://fleet.example:8400"}, {}, "scheme 'http' is not mqtt://"),
        ({"url": "mqtt://127.0.0.1:1883"}, {"controller_keys": ["missing.pem"]}, "not readable"),
        ({"url": "mqtts://h:8883", "cert_file": "nope.crt", "key_file": "nope.key"}, {},
         "mqtt cert_file: "),
    ],
)  # fmt: skip
def test_run_exits_non_zero_when_the_configuration_cannot_work(
    tmp_path: Path, keys: dict[str, KeyPair], mqtt: dict[str, object], top: dict[str, object],
    reason: str,
) -> None:  # fmt: skip
    path = _write(tmp_path, keys, mqtt, **top)
    res = CliRunner().invoke(app, ["agent", "run", "--config", str(path)])
    assert res.exit_code == 3, res.output
    assert reason in res.output, res.output
    assert not (tmp_path / "data" / "admin.json").exists()  # it never started serving


def test_auth_refusal_hint() -> None:
    assert check.refusal_hint("Not authorized") == AUTH_HINT
    assert check.refusal_hint("Bad user name or password") == AUTH_HINT
    assert check.refusal_hint("Server unavailable") is None


def test_run_with_a_refused_login_logs_one_hint_not_a_line_per_retry(
    tmp_path: Path, keys: dict[str, KeyPair], password_broker: str
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    path = _write(
        tmp_path, keys, {"url": password_broker, "username": "gw-check", "password": "wrong"},
        telemetry={"enabled": False},
    )  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=root,
    )  # fmt: skip
    try:
        admin = tmp_path / "data" / "admin.json"
        deadline = time.monotonic() + 60
        while not admin.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.2)
        time.sleep(4.5)  # paho retries after 1 s, 2 s, 4 s: several refusals
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    refusals = [line for line in out.splitlines() if "broker refused connection" in line]
    assert len(refusals) == 1, out
    assert AUTH_HINT in refusals[0] and "ERROR" in refusals[0]
    assert "wrong" not in out  # the password is never printed
