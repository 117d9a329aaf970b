"""Registering a device while its first presence inserts the same row (PostgreSQL, real
concurrent transactions): the registration waits for the other insert and then completes on
that row, instead of failing with a unique violation (an HTTP 500 before)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.auth import register_device
from edgefleet.cloud_controller.devices import get_or_create
from edgefleet.cloud_controller.models import Device
from tests.controller.conftest import pg_schema


def test_registration_racing_a_presence_insert_completes(postgres_url: str) -> None:
    with pg_schema(postgres_url) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        factory = db.session_factory(engine)
        try:
            bridge = factory()
            get_or_create(bridge, "gw-race").online = True
            bridge.flush()  # the bridge's row exists, uncommitted: the registration must wait
            result: dict[str, object] = {}

            def register() -> None:
                try:
                    with db.transaction(factory) as s:
                        result["creds"] = register_device(s, "gw-race", groups=["lab"])
                except Exception as e:
                    result["error"] = e

            t = threading.Thread(target=register)
            t.start()
            t.join(1.0)
            assert t.is_alive(), "the registration did not wait for the concurrent insert"
            bridge.commit()
            bridge.close()
            t.join(10)
            assert "error" not in result, result.get("error")
            with factory() as s:
                dev = s.get(Device, "gw-race")
                assert dev is not None and dev.registered and dev.groups == ["lab"]
                assert dev.online  # the presence's update was kept
        finally:
            engine.dispose()


def test_registration_of_a_new_device_still_creates_it(postgres_url: str) -> None:
    with pg_schema(postgres_url) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        factory = db.session_factory(engine)
        try:
            with db.transaction(factory) as s:
                register_device(s, "gw-new", now=datetime.now(UTC))
            with factory() as s:
                assert s.get(Device, "gw-new") is not None
        finally:
            engine.dispose()
