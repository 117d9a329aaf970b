"""Validation of a candidate against the source model (pure metrics) and running sessions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.packager.stats import wilson

Outputs = dict[str, np.ndarray]

#: An input is "hard" (low confidence) when the source model's top-1 probability is below this
#: (softmax of the scores when they are not probabilities already).
HARD_BELOW = 0.7

#: How a candidate's answer is compared with the source's, per output kind:
#: ``classes`` top-1 of ``[N, C>1]`` scores; ``binary`` the decision ``score > threshold`` of an
#: ``[N, 1]`` (or ``[N]``) probability (e.g. a voice-activity detector); ``map`` the binarised
#: ``[N, ..., H, W]`` probability map (e.g. a text detector), a sample agreeing when the IoU of
#: its foregrounds is at least :data:`MAP_IOU`; ``sequence`` the argmax at every step of
#: ``[N, T, C]``; ``ctc`` the CTC-collapsed argmax string (repeats merged, blank 0 dropped);
#: ``values`` element-wise closeness (1 % of the source's largest magnitude).
OUTPUT_KINDS = ("classes", "binary", "map", "sequence", "ctc", "values")
DEFAULT_THRESHOLD = 0.5
MAP_IOU = 0.9


class JudgingError(ValueError):
    """A declared output kind does not fit the model's outputs; the message says why."""


@dataclass(frozen=True)
class Judging:
    """What the validation judges: an output kind (None: inferred from the outputs' shapes), the
    output to judge (None: the first that fits) and the decision threshold (binary and map)."""

    kind: str | None = None
    output: str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in OUTPUT_KINDS:
            raise JudgingError(f"output kind {self.kind!r} is not one of {list(OUTPUT_KINDS)}")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise JudgingError("the output threshold must be a finite number")


@dataclass(frozen=True)
class Slice:
    """Top-1 agreement on one part of the validation data, with its 95 % Wilson interval."""

    samples: int
    agreeing: int

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.samples if self.samples else None

    def to_dict(self) -> dict[str, Any]:
        lo, hi = wilson(self.agreeing, self.samples)
        return {
            "samples": self.samples,
            "agreeing": self.agreeing,
            "agreement": self.agreement,
            "agreement_ci95": [round(lo, 6), round(hi, 6)] if self.samples else None,
        }


@dataclass(frozen=True)
class Metrics:
    """How a candidate's outputs compare with the source model's on the validation data.

    Beyond top-1: ``cosine_mean``/``cosine_min`` compare each sample's output vector with the
    source's, and ``confident``/``hard`` split top-1 agreement by the source model's own
    confidence (:data:`HARD_BELOW`). ``lost``/``gained`` are the discordant pairs of the
    accuracy comparison (source right and candidate wrong, and the reverse), for McNemar's test.
    """

    agreement: float  # top-1 (classifiers) or element-wise closeness (other models)
    accuracy: float | None  # None without labels
    source_accuracy: float | None
    max_abs_error: float  # over every float output
    samples: int
    score_output: str | None  # the output top-1 was taken from
    agreeing: int | None = None
    lost: int | None = None
    gained: int | None = None
    cosine_mean: float | None = None
    cosine_min: float | None = None
    confident: Slice | None = None
    hard: Slice | None = None
    source_scale: float | None = None  # max |source output|, to judge max_abs_error
    output_kind: str = "classes"  # how agreement was judged (:data:`OUTPUT_KINDS`)
    output_kind_how: str = ""  # "declared" or what it was inferred from
    threshold: float | None = None  # binary / map decisions
    iou_mean: float | None = None  # map: mean IoU of the binarised foregrounds
    pixel_agreement: float | None = None  # map: share of pixels with the same decision

    @property
    def agreeing_count(self) -> int:
        return self.agreeing if self.agreeing is not None else round(self.agreement * self.samples)

    @property
    def agreement_ci95(self) -> tuple[float, float]:
        return wilson(self.agreeing_count, self.samples)

    @property
    def equivalent(self) -> bool:
        """Numerically the source model (relative max-abs error under 1e-4): nothing to judge."""
        scale = self.source_scale or 1.0
        return self.agreement == 1.0 and self.max_abs_error <= 1e-4 * scale

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["confident"] = self.confident.to_dict() if self.confident else None
        d["hard"] = self.hard.to_dict() if self.hard else None
        lo, hi = self.agreement_ci95
        d["agreement_ci95"] = [round(lo, 6), round(hi, 6)]
        return d


def score_output(outputs: Mapping[str, np.ndarray]) -> str | None:
    """The output that carries class scores: the first float [N, C>1] tensor, if any."""
    for name, a in outputs.items():
        if np.issubdtype(a.dtype, np.floating) and a.ndim == 2 and a.shape[1] > 1:
            return name
    return None


def _probabilities(scores: np.ndarray) -> np.ndarray:
    x = scores.astype(np.float64)
    sums = x.sum(axis=1)
    if np.all(x >= 0) and np.allclose(sums, 1.0, atol=1e-3):
        return x
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def _cosines(source: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], n: int) -> Any:
    """Per-sample cosine similarity of all float outputs, flattened and concatenated."""
    keys = [k for k, v in source.items() if np.issubdtype(v.dtype, np.floating)]
    if not keys or n == 0:
        return None
    ref = np.concatenate([source[k].reshape(n, -1).astype(np.float64) for k in keys], axis=1)
    got = np.concatenate([candidate[k].reshape(n, -1).astype(np.float64) for k in keys], axis=1)
    num = np.sum(ref * got, axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    same = np.all(ref == got, axis=1)
    return np.where(same, 1.0, num / np.where(den == 0, 1.0, den))


def _is_prob(a: np.ndarray) -> bool:
    return bool(a.size) and float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def infer_kind(source: Mapping[str, np.ndarray]) -> tuple[str, str, str]:
    """(kind, output, why) for outputs of undeclared kind, from the first float output's shape.

    ``[N, C>1]`` anywhere: classes (that output); else on the first float output: ``[N]``/``[N, 1]``
    in [0, 1]: binary; 3-D ``[N, T, C>1]`` that is not a probability map: sequence; 4-D (or 3-D
    in [0, 1] whose last axis does not sum to 1) in [0, 1]: map; anything else: values.
    """
    name = score_output(source)
    if name is not None:
        return "classes", name, f"inferred: {name} is [N, {source[name].shape[1]}] scores"
    floats = [k for k, v in source.items() if np.issubdtype(v.dtype, np.floating)]
    key = floats[0] if floats else next(iter(source))
    a = source[key]
    shape = "[" + ", ".join(["N", *map(str, a.shape[1:])]) + "]"
    why = f"inferred: {key} is {shape}"
    if not floats:
        return "values", key, why
    if a.ndim == 1 or (a.ndim == 2 and a.shape[1] == 1):
        return ("binary" if _is_prob(a) else "values"), key, why
    if a.ndim == 3 and a.shape[2] > 1:
        softmaxed = _is_prob(a) and np.allclose(a.sum(axis=2), 1.0, atol=1e-3)
        if softmaxed or not _is_prob(a):
            return "sequence", key, why
        return "map", key, why
    if a.ndim == 4 and _is_prob(a):
        return "map", key, why
    return "values", key, why


def _fits(kind: str, a: np.ndarray) -> str | None:
    """Why an output of shape ``a.shape`` cannot be judged as ``kind`` (None when it can)."""
    if kind == "classes" and not (a.ndim == 2 and a.shape[1] > 1):
        return "classes needs [N, C>1] scores"
    if kind == "binary" and not (a.ndim == 1 or (a.ndim >= 2 and int(np.prod(a.shape[1:])) == 1)):
        return "binary needs one score per sample ([N] or [N, 1])"
    if kind in ("sequence", "ctc") and not (a.ndim == 3 and a.shape[2] > 1):
        return f"{kind} needs [N, T, C>1] scores"
    if kind == "map" and a.ndim < 3:
        return "map needs [N, ..., H, W]"
    return None


def _resolve(source: Mapping[str, np.ndarray], judging: Judging) -> tuple[str, str, str]:
    if judging.kind is None and judging.output is None:
        return infer_kind(source)
    if judging.output is not None and judging.output not in source:
        raise JudgingError(f"output {judging.output!r} is not a model output ({sorted(source)})")
    if judging.kind is None:
        assert judging.output is not None
        kind, _, why = infer_kind({judging.output: source[judging.output]})
        return kind, judging.output, why
    kind = judging.kind
    names = [judging.output] if judging.output else list(source)
    for name in names:
        if _fits(kind, source[name]) is None:
            return kind, name, "declared"
    raise JudgingError(
        f"declared output kind {kind!r} fits no output: {_fits(kind, source[names[0]])}"
    )


def _ctc(y: np.ndarray) -> list[tuple[int, ...]]:
    out = []
    for seq in y.argmax(axis=-1):
        merged = [int(t) for i, t in enumerate(seq) if t != 0 and (i == 0 or t != seq[i - 1])]
        out.append(tuple(merged))
    return out


def _step_probabilities(y: np.ndarray) -> np.ndarray:
    n, t, c = y.shape
    return _probabilities(y.reshape(n * t, c)).reshape(n, t, c)


def compare(
    source: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    judging: Judging | None = None,
) -> Metrics:
    """Agreement (per :data:`OUTPUT_KINDS`), accuracy (with labels), cosine and max abs error.

    ``judging`` declares the output kind (and output, threshold); without it the kind is
    inferred from the outputs' shapes (:func:`infer_kind`). Metrics say which and how.
    """
    missing = sorted(set(source) - set(candidate))
    if missing:
        raise ValueError(f"candidate lacks output(s) {missing}")
    judging = judging or Judging()
    kind, name, how = _resolve(source, judging)
    n = len(next(iter(source.values())))
    max_err = 0.0
    scale = 0.0
    for key, ref in source.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = np.abs(candidate[key].astype(np.float64) - ref.astype(np.float64))
            max_err = max(max_err, float(diff.max()) if diff.size else 0.0)
            scale = max(scale, float(np.abs(ref).max()) if ref.size else 0.0)
    acc = src_acc = None
    lost = gained = None
    low: np.ndarray | None = None
    threshold = iou_mean = pixel_agreement = None
    ref_all, got_all = source[name], candidate[name]
    decided: tuple[np.ndarray, np.ndarray] | None = None  # per-sample answers, for labels
    if kind == "classes":
        top_src, top_cand = ref_all.argmax(axis=1), got_all.argmax(axis=1)
        same = top_src == top_cand
        low = _probabilities(ref_all).max(axis=1) < HARD_BELOW
        decided = (top_src, top_cand)
    elif kind == "binary":
        threshold = judging.threshold if judging.threshold is not None else DEFAULT_THRESHOLD
        p, q = ref_all.reshape(n).astype(np.float64), got_all.reshape(n).astype(np.float64)
        same = (p > threshold) == (q > threshold)
        low = np.abs(p - threshold) < HARD_BELOW - 0.5
        decided = ((p > threshold).astype(np.int64), (q > threshold).astype(np.int64))
    elif kind == "map":
        threshold = judging.threshold if judging.threshold is not None else DEFAULT_THRESHOLD
        a, b = ref_all.reshape(n, -1) > threshold, got_all.reshape(n, -1) > threshold
        union = np.sum(a | b, axis=1)
        iou = np.where(union == 0, 1.0, np.sum(a & b, axis=1) / np.maximum(union, 1))
        same = iou >= MAP_IOU
        iou_mean, pixel_agreement = float(np.mean(iou)), float(np.mean(a == b))
    elif kind == "sequence":
        same = np.all(ref_all.argmax(axis=2) == got_all.argmax(axis=2), axis=1)
        low = _step_probabilities(ref_all).max(axis=2).min(axis=1) < HARD_BELOW
    elif kind == "ctc":
        same = np.array([x == y for x, y in zip(_ctc(ref_all), _ctc(got_all), strict=True)])
        low = _step_probabilities(ref_all).max(axis=2).min(axis=1) < HARD_BELOW
    else:
        ref, got = ref_all.reshape(n, -1), got_all.reshape(n, -1)
        if np.issubdtype(ref.dtype, np.floating):
            tol = 0.01 * (float(np.abs(ref).max()) or 1.0)
            same = np.all(np.abs(got - ref) <= tol, axis=1)
        else:
            same = np.all(got == ref, axis=1)
    same = np.asarray(same, dtype=bool)
    agreement, agreeing = float(np.mean(same)) if n else 0.0, int(same.sum())
    confident = hard = None
    if low is not None:
        confident = Slice(int((~low).sum()), int(same[~low].sum()))
        hard = Slice(int(low.sum()), int(same[low].sum()))
    if labels is not None and decided is not None:
        top_src, top_cand = decided
        y = np.asarray(labels).reshape(-1)
        acc, src_acc = float(np.mean(top_cand == y)), float(np.mean(top_src == y))
        lost = int(np.sum((top_src == y) & (top_cand != y)))
        gained = int(np.sum((top_src != y) & (top_cand == y)))
    cos = _cosines(source, candidate, n)
    return Metrics(
        agreement,
        acc,
        src_acc,
        max_err,
        n,
        name if kind == "classes" else None,
        agreeing=agreeing,
        lost=lost,
        gained=gained,
        cosine_mean=float(np.mean(cos)) if cos is not None else None,
        cosine_min=float(np.min(cos)) if cos is not None else None,
        confident=confident,
        hard=hard,
        source_scale=scale,
        output_kind=kind,
        output_kind_how=how,
        threshold=threshold,
        iou_mean=iou_mean,
        pixel_agreement=pixel_agreement,
    )


def session(
    model: Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 1
) -> Any:
    """An ONNX Runtime session with a fixed thread count (stable latency on a shared host)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(model), sess_options=opts, providers=list(providers))


def fixed_batch(sess: Any) -> int | None:
    """The batch size the model fixes (e.g. 1), or None when axis 0 is dynamic."""
    for i in sess.get_inputs():
        if i.shape and isinstance(i.shape[0], int):
            return int(i.shape[0])
    return None


def run_all(sess: Any, inputs: Mapping[str, np.ndarray], batch: int = 256) -> Outputs:
    """Run every sample (axis 0) through ``sess`` in batches; outputs by name."""
    names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    step = fixed_batch(sess) or batch
    n = len(inputs[names[0]])
    parts: dict[str, list[np.ndarray]] = {o: [] for o in out_names}
    for start in range(0, n, step):
        feed = {k: np.ascontiguousarray(inputs[k][start : start + step]) for k in names}
        for o, value in zip(out_names, sess.run(out_names, feed), strict=True):
            parts[o].append(np.asarray(value))
    return {o: np.concatenate(v, axis=0) for o, v in parts.items()}


_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}


def io_spec(sess: Any) -> dict[str, list[dict[str, Any]]]:
    """The manifest's ``io`` section from a session."""

    def spec(args: Any) -> list[dict[str, Any]]:
        return [
            {
                "name": a.name,
                "dtype": _DTYPES.get(a.type, a.type),
                "shape": [d if isinstance(d, int) else (d or None) for d in a.shape],
            }
            for a in args
        ]

    return {"inputs": spec(sess.get_inputs()), "outputs": spec(sess.get_outputs())}
