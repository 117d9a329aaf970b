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

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.ports import ObservedAgent, ReferenceSource, serving_versions
from edgefleet.agent.telemetry.collector import (
    InferenceWindow,
    SketchWindow,
    sample_record,
    system_record,
)
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.agent.update.events import UpdateEvent
from edgefleet.drift.sketch import Sketch
from edgefleet.wire.message import JsonObject, now_iso
from edgefleet.wire.states import TERMINAL_STATES, parse_state

log = logging.getLogger("edgefleet.agent.telemetry")


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
    def from_config(cls, config: AgentConfig | TelemetrySettings) -> TelemetrySettings:
        if isinstance(config, TelemetrySettings):
            return config
        tel = config.telemetry
        kwargs: dict[str, Any] = {"data_dir": Path(config.data_dir)}
        for name in cls.__dataclass_fields__:
            if name != "data_dir" and hasattr(tel, name):
                kwargs[name] = getattr(tel, name)
        return cls(**kwargs)


class TelemetryService:
    """``start()`` / ``stop()``; ``tick()`` closes the current windows into outbox records."""

    def __init__(
        self,
        agent: ReferenceSource,
        config: AgentConfig | TelemetrySettings,
        *,
        outbox: Outbox | None = None,
    ) -> None:
        """``agent`` gives the drift references; when it is a whole agent (`ObservedAgent`)
        its inferences, update events and inventory are observed too."""
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
        self._references: dict[tuple[str, str], JsonObject | None] = {}
        self._samples: list[dict[str, Any]] = []
        self._updates: Counter[str] = Counter()
        self._last_updates: list[dict[str, Any]] = []
        self._rng = random.Random()
        self._stop = threading.Event()  # set: stopped (the observer ignores requests)
        self._thread: threading.Thread | None = None
        self._observed = agent if isinstance(agent, ObservedAgent) else None
        if self._observed is not None:
            self._observed.add_inference_observer(self.observe)
            self._observed.add_listener(self.on_update_event)

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

    def _reference(self, model: str, version: str) -> JsonObject | None:
        """The serving model's reference (asked once per version; the agent serves one)."""
        key = (model, version)
        if key in self._references:
            return self._references[key]
        ref: JsonObject | None
        try:
            ref = self.agent.reference(model)
        except Exception as e:  # a model without a reference is still served
            log.info("no drift reference for %s %s: %s", model, version, e)
            ref = None
        if ref is not None and not ref.get("features"):
            ref = None
        self._references[key] = ref
        return ref

    def on_update_event(self, event: UpdateEvent) -> None:
        """Agent update listener: counts finished updates by outcome."""
        state = parse_state(event.state)
        if state is None or state not in TERMINAL_STATES:
            return
        with self._lock:
            self._updates[state.value] += 1
            self._last_updates.append(
                {
                    "model": event.model,
                    "version": event.version,
                    "outcome": state.value,
                    "reason": event.reason,
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
        if self._observed is not None:
            try:
                models = serving_versions(self._observed.inventory())
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
