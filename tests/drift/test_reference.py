"""The drift reference: format, binning and JSON round trip on real example data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris

from edgefleet.drift.reference import (
    FORMAT,
    ReferenceError,
    build_reference,
    validate_reference,
)


def test_tabular_columns_and_class_outputs() -> None:
    x, y = load_iris(return_X_y=True)
    probs = np.eye(3, dtype=np.float32)[y] * 0.8 + 0.2 / 3
    ref = build_reference(
        {"float_input": x.astype(np.float32)},
        {"output_label": y.astype(np.int64), "output_probability": probs},
    )
    validate_reference(ref)
    assert ref["format"] == FORMAT and ref["samples"] == 150
    by_name = {f["name"]: f for f in ref["features"]}
    assert [f"float_input[{j}]" for j in range(4)] == [n for n in by_name if "input[" in n]
    for j in range(4):
        f = by_name[f"float_input[{j}]"]
        assert f["kind"] == "numeric" and sum(f["counts"]) == 150
        assert len(f["counts"]) == len(f["edges"]) + 1
        assert all(c > 0 for c in f["counts"]), f  # quantile bins are never empty
    label = by_name["output_label"]
    assert label["kind"] == "categorical" and label["categories"] == [0, 1, 2]
    assert label["counts"] == [50, 50, 50, 0]
    cls = by_name["output_probability.class"]
    assert cls["counts"] == [50, 50, 50, 0]
    assert by_name["output_probability.confidence"]["kind"] == "numeric"
    assert json.loads(json.dumps(ref)) == ref


def test_quantile_bins_are_balanced_on_continuous_data() -> None:
    x, _ = load_breast_cancer(return_X_y=True)
    ref = build_reference({"x": x}, {}, bins=10)
    assert len(ref["features"]) == 30
    for f in ref["features"]:
        counts = np.array(f["counts"])
        assert counts.sum() == len(x)
        if len(counts) == 10:
            assert counts.min() >= 40 and counts.max() <= 75, f["name"]


def test_image_tensors_get_per_channel_mean_and_std() -> None:
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 3, 8, 8)).astype(np.float32)
    img[:, 1] += 5.0
    ref = build_reference({"img": img}, {"score": rng.random(40).astype(np.float32)})
    names = [f["name"] for f in ref["features"]]
    assert names == [
        "img[c=0].mean",
        "img[c=0].std",
        "img[c=1].mean",
        "img[c=1].std",
        "img[c=2].mean",
        "img[c=2].std",
        "score",
    ]
    c1 = ref["features"][2]
    assert 4.0 < c1["edges"][0] < c1["edges"][-1] < 6.0


def test_nan_is_counted_as_missing_and_strings_are_skipped() -> None:
    x = np.arange(100, dtype=np.float64).reshape(50, 2)
    x[3, 0] = np.nan
    ref = build_reference({"x": x, "names": np.array(["a"] * 50)}, {})
    assert ref["features"][0]["missing"] == 1
    assert sum(ref["features"][0]["counts"]) == 49
    assert ref["skipped"] == [{"tensor": "names", "reason": "dtype <U1 is not numeric"}]


def test_rejections_name_their_reason() -> None:
    with pytest.raises(ReferenceError, match="samples"):
        build_reference({"a": np.zeros((5, 2)), "b": np.zeros((6, 2))}, {})
    with pytest.raises(ReferenceError, match="no numeric tensor"):
        build_reference({}, {})
    ref = build_reference({"a": np.arange(20.0)}, {})
    ref["features"][0]["edges"][0] = 1e9
    with pytest.raises(ReferenceError, match=r"increasing|id"):
        validate_reference(ref)
