"""Telemetry windows and record builders (no threads, no outbox).

Records (the outbox adds ``id``)::

    {"at", "kind": "system", "cpu_percent", "load_1m", "memory": {...}, "disk": {...},
     "temperature_c": {sensor: celsius} | null}
    {"at", "kind": "agent", "uptime_s", "models": {name: version}, "updates": {outcome: n},
     "outbox": {"pending", "bytes", "dropped", ...}}
    {"at", "kind": "inference", "model", "version", "window_start", "window_end",
     "requests", "errors", "latency_ms": {"p50", "p95", "p99", "max"},
     "latency_hist": [counts per edgefleet.drift.latency bucket]}
    {"at", "kind": "sketch", "model", "version", "window_start", "window_end",
     "sketch": Sketch.to_dict()}   # with "range" counts (below/above/NaN/inf) where the
                                   # reference records its features' observed ranges
    {"at", "kind": "sample", "model", "version", "inputs": {...}}   # only when sampling is on
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.drift import latency as lat
from edgefleet.drift.sketch import Sketch
from edgefleet.wire.message import now_iso

RESERVOIR = 4096


@dataclass
class InferenceWindow:
    """Requests, errors and latencies of one model version in one window."""

    model: str
    version: str
    start: str = field(default_factory=now_iso)
    requests: int = 0
    errors: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * lat.NBUCKETS)
    reservoir: list[float] = field(default_factory=list)
    max_ms: float = 0.0
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def observe(self, latency_s: float, ok: bool) -> None:
        ms = latency_s * 1000.0
        self.requests += 1
        if not ok:
            self.errors += 1
            return
        self.hist[lat.bucket_of(ms)] += 1
        self.max_ms = max(self.max_ms, ms)
        ok_count = self.requests - self.errors
        if len(self.reservoir) < RESERVOIR:
            self.reservoir.append(ms)
        else:
            j = self._rng.randrange(ok_count)
            if j < RESERVOIR:
                self.reservoir[j] = ms

    def record(self, end: str) -> dict[str, Any]:
        qs: dict[str, float | None] = {"p50": None, "p95": None, "p99": None, "max": None}
        if self.reservoir:
            arr = np.asarray(self.reservoir)
            qs = {
                "p50": float(np.quantile(arr, 0.5)),
                "p95": float(np.quantile(arr, 0.95)),
                "p99": float(np.quantile(arr, 0.99)),
                "max": self.max_ms,
            }
        return {
            "at": end,
            "kind": "inference",
            "model": self.model,
            "version": self.version,
            "window_start": self.start,
            "window_end": end,
            "requests": self.requests,
            "errors": self.errors,
            "latency_ms": qs,
            "latency_hist": list(self.hist),
        }


@dataclass
class SketchWindow:
    """Live data of one model version counted into its reference's bins."""

    model: str
    version: str
    sketch: Sketch
    start: str = field(default_factory=now_iso)
    pending: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = field(default_factory=list)
    pending_rows: int = 0
    pending_bytes: int = 0

    def add(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> int:
        """Buffer one request's tensors (cheap); returns rows buffered so far."""
        self.pending.append((dict(inputs), dict(outputs)))
        first = next(iter(inputs.values()), None)
        self.pending_rows += int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1
        self.pending_bytes += sum(int(getattr(v, "nbytes", 0)) for v in inputs.values())
        return self.pending_rows

    def flush(self) -> None:
        """Count buffered requests in one vectorised pass per tensor."""
        if not self.pending:
            return
        batch, self.pending, self.pending_rows, self.pending_bytes = self.pending, [], 0, 0
        names_in = batch[0][0].keys()
        names_out = batch[0][1].keys()
        try:
            ins = {k: np.concatenate([np.atleast_1d(b[0][k]) for b in batch]) for k in names_in}
            outs = {k: np.concatenate([np.atleast_1d(b[1][k]) for b in batch]) for k in names_out}
        except (KeyError, ValueError):  # requests of different shapes: count one by one
            for i, o in batch:
                self.sketch.update(i, o)
            return
        self.sketch.update(ins, outs)

    def record(self, end: str) -> dict[str, Any]:
        self.flush()
        return {
            "at": end,
            "kind": "sketch",
            "model": self.model,
            "version": self.version,
            "window_start": self.start,
            "window_end": end,
            "sketch": self.sketch.to_dict(),
        }


def system_record(data_dir: Path | None) -> dict[str, Any]:
    """CPU, load, memory, disk and temperatures (where the hardware reports them)."""
    import os

    import psutil

    vm = psutil.virtual_memory()
    rec: dict[str, Any] = {
        "at": now_iso(),
        "kind": "system",
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory": {"total_mb": vm.total / 2**20, "used_mb": vm.used / 2**20, "percent": vm.percent},
        "disk": None,
        "temperature_c": None,
    }
    if data_dir is not None and Path(data_dir).exists():
        du = psutil.disk_usage(str(data_dir))
        rec["disk"] = {
            "total_mb": du.total / 2**20,
            "free_mb": du.free / 2**20,
            "percent": du.percent,
        }
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is not None:
        try:
            temps = sensors()
        except Exception:  # some kernels expose broken hwmon entries
            temps = {}
        flat = {
            f"{chip}/{t.label or i}": float(t.current)
            for chip, entries in temps.items()
            for i, t in enumerate(entries)
        }
        rec["temperature_c"] = flat or None
    return rec


def sample_record(
    model: str, version: str, inputs: Mapping[str, np.ndarray], rng: random.Random, rate: float
) -> dict[str, Any] | None:
    """Raw inputs of one request, kept with probability ``rate`` (only when sampling is on)."""
    if rate <= 0 or rng.random() >= rate:
        return None
    return {
        "at": now_iso(),
        "kind": "sample",
        "model": model,
        "version": version,
        "inputs": {k: np.asarray(v).tolist() for k, v in inputs.items()},
    }
