"""Host latency benchmark: p50/p95 of single-sample inference, bounded in runs and time."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p95_ms: float
    runs: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    sess: Any,
    inputs: Mapping[str, np.ndarray],
    *,
    runs: int = 200,
    max_seconds: float = 2.0,
    warmup: int = 5,
) -> Latency:
    """Time ``runs`` single-sample runs (fewer if ``max_seconds`` passes first)."""
    names = [i.name for i in sess.get_inputs()]
    feed = {k: np.ascontiguousarray(inputs[k][:1]) for k in names}
    for _ in range(warmup):
        sess.run(None, feed)
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    ms = np.asarray(times) * 1000.0
    return Latency(float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), len(times))


def measure_interleaved(
    sessions: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    *,
    rounds: int = 12,
    per_round: int = 5,
    max_seconds: float = 6.0,
    warmup: int = 3,
) -> dict[str, Latency]:
    """Time several models in turns: each round runs every model ``per_round`` single-sample
    times, starting one model later each round, so that a change of load on a shared host falls
    on all of them alike (timed one after the other, a load peak during one model's turn decides
    a ranking by a few percent). Stops after ``max_seconds`` once every model ran a round."""
    names = list(sessions)
    feeds = {
        n: {i.name: np.ascontiguousarray(inputs[i.name][:1]) for i in sessions[n].get_inputs()}
        for n in names
    }
    for n in names:
        for _ in range(warmup):
            sessions[n].run(None, feeds[n])
    times: dict[str, list[float]] = {n: [] for n in names}
    deadline = time.perf_counter() + max_seconds
    for r in range(max(1, rounds)):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            sess, feed = sessions[n], feeds[n]
            for _ in range(max(1, per_round)):
                start = time.perf_counter()
                sess.run(None, feed)
                times[n].append(time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    out: dict[str, Latency] = {}
    for n, t in times.items():
        ms = np.asarray(t) * 1000.0
        out[n] = Latency(float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), len(t))
    return out


def cpu_flags() -> list[str]:
    """The CPU features that decide INT8 speed (VNNI, AMX, AVX-512, NEON dot product)."""
    interesting = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return sorted(interesting & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def host_info(threads: int) -> dict[str, Any]:
    """Where the host benchmark ran."""
    import onnxruntime as ort

    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "onnxruntime": ort.__version__,
        "threads": threads,
    }
