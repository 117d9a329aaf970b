"""A release that is slower in the field aborts on its latency gate and rolls back.

Real controller (uvicorn, SQLite), real Mosquitto, the controller's MQTT bridge feeding the
drift ingest; simulated devices on the real MQTT wire that also publish telemetry: the old
version answers in ~2 ms, the new one in ~6 ms.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edgefleet.cloud_controller.models import DesiredState
from edgefleet.drift.latency import histogram
from edgefleet.keys import KeyPair, generate_keypair
from edgefleet.wire.mqtt import topic
from tests.controller.conftest import Running, start_controller, wait_for
from tests.controller.simdevice import SimDevice
from tests.controller.test_api import upload
from tests.support.services import Mosquitto

MEDIAN_MS = {"1.0.0": 2.0, "2.0.0": 6.0}
_ids = itertools.count(1)


class TelemetryDevice(SimDevice):
    """A SimDevice that reports inference telemetry of the version it runs."""

    def telemetry(self) -> None:
        rng = np.random.default_rng(abs(hash(self.device_id)) % 2**32)
        lat = rng.lognormal(np.log(MEDIAN_MS[str(self.version)]), 0.2, 300)
        at = datetime.now(UTC).isoformat()
        rec = {
            "id": next(_ids),
            "at": at,
            "kind": "inference",
            "model": "iris",
            "version": self.version,
            "window_start": at,
            "window_end": at,
            "requests": 300,
            "errors": 0,
            "latency_hist": histogram(lat),
            "latency_ms": {"p95": float(np.quantile(lat, 0.95))},
        }
        body = {"device_id": self.device_id, "records": [rec]}
        self.client.publish(topic(self.device_id, "telemetry"), json.dumps(body), qos=1)

    def _act(self, entry: dict[str, Any]) -> None:
        super()._act(entry)
        self.telemetry()


@pytest.fixture
def ctl(tmp_path: Path, broker: Mosquitto) -> Iterator[tuple[Running, KeyPair]]:
    from tests.support.packages import make_package

    key = generate_keypair(tmp_path / "keys", "packager")
    run = start_controller(tmp_path / "ctl", trusted=[key.public_path], broker_url=broker.url)
    try:
        assert run.controller.bridge is not None and run.controller.bridge.wait_connected()
        with run.client("publisher") as pub:
            for v in ("1.0.0", "2.0.0"):
                pkg = make_package(tmp_path / "pkgs", name="iris", version=v, key=key)
                assert upload(pub, pkg).status_code == 201
        yield run, key
    finally:
        run.stop()


def test_slower_release_aborts_on_the_p95_gate_and_rolls_back(
    ctl: tuple[Running, KeyPair], broker: Mosquitto
) -> None:
    run, _ = ctl
    ids = [f"gate-{i}" for i in range(4)]
    key = run.controller.signer.key.public_key()
    devs = [TelemetryDevice(d, broker.host, broker.port, key).start() for d in ids]
    try:
        from edgefleet.cloud_controller.models import Device

        def known() -> bool:
            with run.controller.factory() as s:
                return all((d := s.get(Device, i)) is not None and d.online for i in ids)

        wait_for(known, what="presence of every device")
        for d in devs:  # the old version's field latency: the baseline
            d.telemetry()

        def baseline() -> bool:
            from edgefleet.cloud_controller.drift.health import figures

            with run.controller.factory() as s:
                return figures(s, "iris", "1.0.0", ids, None).requests == 1200

        wait_for(baseline, what="baseline telemetry ingested")
        with run.client("operator") as op:
            r = op.post(
                "/api/v1/rollouts",
                json={
                    "model": "iris",
                    "version": "2.0.0",
                    "target": {"device_ids": ids},
                    "waves": [50, 100],
                    "device_timeout_s": 30,
                    "soak_s": 4,
                    "gates": {"max_p95_ratio": 1.5, "max_error_rate": 0.05},
                    "on_abort": "rollback",  # put the moved devices back (default: halt)
                    "seed": 1,
                },
            )
            assert r.status_code == 201, r.text
            rid = r.json()["id"]

        def finished() -> dict[str, Any] | None:
            with run.client("viewer") as v:
                doc = v.get(f"/api/v1/rollouts/{rid}").json()
            return doc if doc["phase"] in ("succeeded", "aborted", "cancelled") else None

        done = wait_for(finished, timeout=40, what="rollout to finish")
        assert done["phase"] == "aborted", done
        assert "health gate: p95 latency ratio" in str(done["reason"])
        moved = [d["device_id"] for d in done["devices"] if d["state"] == "succeeded"]
        assert len(moved) == 2  # only the first wave moved
        assert all(d["state"] == "skipped" for d in done["devices"] if d["device_id"] not in moved)
        wait_for(lambda: all(d.version == "1.0.0" for d in devs), what="rollback on devices")
        with run.controller.factory() as s:
            for i in ids:
                row = s.get(DesiredState, i)
                assert row is None or row.models["iris"]["version"] == "1.0.0"
        with run.client("viewer") as v:
            h = v.get(
                "/api/v1/drift/iris/health",
                params={
                    "version": "2.0.0",
                    "previous": "1.0.0",
                    "devices": ",".join(moved),
                },
            ).json()
        assert h["p95_ratio"] > 2.0
        page = httpx.get(
            f"{run.url}/dashboard/rollouts",
            headers={"Authorization": f"Bearer {run.tokens['viewer']}"},
            timeout=30,
        )
        assert page.status_code == 200
        assert 'class="badge aborted"' in page.text and "p95 latency ratio" in page.text
        assert "wave 1: 50 %" in page.text and "2/2" in page.text
        fleet = httpx.get(
            f"{run.url}/dashboard/",
            headers={"Authorization": f"Bearer {run.tokens['viewer']}"},
            timeout=30,
        ).text
        # The session's broker keeps other tests' retained presence, so the inventory may hold
        # more devices than this test's: check each of ours, back on 1.0.0 and healthy.
        for i in ids:
            row = re.search(rf"<tr><td>{i}</td>(.*?)</tr>", fleet)
            assert row is not None, f"{i} missing from the fleet page"
            assert 'class="badge ok"' in row.group(1) and "iris 1.0.0" in row.group(1), row.group(0)
    finally:
        for d in devs:
            d.stop()
        time.sleep(0.1)
