"""The pure rollout engine: decisions from events and time, no I/O."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.rollout_engine import (
    Abort,
    Approve,
    Cancel,
    DeviceInfo,
    DevState,
    Dispatch,
    Gates,
    Health,
    Pause,
    Phase,
    Resume,
    Revert,
    RolloutSpec,
    RolloutState,
    SpecError,
    StatusReport,
    Target,
    Tick,
)

T0 = 1_000_000.0


def fleet(n: int, profile: str = "cpu-x86_64", prev: str | None = "1.0.0") -> list[DeviceInfo]:
    return [
        DeviceInfo(f"dev-{i:03d}", (profile,), ("all",), ("even",) if i % 2 == 0 else (), prev)
        for i in range(n)
    ]


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {
        "rollout_id": "r1",
        "model": "iris",
        "version": "2.0.0",
        "target": Target(groups=("all",)),
        "waves": (10.0, 50.0, 100.0),
        "device_timeout_s": 100.0,
        "abort_failure_pct": 50.0,
        "abort_min_finished": 3,
        "success_threshold_pct": 50.0,
        "seed": 7,
        # the rules these tests were written for: abort reverts, no retry unless asked
        "on_abort": "rollback",
        "max_retries": 0,
    }
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def dispatched(actions: tuple[E.Action, ...]) -> list[str]:
    return [a.device_id for a in actions if isinstance(a, Dispatch)]


def reverted(actions: tuple[E.Action, ...]) -> list[str]:
    return [a.device_id for a in actions if isinstance(a, Revert)]


def report(st: RolloutState, ids: list[str], state: str, now: float, **kw: str) -> RolloutState:
    for d in ids:
        st = E.handle(st, StatusReport(d, st.spec.version, state, **kw), now).state
    return st


def ids_in(st: RolloutState, state: DevState) -> list[str]:
    return sorted(d.device_id for d in st.devices.values() if d.state == state)


# --- planning ------------------------------------------------------------------------------


def test_wave_sizes_cover_everyone_once() -> None:
    assert E.wave_sizes(100, (5, 25, 100)) == (5, 20, 75)
    assert E.wave_sizes(3, (5, 25, 100)) == (1, 1, 1)
    assert E.wave_sizes(1, (5, 25, 100)) == (1, 0, 0)
    assert E.wave_sizes(0, (50, 100)) == (0, 0)
    for n in range(0, 60):
        assert sum(E.wave_sizes(n, (5, 25, 100))) == n


@pytest.mark.parametrize(
    "bad",
    [
        {"waves": ()},
        {"waves": (50.0, 20.0, 100.0)},
        {"waves": (10.0, 50.0)},
        {"device_timeout_s": 0},
        {"success_threshold_pct": 120},
        {"abort_min_finished": 0},
        {"rate_per_min": 0},
        {"approval_waves": (5,)},
        {"soak_s": -1},
    ],
)
def test_invalid_specs_name_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(SpecError) as err:
        E.validate_spec(spec(**bad))
    assert str(err.value).split(":")[0]


def test_target_resolution_by_ids_groups_and_tags() -> None:
    devs = [
        DeviceInfo("a", ("p",), ("g1",), ()),
        DeviceInfo("b", ("p",), ("g2",), ("t1",)),
        DeviceInfo("c", ("p",), (), ("t2",)),
        DeviceInfo("d", ("p",), (), ()),
    ]
    pick = lambda t: [d.device_id for d in E.resolve_target(devs, t)]  # noqa: E731
    assert pick(Target(device_ids=("d",))) == ["d"]
    assert pick(Target(groups=("g1",))) == ["a"]
    assert pick(Target(tags=("t1", "t2"))) == ["b", "c"]
    assert pick(Target(device_ids=("a",), groups=("g1",), tags=("t2",))) == ["a", "c"]
    assert pick(Target()) == []


def test_membership_is_randomized_but_reproducible_from_the_seed() -> None:
    a = E.plan(spec(seed=1), fleet(40), ["cpu-x86_64"], T0).state
    b = E.plan(spec(seed=1), fleet(40), ["cpu-x86_64"], T0).state
    c = E.plan(spec(seed=2), fleet(40), ["cpu-x86_64"], T0).state
    wave0 = lambda s: sorted(d.device_id for d in s.devices.values() if d.wave == 0)  # noqa: E731
    assert wave0(a) == wave0(b)
    assert wave0(a) != wave0(c)
    assert wave0(a) != sorted(f"dev-{i:03d}" for i in range(4))  # not just the first ids


def test_plan_dispatches_first_wave_only() -> None:
    d = E.plan(spec(), fleet(20), ["cpu-x86_64"], T0)
    assert d.state.wave_sizes == (2, 8, 10)
    assert d.state.phase == Phase.RUNNING
    assert sorted(dispatched(d.actions)) == ids_in(d.state, DevState.IN_PROGRESS)
    assert len(dispatched(d.actions)) == 2
    assert all(a.attempt == 1 for a in d.actions if isinstance(a, Dispatch))


def test_incompatible_devices_are_reported_not_failed() -> None:
    devs = [*fleet(4), DeviceInfo("arm", ("cpu-arm64",), ("all",))]
    st = E.plan(spec(waves=(100.0,)), devs, ["cpu-x86_64"], T0).state
    assert st.devices["arm"].state == DevState.INCOMPATIBLE
    assert st.devices["arm"].reason_code == "profile_incompatible"
    st = report(st, ids_in(st, DevState.IN_PROGRESS), "COMMITTED", T0 + 1)
    st = E.handle(st, Tick(), T0 + 2).state
    assert st.phase == Phase.SUCCEEDED
    assert E.counts(st)["states"] == {"succeeded": 4, "incompatible": 1}


def test_profile_preference_order() -> None:
    dev = DeviceInfo("x", ("gpu-cuda", "cpu-x86_64"))
    assert E.choose_profile(dev, ["cpu-x86_64", "gpu-cuda"]) == "gpu-cuda"
    assert E.choose_profile(dev, ["cpu-x86_64"]) == "cpu-x86_64"
    assert E.choose_profile(dev, ["npu-qnn"]) is None


def test_no_compatible_devices_aborts_without_moving_anyone() -> None:
    d = E.plan(spec(), fleet(3, profile="npu-qnn"), ["cpu-x86_64"], T0)
    assert d.state.phase == Phase.ABORTED
    assert "no compatible" in (d.state.reason or "")
    assert not dispatched(d.actions) and not reverted(d.actions)


# --- waves ---------------------------------------------------------------------------------


def test_three_waves_succeed_in_order() -> None:
    st = E.plan(spec(), fleet(20), ["cpu-x86_64"], T0).state
    for wave, size in enumerate((2, 8, 10)):
        live = ids_in(st, DevState.IN_PROGRESS)
        assert len(live) == size
        assert {st.devices[i].wave for i in live} == {wave}
        st = report(st, live, "DOWNLOADING", T0 + wave * 10 + 1)
        assert ids_in(st, DevState.IN_PROGRESS) == live
        st = report(st, live, "COMMITTED", T0 + wave * 10 + 2)
    assert st.phase == Phase.SUCCEEDED
    assert E.counts(st)["states"] == {"succeeded": 20}


def test_status_for_other_versions_or_rollouts_is_ignored() -> None:
    st = E.plan(spec(waves=(100.0,)), fleet(2), ["cpu-x86_64"], T0).state
    st2 = E.handle(st, StatusReport("dev-000", "9.9.9", "COMMITTED"), T0 + 1).state
    st2 = E.handle(st2, StatusReport("dev-000", "2.0.0", "COMMITTED", rollout_id="x"), T0 + 1).state
    st2 = E.handle(st2, StatusReport("nobody", "2.0.0", "COMMITTED"), T0 + 1).state
    assert st2.devices == st.devices


def test_success_threshold_blocks_the_next_wave_and_aborts() -> None:
    s = spec(
        waves=(50.0, 100.0),
        success_threshold_pct=100.0,
        abort_failure_pct=90.0,
        abort_min_finished=2,
    )
    st = E.plan(s, fleet(4), ["cpu-x86_64"], T0).state
    first = ids_in(st, DevState.IN_PROGRESS)
    st = report(st, first[:1], "COMMITTED", T0 + 1)
    d = E.handle(st, StatusReport(first[1], "2.0.0", "FAILED", "gate_failed", "p95"), T0 + 2)
    assert d.state.phase == Phase.ABORTED
    assert "below 100 %" in (d.state.reason or "")
    assert sorted(reverted(d.actions)) == first
    assert ids_in(d.state, DevState.SKIPPED) == sorted(set(st.devices) - set(first))


def test_abort_rule_waits_for_min_finished_then_reverts_every_moved_device() -> None:
    s = spec(waves=(100.0,), abort_failure_pct=30.0, abort_min_finished=4)
    st = E.plan(s, fleet(10), ["cpu-x86_64"], T0).state
    live = ids_in(st, DevState.IN_PROGRESS)
    st = report(st, live[:1], "FAILED", T0 + 1, reason_code="validation_failed")
    assert st.phase == Phase.RUNNING  # 1 failure: not over 30 % of the minimum sample (4)
    st = report(st, live[2:4], "COMMITTED", T0 + 2)
    assert st.phase == Phase.RUNNING
    d = E.handle(st, StatusReport(live[1], "2.0.0", "FAILED", "validation_error"), T0 + 3)
    # 2 failures / 4 finished = 50 % > 30 %
    assert d.state.phase == Phase.ABORTED
    assert sorted(reverted(d.actions)) == live
    assert all(a.previous_version == "1.0.0" for a in d.actions if isinstance(a, Revert))
    c = E.counts(d.state)
    assert c["rollback_requested"] == 10
    assert c["rolled_back"] == 2  # the two that failed before activating never left 1.0.0
    # in-flight devices are counted as failed by the abort, with the reason
    assert d.state.devices[live[5]].reason_code == "rollout_aborted"


def test_exactly_at_the_abort_percentage_does_not_abort() -> None:
    s = spec(waves=(100.0,), abort_failure_pct=50.0, abort_min_finished=2)
    st = E.plan(s, fleet(4), ["cpu-x86_64"], T0).state
    live = ids_in(st, DevState.IN_PROGRESS)
    st = report(st, live[:1], "FAILED", T0 + 1)
    st = report(st, live[1:2], "COMMITTED", T0 + 1)
    assert st.phase == Phase.RUNNING


def test_rollback_confirmation_counts_devices_back_on_the_previous_version() -> None:
    s = spec(waves=(100.0,), abort_failure_pct=0.0, abort_min_finished=2)
    st = E.plan(s, fleet(3), ["cpu-x86_64"], T0).state
    live = ids_in(st, DevState.IN_PROGRESS)
    st = report(st, live[:2], "COMMITTED", T0 + 1)
    st = E.handle(st, StatusReport(live[2], "2.0.0", "FAILED"), T0 + 2).state
    assert st.phase == Phase.ABORTED
    assert E.counts(st)["rolled_back"] == 1
    st = E.handle(st, StatusReport(live[0], "1.0.0", "DOWNLOADING"), T0 + 3).state
    assert E.counts(st)["rolled_back"] == 1
    st = E.handle(st, StatusReport(live[0], "1.0.0", "COMMITTED"), T0 + 4).state
    st = E.handle(st, StatusReport(live[1], "2.0.0", "ROLLED_BACK"), T0 + 4).state
    assert E.counts(st)["rolled_back"] == 3


def test_timeout_counts_as_failure() -> None:
    s = spec(waves=(100.0,), abort_failure_pct=40.0, abort_min_finished=2, device_timeout_s=50)
    st = E.plan(s, fleet(3), ["cpu-x86_64"], T0).state
    live = ids_in(st, DevState.IN_PROGRESS)
    st = report(st, live[:1], "COMMITTED", T0 + 10)
    st = E.handle(st, Tick(), T0 + 49).state
    assert st.phase == Phase.RUNNING
    d = E.handle(st, Tick(), T0 + 50)
    assert d.state.phase == Phase.ABORTED
    assert d.state.devices[live[1]].state == DevState.TIMED_OUT
    assert d.state.devices[live[1]].reason_code == "timeout"
    assert sorted(reverted(d.actions)) == live


def test_retries_with_exponential_backoff_then_success() -> None:
    s = spec(waves=(100.0,), max_retries=2, retry_backoff_s=10, device_timeout_s=100)
    st = E.plan(s, fleet(1), ["cpu-x86_64"], T0).state
    dev = "dev-000"
    st = E.handle(st, StatusReport(dev, "2.0.0", "FAILED", "download_failed"), T0 + 1).state
    assert st.devices[dev].state == DevState.WAITING_RETRY
    assert st.devices[dev].retry_at == T0 + 11
    assert not dispatched(E.handle(st, Tick(), T0 + 10.9).actions)
    d = E.handle(st, Tick(), T0 + 11)
    assert [(a.device_id, a.attempt) for a in d.actions if isinstance(a, Dispatch)] == [(dev, 2)]
    st = d.state
    st = E.handle(st, Tick(), T0 + 111).state  # attempt 2 times out -> retry in 20 s
    assert st.devices[dev].state == DevState.WAITING_RETRY
    assert st.devices[dev].retry_at == T0 + 131
    st = E.handle(st, Tick(), T0 + 131).state
    assert st.devices[dev].attempts == 3
    st = E.handle(st, StatusReport(dev, "2.0.0", "COMMITTED"), T0 + 140).state
    assert st.devices[dev].state == DevState.SUCCEEDED
    assert st.phase == Phase.SUCCEEDED


def test_retries_exhausted_fail_for_good() -> None:
    s = spec(waves=(100.0,), max_retries=1, retry_backoff_s=1, abort_failure_pct=100.0)
    st = E.plan(s, fleet(1), ["cpu-x86_64"], T0).state
    st = E.handle(st, StatusReport("dev-000", "2.0.0", "FAILED", "download_failed"), T0).state
    st = E.handle(st, Tick(), T0 + 1).state
    st = E.handle(st, StatusReport("dev-000", "2.0.0", "FAILED", "download_failed"), T0 + 2).state
    assert st.devices["dev-000"].state == DevState.FAILED
    assert st.devices["dev-000"].attempts == 2


def test_deterministic_rejections_are_not_retried() -> None:
    s = spec(waves=(100.0,), max_retries=3, abort_failure_pct=100.0)
    st = E.plan(s, fleet(1), ["cpu-x86_64"], T0).state
    st = E.handle(st, StatusReport("dev-000", "2.0.0", "FAILED", "signature_invalid"), T0).state
    assert st.devices["dev-000"].state == DevState.FAILED
    assert st.devices["dev-000"].reason_code == "signature_invalid"


def test_late_success_while_waiting_for_retry_counts() -> None:
    s = spec(waves=(100.0,), max_retries=1, retry_backoff_s=100, device_timeout_s=10)
    st = E.plan(s, fleet(1), ["cpu-x86_64"], T0).state
    st = E.handle(st, Tick(), T0 + 10).state
    assert st.devices["dev-000"].state == DevState.WAITING_RETRY
    st = E.handle(st, StatusReport("dev-000", "2.0.0", "COMMITTED"), T0 + 12).state
    assert st.devices["dev-000"].state == DevState.SUCCEEDED


# --- approval, pause, cancel, rate, soak ----------------------------------------------------


def test_approval_before_a_wave() -> None:
    s = spec(waves=(50.0, 100.0), approval_waves=(1,))
    st = E.plan(s, fleet(4), ["cpu-x86_64"], T0).state
    st = report(st, ids_in(st, DevState.IN_PROGRESS), "COMMITTED", T0 + 1)
    assert st.phase == Phase.AWAITING_APPROVAL and st.wave == 1
    assert not dispatched(E.handle(st, Tick(), T0 + 1000).actions)
    d = E.handle(st, Approve(), T0 + 1001)
    assert d.state.phase == Phase.RUNNING
    assert len(dispatched(d.actions)) == 2


def test_approval_of_the_first_wave_and_early_approval() -> None:
    s = spec(waves=(50.0, 100.0), approval_waves=(0, 1))
    d = E.plan(s, fleet(4), ["cpu-x86_64"], T0)
    assert d.state.phase == Phase.AWAITING_APPROVAL and not dispatched(d.actions)
    st = E.handle(d.state, Approve(1), T0 + 1).state  # approve wave 2 ahead of time
    assert st.phase == Phase.AWAITING_APPROVAL
    st = E.handle(st, Approve(), T0 + 2).state
    st = report(st, ids_in(st, DevState.IN_PROGRESS), "COMMITTED", T0 + 3)
    assert st.phase == Phase.RUNNING and st.wave == 1


def test_pause_stops_dispatch_but_not_timeouts_and_resume_continues() -> None:
    s = spec(waves=(50.0, 100.0), device_timeout_s=10, abort_failure_pct=100.0)
    st = E.plan(s, fleet(4), ["cpu-x86_64"], T0).state
    first = ids_in(st, DevState.IN_PROGRESS)
    st = E.handle(st, Pause(), T0 + 1).state
    st = report(st, first, "COMMITTED", T0 + 2)
    d = E.handle(st, Tick(), T0 + 3)
    assert d.state.paused and not dispatched(d.actions) and d.state.wave == 0
    d = E.handle(d.state, Resume(), T0 + 4)
    assert not d.state.paused and len(dispatched(d.actions)) == 2
    st = E.handle(d.state, Pause(), T0 + 5).state
    st = E.handle(st, Tick(), T0 + 14).state
    assert len(ids_in(st, DevState.TIMED_OUT)) == 2


def test_cancel_stops_without_rollback_unless_asked() -> None:
    st = E.plan(spec(waves=(50.0, 100.0)), fleet(4), ["cpu-x86_64"], T0).state
    d = E.handle(st, Cancel(), T0 + 1)
    assert d.state.phase == Phase.CANCELLED and not reverted(d.actions)
    assert len(ids_in(d.state, DevState.SKIPPED)) == 2
    d2 = E.handle(st, Cancel(rollback=True), T0 + 1)
    assert len(reverted(d2.actions)) == 2
    after = E.handle(d.state, Resume(), T0 + 2)
    assert after.state == d.state and not dispatched(after.actions)


def test_operator_abort_reverts() -> None:
    st = E.plan(spec(waves=(100.0,)), fleet(3), ["cpu-x86_64"], T0).state
    d = E.handle(st, Abort("bad numbers"), T0 + 1)
    assert d.state.phase == Phase.ABORTED and d.state.reason == "bad numbers"
    assert len(reverted(d.actions)) == 3


def test_rate_limit_devices_per_minute() -> None:
    s = spec(waves=(100.0,), rate_per_min=3, device_timeout_s=1000)
    d = E.plan(s, fleet(7), ["cpu-x86_64"], T0)
    assert len(dispatched(d.actions)) == 3
    d = E.handle(d.state, Tick(), T0 + 59)
    assert not dispatched(d.actions)
    d = E.handle(d.state, Tick(), T0 + 60.5)
    assert len(dispatched(d.actions)) == 3
    d = E.handle(d.state, Tick(), T0 + 121)
    assert len(dispatched(d.actions)) == 1
    assert len(ids_in(d.state, DevState.IN_PROGRESS)) == 7


def test_soak_time_holds_the_next_wave() -> None:
    s = spec(waves=(50.0, 100.0), soak_s=30)
    st = E.plan(s, fleet(4), ["cpu-x86_64"], T0).state
    st = report(st, ids_in(st, DevState.IN_PROGRESS), "COMMITTED", T0 + 5)
    assert st.phase == Phase.SOAKING and st.wave_done_at == T0 + 5
    assert not dispatched(E.handle(st, Tick(), T0 + 34).actions)
    d = E.handle(st, Tick(), T0 + 35)
    assert d.state.wave == 1 and len(dispatched(d.actions)) == 2


@pytest.mark.parametrize(
    ("health", "violated"),
    [
        (Health(p95_ratio=1.6), "p95 latency ratio"),
        (Health(error_rate=0.2), "error rate"),
        (Health(drift=0.5), "drift"),
    ],
)
def test_health_gates_during_soak_abort(health: Health, violated: str) -> None:
    gates = Gates(max_p95_ratio=1.5, max_error_rate=0.05, max_drift=0.25)
    s = spec(waves=(50.0, 100.0), soak_s=30, gates=gates)
    st = E.plan(s, fleet(4), ["cpu-x86_64"], T0).state
    first = ids_in(st, DevState.IN_PROGRESS)
    st = report(st, first, "COMMITTED", T0 + 5)
    ok = E.handle(st, Tick(Health(p95_ratio=1.2, error_rate=0.01, drift=0.1)), T0 + 10)
    assert ok.state.phase == Phase.SOAKING
    d = E.handle(ok.state, Tick(health), T0 + 11)
    assert d.state.phase == Phase.ABORTED
    assert violated in (d.state.reason or "")
    assert sorted(reverted(d.actions)) == first


def test_missing_health_figures_do_not_block() -> None:
    s = spec(waves=(100.0,), gates=Gates(max_p95_ratio=1.1))
    st = E.plan(s, fleet(2), ["cpu-x86_64"], T0).state
    st = report(st, ids_in(st, DevState.IN_PROGRESS), "COMMITTED", T0 + 1)
    assert E.handle(st, Tick(Health()), T0 + 2).state.phase == Phase.SUCCEEDED


def test_first_device_no_previous_version_reverts_to_none() -> None:
    st = E.plan(spec(waves=(100.0,)), fleet(1, prev=None), ["cpu-x86_64"], T0).state
    d = E.handle(st, Abort(), T0 + 1)
    (rev,) = [a for a in d.actions if isinstance(a, Revert)]
    assert rev.previous_version is None


def test_terminal_rollouts_ignore_control_events() -> None:
    st = E.plan(spec(waves=(100.0,)), fleet(1), ["cpu-x86_64"], T0).state
    st = report(st, ["dev-000"], "COMMITTED", T0 + 1)
    assert st.phase == Phase.SUCCEEDED
    for ev in (Pause(), Resume(), Approve(), Cancel(True), Abort()):
        d = E.handle(st, ev, T0 + 2)
        assert d.state == st and not reverted(d.actions)


def test_state_round_trips_through_json_parts() -> None:
    import json

    s = spec(waves=(50.0, 100.0), gates=Gates(max_drift=0.2), approval_waves=(1,))
    st = E.plan(s, fleet(6), ["cpu-x86_64"], T0).state
    st = report(st, ids_in(st, DevState.IN_PROGRESS)[:1], "FAILED", T0 + 1)
    spec2 = E.spec_from_dict(json.loads(json.dumps(E.spec_to_dict(st.spec))))
    header = json.loads(json.dumps(E.header_to_dict(st)))
    devs = [
        E.device_from_dict(json.loads(json.dumps(E.device_to_dict(d)))) for d in st.devices.values()
    ]
    back = E.state_from_parts(spec2, header, devs)
    assert back == replace(st, devices=dict(st.devices))
    # and it keeps deciding the same way
    assert E.handle(back, Tick(), T0 + 2) == E.handle(st, Tick(), T0 + 2)


def test_plain_cancel_follows_devices_still_at_work_without_retrying() -> None:
    s = spec(waves=(100.0,), max_retries=2, retry_backoff_s=100, abort_failure_pct=100.0)
    st = E.plan(s, fleet(3), ["cpu-x86_64"], T0).state
    a, b, c = ids_in(st, DevState.IN_PROGRESS)
    st = E.handle(st, StatusReport(a, "2.0.0", "FAILED", "download_failed"), T0 + 1).state
    assert st.devices[a].state == DevState.WAITING_RETRY
    st = E.handle(st, Cancel(), T0 + 2).state
    assert st.devices[a].state == DevState.FAILED  # its retry will not come
    assert st.devices[a].reason_code == "download_failed"
    st = E.handle(st, StatusReport(b, "2.0.0", "COMMITTED"), T0 + 3).state
    d = E.handle(st, StatusReport(c, "2.0.0", "FAILED", "download_failed"), T0 + 4)
    assert d.state.devices[b].state == DevState.SUCCEEDED
    assert d.state.devices[c].state == DevState.FAILED  # no retry after the end
    assert not dispatched(d.actions) and d.state.phase == Phase.CANCELLED


def test_first_install_abort_is_confirmed_by_removed() -> None:
    """No previous version: the revert asks the device to remove the model, and a REMOVED
    status for the rollout's model (not a COMMITTED of a version that never was) confirms it."""
    s = spec(waves=(100.0,), remove_first_installs=True)
    st = E.plan(s, fleet(4, prev=None), ["cpu-x86_64"], T0).state
    live = ids_in(st, DevState.IN_PROGRESS)
    st = report(st, live[:2], "COMMITTED", T0 + 1)  # two committed the new version
    st = report(st, live[2:3], "VALIDATING", T0 + 1)  # one still at work
    st = report(st, live[3:], "FAILED", T0 + 1, reason_code="sample_mismatch")  # never activated
    d = E.handle(st, Abort("operator"), T0 + 2)
    assert sorted(reverted(d.actions)) == live
    assert all(a.previous_version is None for a in d.actions if isinstance(a, Revert))
    st = d.state
    assert E.counts(st)["rollback_requested"] == 4 and E.counts(st)["rolled_back"] == 1
    # Progress of the new version, or a removal of some other model, confirms nothing.
    st = E.handle(st, StatusReport(live[2], "2.0.0", "COMMITTED"), T0 + 3).state
    st = E.handle(st, StatusReport(live[0], "", "REMOVED", model="other"), T0 + 3).state
    assert E.counts(st)["rolled_back"] == 1
    for i, dev in enumerate(live[:3]):
        # the version removed is whatever the device had (the new one, or none at all)
        st = E.handle(
            st, StatusReport(dev, "2.0.0" if i else "", "REMOVED", model="iris"), T0 + 4
        ).state
    assert E.counts(st)["rolled_back"] == 4
    assert all(dev.rollback == "done" for dev in st.devices.values())


def test_removed_does_not_confirm_a_device_with_a_previous_version() -> None:
    st = E.plan(spec(waves=(100.0,)), fleet(2, prev="1.0.0"), ["cpu-x86_64"], T0).state
    dev = ids_in(st, DevState.IN_PROGRESS)[0]
    st = report(st, [dev], "COMMITTED", T0 + 1)
    st = E.handle(st, Abort(), T0 + 2).state
    st = E.handle(st, StatusReport(dev, "2.0.0", "REMOVED", model="iris"), T0 + 3).state
    assert st.devices[dev].rollback == "requested"  # it must come back on 1.0.0, not vanish
    st = E.handle(st, StatusReport(dev, "1.0.0", "COMMITTED", model="iris"), T0 + 4).state
    assert st.devices[dev].rollback == "done"


def test_a_batch_names_the_devices_it_changed_and_leaves_the_state_given_as_it_was() -> None:
    """A batch of reports costs what it touches: the decision names the devices it moved (the
    rows the shell writes), the counts come from tallies kept as it goes, and the state it was
    given is not written (the engine writes a private copy)."""
    st = E.plan(spec(waves=(100.0,)), fleet(50), ["cpu-x86_64"], T0).state
    snapshot = dict(st.devices)
    moved = sorted(d for d, p in st.devices.items() if p.state == DevState.IN_PROGRESS)[:3]
    reports = [StatusReport(d, "2.0.0", s) for d in moved for s in ("DOWNLOADING", "COMMITTED")]
    d = E.handle_all(st, reports, T0 + 1)
    assert d.changed == frozenset(moved)
    assert dict(st.devices) == snapshot and all(st.devices[k] is v for k, v in snapshot.items())
    assert [d.state.devices[x].state for x in moved] == [DevState.SUCCEEDED] * 3
    # the counts from the tallies are those of a count over every device
    assert d.state.tally == E.tally_of(d.state.devices)
    assert E.counts(d.state)["states"] == {"succeeded": 3, "in_progress": 47}
    assert E.counts(d.state)["waves"] == [{"size": 50, "succeeded": 3, "in_progress": 47}]
    # a decision on a returned state again leaves that one as it was
    again = E.handle(d.state, StatusReport(moved[0], "2.0.0", "COMMITTED"), T0 + 2)
    assert again.changed == frozenset() and d.state.devices[moved[0]].state == DevState.SUCCEEDED
    # a rollback's marks are tallied too
    ab = E.handle(d.state, Abort("bad", on_abort="rollback"), T0 + 3)
    assert ab.changed == frozenset(ab.state.devices)  # each device moved: reverted or failed
    assert ab.state.rollbacks == E.rollbacks_of(ab.state.devices) == {"requested": 50}
    assert E.counts(ab.state)["rollback_requested"] == 50
