"""Fold per-channel affine steps that follow a convolution into its weights and bias (ONNX + NumPy).

Models converted from other frameworks often carry batch normalization as elementwise arithmetic
instead of a ``BatchNormalization`` node: ``Conv -> Sub(mean) -> Mul(scale) -> Add(shift)`` (the
ResNet-50 of Open-NSFW has 53 such chains). ONNX Runtime's graph optimizer folds a following
``Add`` or ``Mul`` into a ``Conv`` but not a ``Sub`` or ``Div``, so the whole chain stays: in FP32
three extra passes over every activation, and after quantization three elementwise operators per
convolution that run between their own quantize/dequantize pairs. Folding them is exact in real
arithmetic: for ``y = W * x + b``,

- ``y + c`` and ``y - c`` change only the bias (``b + c``, ``b - c``);
- ``y * s`` and ``y / s`` scale output channel ``i``'s weights and bias by ``s_i`` (``1 / s_i``).

A step is folded only when its other operand is a constant that is a scalar or per output
channel, the convolution's output feeds nothing else (and is not a graph output), and the
convolution's weights and bias are initializers used by it alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_OPS = ("Add", "Sub", "Mul", "Div")


def _per_channel(value: np.ndarray, channels: int, out_rank: int) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector when it broadcasts per output channel of a
    rank-``out_rank`` NC... tensor (scalar or channel-only); None otherwise."""
    if value.ndim > out_rank or value.size == 0:
        return None
    shape = (1,) * (out_rank - value.ndim) + tuple(value.shape)
    if any(d != 1 for i, d in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def fold_conv_affine(model: Any) -> int:
    """Fold every foldable Add/Sub/Mul/Div after a Conv into it, in place; returns how many."""
    from onnx import numpy_helper

    graph = model.graph
    folded = 0
    while True:
        inits = {t.name: t for t in graph.initializer}
        uses: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                uses.setdefault(name, []).append(node)
        outputs = {o.name for o in graph.output}
        step = _next_fold(graph, inits, uses, outputs)
        if step is None:
            return folded
        conv, node, other = step
        const = numpy_helper.to_array(inits[other])
        weight = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        channels = weight.shape[0]
        bias = (
            numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
            if len(conv.input) > 2 and conv.input[2]
            else np.zeros(channels)
        )
        c = _per_channel(const, channels, weight.ndim)
        assert c is not None
        scale_shape = (channels,) + (1,) * (weight.ndim - 1)
        if node.op_type == "Add":
            bias = bias + c
        elif node.op_type == "Sub":
            bias = bias - c
        elif node.op_type == "Mul":
            weight, bias = weight * c.reshape(scale_shape), bias * c
        else:
            weight, bias = weight / c.reshape(scale_shape), bias / c
        inits[conv.input[1]].CopyFrom(
            numpy_helper.from_array(weight.astype(np.float32), conv.input[1])
        )
        if len(conv.input) > 2 and conv.input[2]:
            inits[conv.input[2]].CopyFrom(
                numpy_helper.from_array(bias.astype(np.float32), conv.input[2])
            )
        else:
            name = _fresh(f"{conv.name or 'conv'}_folded_bias", inits, graph)
            graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), name))
            while len(conv.input) < 2:
                conv.input.append("")
            conv.input.append(name)
        old = conv.output[0]
        conv.output[0] = node.output[0]
        graph.node.remove(node)
        for vi in list(graph.value_info):
            if vi.name == old:
                graph.value_info.remove(vi)
        _drop_if_unused(graph, other)
        folded += 1


def _next_fold(
    graph: Any, inits: dict[str, Any], uses: dict[str, list[Any]], outputs: set[str]
) -> tuple[Any, Any, str] | None:
    """The first (Conv, step, constant's name) that can be folded."""
    from onnx import TensorProto, numpy_helper

    for conv in graph.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
            continue
        y = conv.output[0]
        consumers = uses.get(y, [])
        if y in outputs or len(consumers) != 1:
            continue
        node = consumers[0]
        if node.op_type not in _OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        w = conv.input[1] if len(conv.input) > 1 else ""
        b = conv.input[2] if len(conv.input) > 2 else ""
        if w not in inits or len(uses.get(w, [])) != 1:
            continue
        if b and (b not in inits or len(uses.get(b, [])) != 1):
            continue
        if inits[w].data_type != TensorProto.FLOAT:
            continue
        # y must be the first operand of Sub and Div (x - c, x / c); either of Add and Mul.
        if node.input[0] == y:
            other = node.input[1]
        elif node.op_type in ("Add", "Mul") and node.input[1] == y:
            other = node.input[0]
        else:
            continue
        if other == y or other not in inits or inits[other].data_type != TensorProto.FLOAT:
            continue
        const = numpy_helper.to_array(inits[other])
        weight_rank = len(inits[w].dims)
        c = _per_channel(const, int(inits[w].dims[0]), weight_rank)
        if c is None or not np.all(np.isfinite(c)):
            continue
        if node.op_type == "Div" and np.any(c == 0):
            continue
        return conv, node, other
    return None


def _fresh(base: str, inits: dict[str, Any], graph: Any) -> str:
    taken = set(inits) | {o for n in graph.node for o in n.output}
    name = base
    while name in taken:
        name += "_"
    return name


def _drop_if_unused(graph: Any, name: str) -> None:
    """Remove initializer ``name`` when nothing reads it any more (and no graph input names it)."""
    if any(name in n.input for n in graph.node) or any(i.name == name for i in graph.input):
        return
    for t in graph.initializer:
        if t.name == name:
            graph.initializer.remove(t)
            return
