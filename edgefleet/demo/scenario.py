"""The story `edgefleet demo` plays on a `Fleet`, and what it prints.

It packages the example model twice (1.0.0, and 1.1.0 whose device latency gate no gateway can
meet), starts the fleet, rolls 1.0.0 out in three waves (succeeds), then 1.1.0 (the first wave
fails on the devices' own benchmark, the rollout aborts and every moved device is set back to
1.0.0). It returns the JSON summary and prints a per-device table.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgefleet.demo.fleet import Fleet
from edgefleet.demo.rollouts import outcome, rollout_body
from edgefleet.demo.spec import BAD, GOOD, MODEL_NAME, FleetSpec
from edgefleet.harness import sigterm_as_interrupt


def run_demo(
    devices: int,
    broker: str,
    workdir: Path | None,
    console: Console,
) -> dict[str, Any]:
    """The whole demo; returns the JSON summary. The fleet is closed on every exit path, and
    the work directory removed unless the caller named one."""
    started = time.monotonic()
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))

    def say(msg: str) -> None:
        console.print(f"[dim]{time.monotonic() - started:5.1f}s[/dim] {msg}")

    fleet = Fleet(FleetSpec(root, devices=devices, broker=broker), say)
    try:
        with sigterm_as_interrupt():
            fleet.make_keys()
            say("packaging the example model (packager pipeline): 1.0.0 good, 1.1.0 bad")
            packages = fleet.build_packages()
            fleet.start_controller()
            fleet.register_devices()
            fleet.start_broker()
            fleet.start_agents()
            for path in packages.values():
                pkg = fleet.upload(path)
                say(f"uploaded {path.name} (sha256 {str(pkg.get('sha256', ''))[:12]}…)")
            fleet.wait_online()
            say(f"{devices} devices online")
            ids = fleet.spec.device_ids()
            results = []
            for version, label in ((GOOD, "good"), (BAD, "bad")):
                rid = fleet.create_rollout(rollout_body(version, ids))
                say(f"rollout {rid}: {MODEL_NAME} {version} ({label}) in waves 20/60/100 %")
                detail = fleet.wait_rollout(
                    rid, on_change=lambda d: console.print(progress_line(d))
                )
                say(
                    f"rollout {rid}: [bold]{detail['phase']}[/bold]"
                    + (f" — {detail['reason']}" if detail.get("reason") else "")
                )
                results.append(outcome(detail))
            installed = fleet.installed()
            summary = {
                "workdir": str(root),
                "broker": broker,
                "elapsed_s": round(time.monotonic() - started, 1),
                "rollouts": results,
                "installed": installed,
            }
            print_table(console, results, installed)
            return summary
    finally:
        fleet.close()
        if workdir is None:
            shutil.rmtree(root, ignore_errors=True)


def progress_line(detail: Mapping[str, Any]) -> str:
    """One line per change of a rollout's phase, wave or counts."""
    states = detail["counts"].get("states", {})
    parts = " · ".join(f"{k} {v}" for k, v in sorted(states.items()))
    rb = detail["counts"].get("rollback_requested", 0)
    extra = f" · rollback {detail['counts'].get('rolled_back', 0)}/{rb}" if rb else ""
    return (
        f"  {detail['model']} {detail['version']}: {detail['phase']}"
        f" wave {int(detail['wave']) + 1}/{len(detail['waves'])} — {parts}{extra}"
    )


def print_table(
    console: Console, results: list[dict[str, Any]], installed: Mapping[str, Any]
) -> None:
    """Devices down, one column per rollout, then the version each serves now."""
    table = Table(title="edgefleet demo: per-device outcome")
    table.add_column("device")
    for r in results:
        table.add_column(f"{r['version']} ({r['phase']})")
    table.add_column("serving now")
    by_dev: dict[str, list[str]] = {}
    for r in results:
        for d in r["devices"]:
            cell = d["state"] + (f" ({d['reason_code']})" if d.get("reason_code") else "")
            if d.get("rollback"):
                cell += f", rollback {d['rollback']}"
            by_dev.setdefault(d["device_id"], []).append(cell)
    for dev in sorted(by_dev):
        table.add_row(dev, *by_dev[dev], str(installed.get(dev)))
    console.print(table)
