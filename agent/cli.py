"""`edgefleet agent ...`: init, run, install, status. Heavy imports stay inside the commands."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgefleet.wire.states import TERMINAL_STATES as TERMINAL

console = Console()
agent_app = typer.Typer(
    help="The gateway agent: verify, install, validate, hot-swap and serve models."
)


def register(app: typer.Typer) -> None:
    """Add `edgefleet agent` to the root app."""
    app.add_typer(agent_app, name="agent")


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _load(config: Path, http_port: int | None = None) -> Any:
    from edgefleet.agent.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        raise _fail(str(e)) from e
    if http_port is not None:
        cfg.http_port = http_port
    return cfg


@agent_app.command("init")
def init(
    directory: Path = typer.Argument(..., help="Directory for agent.toml, keys and the data dir."),
    device_id: str = typer.Option(..., "--device-id", help="This gateway's id in the fleet."),
    trust: list[Path] = typer.Option(
        ..., "--trust", help="Trusted package signing key (PEM), repeatable."
    ),
    controller_key: list[Path] = typer.Option(
        [], "--controller-key", help="Controller's desired-state key (PEM), repeatable."
    ),
    http_port: int = typer.Option(8080, "--http-port", help="Inference API port (127.0.0.1)."),
    http_host: str = typer.Option("127.0.0.1", "--http-host"),
    mqtt_url: str | None = typer.Option(
        None, "--mqtt-url", help="Fleet broker, mqtt[s]://host:port."
    ),
    download_token_env: str | None = typer.Option(
        None,
        "--download-token-env",
        help="Environment variable holding this device's package-download token "
        "(from `edgefleet devices register`); kept in agent.toml, mode 0600.",
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing agent.toml."),
) -> None:
    """Write DIR/agent.toml and the data directory; copies the keys into DIR/keys."""
    from edgefleet.agent.admin import ensure_token
    from edgefleet.agent.config import dump_config, load_config

    directory = directory.resolve()
    cfg_path = directory / "agent.toml"
    if cfg_path.exists() and not force:
        raise _fail(f"{cfg_path} exists (use --force to overwrite)")
    keys = directory / "keys"
    copied: dict[str, list[str]] = {"trusted": [], "controller": []}
    for kind, paths in (("trusted", trust), ("controller", controller_key)):
        (keys / kind).mkdir(parents=True, exist_ok=True)
        for p in paths:
            if not p.is_file():
                raise _fail(f"key file {p} does not exist")
            dst = keys / kind / p.name
            shutil.copyfile(p, dst)
            copied[kind].append(str(dst.relative_to(directory)))
    values: dict[str, Any] = {
        "device_id": device_id,
        "data_dir": "data",
        "trusted_keys": copied["trusted"],
        "controller_keys": copied["controller"],
        "revoked_key_ids": [],
        "http_host": http_host,
        "http_port": http_port,
        "admin_port": 0,
        "swap": {"mode": "auto"},
        "probation": {"seconds": 10.0, "min_requests": 20},
        "mqtt": {"url": mqtt_url},
        "telemetry": {"enabled": True, "interval_s": 10.0},
    }
    if download_token_env:
        token = os.environ.get(download_token_env)
        if not token:
            raise _fail(f"environment variable {download_token_env} (the download token) is empty")
        values["download_token"] = token
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(dump_config(values))
    cfg_path.chmod(0o600)  # it may hold the device's download token and MQTT password
    cfg = load_config(cfg_path, env={})
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_token(cfg.admin_token_path)
    console.print(f"wrote {cfg_path} (data in {cfg.data_dir})")


@agent_app.command("run")
def run(
    config: Path = typer.Option(..., "--config", help="agent.toml"),
    http_port: int | None = typer.Option(None, "--http-port", help="Override http_port."),
) -> None:
    """Run the agent until SIGTERM/SIGINT: serve, take updates, and link to the fleet if set up."""
    import logging

    from edgefleet.agent.runtime import Agent

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = _load(config, http_port)
    # Handlers first: a stop that arrives while starting (the HTTP port is already open) must
    # still shut down in order rather than kill the process mid-start.
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    agent = Agent(cfg)
    agent.start()
    extras: list[Any] = []
    telemetry = None
    # Telemetry and the fleet link are extras: a failure there is reported and the gateway
    # goes on serving.
    if cfg.telemetry.enabled:
        from edgefleet.agent.telemetry import TelemetryService

        try:
            telemetry = TelemetryService(agent, cfg)
            telemetry.start()
            extras.append(telemetry)
        except Exception as e:
            console.print(f"[yellow]telemetry not started:[/yellow] {type(e).__name__}: {e}")
            telemetry = None
    if cfg.mqtt.brokers:
        from edgefleet.agent.mqtt.link import MqttLink

        try:
            link = MqttLink(agent, cfg, telemetry=telemetry.outbox if telemetry else None)
            link.start()
            extras.append(link)
        except Exception as e:
            console.print(f"[yellow]fleet link not started:[/yellow] {type(e).__name__}: {e}")
    console.print(
        f"agent {cfg.device_id}: inference http://{cfg.http_host}:{agent.http_port}/v2,"
        f" admin 127.0.0.1:{agent.admin_port}, models {list(agent.inventory()['models'])}"
    )
    while not done.wait(1.0):
        pass
    for x in reversed(extras):
        x.stop()
    agent.stop()


def _admin(
    cfg: Any, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0
) -> Any:
    info_path = cfg.admin_info_path
    if not info_path.exists():
        raise _fail(f"no running agent: {info_path} is missing (start `edgefleet agent run`)")
    info = json.loads(info_path.read_text())
    token = cfg.admin_token_path.read_text().strip()
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://{info['host']}:{info['port']}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise _fail(f"admin endpoint answered {e.code}: {e.read().decode(errors='replace')}") from e
    except OSError as e:
        raise _fail(f"cannot reach the agent's admin endpoint: {e}") from e


@agent_app.command("install")
def install(
    package: str = typer.Argument(..., help="Path or http(s) URL of an .efpkg"),
    config: Path = typer.Option(..., "--config", help="agent.toml"),
    sha256: str | None = typer.Option(
        None, "--sha256", help="Expected sha256 of the package file."
    ),
    allow_downgrade: bool = typer.Option(
        False, "--allow-downgrade", help="Allow exactly this older version."
    ),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to follow the update."),
    force: bool = typer.Option(
        False,
        "--force",
        help="Install although the device takes its models from the fleet controller (the "
        "controller is told, and shows the device out of sync).",
    ),
) -> None:
    """Hand a package to the running agent and follow the update; exit 0 only when it serves.

    On a device linked to a fleet (``mqtt.url`` set) the controller's desired state decides
    what runs: a local install is refused unless ``--force``.
    """
    cfg = _load(config)
    if cfg.mqtt.brokers and not force:
        raise _fail(
            f"this device takes its models from the fleet controller"
            f" ({', '.join(cfg.mqtt.brokers)}); a local"
            " install would override the desired state the controller set. Roll it out from the"
            " controller, or pass --force to install anyway (the controller is told it was a"
            " local install and shows the device out of sync)."
        )
    source = package
    if "://" not in package:
        p = Path(package).resolve()
        if not p.is_file():
            raise _fail(f"{p} is not a file")
        source = str(p)
    r = _admin(
        cfg,
        "POST",
        "/admin/updates",
        {"source": source, "sha256": sha256, "allow_downgrade": allow_downgrade},
    )
    uid = r["id"]
    console.print(f"update {uid} submitted")
    seen = 0
    deadline = time.monotonic() + timeout
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = _admin(cfg, "GET", f"/admin/updates/{uid}")
        for t in view["history"][seen:]:
            extra = f" {t['reason_code']}: {t['reason']}" if t.get("reason_code") else ""
            console.print(f"  {t['at']}  {t['state']}{extra}")
        seen = len(view["history"])
        if view["state"] in TERMINAL:
            break
        time.sleep(0.2)
    else:
        raise _fail(f"update {uid} still in {view.get('state')} after {timeout}s", 3)
    if view["state"] == "COMMITTED":
        console.print(f"[green]{view['model']} {view['version']} serves[/green]")
        return
    raise _fail(
        f"update {uid} ended {view['state']}: {view.get('reason_code')}: {view.get('reason')}", 2
    )


@agent_app.command("status")
def status(
    config: Path = typer.Option(..., "--config", help="agent.toml"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Models, versions, slots and the last updates with their state timings."""
    cfg = _load(config)
    st = _admin(cfg, "GET", "/admin/status")
    if as_json:
        sys.stdout.write(json.dumps(st, indent=2) + "\n")
        return
    console.print(
        f"device {st['device_id']}  agent {st['agent_version']}  profiles {st['profiles']}"
        f"  providers {st['execution_providers']}"
    )
    models = Table(title="models")
    for col in ("model", "current", "previous", "serving", "last update", "providers"):
        models.add_column(col)
    for name, m in st["models"].items():
        models.add_row(
            name,
            str(m["version"]),
            str(m["previous"]),
            "yes" if m["serving"] else "no",
            m["state"],
            ",".join(m["providers"]),
        )
    console.print(models)
    ups = Table(title="last updates")
    for col in ("id", "model", "version", "state", "reason", "timeline"):
        ups.add_column(col)
    for u in st["updates"]:
        ups.add_row(
            u["id"],
            u["model"],
            u["version"],
            u["state"],
            f"{u.get('reason_code') or ''} {u.get('reason') or ''}".strip(),
            _timeline(u["history"]),
        )
    console.print(ups)


def _timeline(history: list[dict[str, Any]]) -> str:
    from datetime import datetime

    def ts(s: str) -> float:
        return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()

    parts = []
    for a, b in itertools.pairwise(history):
        parts.append(f"{a['state']} {1000 * (ts(b['at']) - ts(a['at'])):.0f}ms")
    if history:
        parts.append(history[-1]["state"])
    return " > ".join(parts)
