"""`edgefleet demo`: the command line around `scenario.run_demo`.

Ctrl-C and SIGTERM stop every child process and exit 130; any failure exits 1 with its reason
in one line; an unexpected rollout outcome exits 1. ``--json`` prints the summary on stdout and
the progress on stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

from edgefleet.demo.scenario import run_demo


def demo(
    devices: int | None = typer.Option(
        None, "--devices", min=1, max=50, help="Agent processes (default 5; 4 with --loop)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print each rollout's final state and per-device outcomes."
    ),
    broker: str = typer.Option("amqtt", "--broker", help="amqtt (embedded) or mosquitto."),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Keep everything here (default: a temp dir, removed)."
    ),
    loop: bool = typer.Option(
        False,
        "--loop",
        help="Instead: drift on half the devices -> capture -> retrain -> staged rollout -> "
        "drift back to normal (4 devices unless --devices says otherwise).",
    ),
    iterations: int = typer.Option(1, "--iterations", min=1, max=5, help="Loop iterations."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="With --loop: shorter windows, shadow and packaging benchmark (same steps, same "
        "gates; what the CI test runs).",
    ),
) -> None:
    """Run a whole fleet on this machine: a good rollout, then a bad one that rolls back
    (or, with --loop, the drift -> capture -> retrain -> rollout loop)."""
    if broker not in ("amqtt", "mosquitto"):
        raise typer.BadParameter("choose amqtt or mosquitto", param_hint="--broker")
    console = Console(stderr=as_json)
    # Warnings (the packager's, ONNX Runtime's) through the demo's console, in one format: left
    # alone, the first would go to logging's last resort and the rest to the root handler that
    # ONNX Runtime's quantizer installs by calling logging.warning().
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_time=False, show_path=False)],
    )
    try:
        if loop:
            from edgefleet.demo.loop import PROFILES, run_loop

            profile = PROFILES["quick" if quick else "default"]
            summary = run_loop(devices or 4, broker, workdir, console, iterations, profile)
        else:
            summary = run_demo(devices or 5, broker, workdir, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every child process was stopped[/yellow]")
        raise typer.Exit(130) from None
    except Exception as e:  # every child is already stopped; say why in one line
        from rich.markup import escape

        console.print(f"[red]demo failed:[/red] {type(e).__name__}: {escape(str(e))}")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    if loop:
        return  # run_loop raises when a step fails or drift does not return to normal
    ok = [r["phase"] for r in summary["rollouts"]] == ["succeeded", "aborted"]
    if not ok:
        console.print("[red]unexpected rollout outcome[/red]")
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `edgefleet demo` to the root app."""
    app.command("demo")(demo)
