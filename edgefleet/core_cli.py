"""Core commands: keys, verify, inspect (no quantization stack, no web server)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the core commands to the root app."""
