"""Live sketches: counts of live inputs/outputs in a reference's bins; they merge by addition.

Counting is vectorised per tensor: the values of all numeric features of a tensor are compared
with a padded edge matrix at once and one ``bincount`` adds them up, so a batch costs a handful of
numpy calls whatever the number of features.

Wire form (``to_dict``)::

    {"reference_id", "n": samples counted, "counts": {feature: [per bin]}, "missing": {feature: int},
     "range": {feature: [checked, below, above, nan, inf]}}   # features with a recorded range

``range`` (slots :data:`edgefleet.wire.telemetry.RANGE_SLOTS`) counts, per numeric feature whose
reference records its observed range, the live values checked, finite ones below the minimum or
above the maximum (they are in the outer bins too), NaNs and +-infs. It is absent for references
without a range; sketches from agents that predate it have none and still merge (the merged
``checked`` then covers only the values that were checked).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.drift.reference import ReferenceError, feature_values, has_range, range_bounds
from edgefleet.wire.telemetry import RANGE_SLOTS

NSLOTS = len(RANGE_SLOTS)

LOOP_ROWS = 32  # from this batch size on, per-feature searchsorted beats the broadcast


class SketchError(ValueError):
    """Sketches that cannot be combined or decoded; the message names why."""


@dataclass
class _Group:
    """Numeric features of one tensor sharing a transform family, counted together."""

    tensor: str
    transform: str
    indices: np.ndarray | None  # column/channel per feature (None: one feature, index None)
    edges: np.ndarray  # (d, kmax), padded with +inf
    offsets: np.ndarray  # (d,) start of each feature's slots in the flat counts
    nbins: np.ndarray  # (d,)
    edge_list: list[np.ndarray]  # unpadded edges per feature
    ranged: np.ndarray  # (d,) bool: the feature has a recorded range
    ridx: np.ndarray  # (r,) rows of the range counts of the ranged features
    lo: np.ndarray  # (r,) out-of-range bounds of the ranged features
    hi: np.ndarray


@dataclass
class _Categorical:
    tensor: str
    transform: str
    index: int | None
    categories: np.ndarray
    offset: int


@dataclass
class Sketch:
    """Counts of live data in the bins of ``reference`` (a :func:`build_reference` dict)."""

    reference: Mapping[str, Any]
    n: int = 0
    _flat: np.ndarray = field(init=False, repr=False)
    _slots: list[tuple[str, int, int]] = field(init=False, repr=False)  # name, start, nbins
    _groups: list[_Group] = field(init=False, repr=False)
    _cats: list[_Categorical] = field(init=False, repr=False)
    _range: np.ndarray = field(init=False, repr=False)  # (ranged features, NSLOTS)
    _rnames: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        feats = self.reference.get("features")
        if not isinstance(feats, list):
            raise ReferenceError("reference has no features")
        self._slots = []
        start = 0
        by_key: dict[tuple[str, str], list[tuple[int | None, np.ndarray, int]]] = {}
        ranges: dict[int, tuple[int, float, float]] = {}  # slot start -> (row, lo, hi)
        self._rnames = []
        self._cats = []
        for f in feats:
            nb = len(f["edges"] if f["kind"] == "numeric" else f["categories"]) + 1
            # one extra slot per feature for missing (NaN) values
            self._slots.append((f["name"], start, nb))
            if f["kind"] == "numeric":
                key = (f["tensor"], f["transform"])
                by_key.setdefault(key, []).append(
                    (f["index"], np.asarray(f["edges"], dtype=np.float64), start)
                )
                if has_range(f):
                    ranges[start] = (len(self._rnames), *range_bounds(f))
                    self._rnames.append(f["name"])
            else:
                self._cats.append(
                    _Categorical(
                        f["tensor"], f["transform"], f["index"], np.asarray(f["categories"]), start
                    )
                )
            start += nb + 1
        self._flat = np.zeros(start, dtype=np.int64)
        self._range = np.zeros((len(self._rnames), NSLOTS), dtype=np.int64)
        self._groups = []
        for (tensor, transform), items in by_key.items():
            kmax = max(1, max(len(e) for _, e, _ in items))
            edges = np.full((len(items), kmax), np.inf)
            for j, (_, e, _) in enumerate(items):
                edges[j, : len(e)] = e
            idx = [i for i, _, _ in items]
            rng = [ranges.get(s) for _, _, s in items]
            self._groups.append(
                _Group(
                    tensor=tensor,
                    transform=transform,
                    indices=None if idx == [None] else np.asarray(idx, dtype=np.int64),
                    edges=edges,
                    offsets=np.asarray([s for _, _, s in items], dtype=np.int64),
                    nbins=np.asarray([len(e) + 1 for _, e, _ in items], dtype=np.int64),
                    edge_list=[e for _, e, _ in items],
                    ranged=np.asarray([r is not None for r in rng], dtype=bool),
                    ridx=np.asarray([r[0] for r in rng if r is not None], dtype=np.int64),
                    lo=np.asarray([r[1] for r in rng if r is not None], dtype=np.float64),
                    hi=np.asarray([r[2] for r in rng if r is not None], dtype=np.float64),
                )
            )

    @property
    def reference_id(self) -> str:
        return str(self.reference.get("id", ""))

    def _group_values(self, g: _Group, a: np.ndarray) -> np.ndarray:
        """(n, d) float64 values of a group's features."""
        n = a.shape[0]
        if g.transform == "column" and g.indices is not None:
            return a.reshape(n, -1)[:, g.indices].astype(np.float64, copy=False)
        if g.transform in ("channel_mean", "channel_std") and g.indices is not None:
            ch = a[:, g.indices].reshape(n, len(g.indices), -1).astype(np.float64, copy=False)
            return ch.mean(axis=2) if g.transform == "channel_mean" else ch.std(axis=2)
        if g.indices is None:
            return feature_values(a, g.transform, None).astype(np.float64).reshape(n, 1)
        cols = [feature_values(a, g.transform, int(i)) for i in g.indices]
        return np.stack(cols, axis=1).astype(np.float64)

    def update(
        self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray] | None = None
    ) -> int:
        """Count one batch (samples on axis 0); tensors the reference does not know are ignored.

        Returns the batch's sample count.
        """
        tensors: dict[str, np.ndarray] = {}
        for src in (inputs, outputs or {}):
            for name, arr in src.items():
                tensors[name] = np.asarray(arr)
        batch = 0
        pieces: list[np.ndarray] = []
        for g in self._groups:
            a = tensors.get(g.tensor)
            if a is None:
                continue
            if a.ndim == 0:
                a = a.reshape(1)
            vals = self._group_values(g, a)
            batch = max(batch, vals.shape[0])
            if vals.shape[0] >= LOOP_ROWS:  # big batches: one searchsorted per feature
                bins = np.empty(vals.shape, dtype=np.int64)
                for j in range(vals.shape[1]):
                    bins[:, j] = np.searchsorted(g.edge_list[j], vals[:, j], side="right")
            else:  # small batches: one broadcast comparison for all features
                bins = (vals[:, :, None] >= g.edges[None, :, :]).sum(axis=2)
            bins = np.where(np.isnan(vals), g.nbins[None, :], bins)
            pieces.append((bins + g.offsets[None, :]).ravel())
            if g.ridx.size:
                self._count_range(g, vals)
        for c in self._cats:
            a = tensors.get(c.tensor)
            if a is None:
                continue
            if a.ndim == 0:
                a = a.reshape(1)
            v = feature_values(a, c.transform, c.index)
            batch = max(batch, v.shape[0])
            ncat = len(c.categories)
            idx = np.minimum(np.searchsorted(c.categories, v), ncat)
            ok = idx < ncat
            known = np.zeros(v.shape, dtype=bool)
            known[ok] = c.categories[idx[ok]] == v[ok]
            idx = np.where(known, idx, ncat)
            pieces.append(idx + c.offset)
        if pieces:
            flat = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
            self._flat += np.bincount(flat, minlength=self._flat.size)
        self.n += batch
        return batch

    def _count_range(self, g: _Group, vals: np.ndarray) -> None:
        v = vals if g.ranged.all() else vals[:, g.ranged]
        finite = np.isfinite(v)
        nan = np.isnan(v)
        block = np.empty((v.shape[1], NSLOTS), dtype=np.int64)
        block[:, 0] = v.shape[0]
        block[:, 1] = ((v < g.lo[None, :]) & finite).sum(axis=0)
        block[:, 2] = ((v > g.hi[None, :]) & finite).sum(axis=0)
        block[:, 3] = nan.sum(axis=0)
        block[:, 4] = v.shape[0] - finite.sum(axis=0) - block[:, 3]
        self._range[g.ridx] += block

    def range_counts(self, name: str) -> np.ndarray:
        """[checked, below, above, nan, inf] of a feature with a recorded range."""
        return self._range[self._rnames.index(name)].copy()

    def counts(self, name: str) -> np.ndarray:
        for fname, start, nb in self._slots:
            if fname == name:
                return self._flat[start : start + nb].copy()
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "reference_id": self.reference_id,
            "n": int(self.n),
            "counts": {
                name: [int(x) for x in self._flat[s : s + nb]] for name, s, nb in self._slots
            },
            "missing": {name: int(self._flat[s + nb]) for name, s, nb in self._slots},
        }
        if self._rnames:
            out["range"] = {
                name: [int(x) for x in row]
                for name, row in zip(self._rnames, self._range, strict=True)
            }
        return out

    @classmethod
    def from_dict(cls, reference: Mapping[str, Any], data: Mapping[str, Any]) -> Sketch:
        """Decode a wire sketch against its reference (ids must match)."""
        sk = cls(reference)
        if data.get("reference_id") != sk.reference_id:
            raise SketchError(
                f"sketch is for reference {str(data.get('reference_id'))[:12]}, "
                f"not {sk.reference_id[:12]}"
            )
        counts = data.get("counts", {})
        missing = data.get("missing", {})
        for name, s, nb in sk._slots:
            c = counts.get(name)
            if c is None:
                continue
            if len(c) != nb:
                raise SketchError(f"feature {name!r}: {len(c)} counts, reference has {nb} bins")
            sk._flat[s : s + nb] = np.asarray(c, dtype=np.int64)
            sk._flat[s + nb] = int(missing.get(name, 0))
        ranges = data.get("range") or {}
        if not isinstance(ranges, Mapping):
            raise SketchError("range is not an object")
        for row, name in enumerate(sk._rnames):
            r = ranges.get(name)
            if r is not None:
                sk._range[row] = _range_row(name, r)
        if (sk._flat < 0).any():
            raise SketchError("negative counts")
        sk.n = int(data.get("n", 0))
        return sk

    def merge(self, other: Sketch) -> Sketch:
        """Add ``other`` into this sketch (same reference only); returns self."""
        if other.reference_id != self.reference_id:
            raise SketchError("cannot merge sketches of different references")
        self._flat += other._flat
        self._range += other._range
        self.n += other.n
        return self

    def __add__(self, other: Sketch) -> Sketch:
        out = Sketch(self.reference)
        return out.merge(self).merge(other)

    def reset(self) -> None:
        self._flat[:] = 0
        self._range[:] = 0
        self.n = 0


def _range_row(name: str, r: Any) -> np.ndarray:
    """A wire ``range`` entry, checked: NSLOTS non-negative integers, parts <= checked."""
    if not isinstance(r, list | tuple) or len(r) != NSLOTS:
        raise SketchError(f"feature {name!r}: range needs {NSLOTS} counts {RANGE_SLOTS}")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in r):
        raise SketchError(f"feature {name!r}: range counts must be non-negative integers")
    row = np.asarray(r, dtype=np.int64)
    if row[1:].sum() > row[0]:
        raise SketchError(f"feature {name!r}: more out-of-range values than values checked")
    return row


def merge_dicts(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Add two wire sketches of the same reference without decoding the reference."""
    if a.get("reference_id") != b.get("reference_id"):
        raise SketchError("cannot merge sketches of different references")
    counts: dict[str, list[int]] = {k: list(v) for k, v in a.get("counts", {}).items()}
    for k, v in b.get("counts", {}).items():
        if k in counts:
            if len(counts[k]) != len(v):
                raise SketchError(f"feature {k!r}: bin counts differ ({len(counts[k])}, {len(v)})")
            counts[k] = [x + y for x, y in zip(counts[k], v, strict=True)]
        else:
            counts[k] = list(v)
    missing = dict(a.get("missing", {}))
    for k, m in b.get("missing", {}).items():
        missing[k] = int(missing.get(k, 0)) + int(m)
    out: dict[str, Any] = {
        "reference_id": a.get("reference_id"),
        "n": int(a.get("n", 0)) + int(b.get("n", 0)),
        "counts": counts,
        "missing": missing,
    }
    ra, rb = a.get("range"), b.get("range")
    if ra or rb:  # a sketch without ranges (an older agent) adds nothing to them
        ranges: dict[str, list[int]] = {}
        for src in (ra or {}, rb or {}):
            if not isinstance(src, Mapping):
                raise SketchError("range is not an object")
            for k, v in src.items():
                row = _range_row(k, v)
                prev = ranges.get(k)
                ranges[k] = [int(x) for x in (row if prev is None else row + prev)]
        out["range"] = ranges
    return out
