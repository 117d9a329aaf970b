"""Downgrade by replay after the device loses its link state, on a real agent, a real Mosquitto
and real packages: the installed versions themselves hold the line, and the loss is reported."""

from __future__ import annotations

import json
import time
from typing import Any

from edgefleet.agent.mqtt.state import SEQ_FILE
from edgefleet.wire.mqtt import topic
from tests.fleet.conftest import Keys, Observer, Pkg, desired_state, model_entry, signed
from tests.fleet.test_mqtt_link import Device, committed, device

__all__ = ["device"]


def _rejected(obs: Observer, dev: str, code: str) -> list[dict[str, Any]]:
    return [s for s in obs.of(dev, "status") if s.get("reason_code") == code]


def _serving(device: Device) -> str:
    return str(device.agent.inventory()["models"]["iris"]["version"])


def test_replayed_revert_state_cannot_downgrade_after_link_state_is_lost(
    device: Device, observer: Observer, iris_packages: dict[str, Pkg], fleet_keys: Keys
) -> None:
    desired = topic(device.id, "desired")
    p1, p2 = iris_packages["1.0.0"], iris_packages["1.1.0"]
    device.start_link()
    observer.publish(
        desired,
        signed(
            desired_state(device.id, 10, {"iris": model_entry(p1, "1.0.0")}), fleet_keys.controller
        ),
    )
    assert observer.wait(lambda: committed(observer, device.id, "1.0.0"), 60)
    # A revert to 1.0.0, signed and valid for 7 days: captured by an attacker, never needed.
    revert = desired_state(
        device.id, 11, {"iris": model_entry(p1, "1.0.0", allow_downgrade=True)}, ttl_s=7 * 86400
    )
    revert_bytes = signed(revert, fleet_keys.controller)
    time.sleep(1.1)  # the install of 1.1.0 is strictly later than the revert's issue time
    observer.publish(
        desired,
        signed(
            desired_state(device.id, 12, {"iris": model_entry(p2, "1.1.0")}), fleet_keys.controller
        ),
    )
    assert observer.wait(lambda: committed(observer, device.id, "1.1.0"), 60)

    # The device loses its link state (both copies); the retained state is cleared too, so the
    # replayed revert is the only state it ever sees.
    device.link.stop()
    observer.publish(desired, b"")
    mqtt_dir = device.config.data_dir / "mqtt"
    (mqtt_dir / "link.json").unlink()
    (device.config.data_dir / SEQ_FILE).unlink()
    device.new_link()
    device.start_link()
    assert observer.wait(lambda: bool(_rejected(observer, device.id, "link_state_lost")), 15)
    (lost,) = _rejected(observer, device.id, "link_state_lost")
    assert lost["figures"]["seq_lost"] is True and "missing" in lost["reason"]

    n_updates = len(device.agent.updates())
    observer.publish(desired, revert_bytes)
    assert observer.wait(lambda: bool(_rejected(observer, device.id, "replayed")), 15)
    (replayed,) = _rejected(observer, device.id, "replayed")
    assert replayed["desired_seq"] == 11 and "before 1.1.0 started serving" in replayed["reason"]
    assert replayed["figures"] == {"model": "iris", "version": "1.0.0"}
    time.sleep(1.0)
    assert _serving(device) == "1.1.0"
    assert len(device.agent.updates()) == n_updates, "the replayed revert started an update"

    # A genuine rollback, issued after 1.1.0 was installed, still works.
    genuine = desired_state(device.id, 13, {"iris": model_entry(p1, "1.0.0", allow_downgrade=True)})
    observer.publish(desired, signed(genuine, fleet_keys.controller))
    assert observer.wait(
        lambda: any(
            s.get("desired_seq") == 13 and s.get("state") == "COMMITTED"
            for s in observer.of(device.id, "status")
        ),
        60,
    )
    assert _serving(device) == "1.0.0"


def test_corrupt_link_state_is_recovered_from_its_copy_and_reported(
    device: Device, observer: Observer, iris_packages: dict[str, Pkg], fleet_keys: Keys
) -> None:
    desired = topic(device.id, "desired")
    p1 = iris_packages["1.0.0"]
    device.start_link()
    first = signed(
        desired_state(device.id, 20, {"iris": model_entry(p1, "1.0.0")}), fleet_keys.controller
    )
    observer.publish(desired, first)
    assert observer.wait(lambda: committed(observer, device.id, "1.0.0"), 60)
    device.link.stop()
    (device.config.data_dir / "mqtt" / "link.json").write_text('{"last_seq": ')
    device.new_link()
    assert device.link.desired.state.last_seq == 20  # not reset to nothing
    device.start_link()
    assert observer.wait(lambda: bool(_rejected(observer, device.id, "link_state_lost")), 15)
    (lost,) = _rejected(observer, device.id, "link_state_lost")
    assert "corrupt" in lost["reason"] and lost["figures"]["last_seq"] == 20
    # an older state (a replay, or a controller restored from an old backup) is reported
    older = desired_state(device.id, 15, {"iris": model_entry(p1, "1.0.0")})
    observer.publish(desired, signed(older, fleet_keys.controller))
    assert observer.wait(lambda: bool(_rejected(observer, device.id, "seq_regressed")), 15)
    (back,) = _rejected(observer, device.id, "seq_regressed")
    assert back["figures"] == {"last_seq": 20, "received_seq": 15}
    assert json.loads((device.config.data_dir / SEQ_FILE).read_text())["last_seq"] == 20
