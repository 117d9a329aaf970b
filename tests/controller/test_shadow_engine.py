"""The rollout engine's shadow phase (pure): dispatch in shadow, figures kept per device, the
wave judged once every device compared enough (or the timeout), promote or drop."""

from __future__ import annotations

from typing import Any

import pytest

from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.rollout_engine import (
    DeviceInfo,
    DevState,
    Dispatch,
    Phase,
    Revert,
    RolloutSpec,
    ShadowGates,
    ShadowReport,
    SpecError,
    StatusReport,
    Target,
    Tick,
)
from edgefleet.wire.shadow import ShadowCounts, ShadowFigures, parse_spec

T0 = 1_000_000.0


def spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {
        "rollout_id": "r1",
        "model": "digits",
        "version": "2.0.0",
        "target": Target(groups=("all",)),
        "waves": (50.0, 100.0),
        "device_timeout_s": 100.0,
        "max_retries": 0,
        "seed": 1,
        "shadow": ShadowGates(requests=10, min_agreement=0.9, max_p95_ratio=1.5, timeout_s=300),
    }
    base.update(kw)
    return RolloutSpec(**base)


def devices(n: int = 4) -> list[DeviceInfo]:
    return [DeviceInfo(f"d{i}", ("cpu",), ("all",), (), "1.0.0") for i in range(n)]


def figures(compared: int, agreed: int, s95: float = 1.0, c95: float = 1.1) -> dict[str, Any]:
    return ShadowFigures(
        window=1,
        total=ShadowCounts(compared, agreed),
        last=ShadowCounts(compared, agreed),
        serving_p95_ms=s95,
        candidate_p95_ms=c95,
    ).to_dict()


def start(sp: RolloutSpec) -> tuple[E.RolloutState, tuple[E.Action, ...]]:
    d = E.plan(sp, devices(), ["cpu"], T0)
    return d.state, d.actions


def wave_devices(state: E.RolloutState, wave: int) -> list[str]:
    return sorted(d.device_id for d in state.devices.values() if d.wave == wave)


def test_first_wave_is_dispatched_in_shadow_with_room_for_the_shadow() -> None:
    state, actions = start(spec())
    sent = [a for a in actions if isinstance(a, Dispatch)]
    assert len(sent) == 2 and all(a.shadow for a in sent)
    assert state.shadow_started_at == T0
    dev = state.devices[sent[0].device_id]
    assert dev.deadline == T0 + 100.0 + 300.0


def test_agreeing_wave_is_promoted_then_the_next_wave_shadows_again() -> None:
    state, _ = start(spec())
    w0 = wave_devices(state, 0)
    d = E.handle(state, ShadowReport(w0[0], "2.0.0", figures(12, 12)), T0 + 5)
    assert not [a for a in d.actions if isinstance(a, Dispatch)]  # the other is not there yet
    d = E.handle(d.state, ShadowReport(w0[1], "2.0.0", figures(10, 10)), T0 + 6)
    promoted = [a for a in d.actions if isinstance(a, Dispatch)]
    assert sorted(a.device_id for a in promoted) == w0 and not any(a.shadow for a in promoted)
    state = d.state
    assert state.shadow_passed == (0,)
    (verdict,) = state.shadow_waves
    assert verdict["verdict"] == "promoted" and verdict["compared"] == 22
    assert verdict["agreement"] == 1.0
    nxt: list[Dispatch] = []
    for dev in w0:  # the wave completes on its last report: the next one starts, in shadow
        d = E.handle(state, StatusReport(dev, "2.0.0", "COMMITTED"), T0 + 7)
        state = d.state
        nxt += [a for a in d.actions if isinstance(a, Dispatch)]
    assert sorted(a.device_id for a in nxt) == wave_devices(state, 1)
    assert all(a.shadow for a in nxt)
    assert state.shadow_started_at == T0 + 7


@pytest.mark.parametrize(
    ("agreed", "c95", "code"),
    [(5, 1.0, "shadow_disagreement"), (10, 2.0, "shadow_too_slow")],
)
def test_a_failing_wave_aborts_and_drops_the_candidate(agreed: int, c95: float, code: str) -> None:
    state, _ = start(spec())
    w0 = wave_devices(state, 0)
    for i, dev in enumerate(w0):
        state = E.handle(
            state, ShadowReport(dev, "2.0.0", figures(10, agreed, 1.0, c95)), T0 + i
        ).state
    assert state.phase == Phase.ABORTED
    assert state.reason is not None and state.reason.startswith(code)
    assert {state.devices[d].state for d in w0} == {DevState.FAILED}
    assert {state.devices[d].reason_code for d in w0} == {code}
    assert {d.state for d in state.devices.values() if d.wave == 1} == {DevState.SKIPPED}
    assert state.shadow_waves[-1]["verdict"] == code


def test_dropped_devices_are_pointed_back_at_their_serving_version() -> None:
    state, _ = start(spec())
    w0 = wave_devices(state, 0)
    d = E.handle(state, ShadowReport(w0[0], "2.0.0", figures(10, 0)), T0 + 1)
    d = E.handle(d.state, ShadowReport(w0[1], "2.0.0", figures(10, 0)), T0 + 2)
    reverts = [a for a in d.actions if isinstance(a, Revert)]
    assert sorted(a.device_id for a in reverts) == w0
    assert {a.previous_version for a in reverts} == {"1.0.0"}


def test_timeout_judges_what_came_and_no_traffic_is_a_failure() -> None:
    state, _ = start(spec())
    w0 = wave_devices(state, 0)
    state = E.handle(state, ShadowReport(w0[0], "2.0.0", figures(3, 3)), T0 + 1).state
    assert E.handle(state, Tick(), T0 + 299).state.phase == Phase.RUNNING
    d = E.handle(state, Tick(), T0 + 300)
    assert d.state.shadow_passed == (0,)  # 3/3 agreed: promoted on what came
    assert d.state.shadow_waves[-1]["timed_out"] is True
    state, _ = start(spec())
    d = E.handle(state, Tick(), T0 + 301)
    assert d.state.phase == Phase.ABORTED
    assert d.state.reason is not None and d.state.reason.startswith("shadow_no_traffic")


def test_reports_of_another_version_or_rollout_are_ignored() -> None:
    state, _ = start(spec())
    w0 = wave_devices(state, 0)
    for ev in (
        ShadowReport(w0[0], "1.9.0", figures(10, 0)),
        ShadowReport(w0[0], "2.0.0", figures(10, 0), rollout_id="other"),
        ShadowReport("stranger", "2.0.0", figures(10, 0)),
    ):
        state = E.handle(state, ev, T0 + 1).state
    assert all(d.shadow is None for d in state.devices.values())


def test_worst_device_ratio_and_pooled_agreement() -> None:
    gates = ShadowGates(requests=1, min_agreement=0.9, max_p95_ratio=1.5)
    code, out = E.shadow_verdict(gates, [figures(100, 100, 1.0, 1.0), figures(10, 5, 1.0, 1.6)])
    assert out["agreement"] == round(105 / 110, 6) and out["p95_ratio"] == 1.6
    assert code == "shadow_too_slow"


def test_spec_checks_and_codec_round_trip() -> None:
    with pytest.raises(SpecError):
        E.validate_spec(spec(shadow=ShadowGates(min_agreement=1.5)))
    with pytest.raises(SpecError):
        E.validate_spec(spec(shadow=ShadowGates(sample=0.0)))
    sp = spec()
    assert E.spec_from_dict(E.spec_to_dict(sp)) == sp
    assert parse_spec(E.device_shadow(sp.shadow)) is not None  # type: ignore[arg-type]
    state, _ = start(sp)
    w0 = wave_devices(state, 0)
    state = E.handle(state, ShadowReport(w0[0], "2.0.0", figures(3, 3)), T0 + 1).state
    back = E.state_from_parts(
        sp,
        E.header_to_dict(state),
        [E.device_from_dict(E.device_to_dict(d)) for d in state.devices.values()],
    )
    assert back.devices == state.devices and back.shadow_started_at == state.shadow_started_at
