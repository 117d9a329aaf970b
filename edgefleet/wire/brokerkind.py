"""What kind of broker a deployment runs, and the rules that follow from it. Pure: no I/O.

``"mqtt"`` (the default) is any MQTT 3.1.1/5 broker that carries MQTT topics as they are
(Mosquitto). ``"nats"`` is NATS Server's MQTT listener (docs/fleet.md, Clustered broker), which
differs where edgefleet feels it:

- An MQTT topic level becomes a NATS subject token: ``/`` turns into ``.``, so a ``.`` inside a
  level cannot be carried; NATS disconnects a client that publishes or subscribes to such a
  topic. A device id is a topic level (``edgefleet/v1/devices/<device id>/...``), so on NATS a
  device id must not contain ``.``: `device_id_for` refuses it, naming the reason, wherever a
  device id enters a NATS deployment (registration and enrollment on the controller, the
  agent's configuration at `agent check` and start).
- Every QoS 1 or 2 subscription is a durable JetStream consumer (a replicated RAFT group in a
  cluster), created on SUBSCRIBE and deleted when a clean session ends. A fleet whose devices
  each hold one creates and deletes thousands of consumers on every reconnect wave, more than
  a cluster's meta leader creates in its 4 s request timeout (SUBACK 0x80, no desired state
  ever arrives). A device's own subscriptions (its retained, signed desired state and the
  controller's acks) lose nothing at QoS 0 with a clean session: the desired state is retained
  and delivered again on every SUBSCRIBE, an ack that is lost makes the outbox send the report
  again, and what QoS 1 would keep for a clean session ends with the connection anyway. So on
  NATS devices subscribe at QoS 0 (`device_subscription_qos`), and no device costs a consumer.
"""

from __future__ import annotations

from typing import Literal

from edgefleet.wire.ids import DEVICE_ID, IdentifierError, device_id

BrokerKind = Literal["mqtt", "nats"]
BROKER_KINDS: tuple[BrokerKind, ...] = ("mqtt", "nats")

NATS_DOT = (
    "contains '.', which a NATS broker cannot carry inside an MQTT topic level (NATS turns "
    "'/' into its subject separator '.'); on a NATS deployment a device id is ASCII letters, "
    "digits, '_' and '-', starting with a letter or digit, 1-128 characters"
)


def broker_kind(value: object) -> BrokerKind:
    """``value`` when it names a broker kind; else ValueError naming the kinds."""
    for kind in BROKER_KINDS:
        if value == kind:
            return kind
    raise ValueError(f"broker kind {value!r}: expected one of {', '.join(BROKER_KINDS)}")


def device_id_for(kind: BrokerKind, value: object) -> str:
    """``value`` when it is a device id that a broker of ``kind`` carries; else
    `IdentifierError` (code ``invalid_device_id``) with the reason."""
    dev = device_id(value)
    if kind == "nats" and "." in dev:
        raise IdentifierError(DEVICE_ID, value, NATS_DOT)
    return dev


def device_subscription_qos(kind: BrokerKind) -> int:
    """The QoS a device subscribes to its desired state and its acks with (see above)."""
    return 0 if kind == "nats" else 1
