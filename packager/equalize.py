"""Data-free quantization aids on the FP32 graph (ONNX + NumPy): cross-layer equalization and
bias correction, for targets that quantize weights per tensor (power-of-two FPGAs, NPUs).

Depthwise-separable CNNs lose most of their accuracy at 8 bits per tensor because one weight
tensor holds channels whose ranges differ by orders of magnitude: the per-tensor scale fits the
widest channel and rounds the narrow ones to zero. Both aids follow Nagel et al., "Data-Free
Quantization Through Weight Equalization and Bias Correction" (ICCV 2019):

- **Cross-layer equalization** (:func:`equalize`): for two consecutive convolutions joined by a
  positive-homogeneous activation (ReLU, or none), ``relu(x / s) = relu(x) / s`` for ``s > 0``, so
  output channel ``i`` of the first may be divided by ``s_i`` and input channel ``i`` of the
  second multiplied by it without changing the function. ``s_i = sqrt(r1_i / r2_i)`` makes both
  channel ranges ``sqrt(r1_i * r2_i)``, equalizing the per-channel ranges a per-tensor scale
  must cover. Pairs are found in the pre-processed graph (batch norm already folded into the
  convolutions); the pass repeats so chains converge. ReLU6/Clip and HardSwish are not
  homogeneous, so pairs joined by them are left alone.
- **Bias correction** (:func:`bias_correct`): quantizing the weights shifts each output
  channel's mean by ``E[dW x] = dW E[x]``. The weight error ``dW`` is computed exactly for the
  recipe's weight scheme (bits, symmetric or not, per channel or tensor, power-of-two scales),
  ``E[x]`` per input channel from the FP32 model on the calibration data; each convolution's bias
  is reduced by the expected shift (padding at the borders is ignored).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

_HOMOGENEOUS = {"Relu"}
_BITS = {"QInt8": (8, True), "QUInt8": (8, False), "QInt16": (16, True), "QUInt16": (16, False)}


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _single_use(name: str, uses: dict[str, list[Any]]) -> bool:
    return len(uses.get(name, [])) == 1


def equalization_pairs(graph: Any) -> list[tuple[Any, Any]]:
    """(first Conv, second Conv) pairs joined only by a ReLU or nothing, weights unshared."""
    inits = {t.name for t in graph.initializer}
    uses = _consumers(graph)
    graph_outputs = {o.name for o in graph.output}
    pairs = []
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        if not _single_use(conv.input[1], uses) or conv.output[0] in graph_outputs:
            continue
        nxt = uses.get(conv.output[0], [])
        if len(nxt) != 1:
            continue
        node = nxt[0]
        if node.op_type in _HOMOGENEOUS:
            if node.output[0] in graph_outputs:
                continue
            after = uses.get(node.output[0], [])
            if len(after) != 1:
                continue
            node = after[0]
        if node.op_type != "Conv" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if not _single_use(node.input[1], uses):
            continue
        pairs.append((conv, node))
    return pairs


def equalize(model: Any, iterations: int = 4) -> int:
    """Cross-layer equalization in place; returns the number of conv pairs equalized."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    pairs = equalization_pairs(graph)
    done = 0
    for _ in range(iterations):
        done = 0
        for first, second in pairs:
            w1 = numpy_helper.to_array(inits[first.input[1]]).astype(np.float64)
            w2 = numpy_helper.to_array(inits[second.input[1]]).astype(np.float64)
            c = w1.shape[0]
            g1, g2 = _attr(first, "group", 1), _attr(second, "group", 1)
            if g1 not in (1, c) and g1 != w1.shape[0]:
                continue
            r1 = np.abs(w1.reshape(c, -1)).max(axis=1)
            if g2 == 1 and w2.shape[1] == c:
                r2 = np.abs(np.moveaxis(w2, 1, 0).reshape(c, -1)).max(axis=1)
            elif g2 == c and w2.shape[0] == c and w2.shape[1] == 1:
                r2 = np.abs(w2.reshape(c, -1)).max(axis=1)
            else:
                continue
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones(c)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            s = np.clip(s, 1e-4, 1e4)
            shape1 = (c,) + (1,) * (w1.ndim - 1)
            w1 = w1 / s.reshape(shape1)
            if g2 == 1:
                w2 = w2 * s.reshape((1, c) + (1,) * (w2.ndim - 2))
            else:
                w2 = w2 * s.reshape((c,) + (1,) * (w2.ndim - 1))
            inits[first.input[1]].CopyFrom(
                numpy_helper.from_array(w1.astype(np.float32), first.input[1])
            )
            inits[second.input[1]].CopyFrom(
                numpy_helper.from_array(w2.astype(np.float32), second.input[1])
            )
            if len(first.input) > 2 and first.input[2] in inits:
                b = numpy_helper.to_array(inits[first.input[2]]).astype(np.float64) / s
                inits[first.input[2]].CopyFrom(
                    numpy_helper.from_array(b.astype(np.float32), first.input[2])
                )
            done += 1
    return done


def quantization_error(
    w: np.ndarray, *, qtype: str, per_channel: bool, symmetric: bool, power_of_two: bool
) -> np.ndarray:
    """``Q(w) - w`` for the weight scheme ONNX Runtime applies (axis 0 is the channel axis)."""
    bits, signed = _BITS[qtype]
    c = w.shape[0]
    flat = w.reshape(c, -1) if per_channel else w.reshape(1, -1)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        amax = np.abs(flat).max(axis=1)
        scale = amax / (qmax if signed else qmax / 2)
        zp = np.zeros_like(scale) if signed else np.full_like(scale, 2 ** (bits - 1))
        qmin = -qmax if signed else 0
    else:
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        lo, hi = np.minimum(flat.min(axis=1), 0), np.maximum(flat.max(axis=1), 0)
        scale = (hi - lo) / (qmax - qmin)
        zp = np.round(qmin - lo / np.where(scale == 0, 1, scale))
    scale = np.where(scale == 0, 1.0, scale)
    if power_of_two:
        scale = np.array([2.0 ** math.ceil(math.log2(v)) for v in scale])
    q = np.clip(np.round(flat / scale[:, None]) + zp[:, None], qmin, qmax)
    deq = (q - zp[:, None]) * scale[:, None]
    return np.asarray((deq - flat).reshape(w.shape))


def input_channel_means(
    model: Any, tensors: list[str], data: Mapping[str, np.ndarray], batch: int = 4
) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of intermediate ``tensors`` of ``model`` over ``data``."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in have:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in sess.get_inputs()]
    fixed = any(isinstance(i.shape[0], int) for i in sess.get_inputs() if i.shape)
    step = 1 if fixed else batch
    n = len(data[names[0]])
    sums: dict[str, np.ndarray] = {}
    count = 0
    for start in range(0, n, step):
        feed = {k: np.ascontiguousarray(data[k][start : start + step]) for k in names}
        outs = sess.run(tensors, feed)
        for name, value in zip(tensors, outs, strict=True):
            v = np.asarray(value, dtype=np.float64)
            axes = tuple(i for i in range(v.ndim) if i != 1)
            s = v.sum(axis=axes) / (np.prod([v.shape[i] for i in axes[1:]]) or 1)
            sums[name] = sums.get(name, 0) + s
        count += len(feed[names[0]])
    return {k: v / max(count, 1) for k, v in sums.items()}


def bias_correct(
    model: Any,
    data: Mapping[str, np.ndarray],
    *,
    qtype: str,
    per_channel: bool,
    symmetric: bool,
    power_of_two: bool,
    limit: int = 64,
) -> int:
    """Analytic bias correction in place for every Conv; returns how many biases changed."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = _consumers(graph)
    convs = [
        n
        for n in graph.node
        if n.op_type == "Conv"
        and len(n.input) >= 2
        and n.input[1] in inits
        and _single_use(n.input[1], uses)
        and n.input[0] not in inits
    ]
    if not convs:
        return 0
    take = {k: v[:limit] for k, v in data.items()}
    means = input_channel_means(model, sorted({c.input[0] for c in convs}), take)
    changed = 0
    for i, conv in enumerate(convs):
        mean = means.get(conv.input[0])
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        if mean is None or mean.ndim != 1:
            continue
        group = _attr(conv, "group", 1)
        cout, cin_g = w.shape[0], w.shape[1]
        if mean.shape[0] != cin_g * group:
            continue
        dw = quantization_error(
            w, qtype=qtype, per_channel=per_channel, symmetric=symmetric, power_of_two=power_of_two
        )
        per_in = dw.reshape(cout, cin_g, -1).sum(axis=2)  # [Cout, Cin/group]
        groups = np.arange(cout) // (cout // group)
        x = mean.reshape(group, cin_g)[groups]  # [Cout, Cin/group]
        shift = (per_in * x).sum(axis=1)
        if len(conv.input) > 2 and conv.input[2]:
            bname = conv.input[2]
            if not _single_use(bname, uses) or bname not in inits:
                continue
            b = numpy_helper.to_array(inits[bname]).astype(np.float64)
        else:
            bname = f"{conv.name or conv.output[0]}_bias_corrected_{i}"
            b = np.zeros(cout)
            graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), bname))
            inits[bname] = graph.initializer[-1]
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = bname
        inits[bname].CopyFrom(numpy_helper.from_array((b - shift).astype(np.float32), bname))
        changed += 1
    return changed


def apply(
    prepared: Path,
    out: Path,
    *,
    calibration: Mapping[str, np.ndarray],
    equalize_layers: bool,
    correct_bias: bool,
    weight_type: str,
    per_channel: bool,
    weight_symmetric: bool,
    power_of_two: bool,
    learn_rounding: bool = False,
    reduce_range: bool = False,
) -> dict[str, Any]:
    """Write ``prepared`` transformed to ``out``; return what was done (for the manifest).

    Order: equalization, then learned rounding (:mod:`edgefleet.packager.adaround`, which
    corrects the biases of the layers it rounds itself), then analytic bias correction of the
    remaining layers (a layer whose weights already sit on the grid has no error to correct).
    """
    import onnx

    model = onnx.load(str(prepared))
    info: dict[str, Any] = {}
    if equalize_layers:
        info["equalized_pairs"] = equalize(model)
    if learn_rounding:
        from edgefleet.packager.adaround import adaround

        info.update(
            adaround(
                model,
                calibration,
                per_channel=per_channel,
                power_of_two=power_of_two,
                reduce_range=reduce_range,
                correct_bias=correct_bias,
            )
        )
    if correct_bias:
        info["bias_corrected"] = bias_correct(
            model,
            calibration,
            qtype=weight_type,
            per_channel=per_channel,
            symmetric=weight_symmetric,
            power_of_two=power_of_two,
        )
    onnx.save_model(model, str(out))
    return info
