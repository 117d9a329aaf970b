"""The controller's MQTT client: device presence/status/telemetry in, desired states out.

paho's network thread only queues messages; one worker thread drains the queue in batches, one
transaction per batch, so thousands of status messages a second do not mean thousands of
commits. On every (re)connect the current desired state of every device is published again
(retained, same seq), so a broker that lost its retained messages is repaired.

Replicas (docs/controller.md, Replicas): device reports come through MQTT shared subscriptions
(``$share/edgefleet/...``) so that each reaches one replica; desired states are published by
the leader only (`RolloutService.may_publish`). After each batch's transaction commits, every
message in it is acknowledged to its device on ``.../ack`` (`wire.mqtt.encode_ack`): the agent
keeps a report in its outbox until then, so nothing is lost whatever the broker's sessions keep.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session, load_only, sessionmaker

from edgefleet.cloud_controller import desired, devices
from edgefleet.cloud_controller import rollout_engine as E
from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.desired import Signer
from edgefleet.cloud_controller.jetstream import KINDS, JetStreamIngest
from edgefleet.cloud_controller.models import Device
from edgefleet.cloud_controller.rollouts import RolloutService
from edgefleet.wire import ids
from edgefleet.wire.backoff import Failover, connect_failure, split_urls
from edgefleet.wire.capture import CaptureEnvelope, record_id
from edgefleet.wire.capture import parse_envelope as parse_capture
from edgefleet.wire.message import MessageError, loads_object
from edgefleet.wire.presence import Presence
from edgefleet.wire.presence import parse as parse_presence
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.states import SUCCESS_STATES, UpdateState
from edgefleet.wire.status import StatusReport
from edgefleet.wire.status import parse as parse_status
from edgefleet.wire.telemetry import TelemetryEnvelope
from edgefleet.wire.telemetry import parse as parse_telemetry

log = logging.getLogger(__name__)
BATCH = 500
# Refusals counted under the names they had before the wire parsers (dashboards read them).
# Each parser checks the message's device id against its topic's.
_DROP_NAMES = {
    "status_bad_seq": "status_no_seq",
    "telemetry_bad_records": "telemetry_refused",
    **{
        f"{kind}_bad_device_id": f"{kind}_device_mismatch"
        for kind in ("status", "presence", "telemetry")
    },
}


@dataclass(frozen=True)
class Decoded:
    """One message that passed its parser: what `_apply` writes."""

    device_id: str
    kind: str
    raw: dict[str, Any]
    parsed: Presence | StatusReport | TelemetryEnvelope | CaptureEnvelope


# docs/limits.md, Controller: the largest message of each kind the bridge reads.
MAX_MESSAGE_BYTES = {
    "presence": 64 * 1024,
    "status": 64 * 1024,
    "telemetry": 1024**2,
    "capture": 2 * 1024**2,
}


def _held_seq(msg: Presence | StatusReport | TelemetryEnvelope | CaptureEnvelope) -> int | None:
    """The desired seq a message says its device holds (wire.presence, wire.status)."""
    if isinstance(msg, Presence):
        return msg.desired_seq
    if isinstance(msg, StatusReport) and (
        msg.kind == "update" or msg.reason_code == ReasonCode.REPLAYED
    ):
        return msg.desired_seq
    return None


# The columns the bridge reads from a device's row; the others (labels, hardware, the last
# status it overwrites) are only written, so they are not loaded and decoded from JSON for
# every device of every batch. One it reads elsewhere is loaded on first access.
_BRIDGE_COLUMNS = load_only(
    Device.id,
    Device.online,
    Device.installed,
    Device.last_seen,
    Device.last_status_seq,
    Device.recent_status_seqs,
    Device.out_of_sync_since,
    Device.revoked_at,
)


@dataclass
class BridgeStats:
    received: dict[str, int] = field(
        default_factory=lambda: {"status": 0, "presence": 0, "telemetry": 0, "capture": 0}
    )
    dropped: dict[str, int] = field(default_factory=dict)
    published: int = 0
    acks: int = 0  # ack messages sent to devices (each acknowledges one or more reports)
    connected: bool = False
    stale_sequence: int = 0  # reports of a device holding a newer desired seq than ours
    failovers: int = 0  # connections lost or refused, each followed by the next broker
    subscribe_refused: int = 0  # SUBACKs refusing a subscription (retried with backoff)
    capture_rows: int = 0  # capture records stored (refusals: dropped["capture_…"])
    # batches whose rollout step failed: their status reports stay unacknowledged
    rollout_step_failures: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # CONNACK refusals by reason
    # attempts that failed before any CONNACK (TLS, refused, timeout: `backoff.connect_failure`)
    connect_failed: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        u = urlsplit(url if "://" in url else "mqtt://" + url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
        tls = u.scheme in ("mqtts", "ssl")
        return cls(
            u.hostname or "127.0.0.1",
            u.port or (8883 if tls else 1883),
            unquote(u.username) if u.username else None,
            unquote(u.password) if u.password else None,
            tls,
        )


def _tls(client: Any, files: tuple[Path | None, Path | None, Path | None]) -> None:
    """TLS with the given CA (else the system's) and client certificate, when given."""
    ca, cert, key = files
    client.tls_set(
        ca_certs=str(ca) if ca else None,
        certfile=str(cert) if cert else None,
        keyfile=str(key) if key else None,
    )


def broker_addresses(broker_url: str) -> list[BrokerAddress]:
    """A comma-separated list of broker URLs, parsed (ValueError names the bad one). One TLS
    setting per bridge: a list mixing mqtt:// and mqtts:// is refused, not half-secured."""
    addresses = [BrokerAddress.parse(u) for u in split_urls(broker_url)]
    if not addresses:
        raise ValueError("no broker URL")
    if len({a.tls for a in addresses}) > 1:
        raise ValueError("broker URLs mix mqtt:// and mqtts://: use TLS on every node or none")
    return addresses


class MqttBridge:
    def __init__(
        self,
        broker_url: str,
        factory: sessionmaker[Session],
        rollouts: RolloutService,
        client_id: str | None = None,
        batch_size: int = BATCH,
        max_bytes: dict[str, int] | None = None,
        signer: Signer | None = None,
        tls_files: tuple[Path | None, Path | None, Path | None] = (None, None, None),
        shared: bool = True,
        acks: bool = True,
        protocol: str = "3.1.1",
        jetstream_urls: str | None = None,
        jetstream_ack_wait_s: float = 30.0,
        jetstream_tls_files: tuple[Path | None, Path | None, Path | None] = (None, None, None),
    ) -> None:
        """``broker_url``: one URL or a comma-separated list (the nodes of a cluster), tried in
        order and in turn after every lost connection. ``protocol``: "3.1.1" or "5".
        ``jetstream_urls``: on a NATS cluster, its NATS client URLs: status, telemetry and
        capture are then read through JetStream (`jetstream.JetStreamIngest`), not subscribed
        over MQTT."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.batch_size = batch_size
        self.max_bytes = {**MAX_MESSAGE_BYTES, **(max_bytes or {})}
        self._signer = signer  # to continue a device's sequence above what it holds
        self.shared = shared  # $share/edgefleet/... subscriptions (replicas split the reports)
        # Whether the broker delivers shared subscriptions: None until the probe message (sent
        # on each connect while unknown) comes back through one, False after it did not.
        self.shared_works: bool | None = None
        self.probe_timeout_s = 5.0
        self._probe_id = uuid.uuid4().hex[:12]
        self.acks = acks  # acknowledge every committed report to its device
        self.addresses = broker_addresses(broker_url)
        self.failover = Failover([str(i) for i in range(len(self.addresses))], cap_s=5.0)
        self.protocol = protocol
        self._factory = factory
        self._rollouts = rollouts
        from edgefleet.cloud_controller.capture.service import RateWindow

        self._capture_rate = RateWindow()  # rows per minute per (capture, device): floods
        self.stats = BridgeStats()
        # (device id, kind, payload, its JetStream message to acknowledge, or None)
        self._queue: queue.Queue[tuple[str, str, bytes, Any]] = queue.Queue()
        self.jetstream: JetStreamIngest | None = None
        self._handles: list[Any] = []  # the JetStream messages of the batch at work
        if jetstream_urls:
            self.jetstream = JetStreamIngest(
                jetstream_urls,
                self._queue.put,
                ack_wait_s=jetstream_ack_wait_s,
                max_in_flight=4 * batch_size,
                tls_files=jetstream_tls_files,
            )
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        # A fixed client id with a persistent session: the broker keeps the QoS 1 status
        # messages devices send while the controller restarts. On a cluster the session lives in
        # the cluster (NATS: JetStream), so the next node of the list resumes it. Not with shared
        # subscriptions: Mosquitto goes on queueing a share of the reports for a member that is
        # away (a replica killed for good would hold its share forever), so a replica's session
        # ends with its connection and the reports go to the live ones; what was in flight to a
        # replica that died is sent again by the agent, which keeps it until the ack.
        self._persistent = client_id is not None and not shared
        cid = client_id or f"edgefleet-controller-{uuid.uuid4().hex[:8]}"
        if protocol == "5":
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5
            )
        elif protocol == "3.1.1":
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=cid,
                clean_session=not self._persistent,
                protocol=mqtt.MQTTv311,
            )
        else:
            raise ValueError(f"mqtt protocol {protocol!r}: expected 3.1.1 or 5")
        self._tls_files = tls_files
        if self.address.tls:
            _tls(self._client, tls_files)
        self._client.max_queued_messages_set(0)
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(1, 5)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._subscribe_failures = 0
        self._last_connect_failure: str | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="mqtt-bridge", daemon=True)
        self._worker.start()
        self._connect_async()
        self._client.loop_start()
        if self.jetstream is not None:  # after the MQTT connection, which creates its stream
            self.jetstream.start()

    @property
    def address(self) -> BrokerAddress:
        """The broker this bridge is connected or connecting to."""
        return self.addresses[self.failover.index]

    def _connect_async(self) -> None:
        """Aim paho's next (re)connection at `address`, with its credentials."""
        from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        a = self.address
        if a.username:
            self._client.username_pw_set(a.username, a.password)
        else:
            self._client.username_pw_set(None)
        if self.protocol == "5":
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            # MQTT 5's form of clean_session=False: the session outlives the connection.
            props.SessionExpiryInterval = 0xFFFFFFFF if self._persistent else 0
            self._client.connect_async(
                a.host,
                a.port,
                keepalive=30,
                clean_start=False if self._persistent else MQTT_CLEAN_START_FIRST_ONLY,
                properties=props,
            )
        else:
            self._client.connect_async(a.host, a.port, keepalive=30)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker is not None:
            self._worker.join(timeout)
        if self.jetstream is not None:  # after the worker: the batch at work is acked
            self.jetstream.stop()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats.connected:
                return True
            time.sleep(0.02)
        return False

    def publish(self, topic: str, payload: bytes) -> None:
        """Retained, QoS 1; paho queues it while the broker is away."""
        self._client.publish(topic, payload, qos=1, retain=True)
        self.stats.published += 1

    def take_over(self, client_id: str, timeout: float = 5.0) -> bool:
        """Connect once with ``client_id`` so that the broker closes the connection a client
        holds with that id (MQTT's session take-over): a device just revoked is cut off now,
        and its reconnection meets the reloaded CRL. True when the broker accepted."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        if self.address.username:
            c.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            _tls(c, self._tls_files)
        try:
            c.connect(self.address.host, self.address.port, keepalive=10)
            c.loop_start()
            ok = False
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not (ok := c.is_connected()):
                time.sleep(0.02)
            c.disconnect()
            c.loop_stop()
            return ok
        except (OSError, ValueError) as e:
            log.warning("could not take over the session of %s: %s", client_id, e)
            return False

    def request_republish(self) -> None:
        """Publish every desired state again (the worker; the leader only)."""
        self._queue.put(("", "republish", b"", None))

    def subscriptions(self, shared_filters: bool = False) -> list[str]:
        """The device-report filters: status, telemetry and capture shared
        (`$share/edgefleet/…`) unless turned off (none of them on NATS: JetStream). Presence
        is retained, and a shared subscription gets no retained messages (MQTT 5, 4.8.2): every
        replica reads every presence (a state: writing it twice changes nothing), so a replica
        that starts learns the fleet as it is."""
        from edgefleet.wire.mqtt import SHARE_GROUP, Kind, subscription

        # on NATS they come through JetStream instead, shared by the replicas (jetstream.py)
        kinds: tuple[Kind, ...] = (
            () if self.jetstream is not None else ("status", "telemetry", "capture")
        )
        reports = [subscription(k) for k in kinds]
        if self.shared and (shared_filters or self.shared_works is not False):
            reports = [f"$share/{SHARE_GROUP}/{f}" for f in reports]
        return [*reports, subscription("presence")]

    @property
    def _probe_topic(self) -> str:
        from edgefleet.wire.mqtt import TOPIC_PREFIX

        return f"{TOPIC_PREFIX}/controllers/{self._probe_id}/probe"

    def _probe(self, client: Any) -> None:
        """Find out whether shared subscriptions work here: subscribe to a probe topic through
        one and publish to it. Brokers without them (amqtt; NATS's MQTT 3.1.1) take the
        `$share/…` filter as a plain topic name and deliver nothing: after
        ``probe_timeout_s`` the bridge falls back to plain subscriptions (each replica then
        reads every report; the database still stores each once, and what a device sent in
        the meantime comes again, unacknowledged)."""
        from edgefleet.wire.mqtt import SHARE_GROUP

        client.subscribe(f"$share/{SHARE_GROUP}/{self._probe_topic}", qos=1)
        client.publish(self._probe_topic, b"probe", qos=1)
        timer = threading.Timer(self.probe_timeout_s, self._probe_expired, args=(client,))
        timer.daemon = True
        timer.start()

    def _probe_expired(self, client: Any) -> None:
        if self.shared_works is not None or self._stop.is_set():
            return
        from edgefleet.wire.mqtt import SHARE_GROUP

        self.shared_works = False
        log.error(
            "the broker delivers nothing through shared subscriptions ($share/...): plain "
            "subscriptions instead, every replica reads every report "
            "(turn them off: --no-shared-subscriptions)"
        )
        shared = [f for f in self.subscriptions(shared_filters=True) if f.startswith("$share/")]
        client.unsubscribe([*shared, f"$share/{SHARE_GROUP}/{self._probe_topic}"])
        client.subscribe([(f, 1) for f in self.subscriptions()])

    def idle(self) -> bool:
        """True when every received message has been processed (tests, benchmarks)."""
        return self._queue.unfinished_tasks == 0

    # --- paho callbacks (network thread) -------------------------------------------------------

    def _on_connect(self, client: Any, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if getattr(reason, "is_failure", False):
            hint = (
                " (an MQTT 3.1.1-only broker, e.g. NATS: serve with --mqtt-protocol 3.1.1)"
                if self.protocol == "5" and getattr(reason, "value", None) == 0x84
                else ""
            )
            log.error("broker %s refused the controller: %s%s", self._where(), reason, hint)
            self.stats.refused[str(reason)] = self.stats.refused.get(str(reason), 0) + 1
            return
        self.failover.connected()
        self._subscribe_failures = 0
        self._subscribe()
        if self.shared and self.shared_works is None:
            self._probe(client)
        self.stats.connected = True
        self._queue.put(("", "republish", b"", None))

    def _subscribe(self) -> None:
        if self._stop.is_set():
            return
        if self.jetstream is not None:
            # a persistent session from before JetStream ingest still holds these (on NATS,
            # consumers that would deliver every report here too, and keep it until then)
            from edgefleet.wire.mqtt import subscription

            self._client.unsubscribe([subscription(k) for k in KINDS])
        self._client.subscribe([(f, 1) for f in self.subscriptions()])

    def _on_subscribe(self, _client: Any, _ud: Any, _mid: Any, reasons: Any, _props: Any) -> None:
        """A refused subscription is retried with backoff: NATS refuses one while JetStream
        cannot create the consumer behind it (leaders being re-elected after a node died), and
        without it no report would ever arrive."""
        if not any(getattr(r, "is_failure", False) for r in reasons):
            return
        self._subscribe_failures += 1
        self.stats.subscribe_refused += 1
        delay = self.failover.delay(self._subscribe_failures)
        log.warning("broker %s refused a subscription; again in %.1fs", self._where(), delay)
        timer = threading.Timer(delay, self._subscribe)
        timer.daemon = True
        timer.start()

    def _on_disconnect(self, client: Any, _ud: Any, _flags: Any, reason: Any, _p: Any) -> None:
        self.stats.connected = False
        if not self._stop.is_set():
            log.warning("lost broker %s: %s", self._where(), reason)
            self._next_broker()

    def _on_connect_fail(self, *_args: Any) -> None:
        if not self._stop.is_set():
            # paho calls this inside its `except OSError` (`backoff.connect_failure`)
            key, why = connect_failure(sys.exc_info()[1], self.address.tls)
            self.stats.connect_failed[key] = self.stats.connect_failed.get(key, 0) + 1
            repeated, self._last_connect_failure = self._last_connect_failure == why, why
            log.log(
                logging.DEBUG if repeated else logging.WARNING,
                "cannot reach broker %s: %s",
                self._where(),
                why,
            )
            self._next_broker()

    def _where(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    def _next_broker(self) -> None:
        """After a lost or refused connection (paho's thread): the next broker of the list
        after the failover policy's jittered delay (paho alone retries one host for ever)."""
        delay = self.failover.failed()
        self.stats.failovers += 1
        # paho sleeps ``min_delay`` before its next attempt; float seconds work (it compares
        # and sleeps) whatever its int hint says.
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        self._connect_async()

    def _on_message(self, _client: Any, _ud: Any, msg: Any) -> None:
        from edgefleet.wire.mqtt import parse_topic

        if msg.topic == self._probe_topic:
            if self.shared_works is None:
                self.shared_works = True
            return
        parsed = parse_topic(msg.topic)
        if parsed is None or parsed[1] in ("desired", "ack"):
            self.stats.drop("unknown_topic")
            return
        self._queue.put((parsed[0], parsed[1], bytes(msg.payload), None))

    # --- worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._handles = [h for *_, h in batch if h is not None]
            try:
                self._process([(d, k, raw) for d, k, raw, _ in batch])
                self._settle(True)  # through: committed, or refused for good
            except Exception:
                log.exception("mqtt batch of %d messages failed", len(batch))
            finally:
                self._settle(False)  # failed: JetStream delivers them again after ack_wait
                for _ in batch:
                    self._queue.task_done()

    def _settle(self, done: bool) -> None:
        """Hand the batch's JetStream messages back (`JetStreamIngest.settle`) once: acked when
        ``done``, else only let go of. A no-op for messages that came over MQTT."""
        handles, self._handles = self._handles, []
        if handles and self.jetstream is not None:
            self.jetstream.settle(handles, done)

    def _decode(self, device_id: str, kind: str, raw: bytes) -> Decoded | None:
        """Parse and check one message before any database work (None: refused and counted).

        What no store can take is refused here, alone: a payload over its kind's size limit,
        JSON nested too deep, a NUL character, an integer beyond int64, NaN. A message that
        gets past this cannot fail the batch it arrives in.
        """
        limit = self.max_bytes.get(kind)
        if limit is not None and len(raw) > limit:
            self.stats.drop(f"{kind}_too_large")
            return None
        try:
            msg = loads_object(raw)  # checked here once: the parsers below do not walk it again
        except ValueError as e:
            self.stats.drop(
                f"{kind}_not_json" if str(e).startswith("not JSON") else f"{kind}_unstorable"
            )
            return None
        if msg is None:
            self.stats.drop(f"{kind}_not_object")
            return None
        try:
            ids.device_id(device_id)
            if kind == "presence":
                return Decoded(device_id, kind, msg, parse_presence(msg, device_id))
            if kind == "status":
                return Decoded(device_id, kind, msg, parse_status(msg, device_id))
            if kind == "capture":
                return Decoded(device_id, kind, msg, parse_capture(msg, device_id))
            return Decoded(device_id, kind, msg, parse_telemetry(msg, device_id))
        except ids.IdentifierError:
            self.stats.drop(f"{kind}_bad_device_id")
        except MessageError as e:
            self.stats.drop(_DROP_NAMES.get(e.reason, e.reason))
        return None

    def _process(self, batch: list[tuple[str, str, bytes]]) -> None:
        if any(kind == "republish" for _, kind, _ in batch):
            self._republish_all()
        decoded: list[Decoded] = []
        for device_id, kind, raw in batch:
            if kind == "republish":
                continue
            self.stats.received[kind] = self.stats.received.get(kind, 0) + 1
            d = self._decode(device_id, kind, raw)
            if d is not None:
                decoded.append(d)
        if not decoded:
            return
        now = datetime.now(UTC)
        stale: set[str] = set()
        committed = decoded
        try:
            reports, drops = self._apply(decoded, now, stale)
        except Exception:
            # The batch's transaction failed (a row the database refuses): retry message by
            # message, each in its own transaction, so one bad message costs only itself.
            log.warning("mqtt batch of %d refused; applying message by message", len(decoded))
            reports, drops, committed = [], [], []
            for d in decoded:
                try:
                    r, dr = self._apply([d], now, stale)
                except Exception as e:
                    log.warning("%s from %s refused by the database: %s", d.kind, d.device_id, e)
                    drops.append(f"{d.kind}_db_refused")
                    continue
                reports += r
                drops += dr
                committed.append(d)
        for reason in drops:
            self.stats.drop(reason)
        stepped = False
        try:
            if stale:
                self._resync(stale, now)
            if reports:
                self._rollouts.on_status(reports)
            stepped = True
            # JetStream's copies first (jetstream.py), then the devices; copies whose rollout
            # step failed come again after the ack wait, and a repeated success is applied
            # again (`_status`)
            self._settle(True)
        finally:
            # after the rollouts took the reports too: a replica that dies before this point
            # leaves them unacknowledged, and the devices send them again. A failed rollout
            # step (the database lost mid-step) keeps the batch's status reports
            # unacknowledged too: stored, but not yet seen by the rollout.
            if not stepped:
                self.stats.rollout_step_failures += 1
            self._ack(
                committed
                if stepped
                else [d for d in committed if not isinstance(d.parsed, StatusReport)]
            )

    def _resync(self, device_ids: set[str], now: datetime) -> None:
        """Devices that hold a higher desired seq than the controller (its database went
        backwards): issue their desired state again above it, and publish."""
        self.stats.stale_sequence += len(device_ids)
        log.warning(
            "devices hold newer desired states than this controller: %s", sorted(device_ids)
        )
        if self._signer is None:
            return
        try:
            with transaction(self._factory) as session:
                rows = desired.resync(session, self._signer, now, device_ids)
                for row in rows:
                    session.expunge(row)
        except Exception:
            log.exception("resync of %s failed", sorted(device_ids))
            return
        self._rollouts.publish_committed(rows)  # the leader only; else the leader's ticker

    def _ack(self, committed: list[Decoded]) -> None:
        """Acknowledge to each device the reports of a committed transaction (stored, already
        stored, or refused for good): the agent's outbox lets them go only on this."""
        if not self.acks or not committed:
            return
        from edgefleet.wire.mqtt import acks_for, topic

        status: dict[str, list[int]] = {}
        telemetry: dict[str, list[int]] = {}
        capture: dict[str, list[int]] = {}
        for d in committed:
            if isinstance(d.parsed, StatusReport) and d.parsed.seq is not None:
                status.setdefault(d.device_id, []).append(d.parsed.seq)
            elif isinstance(d.parsed, TelemetryEnvelope):
                telemetry.setdefault(d.device_id, []).extend(
                    rid
                    for rid in (r.get("id") for r in d.parsed.records)
                    if isinstance(rid, int) and not isinstance(rid, bool)
                )
            elif isinstance(d.parsed, CaptureEnvelope):
                # stored, stored before, or refused for good in the committed transaction
                capture.setdefault(d.device_id, []).extend(
                    rid for rid in (record_id(r) for r in d.parsed.records) if rid is not None
                )
        for device_id in sorted(status.keys() | telemetry.keys() | capture.keys()):
            for payload in acks_for(
                status.get(device_id, []),
                telemetry.get(device_id, []),
                capture.get(device_id, []),
            ):
                self._client.publish(topic(device_id, "ack"), payload, qos=1)
                self.stats.acks += 1

    def _apply(
        self, decoded: list[Decoded], now: datetime, stale: set[str]
    ) -> tuple[list[tuple[str, E.StatusReport | E.ShadowReport]], list[str]]:
        """Apply parsed messages in one transaction: (rollout reports, drop reasons), both
        valid only once it committed."""
        reports: list[tuple[str, E.StatusReport | E.ShadowReport]] = []
        telemetry: list[tuple[str, TelemetryEnvelope]] = []
        captures: list[tuple[str, CaptureEnvelope]] = []
        drops: list[str] = []
        with transaction(self._factory) as session, session.no_autoflush:
            ids_ = sorted({d.device_id for d in decoded})
            # Every device's row exists first (one statement) and, on PostgreSQL, is locked in
            # id order: replicas sharing the reports apply one device's reports one after the
            # other (seq dedupe, installed), and never wait on each other in a cycle.
            devices.ensure_rows(session, ids_)
            devices.lock_rows(session, ids_)
            # Only the devices with a presence or capture here are loaded as ORM objects (held,
            # so that get_or_create finds them in the identity map). The status bookkeeping of
            # the others is read and written with one statement each (`devices.StatusRows`),
            # and telemetry moves `last_seen` alone, which one UPDATE does for the rest.
            full = sorted(
                {d.device_id for d in decoded if isinstance(d.parsed, Presence | CaptureEnvelope)}
            )
            loaded = (
                list(
                    session.scalars(
                        select(Device)
                        .options(_BRIDGE_COLUMNS)
                        .where(devices.id_in(Device.id, full, session))
                    )
                )
                if full
                else []
            )
            status_only = {
                d.device_id for d in decoded if isinstance(d.parsed, StatusReport)
            }.difference(full)
            rows = devices.StatusRows(session, status_only) if status_only else None
            held_ids = [d.device_id for d in decoded if _held_seq(d.parsed) is not None]
            seqs = devices.SeqBatch(session, held_ids) if held_ids else None
            for d in decoded:
                held = _held_seq(d.parsed)
                if (
                    held is not None
                    and seqs is not None
                    and devices.note_device_seq(session, d.device_id, held, now, seqs)
                ):
                    stale.add(d.device_id)
                if isinstance(d.parsed, Presence):
                    devices.apply_presence(session, d.device_id, d.parsed, now)
                elif isinstance(d.parsed, StatusReport):
                    row = rows.rows.get(d.device_id) if rows is not None else None
                    dev = row or devices.get_or_create(session, d.device_id)
                    rep = self._status(dev, d.parsed, d.raw, now, drops)
                    if rep is not None:
                        reports.append(rep)
                elif isinstance(d.parsed, CaptureEnvelope):
                    devices.get_or_create(session, d.device_id).last_seen = now
                    captures.append((d.device_id, d.parsed))
                else:
                    telemetry.append((d.device_id, d.parsed))
            if rows is not None:  # before note_sync_many, which reads them back
                rows.write(session)
            if seqs is not None:
                seqs.write(session)
            # what a device reports installed may now match its desired state, or no longer
            # (only a presence or an install/removal moves what it has installed)
            reported = {
                d.device_id
                for d in decoded
                if isinstance(d.parsed, Presence)
                or (
                    isinstance(d.parsed, StatusReport)
                    and d.parsed.state in (UpdateState.COMMITTED, UpdateState.REMOVED)
                )
            }
            desired.note_sync_many(session, reported, now)
            if telemetry:
                seen = {device_id for device_id, _ in telemetry}
                for device_id in seen.intersection(full):  # loaded: the ORM writes it
                    devices.get_or_create(session, device_id).last_seen = now
                devices.touch(session, seen.difference(full), now)
                drops += self._telemetry(session, telemetry)
            for device_id, env in captures:
                drops += self._capture(session, device_id, env, now)
            session.flush()
        del loaded
        return reports, drops

    def _status(
        self,
        dev: Device | devices.StatusRow,
        report: StatusReport,
        raw: dict[str, Any],
        now: datetime,
        drops: list[str],
    ) -> tuple[str, E.StatusReport | E.ShadowReport] | None:
        """Record a parsed report on its device's row; the rollout event for an update
        report."""
        assert report.seq is not None  # parse() requires it
        fresh, top, recent = devices.accept_seq(
            dev.last_status_seq, list(dev.recent_status_seqs or []), report.seq
        )
        if not fresh:
            drops.append("status_duplicate")
            # A replica that died between storing a report and handing it to the rollouts
            # leaves it on record but perhaps never applied, and unacknowledged: the device
            # sends it again. A repeated success is safe to apply again (the rollout ignores
            # it for a device already done); a repeated failure is not (it could end a retry
            # begun since), so that device waits for its timeout and retry.
            if report.seq == dev.last_status_seq and report.state in SUCCESS_STATES:
                return _rollout_event(report)
            return None
        # The newest report is the device's last status (a late one is not); a shadow window
        # is figures, not a status: it must not hide the last update's outcome.
        if top == report.seq and report.kind != "shadow":
            dev.last_status = raw
        dev.last_status_seq, dev.recent_status_seqs = top, recent
        dev.last_seen = now
        model, version, state = report.model, report.version, report.state
        if report.kind == "shadow" and model is not None and version is not None:
            # figures only (parse checked them against edgefleet.wire.shadow): the rollout judges
            return model, E.ShadowReport(
                report.device_id, version, dict(report.figures or {}), report.rollout_id
            )
        if model is None or version is None or state is None:
            return None  # a refused desired state: on record, no rollout moves on it
        if state == UpdateState.COMMITTED:
            installed = dict(dev.installed)
            prev = (
                installed.get(model, {}).get("version")
                if isinstance(installed.get(model), dict)
                else None
            )
            installed[model] = {
                "version": version,
                "previous": prev if prev != version else None,
                "state": state.value,
            }
            dev.installed = installed
        elif state == UpdateState.REMOVED and model in (dev.installed or {}):
            dev.installed = {k: v for k, v in dev.installed.items() if k != model}
        return _rollout_event(report)

    def _telemetry(
        self, session: Session, messages: list[tuple[str, TelemetryEnvelope]]
    ) -> list[str]:
        """Hand telemetry to the drift ingest: the batch at once, and message by message (each
        in its own savepoint) only when the batch is refused, to isolate the bad one."""
        from edgefleet.cloud_controller.drift.ingest import ingest_batch, ingest_telemetry

        drops: list[str] = []
        try:
            with session.begin_nested():
                ingest_batch(session, messages)
            return drops
        except Exception:
            log.warning("telemetry batch refused; ingesting message by message")
        for device_id, msg in messages:
            try:
                with session.begin_nested():
                    ingest_telemetry(session, device_id, msg)
            except Exception as e:
                log.warning("telemetry from %s refused: %s", device_id, e)
                drops.append("telemetry_refused")
        return drops

    def _capture(
        self, session: Session, device_id: str, env: CaptureEnvelope, now: datetime
    ) -> list[str]:
        """Captured rows (docs/capture.md): each record checked against its capture and
        stored, or refused and counted under its reason. A database error fails the batch
        (then this message alone): nothing is acked that was not committed."""
        from edgefleet.cloud_controller.capture.service import ingest

        res = ingest(session, device_id, list(env.records), now, self._capture_rate)
        self.stats.capture_rows += res.stored
        drops = ["capture_not_object"] * env.skipped
        for reason, n in res.refused.items():
            drops += [reason] * n
        return drops

    def _republish_all(self) -> None:
        """Every desired state again, retained, same seq (the leader only)."""
        self._rollouts.republish_all()


def _rollout_event(report: StatusReport) -> tuple[str, E.StatusReport] | None:
    """The rollout's view of an update report: (model, event)."""
    model, version, state = report.model, report.version, report.state
    if model is None or version is None or state is None:
        return None
    code = report.reason_code
    return model, E.StatusReport(
        report.device_id,
        version,
        state.value,
        reason_code=str(code) if code is not None else None,
        reason=report.reason,
        rollout_id=report.rollout_id,
        model=model,
    )
