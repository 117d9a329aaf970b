"""The engine's safety rules: an abort never makes things worse, a minimum sample before one
noisy device can abort, transient failures retried, rollbacks that fail are final and loud."""

from __future__ import annotations

from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.rollout_engine import (
    Abort,
    Approve,
    DeviceInfo,
    DevState,
    Dispatch,
    Phase,
    Revert,
    RolloutSpec,
    RolloutState,
    StatusReport,
    Target,
    Tick,
)

T0 = 2_000_000.0


def fleet(n: int, prev: str | None = "1.0.0") -> list[DeviceInfo]:
    return [DeviceInfo(f"gw-{i:03d}", ("cpu",), ("lab",), (), prev) for i in range(n)]


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {
        "rollout_id": "r",
        "model": "digits",
        "version": "1.0.1",
        "target": Target(groups=("lab",)),
        "waves": (100.0,),
        "device_timeout_s": 100.0,
        "seed": 1,
    }
    base.update(kw)
    return RolloutSpec(**base)  # type: ignore[arg-type]


def live(st: RolloutState) -> list[str]:
    return sorted(d.device_id for d in st.devices.values() if d.state == DevState.IN_PROGRESS)


def reverts(actions: tuple[E.Action, ...]) -> list[Revert]:
    return [a for a in actions if isinstance(a, Revert)]


def test_defaults_halt_on_abort_and_a_minimum_sample() -> None:
    s = spec()
    assert s.on_abort == "halt" and s.abort_min_finished is None and s.max_retries == 2
    assert E.abort_min(s, 2) == E.ABORT_MIN_FLOOR
    assert E.abort_min(s, 1000) == 20  # 2 % of the planned devices when that is more
    assert E.abort_min(spec(abort_min_finished=1), 1000) == 1


def test_one_noisy_device_of_two_does_not_abort_a_good_release() -> None:
    """The README's fleet: two gateways, the second fails a probation gate once."""
    s = spec(waves=(5.0, 25.0, 100.0), abort_failure_pct=20.0)
    d = E.plan(s, fleet(2, prev=None), ["cpu"], T0)
    assert d.state.wave_sizes == (1, 1)  # the third wave would be empty: not planned
    st = d.state
    (a,) = live(st)
    st = E.handle(st, StatusReport(a, "1.0.1", "COMMITTED"), T0 + 1).state
    (b,) = live(st)
    noisy = StatusReport(b, "1.0.1", "ROLLED_BACK", "probation_latency", "p95 5.4 > 5.3 ms")
    d = E.handle(st, noisy, T0 + 2)
    assert d.state.phase == Phase.SUCCEEDED, d.state.reason
    assert not reverts(d.actions)  # gw-000 keeps serving what it committed
    assert d.state.devices[b].state == DevState.FAILED  # probation_latency is final


def test_a_broken_release_still_aborts_in_a_small_group() -> None:
    st = E.plan(spec(abort_failure_pct=20.0), fleet(2), ["cpu"], T0).state
    a, b = live(st)
    st = E.handle(st, StatusReport(a, "1.0.1", "FAILED", "load_failed"), T0 + 1).state
    assert st.phase == Phase.RUNNING  # 1 failure is not over 20 % of 5
    st = E.handle(st, StatusReport(b, "1.0.1", "FAILED", "load_failed"), T0 + 2).state
    assert st.phase == Phase.ABORTED and "minimum sample 5" in (st.reason or "")


def test_halt_abort_keeps_committed_devices_and_withdraws_the_release_elsewhere() -> None:
    """Abort of a first install (no previous version): the healthy device keeps it, nothing is
    removed, devices not yet running it never get it."""
    s = spec(waves=(50.0, 100.0), abort_min_finished=1, abort_failure_pct=10.0)
    st = E.plan(s, fleet(4, prev=None), ["cpu"], T0).state
    a, b = live(st)
    st = E.handle(st, StatusReport(a, "1.0.1", "COMMITTED"), T0 + 1).state
    d = E.handle(st, StatusReport(b, "1.0.1", "FAILED", "sample_mismatch"), T0 + 2)
    assert d.state.phase == Phase.ABORTED
    assert not any(isinstance(x, Dispatch) for x in d.actions)
    (rev,) = reverts(d.actions)
    assert (rev.device_id, rev.previous_version, rev.remove) == (b, None, False)
    assert d.state.devices[a].state == DevState.SUCCEEDED and d.state.devices[a].rollback is None
    assert sum(1 for x in d.state.devices.values() if x.state == DevState.SKIPPED) == 2
    assert not any("removed" in str(x) for x in d.actions)


def test_rollback_abort_reverts_upgrades_but_keeps_first_installs() -> None:
    devs = [*fleet(2), DeviceInfo("gw-new", ("cpu",), ("lab",), (), None)]
    st = E.plan(spec(on_abort="rollback"), devs, ["cpu"], T0).state
    for dev in ("gw-000", "gw-new"):
        st = E.handle(st, StatusReport(dev, "1.0.1", "COMMITTED"), T0 + 1).state
    d = E.handle(st, Abort("numbers look wrong"), T0 + 2)  # gw-001 still at work
    assert sorted(r.device_id for r in reverts(d.actions)) == ["gw-000", "gw-001"]
    assert all(r.previous_version == "1.0.0" and not r.remove for r in reverts(d.actions))
    assert d.state.devices["gw-new"].rollback is None
    assert any("gw-new: keeps 1.0.1" in str(x) for x in d.actions)
    # the operator asked for removal explicitly: then (and only then) a first install goes
    s3 = spec(on_abort="rollback", remove_first_installs=True)
    st = E.plan(s3, [devs[2]], ["cpu"], T0).state
    st = E.handle(st, StatusReport("gw-new", "1.0.1", "VALIDATING"), T0 + 1).state
    d = E.handle(st, Abort(), T0 + 2)
    (rev,) = reverts(d.actions)
    assert rev.remove and rev.previous_version is None


def test_operator_abort_can_choose_rollback_over_the_spec_default() -> None:
    st = E.plan(spec(), fleet(2), ["cpu"], T0).state
    a, b = live(st)
    st = E.handle(st, StatusReport(a, "1.0.1", "COMMITTED"), T0 + 1).state
    assert not reverts(E.handle(st, Abort(), T0 + 2).actions)  # halt: a keeps it, b followed
    d = E.handle(st, Abort("by hand", on_abort="rollback"), T0 + 2)
    assert sorted(r.device_id for r in reverts(d.actions)) == [a, b]


def test_transient_failures_are_retried_and_do_not_count_until_final() -> None:
    s = spec(abort_min_finished=1, abort_failure_pct=0.0, retry_backoff_s=10)
    st = E.plan(s, fleet(1), ["cpu"], T0).state
    (a,) = live(st)
    for attempt, at in ((1, T0 + 1), (2, T0 + 20)):
        st = E.handle(st, StatusReport(a, "1.0.1", "FAILED", "download_incomplete"), at).state
        assert st.devices[a].state == DevState.WAITING_RETRY and st.phase == Phase.RUNNING
        d = E.handle(st, Tick(), at + 10 * 2 ** (attempt - 1))
        assert [x.attempt for x in d.actions if isinstance(x, Dispatch)] == [attempt + 1]
        st = d.state
    st = E.handle(st, StatusReport(a, "1.0.1", "FAILED", "http_error"), T0 + 60).state
    assert st.devices[a].state == DevState.FAILED and st.phase == Phase.ABORTED
    # a final code is not retried
    st = E.plan(s, fleet(1), ["cpu"], T0).state
    st = E.handle(st, StatusReport(a, "1.0.1", "FAILED", "probation_latency"), T0 + 1).state
    assert st.devices[a].state == DevState.FAILED and st.devices[a].attempts == 1


def test_a_rollback_that_fails_is_final_and_counted() -> None:
    st = E.plan(spec(on_abort="rollback"), fleet(3), ["cpu"], T0).state
    a, b, c = live(st)
    for dev in (a, b, c):
        st = E.handle(st, StatusReport(dev, "1.0.1", "COMMITTED"), T0 + 1).state
    s2 = spec(on_abort="rollback", waves=(60.0, 100.0), approval_waves=(1,))
    st = E.plan(s2, fleet(3), ["cpu"], T0).state
    a, b = live(st)
    for dev in (a, b):
        st = E.handle(st, StatusReport(dev, "1.0.1", "COMMITTED"), T0 + 1).state
    st = E.handle(st, Abort(), T0 + 2).state
    assert E.counts(st)["rollback_requested"] == 2
    # a transient failure of the way back: asked again
    d = E.handle(st, StatusReport(a, "1.0.0", "FAILED", "http_error", "503"), T0 + 3)
    assert [r.device_id for r in reverts(d.actions)] == [a]
    st = d.state
    assert st.devices[a].rollback == "requested"
    st = E.handle(
        st, StatusReport(a, "1.0.0", "ROLLBACK_FAILED", "integrity", "gone"), T0 + 4
    ).state
    st = E.handle(st, StatusReport(b, "1.0.0", "COMMITTED"), T0 + 4).state
    c2 = E.counts(st)
    assert (c2["rolled_back"], c2["rollback_failed"], c2["rollback_requested"]) == (1, 1, 2)
    assert st.devices[a].rollback == "failed" and "integrity" in (
        st.devices[a].rollback_reason or ""
    )


def test_rollback_failed_on_the_way_forward_is_a_final_failure() -> None:
    st = E.plan(spec(), fleet(6), ["cpu"], T0).state
    a = live(st)[0]
    st = E.handle(st, StatusReport(a, "1.0.1", "ROLLBACK_FAILED", "integrity"), T0 + 1).state
    dev = st.devices[a]
    assert dev.state == DevState.FAILED and dev.rollback == "failed" and dev.attempts == 1
    assert E.counts(st)["rollback_failed"] == 1


def test_approval_of_a_wave_that_was_not_planned_is_not_waited_for() -> None:
    s = spec(waves=(10.0, 50.0, 100.0), approval_waves=(2,))
    st = E.plan(s, fleet(2), ["cpu"], T0).state
    assert st.wave_sizes == (1, 1) and E.planned_waves(st) == [10.0, 50.0]
    for _ in range(2):
        st = E.handle(st, StatusReport(live(st)[0], "1.0.1", "COMMITTED"), T0 + 1).state
    assert st.phase == Phase.SUCCEEDED
    s = spec(waves=(10.0, 50.0, 100.0), approval_waves=(1,))
    st = E.plan(s, fleet(2), ["cpu"], T0).state
    st = E.handle(st, StatusReport(live(st)[0], "1.0.1", "COMMITTED"), T0 + 1).state
    assert st.phase == Phase.AWAITING_APPROVAL
    assert E.handle(st, Approve(), T0 + 2).state.phase == Phase.RUNNING
