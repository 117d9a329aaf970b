"""Controller fixtures: a real uvicorn server on loopback, SQLite files, signed packages."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefleet.keys import KeyPair, generate_keypair


@dataclass
class Running:
    url: str
    controller: Any
    admin: str
    server: Any
    thread: threading.Thread
    tokens: dict[str, str] = field(default_factory=dict)

    def client(self, role: str = "admin") -> httpx.Client:
        token = self.admin if role == "admin" else self.tokens[role]
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "uvicorn did not stop"


def start_controller(
    data_dir: Path,
    *,
    trusted: list[Path] | None = None,
    broker_url: str | None = None,
    db_url: str | None = None,
    tick_s: float = 0.1,
    signing_key: Path | None = None,
    client_id: str | None = None,
    before_start: Callable[[Any], None] | None = None,
    device_broker_urls: tuple[str, ...] = (),
    **more: Any,
) -> Running:
    """Build the controller app and serve it with uvicorn in a thread on a free port
    (``more``: further `Settings` fields, e.g. ``broker_kind="nats"``)."""
    import uvicorn

    from edgefleet.cloud_controller import auth
    from edgefleet.cloud_controller.app import Controller, create_app
    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.settings import Settings

    # The listening socket is bound here, before anything else can take its port (a port
    # picked free and bound later by uvicorn raced other test processes on a busy host).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = Settings(
        data_dir=data_dir,
        db_url=db_url,
        broker_url=broker_url,
        trusted_keys=tuple(trusted or ()),
        port=port,
        tick_s=tick_s,
        signing_key=signing_key,
        mqtt_client_id=client_id or f"ctl-test-{uuid.uuid4().hex[:8]}",
        device_broker_urls=device_broker_urls,
        **more,
    )
    ctl = Controller.build(settings)
    if before_start is not None:
        before_start(ctl)
    with transaction(ctl.factory) as s:
        admin = auth.create_token(s, "admin", "test-admin")
        tokens = {
            r: auth.create_token(s, r, f"test-{r}") for r in ("publisher", "operator", "viewer")
        }
    app = create_app(settings, ctl)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("controller did not start")
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{port}", ctl, admin, server, thread, tokens)


@pytest.fixture(scope="session")
def packager_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("pkgkeys"), "packager")


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, packager_key: KeyPair) -> dict[str, Path]:
    """Real signed iris packages: 1.0.0 and 2.0.0 for cpu-x86_64, 2.0.0 for cpu-arm64."""
    from tests.support.packages import make_package

    out = tmp_path_factory.mktemp("pkgs")
    return {
        "1.0.0/cpu-x86_64": make_package(out, name="iris", version="1.0.0", key=packager_key),
        "2.0.0/cpu-x86_64": make_package(out, name="iris", version="2.0.0", key=packager_key),
        "2.0.0/cpu-arm64": make_package(
            out, name="iris", version="2.0.0", key=packager_key, profile="cpu-arm64"
        ),
    }


@contextmanager
def pg_schema(base: str) -> Iterator[str]:
    """A URL on a fresh PostgreSQL schema of its own (dropped afterwards)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True, connect_timeout=5) as c:
        c.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in base else "?"
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as c:
            c.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The controller's database: a SQLite file, then a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    with pg_schema(request.getfixturevalue("postgres_url")) as url:
        yield url


@pytest.fixture
def controller(tmp_path: Path, packager_key: KeyPair) -> Iterator[Running]:
    """A controller on a SQLite file, no broker."""
    run = start_controller(tmp_path / "ctl", trusted=[packager_key.public_path])
    try:
        yield run
    finally:
        run.stop()


@pytest.fixture
def any_controller(tmp_path: Path, packager_key: KeyPair, db_url: str) -> Iterator[Running]:
    """The same, once on SQLite and once on PostgreSQL."""
    run = start_controller(tmp_path / "ctl", trusted=[packager_key.public_path], db_url=db_url)
    try:
        yield run
    finally:
        run.stop()


def wait_for(pred: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
