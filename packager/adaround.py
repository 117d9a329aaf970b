"""Learned weight rounding on the FP32 graph (ONNX + NumPy), for targets with coarse weight grids.

Rounding every weight to its nearest grid point minimises each weight's own error, not the layer's
output error: on per-tensor power-of-two grids (the Vitis AI DPU) most weights of a depthwise
network sit a few steps from zero, and the nearest-rounding errors of one output channel add up.
AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML
2020) chooses, per weight, rounding down or up to minimise the layer's output error on
calibration data. This module solves AdaRound's per-layer problem directly:

    minimise over h in {0, 1}:  || (s (floor(W / s) + h) - W) X ||^2  =  sum_rows d^T H d

with ``X`` the layer's FP32 input patches (im2col) on the calibration data and ``H = X X^T``
their second moments (uncentered: the mean shift is part of the error). Each output row is
independent; the binary problem is solved by sweeps of exact coordinate descent from nearest
rounding (flip one weight's rounding when that lowers the row's error), which is the
quadratic-unconstrained-binary form AdaRound relaxes. No torch, and the time is bounded.

The rounded weights are written back as exact grid values ``s * q`` (FP32), so the quantizer that
follows (ONNX Runtime, with the same scale rule: ``absmax / qmax``, or its power of two rounded
up) reproduces ``q`` exactly. Supported: symmetric signed weights (INT8, or ORT's
``reduce_range`` range) of Conv (any group count, explicit pads) and of Gemm / MatMul with a constant
2-D weight, per tensor or per channel, power-of-two scales or not. Other layers are left to the
quantizer's nearest rounding and counted in the report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Input positions (patches) per layer used to estimate ``H``; sweeps of coordinate descent.
MAX_PATCHES = 4096
SWEEPS = 4
#: A layer whose ``rows x D^2`` work exceeds this is left to nearest rounding (too slow in NumPy).
MAX_LAYER_WORK = 4e9


@dataclass
class _Layer:
    node: Any
    kind: str  # "conv" | "gemm_t" (weight [N, K]) | "matmul" (weight [K, N])
    weight: str
    rows: int
    group: int
    dim: int  # D: inputs per output row
    h: np.ndarray | None = None  # [groups, D, D]
    mean: np.ndarray | None = None  # [groups, D]
    count: int = 0


def _attr(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _layers(graph: Any) -> tuple[list[_Layer], list[str]]:
    from onnx import numpy_helper

    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    out: list[_Layer] = []
    skipped: list[str] = []
    for n in graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        w_name = n.input[1]
        if w_name not in inits or n.input[0] in inits or uses.get(w_name, 0) != 1:
            continue
        w = numpy_helper.to_array(inits[w_name])
        if w.dtype != np.float32:
            continue
        name = n.name or n.output[0]
        if n.op_type == "Conv":
            if _attr(n, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or w.ndim != 4:
                skipped.append(f"{name}: auto_pad or non-2D convolution")
                continue
            group = int(_attr(n, "group", 1))
            dim = int(np.prod(w.shape[1:]))
            out.append(_Layer(n, "conv", w_name, w.shape[0], group, dim))
        elif w.ndim == 2:
            if n.op_type == "Gemm":
                if int(_attr(n, "transA", 0)):
                    skipped.append(f"{name}: Gemm with transA")
                    continue
                kind = "gemm_t" if int(_attr(n, "transB", 0)) else "matmul"
            else:
                kind = "matmul"
            rows, dim = (w.shape[0], w.shape[1]) if kind == "gemm_t" else (w.shape[1], w.shape[0])
            out.append(_Layer(n, kind, w_name, rows, 1, dim))
    return out, skipped


def _patches(x: np.ndarray, layer: _Layer, rng: np.random.Generator, take: int) -> np.ndarray:
    """``[groups, P, D]`` input patches of ``layer`` for ``take`` random output positions."""
    n = layer.node
    if layer.kind != "conv":
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
        idx = rng.choice(len(flat), size=min(take, len(flat)), replace=False)
        return flat[idx][None]
    kh, kw = (int(v) for v in _attr(n, "kernel_shape", [0, 0]) or [0, 0])
    sh, sw = (int(v) for v in _attr(n, "strides", [1, 1]))
    dh, dw = (int(v) for v in _attr(n, "dilations", [1, 1]))
    t, left, b, r = (int(v) for v in _attr(n, "pads", [0, 0, 0, 0]))
    batch, c, _, _ = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)))
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    oh = (xp.shape[2] - eh) // sh + 1
    ow = (xp.shape[3] - ew) // sw + 1
    total = batch * oh * ow
    idx = rng.choice(total, size=min(take, total), replace=False)
    bi, rem = np.divmod(idx, oh * ow)
    yi, xi = np.divmod(rem, ow)
    ky = (np.arange(kh) * dh)[None, :, None] + (yi * sh)[:, None, None]  # [P, kh, 1]
    kx = (np.arange(kw) * dw)[None, None, :] + (xi * sw)[:, None, None]  # [P, 1, kw]
    # [P, C, kh, kw]
    p = xp[bi[:, None, None, None], np.arange(c)[None, :, None, None], ky[:, None], kx[:, None]]
    g = layer.group
    p = p.reshape(len(idx), g, c // g * kh * kw).transpose(1, 0, 2)
    return np.asarray(p, dtype=np.float64)


def _collect(model: Any, layers: list[_Layer], data: Mapping[str, np.ndarray], seed: int) -> None:
    """Accumulate each layer's input second moments ``H`` and means over ``data``."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    wanted = sorted({layer.node.input[0] for layer in layers})
    for name in wanted:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in sess.get_inputs()]
    n = len(data[names[0]])
    fixed = any(isinstance(i.shape[0], int) for i in sess.get_inputs() if i.shape)
    step = 1 if fixed else 8
    batches = max(1, math.ceil(n / step))
    rng = np.random.default_rng(seed)
    for start in range(0, n, step):
        feed = {k: np.ascontiguousarray(data[k][start : start + step]) for k in names}
        values = dict(zip(wanted, sess.run(wanted, feed), strict=True))
        for layer in layers:
            p = _patches(
                np.asarray(values[layer.node.input[0]]), layer, rng, MAX_PATCHES // batches + 1
            )
            h = np.einsum("gpd,gpe->gde", p, p)
            layer.h = h if layer.h is None else layer.h + h
            s = p.sum(axis=1)
            layer.mean = s if layer.mean is None else layer.mean + s
            layer.count += p.shape[1]


def _grid(
    w: np.ndarray, *, per_channel: bool, power_of_two: bool, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row scale (broadcast over a row) the quantizer will use, and ``w / scale``."""
    rows = w.reshape(w.shape[0], -1)
    amax = np.abs(rows).max(axis=1) if per_channel else np.full(len(rows), np.abs(rows).max())
    scale = np.where(amax > 0, amax / qmax, 1.0)
    if power_of_two:
        scale = np.exp2(np.ceil(np.log2(scale)))
    return scale, rows / scale[:, None]


def _solve(v: np.ndarray, h: np.ndarray, qmax: int, pinned: np.ndarray) -> np.ndarray:
    """Integer ``q`` (rows of ``v = w / s``) in floor/ceil minimising ``sum_rows (q-v)^T H (q-v)``.

    Coordinate descent from nearest rounding; ``pinned`` entries keep nearest rounding.
    """
    lo, hi = np.floor(v), np.floor(v) + 1
    q = np.clip(np.round(v), -qmax, qmax)
    d = q - v
    g = d @ h  # [rows, D]
    diag = np.diag(h)
    for _ in range(SWEEPS):
        flips = 0
        for j in range(v.shape[1]):
            step = np.where(q[:, j] == lo[:, j], 1.0, -1.0)
            cand = q[:, j] + step
            ok = (cand >= -qmax) & (cand <= qmax) & ((cand == lo[:, j]) | (cand == hi[:, j]))
            ok &= ~pinned[:, j]
            gain = 2 * step * g[:, j] + diag[j]
            do = ok & (gain < -1e-12 * max(diag[j], 1e-30))
            if not do.any():
                continue
            delta = np.where(do, step, 0.0)
            q[:, j] += delta
            g += delta[:, None] * h[j][None, :]
            flips += int(do.sum())
        if not flips:
            break
    return q


def adaround(
    model: Any,
    data: Mapping[str, np.ndarray],
    *,
    per_channel: bool,
    power_of_two: bool,
    reduce_range: bool = False,
    correct_bias: bool = False,
    limit: int = 64,
    seconds: float = 300.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Learn the rounding of every supported weight in place; return what was done.

    Weights are written as exact grid values. ``correct_bias``: each layer's bias then absorbs
    the mean output shift its rounded weights still cause (``(W_q - W) E[x]``). The work stops
    at ``seconds`` (later layers keep nearest rounding); the report says how many were done.
    """
    from onnx import numpy_helper

    start = time.monotonic()
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    layers, skipped = _layers(graph)
    qmax = 64 if reduce_range else 127  # ORT's symmetric INT8 range
    small = [la for la in layers if la.rows * la.dim**2 <= MAX_LAYER_WORK]
    skipped += [
        f"{la.node.name}: too large ({la.rows}x{la.dim})" for la in layers if la not in small
    ]
    if not small:
        return {"adaround_layers": 0, "adaround_skipped": skipped}
    take = {k: v[:limit] for k, v in data.items()}
    _collect(model, small, take, seed)
    done = 0
    err_before = err_after = 0.0
    for layer in small:
        if time.monotonic() - start > seconds:
            skipped.append(f"{layer.node.name}: time budget ({seconds:.0f} s) spent")
            continue
        assert layer.h is not None and layer.mean is not None
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float64)
        rows_w = w if layer.kind != "matmul" else w.T  # [rows, D...]
        scale, v = _grid(rows_w, per_channel=per_channel, power_of_two=power_of_two, qmax=qmax)
        h = layer.h / max(layer.count, 1)
        mean = layer.mean / max(layer.count, 1)
        per_group = layer.rows // layer.group
        q = np.empty_like(v)
        for gi in range(layer.group):
            sl = slice(gi * per_group, (gi + 1) * per_group)
            # The largest weights fix the scale the quantizer derives: keep them as they are.
            pinned = np.abs(v[sl]) >= qmax - 0.5
            q[sl] = _solve(v[sl], h[gi] * 1.0, qmax, pinned)
            d0 = np.clip(np.round(v[sl]), -qmax, qmax) - v[sl]
            d1 = q[sl] - v[sl]
            s2 = scale[sl][:, None] ** 2
            err_before += float(np.einsum("rd,de,re->", d0 * s2, h[gi], d0))
            err_after += float(np.einsum("rd,de,re->", d1 * s2, h[gi], d1))
        new_rows = q * scale[:, None]
        if correct_bias and layer.kind != "matmul" and len(layer.node.input) > 2:
            bname = layer.node.input[2]
            if bname in inits:
                delta = new_rows - rows_w.reshape(layer.rows, -1)
                shift = np.einsum("rd,rd->r", delta, mean[np.arange(layer.rows) // per_group])
                b = numpy_helper.to_array(inits[bname]).astype(np.float64) - shift
                inits[bname].CopyFrom(numpy_helper.from_array(b.astype(np.float32), bname))
        new = new_rows.reshape(rows_w.shape)
        new = new.T if layer.kind == "matmul" else new
        inits[layer.weight].CopyFrom(numpy_helper.from_array(new.astype(np.float32), layer.weight))
        done += 1
    return {
        "adaround_layers": done,
        "adaround_skipped": skipped[:20],
        "adaround_output_error_ratio": err_after / err_before if err_before > 0 else None,
        "adaround_seconds": round(time.monotonic() - start, 2),
    }
