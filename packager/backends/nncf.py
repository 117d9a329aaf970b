"""NNCF (OpenVINO's Neural Network Compression Framework) as a quantization backend.

For ``npu-openvino``: NNCF's post-training quantization on the ONNX model (its ONNX backend runs
calibration with ONNX Runtime; no torch) places Q/DQ pairs where OpenVINO's CPU/NPU plugins fuse
them, with symmetric weights, and corrects biases. The result is a QDQ ONNX model that the
OpenVINO execution provider (and plain ONNX Runtime) loads; it is verified against the recipe's
constraints (:mod:`edgefleet.packager.backends.verify`) before it is returned.

Recipe knobs (``backend_options`` of a candidate with ``backend = "nncf"``):
``preset`` ("performance": symmetric activations, or "mixed": asymmetric activations),
``target_device`` ("ANY", "CPU", "GPU", "NPU"; default "NPU"),
``fast_bias_correction`` (default false: NNCF's full bias correction, the more accurate one),
``subset_size`` (calibration samples; default all of them),
``ignored_types`` (op types NNCF leaves in float, e.g. ["Softmax"]).

Installed with ``pip install 'edgefleet[nncf]'``.
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

_DEVICES = ("ANY", "CPU", "GPU", "NPU")
_PRESETS = ("performance", "mixed")


class NNCFBackend:
    name = "nncf"
    extra = "nncf"

    def unavailable(self) -> str | None:
        return missing(("nncf",), "nncf")

    def options(self, recipe: Recipe) -> dict[str, Any]:
        """The NNCF call's options from the recipe (validated; unknown values are errors)."""
        x = dict(recipe.backend_options)
        preset = str(x.pop("preset", "mixed" if not recipe.activation_symmetric else "performance"))
        device = str(x.pop("target_device", "NPU")).upper()
        if preset not in _PRESETS:
            raise ValueError(f"nncf preset must be one of {list(_PRESETS)}, got {preset!r}")
        if device not in _DEVICES:
            raise ValueError(f"nncf target_device must be one of {list(_DEVICES)}, got {device!r}")
        opts = {
            "preset": preset,
            "target_device": device,
            "fast_bias_correction": bool(x.pop("fast_bias_correction", False)),
            "subset_size": x.pop("subset_size", None),
            "ignored_types": list(x.pop("ignored_types", [])),
        }
        if x:
            raise ValueError(f"unknown nncf option(s) {sorted(x)}")
        return opts

    def constraints(self, recipe: Recipe) -> Constraints:
        """What an NNCF INT8 model for OpenVINO must be: QDQ, 8-bit, symmetric weights."""
        return Constraints(qdq_only=True, activation_bits=8, weight_bits=8)

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
        import nncf
        import onnx

        from edgefleet.packager.quantize import save_model

        opts = self.options(recipe)
        items = one_by_one(calibration)
        n = len(items)
        ignored = (
            nncf.IgnoredScope(types=opts["ignored_types"], validate=False)
            if opts["ignored_types"]
            else None
        )
        model = onnx.load(str(source))
        start = time.perf_counter()
        with quiet("nncf"):
            quantized = nncf.quantize(
                model,
                nncf.Dataset(items),
                preset=getattr(nncf.QuantizationPreset, opts["preset"].upper()),
                target_device=getattr(nncf.TargetDevice, opts["target_device"]),
                subset_size=int(opts["subset_size"] or n),
                fast_bias_correction=opts["fast_bias_correction"],
                ignored_scope=ignored,
            )
        seconds = time.perf_counter() - start
        problems = verify(quantized, self.constraints(recipe))
        if problems:
            raise ValueError(f"nncf output breaks the target's constraints: {summary(problems)}")
        save_model(quantized, out, external=external)
        return out, {
            "backend": "nncf",
            "nncf_version": importlib.metadata.version("nncf"),
            "options": opts,
            "calibration_samples": n,
            "seconds": seconds,
            "verified": self.constraints(recipe).to_dict(),
        }


BACKEND = NNCFBackend()
