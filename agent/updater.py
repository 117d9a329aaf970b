"""The update worker: runs each update through the persisted state machine, one at a time.

Each step does the work of the state the record is in, then persists the next state. Every step
is idempotent, so a restarted agent resumes by re-running the recorded state's step
(`journal.decide_recovery` says when to roll back or fail instead).
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.journal import Journal, Recovery, Transition, UpdateRecord, decide_recovery
from edgefleet.agent.metrics import Metrics
from edgefleet.agent.sessions import LoadedModel, SessionManager, judge_probation, plan_swap
from edgefleet.agent.states import BEFORE_ACTIVATION, State, is_terminal
from edgefleet.agent.store import IntegrityError, ModelStore, Pointers
from edgefleet.agent.validation import (
    Figures,
    benchmark,
    judge,
    load_samples,
    run_samples,
    sample_agreement,
    sample_tolerances,
)
from edgefleet.wire.errors import RejectError
from edgefleet.wire.package import VerifiedPackage, VerifyPolicy, read_name, verify_package
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.trust import check_installed

log = logging.getLogger("edgefleet.agent")

PAUSE_ENV = "EDGEFLEET_AGENT_PAUSE_AT"  # test hook: STATE[,STATE...] -> sleep after entering it
PAUSE_MAX_S = 120.0


@dataclass
class UpdateRequest:
    model: str  # "" = take it from the package
    version: str  # "" = take it from the package
    source: str  # http(s) URL, file:// URL or local path
    sha256: str | None = None
    size: int | None = None
    rollout_id: str | None = None
    allow_downgrade: bool = False
    # The source comes from the controller's signed desired state: send the device's download
    # token with it. Never set for operator-given sources, so the token cannot leak elsewhere.
    controller_source: bool = False


@dataclass
class UpdateEvent:
    update_id: str
    model: str
    version: str
    rollout_id: str | None
    state: str
    reason_code: str | None
    reason: str | None
    figures: dict[str, Any] | None
    timestamp: str
    from_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


UpdateListener = Callable[[UpdateEvent], None]
InferenceObserver = Callable[
    [str, str, dict[str, np.ndarray], dict[str, np.ndarray], float, bool], None
]


class StepFailed(Exception):
    """A step's refusal: the update leaves by its state's failure route with this code."""

    def __init__(
        self, code: ReasonCode, reason: str, figures: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason
        self.figures = figures


@dataclass
class _Run:
    """In-memory companions of an update record while the worker runs it."""

    package: Path | None = None
    verified: Any = None
    staged: LoadedModel | None = None
    figures: Figures | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def agent_version() -> str:
    from edgefleet import __version__

    return __version__


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
    ) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.journal = journal
        self.store = store
        self.sessions = sessions
        self.metrics = metrics
        self._listeners = listeners
        self._providers = providers
        self._profiles = profiles
        self._stop = stop
        self._lock = threading.Lock()
        self._pause = {
            s.strip().upper() for s in os.environ.get(PAUSE_ENV, "").split(",") if s.strip()
        }

    @property
    def execution_providers(self) -> list[str]:
        return self._providers()

    @property
    def profiles(self) -> list[str]:
        return self._profiles()

    # ------------------------------------------------------------------ recovery

    def recover(self) -> list[str]:
        """Apply decide_recovery to unfinished updates; return the ids to resume."""
        (self.data_dir / "downloads").mkdir(exist_ok=True)
        resume: list[str] = []
        for rec in self.journal.unfinished():
            action = decide_recovery(
                rec.current,
                rec.resumes,
                stopped_gracefully=rec.stopped_gracefully,
                removal=rec.action == "remove",
            )
            log.warning("recovering update %s in %s: %s", rec.id, rec.state, action)
            if action is Recovery.RESUME:
                rec.resumes += 1
                rec.stopped_gracefully = False
                self.journal.save(rec)
                resume.append(rec.id)
            elif action is Recovery.FAIL:
                self._cleanup_failed(rec)
                self._transition(
                    rec,
                    State.FAILED,
                    ReasonCode.RESUME_LIMIT,
                    f"interrupted {rec.resumes} times in {rec.state}",
                )
            elif action is Recovery.ROLL_BACK:
                self._transition(
                    rec,
                    State.ROLLING_BACK,
                    ReasonCode.INTERRUPTED_PROBATION,
                    f"the agent restarted while {rec.version} was in {rec.state}",
                )
                self._restore_pointers(rec)
                self._discard_download(rec)
                self._transition(rec, State.ROLLED_BACK)
            elif action is Recovery.FINISH_REMOVAL:
                self._finish_removal(rec)
            elif action is Recovery.FINISH_ROLLBACK:
                self._restore_pointers(rec)
                self._discard_download(rec)
                self._transition(rec, State.ROLLED_BACK)
        for name in self.store.names():
            self.store.discard_incomplete(name)
        return resume

    def load_current_models(self) -> None:
        for name in self.store.names():
            ptr = self.store.pointers(name)
            for version in (ptr.current, ptr.previous):
                if version is None:
                    continue
                try:
                    lm = self._load(name, version)
                except (IntegrityError, OSError, RuntimeError, ValueError) as e:
                    log.error("cannot serve %s %s: %s", name, version, e)
                    continue
                if version != ptr.current:
                    self.store.set_pointers(name, Pointers(version, None))
                self.sessions.install(lm, name)
                self.metrics.set_serving(name, version, None)
                break

    def _load(self, name: str, version: str) -> LoadedModel:
        """Load an installed version after re-hashing its files against the install record."""
        rec = self.store.check_integrity(name, version)
        vdir = self.store.version_dir(name, version)
        lm = LoadedModel(
            name,
            version,
            vdir,
            self.store.manifest(name, version),
            rec["providers"],
            self._session_options(),
        )
        v = rec.get("validation") or {}
        lm.baseline_p95_ms = v.get("p95_ms")
        lm.memory_mb = float(v.get("memory_growth_mb") or 0.0)
        return lm

    def _session_options(self) -> Any:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.config.intra_op_threads > 0:
            so.intra_op_num_threads = self.config.intra_op_threads
        spin = "1" if self.config.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return so

    # ------------------------------------------------------------------ the worker

    def work(self, q: queue.Queue[str | None]) -> None:
        """The worker thread: run queued updates until `None` or stop."""
        while not self._stop.is_set():
            uid = q.get()
            if uid is None:
                return
            rec = self.journal.load(uid)
            if rec is None or is_terminal(rec.current):
                continue
            try:
                self._run(rec)
            except Exception as e:  # a bug must not kill the worker; the record says why
                log.exception("update %s crashed", uid)
                if rec.current in BEFORE_ACTIVATION:
                    self._cleanup_failed(rec)
                    self._transition(
                        rec, State.FAILED, ReasonCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}"
                    )
                elif rec.current in (State.ACTIVATING, State.PROBATION):
                    self._roll_back(rec, ReasonCode.INTERNAL_ERROR, f"{type(e).__name__}: {e}")

    def _run(self, rec: UpdateRecord) -> None:
        run = _Run()
        steps: dict[State, Callable[[UpdateRecord, _Run], None]] = {
            State.IDLE: self._step_idle,
            State.DOWNLOADING: self._step_download,
            State.VERIFYING: self._step_verify,
            State.INSTALLING: self._step_install,
            State.VALIDATING: self._step_validate,
            State.ACTIVATING: self._step_activate,
            State.PROBATION: self._step_probation,
            State.ROLLING_BACK: self._step_rolling_back,
            State.REMOVING: self._step_removing,
        }
        for _ in range(32):  # bounded: the table has no cycles
            if is_terminal(rec.current) or self._stop.is_set():
                return
            state = rec.current
            try:
                steps[state](rec, run)
            except StepFailed as f:
                if state in BEFORE_ACTIVATION:
                    self._cleanup_failed(rec)
                    self._transition(rec, State.FAILED, f.code, f.reason, f.figures)
                else:
                    self._roll_back(rec, f.code, f.reason, f.figures)
                run.staged = None

    # Each step does the work of the state it is in, then persists the next state.

    def _step_idle(self, rec: UpdateRecord, run: _Run) -> None:
        ptr = self.store.pointers(rec.model) if rec.model else Pointers()
        rec.from_version = ptr.current
        if rec.action == "remove":
            # Journaled before anything is unloaded or deleted: a restart finishes the removal.
            rec.version = ptr.current or rec.version
            self._transition(rec, State.REMOVING)
            return
        self._transition(rec, State.DOWNLOADING)

    def _step_removing(self, rec: UpdateRecord, run: _Run) -> None:
        self._finish_removal(rec)

    def _finish_removal(self, rec: UpdateRecord) -> None:
        """Unload (requests in flight finish on the model they hold; new ones get 404), then
        delete pointers and versions, then REMOVED. Idempotent: re-run after a crash."""
        name = rec.model
        old = self.sessions.install(None, name)
        if old is not None:
            self.metrics.set_serving(name, None, old.version)
        removed = self.store.remove_model(name)
        self._transition(
            rec,
            State.REMOVED,
            figures={"versions_removed": removed, "was_serving": old.version if old else None},
        )

    def _package_path(self, rec: UpdateRecord) -> Path:
        return self.data_dir / "downloads" / f"{rec.id}.efpkg"

    def _installed_rollback(self, rec: UpdateRecord) -> bool:
        """An asked-for rollback to a version still installed: no download, instant."""
        return bool(
            rec.model
            and rec.version
            and rec.allow_downgrade
            and self.store.is_installed(rec.model, rec.version)
        )

    def _step_download(self, rec: UpdateRecord, run: _Run) -> None:
        from edgefleet.agent.download import DownloadError, fetch

        if self._installed_rollback(rec):
            self._transition(rec, State.VERIFYING, figures={"download": "skipped, installed"})
            return
        try:
            got = fetch(
                rec.source,
                self._package_path(rec),
                sha256=rec.sha256,
                size=rec.size,
                max_bytes=self.config.max_package_bytes,
                timeout_s=self.config.download_timeout_s,
                retries=self.config.download_retries,
                token=self.config.download_token if rec.controller_source else None,
            )
        except DownloadError as e:
            raise StepFailed(e.code, e.message) from e
        except OSError as e:
            raise StepFailed(ReasonCode.DOWNLOAD_FAILED, f"{type(e).__name__}: {e}") from e
        run.package = got.path
        self._transition(
            rec,
            State.VERIFYING,
            figures={"bytes": got.size, "sha256": got.sha256, "resumed_from": got.resumed_from},
        )

    def _policy(self, rec: UpdateRecord) -> VerifyPolicy:
        from edgefleet.keys import load_public_key

        keys = []
        for p in self.config.trusted_keys:
            try:
                keys.append(load_public_key(p))
            except (OSError, ValueError) as e:
                log.error("cannot read trusted key %s: %s", p, e)
        installed = self.store.pointers(rec.model).current if rec.model else None
        return VerifyPolicy(
            trusted_keys=keys,
            revoked_key_ids=list(self.config.revoked_key_ids),
            max_package_bytes=self.config.max_package_bytes,
            max_member_bytes=self.config.max_package_bytes,
            expected_name=rec.model or None,
            installed_version=installed,
            allow_version=rec.version if rec.allow_downgrade and rec.version else None,
            profiles=self.profiles,
            available_providers=self.execution_providers,
            agent_version=agent_version(),
        )

    def _verify(self, rec: UpdateRecord, extract_to: Path | None = None) -> VerifiedPackage:
        try:
            return verify_package(self._package_path(rec), self._policy(rec), extract_to=extract_to)
        except RejectError as e:
            raise StepFailed(e.code, e.message) from e

    def _verify_installed(self, rec: UpdateRecord) -> None:
        """Re-check an installed version: its files against the install record, then trust's
        `check_installed` (its key still trusted and not revoked, the manifest policy)."""
        try:
            inst = self.store.check_integrity(rec.model, rec.version)
        except IntegrityError as e:
            raise StepFailed(ReasonCode.DIGEST_MISMATCH, str(e)) from e
        policy = self._policy(rec)
        manifest = self.store.manifest(rec.model, rec.version)
        try:
            verdict = check_installed(
                manifest,
                inst.get("key_id"),
                inst["member_digests"],
                policy.trust_store(),
                policy.device_facts(),
                policy.clock(),
            )
        except RejectError as e:
            raise StepFailed(e.code, e.message) from e
        rec.profile = manifest.get("profile")
        self._transition(
            rec, State.INSTALLING, figures={"key_id": verdict.key_id, "installed": True}
        )

    def _step_verify(self, rec: UpdateRecord, run: _Run) -> None:
        if self._installed_rollback(rec):
            return self._verify_installed(rec)
        if not rec.model:  # model name unknown until now: read it unverified, then verify by it
            try:
                rec.model = read_name(self._package_path(rec))
            except RejectError as e:
                raise StepFailed(
                    ReasonCode.MANIFEST_INVALID, f"cannot read the package's name: {e}"
                ) from e
            rec.from_version = self.store.pointers(rec.model).current
        vp = self._verify(rec)
        m = vp.manifest
        if rec.version and m["version"] != rec.version:
            raise StepFailed(
                ReasonCode.VERSION_MISMATCH,
                f"package holds version {m['version']}, the update asked for {rec.version}",
            )
        rec.version = m["version"]
        rec.profile = m["profile"]
        self._device_checks(rec, m)
        run.verified = vp
        self._transition(
            rec,
            State.INSTALLING,
            figures={
                "key_id": vp.key_id,
                "providers": vp.providers,
                "cpu_fallback_used": vp.cpu_fallback_used,
            },
            reason_code=ReasonCode.CPU_FALLBACK if vp.cpu_fallback_used else None,
            reason=(
                f"{[ep['name'] for ep in m['execution_providers']]} missing here; the profile allows CPU fallback"
                if vp.cpu_fallback_used
                else None
            ),
        )

    def _device_checks(self, rec: UpdateRecord, manifest: dict[str, Any]) -> None:
        """Free disk and memory: what only the device knows."""
        import psutil

        need = sum(int(m["size"]) for m in manifest["members"].values())
        if not self.store.is_installed(rec.model, rec.version):
            free = shutil.disk_usage(self.data_dir).free
            if need + self.config.disk_headroom_bytes > free:
                raise StepFailed(
                    ReasonCode.DISK_FULL,
                    f"installing needs {need} bytes + {self.config.disk_headroom_bytes} headroom, {free} free",
                )
        # ONNX Runtime needs about twice the weights while it loads them (file + arena).
        model = manifest.get("model") or {}
        weights = [model.get("file", "model.onnx"), *(model.get("external_data") or [])]
        wbytes = sum(
            int(manifest["members"][w]["size"]) for w in weights if w in manifest["members"]
        )
        want_mb = 2.0 * (wbytes or need) / 2**20
        avail_mb = psutil.virtual_memory().available / 2**20
        if self.config.swap.memory_budget_mb is not None:
            avail_mb = min(avail_mb, float(self.config.swap.memory_budget_mb))
        if want_mb + self.config.memory_headroom_mb > avail_mb:
            raise StepFailed(
                ReasonCode.MEMORY_INSUFFICIENT,
                f"the model may use {want_mb:.0f} MB + {self.config.memory_headroom_mb:.0f} MB headroom,"
                f" {avail_mb:.0f} MB available",
            )

    def _step_install(self, rec: UpdateRecord, run: _Run) -> None:
        from edgefleet.agent.fsio import remove_tree

        name, version = rec.model, rec.version
        if self.store.is_installed(name, version):
            try:
                inst = self.store.check_integrity(name, version)
            except IntegrityError as e:
                if version in (
                    self.store.pointers(name).current,
                    self.store.pointers(name).previous,
                ):
                    raise StepFailed(ReasonCode.INTEGRITY, str(e)) from e
                remove_tree(self.store.version_dir(name, version))
                inst = None
        else:
            inst = None
        if inst is None:
            vdir = self.store.version_dir(name, version)
            if vdir.exists():  # an interrupted install left a directory without a record
                remove_tree(vdir)
            vp = self._verify(rec, extract_to=vdir)
            self.store.record_install(
                name,
                version,
                {
                    "member_digests": vp.member_digests,
                    "key_id": vp.key_id,
                    "providers": vp.providers,
                    "cpu_fallback_used": vp.cpu_fallback_used,
                    "installed_at": time.time(),
                    "update_id": rec.id,
                },
            )
        self._transition(rec, State.VALIDATING)

    def _step_validate(self, rec: UpdateRecord, run: _Run) -> None:
        import psutil

        name, version = rec.model, rec.version
        inst = self.store.install_record(name, version)
        vdir = self.store.version_dir(name, version)
        manifest = self.store.manifest(name, version)
        proc = psutil.Process()
        rss0 = proc.memory_info().rss
        try:
            lm = LoadedModel(
                name, version, vdir, manifest, inst["providers"], self._session_options()
            )
        except Exception as e:
            raise StepFailed(
                ReasonCode.LOAD_FAILED, f"ONNX Runtime cannot load the model: {e}"
            ) from e
        fig = Figures(providers=lm.providers, cpu_fallback_used=bool(inst.get("cpu_fallback_used")))
        try:
            inputs, expected = load_samples(vdir / "samples.npz")
            got = run_samples(lm.session, inputs, list(expected))
            n = len(next(iter(got.values())))
            exp = {k: v[:n] for k, v in expected.items()}
            gates = manifest.get("gates") or {}
            atol, rtol = sample_tolerances(gates)
            fig.agreement, fig.max_abs_error, fig.samples = sample_agreement(exp, got, atol, rtol)
            vc = self.config.validation
            fig.p50_ms, fig.p95_ms, fig.runs = benchmark(
                lm.session, inputs, vc.bench_runs, vc.bench_warmup, vc.bench_max_seconds
            )
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise StepFailed(
                ReasonCode.VALIDATION_ERROR, f"cannot run the samples: {type(e).__name__}: {e}"
            ) from e
        except Exception as e:  # onnxruntime raises its own exception types
            raise StepFailed(
                ReasonCode.VALIDATION_ERROR, f"the model failed on its samples: {e}"
            ) from e
        fig.memory_growth_mb = max(0.0, (proc.memory_info().rss - rss0) / 2**20)
        failure = judge(fig, gates)
        if failure is not None:
            raise StepFailed(failure.code, failure.reason, fig.to_dict())
        inst["validation"] = fig.to_dict()
        self.store.record_install(name, version, inst)
        lm.baseline_p95_ms = fig.p95_ms
        lm.memory_mb = fig.memory_growth_mb
        run.staged = lm
        run.figures = fig
        self._transition(rec, State.ACTIVATING, figures=fig.to_dict())

    def _step_activate(self, rec: UpdateRecord, run: _Run) -> None:
        import psutil

        name, version = rec.model, rec.version
        staged = run.staged
        new_mb = (
            staged.memory_mb
            if staged
            else float(
                (self.store.install_record(name, version).get("validation") or {}).get(
                    "memory_growth_mb"
                )
                or 0
            )
        )
        current = self.sessions.get(name)
        if self.config.swap.memory_budget_mb is not None:
            avail = float(self.config.swap.memory_budget_mb) - self.sessions.models_memory_mb()
        else:
            avail = psutil.virtual_memory().available / 2**20
        plan = (
            "overlap"
            if current is None
            else plan_swap(self.config.swap.mode, avail, new_mb, self.config.memory_headroom_mb)
        )
        # Pointers first (the journal already says ACTIVATING): a restart serves the new version.
        prev = (
            rec.from_version if rec.from_version != version else self.store.pointers(name).previous
        )
        self.store.set_pointers(name, Pointers(version, prev))
        try:
            if plan == "overlap":
                lm = staged or self._load(name, version)
                self.sessions.install(lm, name)
            else:
                run.staged = staged = None
                lm = self.sessions.swap_unload_first(name, lambda: self._load(name, version))
        except Exception as e:
            raise StepFailed(ReasonCode.ACTIVATION_FAILED, f"{type(e).__name__}: {e}") from e
        self.metrics.set_serving(name, version, rec.from_version)
        run.staged = None
        self._transition(
            rec,
            State.PROBATION,
            figures={"swap": plan, "available_mb": round(avail, 1), "new_mb": round(new_mb, 1)},
        )

    def _step_probation(self, rec: UpdateRecord, run: _Run) -> None:
        cfg = self.config.probation
        lm = self.sessions.get(rec.model)
        deadline = time.monotonic() + cfg.seconds
        verdict = None
        while time.monotonic() < deadline and not self._stop.is_set():
            if lm is None or lm.version != rec.version:
                verdict = (
                    ReasonCode.PROBATION_REPLACED,
                    "the version under probation is no longer serving",
                )
                break
            n, err, lat = lm.stats.snapshot()
            verdict = judge_probation(n, err, lat, lm.baseline_p95_ms, cfg)
            if verdict or (
                cfg.commit_after_requests is not None and n >= cfg.commit_after_requests
            ):
                break
            time.sleep(min(0.05, cfg.seconds))
        if self._stop.is_set():  # an orderly stop: the next start restarts the window
            rec.stopped_gracefully = True
            self.journal.save(rec)
            return
        n, err, lat = lm.stats.snapshot() if lm else (0, 0, [])
        figures = {
            "requests": n,
            "errors": err,
            "p95_ms": round(float(np.percentile(lat, 95)), 4) if lat else None,
            "baseline_p95_ms": lm.baseline_p95_ms if lm else None,
        }
        if verdict:
            raise StepFailed(verdict[0], verdict[1], figures)
        # Tidy first, so that COMMITTED, once read, means nothing is left to do.
        self.store.prune(rec.model, self.config.keep_versions)
        self.journal.prune(self.config.keep_updates)
        self._discard_download(rec)
        self._transition(rec, State.COMMITTED, figures=figures)

    def _step_rolling_back(self, rec: UpdateRecord, run: _Run) -> None:
        self._restore_pointers(rec)
        self._swap_to_previous(rec)
        self._transition(rec, State.ROLLED_BACK)

    def _roll_back(
        self, rec: UpdateRecord, code: str, reason: str, figures: dict[str, Any] | None = None
    ) -> None:
        self._transition(rec, State.ROLLING_BACK, code, reason, figures)
        self._restore_pointers(rec)
        self._swap_to_previous(rec)
        self._transition(rec, State.ROLLED_BACK, code, reason, figures)

    def _restore_pointers(self, rec: UpdateRecord) -> None:
        if not rec.model:
            return
        if rec.from_version == rec.version:
            return
        self.store.set_pointers(rec.model, Pointers(rec.from_version, None))

    def _swap_to_previous(self, rec: UpdateRecord) -> None:
        name = rec.model
        self._discard_download(rec)
        if rec.from_version is None:
            self.sessions.install(None, name)
            self.metrics.set_serving(name, None, rec.version)
            return
        current = self.sessions.get(name)
        if current is not None and current.version == rec.from_version:
            return
        try:
            lm = self._load(name, rec.from_version)
        except (IntegrityError, OSError, RuntimeError, ValueError) as e:
            log.error("rollback of %s cannot load %s: %s", name, rec.from_version, e)
            return
        self.sessions.install(lm, name)
        self.metrics.set_serving(name, rec.from_version, rec.version)

    def _cleanup_failed(self, rec: UpdateRecord) -> None:
        self._discard_download(rec)
        if rec.model and rec.version and self.store.is_installed(rec.model, rec.version):
            ptr = self.store.pointers(rec.model)
            if rec.version not in (ptr.current, ptr.previous):
                self.store.remove_version(rec.model, rec.version)

    def _discard_download(self, rec: UpdateRecord) -> None:
        from edgefleet.agent.download import discard

        discard(self._package_path(rec))

    # ------------------------------------------------------------------ transitions

    def _transition(
        self,
        rec: UpdateRecord,
        target: State,
        reason_code: str | None = None,
        reason: str | None = None,
        figures: dict[str, Any] | None = None,
    ) -> None:
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
        while time.monotonic() < deadline and marker.exists() and not self._stop.is_set():
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
        )
        for cb in list(self._listeners):
            try:
                cb(ev)
            except Exception:
                log.exception("update listener failed")
