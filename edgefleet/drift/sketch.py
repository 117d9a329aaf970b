"""Live sketches: counts of live inputs/outputs in a reference's bins; they merge by addition.

Counting is vectorised per tensor: the values of all numeric features of a tensor are compared
with a padded edge matrix at once and one ``bincount`` adds them up, so a batch costs a handful of
numpy calls whatever the number of features.

Wire form (``to_dict``)::

    {"reference_id", "n": samples counted, "counts": {feature: [per bin]}, "missing": {feature: int}}
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.drift.reference import ReferenceError, feature_values

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

    def __post_init__(self) -> None:
        feats = self.reference.get("features")
        if not isinstance(feats, list):
            raise ReferenceError("reference has no features")
        self._slots = []
        start = 0
        by_key: dict[tuple[str, str], list[tuple[int | None, np.ndarray, int]]] = {}
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
            else:
                self._cats.append(
                    _Categorical(
                        f["tensor"], f["transform"], f["index"], np.asarray(f["categories"]), start
                    )
                )
            start += nb + 1
        self._flat = np.zeros(start, dtype=np.int64)
        self._groups = []
        for (tensor, transform), items in by_key.items():
            kmax = max(1, max(len(e) for _, e, _ in items))
            edges = np.full((len(items), kmax), np.inf)
            for j, (_, e, _) in enumerate(items):
                edges[j, : len(e)] = e
            idx = [i for i, _, _ in items]
            self._groups.append(
                _Group(
                    tensor=tensor,
                    transform=transform,
                    indices=None if idx == [None] else np.asarray(idx, dtype=np.int64),
                    edges=edges,
                    offsets=np.asarray([s for _, _, s in items], dtype=np.int64),
                    nbins=np.asarray([len(e) + 1 for _, e, _ in items], dtype=np.int64),
                    edge_list=[e for _, e, _ in items],
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

    def counts(self, name: str) -> np.ndarray:
        for fname, start, nb in self._slots:
            if fname == name:
                return self._flat[start : start + nb].copy()
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference_id": self.reference_id,
            "n": int(self.n),
            "counts": {
                name: [int(x) for x in self._flat[s : s + nb]] for name, s, nb in self._slots
            },
            "missing": {name: int(self._flat[s + nb]) for name, s, nb in self._slots},
        }

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
        if (sk._flat < 0).any():
            raise SketchError("negative counts")
        sk.n = int(data.get("n", 0))
        return sk

    def merge(self, other: Sketch) -> Sketch:
        """Add ``other`` into this sketch (same reference only); returns self."""
        if other.reference_id != self.reference_id:
            raise SketchError("cannot merge sketches of different references")
        self._flat += other._flat
        self.n += other.n
        return self

    def __add__(self, other: Sketch) -> Sketch:
        out = Sketch(self.reference)
        return out.merge(self).merge(other)

    def reset(self) -> None:
        self._flat[:] = 0
        self.n = 0


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
    return {
        "reference_id": a.get("reference_id"),
        "n": int(a.get("n", 0)) + int(b.get("n", 0)),
        "counts": counts,
        "missing": missing,
    }
