"""The steps that run the new version: VALIDATING, ACTIVATING, PROBATION, and ROLLING_BACK.

VALIDATING stages a loaded session in `Run`, which ACTIVATING installs when memory allows both
versions at once; after a restart there is none, and ACTIVATING loads the version again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edgefleet.agent import manifest_parts
from edgefleet.agent.journal import UpdateRecord
from edgefleet.agent.sessions import LoadedModel, judge_probation, plan_swap
from edgefleet.agent.states import State
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
from edgefleet.wire.message import JsonObject
from edgefleet.wire.reasons import ReasonCode


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
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    try:
        lm = LoadedModel(
            name, version, vdir, manifest, inst["providers"], models.session_options(ctx)
        )
    except Exception as e:
        raise StepFailed(ReasonCode.LOAD_FAILED, f"ONNX Runtime cannot load the model: {e}") from e
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
    run.staged = lm
    ctx.transition(rec, State.ACTIVATING, figures=fig.to_dict())


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


def step_probation(ctx: UpdateContext, rec: UpdateRecord, run: Run) -> None:
    cfg = ctx.config.probation
    lm = ctx.sessions.get(rec.model)
    deadline = time.monotonic() + cfg.seconds
    verdict = None
    while time.monotonic() < deadline and not ctx.stop.is_set():
        if lm is None or lm.version != rec.version:
            verdict = (
                ReasonCode.PROBATION_REPLACED,
                "the version under probation is no longer serving",
            )
            break
        n, err, lat = lm.stats.snapshot()
        verdict = judge_probation(n, err, lat, lm.baseline_p95_ms, cfg)
        if verdict or (cfg.commit_after_requests is not None and n >= cfg.commit_after_requests):
            break
        time.sleep(min(0.05, cfg.seconds))
    if ctx.stop.is_set():  # an orderly stop: the next start restarts the window
        rec.stopped_gracefully = True
        ctx.journal.save(rec)
        return
    n, err, lat = lm.stats.snapshot() if lm else (0, 0, [])
    figures: JsonObject = {
        "requests": n,
        "errors": err,
        "p95_ms": round(float(np.percentile(lat, 95)), 4) if lat else None,
        "baseline_p95_ms": lm.baseline_p95_ms if lm else None,
    }
    if verdict:
        raise StepFailed(verdict[0], verdict[1], figures)
    # Tidy first, so that COMMITTED, once read, means nothing is left to do.
    ctx.store.prune(rec.model, ctx.config.keep_versions)
    ctx.journal.prune(ctx.config.keep_updates)
    ctx.discard_download(rec)
    ctx.transition(rec, State.COMMITTED, figures=figures)


def step_rolling_back(ctx: UpdateContext, rec: UpdateRecord, run: Run) -> None:
    models.restore_pointers(ctx, rec)
    models.swap_to_previous(ctx, rec)
    ctx.transition(rec, State.ROLLED_BACK)
