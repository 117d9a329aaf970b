"""Does a quantized model meet its target's constraints? A pure check of the ONNX graph.

Every backend's output is checked before the packager may sign it: a vendor toolkit that silently
leaves a float scale that is not a power of two, an 8-bit activation where 16 bits were asked,
or an operator-style integer op in a QDQ target would otherwise ship a model the accelerator
rejects (or runs on its CPU fallback). :func:`verify` reads only the in-memory ``ModelProto``.

Rules (each violation names its rule, the node and what was found):

- ``layout``: QDQ only - no QOperator/integer ops (``QLinearConv``, ``ConvInteger``, ...); every
  ``QuantizeLinear`` feeds only ``DequantizeLinear`` nodes; every ``DequantizeLinear`` of an
  activation is fed by a ``QuantizeLinear``.
- ``quantized``: at least ``min_quantized_share`` of the compute ops (Conv, MatMul, Gemm) take a
  dequantized weight (a backend that quantized nothing is not an INT8 package).
- ``power_of_two``: every Q/DQ scale is an exact power of two.
- ``per_tensor``: every scale is a scalar.
- ``symmetric``: every signed zero point is 0 (unsigned 16-bit: 32768, unsigned 8-bit: 128).
- ``activation_bits`` / ``weight_bits``: the integer width of activation Q/DQ pairs and of the
  weights of Conv/MatMul/Gemm (other constants - int32 biases, PReLU slopes - are not judged).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.packager.recipe import Recipe

QOPERATOR_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSigmoid",
        "QLinearLeakyRelu",
        "QLinearAveragePool",
        "QLinearGlobalAveragePool",
        "QLinearConcat",
        "QLinearSoftmax",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
    }
)
COMPUTE_OPS = frozenset({"Conv", "MatMul", "Gemm", "ConvTranspose"})
# ONNX TensorProto element types -> (bits, signed)
_QTYPES = {
    2: (8, False),
    3: (8, True),
    4: (16, False),
    5: (16, True),
    6: (32, True),  # biases: int32 with scale = input scale x weight scale
    21: (4, False),
    22: (4, True),
}


@dataclass(frozen=True)
class Constraints:
    """What the target accepts. ``None`` means "not constrained"."""

    qdq_only: bool = True
    power_of_two: bool = False
    per_tensor: bool = False
    symmetric: bool = False
    activation_bits: int | None = None
    weight_bits: int | None = None
    min_quantized_share: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.node}: {self.detail}"


_BITS = {"QInt8": 8, "QUInt8": 8, "QInt16": 16, "QUInt16": 16}


def constraints_for(recipe: Recipe) -> Constraints:
    """The constraints a recipe promises its target (its format, widths and scale rules)."""
    return Constraints(
        qdq_only=recipe.format == "QDQ",
        power_of_two=recipe.power_of_two,
        per_tensor=recipe.power_of_two or not recipe.per_channel,
        symmetric=recipe.power_of_two or (recipe.activation_symmetric and recipe.weight_symmetric),
        activation_bits=_BITS.get(recipe.activation_type),
        weight_bits=_BITS.get(recipe.weight_type),
        # A recipe that names its op types (MatMul-only INT8) promises those, not half of every
        # compute op; a target's own [constraints] table still sets its share.
        min_quantized_share=0.0 if recipe.op_types is not None else 0.5,
    )


#: What a ``[constraints]`` table of a hardware profile may declare (and each value's type).
CONSTRAINT_FIELDS: dict[str, type] = {
    "qdq_only": bool,
    "power_of_two": bool,
    "per_tensor": bool,
    "symmetric": bool,
    "activation_bits": int,
    "weight_bits": int,
    "min_quantized_share": float,
}

#: A recipe that promises nothing (FP32, FP16, dynamic quantization): nothing to check.
NO_CONSTRAINTS = Constraints(qdq_only=False, min_quantized_share=0.0)


def recipe_constraints(recipe: Recipe) -> Constraints:
    """What ``recipe``'s output must meet on its own: its static QDQ promises, or nothing."""
    if recipe.method in ("static", "qnn"):
        return constraints_for(recipe)
    return NO_CONSTRAINTS


def combine(target: Constraints | None, recipe: Constraints) -> Constraints:
    """The stricter of a target's declared constraints and a recipe's own promises.

    A target's declared widths win over the recipe's (the target decides what it runs); a
    target that declares constraints also sets the share of compute ops that must be quantized.
    """
    if target is None:
        return recipe
    return Constraints(
        qdq_only=target.qdq_only or recipe.qdq_only,
        power_of_two=target.power_of_two or recipe.power_of_two,
        per_tensor=target.per_tensor or recipe.per_tensor,
        symmetric=target.symmetric or recipe.symmetric,
        activation_bits=target.activation_bits or recipe.activation_bits,
        weight_bits=target.weight_bits or recipe.weight_bits,
        min_quantized_share=target.min_quantized_share,
    )


def _is_pow2(x: float) -> bool:
    if not np.isfinite(x) or x <= 0:
        return False
    m, _ = np.frexp(x)
    return bool(m == 0.5)


def all_graphs(graph: Any) -> Iterator[Any]:
    """``graph`` and every graph nested in its nodes (If branches, Loop and Scan bodies)."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from all_graphs(a.g)
            for sub in a.graphs:
                yield from all_graphs(sub)


class _Flat:
    """The nodes and initializers of a graph and its subgraphs, as one graph: a subgraph reads
    the names of the scopes around it, so one namespace serves (exporters name uniquely)."""

    def __init__(self, graph: Any) -> None:
        graphs = list(all_graphs(graph))
        self.node = [n for g in graphs for n in g.node]
        self.initializer = [t for g in graphs for t in g.initializer]


def verify(model: Any, c: Constraints) -> list[Violation]:
    """Every way ``model`` (an ``onnx.ModelProto``) breaks ``c``; empty when it meets them.
    Nodes inside subgraphs (an If's branches, a Loop's body) are checked like the others: a
    scale that is no power of two there breaks the target as much as one outside."""
    from onnx import numpy_helper

    g = _Flat(model.graph)
    init = {t.name: t for t in g.initializer}
    consts: dict[str, np.ndarray] = {n: numpy_helper.to_array(t) for n, t in init.items()}
    for node in g.node:  # Constant nodes hold scales/zero points in some exporters
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = numpy_helper.to_array(a.t)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out: list[Violation] = []

    def add(rule: str, node: Any, detail: str) -> None:
        out.append(Violation(rule, node.name or node.op_type, detail))

    for node in g.node:
        if c.qdq_only and node.op_type in QOPERATOR_OPS:
            add("layout", node, f"{node.op_type} is an operator-style integer op, not QDQ")
    quantized = total = 0
    for node in g.node:
        if node.op_type in COMPUTE_OPS and len(node.input) > 1:
            total += 1
            w = producer.get(node.input[1])
            if w is not None and w.op_type == "DequantizeLinear":
                quantized += 1
    if total and quantized / total < c.min_quantized_share:
        out.append(
            Violation(
                "quantized",
                "graph",
                f"only {quantized} of {total} Conv/MatMul/Gemm ops take a dequantized weight",
            )
        )
    for node in g.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in init
        if node.op_type == "QuantizeLinear":
            for user in consumers.get(node.output[0], []):
                if user.op_type != "DequantizeLinear":
                    add("layout", node, f"feeds {user.op_type} ({user.name}), not a Dequantize")
        elif not is_weight:
            src = producer.get(node.input[0])
            if (src is None or src.op_type != "QuantizeLinear") and node.input[0] not in consts:
                add("layout", node, "dequantizes an activation no QuantizeLinear produced")
        scale = consts.get(node.input[1]) if len(node.input) > 1 else None
        if scale is None:
            add("layout", node, "scale is not a constant")
            continue
        if c.per_tensor and scale.size != 1:
            add("per_tensor", node, f"scale has {scale.size} values (per channel)")
        if c.power_of_two:
            bad = [float(s) for s in np.ravel(scale) if not _is_pow2(float(s))]
            if bad:
                add(
                    "power_of_two", node, f"{len(bad)} scale(s) not a power of two, e.g. {bad[0]!r}"
                )
        zp_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if zp_name is None:  # ONNX default: uint8, zero point 0
            elem, zp = 2, np.zeros(1, np.uint8)
        elif zp_name in init:
            elem, zp = init[zp_name].data_type, consts[zp_name]
        elif zp_name in consts:
            zp = consts[zp_name]
            elem = {"uint8": 2, "int8": 3, "uint16": 4, "int16": 5, "int32": 6}.get(
                zp.dtype.name, 0
            )
        else:
            add("layout", node, "zero point is not a constant")
            continue
        bits, signed = _QTYPES.get(elem, (0, False))
        # A weight is what a Conv/MatMul/Gemm multiplies by; other constants (biases: int32,
        # PReLU slopes, Add/Mul operands) take the width the target gives them.
        is_matmul_weight = is_weight and any(
            u.op_type in COMPUTE_OPS and len(u.input) > 1 and u.input[1] == node.output[0]
            for u in consumers.get(node.output[0], [])
        )
        want = c.weight_bits if is_matmul_weight else None if is_weight else c.activation_bits
        if want is not None and bits != want:
            kind = "weight" if is_weight else "activation"
            add(f"{kind}_bits", node, f"{bits}-bit {kind}, target needs {want}-bit")
        if c.symmetric and bits:
            mid = 0 if signed else 1 << (bits - 1)
            if np.any(zp.astype(np.int64) != mid):
                add("symmetric", node, f"zero point {np.ravel(zp)[:4].tolist()} != {mid}")
    return out


def summary(violations: Iterable[Violation], limit: int = 5) -> str:
    """One line for an error message: the count per rule and the first few."""
    vs = list(violations)
    rules: dict[str, int] = {}
    for v in vs:
        rules[v.rule] = rules.get(v.rule, 0) + 1
    head = ", ".join(f"{k} x{n}" for k, n in sorted(rules.items()))
    return f"{len(vs)} violation(s) ({head}): " + "; ".join(str(v) for v in vs[:limit])
