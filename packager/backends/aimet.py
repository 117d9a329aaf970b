"""Qualcomm AIMET (``aimet-onnx``) as a quantization backend.

For ``npu-qnn``: AIMET simulates quantization with the Hexagon HTP's own rules (its ``htp_v73``
configuration: which ops are fused, which take per-channel weights, symmetric weights), computes
encodings on the calibration data and exports a QDQ ONNX model that QNN's HTP backend consumes.
A16W8 (16-bit activations, 8-bit weights) is HTP's accurate mode; A8W8 is the fast one. AIMET
needs torch (the ``aimet`` extra pins the CPU build). The output is verified against the recipe's
constraints (:mod:`edgefleet.packager.backends.verify`) before it is returned.

Recipe knobs: ``activation_type`` (``QUInt16``/``QInt16`` for 16-bit, else 8-bit) and
``backend_options``: ``config`` (an AIMET HTP configuration name, default "htp_v73"),
``quant_scheme`` ("min_max", "tf_enhanced" (SQNR-based ranges), ...; default "tf_enhanced").

Installed with ``pip install 'edgefleet[aimet]'``.
"""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.packager.backends.common import missing, one_by_one, quiet
from edgefleet.packager.backends.verify import Constraints, summary, verify
from edgefleet.packager.recipe import Recipe


class AimetBackend:
    name = "aimet"
    extra = "aimet"

    def unavailable(self) -> str | None:
        return missing(("aimet-onnx", "torch"), "aimet")

    def options(self, recipe: Recipe) -> dict[str, Any]:
        x = dict(recipe.backend_options)
        opts = {
            "activation_bits": 16 if recipe.activation_type in ("QUInt16", "QInt16") else 8,
            "config": str(x.pop("config", "htp_v73")),
            "quant_scheme": str(x.pop("quant_scheme", "tf_enhanced")),
        }
        if x:
            raise ValueError(f"unknown aimet option(s) {sorted(x)}")
        return opts

    def constraints(self, recipe: Recipe) -> Constraints:
        """HTP: QDQ, symmetric 8-bit weights, activations of the width the recipe asks for."""
        return Constraints(activation_bits=self.options(recipe)["activation_bits"], weight_bits=8)

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
        from aimet_onnx.quantsim import QuantizationSimModel

        from edgefleet.packager.quantize import save_model

        opts = self.options(recipe)
        items = one_by_one(calibration)
        n = len(items)
        start = time.perf_counter()
        model = onnx.load(str(prepared))
        _drop_trailing_empty_inputs(model)
        with quiet(None, stderr=False):
            sim = QuantizationSimModel(
                model,
                param_type="int8",
                activation_type=f"int{opts['activation_bits']}",
                quant_scheme=opts["quant_scheme"],
                config_file=opts["config"],
            )
            sim.compute_encodings(items)
            quantized = sim.to_onnx_qdq(prequantize_constants=True)
        seconds = time.perf_counter() - start
        constraints = self.constraints(recipe)
        problems = verify(quantized, constraints)
        if problems:
            raise ValueError(f"aimet output breaks the target's constraints: {summary(problems)}")
        save_model(quantized, out, external=external)
        return out, {
            "backend": "aimet",
            "aimet_version": importlib.metadata.version("aimet-onnx"),
            "options": opts,
            "calibration_samples": n,
            "seconds": seconds,
            "verified": constraints.to_dict(),
        }


def _drop_trailing_empty_inputs(model: Any) -> None:
    """``Pad(x, pads, "")`` -> ``Pad(x, pads)``: the same graph in ONNX's semantics (a trailing
    empty name is an omitted optional input), but AIMET's QDQ export looks the empty name up."""
    for node in model.graph.node:
        while node.input and node.input[-1] == "":
            del node.input[-1]


BACKEND = AimetBackend()
