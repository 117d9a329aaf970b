"""`Fleet`: an MQTT broker, a controller on SQLite and N agent processes, all children of this
process, on embedded defaults in one work directory.

The demo plays its scenario on one; the end-to-end tests and the fleet benchmark drive one
directly. Every child dies with this process (`edgefleet.harness.Children`) and `Fleet.close()`
stops them on every exit path.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.demo.agents import write_agent_config
from edgefleet.demo.api import Api
from edgefleet.demo.packages import build_packages
from edgefleet.demo.rollouts import rollout_settled
from edgefleet.demo.spec import BAD, GOOD, MODEL_NAME, FleetError, FleetSpec
from edgefleet.harness import Children, free_port


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
    # EDGEFLEET_CONTROLLER_* settings the controller is started with (the loop's capture_on_drift)
    controller_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.spec.workdir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.children = Children(self.root / "logs")

    # -- lifecycle --------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every child process and the broker (call it on every exit path)."""
        self.children.close()
        if self.broker is not None:
            self.broker.stop()

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
        env = {**self.controller_env, "EDGEFLEET_CONTROLLER_DATA_DIR": str(self.controller_dir)}
        if self.spec.broker == "amqtt":  # no MQTT shared subscriptions there
            env["EDGEFLEET_CONTROLLER_SHARED_SUBSCRIPTIONS"] = "0"
        self.children.spawn("controller", argv, env)
        self.wait_controller()
        self.say(f"controller: {self.api.base if self.api else ''} (SQLite {self.db_url})")

    def wait_controller(self, timeout: float = 60.0) -> None:
        assert self.api is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.children.alive("controller"):
                raise FleetError("controller exited:\n" + self.children.log_tail("controller"))
            if self.api.healthy():
                return
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
        """``agent.toml`` of ``device_id`` on a free loopback port (kept across restarts)."""
        port = self.agent_ports.setdefault(device_id, free_port())
        return write_agent_config(
            self.agent_dir(device_id),
            device_id,
            spec=self.spec,
            broker_url=self.broker_url(),
            keys=self.keys,
            creds=self.credentials.get(device_id, {}),
            http_port=port,
        )

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
        moved: dict[str, int] = {}
        while time.monotonic() < deadline:
            for dev in want:
                if not self.children.alive(f"agent-{dev}"):
                    tail = self.children.log_tail(f"agent-{dev}")
                    # Its HTTP port was free when chosen, and another process of a busy host
                    # took it before the agent bound it: a new port, a few times at most.
                    if tail.count("Address already in use") > moved.get(dev, 0) < 3:
                        moved[dev] = moved.get(dev, 0) + 1
                        self.agent_ports[dev] = free_port()
                        self.write_agent_config(dev)
                        self.say(f"agent {dev}: its port was taken; starting it on another")
                        self.start_agent(dev)
                        continue
                    raise FleetError(f"agent {dev} exited:\n" + tail)
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
        """The example model packaged once per version (see `packages.build_packages`)."""
        built = build_packages(self.root, self.keys["packager_key"], good, bad)
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
