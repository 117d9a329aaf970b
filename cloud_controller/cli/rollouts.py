"""`edgefleet rollout`: create, list, show (live with ``--watch``) and steer staged rollouts."""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from edgefleet.cloud_controller.cli.client import (
    JSON_OPT,
    TOKEN_OPT,
    URL_OPT,
    api_call,
    comma_list,
    console,
    err,
    print_json,
)
from edgefleet.cloud_controller.rollout_types import TERMINAL_PHASES

rollout_app = typer.Typer(help="Staged rollouts.", no_args_is_help=True)


def _progress_table(r: dict[str, Any]) -> Table:
    c = r["counts"]
    title = f"rollout {r['id']}: {r['model']} {r['version']} — {r['phase']}"
    if r.get("paused"):
        title += " (paused)"
    t = Table(title=title)
    for col in ("wave", "size", "pending", "in progress", "retry", "ok", "failed", "timed out"):
        t.add_column(col, justify="right")
    for i, w in enumerate(c["waves"]):
        mark = "▶ " if i == r["wave"] and r["phase"] not in TERMINAL_PHASES else ""
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
        while r["phase"] not in TERMINAL_PHASES and time.monotonic() < deadline:
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
        wave_list = [float(w) for w in comma_list(waves)]
        approvals = [int(w) - 1 for w in comma_list(approve_before)]
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
        print_json(r)
    elif not watch:
        console.print(_progress_table(r))
    if r["phase"] in ("aborted", "cancelled") and watch:
        raise typer.Exit(3)


@rollout_app.command("list")
def rollout_list(url: str = URL_OPT, token: str = TOKEN_OPT, as_json: bool = JSON_OPT) -> None:
    """Rollouts, newest first."""
    rows = api_call(url, token, "GET", "/api/v1/rollouts")
    if as_json:
        print_json(rows)
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
        print_json(r)
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
