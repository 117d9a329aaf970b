"""`edgefleet demo`: a whole fleet on this machine, offline, in about a minute.

It starts an embedded MQTT broker (amqtt; Mosquitto with ``--broker mosquitto``), a controller on
SQLite in a temporary directory, and N agent processes; builds the example model and packages it
twice with the packager pipeline: 1.0.0, and 1.1.0 whose device latency gate no gateway can meet.
It rolls 1.0.0 out in three waves (succeeds), then 1.1.0 (the first wave fails on the devices'
own benchmark, the rollout aborts and every moved device is set back to 1.0.0).

`Fleet` is the harness behind it, also used by the end-to-end tests and the fleet benchmark:
every child process dies with this one (``PR_SET_PDEATHSIG``) and `Fleet.close()` stops them on
every exit path, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

MODEL_NAME = "digits"
GOOD, BAD = "1.0.0", "1.1.0"
TERMINAL = ("succeeded", "aborted", "cancelled")


class FleetError(RuntimeError):
    """A step of the fleet harness failed; the message says which and why."""


# --- child processes ------------------------------------------------------------------------


def _die_with_parent() -> Callable[[], None] | None:
    from edgefleet.devbroker import die_with_parent

    return die_with_parent()


class Children:
    """Named child processes with their logs; `close()` terminates, then kills, all of them."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> None:
        if name in self.procs and self.procs[name].poll() is None:
            raise FleetError(f"{name} is already running")
        with open(self.log_dir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                preexec_fn=_die_with_parent(),
            )

    def alive(self, name: str) -> bool:
        p = self.procs.get(name)
        return p is not None and p.poll() is None

    def stop(self, name: str, *, kill: bool = False, timeout: float = 15.0) -> None:
        p = self.procs.get(name)
        if p is None or p.poll() is not None:
            return
        if kill:
            p.kill()
        else:
            p.terminate()
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=timeout)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self) -> None:
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            p.terminate()
        deadline = time.monotonic() + 15
        for p in live:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)


# --- the controller's HTTP API --------------------------------------------------------------


class ApiError(FleetError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class Api:
    base: str
    token: str

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        timeout: float = 60.0,
    ) -> Any:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers["Content-Type"] = (
                "application/octet-stream" if raw is not None else "application/json"
            )
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                payload = r.read()
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace")) from e
        return json.loads(payload) if payload else None


# --- the fleet ------------------------------------------------------------------------------


@dataclass
class FleetSpec:
    workdir: Path
    devices: int = 5
    broker: str = "amqtt"  # amqtt | mosquitto
    secure: bool = False  # per-device passwords and ACLs (Mosquitto only)
    probation_s: float = 1.0
    telemetry_interval_s: float = 5.0
    device_prefix: str = "gw"
    db_url: str | None = None

    def device_ids(self) -> list[str]:
        return [f"{self.device_prefix}-{i + 1:02d}" for i in range(self.devices)]


@dataclass
class Fleet:
    """Broker + controller + agents as child processes of this one."""

    spec: FleetSpec
    say: Callable[[str], None] = lambda _m: None
    children: Children = field(init=False)
    api: Api | None = None
    broker: Any = None
    controller_port: int = 0
    controller_mqtt_password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    credentials: dict[str, dict[str, str]] = field(default_factory=dict)
    keys: dict[str, Any] = field(default_factory=dict)
    agent_ports: dict[str, int] = field(default_factory=dict)
    packages: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.spec.workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.children = Children(self.root / "logs")

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.children.close()
        if self.broker is not None:
            self.broker.stop()

    def start(self) -> None:
        """Keys, broker, controller, device registration, agents; returns when all are online."""
        self.make_keys()
        self.start_controller()
        self.register_devices()
        self.start_broker()
        self.start_agents()
        self.wait_online()

    # -- keys -------------------------------------------------------------------------------
    def make_keys(self) -> None:
        from edgefleet.keys import generate_keypair

        kdir = self.root / "keys"
        if not (kdir / "packager.key").exists():
            generate_keypair(kdir, "packager")
        ctl_keys = self.root / "controller" / "keys"
        if not (ctl_keys / "controller.key").exists():
            generate_keypair(ctl_keys, "controller")
        self.keys = {
            "packager_key": kdir / "packager.key",
            "packager_pub": kdir / "packager.pub",
            "controller_pub": ctl_keys / "controller.pub",
        }

    # -- broker -----------------------------------------------------------------------------
    def broker_url(self, user: str | None = None, password: str | None = None) -> str:
        if self.broker is None:
            from edgefleet.devbroker import embedded_broker

            self.broker = embedded_broker(self.spec.broker, self.root / "broker")  # type: ignore[arg-type]
        cred = f"{user}:{password}@" if user and password else ""
        return f"mqtt://{cred}{self.broker.host}:{self.broker.port}"

    def start_broker(self) -> None:
        self.broker_url()
        if self.spec.secure:
            self.broker.password_file, self.broker.acl = self.mosquitto_files()
        self.broker.start()
        self.say(f"broker: {self.spec.broker} on {self.broker.url}")

    def mosquitto_files(self) -> tuple[str, str]:
        """The controller's generator: hashed password file (controller + every registered
        device) and the ACL that gives each device its own topics only."""
        from edgefleet.cloud_controller import auth, db

        engine = db.make_engine(self.db_url)
        try:
            with db.session_factory(engine)() as s:
                passwd = auth.mosquitto_passwords(s, self.controller_mqtt_password)
        finally:
            engine.dispose()
        return passwd, auth.mosquitto_acl()

    # -- controller -------------------------------------------------------------------------
    @property
    def controller_dir(self) -> Path:
        return self.root / "controller"

    @property
    def db_url(self) -> str:
        return self.spec.db_url or f"sqlite:///{self.controller_dir / 'controller.db'}"

    def _bootstrap_token(self) -> str:
        """An admin token for the harness, written straight into the fresh database."""
        from edgefleet.cloud_controller import auth, db

        engine = db.make_engine(self.db_url)
        try:
            db.upgrade(engine)
            with db.transaction(db.session_factory(engine)) as s:
                admin = auth.create_token(s, "admin", "demo-admin")
        finally:
            engine.dispose()
        return admin

    def start_controller(self) -> None:
        from edgefleet.cloud_controller.auth import CONTROLLER_MQTT_USER
        from edgefleet.devbroker import free_port

        first = self.api is None
        if first:
            self.controller_port = free_port()
            admin = self._bootstrap_token()
            self.api = Api(f"http://127.0.0.1:{self.controller_port}", admin)
        user = CONTROLLER_MQTT_USER if self.spec.secure else None
        argv = [
            sys.executable,
            "-m",
            "edgefleet",
            "controller",
            "serve",
            "--data-dir",
            str(self.controller_dir),
            "--db",
            self.db_url,
            "--broker",
            self.broker_url(user, self.controller_mqtt_password),
            "--packages",
            str(self.controller_dir / "packages"),
            "--trusted-key",
            str(self.keys["packager_pub"]),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.controller_port),
        ]
        env = {"EDGEFLEET_CONTROLLER_DATA_DIR": str(self.controller_dir)}
        self.children.spawn("controller", argv, env)
        self.wait_controller()
        self.say(f"controller: {self.api.base if self.api else ''} (SQLite {self.db_url})")

    def wait_controller(self, timeout: float = 60.0) -> None:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.children.alive("controller"):
                raise FleetError("controller exited:\n" + self.children.log_tail("controller"))
            try:
                with urllib.request.urlopen(self.api.base + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise FleetError(f"controller not healthy after {timeout:.0f}s")

    def stop_controller(self, *, kill: bool = False) -> None:
        self.children.stop("controller", kill=kill)

    # -- devices ----------------------------------------------------------------------------
    def register_devices(self) -> None:
        assert self.api is not None
        for dev in self.spec.device_ids():
            if dev not in self.credentials:
                self.credentials[dev] = self.api.call(
                    "POST", "/api/v1/devices", {"device_id": dev, "tags": ["demo"]}
                )

    def agent_dir(self, device_id: str) -> Path:
        return self.root / "agents" / device_id

    def write_agent_config(self, device_id: str) -> Path:
        from edgefleet.agent.admin import ensure_token
        from edgefleet.agent.config import dump_config, load_config
        from edgefleet.devbroker import free_port

        d = self.agent_dir(device_id)
        d.mkdir(parents=True, exist_ok=True)
        creds = self.credentials.get(device_id, {})
        self.agent_ports.setdefault(device_id, free_port())
        mqtt: dict[str, Any] = {"url": self.broker_url(), "keepalive_s": 10}
        if self.spec.secure:
            mqtt.update(username=creds["mqtt_username"], password=creds["mqtt_password"])
        values: dict[str, Any] = {
            "device_id": device_id,
            "data_dir": str(d / "data"),
            "trusted_keys": [str(self.keys["packager_pub"])],
            "controller_keys": [str(self.keys["controller_pub"])],
            "http_host": "127.0.0.1",
            "http_port": self.agent_ports[device_id],
            "admin_port": 0,
            "probation": {"seconds": self.spec.probation_s, "min_requests": 20},
            "validation": {"bench_runs": 30, "bench_warmup": 3},
            "mqtt": mqtt,
            "telemetry": {"enabled": True, "interval_s": self.spec.telemetry_interval_s},
        }
        if creds.get("download_token"):
            values["download_token"] = creds["download_token"]
        path = d / "agent.toml"
        path.write_text(dump_config(values))
        cfg = load_config(path, env={})
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_token(cfg.admin_token_path)
        return path

    def start_agent(self, device_id: str, env: Mapping[str, str] | None = None) -> None:
        path = self.agent_dir(device_id) / "agent.toml"
        if not path.exists():
            path = self.write_agent_config(device_id)
        argv = [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(path)]
        self.children.spawn(f"agent-{device_id}", argv, env)

    def stop_agent(self, device_id: str, *, kill: bool = False) -> None:
        self.children.stop(f"agent-{device_id}", kill=kill)

    def start_agents(self) -> None:
        for dev in self.spec.device_ids():
            self.start_agent(dev)
        self.say(f"agents: {self.spec.devices} processes ({', '.join(self.spec.device_ids())})")

    def devices(self) -> dict[str, dict[str, Any]]:
        assert self.api is not None
        return {d["device_id"]: d for d in self.api.call("GET", "/api/v1/devices")}

    def wait_online(self, ids: list[str] | None = None, timeout: float = 90.0) -> None:
        want = set(ids or self.spec.device_ids())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for dev in want:
                if not self.children.alive(f"agent-{dev}"):
                    raise FleetError(
                        f"agent {dev} exited:\n" + self.children.log_tail(f"agent-{dev}")
                    )
            online = {d for d, info in self.devices().items() if info.get("online")}
            if want <= online:
                return
            time.sleep(0.3)
        raise FleetError(f"devices not online after {timeout:.0f}s: {sorted(want - online)}")

    def installed(self, model: str = MODEL_NAME) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for dev, info in self.devices().items():
            entry = info.get("installed", {}).get(model)
            out[dev] = entry.get("version") if isinstance(entry, dict) else None
        return out

    # -- packages ---------------------------------------------------------------------------
    def build_packages(
        self, good: tuple[str, ...] = (GOOD,), bad: tuple[str, ...] = (BAD,)
    ) -> dict[str, Path]:
        """The example model packaged by the packager pipeline, once per version.

        A ``bad`` version asks for a p95 below a microsecond on the device: every gateway's own
        benchmark refuses it in VALIDATING, while the old version keeps serving.
        """
        from edgefleet.packager.examples import build_examples
        from edgefleet.packager.pipeline import package_model
        from edgefleet.packager.profiles import get_profile

        out = self.root / "packages"
        example = build_examples(self.root / "examples")["digits-mlp"]
        profile = get_profile(_host_profile())
        impossible = dataclasses.replace(
            profile, device_gates=dataclasses.replace(profile.device_gates, max_p95_ms=0.001)
        )
        built: dict[str, Path] = {}
        plan = [(v, profile) for v in good] + [(v, impossible) for v in bad]
        for version, prof in sorted(plan, key=lambda vp: _version_key(vp[0])):
            report = package_model(
                example.model,
                name=MODEL_NAME,
                version=version,
                profiles=[prof],
                calibration=example.calibration,
                validation=example.validation,
                key=self.keys["packager_key"],
                out_dir=out,
                bench_runs=50,
                bench_seconds=0.5,
            )
            result = report.profiles[0]
            if not result.ok or result.package is None:
                raise FleetError(f"packaging {version} failed: {result.failure}")
            built[version] = result.package
        self.packages.update(built)
        return built

    def upload(self, path: Path) -> dict[str, Any]:
        assert self.api is not None
        return dict(self.api.call("POST", "/api/v1/packages", raw=Path(path).read_bytes()))

    # -- rollouts ---------------------------------------------------------------------------
    def create_rollout(self, body: dict[str, Any]) -> str:
        assert self.api is not None
        return str(self.api.call("POST", "/api/v1/rollouts", body)["id"])

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        assert self.api is not None
        return dict(self.api.call("GET", f"/api/v1/rollouts/{rollout_id}"))

    def wait_rollout(
        self,
        rollout_id: str,
        *,
        timeout: float = 180.0,
        until: Callable[[dict[str, Any]], bool] | None = None,
        on_change: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until ``until(detail)`` (default: a terminal phase with rollbacks confirmed)."""
        done = until or rollout_settled
        last: Any = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            detail = self.rollout(rollout_id)
            key = (detail["phase"], detail["wave"], json.dumps(detail["counts"], sort_keys=True))
            if key != last and on_change is not None:
                on_change(detail)
            last = key
            if done(detail):
                return detail
            if not self.children.alive("controller"):
                raise FleetError("controller exited:\n" + self.children.log_tail("controller"))
            time.sleep(0.3)
        devices = [
            (d["device_id"], d["state"], d.get("rollback"), d.get("reason_code"), d.get("reason"))
            for d in self.rollout(rollout_id).get("devices", [])
        ]
        raise FleetError(
            f"rollout {rollout_id} not finished after {timeout:.0f}s: {last}; devices {devices}"
        )


def _version_key(version: str) -> Any:
    from edgefleet.wire.semver import parse_version

    return parse_version(version)


def rollout_settled(detail: Mapping[str, Any]) -> bool:
    """Terminal, and every rollback the controller asked for is confirmed by its device."""
    if detail["phase"] not in TERMINAL:
        return False
    counts = detail["counts"]
    return int(counts.get("rollback_requested", 0)) == int(counts.get("rolled_back", 0))


def _host_profile() -> str:
    import platform

    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
    return f"cpu-{arch.get(platform.machine().lower(), 'x86_64')}"


def rollout_body(version: str, devices: list[str], **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "version": version,
        "target": {"device_ids": devices},
        "waves": [20.0, 60.0, 100.0],
        "device_timeout_s": 45.0,
        # A report lost on the way (a broker dropping a QoS 1 flow) costs one timeout, not
        # the device: the retry's new desired seq makes the device report where it stands.
        "max_retries": 1,
        "retry_backoff_s": 1.0,
        "success_threshold_pct": 100.0,
        "abort_failure_pct": 30.0,
        "abort_min_finished": 1,
        "seed": 7,
    }
    body.update(overrides)
    return body


def outcome(detail: Mapping[str, Any]) -> dict[str, Any]:
    """A rollout's final state and per-device outcome, as ``--json`` prints it."""
    return {
        "id": detail["id"],
        "model": detail["model"],
        "version": detail["version"],
        "phase": detail["phase"],
        "reason": detail.get("reason"),
        "wave_sizes": detail.get("wave_sizes"),
        "counts": detail["counts"],
        "devices": [
            {
                "device_id": d["device_id"],
                "wave": d["wave"],
                "state": d["state"],
                "agent_state": d.get("agent_state"),
                "reason_code": d.get("reason_code"),
                "reason": d.get("reason"),
                "rollback": d.get("rollback"),
            }
            for d in detail.get("devices", [])
        ],
    }


# --- the command ----------------------------------------------------------------------------


def _progress_line(detail: Mapping[str, Any]) -> str:
    states = detail["counts"].get("states", {})
    parts = " · ".join(f"{k} {v}" for k, v in sorted(states.items()))
    rb = detail["counts"].get("rollback_requested", 0)
    extra = f" · rollback {detail['counts'].get('rolled_back', 0)}/{rb}" if rb else ""
    return (
        f"  {detail['model']} {detail['version']}: {detail['phase']}"
        f" wave {int(detail['wave']) + 1}/{len(detail['waves'])} — {parts}{extra}"
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the `finally` that stops the children runs."""

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(
    devices: int,
    broker: str,
    workdir: Path | None,
    console: Console,
    *,
    keep: bool = False,
) -> dict[str, Any]:
    """The whole demo; returns the JSON summary."""
    started = time.monotonic()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))

    def say(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:5.1f}s[/dim] {msg}")

    fleet = Fleet(FleetSpec(root, devices=devices, broker=broker), say)
    try:
        with _sigterm_as_interrupt():
            fleet.make_keys()
            say("packaging the example model (packager pipeline): 1.0.0 good, 1.1.0 bad")
            packages = fleet.build_packages()
            fleet.start_controller()
            fleet.register_devices()
            fleet.start_broker()
            fleet.start_agents()
            for path in packages.values():
                pkg = fleet.upload(path)
                say(f"uploaded {path.name} (sha256 {str(pkg.get('sha256', ''))[:12]}…)")
            fleet.wait_online()
            say(f"{devices} devices online")
            ids = fleet.spec.device_ids()
            results = []
            for version, label in ((GOOD, "good"), (BAD, "bad")):
                rid = fleet.create_rollout(rollout_body(version, ids))
                say(f"rollout {rid}: {MODEL_NAME} {version} ({label}) in waves 20/60/100 %")
                detail = fleet.wait_rollout(
                    rid, on_change=lambda d: console.print(_progress_line(d))
                )
                say(
                    f"rollout {rid}: [bold]{detail['phase']}[/bold]"
                    + (f" — {detail['reason']}" if detail.get("reason") else "")
                )
                results.append(outcome(detail))
            installed = fleet.installed()
            summary = {
                "workdir": str(root),
                "broker": broker,
                "elapsed_s": round(time.monotonic() - started, 1),
                "rollouts": results,
                "installed": installed,
            }
            _print_table(console, results, installed)
            return summary
    finally:
        fleet.close()
        if workdir is None and not keep:
            shutil.rmtree(root, ignore_errors=True)


def _print_table(
    console: Console, results: list[dict[str, Any]], installed: Mapping[str, Any]
) -> None:
    table = Table(title="edgefleet demo: per-device outcome")
    table.add_column("device")
    for r in results:
        table.add_column(f"{r['version']} ({r['phase']})")
    table.add_column("serving now")
    by_dev: dict[str, list[str]] = {}
    for r in results:
        for d in r["devices"]:
            cell = d["state"] + (f" ({d['reason_code']})" if d.get("reason_code") else "")
            if d.get("rollback"):
                cell += f", rollback {d['rollback']}"
            by_dev.setdefault(d["device_id"], []).append(cell)
    for dev in sorted(by_dev):
        table.add_row(dev, *by_dev[dev], str(installed.get(dev)))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add `edgefleet demo` to the root app."""

    @app.command("demo")
    def demo(
        devices: int = typer.Option(5, "--devices", min=1, max=50, help="Agent processes."),
        as_json: bool = typer.Option(
            False, "--json", help="Print each rollout's final state and per-device outcomes."
        ),
        broker: str = typer.Option("amqtt", "--broker", help="amqtt (embedded) or mosquitto."),
        workdir: Path | None = typer.Option(
            None, "--workdir", help="Keep everything here (default: a temp dir, removed)."
        ),
    ) -> None:
        """Run a whole fleet on this machine: a good rollout, then a bad one that rolls back."""
        if broker not in ("amqtt", "mosquitto"):
            raise typer.BadParameter("choose amqtt or mosquitto", param_hint="--broker")
        console = Console(stderr=as_json)
        try:
            summary = run_demo(devices, broker, workdir, console)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: every child process was stopped[/yellow]")
            raise typer.Exit(130) from None
        except Exception as e:  # every child is already stopped; say why in one line
            from rich.markup import escape

            console.print(f"[red]demo failed:[/red] {type(e).__name__}: {escape(str(e))}")
            raise typer.Exit(1) from None
        if as_json:
            sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        ok = [r["phase"] for r in summary["rollouts"]] == ["succeeded", "aborted"]
        if not ok:
            console.print("[red]unexpected rollout outcome[/red]")
            raise typer.Exit(1)
