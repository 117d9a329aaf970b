"""The steps that run the new version: VALIDATING, ACTIVATING, PROBATION, and ROLLING_BACK.

VALIDATING stages a loaded session in `Run`, which ACTIVATING installs when memory allows both
versions at once; after a restart there is none, and ACTIVATING loads the version again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgefleet.agent import manifest_parts
from edgefleet.agent.config import ProbationConfig
from edgefleet.agent.journal import UpdateRecord
from edgefleet.agent.sessions import (
    LatencyReference,
    LoadedModel,
    Window,
    judge_probation,
    p95,
    plan_swap,
    probation_windows,
)
from edgefleet.agent.shadow import ShadowSlot, memory_refusal
from edgefleet.agent.states import State, end_of_rollback
from edgefleet.agent.store import Pointers
from edgefleet.agent.update import models
from edgefleet.agent.update.context import UpdateContext
from edgefleet.agent.update.events import StepFailed
from edgefleet.agent.validation import (
    Figures,
    benchmark,
    judge,
    load_samples,
    run_samples,
    sample_agreement,
    sample_tolerances,
)
from edgefleet.wire.message import JsonObject, JsonValue
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.shadow import ShadowError, ShadowSpec
from edgefleet.wire.shadow import parse_spec as parse_shadow


@dataclass
class Run:
    """In-memory companion of an update record while the worker runs it."""

    staged: LoadedModel | None = None  # validated, not yet serving


def step_validate(ctx: UpdateContext, rec: UpdateRecord, run: Run) -> None:
    import psutil

    name, version = rec.model, rec.version
    inst = ctx.store.install_record(name, version)
    vdir = ctx.store.version_dir(name, version)
    manifest = ctx.store.manifest(name, version)
    shadow = _shadow_spec(rec)
    if shadow is not None:
        _shadow_memory_check(ctx, rec)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    try:
        lm = LoadedModel(
            name, version, vdir, manifest, inst["providers"], models.session_options(ctx)
        )
    except Exception as e:
        raise StepFailed(ReasonCode.LOAD_FAILED, f"ONNX Runtime cannot load the model: {e}") from e
    if rec.rollback:  # it ran and committed here: loading it is all that is asked of it
        validation = inst.get("validation") or {}
        lm.baseline_p95_ms = manifest_parts.number(validation, "p95_ms")
        lm.memory_mb = float(manifest_parts.number(validation, "memory_growth_mb") or 0.0)
        run.staged = lm
        ctx.transition(
            rec, State.ACTIVATING, figures={"gates": "skipped: a rollback to a committed version"}
        )
        return
    fig = Figures(providers=lm.providers, cpu_fallback_used=bool(inst.get("cpu_fallback_used")))
    gates = manifest_parts.gates(manifest)
    try:
        inputs, expected = load_samples(vdir / "samples.npz")
        got = run_samples(lm.session, inputs, list(expected))
        n = len(next(iter(got.values())))
        exp = {k: v[:n] for k, v in expected.items()}
        atol, rtol = sample_tolerances(gates)
        fig.agreement, fig.max_abs_error, fig.samples = sample_agreement(exp, got, atol, rtol)
        vc = ctx.config.validation
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
    ctx.store.record_install(name, version, inst)
    lm.baseline_p95_ms = fig.p95_ms
    lm.memory_mb = fig.memory_growth_mb
    figures = fig.to_dict()
    if shadow is not None:
        del lm  # the shadow runs its own session (fewer threads); ACTIVATING loads it again
        outcome = run_shadow(ctx, rec, shadow)
        if outcome is None:  # an orderly stop: the next start validates and shadows again
            return
        figures["shadow"] = outcome
    else:
        run.staged = lm
    ctx.transition(rec, State.ACTIVATING, figures=figures)


def _shadow_spec(rec: UpdateRecord) -> ShadowSpec | None:
    if rec.shadow is None or rec.rollback:
        return None
    try:
        return parse_shadow(rec.shadow)
    except ShadowError as e:
        raise StepFailed(ReasonCode.MANIFEST_INVALID, f"shadow: {e}") from e


def _available_mb(ctx: UpdateContext) -> float:
    import psutil

    budget = ctx.config.swap.memory_budget_mb
    if budget is not None:
        return float(budget) - ctx.sessions.models_memory_mb()
    return float(psutil.virtual_memory().available) / 2**20


def _shadow_memory_check(ctx: UpdateContext, rec: UpdateRecord) -> None:
    """Before loading: the candidate's files x the factor must fit beside what serves."""
    if ctx.sessions.get(rec.model) is None:
        raise StepFailed(
            ReasonCode.SHADOW_NO_SERVING,
            f"nothing serves {rec.model} here: a shadow needs live requests to mirror",
        )
    vdir = ctx.store.version_dir(rec.model, rec.version)
    size = sum(p.stat().st_size for p in vdir.rglob("*") if p.is_file() and p.suffix != ".npz")
    cfg = ctx.config.shadow
    avail = _available_mb(ctx)
    why = memory_refusal(size / 2**20, cfg.memory_factor, avail, ctx.config.memory_headroom_mb)
    if why is not None:
        raise StepFailed(
            ReasonCode.SHADOW_MEMORY,
            why,
            {"model_mb": round(size / 2**20, 2), "available_mb": round(avail, 1)},
        )


def run_shadow(ctx: UpdateContext, rec: UpdateRecord, spec: ShadowSpec) -> JsonObject | None:
    """Serve beside the current version until the controller decides: the last figures when
    it promotes the candidate, None after an orderly stop; StepFailed when it is dropped, when
    the serving version changed, or when no decision came within ``shadow.max_seconds``."""
    cfg = ctx.config.shadow
    serving = ctx.sessions.get(rec.model)
    if serving is None:
        raise StepFailed(ReasonCode.SHADOW_NO_SERVING, f"nothing serves {rec.model} here")
    try:
        so = models.session_options(ctx)
        so.intra_op_num_threads = max(1, cfg.threads)  # type: ignore[attr-defined]
        cand = LoadedModel(
            rec.model,
            rec.version,
            ctx.store.version_dir(rec.model, rec.version),
            ctx.store.manifest(rec.model, rec.version),
            ctx.store.install_record(rec.model, rec.version)["providers"],
            so,
        )
    except Exception as e:
        raise StepFailed(ReasonCode.LOAD_FAILED, f"cannot load the shadow: {e}") from e
    slot = ShadowSlot(
        cand,
        serving.version,
        spec,
        lambda f: ctx.emit_shadow(rec, f.to_dict()),
        queue_max=cfg.queue,
        compare=spec.compare,
        queue_bytes=cfg.queue_bytes,
        nice=cfg.nice,
    )
    slot.start()
    ctx.sessions.observers = [*ctx.sessions.observers, slot.observe]  # copy on write
    deadline = time.monotonic() + cfg.max_seconds
    failure: tuple[ReasonCode, str] | None = None
    try:
        while True:
            if ctx.stop.is_set():
                rec.stopped_gracefully = True
                ctx.journal.save(rec)
                return None
            decision = ctx.shadow_board.decision(rec.model, rec.version)
            now_serving = ctx.sessions.get(rec.model)
            if decision == "promote":
                break
            if decision == "drop":
                failure = (ReasonCode.SHADOW_DROPPED, "the desired state no longer wants it")
                break
            if now_serving is None or now_serving.version != serving.version:
                failure = (
                    ReasonCode.SHADOW_DROPPED,
                    f"{serving.version}, the version it shadowed, stopped serving",
                )
                break
            if time.monotonic() > deadline:
                failure = (
                    ReasonCode.SHADOW_EXPIRED,
                    f"no decision from the controller within {cfg.max_seconds:g}s",
                )
                break
            time.sleep(0.05)
    finally:
        ctx.sessions.observers = [o for o in ctx.sessions.observers if o != slot.observe]
        slot.stop()
        final = slot.report().to_dict()
        del cand, slot
    if failure is not None:
        raise StepFailed(failure[0], failure[1], {"shadow": final})
    return final


def step_activate(ctx: UpdateContext, rec: UpdateRecord, run: Run) -> None:
    import psutil

    name, version = rec.model, rec.version
    staged = run.staged
    if staged is not None:
        new_mb = staged.memory_mb
    else:
        validation = ctx.store.install_record(name, version).get("validation") or {}
        new_mb = float(manifest_parts.number(validation, "memory_growth_mb") or 0)
    current = ctx.sessions.get(name)
    swap = ctx.config.swap
    if swap.memory_budget_mb is not None:
        avail = float(swap.memory_budget_mb) - ctx.sessions.models_memory_mb()
    else:
        avail = psutil.virtual_memory().available / 2**20
    plan = (
        "overlap"
        if current is None
        else plan_swap(swap.mode, avail, new_mb, ctx.config.memory_headroom_mb)
    )
    if current is not None and current.version == rec.from_version:
        # What the outgoing version served with here is what probation compares the new one to.
        ctx.store.add_serving_latencies(
            name, current.version, current.stats.drain(), ctx.config.probation.history_requests
        )
    # Pointers first (the journal already says ACTIVATING): a restart serves the new version.
    prev = rec.from_version if rec.from_version != version else ctx.store.pointers(name).previous
    ctx.store.set_pointers(name, Pointers(version, prev))
    try:
        if plan == "overlap":
            ctx.sessions.install(staged or models.load(ctx, name, version), name)
        else:
            run.staged = staged = None
            ctx.sessions.swap_unload_first(name, lambda: models.load(ctx, name, version))
    except Exception as e:
        raise StepFailed(ReasonCode.ACTIVATION_FAILED, f"{type(e).__name__}: {e}") from e
    ctx.metrics.set_serving(name, version, rec.from_version)
    run.staged = None
    ctx.transition(
        rec,
        State.PROBATION,
        figures={"swap": plan, "available_mb": round(avail, 1), "new_mb": round(new_mb, 1)},
    )


def latency_reference(
    ctx: UpdateContext, rec: UpdateRecord, lm: LoadedModel | None
) -> LatencyReference | None:
    """Like with like: the outgoing version's per-sample serving p95 on this device (its
    serving record), judged with the rollout's ratio or the config's. Without enough of that
    (a first install), the larger of the package's recorded benchmark p95 and the on-device
    validation p95, with the wider first-install tolerance. None: nothing to compare with."""
    cfg = ctx.config.probation
    record = ctx.store.serving_record(rec.model)
    if (
        rec.from_version
        and record is not None
        and record[0] == rec.from_version
        and len(record[1]) >= max(cfg.min_requests, 1)
    ):
        return LatencyReference(
            p95(record[1]),
            rec.max_p95_ratio or cfg.max_p95_ratio,
            cfg.latency_slack_ms,
            f"{rec.from_version} serving here ({len(record[1])} requests)",
        )
    bench = ctx.store.manifest(rec.model, rec.version).get("benchmark")
    packaged = manifest_parts.number(bench, "p95_ms") if isinstance(bench, dict) else None
    device = lm.baseline_p95_ms if lm is not None else None
    options = [
        (v, src)
        for v, src in ((packaged, "the package's benchmark"), (device, "the on-device validation"))
        if v is not None and v > 0
    ]
    if not options:
        return None
    value, source = max(options)
    return LatencyReference(value, cfg.first_install_factor, cfg.first_install_slack_ms, source)


def early_commit(
    requests: int, windows: list[Window], reference: LatencyReference | None, cfg: ProbationConfig
) -> bool:
    """``commit_after_requests`` healthy requests end probation early, once the latency (when
    there is a reference) has been judged in a window and the last judged window is within it."""
    if cfg.commit_after_requests is None or requests < cfg.commit_after_requests:
        return False
    if reference is None:
        return True
    judged = [w for w in windows if w.p95_ms is not None]
    return bool(judged) and not judged[-1].breach


def step_probation(ctx: UpdateContext, rec: UpdateRecord, run: Run) -> None:
    cfg = ctx.config.probation
    lm = ctx.sessions.get(rec.model)
    if rec.rollback and lm is not None and lm.version == rec.version:
        # Back on a version this device committed: not held to probation again.
        return commit(ctx, rec, lm, {"probation": "skipped: a rollback to a committed version"})
    reference = latency_reference(ctx, rec, lm)
    deadline = time.monotonic() + cfg.seconds
    # The windows start with the first request this version served: it serves from the swap in
    # ACTIVATING on, a moment before this step begins.
    served0 = lm.stats.snapshot()[2] if lm is not None else []
    start = min([time.monotonic(), *(s.at for s in served0[:1])])
    verdict = None
    while time.monotonic() < deadline and not ctx.stop.is_set():
        if lm is None or lm.version != rec.version:
            verdict = (
                ReasonCode.PROBATION_REPLACED,
                "the version under probation is no longer serving",
            )
            break
        n, err, served = lm.stats.snapshot()
        windows = probation_windows(served, start, time.monotonic(), reference, cfg)
        verdict = judge_probation(n, err, windows, reference, cfg)
        if verdict or early_commit(n, windows, reference, cfg):
            break
        time.sleep(min(0.05, cfg.seconds))
    if ctx.stop.is_set():  # an orderly stop: the next start restarts the window
        rec.stopped_gracefully = True
        ctx.journal.save(rec)
        return
    n, err, served = lm.stats.snapshot() if lm else (0, 0, [])
    windows = probation_windows(served, start, time.monotonic(), reference, cfg, final=True)
    if verdict is None and lm is not None and lm.version == rec.version:
        verdict = judge_probation(n, err, windows, reference, cfg)
    ok = [s.ms_per_sample for s in served if s.ok and s.at >= start]
    window_figures: list[JsonValue] = [
        {"requests": w.requests, "p95_ms": w.p95_ms, "breach": w.breach} for w in windows[-16:]
    ]
    figures: JsonObject = {
        "requests": n,
        "errors": err,
        "p95_ms_per_sample": round(p95(ok), 4) if ok else None,
        "reference": reference.to_dict() if reference else None,
        "windows": window_figures,
    }
    if verdict:
        raise StepFailed(verdict[0], verdict[1], figures)
    assert lm is not None
    commit(ctx, rec, lm, figures)


def commit(ctx: UpdateContext, rec: UpdateRecord, lm: LoadedModel, figures: JsonObject) -> None:
    """COMMITTED: the version joins the model's committed history and its probation latencies
    start its serving record; tidied first, so that COMMITTED, once read, means nothing is left
    to do."""
    ctx.store.mark_committed(rec.model, rec.version)
    ctx.store.add_serving_latencies(
        rec.model, rec.version, lm.stats.drain(), ctx.config.probation.history_requests
    )
    ctx.store.prune(rec.model, ctx.config.keep_versions)
    ctx.journal.prune(ctx.config.keep_updates)
    ctx.discard_download(rec)
    ctx.transition(rec, State.COMMITTED, figures=figures)


def step_rolling_back(ctx: UpdateContext, rec: UpdateRecord, run: Run) -> None:
    models.restore_pointers(ctx, rec)
    models.swap_to_previous(ctx, rec)
    models.drop_rolled_back(ctx, rec)
    ctx.transition(rec, end_of_rollback(rec.rollback))
