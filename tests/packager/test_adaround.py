"""Learned rounding (AdaRound's per-layer problem) on the digits CNN: on-grid, lower error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgefleet.packager.adaround import _solve, adaround
from edgefleet.packager.evaluate import run_all, session
from edgefleet.packager.examples import ExampleModel
from edgefleet.packager.npzio import load_npz
from edgefleet.packager.quantize import build_candidate, pow2_ceil, preprocess
from edgefleet.packager.recipe import Recipe, RecipeError, parse_recipe


def test_solve_beats_nearest_rounding_on_correlated_inputs() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 12)) + rng.normal(size=(500, 1))  # strongly correlated inputs
    h = x.T @ x / len(x)
    v = rng.uniform(-20, 20, size=(30, 12))
    q = _solve(v, h, 127, np.zeros_like(v, dtype=bool))
    nearest = np.round(v)
    assert np.all((q == np.floor(v)) | (q == np.floor(v) + 1))  # only ever up or down

    def err(d: np.ndarray) -> float:
        return float(np.einsum("rd,de,re->", d, h, d))

    assert err(q - v) < 0.6 * err(nearest - v)


def test_weights_land_on_the_power_of_two_grid_and_layer_error_drops(
    examples: dict[str, ExampleModel], tmp_path: Path
) -> None:
    ex = examples["digits-cnn"]
    cal = load_npz(ex.calibration)
    names = [i.name for i in session(ex.model).get_inputs()]
    model = onnx.load(str(ex.model))
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    info = adaround(
        model, {n: cal[n] for n in names}, per_channel=False, power_of_two=True, correct_bias=True
    )
    assert info["adaround_layers"] >= 2
    assert info["adaround_output_error_ratio"] < 1.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w_name = node.input[1]
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == w_name))
        scale = pow2_ceil(float(np.abs(before[w_name]).max()) / 127)
        q = w.astype(np.float64) / scale
        assert np.array_equal(q, np.round(q)) and np.abs(q).max() <= 127
        # only up or down from the original value
        assert np.all(np.abs(q - before[w_name] / scale) < 1.0 + 1e-6)


def test_adaround_recipe_builds_a_pow2_model_that_keeps_its_accuracy(
    examples: dict[str, ExampleModel], tmp_path: Path
) -> None:
    ex = examples["digits-cnn"]
    cal, val = load_npz(ex.calibration), load_npz(ex.validation)
    names = [i.name for i in session(ex.model).get_inputs()]
    prep, _ = preprocess(ex.model, tmp_path / "prep.onnx", external=False)
    recipe = Recipe(
        "pow2-ada", "static", activation_type="QInt8", activation_symmetric=True,
        power_of_two=True, adaround=True, bias_correction=True,
    )  # fmt: skip
    info: dict[str, object] = {}
    out = build_candidate(
        recipe, source=ex.model, prepared=prep, out=tmp_path / "c" / "model.onnx",
        calibration={n: cal[n] for n in names}, external=False, info=info,
    )  # fmt: skip
    assert isinstance(info["adaround_layers"], int) and info["adaround_layers"] >= 2
    feed = {n: val[n] for n in names}
    ref = next(iter(run_all(session(ex.model), feed).values())).argmax(axis=1)
    got = next(iter(run_all(session(out), feed).values())).argmax(axis=1)
    assert np.mean(ref == got) >= 0.97
    assert recipe.to_dict()["adaround"] is True


@pytest.mark.parametrize(
    "raw",
    [
        {"id": "a", "method": "dynamic", "adaround": True},
        {"id": "a", "method": "static", "weight_type": "QUInt8", "adaround": True},
        {"id": "a", "method": "static", "adaround": "yes"},
    ],
)
def test_adaround_recipes_are_checked(raw: dict[str, object]) -> None:
    with pytest.raises(RecipeError, match="adaround"):
        parse_recipe(raw, "t")
