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


def test_connect_failures_are_named_by_what_went_wrong() -> None:
    import socket
    import ssl

    from edgefleet.wire.backoff import connect_failure

    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "unable to get local issuer certificate"
    reset = ConnectionResetError(104, "Connection reset by peer")
    cases = {
        (cert, True): ("tls_certificate", "unable to get local issuer certificate"),
        (ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"), True): ("tls", "TLS"),
        (reset, True): ("tls", "plaintext port"),
        (reset, False): ("network", "reset"),  # without TLS a reset is the network's
        (ConnectionRefusedError(111, "Connection refused"), False): ("refused", "nothing listens"),
        (TimeoutError("timed out"), True): ("timeout", "no answer"),
        (socket.gaierror(-2, "Name or service not known"), False): ("dns", "not known"),
        (None, False): ("unknown", "no reason"),
    }
    for (exc, tls), (key, words) in cases.items():
        got_key, text = connect_failure(exc, tls)
        assert (got_key, words in text) == (key, True), (exc, tls, got_key, text)
