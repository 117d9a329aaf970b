"""VALIDATING: the package's samples against the recorded outputs, then an on-device benchmark,
both judged against the manifest's gates. `sample_tolerances`, `sample_agreement` and `judge` are
pure."""

from __future__ import annotations

import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from edgefleet.agent.sessions import OrtSession
from edgefleet.wire.message import JsonObject
from edgefleet.wire.reasons import ReasonCode

#: Sample tolerances used when the manifest's gates do not set them (a set 0.0 stays 0.0).
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_MIN_AGREEMENT = 1.0
MAX_CHUNK = 64


@dataclass
class Figures:
    """What VALIDATING measured; goes into the FAILED/ACTIVATING event as `figures`."""

    samples: int = 0
    agreement: float = 0.0
    max_abs_error: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    runs: int = 0
    memory_growth_mb: float = 0.0
    providers: list[str] = field(default_factory=list)
    cpu_fallback_used: bool = False

    def to_dict(self) -> JsonObject:
        """The figures as JSON, floats rounded to 4 places (journal, events, install record)."""
        return {
            "samples": self.samples,
            "agreement": round(self.agreement, 4),
            "max_abs_error": round(self.max_abs_error, 4),
            "p50_ms": round(self.p50_ms, 4),
            "p95_ms": round(self.p95_ms, 4),
            "runs": self.runs,
            "memory_growth_mb": round(self.memory_growth_mb, 4),
            "providers": [*self.providers],
            "cpu_fallback_used": self.cpu_fallback_used,
        }


@dataclass(frozen=True)
class GateFailure:
    code: ReasonCode  # SAMPLE_MISMATCH | LATENCY_GATE | MEMORY_GATE
    reason: str


def sample_tolerances(gates: Mapping[str, object]) -> tuple[float, float]:
    """(atol, rtol) for the samples: the manifest's gates, the defaults only where a gate is unset.

    A gate of 0.0 is a real value (every shipped CPU profile asks for ``sample_rtol = 0.0``), not
    an absent one.
    """
    return _gate(gates, "sample_atol", DEFAULT_ATOL), _gate(gates, "sample_rtol", DEFAULT_RTOL)


def _gate(gates: Mapping[str, object], key: str, default: float) -> float:
    value = _opt_gate(gates, key)
    return default if value is None else value


def _opt_gate(gates: Mapping[str, object], key: str) -> float | None:
    """The gate as a float, None when unset; ValueError when it is not a number."""
    value = gates.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"gate {key} is {value!r}, not a number")
    return float(value)


def sample_agreement(
    expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], atol: float, rtol: float
) -> tuple[float, float, int]:
    """(fraction of samples whose every output agrees, max abs error, sample count), pure.

    Integer and boolean outputs must be equal; float outputs within atol + rtol*|expected|.
    """
    n = min(len(v) for v in expected.values()) if expected else 0
    if n == 0:
        return 0.0, 0.0, 0
    ok = np.ones(n, dtype=bool)
    max_err = 0.0
    for name, exp in expected.items():
        got = actual.get(name)
        if got is None or got.shape != exp.shape:
            return 0.0, float("inf"), n
        e = exp.reshape(n, -1)
        g = got.reshape(n, -1)
        if np.issubdtype(e.dtype, np.floating) or np.issubdtype(g.dtype, np.floating):
            e64, g64 = e.astype(np.float64), g.astype(np.float64)
            diff = np.abs(g64 - e64)
            if diff.size:
                max_err = max(max_err, float(np.nanmax(diff)))
            ok &= np.all(diff <= atol + rtol * np.abs(e64), axis=1)
        else:
            ok &= np.all(e == g, axis=1)
    return float(ok.mean()), max_err, n


def judge(figures: Figures, gates: Mapping[str, object]) -> GateFailure | None:
    """The first gate the figures fail, or None (pure). The gates are numbers or null
    (`edgefleet.wire.manifest` checked them at install)."""
    min_agree = _gate(gates, "min_sample_agreement", DEFAULT_MIN_AGREEMENT)
    if figures.agreement < min_agree:
        return GateFailure(
            ReasonCode.SAMPLE_MISMATCH,
            f"{figures.agreement:.1%} of {figures.samples} samples agree with the recorded outputs"
            f" (max abs error {figures.max_abs_error:.3g}), the gate needs {min_agree:.1%}",
        )
    max_p95 = _opt_gate(gates, "max_p95_ms")
    if max_p95 is not None and figures.p95_ms > max_p95:
        return GateFailure(
            ReasonCode.LATENCY_GATE,
            f"p95 latency {figures.p95_ms:.3f} ms on this device exceeds the gate {max_p95} ms"
            f" (p50 {figures.p50_ms:.3f} ms over {figures.runs} runs)",
        )
    max_mem = _opt_gate(gates, "max_memory_mb")
    if max_mem is not None and figures.memory_growth_mb > max_mem:
        return GateFailure(
            ReasonCode.MEMORY_GATE,
            f"memory growth {figures.memory_growth_mb:.1f} MB exceeds the gate {max_mem} MB",
        )
    return None


#: Decompressed bytes of every array in samples.npz together (see docs/limits.md).
MAX_SAMPLES_BYTES = 256 * 1024 * 1024
MAX_SAMPLES_MEMBERS = 1024


class SamplesRejected(ValueError):
    """samples.npz is not a bounded archive of plain arrays (a zip bomb, a lie, a pickle)."""


class _Capped:
    """A member's stream that refuses to yield more than the size its zip entry declares."""

    def __init__(self, f: IO[bytes], limit: int, name: str) -> None:
        self.f, self.left, self.name = f, limit, name

    def read(self, n: int = -1) -> bytes:
        want = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(want)
        self.left -= len(data)
        if self.left == 0 and n != 0 and self.f.read(1):
            raise SamplesRejected(f"{self.name} holds more than its declared size")
        return data


def _read_npy(f: _Capped, name: str) -> np.ndarray:
    """One .npy member, its header checked against its zip entry's declared size before the
    array is allocated."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise SamplesRejected(f"{name}: npy format {version} is not supported")
    except (ValueError, OSError) as e:
        raise SamplesRejected(f"{name} is not an npy array: {e}") from e
    if dtype.hasobject:
        raise SamplesRejected(f"{name} holds Python objects (pickles are not loaded)")
    count = 1
    for d in shape:
        count *= int(d)
    nbytes = count * dtype.itemsize
    if nbytes != f.left:
        raise SamplesRejected(
            f"{name} declares {list(shape)} {dtype} ({nbytes} bytes) but its entry holds"
            f" {f.left} bytes after the header"
        )
    arr = np.empty(count, dtype=dtype)
    view = arr.view(np.uint8).reshape(-1).data if nbytes else memoryview(bytearray())
    got = 0
    while got < nbytes:
        chunk = f.read(min(1 << 20, nbytes - got))
        if not chunk:
            raise SamplesRejected(f"{name} is truncated")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return arr.reshape(shape, order="F" if fortran else "C")


def load_samples(
    path: str | Path | IO[bytes], max_bytes: int = MAX_SAMPLES_BYTES
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) from samples.npz (`input:NAME`, `output:NAME`).

    Nothing is decompressed before the sizes the zip's central directory declares are checked
    against ``max_bytes``; each member is then read capped at its declared size, and each
    array's own header must agree with it before the array is allocated (a zip bomb, or a
    header that lies, is refused with `SamplesRejected`)."""
    arrays: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_SAMPLES_MEMBERS:
                raise SamplesRejected(f"samples.npz has {len(infos)} members")
            declared = sum(i.file_size for i in infos)
            if declared > max_bytes:
                raise SamplesRejected(
                    f"samples.npz declares {declared} bytes decompressed, over the"
                    f" {max_bytes} limit"
                )
            for info in infos:
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise SamplesRejected(f"samples.npz member {info.filename!r} is not .npy")
                with zf.open(info) as raw:
                    f = _Capped(raw, info.file_size, info.filename)
                    arrays[info.filename[:-4]] = _read_npy(f, info.filename)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as e:
        raise SamplesRejected(f"samples.npz is not a valid archive: {e}") from e
    inputs = {k[6:]: v for k, v in arrays.items() if k.startswith("input:")}
    outputs = {k[7:]: v for k, v in arrays.items() if k.startswith("output:")}
    return inputs, outputs


def _batch_size(session: OrtSession, n: int) -> int:
    dims = [i.shape[0] if i.shape else None for i in session.get_inputs()]
    fixed = [d for d in dims if isinstance(d, int) and d > 0]
    return fixed[0] if fixed else min(n, MAX_CHUNK)


def run_samples(
    session: OrtSession, inputs: dict[str, np.ndarray], output_names: list[str]
) -> dict[str, np.ndarray]:
    """Outputs for the samples, batched as the model allows (whole batches only)."""
    n = min(len(v) for v in inputs.values())
    bs = _batch_size(session, n)
    usable = (n // bs) * bs
    if usable == 0:
        raise ValueError(f"{n} samples cannot fill one batch of {bs}")
    parts: list[list[np.ndarray]] = [[] for _ in output_names]
    for start in range(0, usable, bs):
        feed = {k: v[start : start + bs] for k, v in inputs.items()}
        for i, o in enumerate(session.run(output_names, feed)):
            parts[i].append(np.asarray(o))
    return {name: np.concatenate(p, axis=0) for name, p in zip(output_names, parts, strict=True)}


def benchmark(
    session: OrtSession, inputs: dict[str, np.ndarray], runs: int, warmup: int, max_seconds: float
) -> tuple[float, float, int]:
    """(p50 ms, p95 ms, runs done) of single-batch inference, bounded in count and time."""
    bs = _batch_size(session, 1)
    feed = {k: v[:bs] for k, v in inputs.items()}
    deadline = time.monotonic() + max_seconds
    for _ in range(warmup):
        session.run(None, feed)
        if time.monotonic() > deadline:
            break
    times = []
    for _ in range(max(runs, 1)):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1000.0)
        if time.monotonic() > deadline:
            break
    arr = np.asarray(times)
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 95)), len(times)
