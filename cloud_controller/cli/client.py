"""What every controller command shares: the consoles, the `--url`/`--token`/`--json` options,
the exit codes, and `api_call`, the HTTP client of the controller's API (httpx is imported only
when called).

`edgefleet drift` uses them too.
"""

from __future__ import annotations

import json
import sys
from enum import IntEnum
from typing import Any

import typer
from rich.console import Console


class Exit(IntEnum):
    """The exit codes of every command that talks to the controller (one meaning each)."""

    OK = 0
    REFUSED = 1  # the API refused the request (its reason code is printed)
    USAGE = 2  # a bad command line or option value
    DRIFT = 3  # `drift show`: the model drifts
    UNREACHABLE = 4  # the controller could not be reached
    FAILED = 5  # the rollout ended without success (aborted, cancelled, a rollback failed)
    NOT_FINISHED = 6  # `--watch`: the rollout was still going when --watch-timeout ran out


EXIT_CODES_HELP = (
    "Exit codes: 0 ok; 1 refused by the API (reason code printed); 2 usage error; "
    "3 drift (drift show); 4 controller unreachable; 5 rollout failed (aborted, cancelled or "
    "a rollback failed); 6 still running when --watch-timeout ran out."
)

# Piped or redirected output is for scripts: tables are never cut or wrapped to 80 columns
# (ids and names stay whole on one line); on a terminal they fit its width.
console = Console(width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True)


def usage_error(message: str) -> typer.Exit:
    """Print a usage error (code first) and return the exit to raise."""
    err.print(f"[red]{message}[/red]")
    return typer.Exit(Exit.USAGE)


URL_OPT = typer.Option(None, "--url", envvar="EDGEFLEET_URL", help="Controller URL.")
TOKEN_OPT = typer.Option(None, "--token", envvar="EDGEFLEET_TOKEN", help="API token.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON.")


def api_call(url: str | None, token: str | None, method: str, path: str, **kw: Any) -> Any:
    """Call the controller's API (used by every CLI group that talks to it).

    Exits `Exit.REFUSED` with the server's reason code when it refuses, `Exit.UNREACHABLE`
    when it cannot be reached."""
    import httpx

    base = (url or "http://127.0.0.1:8400").rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers.update(kw.pop("headers", None) or {})
    try:
        r = httpx.request(method, base + path, headers=headers, timeout=120, **kw)
    except httpx.HTTPError as e:
        err.print(f"[red]cannot reach {base}: {e}[/red]")
        raise typer.Exit(Exit.UNREACHABLE) from e
    if r.status_code >= 400:
        try:
            detail = r.json().get("detail")
        except ValueError:
            detail = r.text
        if isinstance(detail, dict):
            err.print(f"[red]{r.status_code} {detail.get('code')}: {detail.get('message')}[/red]")
        else:
            err.print(f"[red]{r.status_code}: {detail}[/red]")
        raise typer.Exit(Exit.REFUSED)
    return r.json()


def print_json(data: Any) -> None:
    """Pretty-print an API answer as JSON on stdout."""
    console.print_json(json.dumps(data, default=str))


def comma_list(value: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; None or blank -> ``[]``."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]
