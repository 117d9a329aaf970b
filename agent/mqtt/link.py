"""`MqttLink(agent, config)`: the agent's connection to the fleet broker (MQTT 3.1.1).

It connects with the device id as client id and a retained last will (offline presence),
publishes the presence retained on every connect and after every finished update, subscribes to
its signed desired state (handled by `agent.mqtt.desired`), turns every update event into a
status report queued in an on-disk outbox, and delivers reports and telemetry batches
(`agent.mqtt.delivery`) until the broker acknowledges them.

Threads: paho's network thread only queues work; one worker thread does everything else, so
the link's state changes in one place.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode as MqttReasonCode

from edgefleet.agent.capture import CaptureService
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.mqtt.delivery import AckMode, Delivery, RecordOutbox
from edgefleet.agent.mqtt.desired import CurrentSince, DesiredStateHandler
from edgefleet.agent.mqtt.reports import presence_of, status_from_event
from edgefleet.agent.ports import AgentPort
from edgefleet.agent.store import ModelStore
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.agent.update.events import UpdateEvent
from edgefleet.keys import load_public_key
from edgefleet.wire.backoff import Failover, connect_failure
from edgefleet.wire.brokerkind import broker_kind, device_subscription_qos
from edgefleet.wire.message import encode, now_iso
from edgefleet.wire.mqtt import Kind, offline_will, topic
from edgefleet.wire.states import TERMINAL_STATES
from edgefleet.wire.status import StatusReport

log = logging.getLogger("edgefleet.agent.mqtt")

Job = (
    tuple[Literal["connected", "acked", "stop", "tick", "subscribe_failed", "renew"], None]
    | tuple[Literal["desired", "ack"], bytes]
    | tuple[Literal["event"], UpdateEvent]
)


def installed_since(data_dir: Path) -> CurrentSince:
    """When a model's serving version started serving, from the installed files themselves
    (not the link's state, which can be lost): the later of its install record's time and the
    last change of the model's pointers (its activation, or a rollback to it)."""

    def since(name: str, version: str) -> float | None:
        store = ModelStore(data_dir)
        times: list[float] = []
        with contextlib.suppress(OSError, ValueError):
            at = store.install_record(name, version).get("installed_at")
            if isinstance(at, int | float) and not isinstance(at, bool):
                times.append(float(at))
        with contextlib.suppress(OSError):
            times.append((store.model_dir(name) / "pointers.json").stat().st_mtime)
        return max(times) if times else None

    return since


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``mqtt://host:port`` / ``mqtts://host:port`` -> (host, port, tls)."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker url {url!r}: scheme must be mqtt:// or mqtts://")
    tls = u.scheme in ("mqtts", "ssl")
    return u.hostname or "127.0.0.1", u.port or (8883 if tls else 1883), tls


def broker_urls(urls: list[str]) -> list[str]:
    """``urls`` (`MqttConfig.brokers`), every one parsed (ValueError names a bad one). One TLS
    setting per link: a list mixing mqtt:// and mqtts:// is refused rather than half-secured."""
    out = list(urls)
    if not out:
        raise ValueError("mqtt.url / mqtt.urls are not set: the agent has no broker to connect to")
    schemes = {parse_broker_url(u)[2] for u in out}
    if len(schemes) > 1:
        raise ValueError(
            "mqtt.urls mix mqtt:// and mqtts://: every broker of one link must use TLS or none"
        )
    return out


class MqttLink:
    """Connects one agent to the fleet broker; `start()` returns at once, `stop()` is clean."""

    def __init__(
        self,
        agent: AgentPort,
        config: AgentConfig,
        *,
        telemetry: RecordOutbox | None = None,
        telemetry_batch: int = 100,
        tick_s: float = 0.5,
        resend_after_s: float = 15.0,
        capture: CaptureService | None = None,
    ) -> None:
        self.agent = agent
        self.capture = capture
        self.config = config
        self.device_id = config.device_id
        self.failover = Failover(broker_urls(config.mqtt.brokers), base_s=0.5, cap_s=30.0)
        self.host, self.port, tls = parse_broker_url(self.failover.current)
        self.tls = tls or config.mqtt.tls
        trusted = [load_public_key(Path(p)) for p in config.controller_keys]
        if not trusted:
            raise ValueError("controller_keys is empty: no desired state could ever verify")
        self.dir = Path(config.data_dir) / "mqtt"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(self.dir / "status-outbox.sqlite", max_bytes=8 * 2**20)
        self.desired = DesiredStateHandler(
            agent,
            self.device_id,
            trusted,
            self.dir / "link.json",
            self._report,
            current_since=installed_since(Path(config.data_dir)),
            on_desired=capture.apply if capture is not None else None,
        )
        self.delivery = Delivery(
            self.device_id,
            self.outbox,
            telemetry,
            telemetry_batch=telemetry_batch,
            resend_after_s=resend_after_s,
            acks=cast(AckMode, config.mqtt.controller_acks),
            acks_marker=self.dir / "controller-acks",
            capture=capture.outbox if capture is not None else None,
        )
        self.tick_s = tick_s
        self.last_connect_error: str | None = None
        self.connected = threading.Event()
        self._connected_since = 0.0  # monotonic; set by paho's thread on every connect
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._client: mqtt.Client | None = None
        self._stopping = False
        # A refused SUBSCRIBE (NATS refuses one while JetStream cannot create the consumer
        # behind it, e.g. during a leader election after a node died) is retried with backoff:
        # without the subscription no desired state would ever arrive.
        self._subscribe_failures = 0
        self._resubscribe_at: float | None = None

    @property
    def ignored(self) -> dict[str, int]:
        """reason code -> count of desired states ignored."""
        return self.desired.ignored

    @property
    def resent(self) -> int:
        return self.delivery.resent

    @property
    def subscription_qos(self) -> int:
        """QoS of the desired-state and ack subscriptions: 0 on NATS, where each QoS 1
        subscription would be a JetStream consumer of its own (wire.brokerkind)."""
        return device_subscription_qos(broker_kind(self.config.mqtt.broker_kind))

    def topic(self, kind: Kind) -> str:
        return topic(self.device_id, kind)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self.agent.add_listener(self._on_event)
        self._worker = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._worker.start()
        self._connect(self._new_client())

    def _new_client(self) -> mqtt.Client:
        """A paho client with the credentials and TLS files as they are on disk now."""
        mqtt_cfg = self.config.mqtt
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=mqtt_cfg.client_id or self.device_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        if mqtt_cfg.username:
            client.username_pw_set(mqtt_cfg.username, mqtt_cfg.password)
        if self.tls:
            ca, cert, key = mqtt_cfg.ca_file, mqtt_cfg.cert_file, mqtt_cfg.key_file
            client.tls_set(
                ca_certs=str(ca) if ca else None,
                certfile=str(cert) if cert else None,
                keyfile=str(key) if key else None,
            )
        client.will_set(self.topic("presence"), offline_will(self.device_id), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_inflight_messages_set(50)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _connect(self, client: mqtt.Client) -> None:
        self._client = client
        client.connect_async(self.host, self.port, keepalive=int(self.config.mqtt.keepalive_s))
        client.loop_start()

    def renew(self) -> None:
        """Reconnect with the TLS files as they are now (after a certificate renewal). The
        worker, its queue and the agent listener stay: an update event emitted meanwhile is
        queued as always and its report sent on the new connection. (A new link in place of
        this one would leave a gap in which no listener hears the agent.)"""
        self._jobs.put(("renew", None))

    def _renew(self) -> None:
        """The worker: retire the paho client, then connect a new one."""
        old = self._client
        if old is None or self._stopping:
            return
        self._client = None  # the old client's callbacks are ignored from here (`_current`)
        self.connected.clear()
        old.disconnect()
        old.loop_stop()  # its network thread has ended: no callback of it comes after this
        # What it had handed out but not seen acknowledged goes out again on the new
        # connection (paho's own resend dies with the old session); the controller drops
        # duplicates by status seq and record id.
        self.delivery.drain_acks()
        self.delivery.forget_inflight()
        self._connect(self._new_client())
        log.info("reconnecting to %s:%s with renewed credentials", self.host, self.port)

    def _current(self, client: mqtt.Client) -> bool:
        """Whether a paho callback comes from the link's client, not a retired one."""
        return client is self._client

    def stop(self, timeout: float = 5.0) -> None:
        """Say offline (retained), flush what the broker can still take, disconnect."""
        if self._worker is None:
            return
        self._stopping = True
        self.agent.remove_listener(self._on_event)
        self._jobs.put(("stop", None))
        self._worker.join(timeout)
        self._worker = None
        client = self._client  # read after the worker: a renewal may have replaced it
        if client is not None and self.connected.is_set():
            try:
                info = client.publish(
                    self.topic("presence"), offline_will(self.device_id), qos=1, retain=True
                )
                info.wait_for_publish(timeout=min(timeout, 2.0))
            except (RuntimeError, ValueError) as e:
                log.warning("offline presence not sent: %s", e)
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._client = None
        self.outbox.close()

    def backlog(self) -> int:
        """Status reports on disk that the broker has not acknowledged yet."""
        return self.delivery.backlog()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self.connected.wait(timeout)

    # -- paho callbacks (network thread): queue work, nothing else ---------------------------
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason: MqttReasonCode,
        props: Properties | None,
    ) -> None:
        if not self._current(client):
            return
        if reason.is_failure:
            from edgefleet.agent.check import refusal_hint

            # One clear line per kind of refusal, not the same bare reason at every retry.
            repeated = self.last_connect_error == str(reason)
            self.last_connect_error = str(reason)
            hint = refusal_hint(str(reason))
            log.log(
                logging.DEBUG if repeated else logging.ERROR if hint else logging.WARNING,
                "broker refused connection: %s%s",
                reason,
                f" ({hint}; retrying with backoff)" if hint else "",
            )
            return
        self.last_connect_error = None
        self.failover.connected()
        qos = self.subscription_qos
        client.subscribe([(self.topic("desired"), qos), (self.topic("ack"), qos)])
        self._connected_since = time.monotonic()
        self.connected.set()
        self._jobs.put(("connected", None))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason: MqttReasonCode,
        props: Properties | None,
    ) -> None:
        if not self._current(client):
            return
        self.connected.clear()
        if not self._stopping:
            log.info("disconnected from %s:%s: %s", self.host, self.port, reason)
            self._next_broker(client)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        if self._current(client) and not self._stopping:
            # paho calls this inside its `except OSError` (`backoff.connect_failure`)
            key, why = connect_failure(sys.exc_info()[1], self.tls)
            repeated, self.last_connect_error = self.last_connect_error == why, why
            level = logging.WARNING if key.startswith("tls") else logging.INFO
            log.log(
                logging.DEBUG if repeated else level,
                "could not connect to %s:%s: %s",
                self.host,
                self.port,
                why,
            )
            self._next_broker(client)

    def _next_broker(self, client: mqtt.Client) -> None:
        """After a lost or refused connection (paho's thread): aim paho's reconnect at the next
        broker of the list, after the failover policy's jittered delay. paho's own reconnect
        would retry the same host for ever."""
        delay = self.failover.failed()
        self.host, self.port, _ = parse_broker_url(self.failover.current)
        # paho sleeps ``min_delay`` before its next attempt (float seconds work: it compares
        # and sleeps, its int hint notwithstanding).
        client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]
        client.connect_async(self.host, self.port, keepalive=int(self.config.mqtt.keepalive_s))
        log.info("next broker %s:%s in %.1fs", self.host, self.port, delay)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reasons: list[MqttReasonCode],
        props: Properties | None,
    ) -> None:
        if not self._current(client):
            return
        if any(r.is_failure for r in reasons):
            log.warning("broker %s:%s refused the desired-state subscription", self.host, self.port)
            self._jobs.put(("subscribe_failed", None))
        else:
            self._subscribe_failures = 0

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == self.topic("desired"):
            self._jobs.put(("desired", bytes(message.payload)))
        elif message.topic == self.topic("ack"):
            self._jobs.put(("ack", bytes(message.payload)))

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason: MqttReasonCode,
        props: Properties,
    ) -> None:
        if not self._current(client):
            return  # a retired client's mid would name another message of the new one
        self.delivery.on_puback(mid)
        self._jobs.put(("acked", None))

    def _on_event(self, event: UpdateEvent) -> None:
        """Agent listener: may be called from any agent thread."""
        self._jobs.put(("event", event))

    # -- worker -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            job: Job
            try:
                job = self._jobs.get(timeout=self.tick_s)
            except queue.Empty:
                job = ("tick", None)
            try:
                self.delivery.drain_acks()
                if job[0] == "stop":
                    self._flush()
                    return
                if job[0] == "renew":
                    self._renew()
                elif job[0] == "connected":
                    self._resubscribe_at = None
                    self._publish_presence()
                elif job[0] == "subscribe_failed":
                    self._subscribe_failures += 1
                    wait = self.failover.delay(self._subscribe_failures)
                    self._resubscribe_at = time.monotonic() + wait
                elif job[0] == "desired":
                    self.desired.handle(job[1])
                elif job[0] == "ack":
                    self.delivery.on_ack_message(job[1])
                elif job[0] == "event":
                    self._handle_event(job[1])
                self._resubscribe_due()
                self._flush()
            except Exception:  # the link must outlive any single bad message
                log.exception("mqtt link: %s job failed", job[0])

    def _resubscribe_due(self) -> None:
        at = self._resubscribe_at
        if at is None or time.monotonic() < at:
            return
        self._resubscribe_at = None
        if self._client is not None and self.connected.is_set():
            log.info(
                "subscribing again to the desired state (try %d)", self._subscribe_failures + 1
            )
            self._client.subscribe(self.topic("desired"), qos=self.subscription_qos)

    def _handle_event(self, event: UpdateEvent) -> None:
        state = self.desired.state
        report = status_from_event(
            event,
            self.device_id,
            rollout_id=state.rollouts.get(f"{event.model}@{event.version}"),
            desired_seq=state.last_seq,
        )
        if report is None:
            log.warning("update %s: state %r not reported", event.update_id, event.state)
            return
        self._report(report)
        if report.state in TERMINAL_STATES:
            self.desired.finished(event.model, event.version)
            self._publish_presence()

    def _report(self, report: StatusReport) -> None:
        """Durably queue a status report; it leaves the outbox on PUBACK, with its outbox id
        (increasing, survives restarts) as ``id`` and ``seq``."""
        self.outbox.append(report.to_dict())

    def _publish_presence(self) -> None:
        if self._client is None or not self.connected.is_set():
            return
        presence = presence_of(self.agent.inventory(), at=now_iso())
        self._client.publish(self.topic("presence"), encode(presence.to_dict()), qos=1, retain=True)

    def _publish(self, kind: Kind, payload: bytes) -> int:
        assert self._client is not None
        return self._client.publish(self.topic(kind), payload, qos=1).mid

    def _flush(self) -> None:
        if self._client is None or not self.connected.is_set():
            return
        self.delivery.flush(self._publish, self._connected_since)
