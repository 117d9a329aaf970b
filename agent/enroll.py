"""Enrollment of this gateway (`edgefleet agent enroll`), certificate renewal, and `agent init
--registration`.

The device's private key is made here and never leaves the device: the controller receives a
certificate signing request (CN = the device id) and answers with the certificate its CA
signed, the CA, the broker URL(s), the controller's desired-state key, the trusted packaging
keys and the device's download token. Everything is written into one directory with
``agent.toml`` (mode 0600), ready for ``agent run --config DIR/agent.toml``.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edgefleet.wire import ids
from edgefleet.wire.atomic import atomic_write_bytes
from edgefleet.wire.message import loads_bounded

MAX_ANSWER_BYTES = 1024**2
TIMEOUT_S = 30.0


class EnrollError(Exception):
    """Enrollment or renewal failed; the message is one line that says why."""


# --- pure --------------------------------------------------------------------------------


def hostname_device_id(hostname: str | None = None) -> str | None:
    """A device id from the host name (lower case, other characters as ``-``), or None when
    even that is outside the grammar."""
    name = (hostname or socket.gethostname()).split(".")[0].lower()
    candidate = re.sub(r"[^a-z0-9._-]+", "-", name).strip("-.")
    return candidate if candidate and ids.is_valid(ids.DEVICE_ID, candidate) else None


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def csr_pem(key: ec.EllipticCurvePrivateKey, device_id: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def life_left(cert: x509.Certificate, now: datetime) -> float:
    """Fraction of the certificate's validity still ahead (1.0 new, 0.0 expired)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    total = (end - start).total_seconds()
    return 0.0 if total <= 0 else max(0.0, min(1.0, (end - now).total_seconds() / total))


def check_answer(
    answer: Mapping[str, Any], key: ec.EllipticCurvePrivateKey, device_id: str
) -> None:
    """The controller's answer must carry a certificate for our key and id, issued by the CA
    it sends; else `EnrollError` (a wrong or broken controller)."""
    for field in ("device_id", "certificate_pem", "ca_pem", "controller_key", "download_token"):
        if field not in answer:
            raise EnrollError(f"not an edgefleet controller: its answer has no {field!r}")
    try:
        cert = x509.load_pem_x509_certificate(str(answer["certificate_pem"]).encode())
        ca = x509.load_pem_x509_certificate(str(answer["ca_pem"]).encode())
        cert.verify_directly_issued_by(ca)
    except Exception as e:
        raise EnrollError(f"the controller sent a certificate that does not verify: {e}") from e
    if cert.public_key() != key.public_key():
        raise EnrollError("the controller's certificate is not for the key this device made")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [c.value for c in cns] != [device_id] or answer["device_id"] != device_id:
        raise EnrollError(f"the controller's certificate is not for device {device_id!r}")


def agent_toml(answer: Mapping[str, Any], *, http_port: int, http_host: str) -> dict[str, Any]:
    """The ``agent.toml`` values for an enrolled device (paths relative to its directory)."""
    urls = [str(u) for u in answer.get("broker_urls") or []]
    trusted = [f"keys/trusted/{i}.pub" for i, _ in enumerate(answer.get("trusted_keys") or [])]
    return {
        "device_id": answer["device_id"],
        "data_dir": "data",
        "trusted_keys": trusted,
        "controller_keys": ["keys/controller/controller.pub"],
        "revoked_key_ids": [],
        "http_host": http_host,
        "http_port": http_port,
        "admin_port": 0,
        "download_token": answer["download_token"],
        "controller_url": answer.get("controller_url") or "",
        "mqtt": {
            "url": urls[0] if urls else None,
            "tls": True,
            "ca_file": "tls/ca.crt",
            "cert_file": "tls/device.crt",
            "key_file": "tls/device.key",
            # "nats" from a controller of a NATS deployment (wire.brokerkind)
            "broker_kind": str(answer.get("broker_kind") or "mqtt"),
        },
        "telemetry": {"enabled": True, "interval_s": 10.0},
    }


# --- I/O -----------------------------------------------------------------------------------


def _post(url: str, body: Mapping[str, Any], bearer: str | None = None) -> dict[str, Any]:
    """POST JSON; the answer's JSON, or `EnrollError` with one line naming what went wrong."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as r:
            raw = r.read(MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as e:
        raw = e.read(64 * 1024)
        try:
            detail = json.loads(raw).get("detail")
        except (ValueError, AttributeError):
            detail = None
        if isinstance(detail, dict) and "code" in detail:
            raise EnrollError(f"refused: {detail['code']}: {detail.get('message')}") from e
        raise EnrollError(
            f"not an edgefleet controller at {url}: HTTP {e.code} without a reason code"
        ) from e
    except ssl.SSLError as e:
        raise EnrollError(f"TLS failed with {url}: {e.reason or e}") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            raise EnrollError(f"TLS failed with {url}: {e.reason.reason or e.reason}") from e
        raise EnrollError(f"cannot reach {url}: {e.reason}") from e
    except OSError as e:
        raise EnrollError(f"cannot reach {url}: {e}") from e
    if len(raw) > MAX_ANSWER_BYTES:
        raise EnrollError(f"not an edgefleet controller at {url}: answer over 1 MiB")
    try:
        data = loads_bounded(raw)
    except ValueError as e:
        raise EnrollError(f"not an edgefleet controller at {url}: the answer is not JSON") from e
    if not isinstance(data, dict):
        raise EnrollError(f"not an edgefleet controller at {url}: unexpected answer")
    return data


@dataclass(frozen=True)
class Enrollment:
    device_id: str
    config_path: Path
    groups: list[str]
    broker_urls: list[str]


def _write_pem(path: Path, text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode(), mode)


def enroll(
    controller: str,
    token: str,
    directory: Path,
    device_id: str,
    *,
    http_port: int = 8080,
    http_host: str = "127.0.0.1",
    force: bool = False,
) -> Enrollment:
    """Enroll this gateway and write ``directory`` (see the module doc)."""
    directory = directory.resolve()
    cfg_path = directory / "agent.toml"
    if cfg_path.exists() and not force:
        raise EnrollError(f"{cfg_path} exists (use --force to enroll again)")
    try:
        ids.device_id(device_id)
    except ids.IdentifierError as e:
        raise EnrollError(f"{e.code}: {e}") from e
    base = controller.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise EnrollError(f"--controller {controller!r}: expected http(s)://host:port")
    key = new_key()
    answer = _post(
        base + "/api/v1/enroll",
        {"token": token, "device_id": device_id, "csr_pem": csr_pem(key, device_id)},
    )
    check_answer(answer, key, device_id)
    tls = directory / "tls"
    tls.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(tls / "device.key", key_pem(key), 0o600)
    _write_pem(tls / "device.crt", str(answer["certificate_pem"]))
    _write_pem(tls / "ca.crt", str(answer["ca_pem"]))
    for kind in ("controller", "trusted"):
        (directory / "keys" / kind).mkdir(parents=True, exist_ok=True)
    ck = answer["controller_key"]
    _write_pem(directory / "keys/controller/controller.pub", str(ck["pem"]))
    for i, k in enumerate(answer.get("trusted_keys") or []):
        _write_pem(directory / f"keys/trusted/{i}.pub", str(k["pem"]))
    values = agent_toml(answer, http_port=http_port, http_host=http_host)
    if not values["controller_url"]:
        values["controller_url"] = base
    write_config(directory, values)
    return Enrollment(
        device_id,
        cfg_path,
        list(answer.get("groups") or []),
        [str(u) for u in answer.get("broker_urls") or []],
    )


def write_config(directory: Path, values: Mapping[str, Any]) -> Path:
    """``directory/agent.toml`` (mode 0600: it holds the download token), its data dir and
    admin token; the written file is loaded back, so a config that cannot load is an error."""
    from edgefleet.agent.admin import ensure_token
    from edgefleet.agent.config import dump_config, load_config

    cfg_path = directory / "agent.toml"
    atomic_write_bytes(cfg_path, dump_config(values).encode(), 0o600)
    cfg = load_config(cfg_path, env={})
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    ensure_token(cfg.admin_token_path)
    return cfg_path


def registration_values(registration: Mapping[str, Any]) -> dict[str, Any]:
    """From the JSON of `edgefleet devices register`: device id, MQTT username and password,
    download token; `EnrollError` when a field is missing."""
    out = {}
    for field in ("device_id", "mqtt_username", "mqtt_password", "download_token"):
        value = registration.get(field)
        if not isinstance(value, str) or not value:
            raise EnrollError(f"the registration has no {field!r} (from `devices register`)")
        out[field] = value
    return out


def renew(config: Any, now: datetime | None = None, *, force: bool = True) -> datetime | None:
    """Renew the client certificate of ``config`` (an `AgentConfig`) with a new key; the new
    certificate's expiry, or None when ``force`` is off and enough life is left."""
    m = config.mqtt
    if m.cert_file is None or m.key_file is None:
        raise EnrollError("mqtt.cert_file and mqtt.key_file are not set: nothing to renew")
    if not config.controller_url or not config.download_token:
        raise EnrollError("controller_url and download_token are needed to renew")
    now = now or datetime.now(UTC)
    if not force:
        cert = x509.load_pem_x509_certificate(Path(m.cert_file).read_bytes())
        if life_left(cert, now) >= config.renew_fraction:
            return None
    key = new_key()
    answer = _post(
        f"{config.controller_url.rstrip('/')}/api/v1/devices/{config.device_id}/certificate",
        {"csr_pem": csr_pem(key, config.device_id)},
        bearer=config.download_token,
    )
    check_answer({**answer, "controller_key": True, "download_token": True}, key, config.device_id)
    new_cert = x509.load_pem_x509_certificate(str(answer["certificate_pem"]).encode())
    # Both new files are complete on disk before either replaces its old one; a stop between
    # the two renames is finished by `finish_renewal` at the next start.
    atomic_write_bytes(_pending(m.key_file), key_pem(key), 0o600)
    _write_pem(_pending(m.cert_file), str(answer["certificate_pem"]))
    finish_renewal(config)
    return new_cert.not_valid_after_utc


def _pending(path: Path) -> Path:
    return Path(str(path) + ".new")


def finish_renewal(config: Any) -> bool:
    """Put a renewal's new key and certificate in place when both were written and a stop
    came before both were renamed; True when something was moved."""
    m = config.mqtt
    if m.cert_file is None or m.key_file is None:
        return False
    key_new, cert_new = _pending(m.key_file), _pending(m.cert_file)
    if not cert_new.exists():
        key_new.unlink(missing_ok=True)  # the renewal stopped before its certificate came
        return False
    if key_new.exists():
        key_new.replace(m.key_file)
    cert_new.replace(m.cert_file)
    return True
