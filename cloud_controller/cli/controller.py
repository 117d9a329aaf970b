"""`edgefleet controller`: `serve` runs the controller; `token create` and `mosquitto-config`
work on its database directly (uvicorn and SQLAlchemy are imported inside them); `audit` reads
the API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
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
    """Settings from the environment, then these command-line values where given; the database
    as every controller command resolves it (`settings.resolve_db`)."""
    return _settings_from(data_dir, db, **overrides)[0]


def _settings_from(
    data_dir: Path | None = None, db: str | None = None, **overrides: Any
) -> tuple[Settings, str]:
    """`_settings` and where its database came from (a flag, a variable, a file, the default)."""
    from dataclasses import replace

    from edgefleet.cloud_controller.settings import Settings, SettingsError, resolve_db

    s = Settings().with_env()
    updates = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        updates["data_dir"] = data_dir
    s = replace(s, **updates)
    try:
        url, source = resolve_db(db, s.data_dir)
    except SettingsError as e:
        err.print(f"[red]invalid_config: {escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    return replace(s, db_url=url), source


def _say_db(s: Settings, source: str) -> None:
    """Name the database a command wrote to (on stderr: stdout stays the command's output)."""
    from edgefleet.cloud_controller.settings import redact_url

    err.print(f"database {redact_url(s.database_url)} (from {source})", soft_wrap=True)


@controller_app.command("init")
def init(
    db: str = typer.Option(
        ..., "--db", help="Database URL every controller command uses from now on."
    ),
    data_dir: Path = typer.Option(None, "--data-dir", help="The controller's data directory."),
) -> None:
    """Set the database once: write DATA_DIR/controller.toml (mode 0600) and create the schema.

    Every controller command (serve, token, resync, mosquitto-config) then uses it unless
    --db or EDGEFLEET_CONTROLLER_DB says otherwise."""
    from edgefleet.cloud_controller import db as dbm
    from edgefleet.cloud_controller.settings import redact_url, write_data_dir_config

    s = _settings(data_dir, db)
    try:
        engine = dbm.make_engine(s.database_url)
        dbm.upgrade(engine)
        engine.dispose()
    except Exception as e:  # the URL is refused or the server is unreachable: say which
        err.print(
            f"[red]db_unreachable: {redact_url(s.database_url)}: {type(e).__name__}[/red]",
            soft_wrap=True,
        )
        raise typer.Exit(1) from e
    path = write_data_dir_config(s.data_dir, s.database_url)
    console.print(
        f"wrote {path}: database {redact_url(s.database_url)} (schema up to date)", soft_wrap=True
    )


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
    broker_kind: str = typer.Option(
        None,
        "--broker-kind",
        help="mqtt (any MQTT broker, default) or nats (NATS Server: MQTT 3.1.1, no shared"
        " subscriptions, device ids without '.'; env EDGEFLEET_CONTROLLER_BROKER_KIND).",
    ),
    packages: Path = typer.Option(None, "--packages", help="Packages directory."),
    host: str = typer.Option(None, "--host"),
    port: int = typer.Option(None, "--port"),
    data_dir: Path = typer.Option(None, "--data-dir", help="Default home of db, keys, packages."),
    trusted_key: list[Path] = typer.Option(
        [], "--trusted-key", help="Packager public key to accept uploads from (repeatable)."
    ),
    public_url: str = typer.Option(None, "--public-url", help="Base URL devices download from."),
    device_broker_url: list[str] = typer.Option(
        [],
        "--device-broker-url",
        help="Broker URL enrolled devices are given, e.g. mqtts://broker.example:8883 "
        "(repeatable; env EDGEFLEET_CONTROLLER_DEVICE_BROKER_URL, comma-separated).",
    ),
    device_cert_days: int = typer.Option(
        None, "--device-cert-days", min=1, max=3650, help="Validity of device certificates."
    ),
    broker_ca: Path = typer.Option(
        None, "--broker-ca", help="CA of the broker (default: <data dir>/pki/ca.crt)."
    ),
    broker_cert: Path = typer.Option(
        None,
        "--broker-cert",
        help="The controller's client certificate (default: <data dir>/pki/controller-client.crt).",
    ),
    broker_key: Path = typer.Option(
        None,
        "--broker-key",
        help="Its key (default: <data dir>/pki/controller-client.key).",
    ),
    replica_id: str = typer.Option(
        None,
        "--replica-id",
        help="This replica's stable id (lease holder, MQTT client id suffix); "
        "default: host name and pid.",
    ),
    shared_subscriptions: bool = typer.Option(
        None,
        "--shared-subscriptions/--no-shared-subscriptions",
        help="Read device reports through $share/edgefleet/... (default on; off for brokers "
        "without MQTT shared subscriptions, e.g. NATS).",
    ),
    nats_url: str = typer.Option(
        None,
        "--nats-url",
        help="Broker kind nats: the cluster's NATS client URL(s), comma-separated "
        "(nats://n1:4222,...); status, telemetry and capture are read through JetStream from "
        "there.",
    ),
    nats_ca: Path = typer.Option(
        None,
        "--nats-ca",
        help="Broker kind nats: the CA of the NATS servers' TLS certificates (tls://... URLs, or "
        "a client port that requires TLS; default: --broker-ca, else the system's CAs).",
    ),
    nats_cert: Path = typer.Option(
        None, "--nats-cert", help="The JetStream client's TLS certificate (servers verifying it)."
    ),
    nats_key: Path = typer.Option(None, "--nats-key", help="Its key."),
    jetstream_ingest: bool = typer.Option(
        None,
        "--jetstream-ingest/--no-jetstream-ingest",
        help="Broker kind nats: read status, telemetry and capture through JetStream consumers "
        "shared by the replicas (default on); off: every replica reads every report over MQTT.",
    ),
) -> None:
    """Run the controller (API, MQTT bridge, rollout engine) until interrupted. Any number of
    replicas may share one PostgreSQL database: one leads the rollouts, all serve the API."""
    import uvicorn

    from edgefleet.cloud_controller.app import create_app

    s, source = _settings_from(
        data_dir,
        db,
        broker_url=broker,
        mqtt_protocol=mqtt_protocol,
        broker_kind=broker_kind,
        packages_dir=packages,
        host=host,
        port=port,
        public_url=public_url,
        trusted_keys=tuple(trusted_key) or None,
        device_broker_urls=tuple(device_broker_url) or None,
        device_cert_days=device_cert_days,
        broker_ca_file=broker_ca,
        broker_cert_file=broker_cert,
        broker_key_file=broker_key,
        replica_id=replica_id,
        shared_subscriptions=shared_subscriptions,
        nats_url=nats_url,
        nats_ca_file=nats_ca,
        nats_cert_file=nats_cert,
        nats_key_file=nats_key,
        jetstream_ingest=jetstream_ingest,
    )
    from edgefleet.cloud_controller.mqtt_bridge import broker_addresses

    try:
        s.resolved_broker_kind  # noqa: B018 (validates the setting)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--broker-kind") from e
    try:
        s.resolved_mqtt_protocol  # noqa: B018 (validates the setting)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--mqtt-protocol") from e
    try:  # every URL of the list parses
        broker_addresses(s.broker_url) if s.broker_url else None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--broker") from e
    try:
        s.jetstream_urls  # noqa: B018 (validates the setting)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--nats-url") from e
    if not 0 < s.switch_interval_ms <= 100:
        raise typer.BadParameter(
            f"{s.switch_interval_ms} ms: expected more than 0 and at most 100",
            param_hint="EDGEFLEET_CONTROLLER_SWITCH_INTERVAL_MS",
        )
    import sys

    sys.setswitchinterval(s.switch_interval_ms / 1000)
    app = create_app(s)
    console.print(_banner(s, source), soft_wrap=True)
    uvicorn.run(app, host=s.host, port=s.port, log_level="warning")


def _banner(s: Settings, source: str) -> str:
    """The start-up line: where it listens, its database and broker, never a password."""
    from edgefleet.cloud_controller.settings import redact_url
    from edgefleet.wire.backoff import split_urls

    broker = ",".join(redact_url(u) for u in split_urls(s.broker_url)) if s.broker_url else "-"
    return (
        f"controller on http://{s.host}:{s.port} db={redact_url(s.database_url)} (from {source})"
        f" broker={broker}"
    )


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
        err.print(f"[red]{e.code}: {escape(str(e))}[/red]")
        raise typer.Exit(2) from e
    s, source = _settings_from(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    with dbm.transaction(dbm.session_factory(engine)) as session:
        token = auth.create_token(session, role, name)
    engine.dispose()
    _say_db(s, source)
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
    s, source = _settings_from(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    _say_db(s, source)
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
    out: Path = typer.Option(
        ..., "--out", help="Directory for mosquitto.conf, its certificates, acl and passwd."
    ),
    auth_mode: str = typer.Option(
        "cert",
        "--auth",
        help="cert: devices present their certificate (mTLS, the default); password: TLS with "
        "MQTT passwords, for clients that cannot do mTLS.",
    ),
    port: int = typer.Option(8883, "--port", help="The TLS listener's port."),
    bind: str = typer.Option(None, "--bind", help="Address of the TLS listener (default: all)."),
    plaintext_port: int = typer.Option(
        None,
        "--plaintext-port",
        help="Also a plaintext listener on 127.0.0.1:PORT (password users only). Off by default.",
    ),
    server_name: list[str] = typer.Option(
        [],
        "--server-name",
        help="Host name or IP address devices use to reach the broker (repeatable; default: "
        "this host's name, localhost, 127.0.0.1). Goes into the broker's certificate.",
    ),
    controller_password: str = typer.Option(
        None,
        "--controller-password",
        envvar="EDGEFLEET_CONTROLLER_MQTT_PASSWORD",
        help="Password of the controller's MQTT user (--auth password, --plaintext-port; "
        "generated when absent).",
    ),
    db: str = typer.Option(None, "--db"),
    data_dir: Path = typer.Option(None, "--data-dir"),
) -> None:
    """Write a Mosquitto config with a TLS listener: certificates from the controller's CA,
    the per-device ACL (each device reads/writes only its own topics), the CRL, and the files
    readable by the broker's user. The controller's own client certificate goes to
    <data dir>/pki, where `controller serve --broker mqtts://HOST:PORT` finds it."""
    import secrets
    import socket
    from datetime import UTC, datetime, timedelta

    from edgefleet.cloud_controller import auth, broker_config, enroll, pki
    from edgefleet.cloud_controller import db as dbm
    from edgefleet.cloud_controller.controller import add_broker_dir

    if auth_mode not in ("cert", "password"):
        err.print(f"[red]invalid_auth: {auth_mode!r}; use cert or password[/red]")
        raise typer.Exit(2)
    s = _settings(data_dir, db)
    names = server_name or list(dict.fromkeys([socket.gethostname(), "localhost", "127.0.0.1"]))
    need_passwords = auth_mode == "password" or plaintext_port is not None
    generated = need_passwords and controller_password is None
    password = controller_password or secrets.token_urlsafe(24)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    now = datetime.now(UTC)
    try:
        if any(c in str(out.resolve()) for c in "\r\n\x00 \t"):
            raise auth.GeneratedFileError(f"output directory {str(out)!r} holds a blank or break")
        with dbm.session_factory(engine)() as session:
            passwd = auth.mosquitto_passwords(session, password) if need_passwords else None
            revoked = enroll.revoked_serials(session, now)
        acl = auth.mosquitto_acl()
        ca = pki.CertificateAuthority.load_or_create(s.pki_dir, now)
        server_key = pki.new_key()
        server_cert = pki.issue_server(ca.key, ca.cert, server_key.public_key(), names, now)
    except auth.GeneratedFileError as e:
        err.print(f"[red]invalid_identifier: {escape(str(e))}; nothing written[/red]")
        raise typer.Exit(2) from e
    except pki.PkiError as e:
        err.print(f"[red]{e.code}: {escape(str(e))}; nothing written[/red]")
        raise typer.Exit(2) from e
    finally:
        engine.dispose()
    # The controller's own bridge certificate (CN = its broker user, which the ACL names).
    bridge_key = pki.new_key()
    bridge_cert = pki.issue_client(
        ca.key,
        ca.cert,
        auth.CONTROLLER_MQTT_USER,
        bridge_key.public_key(),
        now,
        validity=timedelta(days=pki.DEFAULT_SERVER_DAYS),
    )
    pki.write_private(s.pki_dir / "controller-client.key", pki.key_pem(bridge_key))
    pki.write_private(s.pki_dir / "controller-client.crt", pki.cert_pem(bridge_cert), 0o644)
    owner = broker_config.broker_owner()
    files: list[tuple[str, bytes, bool]] = [
        ("ca.crt", ca.cert_pem, False),
        ("server.crt", pki.cert_pem(server_cert), False),
        ("server.key", pki.key_pem(server_key), True),
        ("crl.pem", pki.crl_pem(pki.build_crl(ca.key, ca.cert, revoked, now)), False),
        ("acl", acl.encode(), True),
    ]
    if passwd is not None:
        files.append(("passwd", passwd.encode(), True))
    conf = broker_config.mosquitto_conf(
        out,
        port=port,
        auth="cert" if auth_mode == "cert" else "password",
        user=owner.user,
        max_packet_bytes=MAX_PACKET_BYTES,
        plaintext_port=plaintext_port,
        bind=bind,
    )
    files.append(("mosquitto.conf", conf.encode(), False))
    broker_config.write_files(out, files, owner)
    add_broker_dir(s.pki_dir, out)
    console.print(
        f"wrote {out}/mosquitto.conf (TLS on {port}, auth {auth_mode}, files for user "
        f"{owner.user}); broker certificate for {', '.join(names)}"
    )
    blocked = broker_config.unreachable_ancestor(out, owner)
    if blocked is not None:
        err.print(
            f"[yellow]warning: user {owner.user} cannot enter {blocked}: the broker could not "
            f"read its files; choose an --out it can reach (e.g. /etc/mosquitto/edgefleet)[/yellow]"
        )
    scheme_user = "" if auth_mode == "cert" else f"{auth.CONTROLLER_MQTT_USER}:PASSWORD@"
    console.print(f"serve with --broker mqtts://{scheme_user}{names[0]}:{port}")
    if generated:
        # Shown once, on the terminal that asked for it; never logged by the controller.
        console.print(f"controller MQTT user {auth.CONTROLLER_MQTT_USER} password: {password}")


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
