"""`edgefleet agent check`: is this gateway's configuration able to work? (like `iotedge check`)

Each check is a function returning `Result`s; what it reads from the world (sockets, the
controller's answer, the clock, the disk, ONNX Runtime's providers) comes in through `Probes`,
so the decisions are tested without a network and the real probes with one.

`startup_problems` is the subset `agent run` refuses to start with (a service manager then sees
a non-zero exit instead of an agent that runs without its fleet link).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlparse

if TYPE_CHECKING:
    from edgefleet.agent.config import AgentConfig

Status = Literal["ok", "warn", "FAIL"]
BROKER_SCHEMES = {"mqtt": False, "tcp": False, "mqtts": True, "ssl": True}
AUTH_HINT = "Not authorized: check [mqtt] username/password or the device certificate"
SKEW_WARN_S = 5.0
SKEW_FAIL_S = 60.0  # desired states and certificates are judged by time
CERT_WARN_DAYS = 14.0
DISK_FAIL_BYTES = 64 * 1024**2
DISK_WARN_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class Result:
    name: str
    status: Status
    reason: str

    def line(self) -> str:
        return f"{self.status:<4} {self.name}: {self.reason}"


def broker_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a broker URL (None when it can): mqtt[s]://host[:port]."""
    try:
        u = urlparse(url)
        port = u.port
    except ValueError as e:
        return f"broker URL {url!r} is malformed: {e}"
    if u.scheme not in BROKER_SCHEMES:
        return (
            f"broker URL {url!r}: scheme {u.scheme or '(none)'!r} is not mqtt:// or mqtts://"
            " (an MQTT broker, not the controller's HTTP address)"
        )
    if not u.hostname:
        return f"broker URL {url!r} names no host"
    if port == 0:
        return f"broker URL {url!r}: port 0"
    return None


def broker_address(url: str, tls_flag: bool) -> tuple[str, int, bool]:
    """(host, port, tls) of a URL that `broker_url_problem` accepted."""
    u = urlparse(url)
    tls = BROKER_SCHEMES[u.scheme] or tls_flag
    return u.hostname or "127.0.0.1", u.port or (8883 if tls else 1883), tls


def _readable(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        return f"{path} is not readable: {e.strerror or e}"
    return None


def file_results(cfg: AgentConfig) -> list[Result]:
    """Keys, trust anchors and the client certificate: present and readable."""
    out: list[Result] = []
    groups: list[tuple[str, Sequence[Path | None], bool]] = [
        ("trusted keys", cfg.trusted_keys, True),
        ("controller keys", cfg.controller_keys, bool(cfg.mqtt.url)),
        ("mqtt ca_file", [cfg.mqtt.ca_file], False),
        ("mqtt cert_file", [cfg.mqtt.cert_file], False),
        ("mqtt key_file", [cfg.mqtt.key_file], False),
    ]
    for name, paths, required in groups:
        present = [p for p in paths if p is not None]
        if not present:
            if required:
                why = (
                    "none configured: no package could ever verify"
                    if name == "trusted keys"
                    else "none configured: no desired state from the controller could verify"
                )
                out.append(Result(name, "FAIL", why))
            continue
        problems = [msg for p in present if (msg := _readable(p)) is not None]
        if problems:
            out.append(Result(name, "FAIL", "; ".join(problems)))
        else:
            out.append(Result(name, "ok", ", ".join(str(p) for p in present)))
    if (cfg.mqtt.cert_file is None) != (cfg.mqtt.key_file is None):
        out.append(Result("mqtt client certificate", "FAIL", "cert_file and key_file go together"))
    return out


def startup_problems(cfg: AgentConfig) -> list[str]:
    """What makes `agent run` unable to do its job: it refuses to start with any of these."""
    problems: list[str] = []
    if cfg.mqtt.url:
        why = broker_url_problem(cfg.mqtt.url)
        if why:
            problems.append(f"[mqtt] url: {why}")
    problems += [f"{r.name}: {r.reason}" for r in file_results(cfg) if r.status == "FAIL"]
    return problems


# --- the world, injected ------------------------------------------------------------------
@dataclass(frozen=True)
class HttpAnswer:
    status: int
    date: str | None  # the Date header


def _http_get(url: str, timeout: float) -> HttpAnswer:
    req = urllib.request.Request(url, headers={"User-Agent": "edgefleet-agent-check"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return HttpAnswer(r.status, r.headers.get("Date"))
    except urllib.error.HTTPError as e:
        return HttpAnswer(e.code, e.headers.get("Date"))


def _disk_free(path: Path) -> int:
    import shutil

    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@dataclass
class Probes:
    """Everything the checks read from the world."""

    connect: Callable[[str, int, float], socket.socket] = field(
        default=lambda host, port, timeout: socket.create_connection((host, port), timeout)
    )
    http_get: Callable[[str, float], HttpAnswer] = _http_get
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    disk_free: Callable[[Path], int] = _disk_free
    providers: Callable[[], list[str]] = _providers
    timeout: float = 5.0


# --- MQTT: TCP, TLS, CONNECT --------------------------------------------------------------
CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: AUTH_HINT + " (bad user name or password)",
    5: AUTH_HINT,
}


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    """An MQTT 3.1.1 CONNECT packet (clean session, keepalive 10 s)."""
    flags = 0x02
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 10) + payload
    n, length = len(body), b""
    while True:
        byte, n = n % 128, n // 128
        length += bytes([byte | (0x80 if n else 0)])
        if not n:
            break
    return b"\x10" + length + body


def connack_result(data: bytes) -> Result:
    """The check's verdict on the broker's first 4 bytes after CONNECT."""
    if len(data) < 4 or data[0] != 0x20:
        return Result("mqtt login", "FAIL", f"the broker answered no CONNACK ({data[:8]!r})")
    code = data[3]
    if code == 0:
        return Result("mqtt login", "ok", "the broker accepted this device's credentials")
    return Result("mqtt login", "FAIL", CONNACK_REASONS.get(code, f"refused, code {code}"))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def tls_context(cfg: AgentConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cfg.mqtt.ca_file) if cfg.mqtt.ca_file else None)
    if cfg.mqtt.cert_file and cfg.mqtt.key_file:
        ctx.load_cert_chain(str(cfg.mqtt.cert_file), str(cfg.mqtt.key_file))
    return ctx


def broker_results(cfg: AgentConfig, probes: Probes) -> list[Result]:
    if not cfg.mqtt.url:
        return [Result("broker", "warn", "no [mqtt] url: this gateway is not linked to a fleet")]
    why = broker_url_problem(cfg.mqtt.url)
    if why:
        return [Result("broker", "FAIL", why)]
    host, port, tls = broker_address(cfg.mqtt.url, cfg.mqtt.tls)
    try:
        sock = probes.connect(host, port, probes.timeout)
    except OSError as e:
        return [Result("broker tcp", "FAIL", f"{host}:{port} unreachable: {e}")]
    out = [Result("broker tcp", "ok", f"{host}:{port} reachable")]
    try:
        if tls:
            try:
                wrapped = tls_context(cfg).wrap_socket(sock, server_hostname=host)
            except (ssl.SSLError, OSError) as e:
                out.append(Result("broker tls", "FAIL", f"TLS handshake with {host}:{port}: {e}"))
                return out
            sock = wrapped
            out.append(Result("broker tls", "ok", f"handshake done ({wrapped.version()})"))
        elif cfg.mqtt.password:
            out.append(Result("broker tls", "warn", "plaintext: the password crosses unencrypted"))
        sock.settimeout(probes.timeout)
        client_id = f"{cfg.mqtt.client_id or cfg.device_id}-check-{os.getpid()}"
        username = cfg.mqtt.username
        if username is None and cfg.mqtt.password is not None:
            username = cfg.device_id
        try:
            sock.sendall(connect_packet(client_id, username, cfg.mqtt.password))
            out.append(connack_result(_recv_exactly(sock, 4)))
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError as e:
            why = f"no answer to CONNECT: {e}"
            if tls and cfg.mqtt.cert_file is None:
                why += " (a broker that requires a client certificate closes the connection)"
            out.append(Result("mqtt login", "FAIL", why))
    finally:
        sock.close()
    return out


# --- the controller, the clock, the disk, the providers, the certificate --------------------
def controller_results(cfg: AgentConfig, probes: Probes) -> list[Result]:
    url = cfg.controller_url
    if not url:
        return [Result("controller", "warn", "no controller_url in the config: not checked")]
    health = url.rstrip("/") + "/healthz"
    started = probes.now()
    try:
        answer = probes.http_get(health, probes.timeout)
    except (OSError, ValueError) as e:
        return [Result("controller", "FAIL", f"{health} unreachable: {e}")]
    out = [
        Result("controller", "ok", f"{health} answered {answer.status}")
        if answer.status == 200
        else Result("controller", "FAIL", f"{health} answered {answer.status}")
    ]
    out.append(skew_result(answer.date, started, probes.now()))
    return out


def skew_result(date_header: str | None, sent: datetime, received: datetime) -> Result:
    """This clock against the controller's Date header (whole seconds: 1 s is noise)."""
    if not date_header:
        return Result("clock", "warn", "the controller sent no Date header")
    try:
        theirs = parsedate_to_datetime(date_header)
    except (TypeError, ValueError):
        return Result("clock", "warn", f"unreadable Date header {date_header!r}")
    mid = sent + (received - sent) / 2
    skew = (mid - theirs).total_seconds()
    text = f"{skew:+.0f} s against the controller"
    if abs(skew) > SKEW_FAIL_S:
        return Result("clock", "FAIL", text + " (desired states and certificates need NTP)")
    if abs(skew) > SKEW_WARN_S + 1:
        return Result("clock", "warn", text)
    return Result("clock", "ok", text)


def disk_result(cfg: AgentConfig, probes: Probes) -> Result:
    free = probes.disk_free(cfg.data_dir)
    text = f"{free / 1024**2:.0f} MiB free in {cfg.data_dir}"
    need = max(DISK_FAIL_BYTES, cfg.disk_headroom_bytes)
    if free < need:
        return Result("disk", "FAIL", text + f" (under the {need / 1024**2:.0f} MiB headroom)")
    if free < DISK_WARN_BYTES:
        return Result("disk", "warn", text)
    return Result("disk", "ok", text)


def provider_result(cfg: AgentConfig, probes: Probes) -> Result:
    from edgefleet.hardware_profiles import load_profile_facts

    try:
        have = probes.providers()
    except ImportError as e:
        return Result("execution providers", "FAIL", f"ONNX Runtime is not installed: {e}")
    if not cfg.profiles:
        return Result("execution providers", "ok", f"{', '.join(have)} (profiles by default)")
    facts = load_profile_facts()
    missing = []
    for pid in cfg.profiles:
        f = facts.get(pid)
        if f is None:
            if not pid.startswith("cpu-"):
                missing.append(f"{pid} (no such profile)")
        elif f.primary_provider not in have:
            missing.append(f"{pid} needs {f.primary_provider}")
    if missing:
        return Result(
            "execution providers", "FAIL", f"{'; '.join(missing)}; available: {', '.join(have)}"
        )
    return Result("execution providers", "ok", f"{', '.join(have)} serve {cfg.profiles}")


def certificate_result(cfg: AgentConfig, now: datetime) -> Result | None:
    if cfg.mqtt.cert_file is None:
        return None
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(Path(cfg.mqtt.cert_file).read_bytes())
    except (OSError, ValueError) as e:
        return Result("client certificate", "FAIL", f"{cfg.mqtt.cert_file}: {e}")
    left = (cert.not_valid_after_utc - now).total_seconds() / 86400
    subject = cert.subject.rfc4514_string()
    if cert.not_valid_before_utc > now:
        return Result("client certificate", "FAIL", f"{subject} is not valid before "
                      f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)")  # fmt: skip
    if left <= 0:
        return Result("client certificate", "FAIL", f"{subject} expired "
                      f"{cert.not_valid_after_utc:%Y-%m-%d} (edgefleet agent renew-cert)")  # fmt: skip
    status: Status = "warn" if left < CERT_WARN_DAYS else "ok"
    return Result("client certificate", status, f"{subject}, expires in {left:.0f} days")


def run_checks(cfg: AgentConfig, probes: Probes | None = None) -> list[Result]:
    """Every check, in the order an operator fixes things."""
    probes = probes or Probes()
    out = [Result("config", "ok", f"{cfg.config_path} parses (device {cfg.device_id})")]
    out += file_results(cfg)
    cert = certificate_result(cfg, probes.now())
    if cert is not None:
        out.append(cert)
    out += broker_results(cfg, probes)
    out += controller_results(cfg, probes)
    out.append(disk_result(cfg, probes))
    out.append(provider_result(cfg, probes))
    return out


def failed(results: Sequence[Result]) -> bool:
    return any(r.status == "FAIL" for r in results)


def refusal_hint(reason: str) -> str | None:
    """The hint for a broker's CONNACK refusal text (paho's reason string), or None."""
    low = reason.lower()
    if "not authorized" in low or "bad user name or password" in low:
        return AUTH_HINT
    return None
