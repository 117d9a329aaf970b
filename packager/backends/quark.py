"""AMD Quark (``amd-quark``, successor of the Vitis AI quantizer) as a quantization backend.

For ``fpga-vitisai``: Quark's XINT8 configuration quantizes to INT8 QDQ with power-of-two scales
and symmetric activations and weights, per tensor (what the DPU executes). Cross-layer
equalization and AdaRound (learned rounding of the weights on the calibration data, the
technique that recovers depthwise networks at power-of-two INT8) are optional. Quark needs torch
(AdaRound trains with it); the ``quark`` extra pins the CPU build. The output is verified against
the recipe's constraints (:mod:`edgefleet.packager.backends.verify`) before it is returned.

Recipe knobs (``backend_options`` of a candidate with ``backend = "quark"``):
``config`` ("XINT8" for Vitis AI power-of-two, "A8W8", "A16W8"; default "XINT8"),
``algorithms`` (any of "cle", "adaround", "adaquant"; default none),
``iterations`` (AdaRound/AdaQuant steps; default 1000).

Installed with ``pip install 'edgefleet[quark]'``.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import logging
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.packager.backends.common import missing, quiet
from edgefleet.packager.backends.verify import Constraints, summary, verify
from edgefleet.packager.recipe import Recipe

_CONFIGS = ("XINT8", "A8W8", "A16W8")
_ALGORITHMS = ("cle", "adaround", "adaquant")


class QuarkBackend:
    name = "quark"
    extra = "quark"

    def unavailable(self) -> str | None:
        return missing(("amd-quark", "torch"), "quark")

    def options(self, recipe: Recipe) -> dict[str, Any]:
        x = dict(recipe.backend_options)
        config = str(x.pop("config", "XINT8")).upper()
        algorithms = [str(a).lower() for a in x.pop("algorithms", [])]
        iterations = int(x.pop("iterations", 1000))
        if config not in _CONFIGS:
            raise ValueError(f"quark config must be one of {list(_CONFIGS)}, got {config!r}")
        bad = sorted(set(algorithms) - set(_ALGORITHMS))
        if bad:
            raise ValueError(f"unknown quark algorithm(s) {bad}; known: {list(_ALGORITHMS)}")
        if x:
            raise ValueError(f"unknown quark option(s) {sorted(x)}")
        return {"config": config, "algorithms": algorithms, "iterations": iterations}

    def constraints(self, recipe: Recipe) -> Constraints:
        config = self.options(recipe)["config"]
        if config == "XINT8":  # the DPU: power-of-two, symmetric, per tensor, 8-bit
            return Constraints(
                power_of_two=True, per_tensor=True, symmetric=True, activation_bits=8, weight_bits=8
            )
        return Constraints(activation_bits=16 if config == "A16W8" else 8, weight_bits=8)

    def build(
        self,
        recipe: Recipe,
        *,
        source: Path,
        prepared: Path,
        out: Path,
        calibration: Mapping[str, np.ndarray],
        external: bool,
    ) -> tuple[Path, dict[str, Any]]:
        import onnx
        from quark.onnx import ModelQuantizer
        from quark.onnx.quantization.config import custom_config
        from quark.onnx.quantization.config.algorithm import (
            AdaQuantConfig,
            AdaRoundConfig,
            CLEConfig,
        )
        from quark.onnx.quantization.config.config import QConfig

        from edgefleet.packager.quantize import make_reader, save_model

        opts = self.options(recipe)
        # Quark fills in its config objects while quantizing: work on a copy of the preset.
        base = copy.deepcopy(getattr(custom_config, f"{opts['config']}_QCONFIG"))
        algos: list[Any] = []
        for a in opts["algorithms"]:
            if a == "cle":
                algos.append(CLEConfig())
            elif a == "adaround":
                algos.append(AdaRoundConfig(learning_rate=0.1, num_iterations=opts["iterations"]))
            else:
                algos.append(AdaQuantConfig(learning_rate=1e-5, num_iterations=opts["iterations"]))
        config = QConfig(
            global_config=base.global_config,
            algo_config=algos or None,
            extra_options=dict(base.extra_options or {}),
        )
        tmp = out.with_name(out.stem + ".quark.onnx")
        start = time.perf_counter()
        reader = make_reader(prepared, calibration)
        tmp_path = str(tmp.resolve())
        # Quark writes a summary (quantized_info.csv) into the working directory: keep it out
        # of the caller's.
        with (
            quiet("quark"),
            _screen_logs_off(),
            tempfile.TemporaryDirectory() as scratch,
            contextlib.chdir(scratch),
        ):
            # The prepared model's inferred shapes (`value_info`) go stale in the graphs Quark
            # rewrites for CLE and AdaRound, and ONNX Runtime plans its buffers by them: on
            # PP-OCRv4 det, AdaRound's own sessions failed ("Shape mismatch attempting to
            # re-use buffer {1,192,1,1} != {1,192,8,8}" at a squeeze-excite Mul) and its output
            # did not run. Quark gets the model without them, and its output is cleared too.
            bare = onnx.load(str(prepared), load_external_data=True)
            del bare.graph.value_info[:]
            # Quark infers shapes again for the sub-models AdaRound trains on, and with symbolic
            # height and width (PP-OCRv4 det's 'p2o.DynamicDimension.1/2') ONNX's inference
            # gives tensors before and after a Resize the same shape: AdaRound's sessions then
            # failed on 10 of det's layers ("Shape mismatch attempting to re-use buffer
            # {16,96,16,16} != {16,96,32,32}"), which kept plain rounding. A graph that reads no
            # shape (no Shape or Size op) computes the same whatever size its inputs declare:
            # Quark gets its inputs pinned to the calibration data's shape (the batch stays
            # free), and its output gets the source's declared shapes back. A graph that reads
            # shapes is left as it is (pinned, PP-OCRv4 rec came out of Quark with its seven
            # Shape ops folded to constants: its width was no longer free).
            io = _io_types(bare)
            pinned = _pin_dims(bare, calibration) if io["shape_ops"] == 0 else {}
            source_path = str(Path(scratch) / "prepared.onnx")
            save_model(bare, Path(source_path), external=external)
            del bare
            ModelQuantizer(config).quantize_model(source_path, tmp_path, reader)
        seconds = time.perf_counter() - start
        quantized = onnx.load(str(tmp))
        tmp.unlink(missing_ok=True)
        del quantized.graph.value_info[:]  # ONNX Runtime infers them again, correctly
        restored = _restore_io(quantized, io) if pinned else False
        constraints = self.constraints(recipe)
        problems = verify(quantized, constraints)
        if problems:
            raise ValueError(f"quark output breaks the target's constraints: {summary(problems)}")
        save_model(quantized, out, external=external)
        return out, {
            "backend": "quark",
            "quark_version": importlib.metadata.version("amd-quark"),
            "options": opts,
            "calibration_samples": len(next(iter(calibration.values()))),
            "pinned_dims": pinned,
            "dims_restored": restored,
            "seconds": seconds,
            "verified": constraints.to_dict(),
        }


_SHAPE_READERS = ("Shape", "Size")


def _io_types(model: Any) -> dict[str, Any]:
    """The declared types of the graph's inputs and outputs, by name, and its shape-reading ops."""
    return {
        "inputs": {v.name: copy.deepcopy(v.type) for v in model.graph.input},
        "outputs": {v.name: copy.deepcopy(v.type) for v in model.graph.output},
        "shape_ops": sum(n.op_type in _SHAPE_READERS for n in model.graph.node),
    }


def _pin_dims(model: Any, calibration: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Set each graph input's symbolic non-batch dims to its calibration data's; what was pinned
    (input name -> its shape without the batch), empty when only the batch was free."""
    pinned: dict[str, list[int]] = {}
    for v in model.graph.input:
        data = calibration.get(v.name)
        dims = v.type.tensor_type.shape.dim
        if data is None or len(dims) != data.ndim:
            continue
        changed = False
        for i, d in enumerate(dims):
            if i > 0 and not d.HasField("dim_value"):
                d.dim_value = int(data.shape[i])
                changed = True
        if changed:
            pinned[v.name] = [int(x) for x in data.shape[1:]]
    return pinned


def _restore_io(model: Any, io: Mapping[str, Any]) -> bool:
    """Give Quark's output back the source's declared input and output shapes.

    Exact only when nothing in the graph reads the pinned dims (only graphs without shape-reading
    ops are pinned). Should Quark's output read shapes the source did not, the pinned shapes
    stay: they are then what the graph computes. Returns whether the shapes were restored.
    """
    if any(n.op_type in _SHAPE_READERS for n in model.graph.node):
        return False
    for v in model.graph.input:
        if v.name in io["inputs"]:
            v.type.CopyFrom(io["inputs"][v.name])
    for v in model.graph.output:
        if v.name in io["outputs"]:
            v.type.CopyFrom(io["outputs"][v.name])
    return True


@contextlib.contextmanager
def _screen_logs_off() -> Iterator[None]:
    """Quark's own loggers write to the stderr they found at import (not the redirected one):
    raise their shared level to errors for the build (the report says what ran)."""
    from quark.common.utils.log import ScreenLogger

    before = int(getattr(ScreenLogger, "_shared_level", logging.INFO))
    ScreenLogger.set_shared_level(logging.ERROR)
    try:
        yield
    finally:
        ScreenLogger.set_shared_level(before)


BACKEND = QuarkBackend()
