"""Quantization backends: who turns a recipe into a quantized model.

``ort`` (ONNX Runtime's own quantization tools, :mod:`edgefleet.packager.quantize`) is always
present. Vendor toolkits are optional, each behind its own extra so that no default install pulls
torch; a recipe names its backend (``backend = "nncf"`` in a profile's candidate table) and the
packager falls back to ``ort`` when the backend's extra is not installed, saying so in the report.

A backend module ``edgefleet.packager.backends.<name>`` provides a module-level ``BACKEND``
object satisfying :class:`Backend`. Modules are imported only when a recipe asks for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgefleet.packager.recipe import Recipe

#: Backend name -> (module, the extra that installs what it needs).
KNOWN: dict[str, tuple[str, str]] = {
    "nncf": ("edgefleet.packager.backends.nncf", "nncf"),
    "quark": ("edgefleet.packager.backends.quark", "quark"),
    "aimet": ("edgefleet.packager.backends.aimet", "aimet"),
}


class BackendUnavailable(RuntimeError):
    """The backend cannot run here; the message says why (usually: its extra is not installed)."""


class Backend(Protocol):
    """One quantization toolkit."""

    name: str
    extra: str

    def unavailable(self) -> str | None:
        """Why this backend cannot run here (``None`` when it can); must not raise."""
        ...

    def build(
        self,
        recipe: Recipe,
        *,
        source: Path,
        prepared: Path,
        out: Path,
        calibration: Mapping[str, np.ndarray],
        external: bool,
    ) -> tuple[Path, dict[str, Any]]:
        """Write the quantized model to ``out``; return it and what was done (for the manifest)."""
        ...


def get(name: str) -> Backend:
    """The backend called ``name``; raises :class:`BackendUnavailable` when it cannot run here."""
    if name not in KNOWN:
        raise BackendUnavailable(f"unknown backend {name!r} (known: {sorted(KNOWN)})")
    module, extra = KNOWN[name]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(
            f"backend {name!r} needs the '{extra}' extra (pip install 'edgefleet[{extra}]'): {exc}"
        ) from exc
    backend: Backend = mod.BACKEND
    reason = backend.unavailable()
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} cannot run here: {reason}")
    return backend
