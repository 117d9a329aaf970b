"""The update worker: recovery at start, then each queued update through the persisted state
machine, one at a time. Where a failure or a crash leads is `agent.states.ROUTES`'s to say."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.journal import Journal, Recovery, Transition, UpdateRecord, decide_recovery
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.sessions import SessionManager
from edgefleet.agent.states import State, end_of_rollback, failure_route, is_terminal
from edgefleet.agent.store import ModelStore
from edgefleet.agent.update import models, prepare, serve
from edgefleet.agent.update.context import UpdateContext
from edgefleet.agent.update.events import StepFailed, UpdateListener
from edgefleet.agent.update.fetcher import Fetcher
from edgefleet.wire.reasons import ReasonCode

log = logging.getLogger("edgefleet.agent")

Step = Callable[[UpdateContext, UpdateRecord, serve.Run], None]


def _no_run(step: Callable[[UpdateContext, UpdateRecord], None]) -> Step:
    return lambda ctx, rec, run: step(ctx, rec)


#: The work of each non-terminal state.
STEPS: dict[State, Step] = {
    State.IDLE: _no_run(prepare.step_idle),
    State.DOWNLOADING: _no_run(prepare.step_download),
    State.VERIFYING: _no_run(prepare.step_verify),
    State.INSTALLING: _no_run(prepare.step_install),
    State.VALIDATING: serve.step_validate,
    State.ACTIVATING: serve.step_activate,
    State.PROBATION: serve.step_probation,
    State.ROLLING_BACK: serve.step_rolling_back,
    State.REMOVING: _no_run(models.finish_removal),
}


class Updater:
    """Recovery at start, then the worker loop over queued update ids."""

    def __init__(
        self,
        config: AgentConfig,
        journal: Journal,
        store: ModelStore,
        sessions: SessionManager,
        metrics: Metrics,
        listeners: list[UpdateListener],
        providers: Callable[[], list[str]],
        profiles: Callable[[], list[str]],
        stop: threading.Event,
        fetcher: Fetcher,
    ) -> None:
        self.ctx = UpdateContext(
            config, journal, store, sessions, metrics, fetcher, listeners, providers, profiles, stop
        )

    @property
    def execution_providers(self) -> list[str]:
        return self.ctx.providers()

    @property
    def profiles(self) -> list[str]:
        return self.ctx.profiles()

    def emit(self, rec: UpdateRecord, t: Transition) -> None:
        self.ctx.emit(rec, t)

    def load_current_models(self) -> None:
        models.load_current_models(self.ctx)

    def recover(self) -> list[str]:
        """Apply decide_recovery to unfinished updates; return the ids to resume."""
        ctx = self.ctx
        (ctx.data_dir / "downloads").mkdir(exist_ok=True)
        resume: list[str] = []
        for rec in ctx.journal.unfinished():
            action = decide_recovery(
                rec.current,
                rec.resumes,
                stopped_gracefully=rec.stopped_gracefully,
                removal=rec.action == "remove",
                rollback=rec.rollback,
            )
            log.warning("recovering update %s in %s: %s", rec.id, rec.state, action)
            if action is Recovery.RESUME:
                rec.resumes += 1
                rec.stopped_gracefully = False
                ctx.journal.save(rec)
                resume.append(rec.id)
            elif action is Recovery.FAIL:
                models.fail(
                    ctx,
                    rec,
                    ReasonCode.RESUME_LIMIT,
                    f"interrupted {rec.resumes} times in {rec.state}",
                )
            elif action is Recovery.ROLL_BACK:
                ctx.transition(
                    rec,
                    State.ROLLING_BACK,
                    ReasonCode.INTERRUPTED_PROBATION,
                    f"the agent restarted while {rec.version} was in {rec.state}",
                )
                self._finish_rollback(rec)
            elif action is Recovery.FINISH_REMOVAL:
                models.finish_removal(ctx, rec)
            elif action is Recovery.FINISH_ROLLBACK:
                self._finish_rollback(rec)
        for name in ctx.store.names():
            ctx.store.discard_incomplete(name)
        return resume

    def _finish_rollback(self, rec: UpdateRecord) -> None:
        """At start nothing serves yet: put the pointers back; loading comes after recovery."""
        models.restore_pointers(self.ctx, rec)
        self.ctx.discard_download(rec)
        models.drop_rolled_back(self.ctx, rec)
        self.ctx.transition(rec, end_of_rollback(rec.rollback))

    def work(self, q: queue.Queue[str | None]) -> None:
        """The worker thread: run queued updates until `None` or stop."""
        trust = models.trust_fingerprint(self.ctx)
        every = self.ctx.config.trust_check_s
        while not self.ctx.stop.is_set():
            try:
                uid = q.get(timeout=every) if every > 0 else q.get()
            except queue.Empty:
                uid = ""
            now = models.trust_fingerprint(self.ctx)
            if now != trust:  # a key file changed: judge every serving model's key again
                trust = now
                models.enforce_trust(self.ctx)
            if uid is None:
                return
            if not uid:
                continue
            rec = self.ctx.journal.load(uid)
            if rec is None or is_terminal(rec.current):
                continue
            try:
                self._run(rec)
            except Exception as e:  # a bug must not kill the worker; the record says why
                log.exception("update %s crashed", uid)
                models.fail(self.ctx, rec, ReasonCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}")

    def _run(self, rec: UpdateRecord) -> None:
        run = serve.Run()
        for _ in range(32):  # bounded: the table has no cycles
            if is_terminal(rec.current) or self.ctx.stop.is_set():
                return
            try:
                STEPS[rec.current](self.ctx, rec, run)
            except StepFailed as f:
                if failure_route(rec.current, rec.rollback) is None:
                    raise
                models.fail(self.ctx, rec, f.code, f.reason, f.figures)
                run.staged = None
