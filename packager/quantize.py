"""Apply a :class:`~packager.recipe.Recipe` to an ONNX model with ONNX Runtime's quantization tools.

I/O lives here; the decisions (which candidate wins) live in ``packager.search``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.packager.recipe import Recipe


class BuildError(RuntimeError):
    """A recipe could not be applied to the model; the message says which step failed."""


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return getattr(QuantType, name)


def _calibration_method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return getattr(CalibrationMethod, name)


def calibration_batch(n: int, preferred: int = 16) -> int:
    """The largest batch <= ``preferred`` that divides ``n`` samples (1 when none does).

    ONNX Runtime's histogram calibrators (Percentile, Entropy, Distribution) stack the per-batch
    outputs of every tensor into one array and fail on a ragged last batch; equal batches avoid it.
    """
    return next((b for b in range(min(preferred, max(n, 1)), 0, -1) if n % b == 0), 1)


def make_reader(model: Path, data: Mapping[str, np.ndarray], batch: int = 16) -> Any:
    """A CalibrationDataReader over ``data`` (one array per model input, samples on axis 0).

    Batches all have the same size (:func:`calibration_batch`).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = sess.get_inputs()
    missing = [i.name for i in inputs if i.name not in data]
    if missing:
        raise BuildError(f"calibration data lacks model input(s) {missing}")
    fixed_one = any(isinstance(i.shape[0], int) and i.shape[0] == 1 for i in inputs if i.shape)
    names = [i.name for i in inputs]
    n = len(data[names[0]])
    step = 1 if fixed_one else calibration_batch(n, batch)
    del sess

    class _Reader(CalibrationDataReader):  # type: ignore[misc]  # ONNX Runtime ships no types
        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = self._batches()

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            for start in range(0, n, step):
                yield {k: np.ascontiguousarray(data[k][start : start + step]) for k in names}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._batches()

    return _Reader()


def preprocess(
    source: Path, out: Path, *, external: bool, timeout: float = 3600.0
) -> tuple[Path, dict[str, Any]]:
    """Shape inference + graph optimisation before quantization (``quant_pre_process``).

    Runs in a child process in ``out``'s directory (see ``packager.preprocess``). Symbolic shape
    inference is tried first, then ``skip_symbolic_shape=True`` (skl2onnx graphs). If a tensor is
    still untyped afterwards, the quantizer would fail on it, so the source model is used as is.
    Returns the model to quantize and what was done, for the manifest.
    """
    import json
    import subprocess
    import sys

    source, out = Path(source).resolve(), Path(out).resolve()
    cmd = [sys.executable, "-m", "edgefleet.packager.preprocess", str(source), str(out)]
    if external:
        cmd.append("--external")
    try:
        proc = subprocess.run(
            cmd, cwd=out.parent, capture_output=True, text=True, timeout=timeout, check=False
        )
        lines = proc.stdout.strip().splitlines()
        info: dict[str, Any] = json.loads(lines[-1]) if lines else {}
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        info = {"ok": False, "reason": f"pre-processing did not complete: {exc}"}
    else:
        if not info:
            info = {"ok": False, "reason": f"pre-processing crashed: {proc.stderr.strip()[-300:]}"}
    ok = bool(info.pop("ok", False))
    if ok:
        untyped = untyped_tensors(out)
        if untyped:
            ok = False
            info["reason"] = (
                f"shape inference left {len(untyped)} tensor(s) untyped, e.g. {untyped[0]!r}"
            )
    info["applied"] = ok
    return (out if ok else source), info


def untyped_tensors(path: Path) -> list[str]:
    """Node outputs that have no type after shape inference (the quantizer needs them all)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    typed = {
        v.name
        for v in [*graph.value_info, *graph.output, *graph.input]
        if v.type.tensor_type.elem_type
    }
    typed |= {t.name for t in graph.initializer}
    return [o for n in graph.node for o in n.output if o and o not in typed]


def build_candidate(
    recipe: Recipe,
    *,
    source: Path,
    prepared: Path,
    out: Path,
    calibration: Mapping[str, np.ndarray],
    external: bool,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the model ``recipe`` produces to ``out``; raises :class:`BuildError`.

    ``info`` (when given) receives what was done beyond the recipe itself: a vendor backend's
    report, or the equalization / bias correction applied (for the manifest).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    # ORT's calibrators print progress to stdout (it would corrupt `--json`) and log warnings;
    # onnxconverter-common warns about every clamped FP16 value.
    with (
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
        _quiet_root_logger(),
    ):
        warnings.simplefilter("ignore")
        return _build(recipe, source, prepared, out, calibration, external, info)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _build(
    recipe: Recipe,
    source: Path,
    prepared: Path,
    out: Path,
    calibration: Mapping[str, np.ndarray],
    external: bool,
    info: dict[str, Any] | None = None,
) -> Path:
    if recipe.backend != "ort":
        from edgefleet.packager.backends import BackendUnavailable, get

        try:
            backend = get(recipe.backend)
            path, done = backend.build(
                recipe,
                source=source,
                prepared=prepared,
                out=out,
                calibration=calibration,
                external=external,
            )
        except BackendUnavailable as exc:
            raise BuildError(str(exc)) from exc
        except BuildError:
            raise
        except Exception as exc:
            raise BuildError(
                f"{recipe.backend} backend failed: {type(exc).__name__}: {exc}"
            ) from exc
        if info is not None:
            info.update(done)
        return path
    try:
        if recipe.method == "fp32":
            return _copy_model(source, out, external)
        if recipe.method == "optimized":
            return _optimized(prepared, out, external)
        if recipe.method in ("static", "qnn") and (
            recipe.equalize or recipe.bias_correction or recipe.adaround
        ):
            prepared = _equalized(recipe, prepared, out, calibration, info)
        if recipe.method in ("static", "qnn") and recipe.exclude_activation_matmul:
            from dataclasses import replace

            both = activation_matmuls(prepared)
            recipe = replace(recipe, nodes_to_exclude=(*recipe.nodes_to_exclude, *both))
            if info is not None:
                info["activation_matmuls_fp32"] = list(both)
        if recipe.method == "fp16":
            return _fp16(recipe, source, out, external, calibration, info)
        if recipe.method == "dynamic":
            return _dynamic(recipe, prepared, out, external)
        if recipe.method == "qnn":
            return _qnn(recipe, prepared, out, calibration, external)
        if recipe.method == "static":
            return _static(recipe, prepared, out, calibration, external)
    except BuildError:
        raise
    except Exception as exc:
        raise BuildError(
            f"{recipe.method} quantization failed: {type(exc).__name__}: {exc}"
        ) from exc
    raise BuildError(f"unknown method {recipe.method!r}")


def activation_matmuls(model: Path) -> list[str]:
    """Names of the MatMul/Gemm nodes none of whose inputs is a constant (attention's Q x K^T and
    scores x V): what :attr:`Recipe.exclude_activation_matmul` keeps in FP32."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    consts = {t.name for t in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    return [
        n.name
        for n in proto.graph.node
        if n.op_type in ("MatMul", "Gemm") and not any(i in consts for i in n.input if i)
    ]


def nothing_to_quantize(recipe: Recipe, model: Path) -> str | None:
    """Why an ONNX Runtime recipe limited to some op types would quantize nothing in ``model``
    (None when it would quantize something).

    A MatMul-only recipe on a pure conv net writes the FP32 graph back under an INT8 recipe's
    name; judged on latency noise it could win against ``fp32-optimized`` and ship as "INT8".
    """
    import onnx

    from edgefleet.packager.backends.verify import all_graphs

    if recipe.backend != "ort" or recipe.method not in ("dynamic", "static", "qnn"):
        return None
    types = recipe.op_types or (("MatMul", "Gemm") if recipe.method == "dynamic" else None)
    if not types:
        return None
    excluded = set(recipe.nodes_to_exclude)
    weights_only = recipe.method in ("static", "qnn") and recipe.exclude_activation_matmul
    if weights_only:
        excluded |= set(activation_matmuls(model))
    proto = onnx.load(str(model), load_external_data=False)
    for g in all_graphs(proto.graph):  # with the bodies of If / Loop / Scan
        if any(n.op_type in types and n.name not in excluded for n in g.node):
            return None
    what = " or ".join(types) + " node" + (" with a constant weight" if weights_only else "")
    return f"nothing to quantize: the model has no {what} (the recipe's op_types)"


def _equalized(
    recipe: Recipe,
    prepared: Path,
    out: Path,
    calibration: Mapping[str, np.ndarray],
    info: dict[str, Any] | None,
) -> Path:
    from edgefleet.packager.equalize import apply

    target = out.with_name("equalized.onnx")
    done = apply(
        prepared,
        target,
        calibration=calibration,
        equalize_layers=recipe.equalize,
        correct_bias=recipe.bias_correction,
        weight_type=recipe.weight_type,
        per_channel=recipe.per_channel,
        weight_symmetric=recipe.weight_symmetric or recipe.weight_type in ("QInt8", "QInt16"),
        power_of_two=recipe.power_of_two,
        learn_rounding=recipe.adaround,
        reduce_range=recipe.reduce_range,
    )
    if info is not None:
        info.update(done)
    return target


def _optimized(source: Path, out: Path, external: bool) -> Path:
    """FP32 with ONNX Runtime's extended graph optimizations applied once and saved. ``source``
    is the pre-processed model (:func:`preprocess`: batch norms that a converter left as
    arithmetic are folded into their convolutions there, which ONNX Runtime does not do).

    Extended (not "all"): the layout optimizations of the highest level are specific to the
    machine that applies them and must not be saved for another.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    opts.log_severity_level = 3
    if external:
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", out.name + ".data"
        )
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    ort.InferenceSession(str(source), sess_options=opts, providers=["CPUExecutionProvider"])
    return out


def _copy_model(source: Path, out: Path, external: bool) -> Path:
    import onnx

    if not external and not _has_external_data(source):
        shutil.copyfile(source, out)
        return out
    save_model(onnx.load(str(source)), out, external=external)
    return out


def external_files(path: Path) -> list[Path]:
    """The external data files a model refers to (empty when all weights are inline)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for t in model.graph.initializer
        if uses_external_data(t)
        for entry in t.external_data
        if entry.key == "location"
    }
    return [path.parent / loc for loc in sorted(locations)]


def _has_external_data(path: Path) -> bool:
    return bool(external_files(path))


def model_size(path: Path) -> int:
    """Bytes of the model file plus its external data."""
    return path.stat().st_size + sum(f.stat().st_size for f in external_files(path))


def save_model(model: Any, out: Path, *, external: bool) -> Path:
    """Save ``model`` to ``out`` (external data in ``out.name + '.data'`` when asked)."""
    import onnx

    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()
    if external:
        onnx.save_model(
            model,
            str(out),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(out))
    return out


def _dynamic(recipe: Recipe, prepared: Path, out: Path, external: bool) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(
        str(prepared),
        str(out),
        op_types_to_quantize=list(recipe.op_types or ("MatMul", "Gemm")),
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        weight_type=_quant_type(recipe.weight_type),
        use_external_data_format=external,
        extra_options=dict(recipe.extra_options),  # ORT mutates it: pass a copy
    )
    return out


def _static_options(recipe: Recipe) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "ActivationSymmetric": recipe.activation_symmetric,
        "WeightSymmetric": recipe.weight_symmetric,
    }
    opts.update(recipe.extra_options)
    return opts


def _static(
    recipe: Recipe,
    prepared: Path,
    out: Path,
    calibration: Mapping[str, np.ndarray],
    external: bool,
    overrides: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    from onnxruntime.quantization import QuantFormat, quantize_static

    if recipe.calibrate_method in HISTOGRAM_METHODS and overrides is None:
        calibration = histogram_subset(prepared, calibration)
    opts = _static_options(recipe)
    if overrides:
        opts["TensorQuantOverrides"] = overrides
    quantize_static(
        str(prepared),
        str(out),
        make_reader(prepared, calibration),
        quant_format=getattr(QuantFormat, recipe.format),
        op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None,
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        nodes_to_exclude=list(recipe.nodes_to_exclude) or None,
        activation_type=_quant_type(recipe.activation_type),
        weight_type=_quant_type(recipe.weight_type),
        calibrate_method=_calibration_method(recipe.calibrate_method),
        use_external_data_format=external,
        extra_options=opts,
    )
    if recipe.power_of_two and overrides is None:
        overrides = power_of_two_overrides(out, prepared)
        _static(recipe, prepared, out, calibration, external, overrides)
        snap_activation_scales(out, external=external)
    return out


#: ONNX Runtime's histogram calibrators keep every intermediate tensor of every calibration
#: sample in memory (then stack them): a ResNet-50 on 66 images needs ~9 GB.
HISTOGRAM_METHODS = ("Percentile", "Entropy", "Distribution")
#: Share of the host's available memory the histogram calibration may use.
HISTOGRAM_MEMORY_SHARE = 0.3


def available_memory() -> int | None:
    """Bytes of memory available on this host (None where the OS does not say)."""
    import os

    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def activation_bytes(prepared: Path, sample: Mapping[str, np.ndarray]) -> int:
    """Bytes of every intermediate tensor of ``prepared`` for one sample (what a calibrator keeps)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(prepared))
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in have:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(out))
                have.add(out)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    feed = {i.name: np.ascontiguousarray(sample[i.name][:1]) for i in sess.get_inputs()}
    return sum(np.asarray(o).nbytes for o in sess.run(None, feed))


def histogram_subset(
    prepared: Path, calibration: Mapping[str, np.ndarray], budget: int | None = None
) -> Mapping[str, np.ndarray]:
    """The first calibration samples whose activations (kept twice: collected, then stacked)
    fit :data:`HISTOGRAM_MEMORY_SHARE` of available memory; all of them when they fit."""
    n = len(next(iter(calibration.values())))
    budget = budget if budget is not None else available_memory()
    if budget is None or n <= 1:
        return calibration
    try:
        per = activation_bytes(prepared, calibration)
    except Exception:
        return calibration
    fit = int(budget * HISTOGRAM_MEMORY_SHARE // max(1, 2 * per))
    if fit >= n:
        return calibration
    keep = max(1, fit)
    return {k: v[:keep] for k, v in calibration.items()}


def snap_activation_scales(path: Path, *, external: bool) -> int:
    """Round up activation scales ORT fixed itself (e.g. Softmax's 1/127) to powers of two.

    Only scales of Quantize/Dequantize pairs on activations are touched: no stored integer
    data depends on them. Returns how many were changed.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            continue
        tensor = inits.get(node.input[1])
        if tensor is None:
            continue
        scale = numpy_helper.to_array(tensor)
        snapped = np.vectorize(pow2_ceil)(scale).astype(np.float32)
        if not np.array_equal(snapped, scale):
            tensor.CopyFrom(numpy_helper.from_array(snapped, tensor.name))
            changed += 1
    if changed:
        save_model(model, path, external=external)
    return changed


def non_power_of_two_scales(path: Path) -> list[str]:
    """Names of quantization scale initializers that are not exact powers of two."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    names = {
        n.input[1] for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
    }
    bad = []
    for name in sorted(names & set(inits)):
        values = numpy_helper.to_array(inits[name]).astype(np.float64).ravel()
        mant, _ = np.frexp(values)
        if not np.all(mant == 0.5):
            bad.append(name)
    return bad


def pow2_ceil(scale: float) -> float:
    """Smallest power of two >= ``scale`` (so the calibrated range still fits)."""
    if scale <= 0 or not math.isfinite(scale):
        return 1.0
    return float(2.0 ** math.ceil(math.log2(scale)))


def power_of_two_overrides(quantized: Path, prepared: Path) -> dict[str, list[dict[str, Any]]]:
    """Per-tensor power-of-two scales (zero point 0) for every tensor a QDQ pass quantized.

    Activation scales are rounded up from the first calibrated pass; weight scales come from the
    weights' absolute maximum. Bias scales (input x weight) are then powers of two too.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(quantized))
    inits = {t.name: t for t in model.graph.initializer}
    src = onnx.load(str(prepared))
    weights = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    overrides: dict[str, list[dict[str, Any]]] = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        name, scale_name = node.input[0], node.input[1]
        if name in overrides or scale_name not in inits:
            continue
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        qdtype = numpy_helper.to_array(zp).dtype if zp is not None else np.dtype(np.uint8)
        scale = float(np.max(numpy_helper.to_array(inits[scale_name])))
        overrides[name] = [_pow2_override(pow2_ceil(scale), qdtype)]
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        qname = node.input[0]
        wname = qname[: -len("_quantized")] if qname.endswith("_quantized") else qname
        if wname not in weights or weights[wname].dtype != np.float32 or wname in overrides:
            continue
        if wname.endswith("bias") or numpy_helper.to_array(inits[qname]).dtype == np.int32:
            continue
        amax = float(np.max(np.abs(weights[wname]))) or 1.0
        overrides[wname] = [_pow2_override(pow2_ceil(amax / 127.0), np.dtype(np.int8))]
    return overrides


def _pow2_override(scale: float, qdtype: np.dtype[Any]) -> dict[str, Any]:
    return {"scale": np.array(scale, dtype=np.float32), "zero_point": np.array(0, dtype=qdtype)}


def _qnn(
    recipe: Recipe,
    prepared: Path,
    out: Path,
    calibration: Mapping[str, np.ndarray],
    external: bool,
) -> Path:
    from onnxruntime.quantization import quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    config = get_qnn_qdq_config(
        str(prepared),
        make_reader(prepared, calibration),
        calibrate_method=_calibration_method(recipe.calibrate_method),
        activation_type=_quant_type(recipe.activation_type),
        weight_type=_quant_type(recipe.weight_type),
        per_channel=recipe.per_channel,
        activation_symmetric=recipe.activation_symmetric,
        op_types_to_quantize=list(recipe.op_types) if recipe.op_types else None,
        nodes_to_exclude=list(recipe.nodes_to_exclude) or None,
    )
    config.use_external_data_format = external
    config.extra_options.update(recipe.extra_options)
    quantize(str(prepared), str(out), config)
    return out


def _fp16(
    recipe: Recipe,
    source: Path,
    out: Path,
    external: bool,
    calibration: Mapping[str, np.ndarray] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """FP16 with float IO; Cast nodes, the default ML ops, the recipe's blocked ops and
    ``nodes_to_exclude``, and every node FP16 cannot hold (:mod:`edgefleet.packager.fp16`: out of
    range on its constants or on the calibration data) stay in FP32."""
    import onnx

    from edgefleet.packager.fp16 import convert

    model = onnx.load(str(source))
    with warnings.catch_warnings():  # "the float32 number ... will be truncated": handled above
        warnings.simplefilter("ignore", UserWarning)
        converted, done = convert(
            model,
            keep_io_types=recipe.keep_io_types,
            op_block_list=recipe.op_block_list,
            node_block_list=recipe.nodes_to_exclude,
            calibration=calibration,
        )
    ops = {n.name: n.op_type for n in model.graph.node}
    done["fp32_nodes"] = [
        {"node": n, "op_type": ops.get(n, "?"), "why": "listed in the recipe's nodes_to_exclude"}
        for n in recipe.nodes_to_exclude
        if n not in {k["node"] for k in done["fp32_nodes"]}
    ] + done["fp32_nodes"]
    if info is not None:
        info.update(done)
    save_model(converted, out, external=external)
    return out
