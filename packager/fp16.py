"""FP16 conversion (onnxconverter-common) that keeps the nodes FP16 cannot hold in FP32.

FP16 holds magnitudes up to 65504, and onnxconverter-common clamps every constant it converts to
``max_finite_val`` (1e4 by default) without failing: a weight of 1e8 silently becomes 1e4. A
converted model then runs, and computes something else. Before converting, the packager finds
the nodes that need FP32 and passes them to the converter's ``node_block_list``:

- a node that reads a float constant (initializer) beyond :data:`LIMIT` (e.g. a batch norm's
  running variance of 9.8e7, as in PP-OCRv4's DB head after a convolution whose output reaches
  2.4e4): the constant stays FP32 with its node;
- with calibration data, every tensor whose magnitude on that data exceeds :data:`LIMIT`: its
  producer and every reader stay FP32 (the tensor would overflow, or lose the headroom a new
  input needs, if it were stored in FP16).

:data:`LIMIT` is the converter's own bound for constants, about a sixth of FP16's largest value,
so an activation may grow about 6.5 times beyond the largest the calibration data produced.

Two graph normalisations make ``node_block_list`` effective (onnxconverter-common 1.16):
top-level ``Constant`` nodes become initializers (the converter converts a Constant node's value
even when its only reader is blocked), and ``value_info`` entries of initializers are dropped (with
one, the converter inserts a Cast before the blocked reader and then converts the constant too).
Both are exact rewrites: the values and the graph's function do not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Magnitudes above this stay in FP32 (onnxconverter-common's default ``max_finite_val``).
LIMIT = 1e4
FP16_MAX = 65504.0
#: Calibration samples the activation ranges are measured on, and the batch they run in.
RANGE_SAMPLES = 32
RANGE_BATCH = 4


@dataclass(frozen=True)
class KeptNode:
    """A node kept in FP32, and why (the manifest's ``quantization.fp32_nodes`` entry)."""

    node: str
    op_type: str
    why: str
    tensor: str
    max_abs: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "why": self.why,
            "tensor": self.tensor,
            "max_abs": float(f"{self.max_abs:.6g}"),
        }


def normalise(model: Any) -> dict[str, int]:
    """Name every node, turn top-level Constants into initializers, drop initializers'
    ``value_info`` (in place; see the module docstring). Returns what it changed."""
    from onnx import TensorProto

    from edgefleet.packager.preprocess import name_nodes

    graph = model.graph
    folded = 0
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name != "value":
            continue
        tensor = TensorProto()
        tensor.CopyFrom(attr.t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
        folded += 1
    name_nodes(graph)
    inits = {t.name for t in graph.initializer}
    keep = [v for v in graph.value_info if v.name not in inits]
    dropped = len(graph.value_info) - len(keep)
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return {"constants_to_initializers": folded, "initializer_value_info_dropped": dropped}


def constant_ranges(model: Any) -> dict[str, float]:
    """Largest magnitude of every float initializer (pure)."""
    from onnx import TensorProto, numpy_helper

    out = {}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(t)
            if a.size:
                out[t.name] = float(np.max(np.abs(a)))
    return out


def activation_ranges(
    model: Any, data: Mapping[str, np.ndarray], *, samples: int = RANGE_SAMPLES
) -> dict[str, float]:
    """Largest magnitude of every top-level float tensor on ``data`` (runs ONNX Runtime).

    Tensors whose type shape inference cannot tell are left out.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, shape_inference

    inferred = shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.output]
    }
    names = [
        o for n in model.graph.node for o in n.output if o and types.get(o) == TensorProto.FLOAT
    ]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(
        helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in names
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    # Unoptimised: fused nodes would hide the tensors the converter sees.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        probe.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    feeds = [i.name for i in sess.get_inputs()]
    n = min(samples, min(len(data[k]) for k in feeds))
    out = dict.fromkeys(names, 0.0)
    for start in range(0, n, RANGE_BATCH):
        feed = {
            k: np.ascontiguousarray(data[k][start : min(n, start + RANGE_BATCH)]) for k in feeds
        }
        for name, value in zip(names, sess.run(names, feed), strict=True):
            v = np.abs(np.asarray(value, dtype=np.float32))
            if v.size:
                finite = v[np.isfinite(v)]
                out[name] = max(out[name], float(finite.max()) if finite.size else 0.0)
    return out


def out_of_range_nodes(
    model: Any,
    constants: Mapping[str, float],
    activations: Mapping[str, float],
    *,
    limit: float = LIMIT,
) -> list[KeptNode]:
    """The nodes that must stay FP32 (pure; see the module docstring), in graph order."""
    kept: dict[str, KeptNode] = {}

    def keep(node: Any, why: str, tensor: str, value: float) -> None:
        old = kept.get(node.name)
        if old is None:
            kept[node.name] = KeptNode(node.name, node.op_type, why, tensor, value)
        elif why not in old.why:  # every reason, the largest value's tensor first
            first = (
                old
                if old.max_abs >= value
                else KeptNode(node.name, node.op_type, why, tensor, value)
            )
            rest = why if first is old else old.why
            kept[node.name] = KeptNode(
                node.name, node.op_type, f"{first.why}; {rest}", first.tensor, first.max_abs
            )

    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for i in node.input:
            if i:
                readers.setdefault(i, []).append(node)
    for node in model.graph.node:
        for i in node.input:
            value = constants.get(i)
            if value is not None and value > limit:
                keep(
                    node,
                    f"reads constant {i} with |x| up to {value:.4g}: FP16 holds at most "
                    f"{FP16_MAX:g}, and the converter clamps constants to {limit:g}",
                    i,
                    value,
                )
        for o in node.output:
            value = activations.get(o, 0.0)
            if value > limit:
                keep(
                    node,
                    f"writes {o} with |x| up to {value:.4g} on the calibration data "
                    f"(over {limit:g}: too little headroom below FP16's {FP16_MAX:g})",
                    o,
                    value,
                )
                for r in readers.get(o, []):
                    keep(
                        r,
                        f"reads {o} with |x| up to {value:.4g} on the calibration data "
                        f"(over {limit:g}: too little headroom below FP16's {FP16_MAX:g})",
                        o,
                        value,
                    )
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    return sorted(kept.values(), key=lambda k: order[k.node])


def convert(
    model: Any,
    *,
    keep_io_types: bool,
    op_block_list: Iterable[str],
    node_block_list: Iterable[str] = (),
    calibration: Mapping[str, np.ndarray] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """``model`` in FP16 with its out-of-range nodes in FP32, and what was done (for the
    manifest's ``quantization.build``: ``fp32_nodes`` with the reason for each)."""
    from onnxconverter_common import float16

    info: dict[str, Any] = {"fp16": normalise(model)}
    activations: dict[str, float] = {}
    if calibration:
        try:
            activations = activation_ranges(model, calibration)
        except Exception as exc:  # a graph shape inference cannot type: constants only
            info["fp16"]["activation_ranges"] = f"not measured: {type(exc).__name__}: {exc}"
        else:
            info["fp16"]["activation_ranges"] = f"{len(activations)} tensors measured"
    kept = out_of_range_nodes(model, constant_ranges(model), activations)
    blocked_ops = list(dict.fromkeys([*float16.DEFAULT_OP_BLOCK_LIST, *op_block_list]))
    cast_nodes = [n.name for n in model.graph.node if n.op_type == "Cast"]
    names = list(dict.fromkeys([*cast_nodes, *node_block_list, *(k.node for k in kept)]))
    converted = float16.convert_float_to_float16(
        model,
        keep_io_types=keep_io_types,
        op_block_list=blocked_ops,
        node_block_list=names,
    )
    info["fp32_nodes"] = [k.to_dict() for k in kept]
    info["fp16"]["limit"] = LIMIT
    return converted, info
