"""What every step of an update shares: the agent's parts, and the one way to change state."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.journal import Journal, Transition, UpdateRecord
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.sessions import SessionManager
from edgefleet.agent.shadow import ShadowBoard
from edgefleet.agent.states import State, is_terminal
from edgefleet.agent.store import ModelStore
from edgefleet.agent.update.events import UpdateEvent, UpdateListener
from edgefleet.agent.update.fetcher import Fetcher
from edgefleet.wire.message import JsonObject

log = logging.getLogger("edgefleet.agent")

PAUSE_ENV = "EDGEFLEET_AGENT_PAUSE_AT"  # test hook: STATE[,STATE...] -> sleep after entering it
PAUSE_MAX_S = 120.0


@dataclass
class UpdateContext:
    config: AgentConfig
    journal: Journal
    store: ModelStore
    sessions: SessionManager
    metrics: Metrics
    fetcher: Fetcher
    listeners: list[UpdateListener]
    providers: Callable[[], list[str]]
    profiles: Callable[[], list[str]]
    stop: threading.Event
    shadow_board: ShadowBoard = field(default_factory=ShadowBoard)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pause: set[str] = field(
        default_factory=lambda: {
            s.strip().upper() for s in os.environ.get(PAUSE_ENV, "").split(",") if s.strip()
        }
    )

    @property
    def data_dir(self) -> Path:
        return Path(self.config.data_dir)

    def package_path(self, rec: UpdateRecord) -> Path:
        return self.data_dir / "downloads" / f"{rec.id}.efpkg"

    def discard_download(self, rec: UpdateRecord) -> None:
        self.fetcher.discard(self.package_path(rec))

    def transition(
        self,
        rec: UpdateRecord,
        target: State,
        reason_code: str | None = None,
        reason: str | None = None,
        figures: JsonObject | None = None,
    ) -> None:
        """Journal ``target`` (the table checks it), count it, tell the listeners."""
        with self._lock:
            t = self.journal.transition(rec, target, reason_code, reason, figures)
        self.metrics.transitions.labels(target.value).inc()
        if is_terminal(target):
            self.metrics.updates.labels(target.value, reason_code or "").inc()
        self.emit(rec, t)
        if target.value in self._pause:
            self._pause_here(target)

    def _pause_here(self, state: State) -> None:
        marker = self.data_dir / f"paused-{state.value}"
        marker.write_text(str(os.getpid()))
        deadline = time.monotonic() + PAUSE_MAX_S
        while time.monotonic() < deadline and marker.exists() and not self.stop.is_set():
            time.sleep(0.05)

    def emit(self, rec: UpdateRecord, t: Transition) -> None:
        ev = UpdateEvent(
            update_id=rec.id,
            model=rec.model,
            version=rec.version,
            rollout_id=rec.rollout_id,
            state=t.state,
            reason_code=t.reason_code,
            reason=t.reason,
            figures=t.figures,
            timestamp=t.at,
            from_version=rec.from_version,
            local=rec.action == "install" and not rec.controller_source,
        )
        self._tell(ev)

    def emit_shadow(self, rec: UpdateRecord, figures: JsonObject) -> None:
        """One window of ``rec``'s shadow evaluation, to the listeners (the MQTT link queues it
        in its lossless outbox as a ``shadow`` status report)."""
        from edgefleet.wire.message import now_iso
        from edgefleet.wire.status import SHADOW

        self._tell(
            UpdateEvent(
                update_id=rec.id,
                model=rec.model,
                version=rec.version,
                rollout_id=rec.rollout_id,
                state=SHADOW,
                reason_code=None,
                reason=None,
                figures=figures,
                timestamp=now_iso(),
                from_version=rec.from_version,
                kind="shadow",
            )
        )

    def _tell(self, ev: UpdateEvent) -> None:
        for cb in list(self.listeners):
            try:
                cb(ev)
            except Exception:
                log.exception("update listener failed")
