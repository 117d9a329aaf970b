"""`edgefleet devices`: list, show and register devices through the controller's API."""

from __future__ import annotations

import typer
from rich.table import Table

from edgefleet.cloud_controller.cli.client import (
    JSON_OPT,
    TOKEN_OPT,
    URL_OPT,
    api_call,
    console,
    print_json,
)

devices_app = typer.Typer(help="The device inventory.", no_args_is_help=True)


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
        print_json(rows)
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
    print_json(api_call(url, token, "GET", f"/api/v1/devices/{device_id}"))


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
    print_json(api_call(url, token, "POST", "/api/v1/devices", json=body))
