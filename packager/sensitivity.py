"""Per-node quantization sensitivity of a QDQ model, for the accuracy-aware search.

For each quantized compute node, the QDQ graph is edited so that this one node runs in FP32
(its weights are the original FP32 ones; an activation input stays quantized when a quantized
node produces it, as with ONNX Runtime's ``nodes_to_exclude``, and an output that only the graph
output reads is no longer quantized) while every other node stays quantized: "quantize all but
one". The node's sensitivity is how
much that removes of the quantized model's output error (mean squared error against the FP32
source, on a slice of the *calibration* data, so the validation data that judges the gate is
not used to rank). The search then keeps the most sensitive nodes in FP32, fewest first.

No recalibration is needed for the ranking: one calibrated QDQ model is edited per node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_QDQ = {"QuantizeLinear", "DequantizeLinear"}
#: Ops that move or select values without arithmetic: their quantized output shares the input's
#: scale, so keeping one in FP32 removes no error (not worth a session each).
_MOVES = {
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "Gather",
    "Slice", "Split", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "Pad",
}  # fmt: skip


@dataclass(frozen=True)
class NodeSensitivity:
    node: str
    op_type: str
    error_removed: float  # fraction of the quantized model's output MSE removed in FP32

    def to_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "op_type": self.op_type,
            "error_removed": round(self.error_removed, 6),
        }


def quantized_nodes(model: Any) -> list[Any]:
    """Named nodes that read a quantized tensor (an input produced by a DequantizeLinear)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for node in model.graph.node:
        if node.op_type in _QDQ or node.op_type in _MOVES or not node.name:
            continue
        sources = [producer.get(i) for i in node.input if i]
        if any(p is not None and p.op_type == "DequantizeLinear" for p in sources):
            found.append(node)
    return found


def float_except(quantized: Any, prepared: Any, names: Iterable[str]) -> Any:
    """A copy of ``quantized`` in which the nodes ``names`` run in FP32 (see module docstring)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(quantized)
    graph = model.graph
    keep = set(names)
    inits = {t.name: t for t in graph.initializer}
    originals = {t.name: t for t in prepared.graph.initializer}
    float_nodes = {n.name: n for n in prepared.graph.node if n.name}
    producer = {o: n for n in graph.node for o in n.output}
    float_producer = {o: n.name for n in prepared.graph.node for o in n.output}
    graph_inputs = {i.name for i in graph.input}

    def same_tensor(name: str | None) -> bool:
        """``name`` holds the same values in both graphs (same producer, or a graph input)."""
        if name is None:
            return False
        if name in graph_inputs:
            return True
        return name in producer and producer[name].name == float_producer.get(name)

    added: set[str] = set()
    for node in graph.node:
        if node.name not in keep:
            continue
        fnode = float_nodes.get(node.name)
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            want = fnode.input[i] if fnode is not None and i < len(fnode.input) else None
            src = dq.input[0]
            if src in inits:  # a quantized initializer: use the FP32 original
                base = src[: -len("_quantized")] if src.endswith("_quantized") else src
                fname = f"{base}_fp32"
                if fname not in added:
                    if want in originals:
                        value = numpy_helper.to_array(originals[want])
                    elif base in originals:
                        value = numpy_helper.to_array(originals[base])
                    else:  # no original: dequantize the stored values
                        value = _dequantize(dq, inits)
                    graph.initializer.append(numpy_helper.from_array(value, fname))
                    added.add(fname)
                node.input[i] = fname
            elif same_tensor(want) and (want in graph_inputs or producer[str(want)].name in keep):
                # As ONNX Runtime's nodes_to_exclude does: a tensor between two FP32 nodes (or
                # from the graph input) is not quantized; one from a quantized node stays
                # quantized. When the quantizer folded an activation (a ReLU into the zero
                # point, reusing its output name) the tensor differs and stays quantized too.
                node.input[i] = want
        _float_graph_outputs(graph, node)
    _prune(model)
    return model


def _float_graph_outputs(graph: Any, node: Any) -> None:
    """A node kept in FP32 whose output reaches a graph output through Q -> DQ writes it directly.

    (ONNX Runtime does not quantize the output of an excluded node that only the graph output
    reads; without this, e.g. a Softmax kept in FP32 would still emit 8-bit probabilities.)
    """
    outputs = {o.name for o in graph.output}
    for j, out in enumerate(node.output):
        readers = [n for n in graph.node if out in n.input]
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear":
            continue
        q = readers[0]
        dqs = [n for n in graph.node if q.output[0] in n.input]
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            continue
        final = dqs[0].output[0]
        if final not in outputs or any(final in n.input for n in graph.node):
            continue
        node.output[j] = final
        graph.node.remove(dqs[0])
        graph.node.remove(q)


def _dequantize(dq: Any, inits: Mapping[str, Any]) -> np.ndarray:
    from onnx import numpy_helper

    x = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zp = (
        numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2] in inits
        else np.zeros_like(scale)
    )
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[axis] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((x - zp) * scale).astype(np.float32)


def _prune(model: Any) -> None:
    """Drop nodes and initializers nothing reads any more."""
    graph = model.graph
    while True:
        needed = {o.name for o in graph.output}
        for n in graph.node:
            needed.update(i for i in n.input if i)
        dead = [n for n in graph.node if not any(o in needed for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


def _mse(ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> float:
    total = 0.0
    for k, r in ref.items():
        if np.issubdtype(r.dtype, np.floating):
            total += float(np.mean((got[k].astype(np.float64) - r.astype(np.float64)) ** 2))
    return total


def _run(model: Any, data: Mapping[str, np.ndarray], threads: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from edgefleet.packager.evaluate import run_all

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    return run_all(sess, data)


def rank(
    quantized_path: Path,
    prepared_path: Path,
    data: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    threads: int = 1,
    max_nodes: int = 200,
) -> tuple[float, list[NodeSensitivity]]:
    """The quantized model's output MSE and every quantized node's sensitivity, most first."""
    import onnx

    quantized = onnx.load(str(quantized_path))
    prepared = onnx.load(str(prepared_path))
    base = _mse(reference, _run(quantized, data, threads))
    found = []
    for node in quantized_nodes(quantized)[:max_nodes]:
        err = _mse(reference, _run(float_except(quantized, prepared, [node.name]), data, threads))
        removed = (base - err) / base if base > 0 else 0.0
        found.append(NodeSensitivity(node.name, node.op_type, removed))
    found.sort(key=lambda s: s.error_removed, reverse=True)
    return base, found


def save_float_except(
    quantized_path: Path, prepared_path: Path, names: Sequence[str], out: Path
) -> Path:
    """Write ``quantized`` with ``names`` in FP32 to ``out``."""
    import onnx

    model = float_except(onnx.load(str(quantized_path)), onnx.load(str(prepared_path)), names)
    onnx.save_model(model, str(out))
    return out
