"""What the vendor backends share: whether their distributions are installed, calibration
samples one at a time, and silencing a toolkit's progress output (the report says what ran)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
from collections.abc import Iterator, Mapping

import numpy as np


def missing(dists: tuple[str, ...], extra: str) -> str | None:
    """Why a backend cannot run (the first of ``dists`` not installed), or None."""
    for dist in dists:
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} is not installed (pip install 'edgefleet[{extra}]')"
    return None


def one_by_one(calibration: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """The calibration set as single-sample feeds (samples on axis 0 of every input)."""
    names = list(calibration)
    n = len(calibration[names[0]])
    return [{k: calibration[k][i : i + 1] for k in names} for i in range(n)]


@contextlib.contextmanager
def quiet(logger: str | None, *, stderr: bool = True) -> Iterator[None]:
    """``logger`` (the root logger for None) at ERROR, stdout (and stderr) swallowed."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            if stderr:
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            yield
    finally:
        log.setLevel(level)
