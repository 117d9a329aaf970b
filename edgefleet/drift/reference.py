"""Drift reference: what the training-side data looked like, binned, JSON-able.

Built by the packager from the inputs it was given and the source model's outputs, stored in the
manifest as ``drift_reference``; the agent counts live data into the same bins
(:class:`edgefleet.drift.sketch.Sketch`) and the controller compares counts.

Format (``format: "edgefleet.drift.reference/v1"``)::

    {"format", "id": sha256 of the canonical JSON of the features, "bins": requested bins,
     "samples": rows seen, "skipped": [{"tensor", "reason"}],
     "features": [
        {"name": "float_input[3]", "tensor": "float_input", "role": "input"|"output",
         "transform": one of TRANSFORMS, "index": column/channel or null,
         "kind": "numeric", "edges": [inner quantile edges, strictly increasing],
         "counts": [len(edges) + 1], "missing": NaN count,
         # range fields (absent in references built before they existed; those are judged
         # by the binned test alone):
         "min", "max": finite range or null, "mean", "std": of the finite values,
         "inf": +-inf count, "distinct": distinct finite values (capped at MAX_CATEGORIES + 1),
         "constant": bool, "low_cardinality": bool (distinct <= MAX_CATEGORIES)}
      | {..., "kind": "categorical", "categories": [sorted values],
         "counts": [len(categories) + 1 (last: values not in categories)], "missing": 0}]}

Numeric bin ``i`` holds ``edges[i-1] <= x < edges[i]``; the outer bins are open, so live values
outside the reference range are still counted there, and a sketch also counts them in range
slots of their own (below ``min``, above ``max``, NaN, +-inf) for the exact range test of
:mod:`edgefleet.drift.decision`. The range fields are not part of the reference id: the id
names the bin layout, which agents that predate the range fields still count into. Feature values per tensor:

- 1-D tensors or ``(N, 1)``: ``value``.
- 2-D ``(N, D)`` tabular inputs: one ``column`` feature per column (``D`` <= ``MAX_COLUMNS``),
  wider ones are summarised as ``row_mean``/``row_std``.
- ``ndim >= 3`` (images, NCHW): ``channel_mean`` and ``channel_std`` per channel (axis 1).
- outputs that are probabilities ``(N, C)`` (rows in [0, 1] summing to 1): ``argmax`` (class
  distribution, categorical) and ``max`` (confidence, numeric); other float outputs are scores,
  binned like inputs. Integer tensors with few distinct values (labels) are categorical.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = "edgefleet.drift.reference/v1"
MAX_COLUMNS = 256
MAX_CATEGORIES = 32
TRANSFORMS = (
    "value",
    "column",
    "row_mean",
    "row_std",
    "channel_mean",
    "channel_std",
    "argmax",
    "max",
)


class ReferenceError(ValueError):
    """A reference (or the data for one) that cannot be used; the message names why."""


def feature_values(array: np.ndarray, transform: str, index: int | None) -> np.ndarray:
    """Per-sample values of one feature: shape ``(N,)``."""
    a = np.asarray(array)
    if a.ndim == 0:
        a = a.reshape(1)
    n = a.shape[0]
    if transform == "value":
        return a.reshape(n, -1)[:, 0] if a.ndim > 1 else a
    if transform == "column":
        return a.reshape(n, -1)[:, index]
    if transform == "row_mean":
        return a.reshape(n, -1).astype(np.float64).mean(axis=1)
    if transform == "row_std":
        return a.reshape(n, -1).astype(np.float64).std(axis=1)
    if transform in ("channel_mean", "channel_std"):
        ch = a[:, index].reshape(n, -1).astype(np.float64)
        return ch.mean(axis=1) if transform == "channel_mean" else ch.std(axis=1)
    if transform == "argmax":
        return a.reshape(n, -1).argmax(axis=1)
    if transform == "max":
        return a.reshape(n, -1).max(axis=1)
    raise ReferenceError(f"unknown feature transform {transform!r}")


def _is_probabilities(a: np.ndarray) -> bool:
    if a.ndim != 2 or a.shape[1] < 2 or not np.issubdtype(a.dtype, np.floating) or a.size == 0:
        return False
    finite = a[np.isfinite(a).all(axis=1)]
    if finite.size == 0:
        return False
    in_range = bool(((finite >= -1e-6) & (finite <= 1 + 1e-6)).all())
    return in_range and bool(np.allclose(finite.sum(axis=1), 1.0, atol=1e-3))


def _plan(name: str, role: str, a: np.ndarray) -> list[tuple[str, str, int | None]]:
    """(feature name, transform, index) for one tensor."""
    if a.ndim <= 1 or (a.ndim == 2 and a.shape[1] == 1):
        return [(name, "value", None)]
    if a.ndim == 2:
        if role == "output" and _is_probabilities(a):
            return [(f"{name}.class", "argmax", None), (f"{name}.confidence", "max", None)]
        if a.shape[1] > MAX_COLUMNS:
            return [(f"{name}.mean", "row_mean", None), (f"{name}.std", "row_std", None)]
        return [(f"{name}[{j}]", "column", j) for j in range(a.shape[1])]
    plan: list[tuple[str, str, int | None]] = []
    for c in range(a.shape[1]):
        plan.append((f"{name}[c={c}].mean", "channel_mean", c))
        plan.append((f"{name}[c={c}].std", "channel_std", c))
    return plan


def _as_number(v: Any) -> float | int:
    return int(v) if isinstance(v, np.integer | int) else float(v)


def range_fields(values: np.ndarray) -> dict[str, Any]:
    """Observed range, moments and cardinality of a numeric feature's values."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    inf = int(np.isinf(v).sum())
    if finite.size == 0:
        return {
            "min": None,
            "max": None,
            "mean": None,
            "std": None,
            "inf": inf,
            "distinct": 0,
            "constant": False,
            "low_cardinality": False,
        }
    distinct = int(np.unique(finite).size)
    return {
        "min": float(finite.min()),
        "max": float(finite.max()),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "inf": inf,
        "distinct": min(distinct, MAX_CATEGORIES + 1),
        "constant": distinct == 1,
        "low_cardinality": distinct <= MAX_CATEGORIES,
    }


def has_range(spec: Mapping[str, Any]) -> bool:
    """Whether a feature spec carries a usable observed range (numeric, built with one)."""
    return (
        spec.get("kind") == "numeric"
        and isinstance(spec.get("min"), int | float)
        and isinstance(spec.get("max"), int | float)
    )


RANGE_TOLERANCE = 1e-6  # relative: float32 rounding of a value at the edge is not out of range


def range_bounds(spec: Mapping[str, Any]) -> tuple[float, float]:
    """(low, high): live values below ``low`` or above ``high`` are out of range."""
    lo, hi = float(spec["min"]), float(spec["max"])
    tol = RANGE_TOLERANCE * max(abs(lo), abs(hi))
    return lo - tol, hi + tol


def numeric_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Inner quantile edges (strictly increasing) of the finite values."""
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0 or bins < 2:
        return np.empty(0)
    qs = np.linspace(0.0, 1.0, bins + 1)[1:-1]
    edges = np.unique(np.quantile(finite, qs, method="linear"))
    # An edge at the minimum leaves the bin below it empty by construction: drop it.
    return edges[edges > finite.min()]


def count_numeric(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int]:
    """Counts per bin (len(edges) + 1) and the number of NaNs."""
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    idx = np.searchsorted(edges, v[~nan], side="right")
    return np.bincount(idx, minlength=len(edges) + 1), int(nan.sum())


def count_categorical(values: np.ndarray, categories: np.ndarray) -> np.ndarray:
    """Counts per category plus a last "other" bin."""
    v = np.asarray(values)
    idx = np.searchsorted(categories, v)
    idx = np.minimum(idx, len(categories))
    known = np.zeros(v.shape, dtype=bool)
    inside = idx < len(categories)
    known[inside] = categories[idx[inside]] == v[inside]
    idx = np.where(known, idx, len(categories))
    return np.bincount(idx, minlength=len(categories) + 1)


def _feature(
    name: str, tensor: str, role: str, transform: str, index: int | None, a: np.ndarray, bins: int
) -> dict[str, Any]:
    values = feature_values(a, transform, index)
    spec: dict[str, Any] = {
        "name": name,
        "tensor": tensor,
        "role": role,
        "transform": transform,
        "index": index,
    }
    is_int = np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_
    categorical = transform == "argmax" or (is_int and np.unique(values).size <= MAX_CATEGORIES)
    if categorical:
        if transform == "argmax":
            categories = np.arange(a.reshape(a.shape[0], -1).shape[1])
        else:
            categories = np.unique(values)
        spec["kind"] = "categorical"
        spec["categories"] = [_as_number(c) for c in categories]
        spec["counts"] = [int(c) for c in count_categorical(values, categories)]
        spec["missing"] = 0
        return spec
    edges = numeric_edges(values.astype(np.float64), bins)
    counts, missing = count_numeric(values, edges)
    spec["kind"] = "numeric"
    spec["edges"] = [float(e) for e in edges]
    spec["counts"] = [int(c) for c in counts]
    spec["missing"] = missing
    spec.update(range_fields(values))
    return spec


def reference_id(features: list[dict[str, Any]]) -> str:
    """sha256 of the bin layout (names, transforms, edges/categories): sketches carry it."""
    layout = [
        {k: f.get(k) for k in ("name", "tensor", "transform", "index", "edges", "categories")}
        for f in features
    ]
    blob = json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def build_reference(
    inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], bins: int = 10
) -> dict[str, Any]:
    """Bin every input feature and output of the given samples (axis 0) into a reference."""
    if bins < 2:
        raise ReferenceError(f"bins must be >= 2, got {bins}")
    features: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    samples: int | None = None
    for role, tensors in (("input", inputs), ("output", outputs)):
        for tensor, raw in tensors.items():
            a = np.asarray(raw)
            if a.ndim == 0 or a.shape[0] == 0:
                skipped.append({"tensor": tensor, "reason": "no samples on axis 0"})
                continue
            if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
                skipped.append({"tensor": tensor, "reason": f"dtype {a.dtype} is not numeric"})
                continue
            if samples is not None and a.shape[0] != samples:
                raise ReferenceError(
                    f"tensor {tensor!r} has {a.shape[0]} samples, others have {samples}"
                )
            samples = a.shape[0]
            for name, transform, index in _plan(tensor, role, a):
                features.append(_feature(name, tensor, role, transform, index, a, bins))
    if not features:
        raise ReferenceError("no numeric tensor with samples to build a reference from")
    return {
        "format": FORMAT,
        "id": reference_id(features),
        "bins": bins,
        "samples": int(samples or 0),
        "skipped": skipped,
        "features": features,
    }


def validate_reference(ref: Mapping[str, Any]) -> None:
    """Raise :class:`ReferenceError` naming the first thing wrong with a reference dict."""
    if ref.get("format") != FORMAT:
        raise ReferenceError(f"reference format {ref.get('format')!r} is not {FORMAT}")
    feats = ref.get("features")
    if not isinstance(feats, list) or not feats:
        raise ReferenceError("reference has no features")
    for f in feats:
        name = f.get("name")
        if f.get("transform") not in TRANSFORMS:
            raise ReferenceError(f"feature {name!r}: unknown transform {f.get('transform')!r}")
        if f.get("kind") == "numeric":
            edges = np.asarray(f.get("edges", []), dtype=np.float64)
            if edges.size and not (np.diff(edges) > 0).all():
                raise ReferenceError(f"feature {name!r}: edges are not strictly increasing")
            expected = edges.size + 1
        elif f.get("kind") == "categorical":
            expected = len(f.get("categories", [])) + 1
        else:
            raise ReferenceError(f"feature {name!r}: unknown kind {f.get('kind')!r}")
        if f.get("kind") == "numeric" and ("min" in f or "max" in f):
            lo, hi = f.get("min"), f.get("max")
            if (lo is None) != (hi is None):
                raise ReferenceError(f"feature {name!r}: min and max must both be set or null")
            if lo is not None:
                if not isinstance(lo, int | float) or not isinstance(hi, int | float):
                    raise ReferenceError(f"feature {name!r}: min/max are not numbers")
                if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                    raise ReferenceError(f"feature {name!r}: range [{lo}, {hi}] is not finite")
                if edges.size and not (lo <= edges[0] and edges[-1] <= hi):
                    raise ReferenceError(f"feature {name!r}: edges lie outside [min, max]")
        if len(f.get("counts", [])) != expected:
            raise ReferenceError(f"feature {name!r}: {len(f['counts'])} counts, {expected} bins")
    if ref.get("id") != reference_id(feats):
        raise ReferenceError("reference id does not match its bin layout")
