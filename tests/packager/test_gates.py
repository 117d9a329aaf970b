"""Gates that know their sample size: intervals, McNemar on the discordant pairs, samples needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgefleet.packager.evaluate import Metrics, compare
from edgefleet.packager.profiles import AccuracyGate
from edgefleet.packager.search import (
    CandidateResult,
    check_gate,
    choose,
    judge,
    judge_accuracy_drop,
    judge_agreement,
)
from edgefleet.packager.stats import (
    binom_cdf,
    clopper_pearson,
    drop_upper,
    mcnemar_exact,
    wilson,
)

GATE = AccuracyGate(min_agreement=0.98, max_accuracy_drop=0.01)


def test_intervals_match_known_values() -> None:
    lo, hi = wilson(51, 51)
    assert hi == 1.0 and lo == pytest.approx(51 / (51 + 1.959963984540054**2), abs=1e-9)
    lo, hi = clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-6)
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(0.812914, abs=1e-5)
    assert binom_cdf(3, 3, 0.3) == 1.0
    assert binom_cdf(0, 4, 0.5) == pytest.approx(1 / 16)
    assert mcnemar_exact(1, 0) == pytest.approx(0.5)
    assert mcnemar_exact(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_exact(0, 0) == 1.0
    assert drop_upper(0, 0, 51) > 0.05 and drop_upper(0, 0, 2000) < 0.01


def _m(n: int, agreeing: int, lost: int, gained: int) -> Metrics:
    src_acc = 0.9
    acc = src_acc - (lost - gained) / n
    return Metrics(
        agreeing / n, acc, src_acc, 0.2, n, "p", agreeing=agreeing, lost=lost, gained=gained
    )


def test_one_image_of_51_does_not_fail_a_one_point_gate() -> None:
    """The case that used to reject the right candidate: 1 lost of 51 reads as a 1.96-point drop."""
    m = _m(51, 50, lost=1, gained=0)
    drop = judge_accuracy_drop(m, GATE)
    assert drop is not None
    assert drop.measured == pytest.approx(1 / 51)
    assert drop.verdict == "unresolved" and drop.passes
    assert "p = 0.5" in drop.test
    # at the observed rates, ~5 lost pairs make the drop significant: about 5 x 51 samples
    assert drop.samples_needed is not None and 200 <= drop.samples_needed <= 300
    assert check_gate(m, GATE) == []
    strict = check_gate(m, GATE, strict=True)
    assert {g.gate for g in strict} == {"max_accuracy_drop", "min_agreement"}
    assert "51 samples cannot resolve it" in drop.describe()


def test_a_significant_drop_fails_and_a_clear_pass_is_resolved() -> None:
    bad = judge_accuracy_drop(_m(200, 180, lost=12, gained=1), GATE)
    assert bad is not None and bad.verdict == "fail" and not bad.passes
    assert [g.gate for g in check_gate(_m(200, 180, lost=12, gained=1), GATE)] == [
        "min_agreement",
        "max_accuracy_drop",
    ]
    good = judge_accuracy_drop(_m(5000, 5000, lost=0, gained=0), GATE)
    assert good is not None and good.verdict == "pass" and good.samples_needed is None


def test_agreement_resolution_and_samples_needed() -> None:
    v = judge_agreement(_m(51, 51, 0, 0), GATE)
    assert v.verdict == "unresolved" and v.passes
    # Wilson lower bound of n/n reaches 0.98 at n >= 0.98 z^2 / 0.02
    need = math.ceil(0.98 * 1.959963984540054**2 / 0.02)
    assert v.samples_needed == need
    assert wilson(need, need)[0] >= 0.98 > wilson(need - 1, need - 1)[0]
    assert judge_agreement(_m(1000, 999, 0, 0), GATE).verdict == "pass"
    assert judge_agreement(_m(1000, 900, 0, 0), GATE).verdict == "fail"
    # a candidate numerically identical to the source needs no statistics
    same = Metrics(1.0, 0.9, 0.9, 1e-7, 51, "p", agreeing=51, lost=0, gained=0, source_scale=1.0)
    assert [v.verdict for v in judge(same, GATE)] == ["pass", "pass"]
    assert check_gate(same, GATE, strict=True) == []


def test_fidelity_beyond_top1() -> None:
    src = {
        "p": np.array([[0.95, 0.05], [0.10, 0.90], [0.55, 0.45], [0.40, 0.60]], dtype=np.float32)
    }
    cand = {
        "p": np.array([[0.90, 0.10], [0.20, 0.80], [0.45, 0.55], [0.40, 0.60]], dtype=np.float32)
    }
    m = compare(src, cand, np.array([0, 1, 0, 0]))
    assert m.confident is not None and m.hard is not None
    assert (m.confident.samples, m.confident.agreeing) == (2, 2)
    assert (m.hard.samples, m.hard.agreeing) == (2, 1)  # the flip is on a low-confidence input
    assert m.lost == 1 and m.gained == 0
    assert m.cosine_min is not None and m.cosine_mean is not None
    assert 0.9 < m.cosine_min < m.cosine_mean < 1.0
    d = m.to_dict()
    assert d["hard"]["agreement_ci95"][0] < 0.5 < d["hard"]["agreement_ci95"][1]
    assert d["agreement_ci95"][1] <= 1.0
    # logits, not probabilities: the split uses their softmax
    logits = compare(
        {"p": np.array([[5.0, 0.0], [0.1, 0.0]], np.float32)}, {"p": np.zeros((2, 2), np.float32)}
    )
    assert logits.hard is not None and logits.hard.samples == 1


def _cand(name: str, p50: float, fp32_nodes: int, size: int) -> CandidateResult:
    c = CandidateResult(name, {"id": name}, p50_ms=p50, size_bytes=size, accepted=True)
    c.cost = {"fp32_compute_nodes": fp32_nodes, "size_bytes": size}
    return c


def test_accelerators_are_ranked_by_the_cost_model_not_cpu_latency() -> None:
    fast_on_cpu = _cand("fp32-islands", 1.0, fp32_nodes=3, size=100)
    all_int8 = _cand("all-int8", 5.0, fp32_nodes=0, size=120)
    smaller = _cand("all-int8-small", 9.0, fp32_nodes=0, size=110)
    best = choose([fast_on_cpu, all_int8, smaller], rank="cost")
    assert best is smaller and smaller.reason.startswith("lowest cost within gate")
    assert "latency not measured on the target" in smaller.reason
    best = choose([_cand("a", 1.0, 3, 100), _cand("b", 5.0, 0, 120)], rank="latency")
    assert best is not None and best.candidate == "a"


def test_latency_ties_go_to_the_most_faithful_candidate() -> None:
    def cand(name: str, p50: float, agreement: float) -> CandidateResult:
        m = Metrics(agreement, None, None, 0.1, 1000, "p", agreeing=round(agreement * 1000))
        return CandidateResult(name, {"id": name}, metrics=m, p50_ms=p50, accepted=True)

    per_tensor, per_channel = cand("per-tensor", 1.00, 0.985), cand("per-channel", 1.03, 0.999)
    slow = cand("fp32", 2.0, 1.0)
    assert choose([per_tensor, per_channel, slow]) is per_channel
    assert "most faithful" in per_channel.reason
    assert choose([cand("a", 1.0, 0.985), cand("b", 1.2, 0.999)]).candidate == "a"  # type: ignore[union-attr]


def test_drift_reference_warnings_are_one_line_at_packaging_time() -> None:
    """A 64-input model can have dozens of thinly sampled features: packaging logs one line
    naming how many and the first few, not one line each (the manifest keeps every line)."""
    from edgefleet.packager.pipeline import drift_reference_summary

    warnings = [f"features[{i}]: constant (0) in the reference; ..." for i in range(6)]
    line = drift_reference_summary(warnings)
    assert "\n" not in line
    assert line.startswith("drift reference: 6 feature(s)")
    assert "features[0], features[1], features[2], features[3] and 2 more" in line
    assert "drift_reference.warnings" in line
    assert "(features[0], features[1]);" in drift_reference_summary(warnings[:2])
