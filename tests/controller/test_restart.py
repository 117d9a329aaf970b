"""A controller restarted mid-rollout resumes with exact counts (SQLite file and PostgreSQL).

Devices report while the controller is down; the broker keeps those QoS 1 messages for the
controller's persistent session, and the restarted controller carries on from the database.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.models import DesiredState
from edgefleet.keys import KeyPair
from tests.controller.conftest import start_controller, wait_for
from tests.controller.simdevice import SimDevice
from tests.controller.test_api import upload
from tests.support.services import Mosquitto


def snapshot(ctl: Any, rid: str) -> tuple[str, dict[str, Any], dict[str, E.DeviceProgress]]:
    st = ctl.rollouts.get_state(rid)
    assert st is not None
    return st.phase.value, E.counts(st), dict(st.devices)


def test_restart_mid_rollout_resumes_with_exact_counts(
    db_url: str,
    tmp_path: Path,
    broker: Mosquitto,
    packager_key: KeyPair,
    packages: dict[str, Path],
) -> None:
    data = tmp_path / "ctl"
    client_id = f"ctl-restart-{uuid.uuid4().hex[:6]}"
    common: dict[str, Any] = {
        "trusted": [packager_key.public_path],
        "broker_url": broker.url,
        "db_url": db_url,
        "client_id": client_id,
    }
    a = start_controller(data, **common)
    ids = [f"rs-{client_id[-6:]}-{i}" for i in range(6)]  # retained states differ per run
    key = a.controller.signer.key.public_key()
    devs = [SimDevice(i, broker.host, broker.port, key, hold=True).start() for i in ids]
    try:
        with a.client() as admin:
            for p in packages.values():
                assert upload(admin, p).status_code == 201
            wait_for(
                lambda: set(ids) <= {d["device_id"] for d in admin.get("/api/v1/devices").json()},
                what="presence of every device",
            )
            r = admin.post(
                "/api/v1/rollouts",
                json={
                    "model": "iris",
                    "version": "2.0.0",
                    "target": {"device_ids": ids},
                    "waves": [50, 100],
                    "device_timeout_s": 120,
                    "seed": 1,
                },
            )
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
        wait_for(lambda: sum(len(d.held) for d in devs) == 3, what="wave 1 desired states")
        phase, counts, before = snapshot(a.controller, rid)
        assert phase == "running" and counts["states"] == {"in_progress": 3, "pending": 3}
        with a.controller.factory() as s:
            seqs = {i: (row.seq if (row := s.get(DesiredState, i)) else 0) for i in ids}
        a.stop()
        # devices act while the controller is down
        first = [d for d in devs if d.held]
        for d in first:
            assert d.release() == 1
        for d in devs:
            d.hold = True

        loaded: dict[str, Any] = {}

        def check_loaded(ctl: Any) -> None:
            loaded["snap"] = snapshot(ctl, rid)

        b = start_controller(data, before_start=check_loaded, **common)
        try:
            assert loaded["snap"] == (phase, counts, before)  # exactly what A had
            st = wait_for(
                lambda: (x := snapshot(b.controller, rid))[1]["states"].get("succeeded") == 3 and x,
                what="statuses sent during the outage",
            )
            assert st[1]["states"] == {"succeeded": 3, "in_progress": 3}
            wait_for(lambda: sum(len(d.held) for d in devs) == 3, what="wave 2 desired states")
            for d in devs:
                d.release()
            done = wait_for(
                lambda: (x := snapshot(b.controller, rid))[0] == "succeeded" and x,
                what="rollout end after restart",
            )
            assert done[1]["states"] == {"succeeded": 6}
            assert all(d.version == "2.0.0" and not d.rejected for d in devs)
            with b.controller.factory() as s:
                after = {i: row.seq for i in ids if (row := s.get(DesiredState, i))}
            # one dispatch per device in all: wave 1 before the restart, wave 2 after it
            assert sorted(seqs.values()) == [0, 0, 0, 1, 1, 1] and set(after.values()) == {1}
            # the same controller key signed before and after the restart
            assert b.controller.signer.key.public_key().public_numbers() == key.public_numbers()
        finally:
            b.stop()
    finally:
        for d in devs:
            d.stop()
