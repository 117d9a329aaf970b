"""Properties of the engine under random event sequences (Hypothesis)."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.cloud_controller import rollout_engine as E

AGENT_STATES = [
    "DOWNLOADING",
    "VALIDATING",
    "COMMITTED",
    "FAILED",
    "ROLLED_BACK",
    "ROLLBACK_FAILED",
]
REASONS = [None, "download_failed", "validation_error", "signature_invalid"]


def fleet(n: int) -> list[E.DeviceInfo]:
    out = [E.DeviceInfo(f"d{i:02d}", ("cpu",), ("g",), (), "1.0.0") for i in range(n)]
    return [*out, E.DeviceInfo("npu", ("npu",), ("g",), (), "1.0.0")]


events = st.one_of(
    st.builds(
        lambda i, s, r, v: E.StatusReport(f"d{i:02d}", v, s, r),
        st.integers(0, 11),
        st.sampled_from(AGENT_STATES),
        st.sampled_from(REASONS),
        st.sampled_from(["2.0.0", "2.0.0", "1.0.0"]),
    ),
    st.builds(E.Tick, st.one_of(st.none(), st.builds(E.Health, st.floats(0.5, 3.0)))),
    st.just(E.Approve()),
    st.just(E.Pause()),
    st.just(E.Resume()),
    st.builds(E.Cancel, st.booleans()),
    st.just(E.Abort()),
)

# fmt: off
specs = st.builds(
    lambda waves, retries, thr, pct, mn, appr, rate, soak, seed, mode: E.RolloutSpec(
        "r",
        "iris",
        "2.0.0",
        E.Target(groups=("g",)),
        waves=waves,
        device_timeout_s=30,
        max_retries=retries,
        retry_backoff_s=5,
        success_threshold_pct=thr,
        abort_failure_pct=pct,
        abort_min_finished=mn,
        approval_waves=appr,
        rate_per_min=rate,
        soak_s=soak,
        gates=E.Gates(max_p95_ratio=2.0),
        seed=seed,
        on_abort=mode,
    ),
    st.sampled_from([(100.0,), (25.0, 100.0), (10.0, 50.0, 100.0)]),
    st.integers(0, 2),
    st.sampled_from([0.0, 50.0, 100.0]),
    st.sampled_from([0.0, 30.0, 100.0]),
    st.one_of(st.none(), st.integers(1, 4)),
    st.sampled_from([(), (1,)]),
    st.sampled_from([None, 2, 5]),
    st.sampled_from([0.0, 20.0]),
    st.integers(0, 1000),
    st.sampled_from(["halt", "rollback"]),
)
# fmt: on


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=specs,
    n=st.integers(1, 12),
    steps=st.lists(st.tuples(events, st.floats(0, 40)), max_size=60),
)
def test_invariants_hold_for_any_event_sequence(
    spec: E.RolloutSpec, n: int, steps: list[tuple[E.Event, float]]
) -> None:
    if spec.approval_waves and len(spec.waves) < 2:
        spec = E.RolloutSpec(**{**spec.__dict__, "approval_waves": ()})
    now = 1000.0
    d = E.plan(spec, fleet(n), ["cpu"], now)
    state = d.state
    dispatches: Counter[str] = Counter(a.device_id for a in d.actions if isinstance(a, E.Dispatch))
    reverts: Counter[str] = Counter()
    ended_at_step: int | None = None
    rolled = False
    for k, (ev, dt) in enumerate(steps):
        now += dt
        before = state
        snapshot = dict(before.devices)
        d = E.handle(state, ev, now)
        state = d.state
        # the state given is never written, and the decision names every device it moved
        assert before.devices == snapshot
        assert d.changed == {k for k, v in state.devices.items() if snapshot[k] is not v}
        for a in d.actions:
            if isinstance(a, E.Dispatch):
                dispatches[a.device_id] += 1
                # never after the end, never an incompatible device, never a later wave early
                assert before.phase not in E.TERMINAL_PHASES
                assert a.device_id != "npu"
                assert state.devices[a.device_id].wave <= state.wave
            if isinstance(a, E.Revert):
                reverts[a.device_id] += 1
                assert a.previous_version == "1.0.0"
        if state.phase in E.TERMINAL_PHASES and ended_at_step is None:
            ended_at_step = k
            if isinstance(ev, E.Cancel):
                rolled = ev.rollback
            elif isinstance(ev, E.Abort):
                rolled = (ev.on_abort or spec.on_abort) == "rollback"
            else:
                rolled = state.phase == E.Phase.ABORTED and spec.on_abort == "rollback"
        # the incremental tally always equals a fresh count
        assert state.tally == E.tally_of(state.devices)
        assert state.rollbacks == E.rollbacks_of(state.devices)
        # counts always add up, and waves match the plan
        c = E.counts(state)
        assert sum(c["states"].values()) == n + 1
        assert c["states"].get("incompatible") == 1
        assert [w["size"] for w in c["waves"]] == list(state.wave_sizes)
        assert sum(state.wave_sizes) == n
        # a terminal rollout stays terminal, with the same phase
        if before.phase in E.TERMINAL_PHASES:
            assert state.phase == before.phase
        # no device is in flight or pending once it ended
        if state.phase in E.TERMINAL_PHASES:
            live = {E.DevState.PENDING, E.DevState.WAITING_RETRY}
            if rolled:
                live.add(E.DevState.IN_PROGRESS)  # a halt or plain cancel follows devices at work
            assert not any(dv.state in live for dv in state.devices.values())
        # earlier waves are finished before a later one gets devices
        for dv in state.devices.values():
            if dv.wave >= 0 and dv.wave < state.wave:
                assert dv.state in E.FINISHED or dv.state == E.DevState.SKIPPED
    for dev, k in dispatches.items():
        assert k <= 1 + spec.max_retries
        assert state.devices[dev].attempts == k
    # a device is reverted once (again only when its way back failed transiently), and only
    # if the rollout ended: with a rollback, exactly the moved devices; with a halt, only
    # devices that do not run the release
    assert all(k <= 1 + max(1, spec.max_retries) for k in reverts.values())
    if reverts:
        assert state.phase in (E.Phase.ABORTED, E.Phase.CANCELLED)
        back = {
            dv.device_id for dv in state.devices.values() if dv.rollback in ("requested", "done")
        }
        assert back <= set(reverts)
        for d in set(reverts) - back:  # withdrawn: it does not run the release
            dv = state.devices[d]
            assert dv.state != E.DevState.SUCCEEDED or dv.rollback == "failed"
