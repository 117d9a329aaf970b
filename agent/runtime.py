"""`Agent`: the public surface other components use (MQTT link, telemetry, CLI, tests).

Threads: the inference server, the admin server, and one update worker (`agent.update`) that
runs updates one at a time through the persisted state machine. `start()` recovers from the
journal and loads the current models before it serves; `stop()` ends all threads.
"""

from __future__ import annotations

import os
import platform
import queue
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import cast

from edgefleet.agent.admin import AdminServer
from edgefleet.agent.config import AgentConfig, default_profiles
from edgefleet.agent.download import HttpFetcher
from edgefleet.agent.journal import Journal, UpdateRecord, new_update_id
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.ports import (
    AdminPort,
    AgentPort,
    Inventory,
    ModelEntry,
    ObservedAgent,
    UpdateView,
)
from edgefleet.agent.server import InferenceServer
from edgefleet.agent.sessions import SessionManager
from edgefleet.agent.states import State, is_terminal
from edgefleet.agent.store import ModelStore
from edgefleet.agent.update import (
    InferenceObserver,
    UpdateEvent,
    UpdateListener,
    Updater,
    UpdateRequest,
    agent_version,
)
from edgefleet.wire.message import JsonObject

__all__ = ["Agent", "UpdateEvent", "UpdateRequest", "agent_version"]


class Agent(AgentPort, ObservedAgent, AdminPort):
    """One gateway's agent; the Protocols it subclasses are what the MQTT link, telemetry
    and the admin endpoint may use of it (`agent.ports`)."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(self.data_dir)
        self.store = ModelStore(self.data_dir)
        self.sessions = SessionManager(config.swap)
        self.metrics = Metrics()
        self.ready = threading.Event()
        self._listeners: list[UpdateListener] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._http: InferenceServer | None = None
        self._admin: AdminServer | None = None
        self._threads: list[threading.Thread] = []
        self._providers: list[str] | None = None
        self.updater = Updater(
            config,
            self.journal,
            self.store,
            self.sessions,
            self.metrics,
            self._listeners,
            lambda: self.execution_providers,
            lambda: self.profiles,
            self._stop,
            HttpFetcher(
                config.download_timeout_s,
                config.download_retries,
                min_rate=config.download_min_rate,
                rate_window_s=config.download_rate_window_s,
                deadline_s=config.download_deadline_s,
            ),
        )

    # ------------------------------------------------------------------ public surface

    def add_listener(self, cb: UpdateListener) -> None:
        """`cb(UpdateEvent)` on every state transition (from the update worker thread)."""
        self._listeners.append(cb)

    def remove_listener(self, cb: UpdateListener) -> None:
        """Stop calling ``cb`` (a stopped fleet link must not keep receiving events)."""
        with suppress(ValueError):
            self._listeners.remove(cb)

    def add_inference_observer(self, cb: InferenceObserver) -> None:
        """`cb(model, version, inputs, outputs, latency_s, ok)` after each inference (request thread)."""
        self.sessions.observers.append(cb)

    def steer_shadow(self, name: str, version: str | None, shadow: bool) -> None:
        """The newest desired state wants ``version`` of ``name`` (None: not at all), in shadow
        or not: a candidate in shadow is promoted or dropped accordingly (`agent.shadow`)."""
        self.updater.ctx.shadow_board.steer(name, version, shadow)

    @property
    def execution_providers(self) -> list[str]:
        if self._providers is None:
            import onnxruntime as ort

            self._providers = list(ort.get_available_providers())
        return self._providers

    @property
    def profiles(self) -> list[str]:
        return list(self.config.profiles) or default_profiles(self.execution_providers)

    def submit_update(self, req: UpdateRequest) -> str:
        """Persist the update (IDLE) and queue it; returns its id. Runs after earlier ones."""
        rec = UpdateRecord(
            id=new_update_id(),
            model=req.model,
            version=req.version,
            source=req.source,
            sha256=req.sha256,
            size=req.size,
            rollout_id=req.rollout_id,
            allow_downgrade=req.allow_downgrade,
            controller_source=req.controller_source,
            max_p95_ratio=req.max_p95_ratio,
            shadow=req.shadow,
        )
        self.journal.create(rec)
        self.updater.emit(rec, rec.last())
        self._queue.put(rec.id)
        return rec.id

    def remove_model(self, name: str, rollout_id: str | None = None) -> str:
        """Persist a removal of `name` (IDLE) and queue it behind earlier updates; returns its id.

        The worker journals REMOVING, unloads the model, deletes its pointers and versions, and
        ends in REMOVED. A model not installed is removed all the same (a no-op that still
        reports REMOVED), so the caller can always wait for REMOVED.
        """
        from edgefleet.wire.manifest import NAME_RE

        if not NAME_RE.match(name):
            raise ValueError(f"bad model name {name!r}")
        lm = self.sessions.get(name)
        rec = UpdateRecord(
            id=new_update_id(),
            model=name,
            version=self.store.pointers(name).current or (lm.version if lm else ""),
            source="",
            rollout_id=rollout_id,
            action="remove",
        )
        self.journal.create(rec)
        self.updater.emit(rec, rec.last())
        self._queue.put(rec.id)
        return rec.id

    def update(self, update_id: str) -> UpdateView | None:
        rec = self.journal.load(update_id)
        return _record_view(rec) if rec else None

    def updates(self, limit: int = 20) -> list[UpdateView]:
        return [_record_view(r) for r in self.journal.all()[-limit:]]

    def unfinished_installs(self) -> dict[str, str]:
        """model -> version of installs the worker has not finished (e.g. resumed after a
        restart); a removal in flight installs nothing."""
        return {
            r.model: r.version
            for r in self.journal.all()
            if r.action == "install" and r.model and r.version and not is_terminal(r.current)
        }

    def inventory(self) -> Inventory:
        """The one reading of what this device runs: the MQTT presence, telemetry and the
        admin status all take it from here."""
        models: dict[str, ModelEntry] = {}
        latest: dict[str, UpdateRecord] = {}
        for r in self.journal.all():
            if r.model:
                latest[r.model] = r
        for name in sorted(set(self.store.names()) | set(self.sessions.names())):
            ptr = self.store.pointers(name)
            lm = self.sessions.get(name)
            if ptr.current is None and lm is None:
                continue
            last = latest.get(name)
            version = lm.version if lm else ptr.current
            assert version is not None  # skipped above when neither serves nor is installed
            models[name] = {
                "version": version,
                "previous": ptr.previous,
                "state": last.state if last else ("SERVING" if lm else "INSTALLED"),
                "serving": lm is not None,
                "profile": str(lm.manifest["profile"])
                if lm and lm.manifest.get("profile")
                else None,
                "providers": lm.providers if lm else [],
            }
        return {
            "device_id": self.config.device_id,
            "agent_version": agent_version(),
            "execution_providers": self.execution_providers,
            "hardware": _hardware(),
            "profiles": self.profiles,
            "models": models,
        }

    def reference(self, model: str) -> JsonObject | None:
        lm = self.sessions.get(model)
        ref = lm.manifest.get("drift_reference") if lm else None
        return ref if isinstance(ref, dict) else None

    def manifest(self, model: str) -> JsonObject | None:
        lm = self.sessions.get(model)
        return lm.manifest if lm else None

    @property
    def http_port(self) -> int | None:
        return self._http.server_address[1] if self._http else None

    @property
    def admin_port(self) -> int | None:
        return self._admin.server_address[1] if self._admin else None

    # ------------------------------------------------------------------ lifecycle

    def start(self, *, serve_http: bool = True, serve_admin: bool = True) -> None:
        """Recover from the journal, load the current models, start serving and the worker."""
        resume = self.updater.recover()
        self.updater.load_current_models()
        if serve_http:
            self._http = InferenceServer(
                (self.config.http_host, self.config.http_port),
                self.sessions,
                self.metrics,
                server_name="edgefleet-agent",
                server_version=agent_version(),
                ready=self.ready,
                limits=self.config.serving,
            )
            self._spawn(self._http.serve_forever, "agent-http")
        if serve_admin:
            self._admin = AdminServer(self)
            self._spawn(self._admin.serve_forever, "agent-admin")
        self._worker = self._spawn(lambda: self.updater.work(self._queue), "agent-updates")
        for uid in resume:
            self._queue.put(uid)
        self.ready.set()

    def stop_updates(self) -> None:
        """Stop taking and running updates; serving goes on until `stop`. An update in flight
        stops at its next step (journaled: it resumes at the next start) and tells the
        listeners of the steps it took until then, so a fleet link stopped after this has
        heard every event."""
        self._stop.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout=10)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for srv in (self._http, self._admin):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        if self._admin is not None:
            self._admin.forget()
        self._http = self._admin = None
        for t in self._threads:
            t.join(timeout=10)
        self._threads.clear()
        self.ready.clear()
        self._save_serving_records()

    def _save_serving_records(self) -> None:
        """Keep what each committed version served with (the next update's probation
        reference) across a restart."""
        for name in self.sessions.names():
            lm = self.sessions.get(name)
            if lm is None or lm.version != self.store.pointers(name).current:
                continue
            if lm.version in self.store.committed_versions(name):
                # A record is a help to the next probation, never a reason to fail a stop.
                with suppress(OSError):
                    self.store.add_serving_latencies(
                        name, lm.version, lm.stats.drain(), self.config.probation.history_requests
                    )

    def wait_update(self, update_id: str, timeout: float = 60.0) -> UpdateView:
        """Block until the update is terminal (bounded); returns its view."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.update(update_id)
            state = view.get("state") if view else None
            if view and state and is_terminal(State(state)):
                return view
            time.sleep(0.02)
        raise TimeoutError(f"update {update_id} did not finish within {timeout}s")

    def _spawn(self, fn: Callable[[], object], name: str) -> threading.Thread:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)
        return t


def _record_view(rec: UpdateRecord) -> UpdateView:
    """The record as JSON plus its last reason (the most recent transition that gave one)."""
    d = rec.to_dict()
    d["reason"] = next((t.reason for t in reversed(rec.history) if t.reason), None)
    d["reason_code"] = next((t.reason_code for t in reversed(rec.history) if t.reason_code), None)
    return cast(UpdateView, d)


def _hardware() -> JsonObject:
    import psutil

    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "release": platform.release(),
        "cpu_count": os.cpu_count(),
        "memory_mb": round(psutil.virtual_memory().total / 2**20),
        "python": platform.python_version(),
    }
