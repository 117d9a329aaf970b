"""`edgefleet devices`: list, show and register devices through the controller's API."""

from __future__ import annotations

import typer
from rich.table import Table

from edgefleet.cloud_controller.cli.client import (
    EXIT_CODES_HELP,
    JSON_OPT,
    TOKEN_OPT,
    URL_OPT,
    api_call,
    console,
    print_json,
)

devices_app = typer.Typer(
    help="The device inventory.", no_args_is_help=True, epilog=EXIT_CODES_HELP
)


def _sync_cell(d: dict[str, object]) -> str:
    view = d.get("sync")
    return str(view.get("text", "-")) if isinstance(view, dict) else "-"


@devices_app.command("list")
def devices_list(
    group: str = typer.Option(None, "--group"),
    tag: str = typer.Option(None, "--tag"),
    out_of_sync: bool = typer.Option(
        False, "--out-of-sync", help="Only devices whose installed models differ from desired."
    ),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Devices with their agent, profiles, installed models, whether they are in sync with
    their desired state (desired vs installed, since when not), and last seen time."""
    params = {k: v for k, v in (("group", group), ("tag", tag)) if v}
    rows = api_call(url, token, "GET", "/api/v1/devices", params=params)
    if out_of_sync:
        rows = [d for d in rows if not (d.get("sync") or {}).get("in_sync", True)]
    if as_json:
        print_json(rows)
        return
    t = Table(
        "device", "online", "agent", "profiles", "installed", "in sync", "groups", "tags",
        "last seen",
    )  # fmt: skip
    for d in rows:
        installed = ", ".join(
            f"{m}={v.get('version')}" for m, v in d["installed"].items() if isinstance(v, dict)
        )
        t.add_row(
            d["device_id"], "yes" if d["online"] else "no", d["agent_version"] or "-",
            ",".join(d["profiles"]), installed, _sync_cell(d), ",".join(d["groups"]),
            ",".join(d["tags"]), (d["last_seen"] or "-")[:19],
        )  # fmt: skip
    console.print(t)


@devices_app.command("show")
def devices_show(
    device_id: str, url: str = URL_OPT, token: str = TOKEN_OPT, as_json: bool = JSON_OPT
) -> None:
    """One device, with its desired state and whether it is in sync (always JSON)."""
    print_json(api_call(url, token, "GET", f"/api/v1/devices/{device_id}"))


@devices_app.command("register")
def devices_register(
    device_id: str,
    group: list[str] = typer.Option([], "--group"),
    tag: list[str] = typer.Option([], "--tag"),
    rotate_credentials: bool = typer.Option(
        False,
        "--rotate-credentials",
        help="The device exists: issue new credentials (its old ones stop working).",
    ),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
) -> None:
    """Register a device: prints its MQTT and download credentials once (JSON). An id that is
    already registered is refused unless --rotate-credentials."""
    body = {
        "device_id": device_id,
        "groups": group,
        "tags": tag,
        "rotate_credentials": rotate_credentials,
    }
    print_json(api_call(url, token, "POST", "/api/v1/devices", json=body))


enroll_token_app = typer.Typer(
    help="One-time enrollment tokens for `edgefleet agent enroll`.", no_args_is_help=True
)
devices_app.add_typer(enroll_token_app, name="enroll-token")


@enroll_token_app.command("create")
def enroll_token_create(
    group: str = typer.Option(..., "--group", help="The group the enrolled device joins."),
    ttl: int = typer.Option(3600, "--ttl", min=1, max=30 * 24 * 3600, help="Seconds valid."),
    device_id: str = typer.Option(
        None, "--device-id", help="Only this device id may enroll with the token."
    ),
    tag: list[str] = typer.Option([], "--tag", help="A tag the device gets (repeatable)."),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Create a one-time, expiring enrollment token (admin); prints only the token (efe_…),
    or with --json the token and its id, group, device id and expiry."""
    body: dict[str, object] = {"group": group, "ttl_s": ttl, "tags": tag}
    if device_id:
        body["device_id"] = device_id
    out = api_call(url, token, "POST", "/api/v1/enroll-tokens", json=body)
    if as_json:
        print_json(out)
        return
    typer.echo(out["token"])


@devices_app.command("revoke")
def devices_revoke(
    device_id: str,
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Cut a device off: its certificates are revoked (the broker reloads the CRL), its broker
    session is closed, its password and download token stop working, its desired state is
    withdrawn. It can enroll again with a new token."""
    out = api_call(url, token, "POST", f"/api/v1/devices/{device_id}/revoke")
    if as_json:
        print_json(out)
        return
    console.print(f"revoked {device_id}")
    for step in out.get("steps", []):
        console.print(f"  {step}")
