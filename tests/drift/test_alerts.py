"""Early looks: the per-bucket false-alarm bound holds by simulation; the plan's arithmetic."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgefleet.drift.alerts import LookPlan, episode_step
from edgefleet.drift.decision import DriftConfig, decide
from edgefleet.drift.reference import build_reference
from edgefleet.drift.sketch import Sketch, merge_dicts


def test_plan_spends_the_bucket_level_over_its_looks() -> None:
    plan = LookPlan.of(DriftConfig(alpha=0.01), 3600)
    assert plan.looks_per_bucket == 120
    assert plan.windows == (60, 300)  # two looks' worth nested in the long window
    assert plan.look_alpha == pytest.approx(0.01 * 0.5 / 120)
    assert plan.window_alphas == pytest.approx((0.2 * plan.look_alpha, 0.8 * plan.look_alpha))
    assert plan.look_config(DriftConfig(), 0).alpha == plan.window_alphas[0]
    assert plan.close_alpha == pytest.approx(0.005)
    total = plan.looks_per_bucket * sum(plan.window_alphas) + plan.close_alpha
    assert total == pytest.approx(0.01)
    off = LookPlan.of(DriftConfig(alpha=0.01, look_s=0), 3600)
    assert not off.enabled and off.close_alpha == 0.01 and off.look_alpha == 0.0
    one = LookPlan.of(DriftConfig(alpha=0.01, look_s=30, window_s=60), 3600)
    assert one.windows == (60,) and one.window_alphas == (one.look_alpha,)
    with pytest.raises(ValueError, match="look_s"):
        DriftConfig(look_s=2)
    with pytest.raises(ValueError, match="window_s"):
        DriftConfig(look_s=60, window_s=30)


def test_episode_fires_once_and_ends_after_a_quiet_spell() -> None:
    assert episode_step(True, None, 100.0, 600) == "open"
    assert episode_step(True, 90.0, 100.0, 600) == "continue"
    assert episode_step(False, 90.0, 100.0, 600) == "none"
    assert episode_step(True, 90.0, 800.0, 600) == "open"  # quiet for longer: a new episode


def _simulate(
    plan: LookPlan, cfg: DriftConfig, buckets: int, rows_per_slot: int, *, naive: bool
) -> float:
    """Share of bucket periods with any alarm (early looks or the close) on unchanged data."""
    rng = np.random.default_rng(7)
    ref = build_reference({"x": rng.normal(size=(2000, 4)).astype(np.float32)}, {})
    slots_per_bucket = plan.bucket_s // plan.look_s
    window_slots = [w // plan.look_s for w in plan.windows]
    look_cfgs = [cfg if naive else plan.look_config(cfg, i) for i in range(len(plan.windows))]
    close_cfg = cfg if naive else plan.close_config(cfg)
    history: list[dict[str, Any]] = []
    alarmed = 0
    for _ in range(buckets):
        bucket: dict[str, Any] | None = None
        hit = False
        for _ in range(slots_per_bucket):
            sk = Sketch(ref)
            sk.update({"x": rng.normal(size=(rows_per_slot, 4)).astype(np.float32)}, {})
            d = sk.to_dict()
            history = [*history[-(max(window_slots) - 1) :], d]
            bucket = d if bucket is None else merge_dicts(bucket, d)
            for slots, look_cfg in zip(window_slots, look_cfgs, strict=True):  # every window
                window = history[-slots:][0]
                for other in history[-slots:][1:]:
                    window = merge_dicts(window, other)
                hit = hit or decide(ref, window, look_cfg).drift
        assert bucket is not None
        hit = hit or decide(ref, bucket, close_cfg).drift
        alarmed += hit
    return alarmed / buckets


def test_false_alarms_per_bucket_stay_within_alpha_with_early_looks() -> None:
    """Seeded null simulation: 4 Gaussian features, reference 2,000, a 10-minute bucket looked
    at every minute over the last 2 and the last 3 minutes (60 rows a minute), alpha 0.2 so
    that the rate is measurable in a few hundred buckets. With the split, the share of bucket periods that
    alarm stays within alpha; judging every look at alpha (the naive way) does not."""
    cfg = DriftConfig(alpha=0.2, look_s=60, window_s=180, min_samples=100)
    plan = LookPlan.of(cfg, 600)
    assert plan.looks_per_bucket == 10 and plan.windows == (120, 180)
    n = 250
    rate = _simulate(plan, cfg, n, 60, naive=False)
    sd = (0.2 * 0.8 / n) ** 0.5
    print(f"\nnull buckets with any alarm: split {rate:.3f} (bound {cfg.alpha})")
    assert rate <= cfg.alpha + 2 * sd
    naive = _simulate(plan, cfg, 80, 60, naive=True)
    print(f"every look at alpha (naive): {naive:.3f}")
    assert naive > cfg.alpha + 0.15
