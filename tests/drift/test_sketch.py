"""Live sketches count exactly what the reference builder counts, and merge by addition."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_digits, load_iris

from edgefleet.drift.reference import build_reference
from edgefleet.drift.sketch import Sketch, SketchError, merge_dicts


def _iris_ref() -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    probs = (np.eye(3)[y] * 0.7 + 0.1).astype(np.float32)
    return build_reference({"x": x}, {"label": y, "p": probs}), x, y, probs


def test_counting_the_reference_data_reproduces_the_reference_counts() -> None:
    ref, x, y, probs = _iris_ref()
    sk = Sketch(ref)
    for i in range(0, 150, 7):  # uneven batches
        sk.update({"x": x[i : i + 7]}, {"label": y[i : i + 7], "p": probs[i : i + 7]})
    assert sk.n == 150
    d = sk.to_dict()
    for f in ref["features"]:
        assert d["counts"][f["name"]] == f["counts"], f["name"]


def test_images_nan_and_unknown_categories() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(size=(64, 3, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=64)
    ref = build_reference({"img": img}, {"label": labels})
    sk = Sketch(ref)
    sk.update({"img": img}, {"label": labels})
    for f in ref["features"]:
        assert sk.to_dict()["counts"][f["name"]] == f["counts"]
    sk.reset()
    bad = img[:2].copy()
    bad[0, 0, 0, 0] = np.nan
    sk.update({"img": bad}, {"label": np.array([7, 1])})
    d = sk.to_dict()
    assert d["missing"]["img[c=0].mean"] == 1 and d["missing"]["img[c=0].std"] == 1
    assert d["counts"]["label"][-1] == 1  # 7 was never seen: the "other" bin
    assert sum(d["counts"]["img[c=1].mean"]) == 2


def test_wire_round_trip_and_merge_by_addition() -> None:
    ref, x, y, probs = _iris_ref()
    a, b = Sketch(ref), Sketch(ref)
    a.update({"x": x[:60]}, {"label": y[:60], "p": probs[:60]})
    b.update({"x": x[60:]}, {"label": y[60:], "p": probs[60:]})
    wire_a = json.loads(json.dumps(a.to_dict()))
    back = Sketch.from_dict(ref, wire_a)
    assert back.to_dict() == a.to_dict()
    total = (a + b).to_dict()
    assert total["n"] == 150
    assert merge_dicts(a.to_dict(), b.to_dict()) == total
    for f in ref["features"]:
        assert total["counts"][f["name"]] == f["counts"]


def test_sketches_of_other_references_are_refused() -> None:
    ref, *_ = _iris_ref()
    other = build_reference({"x": np.arange(10.0)}, {})
    with pytest.raises(SketchError, match="different references"):
        Sketch(ref).merge(Sketch(other))
    with pytest.raises(SketchError, match="reference"):
        Sketch.from_dict(ref, Sketch(other).to_dict())
    bad = Sketch(ref).to_dict()
    bad["counts"]["x[0]"] = [1, 2]
    with pytest.raises(SketchError, match="bins"):
        Sketch.from_dict(ref, bad)


def test_64_feature_digits_counts_match_per_feature_searchsorted() -> None:
    x, _ = load_digits(return_X_y=True)
    x = x + np.random.default_rng(0).normal(0, 0.3, size=x.shape)
    ref = build_reference({"pixels": x[:1000]}, {})
    sk = Sketch(ref)
    sk.update({"pixels": x[1000:]})
    d = sk.to_dict()
    for f in ref["features"]:
        col = x[1000:, f["index"]]
        expected = np.bincount(
            np.searchsorted(f["edges"], col, side="right"), minlength=len(f["edges"]) + 1
        )
        assert d["counts"][f["name"]] == expected.tolist()
