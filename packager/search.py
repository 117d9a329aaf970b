"""Recipe search decisions (pure): gate checks that know their sample size, and choosing a candidate.

Gates (see ``docs/packager.md``):

- ``min_agreement``: judged by the measured top-1 agreement, reported with its 95 % Wilson
  interval; the gate is *resolved* when the whole interval lies on one side of it.
- ``max_accuracy_drop`` (labelled data): judged by McNemar's exact test on the discordant pairs.
  A candidate fails only when its drop exceeds the gate *and* the test says the candidate is
  worse than the source (one-sided p < 0.05); a drop above the gate that the test cannot tell
  from chance is *unresolved*, as is a pass whose conservative upper bound exceeds the gate.
- Every unresolved gate says how many samples (at the observed rates) would resolve it; under
  ``strict`` an unresolved gate is a miss.

Ranking: on the profile's own provider (or a CPU profile), the fastest accepted candidate wins.
An accelerator candidate measured on the CPU provider is ranked by a cost model instead
(:func:`cost_key`): fewest compute nodes left in FP32, then smallest model, then profile order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edgefleet.packager.evaluate import Metrics
from edgefleet.packager.profiles import AccuracyGate
from edgefleet.packager.stats import ALPHA, drop_upper, mcnemar_exact, samples_needed, wilson


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
    gates: list[GateVerdict] = field(default_factory=list)
    #: Why the candidate was not built (target properties, or ``only_if_needed`` after an earlier
    #: candidate passed); a skipped candidate has no backend, provider or figures.
    skipped: str | None = None
    backend: str | None = "ort"  # the toolkit that actually built it (None: nothing built it)
    backend_note: str | None = None  # why it is not the recipe's own backend
    measured_on: str | None = None  # provider the figures come from
    on_target_provider: bool | None = True
    cost: dict[str, Any] | None = None  # the cost model's inputs (accelerator profiles)
    fp32_nodes: list[dict[str, Any]] = field(default_factory=list)  # accuracy-aware search
    derived_from: str | None = None  # the candidate an accuracy-aware variant was made from
    recovery: dict[str, Any] | None = None  # what the accuracy-aware search tried on this one
    #: The target constraints its output was checked against and how it broke them (refused).
    verification: dict[str, Any] | None = None
    violations: list[str] = field(default_factory=list)
    #: Seconds spent building it (quantizing, not measuring); None when another profile's
    #: identical build was reused.
    build_s: float | None = None
    #: Set when the finalists were timed again in turns (`benchmark.measure_interleaved`):
    #: p50_ms/p95_ms are those figures, and this keeps the first, sequential ones.
    timing: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.skipped is not None:  # never built: nothing to attribute it to
            self.backend, self.measured_on, self.on_target_provider = None, None, None

    @property
    def unresolved(self) -> list[GateVerdict]:
        return [g for g in self.gates if g.verdict == "unresolved"]

    def to_dict(self) -> dict[str, Any]:
        m = self.metrics
        d: dict[str, Any] = {
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
            "backend": self.backend,
            "backend_note": self.backend_note,
            "measured_on": self.measured_on,
            "on_target_provider": self.on_target_provider,
            "skipped": self.skipped,
            "fidelity": _fidelity(m) if m else None,
            "gates": [g.to_dict() for g in self.gates],
            "build_s": self.build_s,
        }
        if self.cost is not None:
            d["cost"] = self.cost
        if self.timing is not None:
            d["timing"] = self.timing
        if self.recovery is not None:
            d["recovery"] = self.recovery
        if self.verification is not None:
            d["verification"] = self.verification
        if self.fp32_nodes or self.derived_from:
            d["derived_from"] = self.derived_from
            d["fp32_nodes"] = self.fp32_nodes
        return d


def _fidelity(m: Metrics) -> dict[str, Any]:
    lo, hi = m.agreement_ci95
    return {
        "samples": m.samples,
        "output_kind": m.output_kind,
        "output_kind_how": m.output_kind_how,
        "threshold": m.threshold,
        "iou_mean": m.iou_mean,
        "pixel_agreement": m.pixel_agreement,
        "agreement": m.agreement,
        "agreement_ci95": [round(lo, 6), round(hi, 6)],
        "cosine_mean": m.cosine_mean,
        "cosine_min": m.cosine_min,
        "max_abs_error": m.max_abs_error,
        "confident": m.confident.to_dict() if m.confident else None,
        "hard": m.hard.to_dict() if m.hard else None,
        "lost": m.lost,
        "gained": m.gained,
    }


@dataclass(frozen=True)
class GateVerdict:
    """One gate judged with the sample size in mind.

    ``verdict``: ``pass`` / ``fail`` (resolved by the data) or ``unresolved`` (the data cannot
    tell; ``passes`` says which way the point estimate or test leaned). ``samples_needed``: how
    many samples at the observed rates would resolve it (None when resolved or unreachable).
    """

    gate: str
    required: float
    measured: float
    ci95: tuple[float, float] | None
    verdict: str
    passes: bool
    samples: int
    samples_needed: int | None = None
    test: str = ""
    upper95: float | None = None  # a one-sided 95 % upper bound (accuracy drop)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "required": self.required,
            "measured": round(self.measured, 6),
            "ci95": [round(v, 6) for v in self.ci95] if self.ci95 else None,
            "upper95": round(self.upper95, 6) if self.upper95 is not None else None,
            "verdict": self.verdict,
            "passes": self.passes,
            "samples": self.samples,
            "samples_needed": self.samples_needed,
            "test": self.test,
        }

    def describe(self) -> str:
        ci = f" (95% CI {self.ci95[0]:.4f}-{self.ci95[1]:.4f})" if self.ci95 else ""
        if self.upper95 is not None:
            ci = f" (95% upper bound {self.upper95:.4f})"
        text = f"{self.gate}: measured {self.measured:.4f}{ci}, required {self.required}"
        if self.verdict == "unresolved":
            need = (
                f"about {self.samples_needed} samples would"
                if self.samples_needed
                else "no sample count at these rates would"
            )
            text += f"; {self.samples} samples cannot resolve it, {need}"
        return text + (f"; {self.test}" if self.test else "")


def judge_agreement(m: Metrics, gate: AccuracyGate) -> GateVerdict:
    """``min_agreement`` by the point estimate, resolved when the Wilson interval clears it."""
    n, k, g = m.samples, m.agreeing_count, gate.min_agreement
    lo, hi = m.agreement_ci95
    passes = m.agreement >= g
    if m.equivalent or lo >= g or hi < g:
        return GateVerdict(
            "min_agreement", g, m.agreement, (lo, hi), "pass" if passes else "fail", passes, n
        )
    rate = k / n if n else 0.0

    def resolves(size: int) -> bool:
        lo2, hi2 = wilson(round(rate * size), size)
        return lo2 >= g or hi2 < g

    need = samples_needed(resolves, n + 1) if rate != g else None
    return GateVerdict("min_agreement", g, m.agreement, (lo, hi), "unresolved", passes, n, need)


def judge_accuracy_drop(m: Metrics, gate: AccuracyGate) -> GateVerdict | None:
    """``max_accuracy_drop`` by McNemar's exact test on the discordant pairs (None: no labels)."""
    if m.accuracy is None or m.source_accuracy is None:
        return None
    g, n = gate.max_accuracy_drop, m.samples
    drop = m.source_accuracy - m.accuracy
    if m.lost is None or m.gained is None:  # no pair counts: the point estimate alone
        return GateVerdict(
            "max_accuracy_drop", g, drop, None, "pass" if drop <= g else "fail", drop <= g, n
        )
    lost, gained = m.lost, m.gained
    p = mcnemar_exact(lost, gained)
    upper = drop_upper(lost, gained, n)
    test = f"McNemar exact: {lost} lost, {gained} gained, one-sided p = {p:.3g}"
    if m.equivalent or upper <= g:
        return GateVerdict(
            "max_accuracy_drop", g, drop, None, "pass", True, n, test=test, upper95=upper
        )
    if drop > g and p < ALPHA:
        return GateVerdict(
            "max_accuracy_drop", g, drop, None, "fail", False, n, test=test, upper95=upper
        )
    lost_rate, gained_rate = lost / n, gained / n

    def resolves(size: int) -> bool:
        lo_, ga_ = round(lost_rate * size), round(gained_rate * size)
        if drop_upper(lo_, ga_, size) <= g:
            return True
        return (lo_ - ga_) / size > g and mcnemar_exact(lo_, ga_) < ALPHA

    need = samples_needed(resolves, n + 1)
    passes = drop <= g or p >= ALPHA  # a drop the data cannot tell from chance does not fail
    return GateVerdict(
        "max_accuracy_drop", g, drop, None, "unresolved", passes, n, need, test, upper
    )


def judge(m: Metrics, gate: AccuracyGate) -> list[GateVerdict]:
    """Every statistical gate's verdict for ``m``."""
    verdicts = [judge_agreement(m, gate)]
    drop = judge_accuracy_drop(m, gate)
    if drop is not None:
        verdicts.append(drop)
    return verdicts


def check_gate(
    metrics: Metrics,
    gate: AccuracyGate,
    *,
    model_bytes: int | None = None,
    max_memory_mb: float | None = None,
    strict: bool = False,
) -> list[GateMiss]:
    """Every gate ``metrics`` misses (empty when it passes); see the module docstring.

    With ``max_memory_mb``, a model whose weights alone exceed the device's memory budget misses
    ``max_memory_mb`` too (it cannot fit, whatever the runtime overhead). With ``strict``, a gate
    the validation set is too small to resolve is a miss too.
    """
    misses = []
    if model_bytes is not None and max_memory_mb is not None:
        mb = model_bytes / 2**20
        if mb > max_memory_mb:
            misses.append(GateMiss("max_memory_mb", max_memory_mb, mb, max_memory_mb - mb))
    for v in judge(metrics, gate):
        if not v.passes or (strict and v.verdict == "unresolved"):
            if v.gate == "min_agreement":
                margin = v.measured - v.required
            else:
                margin = v.required - v.measured
            if v.passes:  # strict: the gate passes on the point estimate but is not resolved
                margin = min(margin, -0.0)
            misses.append(GateMiss(v.gate, v.required, v.measured, margin))
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


#: Compute-heavy ops whose precision decides an accelerator's speed (the cost model counts those
#: left in FP32: each is an island the accelerator hands back to a slower path).
HEAVY_OPS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "LSTM", "GRU", "RNN", "Einsum"}
)


def cost_key(r: CandidateResult) -> tuple[float, float]:
    """The accelerator cost model: (FP32 compute nodes, model bytes); smaller is better."""
    c = r.cost or {}
    return (float(c.get("fp32_compute_nodes", 0)), float(r.size_bytes or 0))


#: Candidates within this fraction of the fastest p50 are a tie (timing noise on a shared host):
#: the most faithful of them wins.
LATENCY_TIE = 0.05
#: Ranked by cost: candidates with the fewest FP32 compute nodes whose sizes are within this
#: fraction of the smallest are a tie (a few bytes of graph predict nothing on the target): the
#: most faithful of them wins.
SIZE_TIE = 0.01


def _fidelity_key(r: CandidateResult) -> tuple[float, float]:
    m = r.metrics
    if m is None:
        return (0.0, 0.0)
    return (m.agreement, m.cosine_mean if m.cosine_mean is not None else 0.0)


def choose(results: Sequence[CandidateResult], *, rank: str = "latency") -> CandidateResult | None:
    """Mark the best accepted candidate as chosen and give every candidate its reason.

    ``rank="latency"``: fastest p50 wins; candidates within :data:`LATENCY_TIE` of it are a tie,
    won by the highest agreement, then output cosine, then the earlier candidate in the profile. ``rank="cost"``: :func:`cost_key` decides (the figures were
    not measured on the target, so latency would predict nothing); sizes within
    :data:`SIZE_TIE` of the smallest are a tie, won the same way.
    """
    accepted = [r for r in results if r.accepted and r.p50_ms is not None]
    best: CandidateResult | None = None
    if accepted:
        if rank == "cost":
            fp32, smallest = cost_key(min(accepted, key=cost_key))
            close = [
                r
                for r in accepted
                if cost_key(r)[0] == fp32 and cost_key(r)[1] <= smallest * (1 + SIZE_TIE)
            ]
            best = max(close, key=_fidelity_key)  # the earlier one on a full tie
        else:
            fastest = min(r.p50_ms or 0.0 for r in accepted)
            close = [r for r in accepted if (r.p50_ms or 0.0) <= fastest * (1 + LATENCY_TIE)]
            best = max(close, key=_fidelity_key)
    for r in results:
        if r.skipped is not None:
            r.reason = f"skipped: {r.skipped}"
        elif r.error is not None:
            r.reason = f"build or run failed: {r.error}"
        elif r.violations:
            r.reason = "refused: violates the target's constraints: " + "; ".join(r.violations)
        elif not r.accepted:
            r.reason = "failed gate: " + "; ".join(m.describe() for m in r.misses)
        elif r is best:
            r.chosen = True
            if rank == "cost":
                fp32, size = cost_key(r)
                r.reason = (
                    f"lowest cost within gate ({int(fp32)} FP32 compute nodes, {int(size)} bytes;"
                    " latency not measured on the target"
                )
                r.reason += (
                    f"; most faithful of those within {SIZE_TIE:.0%} of the smallest)"
                    if cost_key(r) != min(cost_key(a) for a in accepted)
                    else ")"
                )
            else:
                r.reason = f"fastest within gate (p50 {r.p50_ms:.4f} ms"
                r.reason += (
                    f", most faithful of those within {LATENCY_TIE:.0%} of the fastest)"
                    if best.p50_ms != min(a.p50_ms or 0.0 for a in accepted)
                    else ")"
                )
        elif best is not None:
            if rank == "cost":
                r.reason = f"within gate but costlier {cost_key(r)} vs {cost_key(best)}"
            else:
                r.reason = f"within gate but slower (p50 {r.p50_ms:.4f} ms vs {best.p50_ms:.4f} ms)"
        unresolved = r.unresolved
        if r.accepted and unresolved:
            r.reason += "; unresolved: " + "; ".join(v.describe() for v in unresolved)
    return best


def closest_miss(results: Sequence[CandidateResult]) -> CandidateResult | None:
    """The rejected candidate that came closest to its gates (for the failure report)."""
    scored = [r for r in results if r.misses]
    if not scored:
        return None
    return max(scored, key=lambda r: min(m.margin for m in r.misses))
