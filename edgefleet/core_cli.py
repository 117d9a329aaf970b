"""Core commands: ``keys generate``, ``verify``, ``inspect`` (no quantization stack, no web server).

Top floor: only `edgefleet.cli` registers it. It needs nothing but core (`edgefleet.keys`,
`edgefleet.wire`), imported inside the commands, which is what a gateway can afford.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

keys_app = typer.Typer(help="Signing keys (ECDSA P-256).", no_args_is_help=True)


@keys_app.command("generate")
def keys_generate(
    out: Path = typer.Option(..., "--out", help="Directory for NAME.key and NAME.pub."),
    name: str = typer.Option("edgefleet", "--name", help="File stem of the key pair."),
    passphrase_env: str | None = typer.Option(
        None,
        "--passphrase-env",
        help="Encrypt the private key with the passphrase held in this environment variable.",
    ),
) -> None:
    """Generate an ECDSA P-256 key pair and print its key id."""
    from edgefleet.keys import KeyError_, generate_keypair, passphrase_from_env

    try:
        kp = generate_keypair(out, name, passphrase_from_env(passphrase_env))
    except KeyError_ as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    typer.echo(f"key id {kp.key_id}")
    typer.echo(f"private {kp.private_path}")
    typer.echo(f"public  {kp.public_path}")


def verify(
    package: Path = typer.Argument(..., help="The .efpkg file."),
    trust: list[Path] = typer.Option(
        ..., "--trust", help="A trusted public key (PEM); repeatable."
    ),
    revoked: list[str] = typer.Option([], "--revoked", help="A revoked key id; repeatable."),
    profile: list[str] = typer.Option([], "--profile", help="Accept only these profiles."),
    max_bytes: int | None = typer.Option(None, "--max-bytes", help="Largest package accepted."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Verify a package's signature, members and manifest. Exit 0, or 1 with the reason."""
    from edgefleet.keys import KeyError_, load_public_key
    from edgefleet.wire.package import RejectError, VerifyPolicy, verify_package

    try:
        keys = [load_public_key(p) for p in trust]
    except KeyError_ as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    policy = VerifyPolicy(keys, revoked_key_ids=set(revoked), profiles=profile or None)
    if max_bytes is not None:
        policy.max_package_bytes = max_bytes
    try:
        v = verify_package(package, policy)
    except RejectError as e:
        if as_json:
            typer.echo(json.dumps({"ok": False, "package": str(package), **e.to_dict()}))
        else:
            typer.echo(f"REJECTED {package.name}: {e.code.value}: {e.message}", err=True)
        raise typer.Exit(1) from e
    m = v.manifest
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": True,
                    "package": str(package),
                    "name": m["name"],
                    "version": m["version"],
                    "profile": m["profile"],
                    "key_id": v.key_id,
                    "members": v.member_digests,
                }
            )
        )
    else:
        typer.echo(
            f"OK {package.name}: {m['name']} {m['version']} ({m['profile']}) signed by {v.key_id[:16]}"
        )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def inspect(
    package: Path = typer.Argument(..., help="The .efpkg file."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Show a package's manifest, profile, sizes, validation and benchmark (nothing verified)."""
    from edgefleet.wire.package import RejectError, read_manifest

    try:
        m = read_manifest(package)
    except RejectError as e:
        typer.echo(f"error: {e.code.value}: {e.message}", err=True)
        raise typer.Exit(1) from e
    if as_json:
        typer.echo(json.dumps(m, indent=2, sort_keys=True))
        return
    console = Console()
    t = Table(title=f"{package.name} (unverified: use `edgefleet verify`)", show_header=False)
    for field in ("name", "version", "profile", "created", "expires", "min_agent_version"):
        t.add_row(field, _fmt(m.get(field)))
    t.add_row(
        "execution providers",
        ", ".join(ep.get("name", "?") for ep in m.get("execution_providers", [])),
    )
    t.add_row("cpu fallback", _fmt(m.get("cpu_fallback")))
    for name, info in sorted((m.get("members") or {}).items()):
        t.add_row(
            f"member {name}", f"{info.get('size')} bytes sha256 {str(info.get('sha256'))[:16]}…"
        )
    recipe = (m.get("quantization") or {}).get("recipe")
    t.add_row("quantization", _fmt(recipe))
    for section in ("validation", "benchmark", "gates", "lineage"):
        for k, v in sorted((m.get(section) or {}).items()):
            if not isinstance(v, dict | list):
                t.add_row(f"{section}.{k}", _fmt(v))
    console.print(t)


def register(app: typer.Typer) -> None:
    """Add the core commands to the root app."""
    app.add_typer(keys_app, name="keys")
    app.command("verify")(verify)
    app.command("inspect")(inspect)
