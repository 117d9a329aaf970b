"""`edgefleet controller`: `serve` runs the controller; `token create` and `mosquitto-config`
work on its database directly (uvicorn and SQLAlchemy are imported inside them); `audit` reads
the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.table import Table

from edgefleet.cloud_controller.cli.client import (
    JSON_OPT,
    TOKEN_OPT,
    URL_OPT,
    api_call,
    console,
    err,
    print_json,
)

if TYPE_CHECKING:
    from edgefleet.cloud_controller.settings import Settings

MAX_PACKET_BYTES = 2 * 1024**2  # twice the largest device message the controller reads

controller_app = typer.Typer(help="Run and administer the cloud controller.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
controller_app.add_typer(token_app, name="token")


def _settings(data_dir: Path | None = None, db: str | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, then these command-line values where given."""
    from dataclasses import replace

    from edgefleet.cloud_controller.settings import Settings

    s = Settings().with_env()
    updates = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        updates["data_dir"] = data_dir
    if db is not None:
        updates["db_url"] = db
    return replace(s, **updates)


@controller_app.command("serve")
def serve(
    db: str = typer.Option(None, "--db", help="Database URL (sqlite:///… or postgresql://…)."),
    broker: str = typer.Option(
        None,
        "--broker",
        help="MQTT broker URL (mqtt://user:pw@host:port), or a comma-separated list of the"
        " nodes of a cluster (tried in turn on every lost connection).",
    ),
    mqtt_protocol: str = typer.Option(
        None,
        "--mqtt-protocol",
        help="auto, 3.1.1 or 5 (auto: 5 with shared subscriptions). NATS needs 3.1.1.",
    ),
    packages: Path = typer.Option(None, "--packages", help="Packages directory."),
    host: str = typer.Option(None, "--host"),
    port: int = typer.Option(None, "--port"),
    data_dir: Path = typer.Option(None, "--data-dir", help="Default home of db, keys, packages."),
    trusted_key: list[Path] = typer.Option(
        [], "--trusted-key", help="Packager public key to accept uploads from (repeatable)."
    ),
    public_url: str = typer.Option(None, "--public-url", help="Base URL devices download from."),
) -> None:
    """Run the controller (API, MQTT bridge, rollout engine) until interrupted."""
    import uvicorn

    from edgefleet.cloud_controller.app import create_app

    s = _settings(
        data_dir,
        db,
        broker_url=broker,
        mqtt_protocol=mqtt_protocol,
        packages_dir=packages,
        host=host,
        port=port,
        public_url=public_url,
        trusted_keys=tuple(trusted_key) or None,
    )
    from edgefleet.cloud_controller.mqtt_bridge import broker_addresses

    try:
        s.resolved_mqtt_protocol  # noqa: B018 (validates the setting)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mqtt-protocol") from e
    try:  # hosts only: the URLs may carry the controller's broker password
        brokers = (
            ",".join(f"{a.host}:{a.port}" for a in broker_addresses(s.broker_url))
            if s.broker_url
            else "-"
        )
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--broker") from e
    app = create_app(s)
    console.print(f"controller on http://{s.host}:{s.port} db={s.database_url} broker={brokers}")
    uvicorn.run(app, host=s.host, port=s.port, log_level="warning")


@token_app.command("create")
def token_create(
    role: str = typer.Option(..., "--role", help="admin, publisher, operator or viewer."),
    name: str = typer.Option("cli", "--name"),
    db: str = typer.Option(None, "--db", help="Database URL."),
    data_dir: Path = typer.Option(None, "--data-dir"),
) -> None:
    """Create an API token directly in the database (prints it once)."""
    from edgefleet.cloud_controller import auth
    from edgefleet.cloud_controller import db as dbm

    if role not in [r.value for r in auth.Role]:
        err.print(f"[red]invalid_role: {role!r}; use one of {[r.value for r in auth.Role]}[/red]")
        raise typer.Exit(2)
    from edgefleet.wire import ids

    try:
        ids.token_name(name)
    except ids.IdentifierError as e:
        err.print(f"[red]{e.code}: {e}[/red]")
        raise typer.Exit(2) from e
    s = _settings(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    with dbm.transaction(dbm.session_factory(engine)) as session:
        token = auth.create_token(session, role, name)
    engine.dispose()
    typer.echo(token)


@token_app.command("list")
def token_list(
    db: str = typer.Option(None, "--db", help="Database URL."),
    data_dir: Path = typer.Option(None, "--data-dir"),
    as_json: bool = JSON_OPT,
) -> None:
    """Every API token's id, name, role and dates (the tokens themselves are never stored)."""
    from edgefleet.cloud_controller import auth
    from edgefleet.cloud_controller import db as dbm

    s = _settings(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    with dbm.session_factory(engine)() as session:
        rows = [auth.token_to_dict(t) for t in auth.list_tokens(session)]
    engine.dispose()
    if as_json:
        print_json(rows)
        return
    t = Table("id", "name", "role", "created", "revoked")
    for r in rows:
        t.add_row(str(r["id"]), str(r["name"]), str(r["role"]), str(r["created_at"])[:19],
                  str(r["revoked_at"] or "")[:19])  # fmt: skip
    console.print(t)


@token_app.command("revoke")
def token_revoke(
    token_id: int = typer.Argument(..., help="The token's id (`token list`)."),
    db: str = typer.Option(None, "--db", help="Database URL."),
    data_dir: Path = typer.Option(None, "--data-dir"),
) -> None:
    """Revoke an API token directly in the database: refused from its next request on."""
    from edgefleet.cloud_controller import auth
    from edgefleet.cloud_controller import db as dbm

    if not 1 <= token_id <= 2**63 - 1:
        err.print(f"[red]not_found: no token {token_id}[/red]")
        raise typer.Exit(1)
    s = _settings(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    with dbm.transaction(dbm.session_factory(engine)) as session:
        row = auth.revoke_token(session, token_id)
        out = auth.token_to_dict(row) if row is not None else None
    engine.dispose()
    if out is None:
        err.print(f"[red]not_found: no token {token_id}[/red]")
        raise typer.Exit(1)
    console.print(
        f"revoked token {out['id']} ({out['name']}, {out['role']}) at {out['revoked_at']}"
    )


@controller_app.command("resync")
def resync(
    floor: int = typer.Option(
        0,
        "--floor",
        min=0,
        max=2**62,
        help="Continue every device's desired-state sequence above this number too (after a "
        "restore: a number above any seq issued before; devices that report a higher seq "
        "are continued above theirs automatically).",
    ),
    db: str = typer.Option(None, "--db", help="Database URL."),
    data_dir: Path = typer.Option(None, "--data-dir"),
    as_json: bool = JSON_OPT,
) -> None:
    """After a database restore: show the devices that hold a newer desired state than the
    controller, and issue their desired states again above it (published when the controller
    next connects to the broker; a running controller does this by itself)."""
    from datetime import UTC, datetime

    from edgefleet.cloud_controller import db as dbm
    from edgefleet.cloud_controller import desired, devices
    from edgefleet.cloud_controller.controller import load_signing_key
    from edgefleet.cloud_controller.desired import Signer

    s = _settings(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    from datetime import timedelta

    signer = Signer(load_signing_key(s), timedelta(seconds=s.desired_ttl_s))
    now = datetime.now(UTC)
    with dbm.transaction(dbm.session_factory(engine)) as session:
        if floor:
            devices.raise_floor(session, floor, now)
        stale = devices.stale_sequences(session)
        rows = desired.resync(session, signer, now)
        stale_out = {d: {"device_seq": f, "controller_seq": c} for d, (f, c) in stale.items()}
        reissued = {r.device_id: r.seq for r in rows}
    engine.dispose()
    if as_json:
        print_json({"stale": stale_out, "reissued": reissued})
        return
    t = Table("device", "device holds", "controller had", "reissued as")
    for d, v in stale_out.items():
        t.add_row(d, str(v["device_seq"]), str(v["controller_seq"]), str(reissued.get(d, "-")))
    console.print(t)
    console.print(f"{len(rows)} desired state(s) issued again")


@controller_app.command("mosquitto-config")
def mosquitto_config(
    out: Path = typer.Option(..., "--out", help="Directory for passwd, acl and mosquitto.conf."),
    controller_password: str = typer.Option(
        None,
        "--controller-password",
        envvar="EDGEFLEET_CONTROLLER_MQTT_PASSWORD",
        help="Password of the controller's MQTT user (generated when absent).",
    ),
    port: int = typer.Option(1883, "--port"),
    db: str = typer.Option(None, "--db"),
    data_dir: Path = typer.Option(None, "--data-dir"),
) -> None:
    """Write Mosquitto password + ACL files: each device reads/writes only its own topics."""
    import secrets

    from edgefleet.cloud_controller import auth
    from edgefleet.cloud_controller import db as dbm

    s = _settings(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    generated = controller_password is None
    password = controller_password or secrets.token_urlsafe(24)
    try:
        if any(c in str(out.resolve()) for c in "\r\n\x00"):
            raise auth.GeneratedFileError(f"output directory {str(out)!r} holds a line break")
        with dbm.session_factory(engine)() as session:
            passwd = auth.mosquitto_passwords(session, password)
        acl = auth.mosquitto_acl()
    except auth.GeneratedFileError as e:
        err.print(f"[red]invalid_identifier: {e}; nothing written[/red]")
        raise typer.Exit(2) from e
    finally:
        engine.dispose()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("passwd", passwd), ("acl", acl)):
        path = out / name
        path.write_text(text)
        path.chmod(0o600)
    (out / "data").mkdir(exist_ok=True)
    (out / "mosquitto.conf").write_text(
        f"listener {port}\nallow_anonymous false\n"
        f"password_file {out.resolve() / 'passwd'}\nacl_file {out.resolve() / 'acl'}\n"
        "# The controller keeps a persistent session (fixed client id): persisting it, and\n"
        "# queueing deeply for it, is what keeps device reports that arrive while the\n"
        "# controller (or this broker) restarts from being acknowledged and then dropped.\n"
        f"persistence true\npersistence_location {out.resolve() / 'data'}/\n"
        "autosave_interval 10\nmax_queued_messages 1000000\nmax_inflight_messages 100\n"
        "# No device message is larger (docs/limits.md): the broker refuses bigger packets.\n"
        f"max_packet_size {MAX_PACKET_BYTES}\n"
    )
    console.print(f"wrote {out}/passwd ({passwd.count(chr(10))} users), acl, mosquitto.conf")
    if generated:
        console.print(
            f"controller MQTT user {auth.CONTROLLER_MQTT_USER} password: {password}\n"
            f"serve with --broker mqtt://{auth.CONTROLLER_MQTT_USER}:{password}@HOST:{port}"
        )


@controller_app.command("audit")
def controller_audit(
    limit: int = typer.Option(50, "--limit"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """The audit log (admin): who changed what, when, with which outcome."""
    rows = api_call(url, token, "GET", "/api/v1/audit", params={"limit": limit})
    if as_json:
        print_json(rows)
        return
    t = Table("when", "who", "what", "status", "detail")
    for r in rows:
        t.add_row(r["at"][:19], r["actor"], r["action"], str(r["outcome"]),
                  json.dumps(r["detail"])[:60])  # fmt: skip
    console.print(t)
