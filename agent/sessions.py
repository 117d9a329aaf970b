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


@dataclass(frozen=True)
class Served:
    """One request as probation sees it: when it ended, its model time per sample, success."""

    at: float  # time.monotonic()
    ms_per_sample: float  # ONNX Runtime's run time / the request's batch size
    ok: bool


@dataclass
class Stats:
    """Requests seen by one loaded version (probation and the serving record read these).

    Only the model's own run time is recorded (``session.run``): reading the request body and
    writing the response are the client's pace, not the model's. It is divided by the request's
    batch size, so large requests do not look like a slow model.
    """

    requests: int = 0
    errors: int = 0
    served: deque[Served] = field(default_factory=lambda: deque(maxlen=8192))
    fresh: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, latency_ms: float, ok: bool, samples: int = 1) -> None:
        per = latency_ms / max(samples, 1)
        with self.lock:
            self.requests += 1
            self.served.append(Served(time.monotonic(), per, ok))
            if ok:
                self.fresh.append(per)
            else:
                self.errors += 1

    def snapshot(self) -> tuple[int, int, list[Served]]:
        with self.lock:
            return self.requests, self.errors, list(self.served)

    def drain(self) -> list[float]:
        """Per-sample latencies of successful requests since the last drain (serving record)."""
        with self.lock:
            out = list(self.fresh)
            self.fresh.clear()
            return out


def batch_samples(feed: Mapping[str, np.ndarray], first_input: str | None) -> int:
    """The request's batch size: the first dimension of the model's first input (1 for a
    scalar)."""
    arr = feed.get(first_input) if first_input else None
    if arr is None or arr.ndim == 0:
        return 1
    return max(int(arr.shape[0]), 1)


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
        _check_external_data(name, version, model_dir, manifest)
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
        self.baseline_p95_ms: float | None = None  # on-device validation benchmark
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


def _check_external_data(name: str, version: str, model_dir: Path, manifest: JsonObject) -> None:
    """The model's external data must be files of its own package, checked before the runtime
    opens it (a version installed before the verifier checked it): ValueError otherwise."""
    from edgefleet.wire.errors import RejectError
    from edgefleet.wire.package import check_installed_external_data

    try:
        check_installed_external_data(model_dir, manifest)
    except RejectError as e:
        raise ValueError(f"{name} {version}: {e.code.value}: {e.message}") from e


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
                samples = batch_samples(feed, lm.inputs[0].name if lm.inputs else None)
                lm.stats.record(latency * 1000.0, ok, samples)
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


@dataclass(frozen=True)
class LatencyReference:
    """What the new version's per-sample serving p95 is compared with, and how much worse it
    may be: at most ``ratio`` x ``p95_ms`` + ``slack_ms``."""

    p95_ms: float
    ratio: float
    slack_ms: float
    source: str  # said in the verdict: "1.0.0 serving here (512 requests)", "package benchmark"

    @property
    def limit_ms(self) -> float:
        return self.ratio * self.p95_ms + self.slack_ms

    def to_dict(self) -> JsonObject:
        return {
            "p95_ms": round(self.p95_ms, 4),
            "ratio": self.ratio,
            "slack_ms": self.slack_ms,
            "limit_ms": round(self.limit_ms, 4),
            "source": self.source,
        }


@dataclass(frozen=True)
class Window:
    """One probation window's requests and, when judged, its per-sample p95."""

    index: int
    requests: int
    p95_ms: float | None  # None: fewer than min_requests successful requests, not judged
    breach: bool


def p95(values: Sequence[float]) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), 95))


def probation_windows(
    served: Sequence[Served],
    start: float,
    now: float,
    reference: LatencyReference | None,
    cfg: ProbationConfig,
    *,
    final: bool = False,
) -> list[Window]:
    """The windows of ``cfg.window_s`` seconds from ``start`` that are over by ``now`` (all of
    them, the last partial one included, when ``final``), each judged against ``reference``."""
    width = max(cfg.window_s, 1e-3)
    buckets: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for s in served:
        if s.at < start:
            continue
        k = int((s.at - start) // width)
        counts[k] = counts.get(k, 0) + 1
        if s.ok:
            buckets.setdefault(k, []).append(s.ms_per_sample)
    done = int((now - start) // width) + (1 if final else 0)
    out = []
    for k in range(max(done, 0)):
        lat = buckets.get(k, [])
        judged = len(lat) >= max(cfg.min_requests, 1)
        value = p95(lat) if judged else None
        breach = bool(reference is not None and value is not None and value > reference.limit_ms)
        out.append(Window(k, counts.get(k, 0), value, breach))
    return out


def judge_probation(
    requests: int,
    errors: int,
    windows: Sequence[Window],
    reference: LatencyReference | None,
    cfg: ProbationConfig,
) -> tuple[ReasonCode, str] | None:
    """(reason code, reason) when probation is breached, else None (pure).

    The error rate is judged over all requests once there are ``min_requests``. Latency fails
    only when ``sustained_windows`` judged windows in a row breach the reference's limit (a
    window with too few requests is not judged and does not break a run): one noisy window on
    a busy host is not a slow release.
    """
    if requests >= max(cfg.min_requests, 1):
        rate = errors / requests
        if rate > cfg.max_error_rate:
            return (
                ReasonCode.PROBATION_ERROR_RATE,
                f"{errors} of {requests} requests failed ({rate:.1%} > {cfg.max_error_rate:.1%})",
            )
    if reference is None:
        return None
    need = max(cfg.sustained_windows, 1)
    run: list[Window] = []
    for w in windows:
        if w.p95_ms is None:
            continue
        run = [*run, w] if w.breach else []
        if len(run) >= need:
            seen = ", ".join(f"{x.p95_ms:.3f}" for x in run if x.p95_ms is not None)
            return (
                ReasonCode.PROBATION_LATENCY,
                f"serving p95 per sample above {reference.limit_ms:.3f} ms in {len(run)}"
                f" windows in a row ({seen} ms; {reference.ratio}x {reference.p95_ms:.3f} ms"
                f" of {reference.source} + {reference.slack_ms} ms)",
            )
    return None
