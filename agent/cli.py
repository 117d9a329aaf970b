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
from rich.markup import escape
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
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # one line: greppable
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
    device_id: str | None = typer.Option(
        None, "--device-id", help="This gateway's id in the fleet (or from --registration)."
    ),
    registration: Path | None = typer.Option(
        None,
        "--registration",
        help="The JSON `edgefleet devices register` printed: fills in the device id, MQTT "
        "username and password, download token and the controller's key.",
    ),
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

    reg: dict[str, str] = {}
    reg_key: str | None = None
    if registration is not None:
        from edgefleet.agent.enroll import EnrollError, registration_values

        try:
            raw = json.loads(registration.read_text())
            reg = registration_values(raw)
        except (OSError, ValueError, AttributeError) as e:
            raise _fail(f"cannot read the registration {registration}: {e}") from e
        except EnrollError as e:
            raise _fail(str(e)) from e
        if device_id is not None and device_id != reg["device_id"]:
            raise _fail(f"--device-id {device_id} but the registration is for {reg['device_id']}")
        device_id = reg["device_id"]
        ck = raw.get("controller_key")
        reg_key = ck.get("pem") if isinstance(ck, dict) else None
    if not device_id:
        raise _fail("give --device-id or --registration")
    _refuse_bad_broker_url(mqtt_url)
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
    if reg_key and not controller_key:
        dst = keys / "controller" / "controller.pub"
        dst.write_text(reg_key)
        copied["controller"].append(str(dst.relative_to(directory)))
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
        "mqtt": {
            "url": mqtt_url,
            "username": reg.get("mqtt_username"),
            "password": reg.get("mqtt_password"),
        },
        "telemetry": {"enabled": True, "interval_s": 10.0},
    }
    if reg:
        values["download_token"] = reg["download_token"]
    if download_token_env:
        token = os.environ.get(download_token_env)
        if not token:
            raise _fail(f"environment variable {download_token_env} (the download token) is empty")
        values["download_token"] = token
    directory.mkdir(parents=True, exist_ok=True)
    from edgefleet.wire.atomic import atomic_write_bytes

    # 0600 from its first byte: it may hold the device's download token and MQTT password
    atomic_write_bytes(cfg_path, dump_config(values).encode(), 0o600)
    cfg = load_config(cfg_path, env={})
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_token(cfg.admin_token_path)
    console.print(f"wrote {cfg_path} (data in {cfg.data_dir})")


@agent_app.command("enroll")
def enroll_cmd(
    directory: Path = typer.Argument(..., help="Directory for agent.toml, keys, certificates."),
    controller: str = typer.Option(..., "--controller", help="Controller URL, http(s)://…"),
    token: str = typer.Option(
        ...,
        "--token",
        envvar="EDGEFLEET_ENROLL_TOKEN",
        help="One-time enrollment token (`edgefleet devices enroll-token create`).",
    ),
    device_id: str | None = typer.Option(
        None, "--device-id", help="This gateway's id (default: derived from the host name)."
    ),
    http_port: int = typer.Option(8080, "--http-port", help="Inference API port."),
    http_host: str = typer.Option("127.0.0.1", "--http-host"),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing agent.toml."),
) -> None:
    """Enroll this gateway in one step: make its key (it never leaves the device), get its
    certificate and the fleet's keys from the controller, write DIR/agent.toml (mode 0600),
    ready for `edgefleet agent run --config DIR/agent.toml`."""
    from edgefleet.agent.enroll import EnrollError, enroll, hostname_device_id

    dev = device_id or hostname_device_id()
    if dev is None:
        raise _fail("the host name is not a valid device id: give --device-id")
    try:
        done = enroll(
            controller, token, directory, dev, http_port=http_port, http_host=http_host,
            force=force,
        )  # fmt: skip
    except EnrollError as e:
        raise _fail(f"enrollment failed: {e}") from e
    console.print(f"enrolled {done.device_id} (groups {', '.join(done.groups) or '-'})")
    if not done.broker_urls:
        console.print(
            "[yellow]the controller names no broker (--device-broker-url): set [mqtt] url in "
            f"{done.config_path}[/yellow]"
        )
    console.print(f"wrote {done.config_path}; run: edgefleet agent run --config {done.config_path}")


@agent_app.command("renew-cert")
def renew_cert(config: Path = typer.Option(..., "--config", help="agent.toml")) -> None:
    """Renew the device's client certificate now (a new key, a new certificate from the
    controller; `agent run` does this by itself when a third of its life is left)."""
    from edgefleet.agent.enroll import EnrollError, renew

    cfg = _load(config)
    try:
        until = renew(cfg)
    except EnrollError as e:
        raise _fail(f"renewal failed: {e}") from e
    console.print(f"renewed the certificate of {cfg.device_id}: valid until {until}")


def _renew_loop(cfg: Any, done: threading.Event, renewed: threading.Event) -> None:
    """Renew the certificate when its life left falls below ``renew_fraction``; on success
    set ``renewed`` (the run loop reconnects the fleet link with it)."""
    import logging

    from edgefleet.agent.enroll import EnrollError, renew

    log = logging.getLogger("edgefleet.agent.cert")
    while True:
        try:
            until = renew(cfg, force=False)
            if until is not None:
                log.info("client certificate renewed, valid until %s", until)
                renewed.set()
        except (EnrollError, OSError, ValueError) as e:
            log.warning("client certificate not renewed: %s", e)
        if done.wait(max(1.0, cfg.renew_check_s)):
            return


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
    from edgefleet.agent.enroll import finish_renewal

    if finish_renewal(cfg):
        console.print("finished a certificate renewal that was interrupted")
    _refuse_unworkable(cfg)
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
    link: Any = None
    renewed = threading.Event()
    capture: Any = None
    if cfg.mqtt.brokers:
        from edgefleet.agent.capture import CaptureService
        from edgefleet.agent.mqtt.link import MqttLink

        # Always there, allowed or not: a device that forbids capture says so (docs/capture.md).
        try:
            capture = CaptureService(agent, cfg)
            capture.start()
            extras.append(capture)
        except Exception as e:
            console.print(f"[yellow]capture not started:[/yellow] {type(e).__name__}: {e}")
            capture = None

        try:
            link = MqttLink(
                agent, cfg, telemetry=telemetry.outbox if telemetry else None, capture=capture
            )
            link.start()
        except Exception as e:
            # A gateway configured for a fleet but without its link would serve stale models
            # forever and look healthy: stop, so the service manager sees the failure.
            for x in reversed(extras):
                x.stop()
            agent.stop()
            raise _fail(f"fleet link not started: {type(e).__name__}: {e}", EXIT_UNWORKABLE) from e
        if cfg.mqtt.cert_file and cfg.controller_url and cfg.renew_fraction > 0:
            threading.Thread(
                target=_renew_loop, args=(cfg, done, renewed), name="cert-renew", daemon=True
            ).start()
    console.print(
        f"agent {cfg.device_id}: inference http://{cfg.http_host}:{agent.http_port}/v2,"
        f" admin 127.0.0.1:{agent.admin_port}, models {list(agent.inventory()['models'])}"
    )
    while not done.wait(1.0):
        if renewed.is_set() and link is not None:
            # TLS files are read when a client is made: reconnect with the new certificate.
            # The same link (its worker, queue and agent listener) carries on, so no update
            # event falls between two links.
            renewed.clear()
            link.renew()
    # Updates first: an update stops at its next step (journaled; it resumes at the next
    # start), and the events of its last steps still reach the link, which queues their
    # reports in its outbox before it stops itself.
    agent.stop_updates()
    if link is not None:
        link.stop()
    for x in reversed(extras):
        x.stop()
    agent.stop()


EXIT_UNWORKABLE = 3  # `agent run`: the configuration cannot work (systemd: no restart loop)


def _refuse_bad_broker_url(url: str | None) -> None:
    """`agent init`: a broker URL that can never work is refused before anything is written."""
    from edgefleet.agent.check import broker_url_problem

    if url:
        why = broker_url_problem(url)
        if why:
            raise _fail(f"--mqtt-url: {why}", 2)


def _refuse_unworkable(cfg: Any) -> None:
    """`agent run`: exit non-zero, naming each reason, when the configuration cannot work."""
    from edgefleet.agent.check import startup_problems

    problems = startup_problems(cfg)
    if problems:
        for p in problems:
            console.print(f"[red]error:[/red] {escape(str(p))}", soft_wrap=True)
        console.print(
            "the agent cannot work with this configuration (`edgefleet agent check`)",
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_UNWORKABLE)


@agent_app.command("check")
def check(
    config: Path = typer.Option(..., "--config", help="agent.toml"),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds per network probe."),
) -> None:
    """Check the configuration, keys, broker (TCP, TLS, login), controller, clock, disk and
    execution providers: one line each (ok / warn / FAIL); exit 1 on any failure."""
    from edgefleet.agent.check import Probes, Result, failed, run_checks
    from edgefleet.agent.config import ConfigError, load_config

    try:
        cfg = load_config(config)
    except ConfigError as e:
        typer.echo(Result("config", "FAIL", str(e)).line())
        raise typer.Exit(1) from e
    results = run_checks(cfg, Probes(timeout=timeout))
    for r in results:
        typer.echo(r.line())
    if failed(results):
        raise typer.Exit(1)


@agent_app.command("install-service")
def install_service(
    config: Path = typer.Option(
        Path("/var/lib/edgefleet/agent.toml"), "--config", help="agent.toml the service runs."
    ),
    user: str = typer.Option("edgefleet", "--user", help="The user the agent runs as."),
    create_user: bool = typer.Option(
        False, "--create-user", help="Create the user (a system user, no shell) when missing."
    ),
    unit_dir: Path = typer.Option(
        Path("/etc/systemd/system"), "--unit-dir", help="Where the unit file goes."
    ),
    executable: Path | None = typer.Option(
        None, "--executable", help="The edgefleet command (default: the one running now)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the unit; change nothing."),
) -> None:
    """Install the agent as a systemd service (hardened unit, dedicated user, restart policy)."""
    from edgefleet.agent.service import UNIT_NAME, ServiceError, UnitSpec, render_unit

    exe = executable or _edgefleet_executable()
    try:
        text = render_unit(UnitSpec(exe.absolute(), config.absolute(), user))
    except ServiceError as e:
        raise _fail(str(e), 2) from e
    if dry_run:
        sys.stdout.write(text)
        return
    if create_user:
        _ensure_user(user)
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    tmp.replace(path)
    console.print(f"wrote {path}", soft_wrap=True)
    if os.geteuid() == 0 and config.parent.is_dir():
        _chown_tree(config.parent.absolute(), user)
    console.print(
        f"next: systemctl daemon-reload && systemctl enable --now {UNIT_NAME}"
        f" (check first: edgefleet agent check --config {config})",
        soft_wrap=True,
    )


def _edgefleet_executable() -> Path:
    found = shutil.which("edgefleet")
    if found:
        return Path(found).absolute()
    candidate = Path(sys.executable).parent / "edgefleet"
    if candidate.exists():
        return candidate
    raise _fail("cannot find the edgefleet command: pass --executable", 2)


def _ensure_user(user: str) -> None:
    import pwd
    import subprocess

    try:
        pwd.getpwnam(user)
        console.print(f"user {user} exists")
        return
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise _fail(f"user {user} does not exist and only root can create it", 2)
    cmd = ["useradd", "--system", "--home-dir", "/var/lib/edgefleet", "--no-create-home",
           "--shell", "/usr/sbin/nologin", "--user-group", user]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise _fail(f"useradd {user} failed: {res.stderr.strip()}", 1)
    console.print(f"created system user {user}")


def _chown_tree(directory: Path, user: str) -> None:
    """The agent's own files (config, keys, data) belong to its user: agent.toml is 0600."""
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        console.print(f"[yellow]user {user} does not exist: {directory} left as it is[/yellow]")
        return
    for root, dirs, files in os.walk(directory):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    os.chown(directory, pw.pw_uid, pw.pw_gid)
    console.print(f"{directory} now belongs to {user}", soft_wrap=True)


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
