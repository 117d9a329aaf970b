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


def compare(
    source: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
) -> Metrics:
    """Top-1 agreement, accuracy (with labels), cosine and max abs error of ``candidate``."""
    missing = sorted(set(source) - set(candidate))
    if missing:
        raise ValueError(f"candidate lacks output(s) {missing}")
    name = score_output(source)
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
    confident = hard = None
    if name is not None:
        top_src = source[name].argmax(axis=1)
        top_cand = candidate[name].argmax(axis=1)
        same = top_src == top_cand
        agreement = float(np.mean(same))
        agreeing = int(same.sum())
        low = _probabilities(source[name]).max(axis=1) < HARD_BELOW
        confident = Slice(int((~low).sum()), int(same[~low].sum()))
        hard = Slice(int(low.sum()), int(same[low].sum()))
        if labels is not None:
            y = np.asarray(labels).reshape(-1)
            acc, src_acc = float(np.mean(top_cand == y)), float(np.mean(top_src == y))
            lost = int(np.sum((top_src == y) & (top_cand != y)))
            gained = int(np.sum((top_src != y) & (top_cand == y)))
    else:
        key = next(iter(source))
        ref, got = source[key].reshape(n, -1), candidate[key].reshape(n, -1)
        if np.issubdtype(ref.dtype, np.floating):
            tol = 0.01 * (float(np.abs(ref).max()) or 1.0)
            close = np.all(np.abs(got - ref) <= tol, axis=1)
        else:
            close = np.all(got == ref, axis=1)
        agreement = float(np.mean(close))
        agreeing = int(close.sum())
    cos = _cosines(source, candidate, n)
    return Metrics(
        agreement,
        acc,
        src_acc,
        max_err,
        n,
        name,
        agreeing=agreeing,
        lost=lost,
        gained=gained,
        cosine_mean=float(np.mean(cos)) if cos is not None else None,
        cosine_min=float(np.min(cos)) if cos is not None else None,
        confident=confident,
        hard=hard,
        source_scale=scale,
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
