"""Command-line commands of this component (registered on the root `edgefleet` app)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this component's commands to the root app."""
