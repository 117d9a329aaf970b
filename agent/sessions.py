"""Serving sessions, one slot per model name.

A swap replaces the slot's model under a lock: requests already running hold a reference to the
old model and finish on it, new ones get the new model. When two sessions would not fit in
memory the swap unloads first and holds new requests in a bounded queue during the gap.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from edgefleet.agent import manifest_parts
from edgefleet.agent.config import ProbationConfig, SwapConfig
from edgefleet.wire.message import JsonObject
from edgefleet.wire.reasons import ReasonCode

_ONNX_TO_NP: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


class NodeArg(Protocol):
    """An `onnxruntime.NodeArg`: one input or output of a session (a dimension may be a name)."""

    @property
    def name(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def shape(self) -> Sequence[int | str | None] | None: ...


class OrtSession(Protocol):
    """What the agent uses of an `onnxruntime.InferenceSession` (ORT ships no type information,
    so this is what mypy checks our calls against)."""

    def get_inputs(self) -> Sequence[NodeArg]: ...

    def get_outputs(self) -> Sequence[NodeArg]: ...

    def get_providers(self) -> Sequence[str]: ...

    def run(
        self, output_names: Sequence[str] | None, input_feed: Mapping[str, np.ndarray], /
    ) -> list[object]:
        """One value per output: an array, or a list of maps for a sequence output."""
        ...


class ModelNotFound(LookupError):
    """No such model (or version) is being served."""


class ServerBusy(RuntimeError):
    """The hold queue of a swap gap is full or the wait timed out."""


class BadInput(ValueError):
    """The request's tensors do not fit the model's inputs."""


class ModelError(RuntimeError):
    """The model failed while running (counts as an error in probation)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type[np.generic]  # numpy scalar type (np.object_ for strings)
    shape: tuple[int | None, ...]
    onnx_type: str


@dataclass
class Stats:
    """Requests seen by one loaded version (probation reads these)."""

    requests: int = 0
    errors: int = 0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_ms: float, ok: bool) -> None:
        with self.lock:
            self.requests += 1
            if ok:
                self.latencies_ms.append(latency_ms)
            else:
                self.errors += 1

    def snapshot(self) -> tuple[int, int, list[float]]:
        with self.lock:
            return self.requests, self.errors, list(self.latencies_ms)


class LoadedModel:
    """One version's ONNX Runtime session and what is known about it."""

    def __init__(
        self,
        name: str,
        version: str,
        model_dir: Path,
        manifest: JsonObject,
        providers: list[str],
        session_options: object = None,  # an onnxruntime.SessionOptions, passed through
    ) -> None:
        import onnxruntime as ort

        self.name = name
        self.version = version
        self.model_dir = model_dir
        self.manifest = manifest
        opts = manifest_parts.provider_options(manifest)
        provs: list[str | tuple[str, JsonObject]] = [
            (p, opts[p]) if opts.get(p) else p for p in providers
        ]
        model_file = model_dir / manifest_parts.model_file(manifest)
        self.session: OrtSession = ort.InferenceSession(
            str(model_file), sess_options=session_options, providers=provs
        )
        self.providers = list(self.session.get_providers())
        self.inputs = [self._spec(i) for i in self.session.get_inputs()]
        self.outputs = [self._spec(o) for o in self.session.get_outputs()]
        self.input_by_name = {s.name: s for s in self.inputs}
        self.output_names = [o.name for o in self.outputs]
        self.stats = Stats()
        self.inflight = 0
        self.baseline_p95_ms: float | None = None
        self.memory_mb: float = 0.0
        self.loaded_at = time.time()

    @staticmethod
    def _spec(node: NodeArg) -> TensorSpec:
        shape = tuple(d if isinstance(d, int) else None for d in (node.shape or []))
        return TensorSpec(node.name, _ONNX_TO_NP.get(node.type, np.float32), shape, node.type)

    def check_inputs(self, feed: dict[str, np.ndarray]) -> None:
        missing = [n for n in self.input_by_name if n not in feed]
        if missing:
            raise BadInput(
                f"missing input(s) {missing}; the model takes {list(self.input_by_name)}"
            )
        for name, arr in feed.items():
            spec = self.input_by_name.get(name)
            if spec is None:
                raise BadInput(
                    f"unknown input {name!r}; the model takes {list(self.input_by_name)}"
                )
            if arr.dtype != spec.dtype and spec.dtype is not np.object_:
                raise BadInput(
                    f"input {name!r} is {arr.dtype}, the model takes {np.dtype(spec.dtype)}"
                )
            if len(arr.shape) != len(spec.shape) or any(
                d is not None and d != a for d, a in zip(spec.shape, arr.shape, strict=True)
            ):
                raise BadInput(f"input {name!r} has shape {list(arr.shape)}, expected {spec.shape}")

    def run(self, feed: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[object]:
        try:
            return self.session.run(outputs or self.output_names, feed)
        except Exception as e:
            raise ModelError(f"{self.name} {self.version} failed: {e}") from e


@dataclass
class _Slot:
    cond: threading.Condition = field(default_factory=threading.Condition)
    active: LoadedModel | None = None
    gap: bool = False  # an unload-first swap is between unload and load
    waiting: int = 0


def plan_swap(mode: str, available_mb: float, new_mb: float, headroom_mb: float) -> str:
    """'overlap' (load new next to old) or 'unload_first' (pure)."""
    if mode in ("overlap", "unload_first"):
        return mode
    return "overlap" if new_mb + headroom_mb <= available_mb else "unload_first"


InferenceObserver = Callable[
    [str, str, dict[str, np.ndarray], dict[str, np.ndarray], float, bool], None
]


class SessionManager:
    def __init__(self, swap: SwapConfig) -> None:
        self.swap_cfg = swap
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self.observers: list[InferenceObserver] = []

    def _slot(self, name: str) -> _Slot:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = _Slot()
            return slot

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, s in self._slots.items() if s.active is not None or s.gap)

    def get(self, name: str) -> LoadedModel | None:
        slot = self._slots.get(name)
        return slot.active if slot else None

    def is_ready(self, name: str) -> bool:
        slot = self._slots.get(name)
        return bool(slot and slot.active is not None and not slot.gap)

    def models_memory_mb(self) -> float:
        with self._lock:
            return sum(s.active.memory_mb for s in self._slots.values() if s.active)

    @contextmanager
    def acquire(self, name: str, version: str | None = None) -> Iterator[LoadedModel]:
        """The model serving `name` now; waits (bounded) through an unload-first gap."""
        slot = self._slots.get(name)
        if slot is None:
            raise ModelNotFound(f"model {name!r} is not served here")
        with slot.cond:
            if slot.gap:
                if slot.waiting >= self.swap_cfg.queue_max:
                    raise ServerBusy(f"{name}: {slot.waiting} requests already wait for a swap")
                slot.waiting += 1
                try:
                    deadline = time.monotonic() + self.swap_cfg.queue_timeout_s
                    while slot.gap:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise ServerBusy(f"{name}: the swap took longer than the queue timeout")
                        slot.cond.wait(left)
                finally:
                    slot.waiting -= 1
            lm = slot.active
            if lm is None:
                raise ModelNotFound(f"model {name!r} is not served here")
            if version is not None and version != lm.version:
                raise ModelNotFound(f"model {name!r} serves version {lm.version}, not {version!r}")
            lm.inflight += 1
        try:
            yield lm
        finally:
            with slot.cond:
                lm.inflight -= 1
                slot.cond.notify_all()

    def infer(
        self,
        name: str,
        version: str | None,
        feed: dict[str, np.ndarray],
        outputs: list[str] | None = None,
    ) -> tuple[LoadedModel, dict[str, np.ndarray]]:
        with self.acquire(name, version) as lm:
            lm.check_inputs(feed)
            names = outputs or lm.output_names
            for o in names:
                if o not in lm.output_names:
                    raise BadInput(f"unknown output {o!r}; the model has {lm.output_names}")
            t0 = time.perf_counter()
            ok = False
            try:
                result = lm.run(feed, names)
                ok = True
            finally:
                latency = time.perf_counter() - t0
                lm.stats.record(latency * 1000.0, ok)
                if not ok:
                    self._observe(lm, feed, {}, latency, False)
        out = {n: np.asarray(r) for n, r in zip(names, result, strict=True)}
        self._observe(lm, feed, out, latency, True)
        return lm, out

    def _observe(
        self,
        lm: LoadedModel,
        feed: dict[str, np.ndarray],
        out: dict[str, np.ndarray],
        latency: float,
        ok: bool,
    ) -> None:
        for cb in self.observers:
            with suppress(Exception):
                cb(lm.name, lm.version, feed, out, latency, ok)

    # ------------------------------------------------------------------ swapping

    def install(self, lm: LoadedModel | None, name: str) -> LoadedModel | None:
        """Make `lm` serve `name` at once (overlap swap); returns the model it replaced."""
        slot = self._slot(name)
        with slot.cond:
            old = slot.active
            slot.active = lm
            slot.cond.notify_all()
        return old

    def swap_unload_first(
        self, name: str, load: Callable[[], LoadedModel], drain_timeout_s: float = 30.0
    ) -> LoadedModel:
        """Hold new requests, let in-flight ones finish, unload, load, release the queue.

        If loading fails, `load` is not retried: the slot is left empty and the error raised,
        so the caller can load the previous version with another call.
        """
        slot = self._slot(name)
        with slot.cond:
            slot.gap = True
            old = slot.active
            deadline = time.monotonic() + drain_timeout_s
            while old is not None and old.inflight > 0 and time.monotonic() < deadline:
                slot.cond.wait(0.05)
            slot.active = None
        del old
        gc.collect()
        try:
            lm = load()
        except BaseException:
            with slot.cond:
                slot.gap = False
                slot.cond.notify_all()
            raise
        with slot.cond:
            slot.active = lm
            slot.gap = False
            slot.cond.notify_all()
        return lm

    def begin_gap(self, name: str) -> None:
        slot = self._slot(name)
        with slot.cond:
            slot.gap = True

    def end_gap(self, name: str, lm: LoadedModel | None) -> None:
        slot = self._slot(name)
        with slot.cond:
            slot.active = lm if lm is not None else slot.active
            slot.gap = False
            slot.cond.notify_all()


def judge_probation(
    requests: int,
    errors: int,
    latencies_ms: list[float],
    baseline_p95_ms: float | None,
    cfg: ProbationConfig,
) -> tuple[ReasonCode, str] | None:
    """(reason code, reason) when probation is breached, else None (pure)."""
    if requests < max(cfg.min_requests, 1):
        return None
    rate = errors / requests
    if rate > cfg.max_error_rate:
        return (
            ReasonCode.PROBATION_ERROR_RATE,
            f"{errors} of {requests} requests failed ({rate:.1%} > {cfg.max_error_rate:.1%})",
        )
    if baseline_p95_ms is not None and len(latencies_ms) >= max(cfg.min_requests, 1):
        p95 = float(np.percentile(np.asarray(latencies_ms), 95))
        limit = cfg.latency_factor * baseline_p95_ms + cfg.latency_slack_ms
        if p95 > limit:
            return (
                ReasonCode.PROBATION_LATENCY,
                f"serving p95 {p95:.2f} ms > {limit:.2f} ms"
                f" ({cfg.latency_factor}x validation p95 {baseline_p95_ms:.2f} ms"
                f" + {cfg.latency_slack_ms} ms)",
            )
    return None
