"""Broker URL lists: the agent's link and the controller's bridge move past a broker that does
not answer to the next one of their list (real Mosquitto; a closed port as the dead node)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgefleet.agent.config import AgentConfig, ConfigError, MqttConfig, load_config
from edgefleet.agent.mqtt.link import MqttLink, broker_urls
from edgefleet.agent.runtime import Agent
from edgefleet.harness import free_port
from tests.fleet.conftest import Keys, Observer


def test_config_takes_url_then_urls_and_the_link_refuses_a_list_mixing_tls(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "gw-1"\ndata_dir = "data"\n[mqtt]\nurl = "mqtt://a:1883"\n'
        'urls = ["mqtt://b:1883", "mqtt://a:1883", "mqtt://c:1883"]\n'
    )
    cfg = load_config(path, env={})
    assert cfg.mqtt.brokers == ["mqtt://a:1883", "mqtt://b:1883", "mqtt://c:1883"]
    env = {"EDGEFLEET_AGENT_MQTT_URLS": "mqtt://x:1, mqtt://y:2"}
    path.write_text('device_id = "gw-1"\ndata_dir = "data"\n')
    assert load_config(path, env=env).mqtt.brokers == ["mqtt://x:1", "mqtt://y:2"]
    assert MqttConfig().brokers == []
    with pytest.raises(ValueError, match="mix mqtt:// and mqtts://"):
        broker_urls(["mqtts://a:8883", "mqtt://b:1883"])
    with pytest.raises(ValueError, match="scheme"):
        broker_urls(["http://a:80"])
    with pytest.raises(ValueError, match="no broker"):
        broker_urls([])
    path.write_text('device_id = "gw-1"\ndata_dir = "data"\n[mqtt]\nurls = "mqtt://a:1"\n')
    assert load_config(path, env={}).mqtt.brokers == ["mqtt://a:1"]
    path.write_text('device_id = "gw-1"\ndata_dir = "data"\n[mqtt]\nurls = 3\n')
    with pytest.raises(ConfigError, match=r"mqtt\.urls"):
        load_config(path, env={})


def test_agent_link_moves_past_a_dead_broker_to_the_next_of_its_list(
    tmp_path: Path, broker: Any, fleet_keys: Keys
) -> None:
    dead = f"mqtt://127.0.0.1:{free_port()}"
    cfg = AgentConfig(
        device_id="gw-list",
        data_dir=tmp_path / "gw-list",
        trusted_keys=[fleet_keys.packager.public_path],
        controller_keys=[fleet_keys.controller.public_path],
        profiles=["cpu-x86_64"],
        mqtt=MqttConfig(urls=[dead, broker.url], keepalive_s=5),
    )
    obs = Observer(broker.port).start()
    agent = Agent(cfg)
    agent.start(serve_http=False, serve_admin=False)
    link = MqttLink(agent, cfg)
    try:
        link.start()
        assert link.wait_connected(15), link.last_connect_error
        assert (link.host, link.port) == ("127.0.0.1", broker.port)
        assert link.failover.current == broker.url
        assert obs.wait(lambda: any(p["online"] for p in obs.of("gw-list", "presence")), 10)
    finally:
        link.stop()
        agent.stop()
        obs.stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_controller_bridge_moves_past_a_dead_broker_in_either_protocol(
    tmp_path: Path, broker: Any, protocol: str
) -> None:
    from edgefleet.cloud_controller.app import Controller
    from edgefleet.cloud_controller.settings import Settings

    dead = f"mqtt://127.0.0.1:{free_port()}"
    settings = Settings(
        data_dir=tmp_path,
        broker_url=f"{dead}, {broker.url}",
        mqtt_protocol=protocol,
        mqtt_client_id=f"ctl-failover-{protocol}",
    )
    assert settings.resolved_mqtt_protocol == protocol
    ctl = Controller.build(settings)
    assert ctl.bridge is not None
    bridge = ctl.bridge
    assert [a.port for a in bridge.addresses] == [int(dead.rsplit(":", 1)[1]), broker.port]
    bridge.start()
    try:
        assert bridge.wait_connected(15)
        assert bridge.address.port == broker.port
        assert bridge.stats.failovers >= 1
    finally:
        bridge.stop()
        ctl.engine.dispose()


def test_controller_protocol_setting() -> None:
    from edgefleet.cloud_controller.mqtt_bridge import broker_addresses
    from edgefleet.cloud_controller.settings import Settings

    # auto: 3.1.1, which every broker here speaks (Mosquitto serves $share/… to it too)
    assert Settings().resolved_mqtt_protocol == "3.1.1"
    assert Settings(mqtt_protocol="5").resolved_mqtt_protocol == "5"
    nats = Settings(shared_subscriptions=False)
    assert nats.resolved_mqtt_protocol == "3.1.1" and not nats.use_shared_subscriptions
    with pytest.raises(ValueError, match=r"expected auto, 3\.1\.1 or 5"):
        _ = Settings(mqtt_protocol="4").resolved_mqtt_protocol
    with pytest.raises(ValueError, match="mix mqtt:// and mqtts://"):
        broker_addresses("mqtts://a:8883,mqtt://b:1883")
    (a, b) = broker_addresses("mqtt://u:p%40ss@a:1,b")
    assert (a.username, a.password, a.port) == ("u", "p@ss", 1)
    assert (b.host, b.port, b.username) == ("b", 1883, None)
