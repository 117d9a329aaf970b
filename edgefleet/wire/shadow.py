"""Shadow evaluation on the wire: the desired state's ``shadow`` entry (controller -> device)
and the figures of one shadow window (device -> controller, a status report of kind
``shadow``).

A desired model entry with ``shadow`` asks the device to install and verify the version as
usual, then to load it next to the serving version instead of activating it, and to mirror a
sample of live requests to it. The entry::

    "shadow": {"requests": N, "sample": 0.1, "window_s": 10, "rtol": 1e-3, "atol": 1e-4}

The device reports, per window, only figures (:class:`ShadowFigures`), never inputs or
outputs: counts, agreement and the per-sample model time of both versions. ``total`` counts
are since the shadow started (so a report stands alone: the controller keeps the newest);
``window`` counts are the last window's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.wire.message import JsonObject, JsonValue

#: Largest count a report may carry (docs/limits.md): far above any real window.
MAX_COUNT = 2**40
#: Largest latency figure a report may carry, in ms.
MAX_MS = 3.6e6
MAX_REQUESTS = 1_000_000  # the most compared requests a spec may ask for per device
MIN_WINDOW_S, MAX_WINDOW_S = 0.1, 3600.0
COMPARE_RULES = ("auto", "top1", "tolerance", "exact")


class ShadowError(ValueError):
    """A shadow entry or shadow figures that do not hold; the message names the field."""


@dataclass(frozen=True)
class ShadowSpec:
    requests: int = 200  # compared requests wanted from each device
    sample: float = 1.0  # fraction of live requests mirrored, (0, 1]
    window_s: float = 10.0  # how often the device reports
    rtol: float = 1e-3  # tolerance for score outputs (numpy.isclose)
    atol: float = 1e-4
    compare: str = "auto"  # auto | top1 | tolerance | exact (agent.shadow.outputs_agree)

    def to_dict(self) -> JsonObject:
        return {
            "compare": self.compare,
            "requests": self.requests,
            "sample": self.sample,
            "window_s": self.window_s,
            "rtol": self.rtol,
            "atol": self.atol,
        }


def _number(obj: Mapping[str, object], key: str, default: float, lo: float, hi: float) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ShadowError(f"shadow.{key}: not a finite number")
    if not lo <= v <= hi:
        raise ShadowError(f"shadow.{key}: {v} is outside [{lo:g}, {hi:g}]")
    return float(v)


def parse_spec(value: object) -> ShadowSpec | None:
    """The ``shadow`` entry of a desired model, None when absent; ShadowError when malformed."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ShadowError("shadow: not an object")
    unknown = set(value) - set(ShadowSpec.__dataclass_fields__)
    if unknown:
        raise ShadowError(f"shadow: unknown fields {sorted(unknown)}")
    req = value.get("requests", ShadowSpec.requests)
    if isinstance(req, bool) or not isinstance(req, int) or not 1 <= req <= MAX_REQUESTS:
        raise ShadowError(f"shadow.requests: an integer in [1, {MAX_REQUESTS}]")
    compare = value.get("compare", ShadowSpec.compare)
    if compare not in COMPARE_RULES:
        raise ShadowError(f"shadow.compare: {compare!r}; use one of {list(COMPARE_RULES)}")
    sample = _number(value, "sample", ShadowSpec.sample, 0.0, 1.0)
    if sample <= 0:
        raise ShadowError("shadow.sample: must be above 0")
    return ShadowSpec(
        compare=str(compare),
        requests=req,
        sample=sample,
        window_s=_number(value, "window_s", ShadowSpec.window_s, MIN_WINDOW_S, MAX_WINDOW_S),
        rtol=_number(value, "rtol", ShadowSpec.rtol, 0.0, 1e6),
        atol=_number(value, "atol", ShadowSpec.atol, 0.0, 1e6),
    )


@dataclass(frozen=True)
class ShadowCounts:
    compared: int = 0  # mirrored requests both versions answered
    agreed: int = 0  # of those, the outputs agreed
    candidate_errors: int = 0  # mirrored requests the candidate failed on
    dropped: int = 0  # sampled requests not mirrored: the queue was full

    def to_dict(self) -> JsonObject:
        return {
            "compared": self.compared,
            "agreed": self.agreed,
            "candidate_errors": self.candidate_errors,
            "dropped": self.dropped,
        }


@dataclass(frozen=True)
class ShadowFigures:
    """One window's report. Latencies are per-sample model time (ms) over the bounded recent
    history of compared requests; None until a request was compared."""

    window: int  # 1, 2, ... since the shadow started
    total: ShadowCounts
    last: ShadowCounts
    serving_p50_ms: float | None = None
    serving_p95_ms: float | None = None
    candidate_p50_ms: float | None = None
    candidate_p95_ms: float | None = None
    done: bool = False  # the device reached the spec's requests

    @property
    def agreement(self) -> float | None:
        t = self.total
        return t.agreed / t.compared if t.compared else None

    @property
    def p95_ratio(self) -> float | None:
        if not self.serving_p95_ms or self.candidate_p95_ms is None:
            return None
        return self.candidate_p95_ms / self.serving_p95_ms

    def to_dict(self) -> JsonObject:
        lat: dict[str, JsonValue] = {
            "serving_p50_ms": self.serving_p50_ms,
            "serving_p95_ms": self.serving_p95_ms,
            "candidate_p50_ms": self.candidate_p50_ms,
            "candidate_p95_ms": self.candidate_p95_ms,
        }
        return {
            "window": self.window,
            "total": self.total.to_dict(),
            "last": self.last.to_dict(),
            **lat,
            "done": self.done,
        }


def _counts(value: object, where: str) -> ShadowCounts:
    if not isinstance(value, Mapping):
        raise ShadowError(f"{where}: not an object")
    out: dict[str, int] = {}
    for key in ShadowCounts.__dataclass_fields__:
        v = value.get(key, 0)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_COUNT:
            raise ShadowError(f"{where}.{key}: an integer in [0, {MAX_COUNT}]")
        out[key] = v
    c = ShadowCounts(**out)
    if c.agreed > c.compared:
        raise ShadowError(f"{where}: agreed {c.agreed} > compared {c.compared}")
    return c


def _ms(value: Mapping[str, object], key: str) -> float | None:
    v = value.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= MAX_MS:
        raise ShadowError(f"{key}: a number of ms in [0, {MAX_MS:g}]")
    return float(v)


def parse_figures(value: object) -> ShadowFigures:
    """The figures of a ``shadow`` status report; ShadowError naming the field otherwise."""
    if not isinstance(value, Mapping):
        raise ShadowError("figures: not an object")
    window = value.get("window")
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_COUNT:
        raise ShadowError("window: a positive integer")
    total, last = _counts(value.get("total"), "total"), _counts(value.get("last"), "last")
    if last.compared > total.compared:
        raise ShadowError("last: more compared than total")
    done = value.get("done", False)
    if not isinstance(done, bool):
        raise ShadowError("done: not a boolean")
    return ShadowFigures(
        window=window,
        total=total,
        last=last,
        serving_p50_ms=_ms(value, "serving_p50_ms"),
        serving_p95_ms=_ms(value, "serving_p95_ms"),
        candidate_p50_ms=_ms(value, "candidate_p50_ms"),
        candidate_p95_ms=_ms(value, "candidate_p95_ms"),
        done=done,
    )
