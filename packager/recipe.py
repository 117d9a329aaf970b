"""Quantization recipes: what a hardware profile asks the packager to do to a model (pure data)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

METHODS = ("fp32", "optimized", "dynamic", "static", "qnn", "fp16")
QUANT_TYPES = ("QInt8", "QUInt8", "QInt16", "QUInt16")
FORMATS = ("QDQ", "QOperator")
CALIBRATION_METHODS = ("MinMax", "Entropy", "Percentile", "Distribution")


class RecipeError(ValueError):
    """A recipe table is invalid; the message names the field."""


@dataclass(frozen=True)
class Recipe:
    """One candidate transformation of the source model.

    ``method``: ``fp32`` (unchanged), ``optimized`` (FP32 with ONNX Runtime's extended graph
    optimizations saved offline), ``dynamic`` (quantize_dynamic), ``static`` (quantize_static with
    calibration), ``qnn`` (static QDQ with ORT's QNN config), ``fp16`` (onnxconverter-common).

    ``requires``: target properties the candidate is for (``"vnni"``, or ``"!vnni"`` for targets
    without it), declared in the profile's ``[target]`` table; a candidate whose requirements
    the target does not meet is skipped. ``equalize`` (cross-layer equalization) and
    ``bias_correction`` transform the FP32 model before static/QNN quantization
    (:mod:`edgefleet.packager.equalize`). ``nodes_to_exclude`` keeps those nodes in FP32.
    """

    id: str
    method: str
    format: str = "QDQ"
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    per_channel: bool = False
    reduce_range: bool = False
    calibrate_method: str = "MinMax"
    op_types: tuple[str, ...] | None = None
    activation_symmetric: bool = False
    weight_symmetric: bool = True
    power_of_two: bool = False
    keep_io_types: bool = True
    op_block_list: tuple[str, ...] = ()
    extra_options: dict[str, Any] = field(default_factory=dict)
    #: Which toolkit applies the recipe: ``ort`` (ONNX Runtime) or a vendor backend
    #: (:mod:`edgefleet.packager.backends`), which falls back to ``ort`` when its extra is absent.
    backend: str = "ort"
    #: Options only the vendor backend reads (dropped when the packager falls back to ``ort``).
    backend_options: dict[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    equalize: bool = False
    bias_correction: bool = False
    #: Learn each weight's rounding (up or down) to minimise its layer's output error on the
    #: calibration data (:mod:`edgefleet.packager.adaround`); symmetric signed weights only.
    adaround: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    #: Static/QNN: a MatMul/Gemm of two activations (attention's Q x K^T and scores x V) stays FP32
    #: (added to ``nodes_to_exclude`` at build time); with ``op_types = ["Conv", "MatMul"]`` only
    #: the ops that multiply by a constant weight are quantized.
    exclude_activation_matmul: bool = False
    #: Built only when no candidate listed before it met its gates: for a recipe that costs
    #: minutes (a vendor toolkit's learned rounding) and is only worth it where cheaper ones fail.
    only_if_needed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The recipe as recorded in the manifest (only fields that matter for its method)."""
        d = asdict(self)
        d["op_types"] = list(self.op_types) if self.op_types is not None else None
        d["op_block_list"] = list(self.op_block_list)
        d["requires"] = list(self.requires)
        d["nodes_to_exclude"] = list(self.nodes_to_exclude)
        keep = {"id", "method"} | (
            {"backend", "backend_options"} if self.backend != "ort" else set()
        )
        if self.requires:
            keep.add("requires")
        if self.only_if_needed:
            keep.add("only_if_needed")
        if self.method in ("static", "qnn"):
            keep |= {k for k in ("equalize", "bias_correction", "adaround") if getattr(self, k)}
            if self.nodes_to_exclude:
                keep.add("nodes_to_exclude")
            if self.exclude_activation_matmul:
                keep.add("exclude_activation_matmul")
        if self.method == "dynamic":
            keep |= {"weight_type", "per_channel", "reduce_range", "op_types", "extra_options"}
        elif self.method == "qnn":
            keep |= {
                "activation_type",
                "weight_type",
                "per_channel",
                "calibrate_method",
                "op_types",
                "activation_symmetric",
                "extra_options",
            }
        elif self.method == "static":
            keep |= {
                "format",
                "activation_type",
                "weight_type",
                "per_channel",
                "reduce_range",
                "calibrate_method",
                "op_types",
                "activation_symmetric",
                "weight_symmetric",
                "power_of_two",
                "extra_options",
            }
        elif self.method == "fp16":
            keep |= {"keep_io_types", "op_block_list"}
            if self.nodes_to_exclude:
                keep.add("nodes_to_exclude")
        return {k: v for k, v in d.items() if k in keep}


_BOOL_FIELDS = (
    "per_channel",
    "reduce_range",
    "activation_symmetric",
    "weight_symmetric",
    "power_of_two",
    "keep_io_types",
    "equalize",
    "bias_correction",
    "adaround",
    "only_if_needed",
    "exclude_activation_matmul",
)


def parse_recipe(raw: dict[str, Any], where: str) -> Recipe:
    """Build a :class:`Recipe` from a TOML table, naming the offending field on error."""
    known = set(Recipe.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown recipe field(s) {unknown}")
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid:
        raise RecipeError(f"{where}: 'id' must be a non-empty string")
    where = f"{where} ({rid})"
    method = raw.get("method")
    if method not in METHODS:
        raise RecipeError(f"{where}: 'method' must be one of {list(METHODS)}, got {method!r}")
    for name, allowed in (
        ("format", FORMATS),
        ("activation_type", QUANT_TYPES),
        ("weight_type", QUANT_TYPES),
        ("calibrate_method", CALIBRATION_METHODS),
    ):
        if name in raw and raw[name] not in allowed:
            raise RecipeError(
                f"{where}: '{name}' must be one of {list(allowed)}, got {raw[name]!r}"
            )
    for name in _BOOL_FIELDS:
        if name in raw and not isinstance(raw[name], bool):
            raise RecipeError(f"{where}: '{name}' must be true or false")
    kwargs = dict(raw)
    for name in ("op_types", "op_block_list", "requires", "nodes_to_exclude"):
        if name in kwargs:
            value = kwargs[name]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise RecipeError(f"{where}: '{name}' must be a list of names")
            kwargs[name] = tuple(value)
    if "backend" in kwargs and (not isinstance(kwargs["backend"], str) or not kwargs["backend"]):
        raise RecipeError(f"{where}: 'backend' must be a backend name such as 'ort' or 'nncf'")
    for name in ("extra_options", "backend_options"):
        if name in kwargs and not isinstance(kwargs[name], dict):
            raise RecipeError(f"{where}: '{name}' must be a table")
    recipe = Recipe(**kwargs)
    if recipe.power_of_two and (recipe.method != "static" or recipe.per_channel):
        raise RecipeError(f"{where}: 'power_of_two' needs method = 'static', per_channel = false")
    if (recipe.equalize or recipe.bias_correction or recipe.adaround) and recipe.method not in (
        "static",
        "qnn",
    ):
        raise RecipeError(
            f"{where}: 'equalize'/'bias_correction' need method 'static' or 'qnn' (so does 'adaround')"
        )
    if recipe.exclude_activation_matmul and recipe.method not in ("static", "qnn"):
        raise RecipeError(f"{where}: 'exclude_activation_matmul' needs method 'static' or 'qnn'")
    if recipe.adaround and (recipe.weight_type != "QInt8" or not recipe.weight_symmetric):
        raise RecipeError(f"{where}: 'adaround' needs symmetric QInt8 weights")
    for req in recipe.requires:
        if not req.lstrip("!").replace("_", "").isalnum():
            raise RecipeError(f"{where}: 'requires' entry {req!r} is not a property name")
    if recipe.method == "dynamic" and recipe.format != "QDQ" and "format" in raw:
        raise RecipeError(f"{where}: dynamic quantization has no 'format'")
    return recipe
