"""`edgefleet drift show MODEL [--device D] [--json]` (calls the controller's API).

Exit codes (`cloud_controller.cli.client.Exit`): 0 no drift (or not enough data), 3 drift, 1 the
API refused, 2 usage error, 4 unreachable.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table

from edgefleet.cloud_controller.cli.client import (
    EXIT_CODES_HELP,
    JSON_OPT,
    TOKEN_OPT,
    URL_OPT,
    Exit,
    api_call,
    console,
)

DRIFT_EXIT = Exit.DRIFT
drift_app = typer.Typer(
    help="Data drift and field health of models.", no_args_is_help=True, epilog=EXIT_CODES_HELP
)


def register(app: typer.Typer) -> None:
    """Add `drift` to the root app."""
    app.add_typer(drift_app, name="drift")


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _out_of_range(f: dict[str, Any]) -> str:
    """'outside/checked' where the range was counted, '-' otherwise."""
    if f.get("p_range") is None:
        return "-"
    bad = sum(int(f.get(k, 0)) for k in ("below", "above", "nan", "inf"))
    return f"{bad}/{f.get('range_checked')}"


def _detects(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    shift, share = d.get("min_shift_std"), d.get("min_out_of_range")
    if shift is None and share is None:
        return "-"
    return f"{'-' if shift is None else format(shift, '.2g') + 'σ'} {_fmt(share, '.1%')}"


@drift_app.command("show")
def show(
    model: str = typer.Argument(..., help="Model name."),
    device: str | None = typer.Option(None, "--device", help="One device instead of the fleet."),
    hours: float = typer.Option(24.0, "--hours", help="Window: the last N hours."),
    as_json: bool = JSON_OPT,
    url: str | None = URL_OPT,
    token: str | None = TOKEN_OPT,
) -> None:
    """Drift per feature and output of MODEL: PSI, JS distance, KS, adjusted p-value."""
    params: dict[str, Any] = {"hours": hours}
    if device:
        params["device"] = device
    doc = api_call(url, token, "GET", f"/api/v1/drift/{model}", params=params)
    if as_json:
        typer.echo(json.dumps(doc, indent=2, sort_keys=True))
        raise typer.Exit(DRIFT_EXIT if doc.get("status") == "drift" else 0)
    where = f"device {device}" if device else "fleet"
    colour = {"drift": "red", "ok": "green"}.get(doc.get("status", ""), "yellow")
    console.print(
        f"[bold]{model}[/bold] ({where}, last {hours:g} h, n={doc.get('n', 0)}, "
        f"versions {', '.join(doc.get('versions', [])) or '-'}): "
        f"[{colour}]{doc.get('status')}[/{colour}] — {doc.get('reason', '')}"
    )
    feats = doc.get("features", [])
    if feats:
        t = Table(
            "feature",
            "role",
            "n",
            "PSI",
            "JS",
            "KS",
            "outside",
            "p (adj.)",
            "drift",
            "detects",
        )
        for f in sorted(feats, key=lambda f: f["p_adjusted"]):
            t.add_row(
                f["name"],
                f["role"],
                str(f["n"]),
                _fmt(f["psi"]),
                _fmt(f["js"]),
                _fmt(f["ks"]),
                _out_of_range(f),
                _fmt(f["p_adjusted"], ".2g"),
                "[red]yes[/red]" if f["drifted"] else "no",
                _detects(f.get("detectability")),
            )
        console.print(t)
        n = doc.get("n", 0)
        console.print(
            "outside: live values outside the reference range (below, above, NaN, inf) of those "
            f"checked; detects: the smallest mean shift (σ: reference std) and share of values "
            f"out of range seen with 80 % power in a window of {n}"
        )
    for w in doc.get("reference_warnings") or []:
        console.print(f"[yellow]reference:[/yellow] {w}")
    evs = doc.get("events", [])
    if evs:
        console.print(f"{len(evs)} recent drift event(s); latest: {evs[0]['reason']}")
    raise typer.Exit(DRIFT_EXIT if doc.get("status") == "drift" else 0)
