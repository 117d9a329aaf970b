"""What every controller command shares: the consoles, the `--url`/`--token`/`--json` options
and `api_call`, the HTTP client of the controller's API (httpx is imported only when called).

`edgefleet drift` uses them too.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

URL_OPT = typer.Option(None, "--url", envvar="EDGEFLEET_URL", help="Controller URL.")
TOKEN_OPT = typer.Option(None, "--token", envvar="EDGEFLEET_TOKEN", help="API token.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON.")


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


def print_json(data: Any) -> None:
    """Pretty-print an API answer as JSON on stdout."""
    console.print_json(json.dumps(data, default=str))


def comma_list(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None or blank -> ``[]``."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]
