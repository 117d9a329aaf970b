"""The capture flood limit holds across controller replicas: two controllers on one PostgreSQL
database of their own and one Mosquitto split a device's capture messages (MQTT shared
subscriptions); the rows per minute they store together stay within the capture's limit.

With a limiter in each replica's memory, each let through twice the device's limit: two
replicas stored 4x what was asked for a minute. The count is now the database's, under the
capture's row lock."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from edgefleet.keys import KeyPair
from tests.controller.conftest import start_controller
from tests.controller.test_capture import (
    RawDevice,
    _manage,
    _row,
    _start_capture,
    _wait,
)
from tests.controller.test_replicas import own_database

pytestmark = pytest.mark.timeout(120)


def test_two_replicas_store_no_more_than_the_rate_together(
    tmp_path: Path, broker: Any, postgres_url: str, packager_key: KeyPair
) -> None:
    from sqlalchemy import func, select

    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.models import CapturedRow

    with own_database(postgres_url) as url:
        a = start_controller(
            tmp_path / "a", trusted=[packager_key.public_path], broker_url=broker.url, db_url=url
        )
        b = None
        try:
            b = start_controller(
                tmp_path / "b",
                trusted=[packager_key.public_path],
                broker_url=broker.url,
                db_url=url,
                signing_key=tmp_path / "a" / "keys" / "controller.key",
            )
            assert a.controller.bridge.wait_connected(10)
            assert b.controller.bridge.wait_connected(10)
            dev = "cap-flood-1"
            _manage(a, [dev])
            cid = _start_capture(a, [dev], rows=100, per_minute=5)
            time.sleep(1.0)  # both bridges' shared subscriptions are in place
            pub = RawDevice(broker, dev)
            try:
                for i in range(40):  # one row a message: the broker deals them to both
                    pub.publish_capture(json.dumps({"records": [_row(cid, i)]}))
                assert _wait(lambda: pub.acked() >= set(range(40))), pub.acks
            finally:
                pub.close()
            handled = [
                sum(v for k, v in c.controller.bridge.stats.dropped.items() if "capture" in k)
                for c in (a, b)
            ]
            with transaction(a.controller.factory) as s:
                stored = s.scalar(select(func.count()).select_from(CapturedRow))
            per = a.client("viewer").get(f"/api/v1/captures/{cid}").json()["per_device"][dev]
            print(f"\nstored {stored} of 40 (limit 2 x 5 a minute); refused per replica {handled}")
            # both replicas took part (each refused part of the flood), and together they
            # stored twice the per-minute limit, not twice that per replica
            assert all(n > 0 for n in handled), handled
            assert stored == per["rows"] == 10
            assert per["refused"]["capture_rate"] == 30
        finally:
            if b is not None:
                b.stop()
            a.stop()
