"""Validation of a candidate against the source model (pure metrics) and running sessions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

Outputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Metrics:
    """How a candidate's outputs compare with the source model's on the validation data."""

    agreement: float  # top-1 (classifiers) or element-wise closeness (other models)
    accuracy: float | None  # None without labels
    source_accuracy: float | None
    max_abs_error: float  # over every float output
    samples: int
    score_output: str | None  # the output top-1 was taken from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_output(outputs: Mapping[str, np.ndarray]) -> str | None:
    """The output that carries class scores: the first float [N, C>1] tensor, if any."""
    for name, a in outputs.items():
        if np.issubdtype(a.dtype, np.floating) and a.ndim == 2 and a.shape[1] > 1:
            return name
    return None


def compare(
    source: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
) -> Metrics:
    """Top-1 agreement, accuracy (with labels) and max abs error of ``candidate`` vs ``source``."""
    missing = sorted(set(source) - set(candidate))
    if missing:
        raise ValueError(f"candidate lacks output(s) {missing}")
    name = score_output(source)
    n = len(next(iter(source.values())))
    max_err = 0.0
    for key, ref in source.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = np.abs(candidate[key].astype(np.float64) - ref.astype(np.float64))
            max_err = max(max_err, float(diff.max()) if diff.size else 0.0)
    acc = src_acc = None
    if name is not None:
        top_src = source[name].argmax(axis=1)
        top_cand = candidate[name].argmax(axis=1)
        agreement = float(np.mean(top_src == top_cand))
        if labels is not None:
            y = np.asarray(labels).reshape(-1)
            acc, src_acc = float(np.mean(top_cand == y)), float(np.mean(top_src == y))
    else:
        key = next(iter(source))
        ref, got = source[key].reshape(n, -1), candidate[key].reshape(n, -1)
        if np.issubdtype(ref.dtype, np.floating):
            tol = 0.01 * (float(np.abs(ref).max()) or 1.0)
            agreement = float(np.mean(np.all(np.abs(got - ref) <= tol, axis=1)))
        else:
            agreement = float(np.mean(np.all(got == ref, axis=1)))
    return Metrics(agreement, acc, src_acc, max_err, n, name)


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
