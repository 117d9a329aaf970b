"""Controller settings: defaults, then `EDGEFLEET_CONTROLLER_*` environment overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

ENV_PREFIX = "EDGEFLEET_CONTROLLER_"


def default_data_dir() -> Path:
    return Path(os.environ.get(ENV_PREFIX + "DATA_DIR", Path.home() / ".edgefleet" / "controller"))


@dataclass(frozen=True)
class Settings:
    """Everything the controller process needs; `None` broker means no MQTT bridge."""

    data_dir: Path = field(default_factory=default_data_dir)
    db_url: str | None = None
    broker_url: str | None = None
    mqtt_client_id: str = "edgefleet-controller"  # persistent session: QoS 1 kept while away
    # Replicas (docs/controller.md, Replicas): a stable id per replica names its lease and its
    # MQTT client (`<mqtt_client_id>-<replica_id>`); unset: host name + pid, and the MQTT
    # client id is `mqtt_client_id` alone (one controller).
    replica_id: str | None = None
    # Device reports through `$share/edgefleet/...` (Mosquitto 2; off for brokers without
    # shared subscriptions, e.g. NATS's MQTT 3.1.1): each report reaches one replica.
    shared_subscriptions: bool = True
    # Acknowledge every committed report to its device on .../ack (docs/fleet.md); agents
    # release outbox records only on it. Off only to measure or for brokers that forbid it.
    acks: bool = True
    lease_ttl_s: float = 5.0  # the leader's lease (PostgreSQL); failover within ttl + renew
    lease_renew_s: float = 1.0
    packages_dir: Path | None = None
    signing_key: Path | None = None
    signing_key_passphrase: str | None = None
    trusted_keys: tuple[Path, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8400
    public_url: str | None = None
    desired_ttl_s: float = 7 * 24 * 3600.0
    tick_s: float = 0.5
    max_upload_bytes: int = 4 * 1024**3
    # docs/limits.md, Controller: every limit with its default and why.
    max_body_bytes: int = 1024**2  # any other API request body (JSON)
    max_reference_body_bytes: int = 64 * 1024**2  # a drift reference (histograms, JSON)
    max_presence_bytes: int = 64 * 1024  # one presence message from a device
    max_status_bytes: int = 64 * 1024  # one status report
    max_telemetry_bytes: int = 1024**2  # one telemetry envelope

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'controller.db'}"

    @property
    def bridge_client_id(self) -> str:
        """The MQTT client id: distinct per replica, stable across its restarts."""
        if self.replica_id:
            return f"{self.mqtt_client_id}-{self.replica_id}"
        return self.mqtt_client_id

    @property
    def package_dir(self) -> Path:
        return self.packages_dir or self.data_dir / "packages"

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key or self.data_dir / "keys" / "controller.key"

    @property
    def base_url(self) -> str:
        """The URL devices use to download packages."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def with_env(self) -> Settings:
        """A copy with `EDGEFLEET_CONTROLLER_*` variables applied."""
        env = os.environ
        updates: dict[str, object] = {}
        for name, conv in (
            ("DATA_DIR", Path),
            ("DB", str),
            ("BROKER", str),
            ("MQTT_CLIENT_ID", str),
            ("REPLICA_ID", str),
            ("LEASE_TTL_S", float),
            ("LEASE_RENEW_S", float),
            ("PACKAGES", Path),
            ("SIGNING_KEY", Path),
            ("SIGNING_KEY_PASSPHRASE", str),
            ("HOST", str),
            ("PORT", int),
            ("PUBLIC_URL", str),
            ("DESIRED_TTL_S", float),
            ("MAX_UPLOAD_BYTES", int),
            ("MAX_BODY_BYTES", int),
        ):
            value = env.get(ENV_PREFIX + name)
            if value:
                key = {
                    "DB": "db_url",
                    "BROKER": "broker_url",
                    "PACKAGES": "packages_dir",
                }.get(name, name.lower())
                updates[key] = conv(value)
        for flag in ("SHARED_SUBSCRIPTIONS", "ACKS"):
            value = env.get(ENV_PREFIX + flag)
            if value:
                updates[flag.lower()] = value.strip().lower() not in ("0", "false", "no")
        trusted = env.get(ENV_PREFIX + "TRUSTED_KEYS")
        if trusted:
            updates["trusted_keys"] = tuple(Path(p) for p in trusted.split(os.pathsep) if p)
        return replace(self, **updates)  # type: ignore[arg-type]
