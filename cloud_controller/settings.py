"""Controller settings: defaults, then `EDGEFLEET_CONTROLLER_*` environment overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

ENV_PREFIX = "EDGEFLEET_CONTROLLER_"


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def default_data_dir() -> Path:
    return Path(os.environ.get(ENV_PREFIX + "DATA_DIR", Path.home() / ".edgefleet" / "controller"))


@dataclass(frozen=True)
class Settings:
    """Everything the controller process needs; `None` broker means no MQTT bridge."""

    data_dir: Path = field(default_factory=default_data_dir)
    db_url: str | None = None
    # One broker URL or a comma-separated list of them (the nodes of a cluster: tried in order,
    # the next one after every lost connection, with jittered backoff).
    broker_url: str | None = None
    # "3.1.1", "5" or "auto" (5 when shared subscriptions are on, else 3.1.1). NATS speaks
    # 3.1.1 only: run it with "3.1.1", which also turns shared subscriptions off.
    mqtt_protocol: str = "auto"
    shared_subscriptions: bool = True
    mqtt_client_id: str = "edgefleet-controller"  # persistent session: QoS 1 kept while away
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
    def resolved_mqtt_protocol(self) -> str:
        """The protocol the bridge speaks: "3.1.1" or "5" (ValueError for anything else)."""
        if self.mqtt_protocol == "auto":
            return "5" if self.shared_subscriptions else "3.1.1"
        if self.mqtt_protocol in ("3.1.1", "5"):
            return self.mqtt_protocol
        raise ValueError(f"mqtt_protocol {self.mqtt_protocol!r}: expected auto, 3.1.1 or 5")

    @property
    def use_shared_subscriptions(self) -> bool:
        """Shared subscriptions need MQTT 5 (``$share/…``); on 3.1.1 every replica reads all."""
        return self.shared_subscriptions and self.resolved_mqtt_protocol == "5"

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.data_dir / 'controller.db'}"

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
            ("MQTT_PROTOCOL", str),
            ("SHARED_SUBSCRIPTIONS", _flag),
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
        trusted = env.get(ENV_PREFIX + "TRUSTED_KEYS")
        if trusted:
            updates["trusted_keys"] = tuple(Path(p) for p in trusted.split(os.pathsep) if p)
        return replace(self, **updates)  # type: ignore[arg-type]
