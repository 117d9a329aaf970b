"""Device ids on a NATS deployment (wire.brokerkind): NATS turns an MQTT topic level's '.' into
its subject separator, so a device id with a '.' cannot travel; a deployment that says its
broker is NATS refuses such ids where they enter it, naming the reason. Real processes: a
one-node NATS server, a controller served as `edgefleet controller serve --broker-kind nats`,
`edgefleet agent check` and `edgefleet agent run`."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.agent.config import load_config
from edgefleet.agent.enroll import EnrollError, enroll
from edgefleet.demo.api import ApiError
from edgefleet.demo.fleet import Fleet
from edgefleet.demo.spec import FleetSpec
from edgefleet.harness import NatsCluster, nats_server_binary
from edgefleet.wire.brokerkind import device_id_for, device_subscription_qos
from edgefleet.wire.ids import IdentifierError
from edgefleet.wire.mqtt import topic
from tests.fleet.conftest import Keys, wait_until
from tests.support.services import free_port, require


@pytest.fixture(scope="module")
def nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    require(
        nats_server_binary() is not None,
        "nats-server is not installed (apt-get install nats-server)",
    )
    with NatsCluster(tmp_path_factory.mktemp("nats"), nodes=1) as cluster:
        yield cluster


def test_the_rule() -> None:
    assert device_id_for("nats", "gw-1_A") == "gw-1_A"
    assert device_id_for("mqtt", "gw.1") == "gw.1"  # any other broker carries it
    with pytest.raises(IdentifierError, match="NATS") as e:
        device_id_for("nats", "gw.1")
    assert e.value.code == "invalid_device_id"
    with pytest.raises(IdentifierError, match="grammar"):  # the general grammar first
        device_id_for("nats", "gw/1")
    assert (device_subscription_qos("nats"), device_subscription_qos("mqtt")) == (0, 1)


def _subscribe_as(port: int, device_id: str) -> bool:
    """Whether NATS grants client ``device_id`` a subscription to its desired state."""
    got: dict[str, Any] = {}
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv311)

    def on_connect(cl: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
        cl.subscribe(topic(device_id, "desired"), qos=0)

    def on_subscribe(cl: Any, u: Any, mid: Any, rcs: Any, p: Any) -> None:
        got["subscribed"] = not any(r.is_failure for r in rcs)
        done.set()

    def on_disconnect(*a: Any) -> None:
        got["disconnected"] = True
        done.set()

    c.on_connect, c.on_subscribe, c.on_disconnect = on_connect, on_subscribe, on_disconnect
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        assert done.wait(10), "no SUBACK and no disconnect"
        return bool(got.get("subscribed")) and not got.get("disconnected")
    finally:
        c.disconnect()
        c.loop_stop()


def test_nats_cannot_carry_a_dotted_device_id(nats: NatsCluster) -> None:
    """Why the rule exists: NATS refuses a topic with a '.' in a level (SUBACK 0x80 to a
    subscription; a PUBLISH there closes the connection)."""
    assert _subscribe_as(nats.mqtt_ports[0], "gw-ok")
    assert not _subscribe_as(nats.mqtt_ports[0], "gw.dot")


def test_a_nats_controller_refuses_dotted_ids_at_registration_and_enrollment(
    nats: NatsCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_BROKER_KIND", "nats")
    # status and telemetry through the cluster's JetStream (cloud_controller/jetstream.py)
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_NATS_URL", ",".join(nats.nats_urls))
    # (not the demo's amqtt spec, whose controller is told to skip shared subscriptions)
    fleet = Fleet(FleetSpec(tmp_path / "fleet", devices=1, broker="mosquitto"))
    fleet.broker_url = lambda user=None, password=None: nats.mqtt_urls[0]  # type: ignore[method-assign]
    try:
        fleet.make_keys()
        fleet.start_controller()
        api = fleet.api
        assert api is not None
        # the bridge runs on NATS as it is told: 3.1.1 and plain subscriptions from its first
        # SUBSCRIBE (no probe for shared ones, during which presences would go unread)
        seen: set[str] = set()

        def bridge_subjects() -> set[str]:
            conns = nats.monitor(0, "/connz?subs=1").get("connections") or []
            seen.update(
                s
                for c in conns
                if str(c.get("mqtt_client", "")).startswith("edgefleet-controller")
                for s in c.get("subscriptions_list") or []
            )
            return seen

        assert wait_until(lambda: "edgefleet.v1.devices.*.presence" in bridge_subjects(), 30)
        # status and telemetry come through JetStream (cloud_controller/jetstream.py), not MQTT
        assert not {"edgefleet.v1.devices.*.status", "edgefleet.v1.devices.*.telemetry"} & seen
        # a bridge that probed would have logged its fallback before subscribing plainly
        log = fleet.children.log_tail("controller")
        assert "shared subscriptions" not in log, log
        with pytest.raises(ApiError) as refused:
            api.call("POST", "/api/v1/devices", {"device_id": "gw.1"})
        assert refused.value.status == 422
        assert "invalid_device_id" in refused.value.body and "NATS" in refused.value.body
        assert api.call("POST", "/api/v1/devices", {"device_id": "gw-1"})["device_id"] == "gw-1"

        token = api.call("POST", "/api/v1/enroll-tokens", {"group": "lab"})["token"]
        with pytest.raises(EnrollError, match=r"invalid_device_id.*NATS"):
            enroll(api.base, token, tmp_path / "gw.2", "gw.2")
        # refused before the token was spent: it still enrolls a valid id
        enrolled = enroll(api.base, token, tmp_path / "gw-2", "gw-2")
        # ... into a config that knows its broker is NATS
        assert load_config(enrolled.config_path, env={}).mqtt.broker_kind == "nats"
        ids = {d["device_id"] for d in api.call("GET", "/api/v1/devices")}
        assert ids == {"gw-1", "gw-2"}, ids
    finally:
        fleet.close()


def test_a_controller_for_another_broker_still_takes_dotted_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGEFLEET_CONTROLLER_BROKER_KIND", raising=False)
    fleet = Fleet(FleetSpec(tmp_path / "fleet", devices=1))
    fleet.broker_url = lambda user=None, password=None: f"mqtt://127.0.0.1:{free_port()}"  # type: ignore[method-assign]
    try:
        fleet.make_keys()
        fleet.start_controller()
        assert fleet.api is not None
        assert fleet.api.call("POST", "/api/v1/devices", {"device_id": "gw.1"})["device_id"]
    finally:
        fleet.close()


def _agent_toml(path: Path, device_id: str, broker_kind: str, url: str, keys: Keys) -> Path:
    from edgefleet.agent.config import dump_config

    path.mkdir(parents=True, exist_ok=True)
    conf = path / "agent.toml"
    conf.write_text(
        dump_config(
            {
                "device_id": device_id,
                "data_dir": str(path / "data"),
                "trusted_keys": [str(keys.packager.public_path)],
                "controller_keys": [str(keys.controller.public_path)],
                "http_host": "127.0.0.1",
                "http_port": free_port(),
                "admin_port": 0,
                "mqtt": {"url": url, "broker_kind": broker_kind},
                "telemetry": {"enabled": False},
            }
        )
    )
    return conf


def _edgefleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
        stdin=subprocess.DEVNULL,
    )


def test_an_agent_on_nats_refuses_a_dotted_id_at_check_and_start(
    nats: NatsCluster, tmp_path: Path, fleet_keys: Keys
) -> None:
    url = nats.mqtt_urls[0]
    bad = _agent_toml(tmp_path / "bad", "gw.1", "nats", url, fleet_keys)
    res = _edgefleet("agent", "check", "--config", str(bad))
    assert res.returncode == 1, res.stdout + res.stderr
    line = res.stdout.splitlines()[0]
    assert "config" in line and "FAIL" in line and "'gw.1'" in line and "NATS" in line, line
    res = _edgefleet("agent", "run", "--config", str(bad))
    assert res.returncode != 0
    assert "gw.1" in res.stdout + res.stderr and "NATS" in res.stdout + res.stderr
    assert not (tmp_path / "bad" / "data" / "admin.json").exists()  # it never started serving

    # the same id for a broker that carries it passes the config check
    other = _agent_toml(tmp_path / "other", "gw.1", "mqtt", url, fleet_keys)
    res = _edgefleet("agent", "check", "--config", str(other))
    assert "config" in res.stdout and "'gw.1'" not in res.stdout.splitlines()[0], res.stdout

    unknown = _agent_toml(tmp_path / "unknown", "gw-1", "kafka", url, fleet_keys)
    res = _edgefleet("agent", "check", "--config", str(unknown))
    assert res.returncode == 1 and "mqtt.broker_kind" in res.stdout, res.stdout


def test_an_agent_on_nats_costs_no_jetstream_consumer(
    nats: NatsCluster, tmp_path: Path, fleet_keys: Keys
) -> None:
    """broker_kind = "nats": the agent subscribes at QoS 0, so its subscriptions are plain NATS
    interest, not JetStream consumers (which NATS creates for every QoS 1 subscription)."""

    def consumers() -> int:
        return int(nats.monitor(0, "/jsz").get("consumers", 0))

    before = consumers()
    conf = _agent_toml(tmp_path / "ok", "gw-qos0", "nats", nats.mqtt_urls[0], fleet_keys)
    log = open(tmp_path / "agent.log", "wb")  # noqa: SIM115
    agent = subprocess.Popen(
        [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:

        def subjects() -> set[str]:
            conns = nats.monitor(0, "/connz?subs=1").get("connections") or []
            return {
                s
                for c in conns
                if c.get("mqtt_client") == "gw-qos0"
                for s in c.get("subscriptions_list") or []
            }

        wanted = {"edgefleet.v1.devices.gw-qos0.desired", "edgefleet.v1.devices.gw-qos0.ack"}
        assert wait_until(lambda: wanted <= subjects(), 60), (tmp_path / "agent.log").read_text()[
            -3000:
        ]
        # a QoS 1 subscription would add a "$MQTT.sub.<id>" delivery subject and a consumer
        assert not [s for s in subjects() if s.startswith("$MQTT.sub.")], subjects()
        assert consumers() == before
    finally:
        agent.terminate()
        agent.wait(30)
        log.close()
