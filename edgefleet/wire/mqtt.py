"""The MQTT protocol: topics, message shapes, and the signed desired state.

Per device ``DEV``, under ``edgefleet/v1/devices/DEV/``:

========== ======================= ============== ==============================================
topic      direction               QoS, retain    payload
========== ======================= ============== ==============================================
desired    controller -> device    1, retained    :func:`sign_desired` envelope
status     device -> controller    1              `edgefleet.wire.status.StatusReport`
telemetry  device -> controller    1              `edgefleet.wire.telemetry.TelemetryEnvelope`
capture    device -> controller    1              `edgefleet.wire.capture.CaptureEnvelope`
                                                  (docs/capture.md)
presence   device -> controller    1, retained    `edgefleet.wire.presence.Presence`; last will
                                                  :func:`offline_will` (``"online": false``)
ack        controller -> device    1              :func:`acks_for`: the status seqs,
                                                  telemetry and capture record ids now in
                                                  the database
========== ======================= ============== ==============================================

The ack is the application-level acknowledgement: the controller sends it after the database
transaction holding those reports committed (stored, already stored, or refused for good), and
the agent's outboxes release a record only on it (PUBACK is flow control only). A device may
read its own ack topic; only the controller may write it (`cloud_controller.auth.mosquitto_acl`).
Controller replicas read device reports through MQTT 5 shared subscriptions, group
:data:`SHARE_GROUP` (``$share/edgefleet/edgefleet/v1/devices/+/status``).

The desired state is a *state*: a device that was offline catches up from the retained message.
It is signed by the controller so that a broker (or anyone who can publish on it) cannot make a
device install something; its sequence number only goes up so that old states cannot be replayed.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.wire import ids
from edgefleet.wire.capture import CaptureError
from edgefleet.wire.capture import parse_spec as parse_capture
from edgefleet.wire.errors import RejectError, ReplayError
from edgefleet.wire.keyid import key_id
from edgefleet.wire.manifest import NAME_RE, now_utc, parse_time
from edgefleet.wire.message import encode, loads_bounded
from edgefleet.wire.presence import offline
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.semver import InvalidVersion, parse_version
from edgefleet.wire.shadow import ShadowError
from edgefleet.wire.shadow import parse_spec as parse_shadow

TOPIC_PREFIX = "edgefleet/v1"
Kind = Literal["desired", "status", "telemetry", "presence", "ack", "capture"]
KINDS: tuple[Kind, ...] = ("desired", "status", "telemetry", "presence", "ack", "capture")
SHARE_GROUP = "edgefleet"
# docs/limits.md: one ack message; the controller splits larger acknowledgements.
MAX_ACK_IDS = 5000  # ids per list in one ack
MAX_ACK_BYTES = 256 * 1024
_MAX_ID = 2**63 - 1
DESIRED_ALG = "ecdsa-p256-sha256"
_DESIRED_CONTEXT = b"edgefleet desired state v1\n"


def topic(device_id: str, kind: Kind) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    if not device_id or any(c in device_id for c in "/+#\x00"):
        raise ValueError(f"device id {device_id!r} cannot be used in a topic")
    return f"{TOPIC_PREFIX}/devices/{device_id}/{kind}"


def subscription(kind: Kind) -> str:
    """Wildcard subscription for one kind of message from every device (controller side)."""
    return f"{TOPIC_PREFIX}/devices/+/{kind}"


def parse_topic(name: str) -> tuple[str, Kind] | None:
    """``(device_id, kind)`` for an edgefleet topic, else None."""
    parts = name.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{TOPIC_PREFIX}/devices" or parts[4] not in KINDS:
        return None
    return parts[3], parts[4]


def _signed_bytes(payload: bytes) -> bytes:
    return _DESIRED_CONTEXT + payload


def sign_desired(state: dict[str, Any], private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The envelope to publish: ``{"payload": b64(json), "sig": b64, "key_id", "alg"}``."""
    validate_desired(state)
    payload = json.dumps(state, sort_keys=True, separators=(",", ":")).encode()
    sig = private_key.sign(_signed_bytes(payload), ec.ECDSA(hashes.SHA256()))
    envelope = {
        "alg": DESIRED_ALG,
        "key_id": key_id(private_key.public_key()),
        "payload": base64.b64encode(payload).decode(),
        "sig": base64.b64encode(sig).decode(),
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def _bad(msg: str) -> RejectError:
    return RejectError(ReasonCode.MANIFEST_INVALID, f"desired state: {msg}")


def validate_desired(state: Any) -> dict[str, Any]:
    """Structure of a desired state (pure)."""
    if not isinstance(state, dict):
        raise _bad("not an object")
    for f in ("device_id", "issued_at", "expires_at"):
        if not isinstance(state.get(f), str):
            raise _bad(f"{f} missing or not a string")
    if not ids.is_valid(ids.DEVICE_ID, state["device_id"]):
        raise _bad(f"device_id {state['device_id']!r} is outside the device id grammar")
    seq = state.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise _bad("seq missing or not a non-negative integer")
    try:
        parse_time(state["issued_at"])
        parse_time(state["expires_at"])
    except ValueError as e:
        raise _bad(f"bad time: {e}") from e
    models = state.get("models")
    if not isinstance(models, dict):
        raise _bad("models missing or not an object")
    for name, spec in models.items():
        if not NAME_RE.match(name) or not isinstance(spec, dict):
            raise _bad(f"bad model entry {name!r}")
        if spec.get("profile") is not None and not ids.is_valid(ids.PROFILE, spec["profile"]):
            raise _bad(f"model {name!r}: profile {spec['profile']!r} is not a profile id")
        try:
            parse_version(str(spec.get("version")))
        except InvalidVersion as e:
            raise _bad(f"model {name!r}: {e}") from e
        if not isinstance(spec.get("url"), str) or not isinstance(spec.get("sha256"), str):
            raise _bad(f"model {name!r} needs url and sha256")
        # Optional: the rollout's probation latency ratio for this model (agent docs, Probation).
        ratio = spec.get("max_p95_ratio")
        if ratio is not None and (
            isinstance(ratio, bool)
            or not isinstance(ratio, int | float)
            or not math.isfinite(ratio)
            or ratio <= 0
        ):
            raise _bad(f"model {name!r}: max_p95_ratio must be a positive number")
        # Optional: run the version in shadow first (docs/shadow.md).
        try:
            parse_shadow(spec.get("shadow"))
        except ShadowError as e:
            raise _bad(f"model {name!r}: {e}") from e
        # Optional: capture a sample of inputs and outputs (docs/capture.md).
        try:
            parse_capture(spec.get("capture"))
        except CaptureError as e:
            raise _bad(f"model {name!r}: {e}") from e
    # Explicit removal only: a model merely absent from `models` is left alone (it may have been
    # installed locally by an operator); one named here must stop serving and be uninstalled.
    remove = state.get("remove", [])
    if not isinstance(remove, list):
        raise _bad("remove is not a list")
    for name in remove:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _bad(f"bad model name in remove: {name!r}")
        if name in models:
            raise _bad(f"model {name!r} is both desired and to be removed")
    if len(set(remove)) != len(remove):
        raise _bad("remove names a model twice")
    return state


def verify_desired(
    raw: bytes,
    trusted: Collection[ec.EllipticCurvePublicKey],
    *,
    device_id: str,
    last_seq: int | None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Verify and decode a desired-state envelope for ``device_id``.

    Raises :class:`RejectError` (unsigned, bad signature, unknown key, wrong device, expired,
    malformed) or :class:`ReplayError` when ``seq`` is not newer than ``last_seq``.
    """
    try:
        env = loads_bounded(raw)
    except ValueError as e:  # not JSON, too deep, an integer of 5000 digits, NaN
        raise RejectError(
            ReasonCode.SIGNATURE_INVALID, "desired state is not a JSON envelope"
        ) from e
    if not isinstance(env, dict) or not isinstance(env.get("sig"), str) or "payload" not in env:
        raise RejectError(ReasonCode.SIGNATURE_MISSING, "desired state is not signed")
    if env.get("alg") != DESIRED_ALG:
        raise RejectError(
            ReasonCode.SIGNATURE_INVALID, f"unsupported signature algorithm {env.get('alg')!r}"
        )
    by_id = {key_id(k): k for k in trusted}
    key = by_id.get(str(env.get("key_id")))
    if key is None:
        raise RejectError(
            ReasonCode.UNTRUSTED_KEY, f"desired state signed by unknown key {env.get('key_id')}"
        )
    try:
        payload = base64.b64decode(env["payload"], validate=True)
        sig = base64.b64decode(env["sig"], validate=True)
        key.verify(sig, _signed_bytes(payload), ec.ECDSA(hashes.SHA256()))
    except (binascii.Error, ValueError, TypeError, InvalidSignature) as e:
        raise RejectError(
            ReasonCode.SIGNATURE_INVALID, "desired state signature does not verify"
        ) from e
    try:
        decoded = loads_bounded(payload)
    except ValueError as e:  # not UTF-8, not JSON, too deep, an integer of 5000 digits, NaN
        raise _bad(f"payload is not acceptable JSON: {e}") from e
    state = validate_desired(decoded)
    if state["device_id"] != device_id:
        raise RejectError(
            ReasonCode.DEVICE_MISMATCH,
            f"desired state is for {state['device_id']!r}, not {device_id!r}",
        )
    if last_seq is not None and state["seq"] <= last_seq:
        raise ReplayError(f"sequence {state['seq']} is not newer than {last_seq}")
    if parse_time(state["expires_at"]) <= (now or now_utc()):
        raise RejectError(ReasonCode.EXPIRED, f"desired state expired at {state['expires_at']}")
    return state


@dataclass(frozen=True)
class Ack:
    """What the controller committed: status report seqs, telemetry record ids."""

    status: tuple[int, ...] = ()
    telemetry: tuple[int, ...] = ()
    capture: tuple[int, ...] = ()


def acks_for(
    status: Sequence[int], telemetry: Sequence[int], capture: Sequence[int] = ()
) -> list[bytes]:
    """Ack payloads for these ids (as many messages as :data:`MAX_ACK_IDS` makes needed):
    ``{"v": 1, "status": [...], "telemetry": [...]}``, with ``"capture": [...]`` when there
    are capture record ids (an agent without capture never sees the key)."""
    st = sorted(set(status))
    tl = sorted(set(telemetry))
    cp = sorted(set(capture))
    out: list[bytes] = []
    for i in range(0, max(len(st), len(tl), len(cp)), MAX_ACK_IDS):
        body: dict[str, Any] = {
            "v": 1,
            "status": st[i : i + MAX_ACK_IDS],
            "telemetry": tl[i : i + MAX_ACK_IDS],
        }
        if cp[i : i + MAX_ACK_IDS]:
            body["capture"] = cp[i : i + MAX_ACK_IDS]
        out.append(json.dumps(body, separators=(",", ":")).encode())
    return out


def parse_ack(raw: bytes) -> Ack:
    """An ack from its bytes (pure); `RejectError` (``ack_invalid``) names what is wrong. The
    size is checked before any parsing; every id is an integer in 0..2**63-1."""
    if len(raw) > MAX_ACK_BYTES:
        raise RejectError(ReasonCode.ACK_INVALID, f"ack of {len(raw)} bytes > {MAX_ACK_BYTES}")
    try:
        msg = loads_bounded(raw)
    except ValueError as e:
        raise RejectError(ReasonCode.ACK_INVALID, f"ack is not JSON: {e}") from e
    if not isinstance(msg, dict) or msg.get("v") != 1:
        raise RejectError(ReasonCode.ACK_INVALID, "ack is not a version 1 object")
    lists: list[tuple[int, ...]] = []
    for name in ("status", "telemetry", "capture"):
        ids_ = msg.get(name, [])
        if not isinstance(ids_, list) or len(ids_) > MAX_ACK_IDS:
            raise RejectError(
                ReasonCode.ACK_INVALID, f"ack {name}: not a list of at most {MAX_ACK_IDS} ids"
            )
        for i in ids_:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i <= _MAX_ID:
                raise RejectError(ReasonCode.ACK_INVALID, f"ack {name}: {i!r} is not an id")
        lists.append(tuple(ids_))
    return Ack(lists[0], lists[1], lists[2])


def offline_will(device_id: str) -> bytes:
    """The presence last will: retained, so the controller sees a device that dropped."""
    return encode(offline(device_id).to_dict())
