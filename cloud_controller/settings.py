"""Controller settings: defaults, then `EDGEFLEET_CONTROLLER_*` environment overrides.

The database is set once: every controller command resolves it the same way (`resolve_db`):
its ``--db`` flag, else ``EDGEFLEET_CONTROLLER_DB``, else the ``db`` of ``controller.toml`` in
the data directory (written by ``edgefleet controller init``), else SQLite in the data directory.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from edgefleet.wire.brokerkind import BrokerKind, broker_kind

ENV_PREFIX = "EDGEFLEET_CONTROLLER_"
CONFIG_NAME = "controller.toml"


class SettingsError(ValueError):
    """A controller setting cannot be read; the message names the file or variable."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for banners and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def read_data_dir_config(data_dir: Path) -> dict[str, str]:
    """The settings kept in ``DATA_DIR/controller.toml`` (empty when there is none)."""
    path = data_dir / CONFIG_NAME
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SettingsError(f"cannot read {path}: {e}") from e
    unknown = set(raw) - {"db"}
    if unknown:
        raise SettingsError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    if "db" in raw and not isinstance(raw["db"], str):
        raise SettingsError(f"{path}: db must be a string")
    return {k: str(v) for k, v in raw.items()}


def write_data_dir_config(data_dir: Path, db: str) -> Path:
    """Write ``DATA_DIR/controller.toml`` (mode 0600: the URL may hold a password)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / CONFIG_NAME
    tmp = path.with_suffix(".tmp")
    escaped = db.replace("\\", "\\\\").replace('"', '\\"')
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(
            "# Written by `edgefleet controller init`: every controller command uses this\n"
            "# database unless --db or EDGEFLEET_CONTROLLER_DB says otherwise.\n"
            f'db = "{escaped}"\n'
        )
    tmp.replace(path)
    return path


def resolve_db(
    flag: str | None, data_dir: Path, env: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """The database URL and where it came from: flag > environment > controller.toml > SQLite."""
    env = os.environ if env is None else env
    if flag:
        return flag, "--db"
    if env.get(ENV_PREFIX + "DB"):
        return env[ENV_PREFIX + "DB"], ENV_PREFIX + "DB"
    kept = read_data_dir_config(data_dir).get("db")
    if kept:
        return kept, str(data_dir / CONFIG_NAME)
    return f"sqlite:///{data_dir / 'controller.db'}", "default (SQLite in the data directory)"


def _flag(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def default_data_dir() -> Path:
    return Path(os.environ.get(ENV_PREFIX + "DATA_DIR", Path.home() / ".edgefleet" / "controller"))


# Every EDGEFLEET_CONTROLLER_<NAME> variable `Settings.with_env` reads, with its conversion
# (TRUSTED_KEYS: paths separated by os.pathsep).
ENV_SETTINGS: tuple[tuple[str, type], ...] = (
    ("DATA_DIR", Path),
    ("DB", str),
    ("BROKER", str),
    ("MQTT_CLIENT_ID", str),
    ("MQTT_PROTOCOL", str),
    ("BROKER_KIND", str),
    ("NATS_URL", str),
    ("JETSTREAM_ACK_WAIT_S", float),
    ("NATS_CA_FILE", Path),
    ("NATS_CERT_FILE", Path),
    ("NATS_KEY_FILE", Path),
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
    ("SWITCH_INTERVAL_MS", float),
    ("MAX_UPLOAD_BYTES", int),
    ("MAX_BODY_BYTES", int),
    ("DEVICE_CERT_DAYS", int),
    ("BROKER_CA_FILE", Path),
    ("BROKER_CERT_FILE", Path),
    ("BROKER_KEY_FILE", Path),
    ("CAPTURE_ON_DRIFT_ROWS", int),
    ("CAPTURE_ON_DRIFT_SAMPLE_RATE", float),
    ("CAPTURE_ON_DRIFT_ROWS_PER_MINUTE", int),
    ("CAPTURE_MAX_ROWS", int),
    ("CAPTURE_MAX_BYTES", int),
    ("CAPTURE_TOTAL_BYTES", int),
    ("CAPTURE_RETENTION_DAYS", float),
)
ENV_NAMES = frozenset(
    [ENV_PREFIX + n for n, _ in ENV_SETTINGS]
    + [
        ENV_PREFIX + n
        for n in (
            "TRUSTED_KEYS",
            "DEVICE_BROKER_URL",
            "SHARED_SUBSCRIPTIONS",
            "JETSTREAM_INGEST",
            "ACKS",
            "CAPTURE_ON_DRIFT",
        )
    ]
)


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
    # "mqtt" (any MQTT broker, e.g. Mosquitto) or "nats" (NATS Server's MQTT: 3.1.1, no shared
    # subscriptions, and device ids without '.'; wire.brokerkind, docs/fleet.md).
    broker_kind: str = "mqtt"
    # Broker kind "nats": the cluster's NATS client URL(s) (nats://n1:4222,...). Device status
    # and telemetry are read through JetStream durable consumers shared by every replica
    # (`jetstream.py`; docs/controller.md, Replicas), unless `jetstream_ingest` is off: then
    # every replica subscribes to them over MQTT and ingests every report.
    nats_url: str | None = None
    jetstream_ingest: bool = True
    jetstream_ack_wait_s: float = 30.0  # a report unacknowledged this long goes to a replica again
    # TLS of the JetStream client (`nats_tls_files`): the CA that signed the NATS servers'
    # certificates (default: the broker's CA, `broker_tls_files`, else the system's), and a
    # client certificate and key for a NATS server that verifies clients. Credentials go in
    # the URLs (nats://user:password@host:4222, tls://user:password@host:4222).
    nats_ca_file: Path | None = None
    nats_cert_file: Path | None = None
    nats_key_file: Path | None = None
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
    # The interpreter's GIL switch interval under `controller serve` (docs/scale.md, "The GIL
    # between paho and the bridge"): paho's network thread waits up to this long for the GIL
    # while the bridge worker computes, and the broker's in-flight window waits with it. At
    # Python's default 5 ms, 10,000 devices' status reports came in 31 % slower than at 0.5.
    switch_interval_ms: float = 0.5
    max_upload_bytes: int = 4 * 1024**3
    # docs/limits.md, Controller: every limit with its default and why.
    max_body_bytes: int = 1024**2  # any other API request body (JSON)
    max_reference_body_bytes: int = 64 * 1024**2  # a drift reference (histograms, JSON)
    max_presence_bytes: int = 64 * 1024  # one presence message from a device
    max_status_bytes: int = 64 * 1024  # one status report
    max_telemetry_bytes: int = 1024**2  # one telemetry envelope
    max_enroll_body_bytes: int = 64 * 1024  # an enrollment or renewal (token + CSR), anonymous
    # Capture on demand (docs/capture.md, docs/limits.md "Capture").
    max_capture_bytes: int = 2 * 1024**2  # one capture message (the agent sends <= 1 MiB)
    # A drift event (docs/drift.md, Alerts in minutes) starts a capture on the affected devices
    # (docs/retrain.md); off by default: raw field data leaves devices only when asked for.
    capture_on_drift: bool = False
    capture_on_drift_rows: int = 500  # ... of this many rows
    capture_on_drift_sample_rate: float = 0.1  # ... sampling this share of the requests
    capture_on_drift_rows_per_minute: int = 60  # ... at most this many rows a minute a device
    capture_max_rows: int = 100_000  # rows one capture may ask for
    capture_max_bytes: int = 256 * 1024**2  # tensor bytes one capture may store
    capture_total_bytes: int = 2 * 1024**3  # tensor bytes all captures together may store
    capture_retention_days: float = 30.0  # an ended capture, its rows and datasets, then deleted
    # Transport security (docs/security.md): the broker URL(s) enrolled devices are given, how
    # long a device certificate lives, and the TLS files of the controller's own broker link
    # (default: the CA and the bridge certificate in <data dir>/pki, when the URL is mqtts).
    device_broker_urls: tuple[str, ...] = ()
    device_cert_days: int = 90
    broker_ca_file: Path | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None

    @property
    def pki_dir(self) -> Path:
        return self.data_dir / "pki"

    def broker_tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        """(CA, client cert, client key) for the controller's broker link; the defaults are
        the files `controller mosquitto-config` writes into the PKI dir, where they exist."""

        def pick(given: Path | None, default: Path) -> Path | None:
            return given if given is not None else (default if default.exists() else None)

        d = self.pki_dir
        return (
            pick(self.broker_ca_file, d / "ca.crt"),
            pick(self.broker_cert_file, d / "controller-client.crt"),
            pick(self.broker_key_file, d / "controller-client.key"),
        )

    def nats_tls_files(self) -> tuple[Path | None, Path | None, Path | None]:
        """(CA, client cert, client key) for the JetStream client's TLS; the CA defaults to
        the broker link's (one cluster serves MQTT and NATS), the client pair to none."""
        ca = self.nats_ca_file if self.nats_ca_file is not None else self.broker_tls_files()[0]
        return ca, self.nats_cert_file, self.nats_key_file

    @property
    def resolved_mqtt_protocol(self) -> str:
        """The protocol the bridge speaks: "3.1.1" or "5" (ValueError for anything else)."""
        if self.mqtt_protocol == "auto":  # every broker here speaks 3.1.1 (NATS nothing newer)
            return "3.1.1"
        if self.mqtt_protocol == "5" and self.resolved_broker_kind == "nats":
            raise ValueError("mqtt_protocol 5: a NATS broker speaks MQTT 3.1.1 only")
        if self.mqtt_protocol in ("3.1.1", "5"):
            return self.mqtt_protocol
        raise ValueError(f"mqtt_protocol {self.mqtt_protocol!r}: expected auto, 3.1.1 or 5")

    @property
    def use_shared_subscriptions(self) -> bool:
        """Mosquitto serves ``$share/…`` to 3.1.1 and 5 clients alike; a broker that delivers
        nothing through them (NATS, amqtt) is found out by the bridge's probe, which falls
        back to plain subscriptions. On a broker of kind "nats" there is nothing to probe."""
        return self.shared_subscriptions and self.resolved_broker_kind != "nats"

    @property
    def jetstream_urls(self) -> str | None:
        """The NATS URLs the bridge reads status, telemetry and capture from, or None (over MQTT).
        ValueError when JetStream ingest is on for a NATS broker that was given none."""
        if self.resolved_broker_kind != "nats" or not self.jetstream_ingest:
            return None
        if not self.nats_url:
            raise ValueError(
                "broker kind 'nats' reads device reports through JetStream: give the cluster's "
                "NATS client URL(s) (--nats-url nats://n1:4222,..., EDGEFLEET_CONTROLLER_NATS_URL)"
                ", or turn it off (--no-jetstream-ingest: every replica then reads every report "
                "over MQTT)"
            )
        return self.nats_url

    @property
    def resolved_broker_kind(self) -> BrokerKind:
        """`broker_kind`, checked (ValueError naming the kinds)."""
        return broker_kind(self.broker_kind)

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
        for name, conv in ENV_SETTINGS:
            value = env.get(ENV_PREFIX + name)
            if value:
                key = {
                    "DB": "db_url",
                    "BROKER": "broker_url",
                    "PACKAGES": "packages_dir",
                }.get(name, name.lower())
                updates[key] = conv(value)
        device_brokers = env.get(ENV_PREFIX + "DEVICE_BROKER_URL")
        if device_brokers:  # one URL, or several separated by commas
            updates["device_broker_urls"] = tuple(
                u.strip() for u in device_brokers.split(",") if u.strip()
            )
        for flag in ("SHARED_SUBSCRIPTIONS", "JETSTREAM_INGEST", "ACKS", "CAPTURE_ON_DRIFT"):
            value = env.get(ENV_PREFIX + flag)
            if value:
                updates[flag.lower()] = _flag(value)
        trusted = env.get(ENV_PREFIX + "TRUSTED_KEYS")
        if trusted:
            updates["trusted_keys"] = tuple(Path(p) for p in trusted.split(os.pathsep) if p)
        return replace(self, **updates)  # type: ignore[arg-type]
