"""End to end on the shared fleet: an operator aborts the rollout of a brand-new model after
some devices committed it. Even with `on_abort: rollback` the devices that committed the first
install keep serving it (there is no previous version to go back to, and removal was not asked
for). Only a rollout created with `remove_first_installs` puts the model in those devices'
signed `remove` list; the agents then uninstall it and report REMOVED, and every rollback is
confirmed."""

from __future__ import annotations

import urllib.error
import urllib.request

from edgefleet.demo.fleet import Fleet
from edgefleet.demo.rollouts import rollout_body
from edgefleet.demo.spec import MODEL_NAME
from edgefleet.keys import KeyPair, key_id, load_public_key
from tests.support.packages import make_package

NEW_MODEL = "fresh"


def http_status(fleet: Fleet, device_id: str, model: str) -> int:
    url = f"http://127.0.0.1:{fleet.agent_ports[device_id]}/v2/models/{model}"
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_abort_keeps_a_healthy_first_install_and_removes_it_only_when_asked(
    fleet: Fleet,
) -> None:
    assert fleet.api is not None
    pub = fleet.keys["packager_pub"]
    key = KeyPair(key_id(load_public_key(pub)), fleet.keys["packager_key"], pub)
    pkg = make_package(fleet.root / "fresh-pkg", name=NEW_MODEL, version="1.0.0", key=key)
    fleet.upload(pkg)
    ids = fleet.spec.device_ids()
    assert set(fleet.installed(NEW_MODEL).values()) == {None}
    iris_before = fleet.installed()

    # 1. on_abort rollback, no removal asked for: the first install stays where it serves
    body = rollout_body("1.0.0", ids, waves=[40.0, 100.0], approval_waves=[1])
    assert body["on_abort"] == "rollback"
    rid = fleet.create_rollout({**body, "model": NEW_MODEL})
    waiting = fleet.wait_rollout(rid, timeout=90, until=lambda d: d["phase"] == "awaiting_approval")
    kept = sorted(d["device_id"] for d in waiting["devices"] if d["state"] == "succeeded")
    assert len(kept) == 2, waiting["counts"]
    assert all(d["previous_version"] is None for d in waiting["devices"] if d["wave"] >= 0)
    assert {d: http_status(fleet, d, NEW_MODEL) for d in kept} == dict.fromkeys(kept, 200)
    fleet.api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "operator"})
    detail = fleet.wait_rollout(rid, timeout=60)
    assert detail["phase"] == "aborted", detail
    assert detail["counts"]["rollback_requested"] == 0
    messages = [e["message"] for e in detail["events"]]
    assert sum("keeps 1.0.0 (a first install is not removed)" in m for m in messages) == 2
    for dev in kept:
        desired = fleet.api.call("GET", f"/api/v1/devices/{dev}")["desired"]
        assert not desired["remove"] and desired["models"][NEW_MODEL]["version"] == "1.0.0"
        assert http_status(fleet, dev, NEW_MODEL) == 200  # its clients never noticed
    # the devices that never got it have nothing of it desired, and nothing installed
    rest = [d for d in ids if d not in kept]
    assert all(fleet.installed(NEW_MODEL)[d] is None for d in rest)

    # 2. removal asked for explicitly: committed first installs are uninstalled and confirmed
    body = rollout_body(
        "1.0.0", rest, waves=[30.0, 100.0], approval_waves=[1], remove_first_installs=True
    )
    rid = fleet.create_rollout({**body, "model": NEW_MODEL})
    waiting = fleet.wait_rollout(rid, timeout=90, until=lambda d: d["phase"] == "awaiting_approval")
    committed = sorted(d["device_id"] for d in waiting["devices"] if d["state"] == "succeeded")
    assert len(committed) == 1, waiting["counts"]
    fleet.api.call("POST", f"/api/v1/rollouts/{rid}/abort", {"reason": "operator"})
    detail = fleet.wait_rollout(rid, timeout=60)  # terminal, every rollback confirmed
    assert detail["phase"] == "aborted", detail
    assert detail["counts"]["rollback_requested"] == detail["counts"]["rolled_back"] == 1
    devices = fleet.devices()
    for dev in committed:
        status = devices[dev]["last_status"]
        assert status["model"] == NEW_MODEL and status["state"] == "REMOVED", status
        assert status["rollout_id"] == rid and status["version"] == "1.0.0", status
        desired = fleet.api.call("GET", f"/api/v1/devices/{dev}")["desired"]
        assert desired["remove"] == [NEW_MODEL] and NEW_MODEL not in desired["models"], desired
        assert http_status(fleet, dev, NEW_MODEL) == 404
        assert not (fleet.agent_dir(dev) / "data" / "models" / NEW_MODEL).exists()
    assert all(http_status(fleet, d, NEW_MODEL) == 200 for d in kept)
    # The other model is untouched everywhere.
    assert fleet.installed() == iris_before
    # (run alone, the shared fleet may not serve it yet: then there is nothing to compare)
    assert all(http_status(fleet, d, MODEL_NAME) == 200 for d in ids if iris_before[d])
    messages = [e["message"] for e in fleet.rollout(rid)["events"]]
    assert sum("removed (it had no previous version)" in m for m in messages) == 1, messages
