"""Capture on demand on the device (docs/capture.md).

The controller asks for a capture in the signed desired state (a model's ``capture`` entry,
`edgefleet.wire.capture.CaptureSpec`); `CaptureService.apply` reads it on every verified
desired state. When the device's config forbids capture (``[capture] allowed = false``, the
default) the service writes one ``refused`` record per capture id (``capture_forbidden``) and
nothing else: no request is ever looked at.

When allowed, the inference observer (the request thread) decides cheaply whether to sample a
request (sample_rate, the per-minute row budget, the rows still wanted, ``until``) and hands
its tensors to a bounded queue (full: dropped and counted; the request never waits). A worker
thread encodes them into ``row`` records and appends them to an on-disk outbox
(`agent.telemetry.outbox.Outbox`, bounded in bytes), which the MQTT link delivers on
``.../capture`` and releases on the controller's ack. ``done`` records say when a capture ended
on this device (rows reached, ``until`` passed, or the controller withdrew it); progress lives in
``DATA_DIR/capture/state.json`` so a restart neither repeats a refusal nor exceeds the rows.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgefleet.agent.config import AgentConfig, CaptureConfig
from edgefleet.agent.ports import ObservedAgent
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.wire import capture as wc
from edgefleet.wire.atomic import atomic_write_json
from edgefleet.wire.manifest import parse_time
from edgefleet.wire.message import JsonObject, JsonValue, now_iso

log = logging.getLogger("edgefleet.agent.capture")
MAX_REMEMBERED = 256  # captures whose progress the state file keeps


@dataclass
class _Progress:
    model: str
    rows: int = 0  # rows written to the outbox
    done: str | None = None  # why it ended here, once it did
    refused: bool = False


@dataclass
class _Active:
    spec: wc.CaptureSpec
    model: str
    until_s: float  # epoch seconds
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (monotonic, rows)
    queued: int = 0  # rows handed to the worker, not yet written


class CaptureService:
    """``apply(desired)`` on each verified desired state; ``observe`` is the inference
    observer; ``start()``/``stop()`` run the writer thread."""

    def __init__(
        self,
        agent: ObservedAgent | None,
        config: AgentConfig,
        *,
        outbox: Outbox | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings: CaptureConfig = config.capture
        self.dir = Path(config.data_dir) / "capture"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outbox = outbox or Outbox(
            self.dir / "outbox.sqlite", max_bytes=self.settings.outbox_max_bytes
        )
        self.state_path = self.dir / "state.json"
        self._lock = threading.Lock()
        self._progress: dict[str, _Progress] = self._load()
        self._active: dict[str, _Active] = {}  # model -> its capture
        # The retained desired state is a replay after a restart (same seq): the captures it
        # asked for are resumed from the state file instead.
        self._specs: dict[str, JsonObject] = {}
        self._resume()
        self._queue: queue.Queue[tuple[str, str, str, dict[str, np.ndarray], dict[str, np.ndarray]]]
        self._queue = queue.Queue(maxsize=max(1, self.settings.queue))
        self._rng = rng or random.Random()
        self.dropped = 0  # sampled requests not captured: the queue was full
        self.too_large = 0  # sampled requests over the per-record byte cap
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if agent is not None:
            agent.add_inference_observer(self.observe)

    # -- state ------------------------------------------------------------------------------
    def _load(self) -> dict[str, _Progress]:
        import json

        try:
            raw = json.loads(self.state_path.read_text())
            return {
                cid: _Progress(str(v["model"]), int(v["rows"]), v.get("done"), bool(v["refused"]))
                for cid, v in raw.get("captures", {}).items()
                if wc.is_capture_id(cid)
            }
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("capture state unreadable, starting afresh: %s", e)
            return {}

    def _resume(self) -> None:
        import json

        try:
            specs = json.loads(self.state_path.read_text()).get("specs", {})
        except (OSError, ValueError, AttributeError):
            return
        for model, raw in specs.items() if isinstance(specs, dict) else ():
            try:
                spec = wc.parse_spec(raw)
            except wc.CaptureError:
                continue
            p = self._progress.get(spec.id) if spec is not None else None
            if spec is None or p is None or p.done is not None or p.refused:
                continue
            self._specs[model] = spec.to_dict()
            if self.settings.allowed:
                self._active[model] = _Active(spec, model, parse_time(spec.until).timestamp())

    def _save(self) -> None:
        # bounded: the oldest ended captures are forgotten first (a capture id never returns)
        ended = [c for c, p in self._progress.items() if p.done is not None or p.refused]
        for cid in ended[: max(0, len(self._progress) - MAX_REMEMBERED)]:
            del self._progress[cid]
        body = {
            "specs": self._specs,
            "captures": {
                cid: {"model": p.model, "rows": p.rows, "done": p.done, "refused": p.refused}
                for cid, p in self._progress.items()
            },
        }
        atomic_write_json(self.state_path, body)

    def progress(self) -> dict[str, JsonObject]:
        with self._lock:
            return {
                cid: {"model": p.model, "rows": p.rows, "done": p.done, "refused": p.refused}
                for cid, p in self._progress.items()
            }

    # -- desired state ----------------------------------------------------------------------
    def apply(self, desired: Mapping[str, Any]) -> None:
        """The captures a verified desired state asks for (the link's worker thread)."""
        wanted: dict[str, wc.CaptureSpec] = {}
        models = desired.get("models")
        for name, entry in models.items() if isinstance(models, Mapping) else ():
            if not isinstance(entry, Mapping):
                continue
            try:
                spec = wc.parse_spec(entry.get("capture"))
            except wc.CaptureError as e:  # validate_desired refused it already; belt and braces
                log.warning("capture of %s ignored: %s", name, e)
                continue
            if spec is not None:
                wanted[str(name)] = spec
        notes: list[JsonObject] = []
        with self._lock:
            self._specs = {m: s.to_dict() for m, s in wanted.items()}
            for model, act in list(self._active.items()):
                if wanted.get(model) is None or wanted[model].id != act.spec.id:
                    del self._active[model]
                    notes += self._finish(act.spec.id, "withdrawn")
            for model, spec in wanted.items():
                p = self._progress.setdefault(spec.id, _Progress(model))
                if not self.settings.allowed:
                    if not p.refused:
                        p.refused = True
                        notes.append(wc.refused_record(spec.id, model))
                    continue
                if p.done is not None or model in self._active:
                    continue
                until = parse_time(spec.until).timestamp()
                if p.rows >= spec.rows or until <= time.time():
                    notes += self._finish(spec.id, "rows" if p.rows >= spec.rows else "until")
                    continue
                self._active[model] = _Active(spec, model, until)
            self._save()
        for n in notes:
            self._append(n)

    def _finish(self, cid: str, why: str) -> list[JsonObject]:
        """Mark a capture done here (lock held): its ``done`` record, once."""
        p = self._progress.get(cid)
        if p is None or p.done is not None or p.refused:
            return []
        p.done = why
        return [wc.done_record(cid, p.model, p.rows, why)]

    # -- hot path ---------------------------------------------------------------------------
    def observe(
        self,
        model: str,
        version: str,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        latency_s: float,
        ok: bool,
    ) -> None:
        """Inference observer: decide and queue; never blocks, never encodes."""
        if not ok or not self._active:
            return
        act = self._active.get(model)
        if act is None or self._rng.random() >= act.spec.sample_rate:
            return
        first = next(iter(inputs.values()), None)
        if first is None or np.ndim(first) == 0:
            return
        rows = int(np.shape(first)[0])
        now = time.monotonic()
        with self._lock:
            if self._active.get(model) is not act:
                return
            p = self._progress[act.spec.id]
            left = act.spec.rows - p.rows - act.queued
            while act.window and now - act.window[0][0] >= 60.0:
                act.window.popleft()
            budget = act.spec.max_rows_per_minute - sum(n for _, n in act.window)
            take = min(rows, left, budget, wc.MAX_ROWS_PER_RECORD)
            if take <= 0 or time.time() >= act.until_s:
                return
            try:
                self._queue.put_nowait((act.spec.id, model, version, inputs, outputs))
            except queue.Full:
                self.dropped += 1
                return
            # rows beyond `take` are cut off by the writer (it slices to what is left)
            act.window.append((now, take))
            act.queued += take

    # -- writer -----------------------------------------------------------------------------
    def _encode(
        self,
        cid: str,
        model: str,
        version: str,
        inputs: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
        take: int,
    ) -> JsonObject | None:
        def enc(arrs: dict[str, np.ndarray], cut: bool) -> dict[str, JsonObject]:
            out: dict[str, JsonObject] = {}
            for k, v in arrs.items():
                a = np.asarray(v)
                if cut and a.ndim and a.shape[0] >= take:
                    a = a[:take]
                dt = a.dtype.newbyteorder("<")
                if dt.name not in wc.DTYPES:
                    continue  # a dtype the wire does not carry (strings): left out
                a = np.ascontiguousarray(a, dtype=dt)
                out[k] = wc.encode_tensor(dt.name, tuple(int(d) for d in a.shape), a.tobytes())
            return out

        rows_out = next(iter(outputs.values()), None)
        cut_outputs = rows_out is not None and np.ndim(rows_out) > 0
        ins, outs = enc(inputs, True), enc(outputs, cut_outputs)
        nbytes = sum(len(str(t["data"])) * 3 // 4 for t in (*ins.values(), *outs.values()))
        if not ins or nbytes > wc.MAX_RECORD_BYTES:
            return None
        return wc.row_record(cid, model, version, now_iso(), ins, outs)

    def _write_one(
        self, item: tuple[str, str, str, dict[str, np.ndarray], dict[str, np.ndarray]]
    ) -> None:
        cid, model, version, inputs, outputs = item
        first = next(iter(inputs.values()))
        rows = int(np.shape(first)[0])
        with self._lock:
            act = self._active.get(model)
            p = self._progress.get(cid)
            if act is None or p is None or act.spec.id != cid:
                return
            take = min(rows, act.spec.rows - p.rows, wc.MAX_ROWS_PER_RECORD)
            act.queued = max(0, act.queued - min(rows, wc.MAX_ROWS_PER_RECORD))
        if take <= 0:
            return
        rec = self._encode(cid, model, version, inputs, outputs, take)
        if rec is None:
            self.too_large += 1
            return
        self._append(rec)
        notes: list[JsonObject] = []
        with self._lock:
            p.rows += take
            if p.rows >= act.spec.rows:
                self._active.pop(model, None)
                notes = self._finish(cid, "rows")
            self._save()
        for n in notes:
            self._append(n)

    def _append(self, rec: JsonObject) -> None:
        try:
            self.outbox.append(rec)
        except ValueError as e:  # over the outbox's own limit: counted as dropped there
            log.warning("capture record dropped: %s", e)

    def tick(self) -> None:
        """End captures whose ``until`` passed."""
        now = time.time()
        notes: list[JsonObject] = []
        with self._lock:
            for model, act in list(self._active.items()):
                if now >= act.until_s:
                    del self._active[model]
                    notes += self._finish(act.spec.id, "until")
            if notes:
                self._save()
        for n in notes:
            self._append(n)

    def drain(self, timeout: float = 5.0) -> None:
        """Write what is queued (tests, and `stop`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._write_one(item)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                self.tick()
                continue
            try:
                self._write_one(item)
            except Exception:
                log.exception("capture write failed")

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="capture", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.drain(1.0)
        self.outbox.close()

    def stats(self) -> JsonObject:
        return {
            "allowed": self.settings.allowed,
            "active": cast(JsonValue, sorted(a.spec.id for a in self._active.values())),
            "dropped": self.dropped,
            "too_large": self.too_large,
            "outbox": self.outbox.stats().to_dict(),  # type: ignore[dict-item]
        }
