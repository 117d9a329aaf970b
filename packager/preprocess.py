"""``quant_pre_process`` in a child process whose working directory is the packager's temp dir.

ONNX Runtime's symbolic shape inference saves ``sym_shape_infer_temp.onnx`` into the current
directory whenever it gives up (it does on every skl2onnx graph); running it in a child keeps
the caller's directory clean and concurrent packagers from overwriting each other's file.
Run as ``python -m edgefleet.packager.preprocess SOURCE OUT [--external]``; prints a JSON result line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def run(source: Path, out: Path, *, external: bool) -> dict[str, Any]:
    """Symbolic + ONNX shape inference and optimisation; falls back to skipping symbolic."""
    import logging
    import warnings

    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    kwargs: dict[str, Any] = {
        "save_as_external_data": external,
        "all_tensors_to_one_file": True,
        "external_data_location": out.name + ".data" if external else None,
    }
    try:
        quant_pre_process(str(source), str(out), **kwargs)
        return {"ok": True, "symbolic_shape_inference": True, **finish(out, external)}
    except Exception as first:
        info: dict[str, Any] = {
            "symbolic_shape_inference": False,
            "symbolic_error": str(first)[:200],
        }
        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=True, **kwargs)
        except Exception as second:
            return {**info, "ok": False, "reason": f"quant_pre_process failed: {str(second)[:200]}"}
        return {**info, "ok": True, **finish(out, external)}


#: ONNX Runtime's per-channel QDQ writes DequantizeLinear with an ``axis`` attribute, which
#: exists from opset 13 on; older models are converted first (the model stays unchanged when
#: the converter cannot).
MIN_OPSET = 13


def finish(path: Path, external: bool) -> dict[str, Any]:
    """Convert the model at ``path`` to :data:`MIN_OPSET` when it is older, fold per-channel
    arithmetic after convolutions into them (:mod:`edgefleet.packager.fold`) and name every
    node; returns what was done."""
    import onnx
    from onnx import version_converter

    from edgefleet.packager.fold import fold_conv_affine

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    info: dict[str, Any] = {}
    converted = model
    if opset is not None and opset < MIN_OPSET:
        try:
            converted = version_converter.convert_version(model, MIN_OPSET)
            onnx.checker.check_model(converted)
            info["opset_upgraded"] = [opset, MIN_OPSET]
        except Exception as exc:
            converted = model
            info = {"opset": opset, "opset_upgrade_failed": str(exc)[:200]}
    folded = fold_conv_affine(converted)
    if folded:
        info["conv_affine_folded"] = folded
    # Every node gets a name: the accuracy-aware search keeps nodes in FP32 by name.
    named = name_nodes(converted.graph)
    if not info and not named:
        return {}
    if external:
        onnx.save_model(
            converted,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(converted, str(path))
    return info


def name_nodes(graph: Any) -> int:
    """Give every unnamed node of ``graph`` a unique name (``<op type>_<index>``), in place:
    FP32 islands and block lists name their nodes. Returns how many were named."""
    taken = {n.name for n in graph.node if n.name}
    named = 0
    for i, node in enumerate(graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
            named += 1
    return named


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) not in (2, 3) or (len(args) == 3 and args[2] != "--external"):
        print(
            "usage: python -m edgefleet.packager.preprocess SOURCE OUT [--external]",
            file=sys.stderr,
        )
        return 2
    result = run(Path(args[0]).resolve(), Path(args[1]).resolve(), external=len(args) == 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
