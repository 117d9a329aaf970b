"""Recipe search decisions (pure): gate checks and choosing the fastest candidate within gate."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.packager.evaluate import Metrics
from edgefleet.packager.profiles import AccuracyGate


@dataclass(frozen=True)
class GateMiss:
    """One gate a candidate did not meet; ``margin`` is negative by how much it missed."""

    gate: str
    required: float
    measured: float
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "required": self.required,
            "measured": round(self.measured, 6),
            "margin": round(self.margin, 6),
        }

    def describe(self) -> str:
        return f"{self.gate}: measured {self.measured:.4f}, required {self.required} (margin {self.margin:+.4f})"


@dataclass
class CandidateResult:
    """What happened to one candidate recipe."""

    candidate: str
    recipe: dict[str, Any]
    metrics: Metrics | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    size_bytes: int | None = None
    misses: list[GateMiss] = field(default_factory=list)
    error: str | None = None
    accepted: bool = False
    chosen: bool = False
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        return {
            "candidate": self.candidate,
            "recipe": self.recipe,
            "accepted": self.accepted,
            "chosen": self.chosen,
            "reason": self.reason,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "size_bytes": self.size_bytes,
            "agreement": m.agreement if m else None,
            "accuracy": m.accuracy if m else None,
            "max_abs_error": m.max_abs_error if m else None,
            "gate_misses": [g.to_dict() for g in self.misses],
            "error": self.error,
        }


def check_gate(
    metrics: Metrics,
    gate: AccuracyGate,
    *,
    model_bytes: int | None = None,
    max_memory_mb: float | None = None,
) -> list[GateMiss]:
    """Every gate ``metrics`` misses (empty when it passes).

    With ``max_memory_mb``, a model whose weights alone exceed the device's memory budget misses
    ``max_memory_mb`` too (it cannot fit, whatever the runtime overhead).
    """
    misses = []
    if model_bytes is not None and max_memory_mb is not None:
        mb = model_bytes / 2**20
        if mb > max_memory_mb:
            misses.append(GateMiss("max_memory_mb", max_memory_mb, mb, max_memory_mb - mb))
    if metrics.agreement < gate.min_agreement:
        misses.append(
            GateMiss(
                "min_agreement",
                gate.min_agreement,
                metrics.agreement,
                metrics.agreement - gate.min_agreement,
            )
        )
    if metrics.accuracy is not None and metrics.source_accuracy is not None:
        drop = metrics.source_accuracy - metrics.accuracy
        if drop > gate.max_accuracy_drop:
            misses.append(
                GateMiss(
                    "max_accuracy_drop", gate.max_accuracy_drop, drop, gate.max_accuracy_drop - drop
                )
            )
    if gate.max_abs_error is not None and metrics.max_abs_error > gate.max_abs_error:
        misses.append(
            GateMiss(
                "max_abs_error",
                gate.max_abs_error,
                metrics.max_abs_error,
                gate.max_abs_error - metrics.max_abs_error,
            )
        )
    return misses


def choose(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """Mark the fastest accepted candidate as chosen and give every candidate its reason.

    Ties on p50 go to the earlier candidate in the profile (the profile's order of preference).
    """
    accepted = [r for r in results if r.accepted and r.p50_ms is not None]
    best = min(accepted, key=lambda r: r.p50_ms or 0.0) if accepted else None
    for r in results:
        if r.error is not None:
            r.reason = f"build or run failed: {r.error}"
        elif not r.accepted:
            r.reason = "failed gate: " + "; ".join(m.describe() for m in r.misses)
        elif r is best:
            r.chosen = True
            r.reason = f"fastest within gate (p50 {r.p50_ms:.4f} ms)"
        elif best is not None:
            r.reason = f"within gate but slower (p50 {r.p50_ms:.4f} ms vs {best.p50_ms:.4f} ms)"
    return best


def closest_miss(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """The rejected candidate that came closest to its gates (for the failure report)."""
    scored = [r for r in results if r.misses]
    if not scored:
        return None
    return max(scored, key=lambda r: min(m.margin for m in r.misses))
