"""`edgefleet rollout`: create, list, show (live with ``--watch``) and steer staged rollouts.

Rollout ids may be given by a unique prefix. Exit codes: `client.Exit`.
"""

from __future__ import annotations

import time
from typing import Any

import typer
from rich.live import Live
from rich.table import Table

from edgefleet.cloud_controller.cli.client import (
    EXIT_CODES_HELP,
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
from edgefleet.cloud_controller.rollout_types import (
    ABORT_MIN_FLOOR,
    ABORT_MIN_PCT,
    DEFAULT_RETRIES,
    TERMINAL_PHASES,
    OnAbort,
)

rollout_app = typer.Typer(help="Staged rollouts.", no_args_is_help=True, epilog=EXIT_CODES_HELP)


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
    if c.get("rollback_failed"):
        foot += f", [bold red]ROLLBACK FAILED on {c['rollback_failed']}[/bold red]"
    if r.get("reason"):
        foot += f" — {r['reason']}"
    t.caption = foot
    return t


def _devices_table(r: dict[str, Any], everyone: bool) -> Table | None:
    """Devices that need a look (not succeeded, or a rollback under way or failed); all of
    them with `everyone`."""
    rows = [
        d
        for d in r.get("devices", [])
        if everyone
        or d.get("rollback") in ("requested", "failed")
        or d.get("state") not in ("succeeded", "skipped", "pending")
    ]
    if not rows:
        return None
    t = Table("device", "wave", "state", "attempts", "agent state", "rollback", "reason")
    # the loud ones first: failed rollbacks, then failures, then the rest
    rank = {"failed": 0, "timed_out": 1, "waiting_retry": 2, "in_progress": 3}
    rows.sort(key=lambda d: (d.get("rollback") != "failed", rank.get(d["state"], 4)))
    if not everyone and len(rows) > 50:
        t.caption = f"{len(rows) - 50} more: --devices or --json lists them all"
        rows = rows[:50]
    for d in rows:
        rb = d.get("rollback") or "-"
        if rb == "failed":
            rb = f"[bold red]FAILED[/bold red] {d.get('rollback_reason') or ''}".rstrip()
        why = ": ".join(str(x) for x in (d.get("reason_code"), d.get("reason")) if x)
        t.add_row(
            d["device_id"], str(d["wave"] + 1) if d["wave"] >= 0 else "-", d["state"],
            str(d.get("attempts", 0)), d.get("agent_state") or "-", rb, why or "-",
        )  # fmt: skip
    return t


def _shadow_table(r: dict[str, Any]) -> Table | None:
    """The shadow evidence: each judged wave, then each device's newest figures."""
    sh = r.get("shadow")
    if not sh:
        return None
    t = Table(
        "wave/device", "compared", "agreement", "serving p95 ms", "candidate p95 ms",
        "p95 ratio", "errors", "dropped", "verdict", title="shadow",
    )  # fmt: skip

    def num(v: object, fmt: str = "{:.4g}") -> str:
        return fmt.format(v) if isinstance(v, int | float) else "-"

    for w in sh.get("waves", []):
        t.add_row(
            f"wave {w['wave'] + 1}", str(w.get("compared", 0)), num(w.get("agreement")), "-",
            "-", num(w.get("p95_ratio")), str(w.get("candidate_errors", 0)),
            str(w.get("dropped", 0)), str(w.get("verdict")),
        )  # fmt: skip
    for d in sh.get("devices", []):
        t.add_row(
            f"  {d['device_id']}", str(d["compared"]), num(d.get("agreement")),
            num(d.get("serving_p95_ms")), num(d.get("candidate_p95_ms")),
            num(d.get("p95_ratio")), str(d.get("candidate_errors", 0)),
            str(d.get("dropped", 0)), "",
        )  # fmt: skip
    return t


def _outcome(r: dict[str, Any]) -> int:
    """The exit code for a rollout as last seen."""
    if r["phase"] not in TERMINAL_PHASES:
        return Exit.NOT_FINISHED
    if r["phase"] != "succeeded" or (r.get("counts") or {}).get("rollback_failed"):
        return Exit.FAILED
    return Exit.OK


def _watch(url: str | None, token: str | None, rollout_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    r = api_call(url, token, "GET", f"/api/v1/rollouts/{rollout_id}")
    with Live(_progress_table(r), console=console, refresh_per_second=4) as live:
        while r["phase"] not in TERMINAL_PHASES and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            r = api_call(url, token, "GET", f"/api/v1/rollouts/{r['id']}")
            live.update(_progress_table(r))
    if r["phase"] not in TERMINAL_PHASES:
        err.print(f"[yellow]rollout {r['id']} still {r['phase']} after {timeout:g}s[/yellow]")
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
    retries: int = typer.Option(
        DEFAULT_RETRIES, "--retries", help="Retries of a device after a transient failure."
    ),
    backoff: float = typer.Option(30, "--backoff", help="First retry delay (doubles)."),
    success: float = typer.Option(100, "--success-threshold", help="% of a wave to pass it."),
    abort_pct: float = typer.Option(20, "--abort-failures", help="Abort over this % failed..."),
    abort_min: int = typer.Option(
        None,
        "--abort-min",
        help=f"...of max(finished, this many) devices. Default: max({ABORT_MIN_FLOOR}, "
        f"{ABORT_MIN_PCT:g} % of the planned devices), so one noisy device in a small group "
        "cannot abort.",
    ),
    on_abort: OnAbort = typer.Option(
        OnAbort.HALT,
        "--on-abort",
        help="After an abort, devices that took the release: halt (keep it; the default) or "
        "rollback (back to their previous version). An abort always stops the spread.",
    ),
    remove_first_installs: bool = typer.Option(
        False,
        "--remove-first-installs",
        help="Let a rollback uninstall the model where it was a first install.",
    ),
    approve_before: str = typer.Option(
        None, "--approve-before", help="Waves (1-based) that wait for approval, e.g. 2,3."
    ),
    rate: int = typer.Option(None, "--rate", help="Devices per minute."),
    soak: float = typer.Option(0, "--soak", help="Seconds of soak after each wave."),
    max_p95_ratio: float = typer.Option(
        None,
        "--max-p95-ratio",
        help="Serving p95 of the new version over the previous one's: the agents' probation "
        "gate and the soak gate.",
    ),
    max_error_rate: float = typer.Option(None, "--max-error-rate"),
    max_drift: float = typer.Option(None, "--max-drift"),
    seed: int = typer.Option(None, "--seed", help="Wave membership seed (random if absent)."),
    shadow: bool = typer.Option(
        False,
        "--shadow",
        help="Run each wave in shadow first: devices load the release beside the serving "
        "version and mirror live requests to it; the wave is promoted or the release dropped "
        "on the figures (docs/shadow.md).",
    ),
    shadow_requests: int = typer.Option(
        200, "--shadow-requests", help="Compared requests each device of a wave must reach."
    ),
    shadow_min_agreement: float = typer.Option(
        0.99, "--shadow-min-agreement", help="Share of compared requests that must agree."
    ),
    shadow_max_p95_ratio: float = typer.Option(
        1.5, "--shadow-max-p95-ratio", help="Candidate/serving per-sample p95, at most."
    ),
    shadow_sample: float = typer.Option(
        1.0, "--shadow-sample", help="Share of live requests mirrored (0-1]."
    ),
    shadow_timeout: float = typer.Option(
        900, "--shadow-timeout", help="Seconds from a wave's first dispatch to its verdict."
    ),
    shadow_window: float = typer.Option(10, "--shadow-window", help="Report interval, s."),
    watch: bool = typer.Option(False, "--watch", help="Show live progress until it ends."),
    watch_timeout: float = typer.Option(
        3600, "--watch-timeout", help="Seconds to watch; still running then: exit 6."
    ),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Start a staged rollout of a release to devices, groups and tags.

    With --watch it exits 0 when the rollout succeeded, 5 when it was aborted or cancelled (or
    a rollback failed), 6 when it is still running after --watch-timeout.
    """
    try:
        wave_list = [float(w) for w in comma_list(waves)]
        approvals = [int(w) - 1 for w in comma_list(approve_before)]
    except ValueError as e:
        raise usage_error(f"invalid_spec: {e}") from e
    if not (device or group or tag):
        raise usage_error("invalid_spec: give --device, --group or --tag")
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
        "on_abort": on_abort.value,
        "remove_first_installs": remove_first_installs,
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
    if shadow:
        body["shadow"] = {
            "requests": shadow_requests,
            "min_agreement": shadow_min_agreement,
            "max_p95_ratio": shadow_max_p95_ratio,
            "sample": shadow_sample,
            "timeout_s": shadow_timeout,
            "window_s": shadow_window,
        }
    r = api_call(url, token, "POST", "/api/v1/rollouts", json=body)
    if watch:
        r = _watch(url, token, r["id"], watch_timeout)
    if as_json:
        print_json(r)
    elif not watch:
        console.print(_progress_table(r))
    if watch:
        raise typer.Exit(_outcome(r))


@rollout_app.command("list")
def rollout_list(url: str = URL_OPT, token: str = TOKEN_OPT, as_json: bool = JSON_OPT) -> None:
    """Rollouts, newest first."""
    rows = api_call(url, token, "GET", "/api/v1/rollouts")
    if as_json:
        print_json(rows)
        return
    t = Table(
        "id", "model", "version", "phase", "wave", "ok", "failed", "rolled back",
        "rollback failed", "created", "by",
    )  # fmt: skip
    for r in rows:
        c = r.get("counts") or {}
        st = c.get("states", {})
        rbf = c.get("rollback_failed", 0)
        t.add_row(
            r["id"], r["model"], r["version"], r["phase"], str((r.get("wave") or 0) + 1),
            str(st.get("succeeded", 0)), str(st.get("failed", 0) + st.get("timed_out", 0)),
            f"{c.get('rolled_back', 0)}/{c.get('rollback_requested', 0)}"
            if c.get("rollback_requested") else "-",
            f"[bold red]{rbf}[/bold red]" if rbf else "0",
            r["created_at"][:19], r["created_by"],
        )  # fmt: skip
    console.print(t)


@rollout_app.command("show")
def rollout_show(
    rollout_id: str,
    watch: bool = typer.Option(False, "--watch", help="Live until it ends (exit codes below)."),
    watch_timeout: float = typer.Option(3600, "--watch-timeout"),
    all_devices: bool = typer.Option(False, "--devices", help="List every device."),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """A rollout's progress per wave (live with --watch), its devices that need a look
    (failed, timed out, rolling back, rollback failed) and events. ID may be a unique prefix."""
    if watch:
        r = _watch(url, token, rollout_id, watch_timeout)
    else:
        r = api_call(url, token, "GET", f"/api/v1/rollouts/{rollout_id}")
    if as_json:
        print_json(r)
    else:
        if not watch:
            console.print(_progress_table(r))
        devs = _devices_table(r, all_devices)
        if devs is not None:
            console.print(devs)
        shadow = _shadow_table(r)
        if shadow is not None:
            console.print(shadow)
        for e in r.get("events", [])[-15:]:
            when = time.strftime("%H:%M:%S", time.localtime(e["at"]))
            console.print(f"  {when} {e['message']}", markup=False)
    if watch:
        raise typer.Exit(_outcome(r))


def _control(
    action: str,
    rollout_id: str,
    url: str | None,
    token: str | None,
    as_json: bool = False,
    **body: Any,
) -> None:
    r = api_call(url, token, "POST", f"/api/v1/rollouts/{rollout_id}/{action}", json=body)
    if as_json:
        print_json(r)
    else:
        console.print(_progress_table(r))


@rollout_app.command("approve")
def rollout_approve(
    rollout_id: str,
    wave: int = typer.Option(
        None, "--wave", help="Wave number (1-based); default the waiting one."
    ),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Approve the wave that waits (or a later --wave ahead of time); refused when there is
    nothing to approve."""
    wave_index = None if wave is None else wave - 1
    _control("approve", rollout_id, url, token, as_json, wave=wave_index)


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: str, url: str = URL_OPT, token: str = TOKEN_OPT, as_json: bool = JSON_OPT
) -> None:
    """Stop dispatching (devices already asked keep going)."""
    _control("pause", rollout_id, url, token, as_json)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: str, url: str = URL_OPT, token: str = TOKEN_OPT, as_json: bool = JSON_OPT
) -> None:
    """Continue a paused rollout."""
    _control("resume", rollout_id, url, token, as_json)


@rollout_app.command("cancel")
def rollout_cancel(
    rollout_id: str,
    rollback: bool = typer.Option(False, "--rollback", help="Also revert moved devices."),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Stop the rollout for good."""
    _control("cancel", rollout_id, url, token, as_json, rollback=rollback)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: str,
    reason: str = typer.Option("aborted by operator", "--reason"),
    on_abort: OnAbort = typer.Option(
        None, "--on-abort", help="halt or rollback; default: the rollout's own --on-abort."
    ),
    url: str = URL_OPT,
    token: str = TOKEN_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Abort: no device gets the release from now on; devices that took it keep it (halt)
    or go back to their previous version (rollback)."""
    mode = on_abort.value if on_abort is not None else None
    _control("abort", rollout_id, url, token, as_json, reason=reason, on_abort=mode)
