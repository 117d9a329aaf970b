"""An agent's configuration on the demo's embedded defaults: loopback ports, the fleet's keys
and broker, a short probation, telemetry on."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefleet.demo.spec import FleetSpec


def write_agent_config(
    agent_dir: Path,
    device_id: str,
    *,
    spec: FleetSpec,
    broker_url: str,
    keys: Mapping[str, Path],
    creds: Mapping[str, str],
    http_port: int,
) -> Path:
    """Write ``agent_dir/agent.toml`` (and the agent's admin token); return its path.

    ``creds`` are the device's registration answer: MQTT login when ``spec.secure``, download
    token when the controller gave one.
    """
    from edgefleet.agent.admin import ensure_token
    from edgefleet.agent.config import dump_config, load_config

    agent_dir.mkdir(parents=True, exist_ok=True)
    mqtt: dict[str, Any] = {"url": broker_url, "keepalive_s": 10}
    if spec.secure:
        mqtt.update(username=creds["mqtt_username"], password=creds["mqtt_password"])
    values: dict[str, Any] = {
        "device_id": device_id,
        "data_dir": str(agent_dir / "data"),
        "trusted_keys": [str(keys["packager_pub"])],
        "controller_keys": [str(keys["controller_pub"])],
        "http_host": "127.0.0.1",
        "http_port": http_port,
        "admin_port": 0,
        "probation": {"seconds": spec.probation_s, "min_requests": 20},
        "validation": {"bench_runs": 30, "bench_warmup": 3},
        "mqtt": mqtt,
        "telemetry": {"enabled": True, "interval_s": spec.telemetry_interval_s},
    }
    if creds.get("download_token"):
        values["download_token"] = creds["download_token"]
    path = agent_dir / "agent.toml"
    path.write_text(dump_config(values))
    cfg = load_config(path, env={})
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_token(cfg.admin_token_path)
    return path
