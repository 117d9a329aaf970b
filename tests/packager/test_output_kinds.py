"""Agreement judged in each output's own sense: decisions, binarised maps, sequences."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgefleet.keys import KeyPair
from edgefleet.packager import zoo
from edgefleet.packager.evaluate import Judging, JudgingError, compare, infer_kind, run_all, session
from edgefleet.packager.npzio import save_npz
from edgefleet.packager.profiles import load_profile_file
from edgefleet.wire.package import read_manifest
from tests.support.services import require


def test_a_binary_score_is_judged_by_its_decision_and_max_abs_error() -> None:
    p = np.array([[0.1], [0.45], [0.52], [0.9], [0.28], [0.75]], np.float32)
    q = p + np.array([[0.05], [0.07], [0.0], [-0.02], [0.1], [0.0]], np.float32)  # 0.45 -> 0.52
    m = compare({"speech": p}, {"speech": q})
    assert m.output_kind == "binary" and m.output_kind_how.startswith("inferred")
    assert m.threshold == 0.5 and m.agreeing == 5 and m.samples == 6
    assert m.max_abs_error == pytest.approx(0.1, abs=1e-6)
    assert m.hard is not None and m.hard.samples == 2 and m.hard.agreeing == 1  # near 0.5
    strict = compare({"speech": p}, {"speech": q}, judging=Judging(threshold=0.35))
    assert strict.agreeing == 5 and strict.threshold == 0.35  # 0.28 -> 0.38 crosses 0.35
    labelled = compare({"speech": p}, {"speech": q}, np.array([0, 0, 1, 1, 0, 1]))
    assert labelled.source_accuracy == 1.0 and labelled.accuracy == pytest.approx(5 / 6)


def test_a_map_is_judged_by_the_iou_of_its_binarised_foreground() -> None:
    ref = np.zeros((3, 1, 16, 16), np.float32)
    ref[:, :, 4:12, 4:12] = 0.9
    got = ref.copy()
    got[0] += 0.05  # small change: same decision everywhere
    got[1, :, 4:12, 10:12] = 0.1  # a quarter of the text region lost: IoU 0.75
    m = compare({"maps": ref}, {"maps": got}, judging=Judging(threshold=0.3))
    assert m.output_kind == "map" and m.agreeing == 2
    assert m.iou_mean == pytest.approx((1 + 0.75 + 1) / 3)
    assert m.pixel_agreement == pytest.approx(1 - 16 / (3 * 256))
    assert infer_kind({"maps": ref})[0] == "map"


def test_sequences_by_argmax_steps_or_by_their_ctc_string() -> None:
    def onehot(seq: list[int]) -> np.ndarray:
        return np.eye(5, dtype=np.float32)[seq]

    ref = np.stack([onehot([0, 3, 3, 0, 2]), onehot([1, 1, 0, 4, 4])])
    got = np.stack([onehot([0, 3, 0, 0, 2]), onehot([1, 0, 0, 4, 0])])  # same strings
    seq = compare({"probs": ref}, {"probs": got})
    assert seq.output_kind == "sequence" and seq.agreeing == 0
    ctc = compare({"probs": ref}, {"probs": got}, judging=Judging("ctc"))
    assert ctc.output_kind == "ctc" and ctc.output_kind_how == "declared" and ctc.agreeing == 2
    other = got.copy()
    other[1, 3] = onehot([2])[0]  # "1 4" -> "1 2"
    assert compare({"probs": ref}, {"probs": other}, judging=Judging("ctc")).agreeing == 1


def test_a_declared_kind_must_fit_and_be_known() -> None:
    with pytest.raises(JudgingError, match="binary needs one score"):
        compare({"y": np.zeros((4, 3))}, {"y": np.zeros((4, 3))}, judging=Judging("binary"))
    with pytest.raises(JudgingError, match="not one of"):
        Judging("probability")
    scores = np.eye(4, 3)
    assert compare({"y": scores}, {"y": scores}).output_kind == "classes"


def _rec_and_det(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The real model's outputs on 4 real crops, and on the same crops with a little noise."""
    reason = zoo.unavailable(name)
    require(reason is None, reason or "")
    source = zoo.locate(name)
    x = zoo._pool(name, 4, seed=0)
    sess = session(source)
    noisy = {k: v + np.random.default_rng(0).normal(0, 0.02, v.shape).astype(v.dtype) for k, v in x.items()}  # fmt: skip
    return run_all(sess, x), run_all(sess, noisy)


def test_pp_ocr_detection_maps_and_recognition_strings() -> None:
    det, det_noisy = _rec_and_det("ppocr-det")
    kind, _, how = infer_kind(det)
    assert kind == "map" and "[N, 1, 256, 256]" in how
    m = compare(det, det_noisy, judging=Judging(threshold=0.3))  # DB's binarisation threshold
    assert m.iou_mean is not None and 0.5 < m.iou_mean <= 1.0 and m.samples == 4
    rec, rec_noisy = _rec_and_det("ppocr-rec")
    assert infer_kind(rec)[0] == "sequence"
    ctc = compare(rec, rec_noisy, judging=Judging("ctc"))
    steps = compare(rec, rec_noisy)
    assert (
        ctc.agreeing_count >= steps.agreeing_count
    )  # a string can survive a shifted step, never the reverse
    assert compare(rec, rec, judging=Judging("ctc")).agreement == 1.0


CPU = """
id = "cpu-tiny"
cpu_fallback = true
[[execution_providers]]
name = "CPUExecutionProvider"
[[quantization.candidates]]
id = "static"
method = "static"
[accuracy_gate]
min_agreement = 0.9
max_accuracy_drop = 0.5
[device_gates]
max_p95_ms = 10
max_memory_mb = 100
sample_atol = 0.1
sample_rtol = 0
min_sample_agreement = 0.5
"""


def test_a_detector_s_binary_output_is_packaged_and_the_kind_recorded(
    signing_key: KeyPair, tmp_path: Path
) -> None:
    """A small real logistic detector (trained by least squares on separable data), declared
    binary in its validation file: the report and the manifest say how agreement was judged."""
    from edgefleet.packager.pipeline import package_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    w_true = rng.normal(size=(8, 1))
    y = (x @ w_true > 0).astype(np.float64)
    w, *_ = np.linalg.lstsq(np.c_[x, np.ones(len(x))], 8 * (y - 0.5), rcond=None)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["z0"]),
            helper.make_node("Add", ["z0", "b"], ["z"]),
            helper.make_node("Sigmoid", ["z"], ["speech"]),
        ],
        "detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["n", 1])],
        [
            numpy_helper.from_array(w[:8].astype(np.float32), "w"),
            numpy_helper.from_array(w[8:].astype(np.float32), "b"),
        ],
    )
    model = tmp_path / "detector.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(model))
    save_npz(tmp_path / "cal.npz", {"x": x[:100]})
    save_npz(tmp_path / "val.npz", {"x": x[100:], "output_kind": np.array("binary")})
    (tmp_path / "cpu-tiny.toml").write_text(CPU)
    report = package_model(
        model, name="vad", version="1.0.0", profiles=[load_profile_file(tmp_path / "cpu-tiny.toml")],
        calibration=tmp_path / "cal.npz", validation=tmp_path / "val.npz",
        key=signing_key.private_path, out_dir=tmp_path / "out", bench_runs=5, bench_seconds=0.1,
    )  # fmt: skip
    (result,) = report.profiles
    assert report.source["output_kind"] == "binary"
    assert result.ok and result.metrics is not None, result.failure
    assert result.metrics.output_kind == "binary" and result.metrics.output_kind_how == "declared"
    assert result.package is not None
    validation = read_manifest(result.package)["validation"]
    assert validation["output_kind"] == "binary" and validation["fidelity"]["threshold"] == 0.5
