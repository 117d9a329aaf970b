"""`edgefleet agent init/run/install/status` end to end, in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgefleet.keys import KeyPair
from tests.agent.helpers import REPO, served_version, wait_for
from tests.support.services import Mosquitto, free_port, wait_port


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", "agent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"},
    )


def test_init_run_install_status(
    tmp_path: Path, keys: dict[str, KeyPair], pkgs: dict[str, Path], x_iris: np.ndarray
) -> None:
    d = tmp_path / "gw"
    port = free_port()
    r = _cli(
        "init",
        str(d),
        "--device-id",
        "gw-7",
        "--trust",
        str(keys["trusted"].public_path),
        "--http-port",
        str(port),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (d / "keys/trusted/trusted.pub.pem").exists() or list((d / "keys/trusted").iterdir())
    assert (
        _cli(
            "init", str(d), "--device-id", "x", "--trust", str(keys["trusted"].public_path)
        ).returncode
        == 1
    )
    cfg = d / "agent.toml"
    text = (
        cfg.read_text()
        .replace("seconds = 10.0", "seconds = 0.2")
        .replace("min_requests = 20", "min_requests = 0")
    )
    cfg.write_text(text.replace("enabled = true", "enabled = false"))
    assert ((d / "data" / "admin.token").stat().st_mode & 0o777) == 0o600

    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(cfg)],
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, timeout=60)
        wait_for(lambda: (d / "data" / "admin.json").exists(), 30, what="admin endpoint")
        r = _cli("install", str(pkgs["v1"]), "--config", str(cfg))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "COMMITTED" in r.stdout and "iris 1.0.0 serves" in r.stdout
        assert served_version(port, "iris", x_iris) == "1.0.0"
        r = _cli("install", str(pkgs["v0"]), "--config", str(cfg))
        assert r.returncode == 2 and "version_not_newer" in r.stdout, r.stdout
        r = _cli("install", str(pkgs["v2"]), "--config", str(cfg))
        assert r.returncode == 0, r.stdout
        assert served_version(port, "iris", x_iris) == "1.1.0"
        r = _cli("status", "--config", str(cfg))
        assert (
            r.returncode == 0
            and "gw-7" in r.stdout
            and "1.1.0" in r.stdout
            and "VERIFYING" in r.stdout
        )
        st = json.loads(_cli("status", "--config", str(cfg), "--json").stdout)
        assert (
            st["models"]["iris"]["version"] == "1.1.0"
            and st["models"]["iris"]["previous"] == "1.0.0"
        )
        # a wrong token is refused
        (d / "data" / "admin.token").write_text("wrong")
        r = _cli("status", "--config", str(cfg))
        assert r.returncode == 1 and "401" in r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0
    assert not (d / "data" / "admin.json").exists()


def test_run_starts_fleet_link_and_telemetry(
    tmp_path: Path, keys: dict[str, KeyPair], broker: Mosquitto, pkgs: dict[str, Path]
) -> None:
    """`agent run` with mqtt.url set connects to the broker: retained presence appears. On
    such a device `agent install` refuses without --force; a forced install is reported to the
    controller as local."""
    import threading

    import paho.mqtt.client as mqtt

    from edgefleet.wire.mqtt import topic

    d = tmp_path / "gw"
    port = free_port()
    r = _cli(
        "init",
        str(d),
        "--device-id",
        "gw-mq",
        "--trust",
        str(keys["trusted"].public_path),
        "--controller-key",
        str(keys["second"].public_path),
        "--http-port",
        str(port),
        "--mqtt-url",
        broker.url,
    )
    assert r.returncode == 0, r.stdout
    cfg = d / "agent.toml"
    cfg.write_text(
        cfg.read_text()
        .replace("seconds = 10.0", "seconds = 0.2")
        .replace("min_requests = 20", "min_requests = 0")
    )
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(cfg)],
        cwd=str(REPO),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    got: list[bytes] = []
    seen = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cli-test-observer")

    def on_message(c: object, u: object, msg: mqtt.MQTTMessage) -> None:
        got.append(msg.payload)
        if b"gw-mq" in msg.payload:
            seen.set()

    client.on_message = on_message
    try:
        wait_port(port, timeout=60)
        client.connect(broker.host, broker.port, keepalive=10)
        client.subscribe(topic("gw-mq", "presence"), qos=1)
        client.loop_start()
        assert seen.wait(30), got
        client.subscribe(topic("gw-mq", "status"), qos=1)
        wait_for(lambda: (d / "data" / "admin.json").exists(), 30, what="admin endpoint")
        r = _cli("install", str(pkgs["v1"]), "--config", str(cfg))
        assert r.returncode == 1 and "fleet controller" in r.stdout and "--force" in r.stdout
        r = _cli("install", str(pkgs["v1"]), "--config", str(cfg), "--force")
        assert r.returncode == 0, r.stdout + r.stderr

        def committed() -> list[dict[str, object]]:
            reports = [json.loads(p) for p in got if b'"COMMITTED"' in p]
            return [m for m in reports if m.get("model") == "iris"]

        (report,) = wait_for(committed, 30, what="COMMITTED status report")
        assert report["local"] is True and report["version"] == "1.0.0", report
        from edgefleet.wire import status

        assert status.parse(json.dumps(report), "gw-mq").local  # the controller reads it back
    finally:
        client.loop_stop()
        client.disconnect()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
    out = (tmp_path / "run.log").read_text()
    assert "not started" not in out, out
    assert proc.returncode == 0


def test_install_names_structural_rejections_by_their_own_code(
    tmp_path: Path, keys: dict[str, KeyPair], pkgs: dict[str, Path]
) -> None:
    """`agent install` of a package whose structure is wrong says what is wrong (the name is
    read before verification; that read used to report every refusal as manifest_invalid)."""
    from tests.agent.helpers import (
        AgentProcess,
        file_info,
        link_info,
        tar_members,
        with_extra_member,
        write_config,
        write_tar,
    )

    cfg = write_config(tmp_path / "cfg", tmp_path / "data", [keys["trusted"].public_path])
    v1 = pkgs["v1"]
    dup = tar_members(v1)
    cases = {
        "link_member": with_extra_member(
            v1, tmp_path / "l.efpkg", link_info("x", "/etc/passwd"), None
        ),
        "unsafe_path": with_extra_member(v1, tmp_path / "u.efpkg", file_info("../evil"), b"x"),
        "duplicate_member": write_tar(tmp_path / "d.efpkg", [*dup, dup[0]]),
        "not_a_package": tmp_path / "n.efpkg",
    }
    cases["not_a_package"].write_bytes(b"this is not a tar archive\n" * 200)
    agent = AgentProcess(cfg)
    try:
        for code, pkg in cases.items():
            r = _cli("install", str(pkg), "--config", str(cfg))
            assert r.returncode == 2, r.stdout
            assert f"FAILED: {code}" in r.stdout and "manifest_invalid" not in r.stdout, r.stdout
    finally:
        agent.stop()


def test_an_error_naming_an_extra_keeps_its_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    """rich reads ``[agent]`` as a style tag and drops it: the reason would lose its words."""
    from edgefleet.agent.cli import _fail

    _fail("install it with pip install 'edgefleet[agent]'")
    assert "'edgefleet[agent]'" in capsys.readouterr().out
