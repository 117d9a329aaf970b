"""The agent's systemd unit (`edgefleet agent install-service`): rendered here, pure.

The unit runs `edgefleet agent run` as a dedicated user with a read-only system
(`ProtectSystem=strict`): the only writable place is its state directory (`/var/lib/edgefleet`,
`StateDirectory=`) and, when the configuration lives elsewhere, the configuration's directory
(the data directory, certificate renewal). `agent run` exits 3 when its configuration cannot
work; systemd then stops restarting it (`RestartPreventExitStatus=`) instead of looping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "edgefleet-agent.service"
STATE_DIR = Path("/var/lib/edgefleet")
DEFAULT_CONFIG = STATE_DIR / "agent.toml"
DEFAULT_EXEC = Path("/usr/local/bin/edgefleet")
ENV_FILE = Path("/etc/edgefleet/agent.env")
EXIT_UNWORKABLE = 3  # agent.cli.EXIT_UNWORKABLE
EXIT_USAGE = 2


class ServiceError(ValueError):
    """The unit cannot be written as asked; the message says why."""


@dataclass(frozen=True)
class UnitSpec:
    executable: Path = DEFAULT_EXEC
    config: Path = DEFAULT_CONFIG
    user: str = "edgefleet"


def _check_value(name: str, value: str) -> str:
    # systemd splits ExecStart on whitespace and expands % and $: refuse what it would mangle
    if not value or any(c in value for c in " \t\r\n\"'\\%$;"):
        raise ServiceError(f"{name} {value!r}: spaces, quotes, %, $, ; and line breaks are refused")
    return value


def render_unit(spec: UnitSpec) -> str:
    """The unit file's text for ``spec``."""
    exe = _check_value("executable", str(spec.executable))
    cfg = _check_value("config", str(spec.config))
    user = _check_value("user", spec.user)
    if not Path(exe).is_absolute() or not Path(cfg).is_absolute():
        raise ServiceError("the executable and the config must be absolute paths")
    extra_rw = ""
    if not spec.config.is_relative_to(STATE_DIR):
        extra_rw = f"ReadWritePaths={spec.config.parent}\n"
    return f"""\
# edgefleet agent: model updates and inference on this gateway (`edgefleet agent install-service`).
[Unit]
Description=edgefleet agent
Documentation=man:systemd.exec(5)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
# EDGEFLEET_AGENT_<FIELD> variables override agent.toml (docs/agent.md); optional file.
EnvironmentFile=-{ENV_FILE}
ExecStart={exe} agent run --config {cfg}
WorkingDirectory={STATE_DIR}
StateDirectory={STATE_DIR.name}
StateDirectoryMode=0700
{extra_rw}UMask=0077
Restart=on-failure
RestartSec=5
# 2: usage, 3: the configuration cannot work: restarting would not help.
RestartPreventExitStatus={EXIT_USAGE} {EXIT_UNWORKABLE}
TimeoutStopSec=60
# Hardening: a read-only system, no privilege gain, no view of other users' files.
ProtectSystem=strict
ProtectHome=true
PrivateTmp=true
NoNewPrivileges=true
ProtectKernelTunables=true
ProtectKernelModules=true
ProtectKernelLogs=true
ProtectControlGroups=true
ProtectClock=true
ProtectHostname=true
RestrictSUIDSGID=true
RestrictRealtime=true
RestrictNamespaces=true
LockPersonality=true
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
SystemCallArchitectures=native
# Accelerators (/dev/dri, NPUs) stay visible: PrivateDevices would hide them.
PrivateDevices=false

[Install]
WantedBy=multi-user.target
"""
