"""`edgefleet packages`: upload .efpkg files to the controller's registry and list them."""

from __future__ import annotations

from pathlib import Path

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

packages_app = typer.Typer(help="Packages in the controller's registry.", no_args_is_help=True)


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
        print_json(results)


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
        print_json(rows)
        return
    t = Table("id", "name", "version", "profile", "size", "sha256", "uploaded by")
    for p in rows:
        t.add_row(
            str(p["id"]), p["name"], p["version"], p["profile"], str(p["size"]),
            p["sha256"][:12], p["uploaded_by"],
        )  # fmt: skip
    console.print(t)
