"""Alerts in minutes: early looks at sliding windows with the bucket's false-alarm budget.

A closed bucket (one hour by default) is judged once at level ``alpha``, so a scope raises a
false alarm with probability at most ``alpha`` per bucket — but a shift was announced only
when its bucket closed, up to an hour later. Early looks keep that guarantee:

- every ``look_s`` seconds (default 30) each window of ``windows`` — the last ``window_s``
  seconds (default 300) and, nested in it, the last ``2 * look_s`` (60) — of a scope's
  sketches is judged by the same calibrated decision (``decide``); a look spends
  ``look_alpha = alpha * early_share / looks_per_bucket``, ``looks_per_bucket =
  ceil(bucket_s / look_s)``, the short window ``SHORT_SHARE`` (0.2) of it, the long one the
  rest (``window_alphas``);
- the closed bucket is judged at ``close_alpha = alpha * (1 - early_share)``.

Union bound (Bonferroni over the looks and their windows, valid whatever the dependence
between overlapping windows): under no drift, P(any alarm in a bucket period) <=
looks_per_bucket * sum(window_alphas) + close_alpha = looks_per_bucket * look_alpha +
close_alpha = alpha. Looks sit on a fixed grid (``slot``), at most one per slot, so the count
of looks per bucket is what the level assumed. The cost is power per look (a level 240 times
smaller at the defaults); a shift large enough to be "decided" in a minute at ``alpha`` clears
it with a few more windows' data (measured in tests/drift/test_alerts.py and docs/drift.md). The short window is there for
the delay: a window of 300 s holds the shift diluted by what came before it for minutes (150 s
from shift to event in the default test), one of two looks is all shifted after a minute (60–90
s); the long one keeps the power for small shifts, which need more rows. Halving the level for
the second window costs little: the p-value of a real shift falls exponentially with its rows.

Episodes: one event per (model, scope, key) and episode; an episode stays open while looks
keep finding drift and ends after ``quiet_s`` without a drifted look (:func:`episode_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from edgefleet.drift.decision import DriftConfig

# The short window's part of a look's level (the long window keeps the rest): enough for a
# large shift to pass it within a minute or two, little taken from the long window's power.
SHORT_SHARE = 0.2


@dataclass(frozen=True)
class LookPlan:
    """The level of each early look and of the closed bucket, from a config and bucket size."""

    alpha: float
    bucket_s: int
    look_s: int
    window_s: int
    early_share: float

    @classmethod
    def of(cls, config: DriftConfig, bucket_s: int) -> LookPlan:
        return cls(config.alpha, bucket_s, config.look_s, config.window_s, config.early_share)

    @property
    def enabled(self) -> bool:
        return self.look_s > 0

    @property
    def looks_per_bucket(self) -> int:
        return math.ceil(self.bucket_s / self.look_s) if self.enabled else 0

    @property
    def windows(self) -> tuple[int, ...]:
        """The window lengths each look judges, shortest first: ``2 * look_s`` (when shorter
        than ``window_s``) and ``window_s``."""
        if not self.enabled:
            return ()
        short = 2 * self.look_s
        return (short, self.window_s) if short < self.window_s else (self.window_s,)

    @property
    def look_alpha(self) -> float:
        """The level of one look, all its windows together."""
        if not self.enabled:
            return 0.0
        return self.alpha * self.early_share / self.looks_per_bucket

    @property
    def window_alphas(self) -> tuple[float, ...]:
        """The level of each window of a look (as ``windows``): the short window gets
        ``SHORT_SHARE`` of the look's level, the long one the rest."""
        if len(self.windows) == 1:
            return (self.look_alpha,)
        if not self.windows:
            return ()
        return (self.look_alpha * SHORT_SHARE, self.look_alpha * (1.0 - SHORT_SHARE))

    @property
    def close_alpha(self) -> float:
        return self.alpha * (1.0 - self.early_share) if self.enabled else self.alpha

    @property
    def quiet_s(self) -> int:
        """An episode ends after this long without a drifted look (two windows)."""
        return 2 * self.window_s

    def slot(self, ts: float) -> int:
        """The grid slot of a time (seconds since the epoch): one look per slot."""
        return int(ts // self.look_s)

    def look_config(self, config: DriftConfig, window: int = -1) -> DriftConfig:
        """The config a look judges window number ``window`` (of ``windows``) with."""
        return replace(config, alpha=self.window_alphas[window])

    def close_config(self, config: DriftConfig) -> DriftConfig:
        return replace(config, alpha=self.close_alpha)

    def to_dict(self) -> dict[str, float | int | list[int] | list[float]]:
        return {
            "alpha": self.alpha,
            "bucket_s": self.bucket_s,
            "look_s": self.look_s,
            "window_s": self.window_s,
            "windows": list(self.windows),
            "looks_per_bucket": self.looks_per_bucket,
            "look_alpha": self.look_alpha,
            "window_alphas": list(self.window_alphas),
            "close_alpha": self.close_alpha,
        }


Action = Literal["open", "continue", "none"]


def episode_step(drift: bool, last_seen: float | None, now: float, quiet_s: float) -> Action:
    """What a look does to the scope's episode: ``last_seen`` is the open episode's last
    drifted look (None: no episode). ``open``: a new episode, fire the event; ``continue``:
    the episode goes on (no new event); ``none``: nothing to record."""
    is_open = last_seen is not None and now - last_seen <= quiet_s
    if not drift:
        return "none"
    return "continue" if is_open else "open"
