"""Packager commands: ``example-models``, ``profiles list|show``, ``package``.

Only typer, rich and the standard library are imported here; the quantization stack is imported
inside the commands.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2

profiles_app = typer.Typer(
    help="Hardware profiles (hardware_profiles/*.toml).", no_args_is_help=True
)


def _err(message: str) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def example_models(
    out: Path = typer.Option(..., "--out", help="Directory for the models and their data."),
    as_json: bool = typer.Option(False, "--json", help="Print the paths as JSON."),
) -> None:
    """Build the example models (digits MLP, digits CNN) with calibration/validation data, offline."""
    from edgefleet.packager.examples import build_examples

    built = build_examples(out)
    if as_json:
        typer.echo(json.dumps({k: v.to_dict() for k, v in built.items()}, indent=2))
        return
    table = Table(title=f"example models in {out}")
    for col in ("name", "model", "calibration", "validation", "what"):
        table.add_column(col)
    for m in built.values():
        table.add_row(m.name, str(m.model), str(m.calibration), str(m.validation), m.description)
    Console().print(table)


@profiles_app.command("list")
def profiles_list(
    directory: Path | None = typer.Option(None, "--dir", help="Profiles directory."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """List the hardware profiles."""
    from edgefleet.packager.profiles import ProfileError, load_profiles

    try:
        profiles = load_profiles(directory)
    except ProfileError as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if as_json:
        typer.echo(json.dumps([p.to_dict() for p in profiles.values()], indent=2))
        return
    table = Table(title="hardware profiles")
    for col in ("id", "providers", "candidates", "gate", "cpu fallback"):
        table.add_column(col)
    for p in profiles.values():
        g = p.accuracy_gate
        table.add_row(
            p.id,
            ", ".join(p.provider_names),
            "\n".join(c.id for c in p.candidates),
            f"agree >= {g.min_agreement}, drop <= {g.max_accuracy_drop}",
            "yes" if p.cpu_fallback else "no",
        )
    Console().print(table)


@profiles_app.command("show")
def profiles_show(
    profile_id: str = typer.Argument(..., help="Profile id or path to a .toml file."),
    directory: Path | None = typer.Option(None, "--dir", help="Profiles directory."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show one hardware profile in full."""
    from edgefleet.packager.profiles import ProfileError, get_profile

    try:
        profile = get_profile(profile_id, directory)
    except ProfileError as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if as_json:
        typer.echo(json.dumps(profile.to_dict(), indent=2))
        return
    console = Console()
    console.print(f"[bold]{profile.id}[/]: {profile.description}", highlight=False)
    console.print_json(json.dumps(profile.to_dict()))


def _render(report: Any, console: Console) -> None:
    src = report.source
    table = Table(title=f"{report.name} {report.version} (source p50 {src['p50_ms']:.3f} ms)")
    for col in (
        "profile",
        "status",
        "recipe",
        "backend",
        "agreement (95% CI)",
        "hard inputs",
        "cosine",
        "accuracy",
        "p50 ms",
        "x FP32",
        "size x",
        "measured on",
    ):
        table.add_column(col)
    off = False
    for p in report.profiles:
        where = p.validated_on.replace("ExecutionProvider", "")
        if p.off_target:
            off = True
            where = (
                f"[yellow]{where}* (not {p.target_provider.replace('ExecutionProvider', '')})[/]"
            )
        if p.ok and p.metrics and p.latency and p.size_bytes:
            m = p.metrics
            lo, hi = m.agreement_ci95
            acc = f"{m.accuracy:.4f}" if m.accuracy is not None else "-"
            hard = (
                f"{m.hard.agreeing}/{m.hard.samples}"
                if m.hard is not None and m.hard.samples
                else "-"
            )
            cos = f"{m.cosine_mean:.4f}" if m.cosine_mean is not None else "-"
            backend = p.backend or "ort"
            if p.backend_note:
                backend += " (fallback)"
            speed = f"{src['p50_ms'] / p.latency.p50_ms:.2f}" + ("*" if p.off_target else "")
            table.add_row(
                p.profile,
                "[green]packaged[/]",
                p.chosen or "",
                backend,
                f"{m.agreement:.4f} ({lo:.3f}-{hi:.3f})",
                hard,
                cos,
                acc,
                f"{p.latency.p50_ms:.3f}" + ("*" if p.off_target else ""),
                speed,
                f"{p.size_bytes / src['size_bytes']:.2f}",
                where,
            )
        else:
            table.add_row(p.profile, f"[red]{p.status}[/]", *[""] * 9, where)
    console.print(table)
    kind = src.get("output_kind")
    if kind:
        how = next((p.metrics.output_kind_how for p in report.profiles if p.metrics), "")
        console.print(
            f"  agreement judged as {kind}" + (f" ({how})" if how else ""), highlight=False
        )
    if off:
        console.print(
            "  * measured on the packaging host's provider, not the profile's own: these figures do"
            " not predict the target; accelerator candidates are ranked by the cost model"
            " (fewest FP32 compute nodes, then size), not by this latency.",
            highlight=False,
        )
    for p in report.profiles:
        if p.package:
            console.print(f"  {p.profile}: {p.package}", highlight=False)
        if p.backend_note:
            console.print(f"  {p.profile}: backend {p.backend_note}", highlight=False)
        for c in p.candidates:
            if c.skipped is not None:
                console.print(
                    f"  {p.profile}: {c.candidate} not built: {c.skipped}", highlight=False
                )
            if c.fp32_nodes and c.chosen:
                names = ", ".join(n["node"] for n in c.fp32_nodes)
                console.print(
                    f"  {p.profile}: {len(c.fp32_nodes)} node(s) kept in FP32 ({names})",
                    highlight=False,
                )
        for w in p.warnings:
            console.print(f"[yellow]  {p.profile}: {w}[/]", highlight=False)
        if p.failure:
            console.print(f"[red]  {p.profile}: {p.failure['reason']}[/]", highlight=False)
            closest = p.failure.get("closest_candidate")
            for g in p.failure.get("gates", []):
                console.print(
                    f"    {closest}: gate {g['gate']} required {g['required']}, "
                    f"measured {g['measured']:.4f}, margin {g['margin']:+.4f}",
                    highlight=False,
                )
            for u in p.failure.get("unresolved", []):
                need = u.get("samples_needed")
                console.print(
                    f"    {closest}: {u['samples']} samples cannot resolve {u['gate']}"
                    + (f"; about {need} would" if need else ""),
                    highlight=False,
                )
            for cand, error in p.failure.get("errors", {}).items():
                console.print(f"    {cand}: {error}", highlight=False)
            for cand, why in p.failure.get("refused", {}).items():
                console.print(f"    {cand}: refused: {why}", highlight=False)


def package(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, help="Source ONNX model."),
    name: str = typer.Option(..., "--name", help="Model name."),
    version: str = typer.Option(..., "--version", help="Semantic version of this release."),
    profile: list[str] = typer.Option(
        [], "--profile", help="Profile id or path to a profile .toml (repeatable)."
    ),
    all_profiles: bool = typer.Option(False, "--all-profiles", help="Every shipped profile."),
    calibration: Path = typer.Option(..., "--calibration", exists=True, dir_okay=False),
    validation: Path = typer.Option(..., "--validation", exists=True, dir_okay=False),
    key: Path = typer.Option(..., "--key", exists=True, dir_okay=False, help="Private key PEM."),
    key_passphrase_env: str | None = typer.Option(
        None, "--key-passphrase-env", help="Environment variable holding the key passphrase."
    ),
    out: Path = typer.Option(..., "--out", help="Directory for the .efpkg files."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable report on stdout."),
    git_commit: str | None = typer.Option(None, "--git-commit", help="Default: HEAD of cwd."),
    training_run: str | None = typer.Option(None, "--training-run", help="Training run id."),
    expires_days: float | None = typer.Option(None, "--expires-days", min=0.0),
    bench_runs: int = typer.Option(200, "--bench-runs", min=1, help="Timed runs per model."),
    bench_seconds: float = typer.Option(2.0, "--bench-seconds", min=0.01),
    threads: int = typer.Option(1, "--threads", min=1, help="ORT intra-op threads to time with."),
    external_data: bool = typer.Option(
        False, "--external-data", help="Store weights as external data even for small models."
    ),
    strict: bool = typer.Option(
        False,
        "--strict",
        help="Refuse a package whose gates the validation set is too small to resolve.",
    ),
    output_kind: str | None = typer.Option(
        None,
        "--output-kind",
        help="How agreement is judged: classes, binary, map, sequence, ctc or values "
        "(default: the validation file's output_kind, else inferred from the output shapes).",
    ),
    output_name: str | None = typer.Option(
        None, "--output-name", help="The output to judge (default: the first that fits)."
    ),
    output_threshold: float | None = typer.Option(
        None, "--output-threshold", help="Decision threshold for binary and map outputs (0.5)."
    ),
) -> None:
    """Quantize, validate, benchmark and sign MODEL for each hardware profile.

    Exit status: 0 when every profile was packaged, 1 when a profile failed its gate (it writes
    no package; with --strict, also when the validation set cannot resolve a gate), 2 for bad
    input.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from edgefleet.packager.evaluate import Judging, JudgingError
    from edgefleet.packager.pipeline import PackagingError, package_model
    from edgefleet.packager.profiles import ProfileError, load_profiles

    if bool(profile) == all_profiles:
        _err("give --profile ID (repeatable) or --all-profiles, not both or neither")
        raise typer.Exit(EXIT_BAD_INPUT)
    passphrase = None
    if key_passphrase_env:
        passphrase = os.environ.get(key_passphrase_env)
        if passphrase is None:
            _err(f"environment variable {key_passphrase_env} is not set")
            raise typer.Exit(EXIT_BAD_INPUT)
    stderr = Console(stderr=True)
    try:
        ids: list[str] = list(load_profiles()) if all_profiles else profile
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[step]}"),
            TimeElapsedColumn(),
            console=stderr,
            transient=as_json,
        ) as bar:
            tasks: dict[str, Any] = {}

            def on_progress(pid: str, message: str, done: int, total: int) -> None:
                if pid not in tasks:
                    tasks[pid] = bar.add_task(pid, total=total, step="")
                bar.update(tasks[pid], completed=done, total=total, step=message)

            report = package_model(
                model,
                name=name,
                version=version,
                profiles=ids,
                calibration=calibration,
                validation=validation,
                key=key,
                key_passphrase=passphrase,
                out_dir=out,
                git_commit=git_commit,
                training_run=training_run,
                expires_days=expires_days,
                bench_runs=bench_runs,
                bench_seconds=bench_seconds,
                threads=threads,
                force_external_data=external_data,
                progress=on_progress,
                strict=strict,
                judging=Judging(output_kind, output_name, output_threshold),
            )
    except (PackagingError, ProfileError, JudgingError) as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        _render(report, Console())
    if not report.ok:
        raise typer.Exit(EXIT_GATE_FAILED)


def register(app: typer.Typer) -> None:
    """Add the packager's commands to the root app."""
    app.command("example-models")(example_models)
    app.command("package")(package)
    app.add_typer(profiles_app, name="profiles")
