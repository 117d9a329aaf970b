"""`TelemetryService(agent, config)`: records system, agent, inference and sketch windows.

The inference observer runs on the request thread, so it only counts and buffers (a lock, a
few integer updates, a list append); sketches are counted in vectorised batches by the service
thread at each interval, or on the request thread once ``flush_rows`` rows (or ``flush_bytes``
of input tensors, for image models) are buffered. Every
``interval_s`` the windows are closed into records appended to the persistent outbox, which
the MQTT link drains to ``edgefleet/v1/devices/DEV/telemetry``. Raw inputs never leave the
device unless ``sample_inputs`` is on.
"""

from __future__ import annotations

import inspect
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.telemetry.collector import (
    InferenceWindow,
    SketchWindow,
    models_of,
    now_iso,
    sample_record,
    system_record,
)
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.drift.sketch import Sketch

log = logging.getLogger("edgefleet.agent.telemetry")

TERMINAL = ("COMMITTED", "FAILED", "ROLLED_BACK", "REMOVED")


@dataclass
class TelemetrySettings:
    """What the service does; ``from_config`` reads the agent config's ``[telemetry]`` table."""

    enabled: bool = True
    interval_s: float = 10.0
    outbox_path: Path | None = None  # default: DATA_DIR/telemetry/outbox.sqlite
    outbox_max_bytes: int = 16 * 1024 * 1024
    system: bool = True
    sample_inputs: bool = False  # raw inputs leave the device only when this is on
    sample_rate: float = 0.01
    sample_max_per_window: int = 10
    flush_rows: int = 1024
    flush_bytes: int = 8 * 1024 * 1024
    data_dir: Path | None = None

    @classmethod
    def from_config(cls, config: Any) -> TelemetrySettings:
        if isinstance(config, TelemetrySettings):
            return config
        tel = getattr(config, "telemetry", config)
        data_dir = getattr(config, "data_dir", None)
        kwargs: dict[str, Any] = {"data_dir": Path(data_dir) if data_dir else None}
        for name in cls.__dataclass_fields__:
            if name != "data_dir" and hasattr(tel, name):
                kwargs[name] = getattr(tel, name)
        return cls(**kwargs)


class TelemetryService:
    """``start()`` / ``stop()``; ``tick()`` closes the current windows into outbox records."""

    def __init__(self, agent: Any, config: Any, *, outbox: Outbox | None = None) -> None:
        self.agent = agent
        self.settings = TelemetrySettings.from_config(config)
        s = self.settings
        if outbox is None:
            path = s.outbox_path or ((s.data_dir or Path(".")) / "telemetry" / "outbox.sqlite")
            outbox = Outbox(path, max_bytes=s.outbox_max_bytes)
            self._owns_outbox = True
        else:
            self._owns_outbox = False
        self.outbox = outbox
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self._inference: dict[tuple[str, str], InferenceWindow] = {}
        self._sketches: dict[tuple[str, str], SketchWindow] = {}
        self._references: dict[tuple[str, str], Mapping[str, Any] | None] = {}
        self._samples: list[dict[str, Any]] = []
        self._updates: Counter[str] = Counter()
        self._last_updates: list[dict[str, Any]] = []
        self._rng = random.Random()
        self._stop = threading.Event()  # set: stopped (the observer ignores requests)
        self._thread: threading.Thread | None = None
        self._ref_takes_version = _accepts_two_args(getattr(agent, "reference", None))
        add = getattr(agent, "add_inference_observer", None)
        if callable(add):
            add(self.observe)
        listen = getattr(agent, "add_listener", None)
        if callable(listen):
            listen(self.on_update_event)

    # -- hot path ----------------------------------------------------------------------------
    def observe(
        self,
        model: str,
        version: str,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        latency_s: float,
        ok: bool,
    ) -> None:
        """Inference observer: counts the request, buffers its tensors for the sketch."""
        if self._stop.is_set():
            return
        key = (model, version)
        flush: SketchWindow | None = None
        with self._lock:
            win = self._inference.get(key)
            if win is None:
                win = self._inference[key] = InferenceWindow(model, version)
            win.observe(latency_s, ok)
            if not ok:
                return
            sk = self._sketches.get(key)
            if sk is None:
                ref = self._reference(model, version)
                if ref is None:
                    sk = None
                else:
                    sk = self._sketches[key] = SketchWindow(model, version, Sketch(ref))
            if sk is not None and (
                sk.add(inputs, outputs) >= self.settings.flush_rows
                or sk.pending_bytes >= self.settings.flush_bytes
            ):
                flush = sk
            if (
                self.settings.sample_inputs
                and len(self._samples) < self.settings.sample_max_per_window
            ):
                rec = sample_record(model, version, inputs, self._rng, self.settings.sample_rate)
                if rec is not None:
                    self._samples.append(rec)
            if flush is not None:
                flush.flush()

    def _reference(self, model: str, version: str) -> Mapping[str, Any] | None:
        key = (model, version)
        if key in self._references:
            return self._references[key]
        getter: Callable[..., Any] | None = getattr(self.agent, "reference", None)
        ref: Any = None
        if getter is not None:
            try:
                ref = getter(model, version) if self._ref_takes_version else getter(model)
            except Exception as e:  # a model without a reference is still served
                log.info("no drift reference for %s %s: %s", model, version, e)
                ref = None
        if ref is not None and not (isinstance(ref, Mapping) and ref.get("features")):
            ref = None
        self._references[key] = ref
        return ref

    def on_update_event(self, event: Any) -> None:
        """Agent update listener: counts finished updates by outcome."""
        get = event.get if isinstance(event, Mapping) else lambda k, d=None: getattr(event, k, d)
        state = get("state")
        state = getattr(state, "value", state)
        if str(state) not in TERMINAL:
            return
        with self._lock:
            self._updates[str(state)] += 1
            self._last_updates.append(
                {
                    "model": get("model"),
                    "version": get("version"),
                    "outcome": str(state),
                    "reason": _jsonable(get("reason")),
                }
            )
            del self._last_updates[:-20]

    # -- windows -> records ------------------------------------------------------------------
    def collect(self) -> list[dict[str, Any]]:
        """Close the current windows and return their records (does not touch the outbox)."""
        with self._lock:
            inference, self._inference = self._inference, {}
            sketches, self._sketches = self._sketches, {}
            samples, self._samples = self._samples, []
            updates, self._updates = dict(self._updates), Counter()
            last_updates, self._last_updates = self._last_updates, []
        end = now_iso()
        records: list[dict[str, Any]] = []
        if self.settings.system:
            try:
                records.append(system_record(self.settings.data_dir))
            except Exception as e:  # never let a sensor stop telemetry
                records.append({"at": end, "kind": "system", "error": str(e)})
        records.append(self._agent_record(end, updates, last_updates))
        records += [w.record(end) for w in inference.values()]
        records += [w.record(end) for w in sketches.values() if w.sketch.n or w.pending]
        records += samples
        return records

    def _agent_record(
        self, end: str, updates: dict[str, int], last_updates: list[dict[str, Any]]
    ) -> dict[str, Any]:
        models: dict[str, str] = {}
        inv = getattr(self.agent, "inventory", None)
        if callable(inv):
            try:
                models = models_of(inv())
            except Exception as e:
                log.warning("inventory failed: %s", e)
        return {
            "at": end,
            "kind": "agent",
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "models": models,
            "updates": updates,
            "last_updates": last_updates,
            "outbox": self.outbox.stats().to_dict(),
        }

    def tick(self) -> list[int]:
        """Collect and append to the outbox; returns the new record ids."""
        ids = []
        for rec in self.collect():
            try:
                ids.append(self.outbox.append(rec))
            except ValueError as e:  # too large for the outbox: counted as dropped there
                log.warning("telemetry record dropped: %s", e)
        return ids

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        if not self.settings.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("telemetry tick failed")

    def stop(self, final_tick: bool = True, timeout: float = 10.0) -> None:
        """Stop the thread, write the last windows, stop observing (the agent keeps serving)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
        if final_tick and self.settings.enabled:
            self.tick()
        if self._owns_outbox:
            self.outbox.close()


def _accepts_two_args(fn: Any) -> bool:
    if not callable(fn):
        return False
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, str | int | float | bool):
        return v
    if hasattr(v, "to_dict"):
        return v.to_dict()
    return str(v)
