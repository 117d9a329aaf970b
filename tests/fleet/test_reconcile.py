"""The pure reconciliation planner: desired state + what runs -> actions."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.agent.mqtt.reconcile import (
    DesiredStateError,
    parse_removals,
    parse_targets,
    plan,
    plan_removals,
)


def _desired(**models: dict[str, object]) -> dict[str, object]:
    return {"device_id": "d1", "seq": 3, "models": models}


def _spec(version: str, **kw: object) -> dict[str, object]:
    return {"version": version, "url": f"http://h/{version}", "sha256": "AB" * 32, **kw}


def test_parse_targets_sorted_and_normalised() -> None:
    targets = parse_targets(
        _desired(b=_spec("1.0.0", rollout_id=7, allow_downgrade=True), a=_spec("2.0.0", size=10))
    )
    assert [t.name for t in targets] == ["a", "b"]
    assert targets[0].size == 10 and targets[0].sha256 == "ab" * 32
    assert targets[1].rollout_id == "7" and targets[1].allow_downgrade


@pytest.mark.parametrize(
    "models, reason",
    [
        ({"m": "x"}, "not an object"),
        ({"m": {"version": "1.0.0", "sha256": "a"}}, "'url'"),
        ({"m": {"version": "", "url": "u", "sha256": "a"}}, "'version'"),
    ],
)
def test_parse_targets_names_what_is_wrong(models: dict[str, object], reason: str) -> None:
    with pytest.raises(DesiredStateError, match=reason):
        parse_targets({"models": models})


def test_models_not_an_object() -> None:
    with pytest.raises(DesiredStateError, match="not an object"):
        parse_targets({"models": []})


def test_plan_install_update_rollback_and_already() -> None:
    targets = parse_targets(
        _desired(
            new=_spec("1.0.0"),
            up=_spec("2.0.0"),
            back=_spec("1.0.0", allow_downgrade=True),
            same=_spec("3.0.0"),
            busy=_spec("4.0.0"),
        )
    )
    installed = {"up": "1.0.0", "back": "2.0.0", "same": "3.0.0", "busy": "3.0.0"}
    actions = {a.target.name: a for a in plan(targets, installed, {"busy": "4.0.0"})}
    assert "busy" not in actions  # an update to that version is already running
    assert actions["same"].kind == "report" and "already serving" in actions["same"].reason
    assert actions["new"].kind == "install" and actions["new"].reason == "install new 1.0.0"
    assert actions["up"].reason == "update up 1.0.0 -> 2.0.0"
    assert actions["back"].reason == "roll back back 2.0.0 -> 1.0.0"


def test_plan_in_flight_other_version_still_installs() -> None:
    targets = parse_targets(_desired(m=_spec("1.0.0", allow_downgrade=True)))
    (action,) = plan(targets, {"m": "2.0.0"}, {"m": "3.0.0"})
    assert action.kind == "install"


def test_link_state_round_trips_and_survives_a_corrupt_file(tmp_path: Path) -> None:
    from edgefleet.agent.mqtt.state import LinkState

    path = tmp_path / "mqtt" / "link.json"
    assert LinkState.load(path).last_seq is None
    state = LinkState(last_seq=7, rollouts={f"m@1.0.{i}": str(i) for i in range(100)})
    state.save(path)
    back = LinkState.load(path)
    assert back.last_seq == 7
    assert len(back.rollouts) == 64 and back.rollouts["m@1.0.99"] == "99"  # newest kept
    assert back.problem is None
    # corrupt: not silently reset; the seq comes back from the redundant copy, and the load
    # says what it found; the corrupt file is kept aside
    path.write_text("{not json")
    back = LinkState.load(path)
    assert back.last_seq == 7 and back.problem and "corrupt" in back.problem
    assert not back.seq_lost and list(path.parent.glob("link.json.corrupt-*"))
    # both copies gone on a device that has acted before: lost, and said so
    LinkState.seq_path(path).write_text('{"last_seq": "x"}')
    back = LinkState.load(path, expected=True)
    assert back.last_seq is None and back.seq_lost and back.problem
    # a new device has neither file: nothing to report
    assert LinkState.load(tmp_path / "new" / "mqtt" / "link.json").problem is None


def test_parse_removals_absent_means_none() -> None:
    assert parse_removals(_desired(a=_spec("1.0.0"))) == []
    assert parse_removals({"models": {}, "remove": ["b", "a", "b"]}) == ["a", "b"]


@pytest.mark.parametrize(
    "desired, reason",
    [
        ({"models": {}, "remove": "a"}, "not a list"),
        ({"models": {}, "remove": [1]}, "not a list"),
        ({"models": {"a": _spec("1.0.0")}, "remove": ["a"]}, "both installs and removes"),
    ],
)
def test_parse_removals_names_what_is_wrong(desired: dict[str, object], reason: str) -> None:
    with pytest.raises(DesiredStateError, match=reason):
        parse_removals(desired)


def test_plan_removals_explicit_only_and_once() -> None:
    installed = {"fraud": "1.0.0", "local": "0.1.0"}
    # `local` is absent from the desired state but not named in `remove`: left alone.
    assert plan_removals(["fraud"], installed, {}, confirmed=[]) == ["fraud"]
    # An update of the model in flight: the removal queues behind it.
    assert plan_removals(["iris"], {}, {"iris": "2.0.0"}, confirmed=["iris"]) == ["iris"]
    # Never installed here and not confirmed yet: removed once (a no-op reporting REMOVED)...
    assert plan_removals(["iris"], {}, {}, confirmed=[]) == ["iris"]
    # ...and not again once confirmed, while it is neither installed nor in flight.
    assert plan_removals(["iris"], {}, {}, confirmed=["iris"]) == []
    assert plan_removals(["iris"], {"iris": "2.0.0"}, {}, confirmed=["iris"]) == ["iris"]
    assert plan_removals([], installed, {}, confirmed=[]) == []
