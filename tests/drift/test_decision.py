"""The drift decision keeps its false-alarm rate at any window size and detects real shifts.

Null windows are drawn from the same population as the reference sample (a smoothed bootstrap
of scikit-learn's breast-cancer data: rows resampled plus a little Gaussian noise), so the
reference is a finite sample exactly as a packager's is.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_iris

from edgefleet.drift.decision import DriftConfig, decide
from edgefleet.drift.reference import build_reference
from edgefleet.drift.sketch import Sketch

ALPHA = 0.05


class Population:
    def __init__(self) -> None:
        x, _ = load_breast_cancer(return_X_y=True)
        self.x = x
        self.noise = 0.1 * x.std(axis=0)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        rows = self.x[rng.integers(0, len(self.x), size=n)]
        return rows + rng.normal(size=rows.shape) * self.noise


@pytest.fixture(scope="module")
def population() -> Population:
    return Population()


@pytest.fixture(scope="module")
def reference(population: Population) -> dict:
    return build_reference({"x": population.draw(np.random.default_rng(0), 2000)}, {})


def _windows(
    reference: dict,
    population: Population,
    n: int,
    count: int,
    seed: int,
    shift: np.ndarray | None = None,
) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        sk = Sketch(reference)
        x = population.draw(rng, n)
        if shift is not None:
            x = x + shift
        sk.update({"x": x})
        out.append(sk.to_dict())
    return out


@pytest.mark.parametrize(("n", "count"), [(100, 400), (1000, 300), (10_000, 100)])
@pytest.mark.parametrize("correction", ["bh", "bonferroni"])
def test_false_alarm_rate_is_controlled_at_every_window_size(
    reference: dict, population: Population, n: int, count: int, correction: str
) -> None:
    cfg = DriftConfig(alpha=ALPHA, correction=correction)  # type: ignore[arg-type]
    windows = _windows(reference, population, n, count, seed=n)
    alarms = sum(decide(reference, w, cfg).drift for w in windows)
    rate = alarms / count
    # binomial upper bound: alpha + 3 standard errors
    assert rate <= ALPHA + 3 * np.sqrt(ALPHA * (1 - ALPHA) / count), (n, rate)


def test_a_fixed_psi_cutoff_alarms_most_of_the_time_on_small_windows(
    reference: dict, population: Population
) -> None:
    windows = _windows(reference, population, 100, 200, seed=7)
    psi_alarms = 0
    for w in windows:
        d = decide(reference, w, DriftConfig(alpha=ALPHA))
        psi_alarms += max(f.psi for f in d.features) > 0.1
    assert psi_alarms / len(windows) > 0.5  # what the calibrated test above avoids


@pytest.mark.parametrize(("n", "sigmas", "min_power"), [(1000, 0.5, 0.9), (10_000, 0.2, 0.9)])
def test_shift_in_one_feature_is_detected_and_named(
    reference: dict, population: Population, n: int, sigmas: float, min_power: float
) -> None:
    shift = np.zeros(30)
    shift[7] = sigmas * population.x[:, 7].std()
    windows = _windows(reference, population, n, 40, seed=11, shift=shift)
    decisions = [decide(reference, w, DriftConfig(alpha=ALPHA)) for w in windows]
    power = sum(d.drift for d in decisions) / len(decisions)
    assert power >= min_power
    named = [d.drifted_features for d in decisions if d.drift]
    assert all("x[7]" in f for f in named)
    # BH controls the false discovery proportion: other features are rarely flagged along
    fdp = np.mean([(len(f) - 1) / len(f) for f in named])
    assert fdp <= ALPHA + 0.1


def test_scale_change_detected_by_chi2_even_when_the_mean_holds(
    reference: dict, population: Population
) -> None:
    rng = np.random.default_rng(5)
    x = population.draw(rng, 1000)
    mu = population.x[:, 3].mean()
    x[:, 3] = mu + (x[:, 3] - mu) * 1.5
    sk = Sketch(reference)
    sk.update({"x": x})
    d = decide(reference, sk.to_dict(), DriftConfig(alpha=0.01))
    assert d.drift and "x[3]" in d.drifted_features
    assert "features drifted" in d.reason and "alpha 0.01" in d.reason


def test_output_class_distribution_shift_on_iris_labels() -> None:
    x, y = load_iris(return_X_y=True)
    ref = build_reference({"x": x}, {"label": y})
    rng = np.random.default_rng(0)
    sk = Sketch(ref)
    labels = rng.choice(3, size=300, p=[0.6, 0.2, 0.2])
    sk.update({}, {"label": labels})
    d = decide(ref, sk.to_dict(), DriftConfig(features=["label"]))
    assert d.drift and d.drifted_features == ["label"]
    assert d.features[0].ks is None  # classes are unordered: no KS


def test_small_windows_and_foreign_sketches_are_insufficient_with_reason(
    reference: dict, population: Population
) -> None:
    w = _windows(reference, population, 50, 1, seed=1)[0]
    d = decide(reference, w, DriftConfig(min_samples=100))
    assert d.status == "insufficient_data" and "min_samples" in d.reason
    other = build_reference({"y": np.arange(10.0)}, {})
    assert "another reference" in decide(other, w).reason


def test_config_from_dict_rejects_unknown_keys() -> None:
    cfg = DriftConfig.from_dict({"alpha": 0.02, "features": ["a"]})
    assert cfg.alpha == 0.02 and cfg.features == ("a",)
    assert DriftConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown drift settings: threshold"):
        DriftConfig.from_dict({"threshold": 0.2})
    with pytest.raises(ValueError, match="alpha"):
        DriftConfig(alpha=2)
