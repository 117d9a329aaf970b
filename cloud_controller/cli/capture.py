"""`edgefleet capture`: capture on demand (docs/capture.md) through the controller's API.

``start`` prints the capture id alone (``--json``: the whole capture), so that a script can
write ``ID=$(edgefleet capture start …)``. ``export`` writes the packager's .npz files and
checks each against the sha256 the controller recorded for the dataset."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import typer
from rich.table import Table

from edgefleet.cloud_controller.cli.client import (
    JSON_OPT,
    TOKEN_OPT,
    URL_OPT,
    Exit,
    api_call,
    comma_list,
    console,
    err,
    print_json,
    usage_error,
)

capture_app = typer.Typer(
    help="Capture a sample of field inputs and outputs as a dataset.", no_args_is_help=True
)


@capture_app.command("start")
def capture_start(
    model: str = typer.Argument(..., help="Model name."),
    devices: str = typer.Option(None, "--devices", help="Comma-separated device ids."),
    group: str = typer.Option(None, "--group", help="Every device of this group."),
    rows: int = typer.Option(..., "--rows", help="Rows wanted in all (split over devices)."),
    sample_rate: float = typer.Option(0.1, "--sample-rate", help="Fraction of requests."),
    max_rows_per_minute: int = typer.Option(60, "--max-rows-per-minute"),
    hours: float = typer.Option(24.0, "--hours", help="The capture ends after this."),
    drift_event: int = typer.Option(None, "--drift-event", help="The drift event it answers."),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Start a capture; prints its id."""
    devs = comma_list(devices)
    if bool(devs) == bool(group):
        raise usage_error("give either --devices or --group")
    body: dict[str, object] = {
        "model": model,
        "rows": rows,
        "sample_rate": sample_rate,
        "max_rows_per_minute": max_rows_per_minute,
        "hours": hours,
    }
    if devs:
        body["devices"] = devs
    else:
        body["group"] = group
    if drift_event is not None:
        body["drift_event_id"] = drift_event
    out = api_call(url, token, "POST", "/api/v1/captures", json=body)
    if as_json:
        print_json(out)
    else:
        typer.echo(out["id"])


@capture_app.command("show")
def capture_show(
    capture_id: str = typer.Argument(...),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """State, rows per device, refusals, datasets."""
    c = api_call(url, token, "GET", f"/api/v1/captures/{capture_id}")
    if as_json:
        print_json(c)
        return
    console.print(
        f"{c['id']} {c['model']} [bold]{c['state']}[/bold]: {c['rows']}/{c['rows_wanted']} rows,"
        f" {c['bytes']} bytes, until {c['until']}"
        + (f", drift event {c['drift_event_id']}" if c.get("drift_event_id") else "")
    )
    t = Table("device", "rows", "bytes", "forbidden", "done", "refused")
    for dev, st in sorted(c["per_device"].items()):
        refused = ", ".join(f"{k} {v}" for k, v in sorted((st.get("refused") or {}).items()))
        t.add_row(
            dev, str(st.get("rows", 0)), str(st.get("bytes", 0)),
            "yes" if st.get("forbidden") else "", st.get("done") or "", refused,
        )  # fmt: skip
    console.print(t)
    for d in c.get("datasets", []):
        console.print(
            f"dataset {d['id']} v{d['version']} {d['part']}: {d['rows']} rows {d['sha256']}"
        )


@capture_app.command("list")
def capture_list(
    model: str = typer.Option(None, "--model"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Captures, newest first."""
    rows = api_call(
        url, token, "GET", "/api/v1/captures", params={"model": model} if model else None
    )
    if as_json:
        print_json(rows)
        return
    t = Table("id", "model", "state", "rows", "devices", "created", "by")
    for c in rows:
        t.add_row(
            c["id"], c["model"], c["state"], f"{c['rows']}/{c['rows_wanted']}",
            str(len(c["devices"])), c["created_at"][:19], c["created_by"],
        )  # fmt: skip
    console.print(t)


@capture_app.command("stop")
def capture_stop(
    capture_id: str = typer.Argument(...),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stop a capture: its devices are told, what was stored stays."""
    c = api_call(url, token, "POST", f"/api/v1/captures/{capture_id}/stop")
    if as_json:
        print_json(c)
    else:
        console.print(f"{c['id']}: {c['state']}, {c['rows']} rows")


def _download(url: str | None, token: str | None, ds: dict[str, object], out: Path) -> None:
    import httpx

    base = (url or "http://127.0.0.1:8400").rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        r = httpx.get(f"{base}/api/v1/datasets/{ds['id']}/npz", headers=headers, timeout=120)
    except httpx.HTTPError as e:
        err.print(f"[red]cannot reach {base}: {e}[/red]")
        raise typer.Exit(Exit.UNREACHABLE) from e
    if r.status_code >= 400:
        err.print(f"[red]{r.status_code}: {r.text[:300]}[/red]")
        raise typer.Exit(Exit.REFUSED)
    if hashlib.sha256(r.content).hexdigest() != ds["sha256"]:
        err.print(f"[red]dataset {ds['id']}: the download does not match its sha256[/red]")
        raise typer.Exit(Exit.REFUSED)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(r.content)
    os.replace(tmp, out)  # never a half-written .npz under the asked name


@capture_app.command("export")
def capture_export(
    capture_id: str = typer.Argument(...),
    out: Path = typer.Option(..., "--out", help="Calibration .npz to write."),
    holdout: float = typer.Option(0.0, "--holdout", help="Fraction held out for validation."),
    holdout_out: Path = typer.Option(None, "--holdout-out", help="Validation .npz to write."),
    seed: int = typer.Option(0, "--seed"),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Export as the packager's .npz files (arrays by model input name, the device's outputs
    as ``output:NAME``); records a versioned dataset and prints its id and sha256."""
    if (holdout > 0) != (holdout_out is not None):
        raise usage_error("--holdout and --holdout-out go together")
    parts = api_call(
        url,
        token,
        "POST",
        f"/api/v1/captures/{capture_id}/export",
        json={"holdout": holdout, "seed": seed},
    )
    files = {"calibration": out, "holdout": holdout_out}
    for ds in parts:
        target = files.get(ds["part"])
        if target is not None:
            _download(url, token, ds, target)
            ds["file"] = str(target)
    if as_json:
        print_json(parts)
        return
    for ds in parts:
        typer.echo(
            f"{ds['id']} {ds['sha256']} {ds['part']} v{ds['version']} {ds['rows']} rows {ds.get('file', '')}"
        )
