"""One poison message never costs another device's report (real Mosquitto, SQLite and PostgreSQL).

The bridge reads device messages in batches, one transaction per batch. A message the database
cannot take (JSON nested 100k deep, a NUL character, a seq beyond BIGINT, 1 MB of presence)
is refused alone before the transaction; one the database refuses all the same (here a real
trigger) makes the bridge redo the batch message by message, so it too costs only itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from edgefleet.cloud_controller.models import Device
from edgefleet.keys import KeyPair
from edgefleet.wire.mqtt import topic
from tests.controller.conftest import Running, start_controller, wait_for
from tests.support.services import Mosquitto

GOOD = [f"good-{i}" for i in range(12)]


def poison_payloads() -> list[tuple[str, str, bytes]]:
    deep = b"[" * 100_000 + b"]" * 100_000
    mid = b"[" * 5_000 + b"]" * 5_000  # under the size limit, deeper than the decoder's stack
    shallow = b"[" * 40 + b"]" * 40  # decodes, deeper than any device message needs
    return [
        ("bad-mid", "status", b'{"seq": 1, "x": ' + mid + b"}"),
        ("bad-shallow", "presence", b'{"online": true, "hardware": {"x": ' + shallow + b"}}"),
        ("bad-deep", "status", b'{"seq": 1, "x": ' + deep + b"}"),
        ("bad-deep", "presence", deep),
        ("bad-nul", "presence", json.dumps({"online": True, "agent_version": "1.0\x00"}).encode()),
        ("bad-seq", "status", json.dumps({"seq": 2**63, "state": "committed"}).encode()),
        ("bad-nan", "presence", b'{"online": true, "hardware": {"ram": NaN}}'),
        # JSON in UTF-16 (json.loads reads it): the same checks, however the bytes look
        ("bad-utf16", "presence", '{"online": true, "hardware": {"ram": 1e400}}'.encode("utf-16")),
        ("bad-utf16", "status", json.dumps({"seq": 2**63, "state": "committed"}).encode("utf-16")),
        (
            "bad-big",
            "presence",
            json.dumps({"online": True, "hardware": {"blob": "x" * 1_000_000}}).encode(),
        ),
    ]


def good_payloads(seq: int) -> list[tuple[str, str, bytes]]:
    out = []
    for d in GOOD:
        out.append(
            (d, "presence", json.dumps({"online": True, "agent_version": f"0.{seq}.0"}).encode())
        )
        out.append(
            (
                d,
                "status",
                json.dumps({"seq": seq, "kind": "desired_rejected", "reason": "test"}).encode(),
            )
        )
    return out


def interleave(*lists: list[Any]) -> list[Any]:
    out: list[Any] = []
    for i in range(max(len(x) for x in lists)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def versions(run: Running) -> dict[str, str | None]:
    with run.controller.factory() as s:
        return {d.id: d.agent_version for d in s.query(Device).all()}


def install_db_poison(run: Running) -> None:
    """A real database refusal the bridge cannot foresee: a trigger on one device's row."""
    engine = run.controller.engine
    with engine.begin() as c:
        if engine.dialect.name == "sqlite":
            c.execute(
                text(
                    "CREATE TRIGGER poison BEFORE INSERT ON devices WHEN NEW.id = 'bad-db' "
                    "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END"
                )
            )
        else:
            c.execute(
                text(
                    "CREATE FUNCTION poison() RETURNS trigger AS $$ BEGIN "
                    "IF NEW.id = 'bad-db' THEN RAISE EXCEPTION 'poisoned row'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            c.execute(
                text(
                    "CREATE TRIGGER poison BEFORE INSERT ON devices "
                    "FOR EACH ROW EXECUTE FUNCTION poison()"
                )
            )


def test_poison_messages_in_one_batch_cost_only_themselves(
    tmp_path: Path, packager_key: KeyPair, db_url: str, broker: Mosquitto
) -> None:
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], db_url=db_url, broker_url=broker.url
    )
    try:
        bridge = run.controller.bridge
        assert bridge is not None and bridge.wait_connected()
        install_db_poison(run)
        # One batch, as the worker would pull it: good reports around every kind of poison.
        poison = [
            *poison_payloads(),
            ("bad-db", "presence", json.dumps({"online": True, "agent_version": "9"}).encode()),
        ]
        batch = interleave(good_payloads(1), poison)
        before = dict(bridge.stats.dropped)
        bridge._process(batch)
        got = versions(run)
        assert {d: got.get(d) for d in GOOD} == {d: "0.1.0" for d in GOOD}
        assert not any(d.startswith("bad-") for d in got)
        with run.controller.factory() as s:
            assert all(s.get(Device, d).last_status_seq == 1 for d in GOOD)  # type: ignore[union-attr]
        dropped = {k: v - before.get(k, 0) for k, v in bridge.stats.dropped.items()}
        assert dropped == {
            "status_too_large": 1,  # 100k deep
            "presence_too_large": 2,  # 100k deep, 1 MB of hardware
            "status_unstorable": 3,  # 5,000 deep, seq 2**63, seq 2**63 in UTF-16
            "presence_unstorable": 4,  # 40 deep, NUL, NaN, 1e400 in UTF-16
            "presence_db_refused": 1,  # the trigger
        }

        # The same over the broker: whatever batches the messages fall into.
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="poisoner")
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            for dev, kind, payload in interleave(good_payloads(2), poison):
                client.publish(topic(dev, kind), payload, qos=1).wait_for_publish(5)  # type: ignore[arg-type]
        finally:
            client.loop_stop()
            client.disconnect()
        wait_for(
            lambda: {d: versions(run).get(d) for d in GOOD} == {d: "0.2.0" for d in GOOD},
            what="every good device's second presence",
        )
        time.sleep(0.2)
        wait_for(bridge.idle, what="bridge idle")
        assert not any(d.startswith("bad-") for d in versions(run))
    finally:
        run.stop()


@pytest.mark.parametrize("size", [64 * 1024 + 1, 30 * 1024 * 1024])
def test_oversized_presence_is_not_stored(
    tmp_path: Path, packager_key: KeyPair, broker: Mosquitto, size: int
) -> None:
    """A device cannot make the controller store (and serve back) megabytes of inventory."""
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url
    )
    try:
        bridge = run.controller.bridge
        assert bridge is not None and bridge.wait_connected()
        filler = "x" * size
        payload = json.dumps({"online": True, "agent_version": "1", "hardware": {"f": filler}})
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="big")
        client.connect(broker.host, broker.port)
        client.loop_start()
        try:
            client.publish(topic("big-1", "presence"), payload.encode(), qos=1).wait_for_publish(10)
            client.publish(
                topic("small-1", "presence"), b'{"online": true, "agent_version": "2"}', qos=1
            ).wait_for_publish(10)
        finally:
            client.loop_stop()
            client.disconnect()
        wait_for(lambda: versions(run).get("small-1") == "2", what="small presence")
        assert "big-1" not in versions(run)
        assert bridge.stats.dropped.get("presence_too_large") == 1
        with run.client("viewer") as v:
            assert v.get("/api/v1/devices/big-1").status_code == 404
    finally:
        run.stop()
