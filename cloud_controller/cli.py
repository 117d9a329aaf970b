"""Controller commands: `controller`, `packages`, `devices`, `rollout` (the last three use the API).

Only typer, rich and the standard library are imported here; httpx, SQLAlchemy and uvicorn are
imported inside the commands.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

console = Console()
err = Console(stderr=True)

controller_app = typer.Typer(help="Run and administer the cloud controller.", no_args_is_help=True)
token_app = typer.Typer(help="API tokens.", no_args_is_help=True)
packages_app = typer.Typer(help="Packages in the controller's registry.", no_args_is_help=True)
devices_app = typer.Typer(help="The device inventory.", no_args_is_help=True)
rollout_app = typer.Typer(help="Staged rollouts.", no_args_is_help=True)
controller_app.add_typer(token_app, name="token")

URL_OPT = typer.Option(None, "--url", envvar="EDGEFLEET_URL", help="Controller URL.")
TOKEN_OPT = typer.Option(None, "--token", envvar="EDGEFLEET_TOKEN", help="API token.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON.")
TERMINAL = ("succeeded", "aborted", "cancelled")


def register(app: typer.Typer) -> None:
    """Add this component's commands to the root app."""
    app.add_typer(controller_app, name="controller")
    app.add_typer(packages_app, name="packages")
    app.add_typer(devices_app, name="devices")
    app.add_typer(rollout_app, name="rollout")


# --- helpers ---------------------------------------------------------------------------------


def _settings(data_dir: Path | None = None, db: str | None = None, **overrides: Any) -> Any:
    from dataclasses import replace

    from edgefleet.cloud_controller.settings import Settings

    s = Settings().with_env()
    updates = {k: v for k, v in overrides.items() if v is not None}
    if data_dir is not None:
        updates["data_dir"] = data_dir
    if db is not None:
        updates["db_url"] = db
    return replace(s, **updates)


def api_call(url: str | None, token: str | None, method: str, path: str, **kw: Any) -> Any:
    """Call the controller's API (used by every CLI group that talks to it).

    Exits 1 with the server's reason code when it refuses, 2 when it cannot be reached."""
    import httpx

    base = (url or "http://127.0.0.1:8400").rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", None) or {})
    try:
        r = httpx.request(method, base + path, headers=headers, timeout=120, **kw)
    except httpx.HTTPError as e:
        err.print(f"[red]cannot reach {base}: {e}[/red]")
        raise typer.Exit(2) from e
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        if isinstance(detail, dict):
            err.print(f"[red]{r.status_code} {detail.get('code')}: {detail.get('message')}[/red]")
        else:
            err.print(f"[red]{r.status_code}: {detail}[/red]")
        raise typer.Exit(1)
    return r.json()


def _print_json(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


# --- controller ------------------------------------------------------------------------------


@controller_app.command("serve")
def serve(
    db: str = typer.Option(None, "--db", help="Database URL (sqlite:///… or postgresql://…)."),
    broker: str = typer.Option(
        None, "--broker", help="MQTT broker URL (mqtt://user:pw@host:port)."
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
        packages_dir=packages,
        host=host,
        port=port,
        public_url=public_url,
        trusted_keys=tuple(trusted_key) or None,
    )
    app = create_app(s)
    console.print(
        f"controller on http://{s.host}:{s.port} db={s.database_url} broker={s.broker_url or '-'}"
    )
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
    s = _settings(data_dir, db)
    engine = dbm.make_engine(s.database_url)
    dbm.upgrade(engine)
    with dbm.transaction(dbm.session_factory(engine)) as session:
        token = auth.create_token(session, role, name)
    engine.dispose()
    typer.echo(token)


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
    with dbm.session_factory(engine)() as session:
        passwd = auth.mosquitto_passwords(session, password)
    engine.dispose()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("passwd", passwd), ("acl", auth.mosquitto_acl())):
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
        _print_json(rows)
        return
    t = Table("when", "who", "what", "status", "detail")
    for r in rows:
        t.add_row(r["at"][:19], r["actor"], r["action"], str(r["outcome"]),
                  json.dumps(r["detail"])[:60])  # fmt: skip
    console.print(t)


# --- packages --------------------------------------------------------------------------------


@packages_app.command("upload")
def packages_upload(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Upload .efpkg files; the controller verifies each against its trusted packager keys."""
    results = []
    for f in files:
        with open(f, "rb") as fh:
            r = api_call(
                url,
                token,
                "POST",
                "/api/v1/packages",
                content=fh,
                headers={"Content-Type": "application/octet-stream"},
            )
        results.append(r)
        if not as_json:
            state = "uploaded" if r["created"] else "already there"
            console.print(f"{state}: {r['name']} {r['version']} {r['profile']} (id {r['id']})")
    if as_json:
        _print_json(results)


@packages_app.command("list")
def packages_list(
    name: str = typer.Option(None, "--name"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Packages by model, version and profile."""
    rows = api_call(url, token, "GET", "/api/v1/packages", params={"name": name} if name else None)
    if as_json:
        _print_json(rows)
        return
    t = Table("id", "name", "version", "profile", "size", "sha256", "uploaded by")
    for p in rows:
        t.add_row(
            str(p["id"]), p["name"], p["version"], p["profile"], str(p["size"]),
            p["sha256"][:12], p["uploaded_by"],
        )  # fmt: skip
    console.print(t)


# --- devices ---------------------------------------------------------------------------------


@devices_app.command("list")
def devices_list(
    group: str = typer.Option(None, "--group"),
    tag: str = typer.Option(None, "--tag"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Devices with their agent, profiles, installed models and last seen time."""
    params = {k: v for k, v in (("group", group), ("tag", tag)) if v}
    rows = api_call(url, token, "GET", "/api/v1/devices", params=params)
    if as_json:
        _print_json(rows)
        return
    t = Table("device", "online", "agent", "profiles", "installed", "groups", "tags", "last seen")
    for d in rows:
        installed = ", ".join(
            f"{m}={v.get('version')}" for m, v in d["installed"].items() if isinstance(v, dict)
        )
        t.add_row(
            d["device_id"], "yes" if d["online"] else "no", d["agent_version"] or "-",
            ",".join(d["profiles"]), installed, ",".join(d["groups"]), ",".join(d["tags"]),
            (d["last_seen"] or "-")[:19],
        )  # fmt: skip
    console.print(t)


@devices_app.command("show")
def devices_show(device_id: str, url: str = URL_OPT, token: str = TOKEN_OPT) -> None:
    """One device, with its desired state."""
    _print_json(api_call(url, token, "GET", f"/api/v1/devices/{device_id}"))


@devices_app.command("register")
def devices_register(
    device_id: str,
    group: list[str] = typer.Option([], "--group"),
    tag: list[str] = typer.Option([], "--tag"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
) -> None:
    """Register a device: prints its MQTT and download credentials once (JSON)."""
    body = {"device_id": device_id, "groups": group, "tags": tag}
    _print_json(api_call(url, token, "POST", "/api/v1/devices", json=body))


# --- rollouts --------------------------------------------------------------------------------


def _progress_table(r: dict[str, Any]) -> Table:
    c = r["counts"]
    title = f"rollout {r['id']}: {r['model']} {r['version']} — {r['phase']}"
    if r.get("paused"):
        title += " (paused)"
    t = Table(title=title)
    for col in ("wave", "size", "pending", "in progress", "retry", "ok", "failed", "timed out"):
        t.add_column(col, justify="right")
    for i, w in enumerate(c["waves"]):
        mark = "▶ " if i == r["wave"] and r["phase"] not in TERMINAL else ""
        t.add_row(
            f"{mark}{i + 1} ({r['waves'][i]:g} %)", str(w["size"]), str(w.get("pending", 0)),
            str(w.get("in_progress", 0)), str(w.get("waiting_retry", 0)),
            str(w.get("succeeded", 0)), str(w.get("failed", 0)), str(w.get("timed_out", 0)),
        )  # fmt: skip
    st = c["states"]
    foot = f"incompatible {st.get('incompatible', 0)}, skipped {st.get('skipped', 0)}"
    if c["rollback_requested"]:
        foot += f", rolled back {c['rolled_back']}/{c['rollback_requested']}"
    if r.get("reason"):
        foot += f" — {r['reason']}"
    t.caption = foot
    return t


def _watch(url: str | None, token: str | None, rollout_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    r = api_call(url, token, "GET", f"/api/v1/rollouts/{rollout_id}")
    with Live(_progress_table(r), console=console, refresh_per_second=4) as live:
        while r["phase"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            r = api_call(url, token, "GET", f"/api/v1/rollouts/{rollout_id}")
            live.update(_progress_table(r))
    return dict(r)


@rollout_app.command("create")
def rollout_create(
    model: str,
    version: str,
    device: list[str] = typer.Option([], "--device", help="Target device id (repeatable)."),
    group: list[str] = typer.Option([], "--group", help="Target group (repeatable)."),
    tag: list[str] = typer.Option([], "--tag", help="Target tag (repeatable)."),
    waves: str = typer.Option("5,25,100", "--waves", help="Cumulative percentages."),
    timeout: float = typer.Option(600, "--device-timeout", help="Seconds per device."),
    retries: int = typer.Option(0, "--retries"),
    backoff: float = typer.Option(30, "--backoff", help="First retry delay (doubles)."),
    success: float = typer.Option(100, "--success-threshold", help="% of a wave to pass it."),
    abort_pct: float = typer.Option(20, "--abort-failures", help="Abort over this % failed..."),
    abort_min: int = typer.Option(1, "--abort-min", help="...once this many finished."),
    approve_before: str = typer.Option(
        None, "--approve-before", help="Waves (1-based) that wait for approval, e.g. 2,3."
    ),
    rate: int = typer.Option(None, "--rate", help="Devices per minute."),
    soak: float = typer.Option(0, "--soak", help="Seconds of soak after each wave."),
    max_p95_ratio: float = typer.Option(None, "--max-p95-ratio"),
    max_error_rate: float = typer.Option(None, "--max-error-rate"),
    max_drift: float = typer.Option(None, "--max-drift"),
    seed: int = typer.Option(None, "--seed", help="Wave membership seed (random if absent)."),
    watch: bool = typer.Option(False, "--watch", help="Show live progress until it ends."),
    watch_timeout: float = typer.Option(3600, "--watch-timeout"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Start a staged rollout of a release to devices, groups and tags."""
    try:
        wave_list = [float(w) for w in _csv(waves)]
        approvals = [int(w) - 1 for w in _csv(approve_before)]
    except ValueError as e:
        err.print(f"[red]invalid_spec: {e}[/red]")
        raise typer.Exit(2) from e
    body: dict[str, Any] = {
        "model": model,
        "version": version,
        "target": {"device_ids": device, "groups": group, "tags": tag},
        "waves": wave_list,
        "device_timeout_s": timeout,
        "max_retries": retries,
        "retry_backoff_s": backoff,
        "success_threshold_pct": success,
        "abort_failure_pct": abort_pct,
        "abort_min_finished": abort_min,
        "approval_waves": approvals,
        "rate_per_min": rate,
        "soak_s": soak,
        "gates": {
            "max_p95_ratio": max_p95_ratio,
            "max_error_rate": max_error_rate,
            "max_drift": max_drift,
        },
    }
    if seed is not None:
        body["seed"] = seed
    r = api_call(url, token, "POST", "/api/v1/rollouts", json=body)
    if watch:
        r = _watch(url, token, r["id"], watch_timeout)
    if as_json:
        _print_json(r)
    elif not watch:
        console.print(_progress_table(r))
    if r["phase"] in ("aborted", "cancelled") and watch:
        raise typer.Exit(3)


@rollout_app.command("list")
def rollout_list(url: str = URL_OPT, token: str = TOKEN_OPT, as_json: bool = JSON_OPT) -> None:
    """Rollouts, newest first."""
    rows = api_call(url, token, "GET", "/api/v1/rollouts")
    if as_json:
        _print_json(rows)
        return
    t = Table("id", "model", "version", "phase", "wave", "ok", "failed", "created", "by")
    for r in rows:
        st = (r.get("counts") or {}).get("states", {})
        t.add_row(
            r["id"], r["model"], r["version"], r["phase"], str((r.get("wave") or 0) + 1),
            str(st.get("succeeded", 0)), str(st.get("failed", 0) + st.get("timed_out", 0)),
            r["created_at"][:19], r["created_by"],
        )  # fmt: skip
    console.print(t)


@rollout_app.command("show")
def rollout_show(
    rollout_id: str,
    watch: bool = typer.Option(False, "--watch"),
    watch_timeout: float = typer.Option(3600, "--watch-timeout"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """A rollout's progress per wave (live with --watch), devices and events."""
    if watch:
        r = _watch(url, token, rollout_id, watch_timeout)
    else:
        r = api_call(url, token, "GET", f"/api/v1/rollouts/{rollout_id}")
    if as_json:
        _print_json(r)
        return
    if not watch:
        console.print(_progress_table(r))
    for e in r.get("events", [])[-15:]:
        console.print(f"  {time.strftime('%H:%M:%S', time.localtime(e['at']))} {e['message']}")


def _control(action: str, rollout_id: str, url: str | None, token: str | None, **body: Any) -> None:
    r = api_call(url, token, "POST", f"/api/v1/rollouts/{rollout_id}/{action}", json=body)
    console.print(_progress_table(r))


@rollout_app.command("approve")
def rollout_approve(
    rollout_id: str,
    wave: int = typer.Option(
        None, "--wave", help="Wave number (1-based); default the waiting one."
    ),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
) -> None:
    """Approve the next wave."""
    _control("approve", rollout_id, url, token, wave=None if wave is None else wave - 1)


@rollout_app.command("pause")
def rollout_pause(rollout_id: str, url: str = URL_OPT, token: str = TOKEN_OPT) -> None:
    """Stop dispatching (devices already asked keep going)."""
    _control("pause", rollout_id, url, token)


@rollout_app.command("resume")
def rollout_resume(rollout_id: str, url: str = URL_OPT, token: str = TOKEN_OPT) -> None:
    """Continue a paused rollout."""
    _control("resume", rollout_id, url, token)


@rollout_app.command("cancel")
def rollout_cancel(
    rollout_id: str,
    rollback: bool = typer.Option(False, "--rollback", help="Also revert moved devices."),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
) -> None:
    """Stop the rollout for good."""
    _control("cancel", rollout_id, url, token, rollback=rollback)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: str,
    reason: str = typer.Option("aborted by operator", "--reason"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
) -> None:
    """Abort and set the previous version as desired on every moved device."""
    _control("abort", rollout_id, url, token, reason=reason)
