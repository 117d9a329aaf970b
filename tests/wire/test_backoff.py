"""The broker failover policy: rotation over the URL list, jittered exponential backoff."""

from __future__ import annotations

import random

import pytest

from edgefleet.wire.backoff import Failover, split_urls


def test_split_urls_accepts_a_comma_list_or_a_list_and_drops_blanks_and_repeats() -> None:
    assert split_urls(" mqtt://a:1 ,mqtt://b:2,, mqtt://a:1") == ["mqtt://a:1", "mqtt://b:2"]
    assert split_urls(["mqtts://a:8883", " mqtt://b:1883 "]) == [
        "mqtts://a:8883",
        "mqtt://b:1883",
    ]
    assert split_urls(None) == [] and split_urls("") == []


def test_each_failure_moves_to_the_next_url_and_wraps_round() -> None:
    f = Failover(["a", "b", "c"], rng=random.Random(1))
    seen = [f.current]
    for _ in range(4):
        f.failed()
        seen.append(f.current)
    assert seen == ["a", "b", "c", "a", "b"]
    f.connected()
    assert f.current == "b", "a successful connection keeps the node it reached"


def test_the_delay_doubles_up_to_the_cap_with_equal_jitter_and_resets_on_connect() -> None:
    f = Failover(["a", "b"], base_s=0.5, cap_s=4.0, rng=random.Random(7))
    delays = [f.failed() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    for d, c in zip(delays, ceilings, strict=True):
        assert c / 2 <= d <= c
    assert len(set(delays)) == len(delays), "jittered: no two waits alike"
    f.connected()
    assert f.failed() <= 0.5


def test_devices_cut_off_together_spread_their_retries() -> None:
    waits = [Failover(["a"], base_s=1, cap_s=30, rng=random.Random(i)).failed() for i in range(200)]
    assert min(waits) >= 0.5 and max(waits) <= 1.0
    assert max(waits) - min(waits) > 0.4  # spread over (nearly) the whole half-second window


def test_a_policy_without_urls_or_with_a_bad_backoff_is_refused() -> None:
    with pytest.raises(ValueError, match="no broker URL"):
        Failover([])
    with pytest.raises(ValueError, match="base_s"):
        Failover(["a"], base_s=0)
    with pytest.raises(ValueError, match="base_s"):
        Failover(["a"], base_s=5, cap_s=1)
