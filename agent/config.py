"""Agent configuration: a TOML file, overridden by EDGEFLEET_AGENT_<FIELD> environment variables.

Nested tables are overridden as EDGEFLEET_AGENT_<TABLE>_<FIELD> (e.g. EDGEFLEET_AGENT_MQTT_URL).
Relative paths in the file are resolved against the file's directory.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from edgefleet.agent.oip import ServingLimits
from edgefleet.hardware_profiles import device_profiles

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    _D = TypeVar("_D", bound=DataclassInstance)

ENV_PREFIX = "EDGEFLEET_AGENT_"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


def default_profiles(providers: list[str] | None = None) -> list[str]:
    """Profiles this machine can run: one per accelerator provider, then its CPU profile, as the
    shipped profile files (`edgefleet.hardware_profiles`) map them."""
    return device_profiles(providers or [], platform.machine())


@dataclass
class SwapConfig:
    """How ACTIVATING swaps sessions."""

    mode: str = "auto"  # auto | overlap | unload_first
    memory_budget_mb: float | None = None  # None: psutil's available memory
    queue_max: int = 256  # requests held during an unload-first gap
    queue_timeout_s: float = 30.0


@dataclass
class ProbationConfig:
    """What PROBATION watches before COMMITTED (docs/agent.md, "Probation").

    Latency is judged like with like: the new version's ``session.run`` time per sample (the
    request's batch size) against the previous version's, measured on this device while it
    served (the model's rolling serving record). A first install, or a previous version with
    too few recorded requests, is judged against the package's recorded benchmark (per sample)
    with the wider ``first_install_*`` tolerance. The probation is cut in windows of
    ``window_s`` seconds; a window with at least ``min_requests`` requests is judged, and the
    latency gate fails only when ``sustained_windows`` judged windows in a row breach it.
    """

    seconds: float = 10.0
    min_requests: int = 20  # per window: below this, error rate and latency are not judged
    max_error_rate: float = 0.05
    # serving p95 per sample may be at most max_p95_ratio x the previous version's + slack
    max_p95_ratio: float = 1.5
    latency_slack_ms: float = 1.0
    # first install: at most first_install_factor x the package's benchmark p95 + slack
    first_install_factor: float = 10.0
    first_install_slack_ms: float = 5.0
    window_s: float = 2.0
    sustained_windows: int = 2
    history_requests: int = 512  # per-sample latencies kept in a model's serving record
    commit_after_requests: int | None = None  # commit early after this many healthy requests


@dataclass
class ValidationConfig:
    """On-device benchmark of VALIDATING."""

    bench_runs: int = 50
    bench_warmup: int = 5
    bench_max_seconds: float = 10.0


@dataclass
class MqttConfig:
    """The fleet link (`agent.mqtt.link`): broker, credentials, TLS."""

    url: str | None = None
    # Several brokers (the nodes of a cluster): tried in order, the next one on every lost or
    # refused connection (edgefleet.wire.backoff). ``url``, when also set, comes first.
    urls: list[str] = field(default_factory=list)
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    # The device's client certificate and key (`agent enroll`): the broker takes its id from
    # the certificate, so no username/password is needed.
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str | None = None
    keepalive_s: int = 30
    # When a report leaves the outbox (docs/fleet.md, Acknowledgements): "on" only on the
    # controller's ack (after its database commit); "off" on the broker's PUBACK (controllers
    # that never ack); "auto" on PUBACK until the first ack arrives, then "on" for good.
    controller_acks: str = "auto"
    # "mqtt" (any MQTT broker) or "nats" (NATS Server's MQTT listener): on NATS the device id
    # may not contain '.', and the device subscribes at QoS 0 (edgefleet.wire.brokerkind).
    broker_kind: str = "mqtt"

    @property
    def brokers(self) -> list[str]:
        """Every broker to try, in order: ``url`` first, then ``urls``; empty: no fleet link."""
        from edgefleet.wire.backoff import split_urls

        return split_urls([*([self.url] if self.url else []), *self.urls])


@dataclass
class TelemetryConfig:
    """``[telemetry]``: read by ``agent.telemetry.service.TelemetrySettings.from_config``."""

    enabled: bool = True
    interval_s: float = 10.0
    outbox_max_bytes: int = 16 * 1024 * 1024
    system: bool = True  # CPU, memory, disk, temperature records
    sample_inputs: bool = False  # raw inputs leave the device only when this is on
    sample_rate: float = 0.01  # fraction of requests sampled when it is
    sample_max_per_window: int = 10
    flush_rows: int = 1024  # sketch counting is batched off the request path ...
    flush_bytes: int = 8 * 1024 * 1024  # ... and flushed at this many rows or bytes


@dataclass
class CaptureConfig:
    """``[capture]``: capture on demand (docs/capture.md). Off unless this device opts in:
    with ``allowed = false`` a capture the controller asks for is refused (``capture_forbidden``,
    reported once) and no raw input or output ever leaves the device."""

    allowed: bool = False
    outbox_max_bytes: int = 32 * 1024 * 1024  # captured rows waiting for the controller's ack
    queue: int = 64  # sampled requests waiting to be written; more are dropped (counted)


@dataclass
class ShadowConfig:
    """``[shadow]``: a candidate version evaluated next to the serving one (docs/shadow.md)."""

    # Load the candidate only when (its validation memory growth, else its model file size) x
    # this factor, plus memory_headroom_mb, fits in the available memory.
    memory_factor: float = 2.0
    queue: int = 16  # mirrored requests waiting for the candidate; more are dropped (counted)
    queue_bytes: int = 64 * 2**20  # ... and their inputs and outputs together, at most
    threads: int = 1  # ONNX Runtime intra-op threads of the candidate: it must not starve serving
    nice: int = 10  # scheduling niceness of the candidate's thread (Linux), 0: as serving
    max_seconds: float = 6 * 3600.0  # without a decision from the controller: give the shadow up


@dataclass
class AgentConfig:
    device_id: str
    data_dir: Path
    trusted_keys: list[Path] = field(default_factory=list)
    revoked_key_ids: list[str] = field(default_factory=list)
    controller_keys: list[Path] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)  # empty: default_profiles()
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 0  # 0: a free port, written to DATA_DIR/admin.json
    admin_max_connections: int = 8  # admin connections handled at once (docs/limits.md)
    admin_timeout_s: float = 10.0  # idle / slow admin connections are closed after this
    max_package_bytes: int = 2 * 1024**3
    disk_headroom_bytes: int = 64 * 1024**2
    memory_headroom_mb: float = 32.0
    keep_versions: int = 2  # current + previous; older ones are pruned
    keep_updates: int = 200  # finished update records kept in the journal
    intra_op_threads: int = 0  # ONNX Runtime threads per session; 0 = its default
    allow_spinning: bool = False  # ORT worker threads spin between runs: CPU burnt on a gateway
    download_timeout_s: float = 30.0
    # The device's package-download token from the controller (`devices register`). Sent as a
    # Bearer header only for packages named by the controller's signed desired state.
    download_token: str = ""
    # The controller's URL (`agent enroll` writes it): where the certificate is renewed.
    controller_url: str = ""
    # `agent run` renews the client certificate when less than this fraction of its life is
    # left (checked at start and every renew_check_s); 0 turns it off.
    renew_fraction: float = 1 / 3
    renew_check_s: float = 3600.0
    download_retries: int = 5
    download_min_rate: int = 1024  # bytes/s averaged over download_rate_window_s, else abandoned
    download_rate_window_s: float = 30.0
    download_deadline_s: float = 3600.0  # one package download, every retry included
    # How often the update worker looks for a change of the trusted key files; on a change,
    # a serving model signed by a key no longer trusted stops serving. 0: only at start.
    trust_check_s: float = 5.0
    swap: SwapConfig = field(default_factory=SwapConfig)
    probation: ProbationConfig = field(default_factory=ProbationConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    serving: ServingLimits = field(default_factory=ServingLimits)  # the inference API's limits
    shadow: ShadowConfig = field(default_factory=ShadowConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    config_path: Path | None = None

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / "admin.token"

    @property
    def admin_info_path(self) -> Path:
        return self.data_dir / "admin.json"


def _coerce(value: object, tp: object, name: str, base: Path) -> object:
    """``value`` (a TOML value, or an environment string) as the field's type hint ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, base)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], name, base) for v in value]
    if tp is Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else (base / p)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected a boolean, got {value!r}")
    if tp is str:
        return str(value)
    if tp is int or tp is float:
        try:
            if not isinstance(value, str | int | float):  # int() and float() refuse these too
                raise TypeError(f"{type(value).__name__} is not a number")
            return int(value) if tp is int else float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from e
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name}: expected a table")
        return _build(tp, value, name + ".", base)
    return value


def _build(cls: type[_D], raw: Mapping[str, object], prefix: str, base: Path) -> _D:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(prefix + u for u in sorted(unknown))}")
    kwargs = {k: _coerce(v, hints[k], prefix + k, base) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _env_overrides(env: Mapping[str, str]) -> dict[str, str | dict[str, str]]:
    out: dict[str, str | dict[str, str]] = {}
    tables = {
        f.name
        for f in dataclasses.fields(AgentConfig)
        if dataclasses.is_dataclass(f.default_factory)
    }
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX) :].lower()
        table = next((t for t in tables if name.startswith(t + "_")), None)
        if table is not None:
            sub = out.setdefault(table, {})
            if isinstance(sub, dict):  # a str: EDGEFLEET_AGENT_<TABLE> itself, refused later
                sub[name[len(table) + 1 :]] = value
        elif name in {f.name for f in dataclasses.fields(AgentConfig)}:
            out[name] = value
    return out


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the TOML file (optional) and apply environment overrides."""
    env = os.environ if env is None else env
    raw: dict[str, object] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path).resolve()
        try:
            raw = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        base = path.parent
    for key, value in _env_overrides(env).items():
        if isinstance(value, dict):
            table = raw.setdefault(key, {})
            if isinstance(table, dict):  # not a table in the file: _build refuses it
                table.update(value)
        else:
            raw[key] = value
    for required in ("device_id", "data_dir"):
        if not raw.get(required):
            raise ConfigError(f"{required} is required")
    raw.pop("config_path", None)
    cfg = _build(AgentConfig, raw, "", base)
    cfg.config_path = path
    from edgefleet.wire import ids
    from edgefleet.wire.brokerkind import broker_kind, device_id_for

    try:
        kind = broker_kind(cfg.mqtt.broker_kind)
    except ValueError as e:
        raise ConfigError(f"mqtt.broker_kind: {e}") from e
    try:  # it becomes the broker user, topic level and log label: one grammar (wire.ids)
        device_id_for(kind, cfg.device_id)  # on NATS also without '.'
    except ids.IdentifierError as e:
        raise ConfigError(f"device_id: {e}") from e
    from edgefleet.wire.keyid import canonical_key_ids

    try:  # one canonical key-id form: a revocation that names no key is an error, not a no-op
        cfg.revoked_key_ids = sorted(canonical_key_ids(cfg.revoked_key_ids))
    except ids.IdentifierError as e:
        raise ConfigError(f"revoked_key_ids: {e}") from e
    _check_probation(cfg.probation)
    if cfg.mqtt.controller_acks not in ("auto", "on", "off"):
        raise ConfigError(
            f"mqtt.controller_acks: expected auto, on or off, got {cfg.mqtt.controller_acks!r}"
        )
    if cfg.swap.mode not in ("auto", "overlap", "unload_first"):
        raise ConfigError(
            f"swap.mode: expected auto, overlap or unload_first, got {cfg.swap.mode!r}"
        )
    return cfg


def _check_probation(p: ProbationConfig) -> None:
    import math

    for name in ("max_p95_ratio", "first_install_factor", "window_s", "seconds"):
        v = getattr(p, name)
        if not math.isfinite(v) or v <= 0:
            raise ConfigError(f"probation.{name}: expected a positive number, got {v!r}")
    for name in ("latency_slack_ms", "first_install_slack_ms"):
        v = getattr(p, name)
        if not math.isfinite(v) or v < 0:
            raise ConfigError(f"probation.{name}: expected a number >= 0, got {v!r}")
    if not 0 <= p.max_error_rate <= 1:
        raise ConfigError(f"probation.max_error_rate: expected 0..1, got {p.max_error_rate!r}")
    if p.sustained_windows < 1 or p.min_requests < 0 or p.history_requests < 1:
        raise ConfigError(
            "probation: sustained_windows and history_requests must be >= 1, min_requests >= 0"
        )


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def dump_config(values: Mapping[str, object]) -> str:
    """Write a flat-plus-tables mapping as TOML (enough for `agent init`)."""
    lines: list[str] = []
    tables: list[tuple[str, Mapping[str, object]]] = []
    for k, v in values.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items() if v is not None]
    return "\n".join(lines) + "\n"
