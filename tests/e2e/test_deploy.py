"""The deployment files against the programs they run: the Dockerfile, deploy/compose.yaml and
the systemd units use only commands, flags and EDGEFLEET_* variables that exist, honour the
environment, and publish the ports the programs listen on. There is no Docker engine here, so
the files are parsed; `systemd-analyze verify` checks the units where it is installed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from edgefleet.agent.service import UNIT_NAME, UnitSpec, render_unit
from edgefleet.cli import app
from tests.support import cli_spec

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
CONTROLLER_FLAGS_FROM_ENV = {"--db", "--host", "--port", "--broker", "--packages", "--data-dir",
                             "--public-url", "--trusted-key"}  # fmt: skip


def _check_commands(commands: list[list[str]], where: str) -> None:
    """Assert each command is one the CLI accepts."""
    assert commands, f"{where}: no edgefleet command found"
    for argv in commands:
        assert cli_spec.problems(argv) == [], (where, argv)


def _check_vars(text: str, where: str) -> None:
    unknown = cli_spec.edgefleet_vars(text) - cli_spec.env_names()
    assert not unknown, f"{where} uses variables no program reads: {sorted(unknown)}"


# --- Dockerfile ---------------------------------------------------------------------------------
def dockerfile_stages(text: str) -> dict[str, dict[str, object]]:
    """Per build stage: env (inherited from its base stage), expose, entrypoint, cmd."""
    stages: dict[str, dict[str, object]] = {}
    cur: dict[str, object] = {}
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, arg = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = arg.split()
            base = stages.get(parts[0], {})
            cur = {
                "env": dict(base.get("env", {})),  # type: ignore[call-overload]
                "expose": [],
                "entrypoint": base.get("entrypoint"),
                "cmd": base.get("cmd"),
            }
            stages[parts[-1] if "AS" in (p.upper() for p in parts) else parts[0]] = cur
        elif instr == "ENV":
            for kv in shlex.split(arg):
                k, _, v = kv.partition("=")
                cur["env"][k] = v  # type: ignore[index]
        elif instr == "EXPOSE":
            cur["expose"] += [int(p.split("/")[0]) for p in arg.split()]  # type: ignore[operator]
        elif instr in ("ENTRYPOINT", "CMD"):
            cur[instr.lower()] = json.loads(arg)
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, dict[str, object]]:
    return dockerfile_stages((ROOT / "Dockerfile").read_text())


def _argv(stage: dict[str, object]) -> list[str]:
    entry, cmd = stage["entrypoint"] or [], stage["cmd"] or []
    assert isinstance(entry, list) and isinstance(cmd, list)
    return [str(a) for a in [*entry, *cmd]]


def test_dockerfile_runs_known_commands_and_honours_the_environment(
    stages: dict[str, dict[str, object]],
) -> None:
    _check_vars((ROOT / "Dockerfile").read_text(), "Dockerfile")
    ctl, agent = stages["controller"], stages["agent"]
    argv = _argv(ctl)
    assert argv[0] == "edgefleet" and cli_spec.problems(argv[1:]) == []
    # no flag in CMD that would override an EDGEFLEET_CONTROLLER_* variable
    assert not CONTROLLER_FLAGS_FROM_ENV & {a.split("=")[0] for a in argv}, argv
    env = ctl["env"]
    assert isinstance(env, dict)
    assert env["EDGEFLEET_CONTROLLER_HOST"] == "0.0.0.0"
    assert ctl["expose"] == [int(env["EDGEFLEET_CONTROLLER_PORT"])]
    argv = _argv(agent)
    assert argv[0] == "edgefleet" and cli_spec.problems(argv[1:]) == []
    assert "--http-port" not in argv and "--http-host" not in argv
    env = agent["env"]
    assert isinstance(env, dict)
    assert env["EDGEFLEET_AGENT_HTTP_HOST"] == "0.0.0.0"  # reachable from outside the container
    assert agent["expose"] == [int(env["EDGEFLEET_AGENT_HTTP_PORT"])]


def test_the_agent_image_settings_reach_the_agent(tmp_path: Path, stages: dict[str, dict]) -> None:  # type: ignore[type-arg]
    from edgefleet.agent.config import dump_config, load_config

    path = tmp_path / "agent.toml"
    path.write_text(dump_config({"device_id": "gw-1", "data_dir": "data"}))
    env = {k: str(v) for k, v in stages["agent"]["env"].items() if k.startswith("EDGEFLEET_")}
    cfg = load_config(path, env=env)
    assert (cfg.http_host, cfg.http_port) == ("0.0.0.0", 8080)


# --- compose ------------------------------------------------------------------------------------
def test_compose_file_uses_known_commands_variables_and_ports(
    stages: dict[str, dict[str, object]],
) -> None:
    text = (ROOT / "deploy" / "compose.yaml").read_text()
    doc = yaml.safe_load(text)
    _check_vars(text, "compose.yaml")
    services = doc["services"]
    assert {"postgres", "mosquitto", "controller", "agent"} <= set(services)
    for name, svc in services.items():
        target = (svc.get("build") or {}).get("target")
        if target is None:
            continue
        stage = stages[target]
        entry = svc.get("entrypoint", stage["entrypoint"])
        cmd = svc.get("command", stage["cmd"] if "entrypoint" not in svc else [])
        if entry[:2] == ["sh", "-ec"] or entry[:2] == ["sh", "-c"]:
            script = "\n".join(cmd).replace("$$", "$")
            _check_commands(cli_spec.commands_in_shell(script), f"compose {name}")
        else:
            argv = [*entry, *cmd]
            assert argv[0] == "edgefleet" and cli_spec.problems(argv[1:]) == [], (name, argv)
        env = svc.get("environment") or {}
        for key in env:
            assert key in cli_spec.env_names(), (name, key)
    # the published ports are those the programs listen on
    ctl_port = int(stages["controller"]["env"]["EDGEFLEET_CONTROLLER_PORT"])  # type: ignore[index]
    assert services["controller"]["ports"] == [f"{ctl_port}:{ctl_port}"]
    assert services["agent"]["ports"] == ["8080:8080"]
    cmd, _, _ = cli_spec.resolve(["controller", "mosquitto-config"])
    (port,) = [p.default for p in cmd.params if p.name == "port"]
    assert services["mosquitto"]["ports"] == [f"{port}:{port}"]
    assert services["controller"]["environment"]["EDGEFLEET_CONTROLLER_BROKER"].startswith(
        "mqtts://"
    )
    assert services["agent"]["environment"]["EDGEFLEET_AGENT_MQTT_URL"] == (
        f"mqtts://mosquitto:{port}"
    )
    assert "postgresql://" in services["controller"]["environment"]["EDGEFLEET_CONTROLLER_DB"]


# --- systemd ------------------------------------------------------------------------------------
def _unit(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize("name", ["edgefleet-agent.service", "edgefleet-controller.service"])
def test_units_are_hardened_and_run_known_commands(name: str) -> None:
    text = (UNITS / name).read_text()
    u = _unit(text)
    (exec_start,) = u["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/edgefleet") and cli_spec.problems(argv[1:]) == []
    _check_vars(text, name)
    for k, v in (("ProtectSystem", "strict"), ("NoNewPrivileges", "true"),
                 ("PrivateTmp", "true"), ("Restart", "on-failure"), ("ProtectHome", "true")):  # fmt: skip
        assert u[k] == [v], (name, k)
    assert u["User"] == ["edgefleet"] and u["StateDirectory"]
    assert any(e.lstrip("-").startswith("/etc/edgefleet/") for e in u["EnvironmentFile"])
    for env in u.get("Environment", []):
        assert env.split("=")[0] in cli_spec.env_names(), env


def test_shipped_agent_unit_is_what_install_service_writes(tmp_path: Path) -> None:
    assert (UNITS / UNIT_NAME).read_text() == render_unit(UnitSpec())
    exe = Path(sys.executable).parent / "edgefleet"
    config = tmp_path / "gw" / "agent.toml"
    res = CliRunner().invoke(
        app, ["agent", "install-service", "--dry-run", "--config", str(config),
              "--executable", str(exe)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"ExecStart={exe} agent run --config {config}\n" in res.output
    assert f"ReadWritePaths={config.parent}\n" in res.output  # outside the state directory
    units = tmp_path / "units"
    res = CliRunner().invoke(
        app, ["agent", "install-service", "--config", str(config), "--unit-dir", str(units),
              "--executable", str(exe), "--user", "nobody"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    written = units / UNIT_NAME
    assert written.read_text() == render_unit(UnitSpec(exe, config, "nobody"))
    assert oct(written.stat().st_mode & 0o777) == "0o644"
    assert f"wrote {written}" in res.output and "systemctl enable --now" in res.output
    bad = CliRunner().invoke(
        app, ["agent", "install-service", "--dry-run", "--config", "/var/lib/my agent/a.toml"]
    )
    assert bad.exit_code == 2 and "spaces" in bad.output


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed; the units were parsed instead")
    exe = Path(sys.executable).parent / "edgefleet"
    assert os.access(exe, os.X_OK), exe
    for name in ("edgefleet-agent.service", "edgefleet-controller.service"):
        text = (UNITS / name).read_text().replace("/usr/local/bin/edgefleet", str(exe))
        (tmp_path / name).write_text(text)
    res = subprocess.run(
        [analyze, "verify", *(str(tmp_path / n) for n in sorted(os.listdir(tmp_path)))],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    ours = [line for line in res.stderr.splitlines() if str(tmp_path) in line]
    assert res.returncode == 0 and not ours, res.stderr
