"""Shadow evaluation: a candidate version loaded next to the serving one, fed a sample of live
requests off the request path, never answering a client (docs/shadow.md).

- :func:`outputs_agree` (pure): top-1 agreement for class outputs (a float output whose last
  axis has two or more entries: argmax over it), exact equality for integer outputs, and
  ``numpy.isclose`` within the spec's rtol/atol for scores and regressions (a last axis of 1,
  or a scalar). The spec's ``compare`` can force one rule for every output.
- :func:`memory_refusal` (pure): whether the candidate may be loaded beside the serving version.
- :class:`ShadowBoard`: what the controller's desired state says of each model's candidate
  (keep shadowing, promote, drop); written by the MQTT link, read by the update worker.
- :class:`ShadowSlot`: the candidate session, its bounded queue and worker thread. Its
  :meth:`ShadowSlot.observe` is an inference observer: on the request thread it only counts,
  samples and ``put_nowait``s references to the request's arrays (a full queue drops the
  request and counts it). The worker runs the candidate, compares, and every ``window_s``
  hands :class:`ShadowFigures` to ``emit``: counts and latencies, never inputs or outputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from edgefleet.agent.sessions import LoadedModel, batch_samples
from edgefleet.wire.shadow import ShadowCounts, ShadowFigures, ShadowSpec

log = logging.getLogger("edgefleet.agent.shadow")

#: Per-sample latencies kept for the p50/p95 of a report (the most recent ones).
LATENCY_HISTORY = 4096

Decision = Literal["shadow", "promote", "drop"]


def _agree_one(a: np.ndarray, b: np.ndarray, rule: str, rtol: float, atol: float) -> bool:
    if a.shape != b.shape:
        return False
    if a.size == 0:
        return True
    if rule == "auto":
        if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
            rule = "exact"
        elif a.ndim >= 1 and a.shape[-1] >= 2:
            rule = "top1"
        else:
            rule = "tolerance"
    if rule == "exact":
        return bool(np.array_equal(a, b))
    if rule == "top1":
        if a.ndim == 0:
            return bool(np.array_equal(a, b))
        return bool(np.array_equal(np.argmax(a, axis=-1), np.argmax(b, axis=-1)))
    try:
        return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    except TypeError:  # strings and other non-numeric outputs
        return bool(np.array_equal(a, b))


def outputs_agree(
    serving: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    rtol: float,
    atol: float,
    rule: str = "auto",
) -> bool:
    """True when every output the serving version returned agrees with the candidate's."""
    for name, a in serving.items():
        b = candidate.get(name)
        if b is None or not _agree_one(np.asarray(a), np.asarray(b), rule, rtol, atol):
            return False
    return True


def memory_refusal(
    need_mb: float, factor: float, available_mb: float, headroom_mb: float
) -> str | None:
    """Why the candidate may not be loaded beside the serving version, or None when it may."""
    want = need_mb * factor + headroom_mb
    if want <= available_mb:
        return None
    return (
        f"the candidate needs about {need_mb:.1f} MB x {factor:g} + {headroom_mb:g} MB headroom"
        f" = {want:.1f} MB, {available_mb:.1f} MB available"
    )


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


class ShadowBoard:
    """model -> (desired version, shadow?) as the newest desired state says.

    A model the board knows nothing of (a shadow resumed after a restart, before any new
    desired state) keeps shadowing: the controller's next state decides.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._want: dict[str, tuple[str | None, bool]] = {}

    def steer(self, name: str, version: str | None, shadow: bool) -> None:
        """The desired state wants ``version`` of ``name`` (None: not at all), in shadow or not."""
        with self._lock:
            self._want[name] = (version, shadow)

    def decision(self, name: str, version: str) -> Decision:
        with self._lock:
            want = self._want.get(name)
        if want is None:
            return "shadow"
        wanted, shadow = want
        if wanted != version:
            return "drop"
        return "shadow" if shadow else "promote"


@dataclass
class _Item:
    feed: dict[str, np.ndarray]
    out: dict[str, np.ndarray]
    serving_ms: float  # per sample
    nbytes: int = 0


class ShadowSlot:
    """One candidate in shadow beside the serving ``name``; see the module docstring."""

    def __init__(
        self,
        candidate: LoadedModel,
        serving_version: str,
        spec: ShadowSpec,
        emit: Callable[[ShadowFigures], None],
        queue_max: int = 16,
        compare: str = "auto",
        queue_bytes: int = 64 * 2**20,
        nice: int = 10,
    ) -> None:
        self.candidate = candidate
        self.name = candidate.name
        self.serving_version = serving_version
        self.spec = spec
        self.emit = emit
        self.compare = compare
        self._q: queue.Queue[_Item | None] = queue.Queue(maxsize=max(1, queue_max))
        # A queued mirror keeps its request's arrays alive after the request is answered (and
        # its bytes released from the server's in-flight budget): bounded on its own.
        self._queue_bytes = max(0, queue_bytes)
        self._queued = 0
        self._nice = nice
        self._credit = 0.0  # sampling without a random draw: mirror when it reaches 1
        self._lock = threading.Lock()
        self._total = ShadowCounts()
        self._last = ShadowCounts()
        self._dropped = 0  # written on request threads, under _lock
        self._serving_ms: deque[float] = deque(maxlen=LATENCY_HISTORY)
        self._candidate_ms: deque[float] = deque(maxlen=LATENCY_HISTORY)
        self._window = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name=f"shadow-{self.name}", daemon=True)
        self._first_input = candidate.inputs[0].name if candidate.inputs else None

    # ------------------------------------------------------------------ request thread

    def observe(
        self,
        name: str,
        version: str,
        feed: dict[str, np.ndarray],
        out: dict[str, np.ndarray],
        latency_s: float,
        ok: bool,
    ) -> None:
        """Inference observer: sample and enqueue, never block, never raise into serving."""
        if name != self.name or version != self.serving_version or not ok or self._stop.is_set():
            return
        with self._lock:
            self._credit += self.spec.sample
            if self._credit < 1.0 - 1e-9:  # 0.1 ten times is 0.999...
                return
            self._credit -= 1.0
        samples = batch_samples(feed, self._first_input)
        size = sum(int(a.nbytes) for a in feed.values()) + sum(int(a.nbytes) for a in out.values())
        with self._lock:
            if self._queued + size > self._queue_bytes:
                self._dropped += 1
                return
            self._queued += size
        try:
            self._q.put_nowait(_Item(feed, out, latency_s * 1000.0 / samples, size))
        except queue.Full:
            with self._lock:
                self._queued -= size
                self._dropped += 1

    # ------------------------------------------------------------------ worker

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._q.put_nowait(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def compared(self) -> int:
        with self._lock:
            return self._total.compared

    def _work(self) -> None:
        # The candidate runs on this thread (one intra-op thread: no pool): a lower scheduling
        # priority lets the serving threads have the cores first (Linux: per-thread niceness).
        if self._nice > 0:
            with contextlib.suppress(OSError, AttributeError):
                tid = threading.get_native_id()
                base = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, base + self._nice))
        next_report = time.monotonic() + self.spec.window_s
        while not self._stop.is_set():
            try:
                item = self._q.get(timeout=max(0.01, min(0.5, next_report - time.monotonic())))
            except queue.Empty:
                item = None
            if item is not None:
                with self._lock:
                    self._queued -= item.nbytes
                self._compare(item)
            if time.monotonic() >= next_report:
                self.report()
                next_report = time.monotonic() + self.spec.window_s

    def _compare(self, item: _Item) -> None:
        lm = self.candidate
        ok = agree = False
        ms = 0.0
        try:
            lm.check_inputs(item.feed)
            t0 = time.perf_counter()
            result = lm.run(item.feed, list(item.out))
            ms = (time.perf_counter() - t0) * 1000.0 / batch_samples(item.feed, self._first_input)
            got = {n: np.asarray(r) for n, r in zip(item.out, result, strict=True)}
            ok = True
            agree = outputs_agree(item.out, got, self.spec.rtol, self.spec.atol, self.compare)
        except Exception as e:  # the candidate's failure is a figure, never the client's
            log.debug("shadow %s %s failed on a mirrored request: %s", self.name, lm.version, e)
        with self._lock:
            if ok:
                self._serving_ms.append(item.serving_ms)
                self._candidate_ms.append(ms)
            self._total = _add(self._total, ok, agree)
            self._last = _add(self._last, ok, agree)

    def figures(self, *, close_window: bool) -> ShadowFigures:
        with self._lock:
            dropped, self._dropped = self._dropped, 0
            total = ShadowCounts(
                self._total.compared,
                self._total.agreed,
                self._total.candidate_errors,
                self._total.dropped + dropped,
            )
            last = ShadowCounts(
                self._last.compared,
                self._last.agreed,
                self._last.candidate_errors,
                self._last.dropped + dropped,
            )
            self._total = total
            if close_window:
                self._window += 1
                self._last = ShadowCounts()
            else:
                self._last = last
            serving, cand = list(self._serving_ms), list(self._candidate_ms)
            window = max(self._window, 1)

        def r(v: float | None) -> float | None:
            return round(v, 4) if v is not None else None

        return ShadowFigures(
            window=window,
            total=total,
            last=last,
            serving_p50_ms=r(percentile(serving, 50)),
            serving_p95_ms=r(percentile(serving, 95)),
            candidate_p50_ms=r(percentile(cand, 50)),
            candidate_p95_ms=r(percentile(cand, 95)),
            done=total.compared >= self.spec.requests,
        )

    def report(self) -> ShadowFigures:
        """Close the window and hand its figures to ``emit`` (errors there are logged)."""
        fig = self.figures(close_window=True)
        try:
            self.emit(fig)
        except Exception:
            log.exception("shadow %s: the report could not be queued", self.name)
        return fig


def _add(c: ShadowCounts, ok: bool, agree: bool) -> ShadowCounts:
    return ShadowCounts(
        c.compared + (1 if ok else 0),
        c.agreed + (1 if ok and agree else 0),
        c.candidate_errors + (0 if ok else 1),
        c.dropped,
    )
