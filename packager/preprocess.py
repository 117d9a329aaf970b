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
        return {"ok": True, "symbolic_shape_inference": True}
    except Exception as first:
        info: dict[str, Any] = {
            "symbolic_shape_inference": False,
            "symbolic_error": str(first)[:200],
        }
        try:
            quant_pre_process(str(source), str(out), skip_symbolic_shape=True, **kwargs)
        except Exception as second:
            return {**info, "ok": False, "reason": f"quant_pre_process failed: {str(second)[:200]}"}
        return {**info, "ok": True}


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
