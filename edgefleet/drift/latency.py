"""Latency histograms that merge by addition across devices and windows.

Bucket upper bounds (ms) grow geometrically by ~25 % from 0.05 ms to ~60 s, plus an overflow
bucket, so a quantile read back from merged counts is within one bucket's width (about 12 % with
geometric interpolation) of the exact value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

_RATIO = 1.25
BOUNDS_MS: tuple[float, ...] = tuple(round(0.05 * _RATIO**i, 6) for i in range(64))
NBUCKETS = len(BOUNDS_MS) + 1  # last: above the largest bound


def bucket_of(latency_ms: float) -> int:
    """Index of the bucket holding ``latency_ms`` (``bounds[i-1] < x <= bounds[i]``)."""
    return bisect.bisect_left(BOUNDS_MS, latency_ms)


def histogram(latencies_ms: Sequence[float] | np.ndarray) -> list[int]:
    idx = np.searchsorted(np.asarray(BOUNDS_MS), np.asarray(latencies_ms, dtype=float), side="left")
    return [int(c) for c in np.bincount(idx, minlength=NBUCKETS)]


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) in ms from bucket counts; None when there are none."""
    total = sum(counts)
    if total <= 0:
        return None
    if len(counts) != NBUCKETS:
        raise ValueError(f"latency histogram has {len(counts)} buckets, expected {NBUCKETS}")
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = BOUNDS_MS[i - 1] if i > 0 else BOUNDS_MS[0] / _RATIO
            hi = BOUNDS_MS[i] if i < len(BOUNDS_MS) else BOUNDS_MS[-1] * _RATIO
            frac = min(max((rank - seen) / c, 0.0), 1.0)
            return float(math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo))))
        seen += c
    return float(BOUNDS_MS[-1])


def merge(a: Sequence[int], b: Sequence[int]) -> list[int]:
    if len(a) != len(b):
        raise ValueError(f"latency histograms differ in buckets ({len(a)} vs {len(b)})")
    return [int(x) + int(y) for x, y in zip(a, b, strict=True)]
