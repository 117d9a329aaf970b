"""A small convolutional network trained in numpy (im2col + Adam) and exported with onnx.helper.

Architecture (input ``image`` [N, 1, 8, 8]):
Conv 3x3 1->16 pad 1, Relu, Conv 3x3 16->32 stride 2 pad 1, Relu, Flatten, Gemm 512->10, Softmax.
No torch: training takes a few seconds on scikit-learn's digits images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

F32 = NDArray[np.float32]


@dataclass
class ConvLayer:
    """Static geometry of one 2-D convolution (square kernel)."""

    c_in: int
    c_out: int
    k: int
    stride: int
    pad: int
    h_in: int
    w_in: int
    rows: NDArray[np.intp] = field(init=False)
    cols: NDArray[np.intp] = field(init=False)
    chans: NDArray[np.intp] = field(init=False)

    def __post_init__(self) -> None:
        self.rows, self.cols, self.chans = _im2col_indices(
            self.c_in, self.h_in, self.w_in, self.k, self.stride, self.pad
        )

    @property
    def h_out(self) -> int:
        return (self.h_in + 2 * self.pad - self.k) // self.stride + 1

    @property
    def w_out(self) -> int:
        return (self.w_in + 2 * self.pad - self.k) // self.stride + 1


def _im2col_indices(
    c: int, h: int, w: int, k: int, stride: int, pad: int
) -> tuple[NDArray[np.intp], NDArray[np.intp], NDArray[np.intp]]:
    h_out = (h + 2 * pad - k) // stride + 1
    w_out = (w + 2 * pad - k) // stride + 1
    i0 = np.tile(np.repeat(np.arange(k), k), c)
    i1 = stride * np.repeat(np.arange(h_out), w_out)
    j0 = np.tile(np.arange(k), k * c)
    j1 = stride * np.tile(np.arange(w_out), h_out)
    rows = i0.reshape(-1, 1) + i1.reshape(1, -1)
    cols = j0.reshape(-1, 1) + j1.reshape(1, -1)
    chans = np.repeat(np.arange(c), k * k).reshape(-1, 1)
    return rows, cols, chans


def im2col(x: F32, layer: ConvLayer) -> F32:
    """[N, C, H, W] -> [N, C*k*k, H_out*W_out]."""
    p = layer.pad
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    return xp[:, layer.chans, layer.rows, layer.cols]


def col2im(cols: F32, layer: ConvLayer, n: int) -> F32:
    """Adjoint of :func:`im2col` (sums overlapping patches)."""
    p = layer.pad
    xp = np.zeros((n, layer.c_in, layer.h_in + 2 * p, layer.w_in + 2 * p), dtype=np.float32)
    np.add.at(xp, (slice(None), layer.chans, layer.rows, layer.cols), cols)  # type: ignore[arg-type]
    return xp[:, :, p : p + layer.h_in, p : p + layer.w_in] if p else xp


@dataclass
class DigitsCNN:
    """Weights of the trained network (ONNX layout)."""

    w1: F32
    b1: F32
    w2: F32
    b2: F32
    w3: F32  # [10, 512] (Gemm with transB=1)
    b3: F32


def _layers() -> tuple[ConvLayer, ConvLayer]:
    return (
        ConvLayer(c_in=1, c_out=16, k=3, stride=1, pad=1, h_in=8, w_in=8),
        ConvLayer(c_in=16, c_out=32, k=3, stride=2, pad=1, h_in=8, w_in=8),
    )


def forward(net: DigitsCNN, x: F32) -> F32:
    """Softmax probabilities, [N, 10]; the same computation as the exported graph."""
    l1, l2 = _layers()
    n = x.shape[0]
    a1 = np.maximum(
        np.einsum("ok,nkp->nop", net.w1.reshape(16, -1), im2col(x, l1)) + net.b1[None, :, None],
        0.0,
    ).reshape(n, 16, 8, 8)
    z2 = np.einsum("ok,nkp->nop", net.w2.reshape(32, -1), im2col(a1, l2)) + net.b2[None, :, None]
    a2 = np.maximum(z2, 0.0).reshape(n, -1)
    logits = a2 @ net.w3.T + net.b3
    return _softmax(logits)


def _softmax(z: F32) -> F32:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def train(
    x: F32,
    y: NDArray[np.int64],
    *,
    epochs: int = 12,
    batch: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> DigitsCNN:
    """Train with minibatch Adam on cross-entropy; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    l1, l2 = _layers()

    def he(shape: tuple[int, ...], fan_in: int) -> F32:
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    params: dict[str, F32] = {
        "w1": he((16, 1, 3, 3), 9),
        "b1": np.zeros(16, np.float32),
        "w2": he((32, 16, 3, 3), 144),
        "b2": np.zeros(32, np.float32),
        "w3": he((10, 512), 512),
        "b3": np.zeros(10, np.float32),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1_, b2_, eps, step = 0.9, 0.999, 1e-8, 0
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch):
            idx = order[start : start + batch]
            xb, yb, n = x[idx], y[idx], len(idx)
            c1 = im2col(xb, l1)
            z1 = np.einsum("ok,nkp->nop", params["w1"].reshape(16, -1), c1)
            z1 += params["b1"][None, :, None]
            a1 = np.maximum(z1, 0.0).reshape(n, 16, 8, 8)
            c2 = im2col(a1, l2)
            z2 = np.einsum("ok,nkp->nop", params["w2"].reshape(32, -1), c2)
            z2 += params["b2"][None, :, None]
            a2 = np.maximum(z2, 0.0).reshape(n, -1)
            probs = _softmax(a2 @ params["w3"].T + params["b3"])
            d3 = probs.copy()
            d3[np.arange(n), yb] -= 1.0
            d3 /= n
            grads = {"w3": d3.T @ a2, "b3": d3.sum(0)}
            da2 = (d3 @ params["w3"]).reshape(z2.shape) * (z2 > 0)
            grads["w2"] = np.einsum("nop,nkp->ok", da2, c2).reshape(params["w2"].shape)
            grads["b2"] = da2.sum((0, 2))
            dc2 = np.einsum("ok,nop->nkp", params["w2"].reshape(32, -1), da2)
            da1 = col2im(dc2.astype(np.float32), l2, n).reshape(z1.shape) * (z1 > 0)
            grads["w1"] = np.einsum("nop,nkp->ok", da1, c1).reshape(params["w1"].shape)
            grads["b1"] = da1.sum((0, 2))
            step += 1
            for k, g in grads.items():
                m[k] = b1_ * m[k] + (1 - b1_) * g
                v[k] = b2_ * v[k] + (1 - b2_) * g * g
                mh = m[k] / (1 - b1_**step)
                vh = v[k] / (1 - b2_**step)
                params[k] = (params[k] - lr * mh / (np.sqrt(vh) + eps)).astype(np.float32)
    return DigitsCNN(**params)


def to_onnx(net: DigitsCNN, opset: int = 17) -> bytes:
    """Serialize the network as an ONNX model (dynamic batch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.ascontiguousarray(arr, dtype=np.float32), name)
        for name, arr in (
            ("conv1.weight", net.w1),
            ("conv1.bias", net.b1),
            ("conv2.weight", net.w2),
            ("conv2.bias", net.b2),
            ("fc.weight", net.w3),
            ("fc.bias", net.b3),
        )
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["image", "conv1.weight", "conv1.bias"],
            ["conv1"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node(
            "Conv",
            ["relu1", "conv2.weight", "conv2.bias"],
            ["conv2"],
            name="conv2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[2, 2],
        ),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("Flatten", ["relu2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], name="softmax", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgefleet.packager"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
