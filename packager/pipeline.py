"""``package_model``: one source model -> one signed, validated package per hardware profile.

Per profile: build every candidate recipe, validate it against the source model, time it on the
host, keep the fastest within the accuracy gate, then write samples, drift reference, lineage and
the manifest, and sign the ``.efpkg`` with ``edgefleet.wire.package.build_package``. A profile
whose gate no candidate meets writes no package; its result names the gate and the margin.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.packager.benchmark import Latency, host_info, measure
from edgefleet.packager.evaluate import Metrics, compare, io_spec, run_all, session
from edgefleet.packager.npzio import load_npz, save_npz
from edgefleet.packager.profiles import Profile, get_profile
from edgefleet.packager.quantize import (
    BuildError,
    build_candidate,
    model_size,
    preprocess,
    save_model,
)
from edgefleet.packager.recipe import Recipe
from edgefleet.packager.search import CandidateResult, GateMiss, check_gate, choose, closest_miss

CPU = "CPUExecutionProvider"
N_SAMPLES = 32
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

    @property
    def ok(self) -> bool:
        return self.status == "packaged"

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "status": self.status,
            "package": str(self.package) if self.package else None,
            "chosen": self.chosen,
            "validated_on": self.validated_on,
            "provider_on_host": self.provider_on_host,
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
    external = _needs_external(model, force_external)
    prep_dir = work / "prepared"
    prep_dir.mkdir(parents=True, exist_ok=True)
    prepared, info = preprocess(model, prep_dir / "model.onnx", external=external)
    return _Source(
        model=model,
        prepared=prepared,
        preprocessing=info,
        external=external,
        calibration={n: cal[n] for n in names},
        inputs=inputs,
        labels=labels,
        outputs=run_all(sess, inputs),
        latency=measure(sess, inputs, runs=bench["runs"], max_seconds=bench["seconds"]),
        size_bytes=model_size(model),
    )


def _recipe_key(recipe: Recipe) -> str:
    d = recipe.to_dict()
    d.pop("id")
    return json.dumps(d, sort_keys=True, default=str)


@dataclass
class _Built:
    model: Path | None
    metrics: Metrics | None
    latency: Latency | None
    size: int | None
    error: str | None


def _build_and_measure(
    recipe: Recipe, src: _Source, work: Path, provider: str, bench: dict[str, Any]
) -> _Built:
    out = work / "candidates" / f"{len(list((work / 'candidates').glob('*')))}" / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        build_candidate(
            recipe,
            source=src.model,
            prepared=src.prepared,
            out=out,
            calibration=src.calibration,
            external=src.external,
        )
        sess = session(out, providers=[provider], threads=bench["threads"])
        metrics = compare(src.outputs, run_all(sess, src.inputs), src.labels)
        latency = measure(sess, src.inputs, runs=bench["runs"], max_seconds=bench["seconds"])
    except BuildError as exc:
        return _Built(None, None, None, None, str(exc))
    except Exception as exc:
        return _Built(None, None, None, None, f"model does not run: {type(exc).__name__}: {exc}")
    return _Built(out, metrics, latency, model_size(out), None)


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
    m = compare(ref, got)
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


def _drift_reference(src: _Source, bench: dict[str, Any]) -> dict[str, Any]:
    import logging

    from edgefleet.drift import build_reference, reference_warnings

    sess = session(src.model, threads=bench["threads"])
    ref = build_reference(src.calibration, run_all(sess, src.calibration))
    ref["warnings"] = reference_warnings(ref)  # features too thinly sampled to watch
    for w in ref["warnings"]:  # on stderr at packaging time; kept in the manifest too
        logging.getLogger(__name__).warning("drift reference: %s", w)
    return ref


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
) -> PackageReport:
    """Package ``model`` for each profile; see the module docstring. Never raises on a gate miss."""
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
            model, calibration, validation, tmp, force_external=force_external_data, bench=bench
        )
        shared: dict[str, Any] = {
            "samples": save_npz(tmp / "samples.npz", _samples(src)),
            "drift": _drift_reference(src, bench),
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
                )
            )
        source_info = {
            "model": str(model),
            "sha256": shared["lineage"]["source_sha256"],
            "size_bytes": src.size_bytes,
            "p50_ms": src.latency.p50_ms,
            "p95_ms": src.latency.p95_ms,
            "accuracy": compare(src.outputs, src.outputs, src.labels).source_accuracy,
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
) -> ProfileResult:
    primary = profile.provider_names[0]
    on_host = primary in available
    provider = primary if on_host else CPU
    result = ProfileResult(profile.id, "error", validated_on=provider, provider_on_host=on_host)
    total = len(profile.candidates) + 1
    built: dict[str, _Built] = {}
    for i, recipe in enumerate(profile.candidates):
        notify(profile.id, f"candidate {recipe.id}", i, total)
        key = f"{provider}|{_recipe_key(recipe)}"
        if key not in cache:
            cache[key] = _build_and_measure(recipe, src, work, provider, bench)
        b = built[recipe.id] = cache[key]
        cr = CandidateResult(recipe.id, recipe.to_dict(), error=b.error)
        if b.metrics is not None and b.latency is not None:
            cr.metrics, cr.p50_ms, cr.p95_ms, cr.size_bytes = (
                b.metrics,
                b.latency.p50_ms,
                b.latency.p95_ms,
                b.size,
            )
            cr.misses = check_gate(
                b.metrics,
                profile.accuracy_gate,
                model_bytes=b.size,
                max_memory_mb=profile.device_gates.max_memory_mb,
            )
            cr.accepted = not cr.misses
        result.candidates.append(cr)
    best = choose(result.candidates)
    notify(profile.id, "writing package" if best else "no candidate within gate", total - 1, total)
    if best is None:
        result.status = "gate_failed"
        closest = closest_miss(result.candidates)
        result.failure = {
            "reason": "no candidate met its gates"
            if closest
            else "every candidate failed to build or run",
            "closest_candidate": closest.candidate if closest else None,
            "gates": [m.to_dict() for m in closest.misses] if closest else [],
            "errors": {c.candidate: c.error for c in result.candidates if c.error},
        }
        notify(profile.id, "gate failed", total, total)
        return result
    b = built[best.candidate]
    assert b.model is not None and b.metrics is not None and b.latency is not None
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
    manifest = _manifest(
        profile, src, best, result, shared, gates, final, ext_members, manifest_base, on_host
    )
    result.package = write(manifest, files)
    result.status, result.chosen = "packaged", best.candidate
    notify(profile.id, "packaged", total, total)
    return result


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
    validated_on = result.validated_on
    note = (
        f"validated and benchmarked on {validated_on}"
        if on_host
        else f"{profile.provider_names[0]} is absent on the packaging host: built, validated and "
        f"benchmarked on {validated_on}"
    )
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
            "note": note,
        },
        "validation": {
            "agreement": m.agreement,
            "accuracy": m.accuracy,
            "source_accuracy": m.source_accuracy,
            "max_abs_error": m.max_abs_error,
            "samples": m.samples,
            "score_output": m.score_output,
            "accuracy_gate": profile.accuracy_gate.to_dict(),
            "provider": validated_on,
        },
        "benchmark": {
            "host": shared["host"],
            "provider": validated_on,
            "p50_ms": best.p50_ms,
            "p95_ms": best.p95_ms,
            "runs": result.latency.runs if result.latency else None,
            "batch": 1,
            "source_p50_ms": src.latency.p50_ms,
            "source_p95_ms": src.latency.p95_ms,
            "speedup_p50": src.latency.p50_ms / best.p50_ms if best.p50_ms else None,
            "size_ratio": model_size(final) / src.size_bytes,
        },
        "gates": gates,
        "drift_reference": shared["drift"],
        "lineage": shared["lineage"],
    }
