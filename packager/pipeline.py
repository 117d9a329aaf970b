"""``package_model``: one source model -> one signed, validated package per hardware profile.

Per profile: build every candidate recipe the target supports (vendor backends fall back to ONNX
Runtime when their extra is absent), validate it against the source model, time it on the host;
when a fast candidate misses its gate, keep its most sensitive nodes in FP32 until it passes
(accuracy-aware search); keep the fastest within the gate (accelerators measured off-target: the
cheapest by the cost model), then write samples, drift reference, lineage and the manifest, and
sign the ``.efpkg`` with ``edgefleet.wire.package.build_package``. A profile whose gate no
candidate meets writes no package; its result names the gate, the margin and, when the validation
set is too small to tell, how many samples would.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.packager.backends.verify import combine, recipe_constraints, summary, verify
from edgefleet.packager.benchmark import Latency, host_info, measure, measure_interleaved
from edgefleet.packager.evaluate import (
    Judging,
    JudgingError,
    Metrics,
    compare,
    io_spec,
    run_all,
    session,
)
from edgefleet.packager.npzio import load_npz, save_npz
from edgefleet.packager.profiles import Profile, get_profile, resolve_target, unmet_requirements
from edgefleet.packager.quantize import (
    BuildError,
    build_candidate,
    model_size,
    nothing_to_quantize,
    preprocess,
    save_model,
)
from edgefleet.packager.recipe import Recipe
from edgefleet.packager.search import (
    HEAVY_OPS,
    CandidateResult,
    GateMiss,
    check_gate,
    choose,
    closest_miss,
    judge,
)

CPU = "CPUExecutionProvider"
N_SAMPLES = 32
#: Accuracy-aware search: calibration samples used to rank node sensitivity, the most nodes it
#: may keep in FP32 (and at most this fraction of the quantized ones), and how many failed
#: candidates per profile it tries to recover.
SENSITIVITY_SAMPLES = 16
MAX_FP32_NODES = 32
MAX_FP32_FRACTION = 0.25
MAX_RECOVERIES = 2
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes; protobuf cannot serialise a model over 2 GiB
Progress = Callable[[str, str, int, int], None]  # (profile id, message, done, total)


class PackagingError(RuntimeError):
    """Inputs that make packaging impossible (bad data, bad key); the message says which."""


@dataclass
class ProfileResult:
    profile: str
    status: str  # "packaged" | "gate_failed" | "error"
    package: Path | None = None
    chosen: str | None = None
    candidates: list[CandidateResult] = field(default_factory=list)
    validated_on: str = CPU
    provider_on_host: bool = False
    failure: dict[str, Any] | None = None
    metrics: Metrics | None = None
    latency: Latency | None = None
    size_bytes: int | None = None
    target_provider: str = CPU
    rank: str = "latency"
    target: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    backend_note: str | None = None
    warnings: list[str] = field(default_factory=list)
    #: Wall-clock seconds this profile's search and packaging took. Builds another profile
    #: made first are reused, not repeated: their time counts where they were built.
    seconds: float = 0.0
    #: The FP32 source timed in turns with the finalists (`_retime_finalists`), when they were.
    source_interleaved: Latency | None = None

    @property
    def ok(self) -> bool:
        return self.status == "packaged"

    @property
    def off_target(self) -> bool:
        """The figures were measured on another provider than the profile's own."""
        return self.validated_on != self.target_provider

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "status": self.status,
            "package": str(self.package) if self.package else None,
            "chosen": self.chosen,
            "validated_on": self.validated_on,
            "provider_on_host": self.provider_on_host,
            "target_provider": self.target_provider,
            "measured_off_target": self.off_target,
            "ranked_by": self.rank,
            "target": self.target,
            "backend": self.backend,
            "backend_note": self.backend_note,
            "warnings": self.warnings,
            "seconds": self.seconds,
            "validation": self.metrics.to_dict() if self.metrics else None,
            "benchmark": self.latency.to_dict() if self.latency else None,
            "size_bytes": self.size_bytes,
            "failure": self.failure,
            "candidates": [c.to_dict() for c in self.candidates],
        }


@dataclass
class PackageReport:
    name: str
    version: str
    source: dict[str, Any]
    profiles: list[ProfileResult]

    @property
    def ok(self) -> bool:
        return all(p.ok for p in self.profiles)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "edgefleet.package-report/v1",
            "name": self.name,
            "version": self.version,
            "ok": self.ok,
            "source": self.source,
            "profiles": [p.to_dict() for p in self.profiles],
        }


@dataclass
class _Source:
    """Everything about the source model that every profile shares."""

    model: Path
    prepared: Path
    preprocessing: dict[str, Any]
    external: bool
    calibration: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    outputs: dict[str, np.ndarray]
    latency: Latency
    size_bytes: int
    cal_outputs: dict[str, np.ndarray] | None = None
    judging: Judging = field(default_factory=Judging)

    def compare(self, outputs: dict[str, np.ndarray], *, labels: bool = True) -> Metrics:
        """``outputs`` (on the validation inputs) judged against the source's."""
        return compare(self.outputs, outputs, self.labels if labels else None, self.judging)


def _needs_external(model: Path, force: bool) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data

    if force:
        return True
    proto = onnx.load(str(model), load_external_data=False)
    if any(uses_external_data(t) for t in proto.graph.initializer):
        return True
    return model.stat().st_size > EXTERNAL_DATA_THRESHOLD


def _load_data(path: Path, input_names: Sequence[str], what: str) -> dict[str, np.ndarray]:
    try:
        data = load_npz(path)
    except (OSError, ValueError) as exc:
        raise PackagingError(f"{what} file {path}: cannot read: {exc}") from exc
    missing = [n for n in input_names if n not in data]
    if missing:
        raise PackagingError(
            f"{what} file {path} lacks array(s) for model input(s) {missing}; has {sorted(data)}"
        )
    sizes = {len(data[n]) for n in input_names}
    if len(sizes) != 1 or 0 in sizes:
        raise PackagingError(f"{what} file {path}: inputs need the same non-zero sample count")
    return data


def _prepare_source(
    model: Path,
    calibration: Path,
    validation: Path,
    work: Path,
    *,
    force_external: bool,
    bench: dict[str, Any],
    judging: Judging | None = None,
) -> _Source:
    try:
        sess = session(model, threads=bench["threads"])
    except Exception as exc:
        raise PackagingError(f"source model {model} does not load: {exc}") from exc
    names = [i.name for i in sess.get_inputs()]
    cal = _load_data(calibration, names, "calibration")
    val = _load_data(validation, names, "validation")
    inputs = {n: val[n] for n in names}
    labels = val.get("labels")
    if labels is not None and len(labels) != len(inputs[names[0]]):
        raise PackagingError(f"validation file {validation}: 'labels' length differs from inputs")
    judging = _judging(val, judging, validation)
    outputs = run_all(sess, inputs)
    try:
        compare(outputs, outputs, judging=judging)  # a declared kind must fit the outputs
    except JudgingError as exc:
        raise PackagingError(f"validation: {exc}") from exc
    external = _needs_external(model, force_external)
    prep_dir = work / "prepared"
    prep_dir.mkdir(parents=True, exist_ok=True)
    prepared, info = preprocess(model, prep_dir / "model.onnx", external=external)
    return _Source(
        judging=judging,
        model=model,
        prepared=prepared,
        preprocessing=info,
        external=external,
        calibration={n: cal[n] for n in names},
        inputs=inputs,
        labels=labels,
        outputs=outputs,
        latency=measure(sess, inputs, runs=bench["runs"], max_seconds=bench["seconds"]),
        size_bytes=model_size(model),
    )


def _judging(val: dict[str, np.ndarray], given: Judging | None, path: Path) -> Judging:
    """The output kind to judge by: given (the CLI) over the validation file's own metadata
    (``output_kind``, ``output_name``, ``output_threshold`` arrays) over inference."""
    try:
        kind = str(val["output_kind"].reshape(-1)[0]) if "output_kind" in val else None
        name = str(val["output_name"].reshape(-1)[0]) if "output_name" in val else None
        thr = float(val["output_threshold"].reshape(-1)[0]) if "output_threshold" in val else None
        given = given or Judging()
        return Judging(
            given.kind or kind,
            given.output or name,
            given.threshold if given.threshold is not None else thr,
        )
    except (JudgingError, ValueError, TypeError, IndexError) as exc:
        raise PackagingError(f"validation file {path}: output metadata: {exc}") from exc


def _recipe_key(recipe: Recipe) -> str:
    d = recipe.to_dict()
    d.pop("id")
    d.pop("only_if_needed", None)  # when to build it, not what is built
    return json.dumps(d, sort_keys=True, default=str)


@dataclass
class _Built:
    model: Path | None
    metrics: Metrics | None
    latency: Latency | None
    size: int | None
    error: str | None
    info: dict[str, Any] = field(default_factory=dict)
    build_s: float | None = None


def _new_dir(work: Path) -> Path:
    out = work / "candidates" / f"{len(list((work / 'candidates').glob('*')))}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def _build_and_measure(
    recipe: Recipe, src: _Source, work: Path, provider: str, bench: dict[str, Any]
) -> _Built:
    out = _new_dir(work) / "model.onnx"
    info: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        build_candidate(
            recipe,
            source=src.model,
            prepared=src.prepared,
            out=out,
            calibration=src.calibration,
            external=src.external,
            info=info,
        )
        build_s = time.perf_counter() - start
        sess = session(out, providers=[provider], threads=bench["threads"])
        metrics = src.compare(run_all(sess, src.inputs))
        latency = measure(sess, src.inputs, runs=bench["runs"], max_seconds=bench["seconds"])
    except BuildError as exc:
        return _Built(None, None, None, None, str(exc), build_s=time.perf_counter() - start)
    except Exception as exc:
        return _Built(None, None, None, None, f"model does not run: {type(exc).__name__}: {exc}")
    return _Built(out, metrics, latency, model_size(out), None, info, build_s)


def fp32_compute_nodes(model: Path) -> int:
    """Compute-heavy nodes (:data:`~edgefleet.packager.search.HEAVY_OPS`) left in FP32.

    A node is low precision when an input comes from a DequantizeLinear (QDQ) or is FP16 (an
    FP16 initializer, or a Cast to FP16); every other heavy node runs in FP32.
    """
    import onnx
    from onnx import TensorProto

    proto = onnx.load(str(model), load_external_data=False)
    fp16_inits = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT16}
    producer = {o: n for n in proto.graph.node for o in n.output}

    def low(name: str) -> bool:
        if name in fp16_inits:
            return True
        p = producer.get(name)
        if p is None:
            return False
        if p.op_type == "DequantizeLinear":
            return True
        if p.op_type == "Cast":
            to = next((a.i for a in p.attribute if a.name == "to"), None)
            return to == TensorProto.FLOAT16
        return False

    return sum(
        1
        for n in proto.graph.node
        if n.op_type in HEAVY_OPS and not any(low(i) for i in n.input if i)
    )


def resolve_backend(recipe: Recipe) -> tuple[Recipe, str | None]:
    """The recipe to build and, when a vendor backend cannot run here, why ORT builds it instead."""
    if recipe.backend == "ort":
        return recipe, None
    from dataclasses import replace

    from edgefleet.packager.backends import BackendUnavailable, get

    try:
        get(recipe.backend)
    except BackendUnavailable as exc:
        note = f"{recipe.backend} unavailable ({exc}); fell back to ort"
        return replace(recipe, backend="ort", backend_options={}), note
    return recipe, None


def _samples(src: _Source) -> dict[str, np.ndarray]:
    arrays = {f"input:{k}": v[:N_SAMPLES] for k, v in src.inputs.items()}
    arrays.update({f"output:{k}": v[:N_SAMPLES] for k, v in src.outputs.items()})
    return arrays


def _device_gates(
    profile: Profile, src: _Source, model: Path
) -> tuple[dict[str, Any], GateMiss | None]:
    """Gates for the device's smoke test, widened to what this host measured on the samples."""
    sess = session(model)
    sample_inputs = {k: v[:N_SAMPLES] for k, v in src.inputs.items()}
    got = run_all(sess, sample_inputs)
    ref = {k: v[:N_SAMPLES] for k, v in src.outputs.items()}
    m = compare(ref, got, judging=src.judging)
    g = profile.device_gates
    atol = max(g.sample_atol, float(np.ceil(m.max_abs_error * 2 * 1e4) / 1e4))
    gates = {
        "max_p95_ms": g.max_p95_ms,
        "max_memory_mb": g.max_memory_mb,
        "sample_atol": atol,
        "sample_rtol": g.sample_rtol,
        "min_sample_agreement": g.min_sample_agreement,
    }
    miss = None
    if m.agreement < g.min_sample_agreement:
        miss = GateMiss(
            "min_sample_agreement",
            g.min_sample_agreement,
            m.agreement,
            m.agreement - g.min_sample_agreement,
        )
    return gates, miss


def _drift_reference(src: _Source, bench: dict[str, Any], what: str) -> dict[str, Any]:
    import logging

    from edgefleet.drift import build_reference, reference_warnings

    sess = session(src.model, threads=bench["threads"])
    ref = build_reference(src.calibration, run_all(sess, src.calibration))
    ref["warnings"] = reference_warnings(ref)  # features too thinly sampled to watch
    if ref["warnings"]:  # one line at packaging time; every feature's line is in the package
        summary = drift_reference_summary(ref["warnings"])
        logging.getLogger(__name__).warning("%s: %s", what, summary)
    return ref


def drift_reference_summary(warnings: list[str], named: int = 4) -> str:
    """One line for a drift reference's per-feature warnings (a model of 64 inputs can have
    dozens): how many, the first few names, and where the rest are."""
    names = [w.split(":", 1)[0] for w in warnings]
    shown = ", ".join(names[:named]) + (
        f" and {len(names) - named} more" if len(names) > named else ""
    )
    return (
        f"drift reference: {len(names)} feature(s) watched by their range only, not their "
        f"distribution ({shown}); each one's reason is in the manifest "
        "(drift_reference.warnings)"
    )


def package_model(
    model: Path,
    *,
    name: str,
    version: str,
    profiles: Sequence[Profile | str],
    calibration: Path,
    validation: Path,
    key: Path,
    out_dir: Path,
    key_passphrase: str | None = None,
    git_commit: str | None = None,
    training_run: str | None = None,
    expires_days: float | None = None,
    bench_runs: int = 200,
    bench_seconds: float = 2.0,
    threads: int = 1,
    force_external_data: bool = False,
    work_dir: Path | None = None,
    progress: Progress | None = None,
    now: datetime | None = None,
    strict: bool = False,
    judging: Judging | None = None,
) -> PackageReport:
    """Package ``model`` for each profile; see the module docstring. Never raises on a gate miss.

    ``strict``: a gate the validation set is too small to resolve (see
    :mod:`edgefleet.packager.search`) fails the candidate instead of passing on the estimate.
    ``judging``: how agreement is judged (:class:`~edgefleet.packager.evaluate.Judging`: output
    kind, output, threshold); by default the validation file's own ``output_kind`` /
    ``output_name`` / ``output_threshold`` arrays, else inferred from the outputs' shapes.
    """
    import onnxruntime as ort

    from edgefleet.keys import load_private_key
    from edgefleet.packager.lineage import lineage
    from edgefleet.wire.manifest import FORMAT, format_time, now_utc
    from edgefleet.wire.package import build_package
    from edgefleet.wire.semver import InvalidVersion, parse_version

    model, out_dir = Path(model), Path(out_dir)
    try:
        parse_version(version)
    except InvalidVersion as exc:
        raise PackagingError(f"--version {version!r} is not a semantic version: {exc}") from exc
    try:
        private_key = load_private_key(Path(key), key_passphrase)
    except Exception as exc:
        raise PackagingError(f"signing key {key}: {exc}") from exc
    resolved = [p if isinstance(p, Profile) else get_profile(p) for p in profiles]
    if not resolved:
        raise PackagingError("no profile given (use --profile ID or --all-profiles)")
    bench = {"runs": bench_runs, "seconds": bench_seconds, "threads": threads}
    now = now or now_utc()
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-pkg-", dir=work_dir))
    notify = progress or (lambda *_: None)
    try:
        notify("source", "loading and pre-processing the source model", 0, 1)
        src = _prepare_source(
            model,
            calibration,
            validation,
            tmp,
            force_external=force_external_data,
            bench=bench,
            judging=judging,
        )
        shared: dict[str, Any] = {
            "samples": save_npz(tmp / "samples.npz", _samples(src)),
            "drift": _drift_reference(src, bench, f"{name} {version}"),
            "lineage": lineage(
                model,
                calibration,
                validation,
                git_commit_value=git_commit,
                training_run=training_run,
            ),
            "host": host_info(threads),
        }
        notify("source", "source ready", 1, 1)
        available = set(ort.get_available_providers())
        cache: dict[str, _Built] = {}
        results = []
        for profile in resolved:
            started = time.perf_counter()
            results.append(
                _package_profile(
                    profile,
                    src,
                    tmp,
                    cache,
                    available,
                    bench,
                    shared,
                    notify,
                    manifest_base={
                        "format": FORMAT,
                        "name": name,
                        "version": version,
                        "created": format_time(now),
                        "expires": (
                            format_time(now + timedelta(days=expires_days))
                            if expires_days
                            else None
                        ),
                    },
                    write=lambda manifest, files: build_package(
                        out_dir, manifest, files, private_key, now=now
                    ),
                    strict=strict,
                )
            )
            results[-1].seconds = time.perf_counter() - started
        source_info = {
            "model": str(model),
            "sha256": shared["lineage"]["source_sha256"],
            "size_bytes": src.size_bytes,
            "p50_ms": src.latency.p50_ms,
            "p95_ms": src.latency.p95_ms,
            "accuracy": src.compare(src.outputs).source_accuracy,
            "output_kind": src.compare(src.outputs).output_kind,
            "external_data": src.external,
            "preprocessing": src.preprocessing,
        }
        return PackageReport(name, version, source_info, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _package_profile(
    profile: Profile,
    src: _Source,
    work: Path,
    cache: dict[str, _Built],
    available: set[str],
    bench: dict[str, Any],
    shared: dict[str, Any],
    notify: Progress,
    *,
    manifest_base: dict[str, Any],
    write: Callable[[dict[str, Any], dict[str, Path]], Path],
    strict: bool = False,
) -> ProfileResult:
    primary = profile.provider_names[0]
    on_host = primary in available
    provider = primary if on_host else CPU
    rank = "cost" if profile.accelerator and not on_host else "latency"
    target = resolve_target(profile.target or {}, shared["host"].get("cpu_flags", []))
    result = ProfileResult(
        profile.id,
        "error",
        validated_on=provider,
        provider_on_host=on_host,
        target_provider=primary,
        rank=rank,
        target={k: {"value": v, "how": how} for k, (v, how) in target.items()},
    )
    total = len(profile.candidates) + 1
    ctx = _Search(profile, src, work, cache, {}, provider, bench, strict, rank)
    built = ctx.built
    recipes: dict[str, Recipe] = {}
    for i, recipe in enumerate(profile.candidates):
        notify(profile.id, f"candidate {recipe.id}", i, total)
        unmet = unmet_requirements(recipe.requires, target)
        passed = next((c.candidate for c in result.candidates if c.accepted), None)
        if unmet is None and recipe.only_if_needed and passed is not None:
            unmet = f"not needed: {passed} already met its gates"
        effective, note = resolve_backend(recipe)
        if unmet is None:
            unmet = nothing_to_quantize(effective, src.prepared)
        if unmet is not None:
            result.candidates.append(
                CandidateResult(recipe.id, recipe.to_dict(), skipped=unmet, measured_on=None)
            )
            continue
        recipes[recipe.id] = effective
        cr = _evaluate(ctx, effective)
        cr.recipe = recipe.to_dict()
        cr.backend_note = note
        result.candidates.append(cr)
    _recover(ctx, result, recipes)
    if rank == "latency":
        _retime_finalists(ctx, result)
    best = choose(result.candidates, rank=rank)
    notify(profile.id, "writing package" if best else "no candidate within gate", total - 1, total)
    if best is None:
        result.status = "gate_failed"
        closest = closest_miss(result.candidates)
        unresolved = [v.to_dict() for v in closest.unresolved] if closest else []
        reason = (
            "no candidate met its gates" if closest else "every candidate failed to build or run"
        )
        if strict and unresolved:
            reason += " (--strict: the validation set is too small to resolve a gate)"
        result.failure = {
            "reason": reason,
            "closest_candidate": closest.candidate if closest else None,
            "gates": [m.to_dict() for m in closest.misses] if closest else [],
            "errors": {c.candidate: c.error for c in result.candidates if c.error},
            "refused": {c.candidate: c.violations[0] for c in result.candidates if c.violations},
            "unresolved": unresolved,
        }
        notify(profile.id, "gate failed", total, total)
        return result
    b = built[best.candidate]
    assert b.model is not None and b.metrics is not None and b.latency is not None
    result.backend, result.backend_note = best.backend, best.backend_note
    result.warnings = [f"{best.candidate}: {v.describe()}" for v in best.unresolved]
    if result.off_target:
        result.warnings.append(
            f"measured on {provider}, not the profile's {primary}: figures do not predict the target"
        )
    gates, sample_miss = _device_gates(profile, src, b.model)
    if sample_miss is not None:
        best.chosen, best.accepted = False, False
        best.reason = f"failed gate: {sample_miss.describe()}"
        result.status = "gate_failed"
        result.failure = {
            "reason": "the chosen candidate disagrees with the source on the device samples",
            "closest_candidate": best.candidate,
            "gates": [sample_miss.to_dict()],
            "errors": {},
            "unresolved": [],
        }
        return result
    stage = work / "stage" / profile.id
    stage.mkdir(parents=True, exist_ok=True)
    final = _stage_model(b.model, stage / "model.onnx", external=src.external)
    files = {"model.onnx": final, "samples.npz": shared["samples"]}
    ext_members = []
    data = final.with_name("model.onnx.data")
    if data.exists():
        files["model.onnx.data"] = data
        ext_members.append("model.onnx.data")
    result.metrics, result.latency, result.size_bytes = b.metrics, b.latency, model_size(final)
    if best.timing is not None and best.p50_ms is not None and best.p95_ms is not None:
        result.latency = Latency(best.p50_ms, best.p95_ms, int(best.timing["runs"]))
    manifest = _manifest(
        profile, src, best, result, shared, gates, final, ext_members, manifest_base, on_host
    )
    manifest["quantization"]["build"] = b.info
    result.package = write(manifest, files)
    result.status, result.chosen = "packaged", best.candidate
    notify(profile.id, "packaged", total, total)
    return result


@dataclass(frozen=True)
class _Search:
    """What every candidate of one profile is built, measured and judged with.

    ``cache`` (builds by provider and recipe, shared by all profiles) and ``built`` (this
    profile's builds by candidate id) are filled as the search goes; the rest is fixed.
    """

    profile: Profile
    src: _Source
    work: Path
    cache: dict[str, _Built]
    built: dict[str, _Built]
    provider: str
    bench: dict[str, Any]
    strict: bool
    rank: str


#: Accepted candidates within this factor of the fastest are timed again, in turns, before the
#: choice (at most `MAX_FINALISTS` of them, the fastest first).
FINALIST_MARGIN = 1.5
MAX_FINALISTS = 4


def _retime_finalists(ctx: _Search, result: ProfileResult) -> None:
    """Time the accepted candidates close to the fastest again, in turns with each other and
    the FP32 source (`benchmark.measure_interleaved`), and rank them on those figures.

    Each candidate was first timed alone, one after another: on a shared host a load peak
    during one of them decided the ranking (PP-OCRv4 det: an INT8 recipe timed at 8.0 ms
    against 12.8 ms for the FP32-optimized graph during a peak, then 1.4x slower than it in
    turns). The first figures stay in each candidate's ``timing``."""
    accepted = sorted(
        (c for c in result.candidates if c.accepted and c.p50_ms is not None),
        key=lambda c: c.p50_ms or 0.0,
    )
    if len(accepted) < 2:
        return
    fastest = accepted[0].p50_ms or 0.0
    finalists = [c for c in accepted if (c.p50_ms or 0.0) <= fastest * FINALIST_MARGIN]
    finalists = finalists[:MAX_FINALISTS]
    if len(finalists) < 2:
        return
    sessions: dict[str, Any] = {}
    for c in finalists:
        model = ctx.built[c.candidate].model
        assert model is not None
        sessions[c.candidate] = session(
            model, providers=[ctx.provider], threads=ctx.bench["threads"]
        )
    source = "\0source"  # not a candidate id (ids are recipe names)
    sessions[source] = session(
        ctx.src.model, providers=[ctx.provider], threads=ctx.bench["threads"]
    )
    timed = measure_interleaved(
        sessions, ctx.src.inputs, max_seconds=max(2.0, 2 * float(ctx.bench["seconds"]))
    )
    for c in finalists:
        lat = timed[c.candidate]
        c.timing = {
            "interleaved_with": [f.candidate for f in finalists if f is not c] + ["FP32 source"],
            "runs": lat.runs,
            "sequential_p50_ms": c.p50_ms,
            "sequential_p95_ms": c.p95_ms,
        }
        c.p50_ms, c.p95_ms = lat.p50_ms, lat.p95_ms
    result.source_interleaved = timed[source]


def _evaluate(ctx: _Search, recipe: Recipe) -> CandidateResult:
    """Build (or reuse) one candidate and judge it against the profile's gates."""
    profile, provider, strict = ctx.profile, ctx.provider, ctx.strict
    key = f"{provider}|{_recipe_key(recipe)}"
    fresh = key not in ctx.cache
    if fresh:
        ctx.cache[key] = _build_and_measure(recipe, ctx.src, ctx.work, provider, ctx.bench)
    b = ctx.built[recipe.id] = ctx.cache[key]
    cr = CandidateResult(
        recipe.id,
        recipe.to_dict(),
        error=b.error,
        backend=recipe.backend,
        measured_on=provider,
        on_target_provider=provider == profile.provider_names[0],
        build_s=b.build_s if fresh else None,
    )
    if b.metrics is not None and b.latency is not None:
        cr.metrics, cr.p50_ms, cr.p95_ms, cr.size_bytes = (
            b.metrics,
            b.latency.p50_ms,
            b.latency.p95_ms,
            b.size,
        )
        if b.model is not None and not _meets_constraints(ctx, recipe, b.model, cr):
            return cr
        cr.gates = judge(b.metrics, profile.accuracy_gate)
        cr.misses = check_gate(
            b.metrics,
            profile.accuracy_gate,
            model_bytes=b.size,
            max_memory_mb=profile.device_gates.max_memory_mb,
            strict=strict,
        )
        cr.accepted = not cr.misses
        if recipe.method == "fp16":  # nodes the FP16 conversion kept in FP32, with the reason
            cr.fp32_nodes = list(b.info.get("fp32_nodes", []))
        if ctx.rank == "cost" and b.model is not None:
            cr.cost = {"fp32_compute_nodes": fp32_compute_nodes(b.model), "size_bytes": b.size}
    return cr


def _meets_constraints(ctx: _Search, recipe: Recipe, model: Path, cr: CandidateResult) -> bool:
    """Check a candidate's output against its target before it may be chosen and signed.

    The constraints are the profile's ``[constraints]`` combined with what the recipe promises
    (:func:`~edgefleet.packager.backends.verify.recipe_constraints`); a vendor backend checks its
    own promises too, this check holds every backend - ``ort`` included - to the target's.
    A violation refuses the candidate, naming each rule, node and what was found.
    """
    import onnx

    checked = combine(ctx.profile.constraints, recipe_constraints(recipe))
    found = verify(onnx.load(str(model)), checked)
    cr.verification = {
        "constraints": checked.to_dict(),
        "passed": not found,
        "violations": [{"rule": v.rule, "node": v.node, "detail": v.detail} for v in found[:20]],
        "violation_count": len(found),
    }
    if found:
        cr.violations = [summary(found)]
        cr.accepted = False
    return not found


def _recover(ctx: _Search, result: ProfileResult, recipes: dict[str, Recipe]) -> None:
    """Accuracy-aware search: keep the fewest sensitive nodes of a failed candidate in FP32.

    A candidate that missed its gate is worth recovering when it is QDQ (static or QNN) and,
    ranked by latency, faster than every accepted one (ranked by cost: when none is accepted).
    Nodes are ranked by :func:`edgefleet.packager.sensitivity.rank` on calibration data; the
    top 1, 2, 3, 4, 6, 8, ... are kept in FP32 in the calibrated model until the validation gate
    passes; the recipe with those ``nodes_to_exclude`` is then rebuilt and judged like any other.
    """
    from dataclasses import replace

    accepted = [c for c in result.candidates if c.accepted and c.p50_ms is not None]
    fastest = min((c.p50_ms or 0.0 for c in accepted), default=None)
    failed = [
        c
        for c in result.candidates
        if c.misses
        and c.error is None
        and c.candidate in recipes
        and recipes[c.candidate].method in ("static", "qnn")
        and recipes[c.candidate].format == "QDQ"
        and recipes[c.candidate].backend == "ort"
        and any(not v.passes for v in c.gates)  # not just too little data to tell
        and not any(m.gate == "max_memory_mb" for m in c.misses)
    ]
    if ctx.rank == "cost":
        if accepted:
            return
    else:
        failed = [c for c in failed if fastest is None or (c.p50_ms or 0.0) < fastest]
    failed.sort(key=lambda c: min(m.margin for m in c.misses), reverse=True)
    tried: set[int] = set()
    for cand in failed:
        recipe = recipes[cand.candidate]
        b = ctx.built[cand.candidate]
        assert b.model is not None
        if id(b) in tried:  # the same build under another name (e.g. a backend's fallback)
            continue
        if len(tried) >= MAX_RECOVERIES:
            break
        tried.add(id(b))
        found = _sensitive_nodes(ctx, recipe, b)
        cand.recovery = found["summary"]
        if not found["nodes"]:
            continue
        names = tuple(n["node"] for n in found["nodes"])
        derived = replace(recipe, id=f"{recipe.id}+fp32x{len(names)}", nodes_to_exclude=names)
        cr = _evaluate(ctx, derived)
        cr.derived_from = recipe.id
        cr.fp32_nodes = found["nodes"]
        cr.backend_note = cand.backend_note
        result.candidates.append(cr)
        if cr.accepted:
            return


def _sensitive_nodes(ctx: _Search, recipe: Recipe, b: _Built) -> dict[str, Any]:
    from edgefleet.packager.sensitivity import rank as rank_nodes
    from edgefleet.packager.sensitivity import save_float_except

    src, bench = ctx.src, ctx.bench
    assert b.model is not None
    floats = b.model.with_name("equalized.onnx")
    originals = floats if floats.exists() else src.prepared
    data = {k: v[:SENSITIVITY_SAMPLES] for k, v in src.calibration.items()}
    if src.cal_outputs is None:
        src.cal_outputs = run_all(session(src.model, threads=bench["threads"]), data)
    try:
        base, ranked = rank_nodes(
            b.model, originals, data, src.cal_outputs, threads=bench["threads"]
        )
    except Exception as exc:
        return {"nodes": [], "summary": {"outcome": f"sensitivity analysis failed: {exc}"}}
    useful = [s for s in ranked if s.error_removed > 0]
    limit = min(MAX_FP32_NODES, max(1, int(len(ranked) * MAX_FP32_FRACTION)), len(useful))
    steps = sorted({k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32) if k <= limit} | {limit} - {0})
    tried = []
    scratch = _new_dir(ctx.work)
    for k in steps:
        names = [s.node for s in useful[:k]]
        path = save_float_except(b.model, originals, names, scratch / f"fp32x{k}.onnx")
        sess = session(path, providers=[ctx.provider], threads=bench["threads"])
        metrics = src.compare(run_all(sess, src.inputs))
        misses = check_gate(metrics, ctx.profile.accuracy_gate, strict=ctx.strict)
        tried.append({"fp32_nodes": k, "agreement": metrics.agreement, "passes": not misses})
        if not misses:
            why = "kept in FP32: quantizing it alone caused {:.1%} of the quantized output error"
            nodes = [{**s.to_dict(), "why": why.format(s.error_removed)} for s in useful[:k]]
            return {
                "nodes": nodes,
                "summary": {
                    "outcome": f"gate passes with {k} of {len(ranked)} quantized nodes in FP32",
                    "quantized_output_mse": base,
                    "tried": tried,
                },
            }
    return {
        "nodes": [],
        "summary": {
            "outcome": f"gate still missed with {limit} of {len(ranked)} quantized nodes in FP32",
            "quantized_output_mse": base,
            "tried": tried,
        },
    }


def _stage_model(model: Path, out: Path, *, external: bool) -> Path:
    """Normalise the chosen model to ``model.onnx`` (+ ``model.onnx.data`` when external)."""
    import onnx

    if not external:
        shutil.copyfile(model, out)
        return out
    save_model(onnx.load(str(model)), out, external=True)
    return out


def _manifest(
    profile: Profile,
    src: _Source,
    best: CandidateResult,
    result: ProfileResult,
    shared: dict[str, Any],
    gates: dict[str, Any],
    final: Path,
    ext_members: list[str],
    base: dict[str, Any],
    on_host: bool,
) -> dict[str, Any]:
    import onnx

    proto = onnx.load(str(final), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    m = best.metrics
    assert m is not None and best.p50_ms is not None
    source = (
        result.source_interleaved
        if best.timing is not None and result.source_interleaved is not None
        else src.latency
    )
    validated_on = result.validated_on
    note = (
        f"validated and benchmarked on {validated_on}"
        if on_host
        else f"{profile.provider_names[0]} is absent on the packaging host: built, validated and "
        f"benchmarked on {validated_on}"
    )
    if result.rank == "cost":
        note += "; chosen by the cost model (fewest FP32 compute nodes, then size), not latency"
    fidelity = best.to_dict()["fidelity"]
    return {
        **base,
        "profile": profile.id,
        "min_agent_version": profile.min_agent_version,
        "model": {
            "file": "model.onnx",
            "external_data": ext_members,
            "opset": opset,
            "size": model_size(final),
        },
        "io": io_spec(session(final)),
        "execution_providers": [ep.to_dict() for ep in profile.execution_providers],
        "cpu_fallback": profile.cpu_fallback,
        "quantization": {
            "recipe": best.recipe,
            "search": [c.to_dict() for c in result.candidates],
            "preprocessing": src.preprocessing,
            "validated_on": validated_on,
            "provider_on_host": on_host,
            "measured_off_target": result.off_target,
            "ranked_by": result.rank,
            "target": result.target,
            "backend": best.backend,
            "backend_note": best.backend_note,
            "fp32_nodes": best.fp32_nodes,
            "note": note,
        },
        "validation": {
            "agreement": m.agreement,
            "accuracy": m.accuracy,
            "source_accuracy": m.source_accuracy,
            "max_abs_error": m.max_abs_error,
            "samples": m.samples,
            "score_output": m.score_output,
            "output_kind": m.output_kind,
            "output_kind_how": m.output_kind_how,
            "accuracy_gate": profile.accuracy_gate.to_dict(),
            "provider": validated_on,
            "measured_off_target": result.off_target,
            "fidelity": fidelity,
            "gates": [v.to_dict() for v in best.gates],
        },
        "benchmark": {
            "host": shared["host"],
            "provider": validated_on,
            "measured_off_target": result.off_target,
            "p50_ms": best.p50_ms,
            "p95_ms": best.p95_ms,
            "runs": result.latency.runs if result.latency else None,
            "batch": 1,
            "source_p50_ms": source.p50_ms,
            "source_p95_ms": source.p95_ms,
            "speedup_p50": source.p50_ms / best.p50_ms if best.p50_ms else None,
            # the chosen candidate and the source timed in turns (a fair ratio on a busy host)
            "timing": "interleaved" if best.timing is not None else "sequential",
            "size_ratio": model_size(final) / src.size_bytes,
        },
        "gates": gates,
        "drift_reference": shared["drift"],
        "lineage": shared["lineage"],
    }
