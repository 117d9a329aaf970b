"""The pure search decisions: gate checks with margins, fastest accepted candidate wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.packager.evaluate import Metrics, compare
from edgefleet.packager.profiles import AccuracyGate
from edgefleet.packager.search import CandidateResult, check_gate, choose, closest_miss

GATE = AccuracyGate(min_agreement=0.98, max_accuracy_drop=0.01)


def _metrics(
    agreement: float, accuracy: float | None = 0.95, source: float | None = 0.95
) -> Metrics:
    return Metrics(agreement, accuracy, source, 0.1, 100, "p")


def _cand(
    name: str, p50: float | None, metrics: Metrics | None, error: str | None = None
) -> CandidateResult:
    c = CandidateResult(name, {"id": name}, metrics=metrics, p50_ms=p50, error=error)
    if metrics is not None:
        c.misses = check_gate(metrics, GATE)
        c.accepted = not c.misses
    return c


def test_gate_misses_carry_margins() -> None:
    assert check_gate(_metrics(0.99), GATE) == []
    misses = check_gate(_metrics(0.95, accuracy=0.90, source=0.95), GATE)
    assert [m.gate for m in misses] == ["min_agreement", "max_accuracy_drop"]
    assert misses[0].margin == pytest.approx(-0.03)
    assert misses[1].measured == pytest.approx(0.05) and misses[1].margin == pytest.approx(-0.04)
    assert check_gate(_metrics(0.99, accuracy=None, source=None), GATE) == []
    strict = AccuracyGate(min_agreement=0.0, max_accuracy_drop=1.0, max_abs_error=0.01)
    assert [m.gate for m in check_gate(_metrics(1.0), strict)] == ["max_abs_error"]
    big = check_gate(_metrics(0.99), GATE, model_bytes=3 * 2**20, max_memory_mb=2)
    assert [(m.gate, m.margin) for m in big] == [("max_memory_mb", pytest.approx(-1.0))]
    assert check_gate(_metrics(0.99), GATE, model_bytes=2**20, max_memory_mb=2) == []


def test_choose_fastest_within_gate_and_record_why() -> None:
    results = [
        _cand("slow-ok", 2.0, _metrics(0.99)),
        _cand("fast-bad", 0.5, _metrics(0.90)),
        _cand("fast-ok", 1.0, _metrics(0.985)),
        _cand("broken", None, None, error="boom"),
    ]
    best = choose(results)
    assert best is not None and best.candidate == "fast-ok"
    by = {r.candidate: r for r in results}
    assert [r.candidate for r in results if r.chosen] == ["fast-ok"]
    assert by["slow-ok"].reason.startswith("within gate but slower")
    assert by["fast-bad"].reason.startswith("failed gate: min_agreement")
    assert "boom" in by["broken"].reason
    assert by["fast-ok"].reason.startswith("fastest within gate")


def test_no_candidate_within_gate() -> None:
    results = [_cand("a", 1.0, _metrics(0.90)), _cand("b", 1.0, _metrics(0.97))]
    assert choose(results) is None
    closest = closest_miss(results)
    assert closest is not None and closest.candidate == "b"
    assert not any(r.chosen for r in results)


def test_compare_metrics() -> None:
    import numpy as np

    src = {"p": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]], np.float32)}
    cand = {"p": np.array([[0.8, 0.2], [0.6, 0.4], [0.6, 0.4]], np.float32)}
    m = compare(src, cand, np.array([0, 1, 1]))
    assert m.agreement == pytest.approx(2 / 3)
    assert m.accuracy == pytest.approx(1 / 3) and m.source_accuracy == pytest.approx(2 / 3)
    assert m.max_abs_error == pytest.approx(0.4)
    assert m.score_output == "p"


def test_interleaved_timing_runs_every_model_in_turns_and_ranks_by_work(tmp_path: Path) -> None:
    """`measure_interleaved` gives each model the same number of runs, in rotated turns, and
    a model doing 16x the multiplications comes out slower (real ONNX Runtime sessions)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.packager.benchmark import measure_interleaved
    from edgefleet.packager.evaluate import session

    def chain(depth: int, path: Path) -> Path:
        w = numpy_helper.from_array(np.full((256, 256), 1 / 256, dtype=np.float32), "w")
        nodes = [
            helper.make_node("MatMul", [f"h{i}" if i else "x", "w"], [f"h{i + 1}"])
            for i in range(depth)
        ]
        g = helper.make_graph(
            nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
            [helper.make_tensor_value_info(f"h{depth}", TensorProto.FLOAT, [None, 256])], [w],
        )  # fmt: skip
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    sessions = {
        "light": session(chain(1, tmp_path / "light.onnx"), threads=1),
        "heavy": session(chain(16, tmp_path / "heavy.onnx"), threads=1),
    }
    got = measure_interleaved(
        sessions, {"x": np.ones((1, 256), np.float32)}, rounds=6, per_round=4, max_seconds=30
    )
    assert got["light"].runs == got["heavy"].runs == 24
    assert got["heavy"].p50_ms > got["light"].p50_ms


def test_cost_ranking_takes_sizes_a_few_bytes_apart_as_a_tie_won_by_fidelity() -> None:
    """Off target, the cost model ranks by FP32 compute nodes, then size: two FP16 builds 66
    bytes apart (open-nsfw on gpu-cuda) were decided by those bytes. Sizes within 1 % of the
    smallest are a tie now, won by the most faithful; fewer FP32 nodes still win outright."""

    def cand(name: str, fp32: int, size: int, agreement: float) -> CandidateResult:
        c = _cand(name, 1.0, _metrics(agreement))
        c.cost, c.size_bytes = {"fp32_compute_nodes": fp32}, size
        return c

    results = [
        cand("smallest", 0, 1_000_000, 0.985),
        cand("66-bytes-more", 0, 1_000_066, 0.995),
        cand("2-percent-more", 0, 1_020_000, 1.0),
        cand("fewer-quantized", 3, 900_000, 1.0),
    ]
    best = choose(results, rank="cost")
    assert best is not None and best.candidate == "66-bytes-more"
    assert "most faithful of those within 1% of the smallest" in best.reason
    alone = choose([cand("a", 0, 1_000_000, 0.99), cand("b", 2, 10, 1.0)], rank="cost")
    assert alone is not None and alone.candidate == "a" and alone.reason.endswith("target)")
