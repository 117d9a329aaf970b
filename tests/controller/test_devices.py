"""Inventory helpers: status seq de-duplication, presence."""

from __future__ import annotations

from pathlib import Path

from edgefleet.cloud_controller import db, devices
from edgefleet.cloud_controller.devices import accept_seq


def test_accept_seq_drops_repeats_but_takes_late_reports() -> None:
    ok, top, recent = accept_seq(None, [], 5)
    assert ok and top == 5 and recent == [5]
    ok, top, recent = accept_seq(top, recent, 7)
    assert ok and top == 7 and recent == [5, 7]
    ok, top, recent = accept_seq(top, recent, 6)  # re-sent after a reconnect, never seen
    assert ok and top == 7 and recent == [5, 6, 7]
    assert accept_seq(top, recent, 6)[0] is False  # a repeat
    assert accept_seq(top, recent, 7)[0] is False
    ok, top, recent = accept_seq(top, recent, 500, window=128)
    assert ok and recent == [500]  # the window moves on
    assert accept_seq(top, recent, 300, window=128)[0] is False  # older than the window
    assert accept_seq(top, recent, 400, window=128)[0] is True


def test_presence_and_offline_will(tmp_path: Path) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    db.upgrade(engine)
    f = db.session_factory(engine)
    with db.transaction(f) as s:
        devices.apply_presence(
            s, "gw", {"online": True, "agent_version": "1.2.3", "profiles": ["cpu-arm64"],
                      "execution_providers": ["CPUExecutionProvider"], "hardware": {"arch": "arm64"},
                      "installed": {"iris": {"version": "1.0.0"}}},
        )  # fmt: skip
    with db.transaction(f) as s:
        devices.apply_presence(s, "gw", {"device_id": "gw", "online": False})
    with f() as s:
        d = devices.list_devices(s)[0]
        out = devices.to_dict(d)
    assert out["online"] is False and out["agent_version"] == "1.2.3"  # the will keeps inventory
    assert out["profiles"] == ["cpu-arm64"] and out["installed"]["iris"]["version"] == "1.0.0"
    assert out["last_seen"] and out["last_seen"].endswith("+00:00")
    infos = devices.device_infos(f(), "iris")
    assert infos[0].previous_version == "1.0.0" and infos[0].profiles == ("cpu-arm64",)
    engine.dispose()


def test_new_device_seen_twice_in_one_batch_is_one_row(tmp_path: Path) -> None:
    """The MQTT bridge handles a batch in one transaction with autoflush off: a brand-new
    device's presence and status in the same batch must not insert it twice (the commit
    would fail and lose messages the broker already acknowledged)."""
    engine = db.make_engine(f"sqlite:///{tmp_path / 'd.db'}")
    db.upgrade(engine)
    f = db.session_factory(engine)
    with db.transaction(f) as s, s.no_autoflush:
        devices.apply_presence(s, "gw-new", {"online": True, "agent_version": "0.1.0"})
        assert devices.get_or_create(s, "gw-new") is devices.get_or_create(s, "gw-new")
        devices.apply_presence(s, "gw-new", {"online": True, "agent_version": "0.1.1"})
    with f() as s:
        rows = devices.list_devices(s)
        assert [d.id for d in rows] == ["gw-new"]
        assert rows[0].agent_version == "0.1.1"
