"""Lineage of a package: where the model and data came from."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

from edgefleet.packager.examples import file_sha256


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD of the git repository containing ``cwd`` (None outside one or without git)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def model_sha256(model: Path) -> str:
    """sha256 of the model file, folding in its external data files when there are any."""
    from edgefleet.packager.quantize import external_files

    digest = file_sha256(model)
    files = external_files(model)
    if not files:
        return digest
    h = hashlib.sha256(digest.encode())
    for f in files:
        h.update(f"\n{f.name}:{file_sha256(f)}".encode())
    return h.hexdigest()


def lineage(
    model: Path,
    calibration: Path,
    validation: Path,
    *,
    git_commit_value: str | None,
    training_run: str | None,
) -> dict[str, Any]:
    """The manifest's ``lineage`` section."""
    cal, val = file_sha256(calibration), file_sha256(validation)
    return {
        "source_sha256": model_sha256(model),
        "git_commit": git_commit_value if git_commit_value is not None else git_commit(),
        "training_run": training_run,
        "data_sha256": hashlib.sha256(f"calibration:{cal}\nvalidation:{val}".encode()).hexdigest(),
        "calibration_sha256": cal,
        "validation_sha256": val,
    }
