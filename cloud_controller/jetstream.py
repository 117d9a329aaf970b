"""Device reports through JetStream on a NATS cluster (broker kind "nats"; docs/fleet.md,
Clustered broker, and docs/controller.md, Replicas).

NATS Server's MQTT layer stores every QoS 1 PUBLISH in the JetStream stream ``$MQTT_msgs``
(subjects ``$MQTT.msgs.>``, interest retention, replicated like the other MQTT streams) under
``$MQTT.msgs.<subject>``: the device topic ``edgefleet/v1/devices/gw-1/status`` is kept as
``$MQTT.msgs.edgefleet.v1.devices.gw-1.status``, the MQTT payload as the message's data (with a
``Nmqtt-Pub`` header). The device's PUBACK waits for that store, so reading the reports from
there costs the cluster no second copy. With interest retention a message is kept while a
consumer whose filter matches has not acknowledged it: one durable pull consumer per kind
(``edgefleet-ingest-status``, ``-telemetry``, ``-capture``), created once and kept by the
cluster (replicated like the stream), keeps every report published while no controller runs,
and every replica pulls from the same consumer, so each report goes to one replica. A message
is acknowledged to JetStream once the bridge has finished with its batch: after the batch's
transaction committed (or the message was refused for good); one whose replica dies first is
delivered again after ``ack_wait_s`` to whichever replica pulls next, and the database's
duplicate checks keep one copy. A replica that stops cleanly NAKs what it fetched and did not
process (`JetStreamIngest._hand_back`): the others get it at once.

The layout of ``$MQTT_msgs`` is NATS Server's own (server/README-MQTT.md), checked here at every
start: a stream of another shape is refused with the reason, not read.

nats-py is asyncio: one thread runs its event loop; the bridge's worker thread hands acks to it
with `asyncio.run_coroutine_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet.wire.backoff import split_urls
from edgefleet.wire.mqtt import TOPIC_PREFIX, Kind, parse_topic

log = logging.getLogger(__name__)

STREAM = "$MQTT_msgs"
SUBJECT_PREFIX = "$MQTT.msgs."
KINDS: tuple[Kind, ...] = ("status", "telemetry", "capture")
DURABLE_PREFIX = "edgefleet-ingest-"
# Capture messages are up to `mqtt_bridge.MAX_MESSAGE_BYTES["capture"]` (2 MiB) where a status
# is a few hundred bytes: a replica holds at most this many fetched and not yet acknowledged
# (64 MiB at worst), whatever room the other kinds leave.
CAPTURE_IN_FLIGHT = 32
FETCH_TIMEOUT_S = 1.0  # a pull request's life on the server (nats-py: its `expires`)
# JetStream's error codes (nats-server errors.json) that no retry will change.
_JS_NOT_ENABLED_FOR_ACCOUNT = 10039
_JS_NOT_ENABLED = 10076

# One item of the bridge's queue: (device id, kind, payload, the JetStream message to ack).
Put = Callable[[tuple[str, str, bytes, Any]], None]


class JetStreamError(RuntimeError):
    """The cluster cannot serve device reports through JetStream; the message says why."""


def filter_subject(kind: Kind) -> str:
    """The stream subject of one kind of report from every device."""
    return f"{SUBJECT_PREFIX}{TOPIC_PREFIX.replace('/', '.')}.devices.*.{kind}"


def durable_name(kind: Kind) -> str:
    return DURABLE_PREFIX + kind


def parse_subject(subject: str) -> tuple[str, Kind] | None:
    """``(device id, kind)`` of a stored report's subject, else None. On NATS a device id has
    no '.' (`wire.brokerkind`), so subject tokens and topic levels are one to one."""
    if not subject.startswith(SUBJECT_PREFIX):
        return None
    return parse_topic(subject[len(SUBJECT_PREFIX) :].replace(".", "/"))


def check_stream(retention: object, subjects: list[str] | None) -> None:
    """JetStreamError unless the stream is NATS's MQTT message stream as this module reads it."""
    value = getattr(retention, "value", retention)
    if value != "interest":
        raise JetStreamError(
            f"stream {STREAM} has retention {value!r}, not 'interest': not the NATS MQTT "
            "message stream this controller reads (NATS Server 2.9+)"
        )
    if f"{SUBJECT_PREFIX}>" not in (subjects or []):
        raise JetStreamError(
            f"stream {STREAM} holds subjects {subjects}, not {SUBJECT_PREFIX}>: not the NATS "
            "MQTT message stream this controller reads"
        )


def refusal(err: BaseException) -> tuple[str, str]:
    """(reason, what it means) of a failed NATS connection, as nats-py reports it."""
    text = str(err)
    if "authorization violation" in text.lower() or type(err).__name__ == "AuthorizationError":
        return "authorization_violation", (
            "the NATS server refused the controller's credentials (Authorization Violation): "
            "check the user and password in --nats-url (nats://user:password@host:4222)"
        )
    if isinstance(err, ssl.SSLCertVerificationError):
        return "tls_verify_failed", (
            f"the NATS server's TLS certificate is not trusted ({err.verify_message}): give "
            "the CA that signed it (--nats-ca, EDGEFLEET_CONTROLLER_NATS_CA_FILE)"
        )
    if isinstance(err, ssl.SSLError):
        return "tls_error", f"TLS with the NATS server failed: {err}"
    if "permissions violation" in text.lower():
        return "permissions_violation", (
            f"the NATS server refused an operation to the controller's user ({text}): it "
            "needs the JetStream API ($JS.API.>) and acks ($JS.ACK.>)"
        )
    if isinstance(err, OSError | TimeoutError):
        return "unreachable", f"cannot reach a NATS server: {err!r}"
    return "error", f"NATS: {err!r}"


def definitive(err: BaseException) -> JetStreamError | None:
    """The JetStreamError a failed JetStream request means for good (no JetStream on the
    cluster or the account), else None (a node or leader still coming: retry)."""
    from nats.js.errors import ServiceUnavailableError

    if isinstance(err, JetStreamError):
        return err
    if isinstance(err, ServiceUnavailableError) and (
        (err.code is None and err.err_code is None)
        or err.err_code in (_JS_NOT_ENABLED_FOR_ACCOUNT, _JS_NOT_ENABLED)
    ):
        return JetStreamError(
            "the NATS cluster has no JetStream for this account (no JetStream API answers: "
            f"{err}); broker kind 'nats' needs JetStream (`jetstream {{}}` on every node), or "
            "turn JetStream ingest off (--no-jetstream-ingest)"
        )
    return None


@dataclass
class JetStreamStats:
    fetched: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    redelivered: int = 0  # messages delivered more than once (a replica died, an ack was lost)
    acked: int = 0
    unknown_subject: int = 0  # acked and dropped: not an edgefleet report subject
    released: int = 0  # fetched, not processed, NAKed on a clean stop (another replica's now)
    # connections the NATS servers refused or that failed, by reason (`refusal`)
    refused: dict[str, int] = field(default_factory=dict)
    ready: bool = False  # consumers bound, pulling


class JetStreamIngest:
    """Pulls status, telemetry and capture from the shared durable consumers into the bridge's
    queue, at most ``max_in_flight`` messages fetched and not yet acknowledged (capture: at most
    `CAPTURE_IN_FLIGHT` of them)."""

    def __init__(
        self,
        urls: str,
        put: Put,
        *,
        ack_wait_s: float = 30.0,
        fetch_batch: int = 250,
        max_in_flight: int = 2000,
        max_ack_pending: int = 20_000,
        tls_files: tuple[Path | None, Path | None, Path | None] = (None, None, None),
    ) -> None:
        """``urls``: the NATS client URLs of the cluster's nodes, comma-separated, credentials
        in them (``tls://user:password@host:4222``); ``tls_files``: (CA, client certificate,
        its key) for servers that require TLS (default: the system's CAs, no certificate)."""
        self.urls = split_urls(urls)
        if not self.urls:
            raise ValueError("no NATS URL")
        for u in self.urls:
            if not u.startswith(("nats://", "tls://")):
                raise ValueError(f"NATS url {u!r}: expected nats://host:port or tls://host:port")
        self._put = put
        self.tls_files = tls_files
        self._said: dict[str, float] = {}  # refusal reason -> when it was last logged
        self.ack_wait_s = ack_wait_s
        self.fetch_batch = fetch_batch
        self.max_in_flight = max_in_flight
        self.max_ack_pending = max_ack_pending
        self.stats = JetStreamStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: Any = None
        self._in_flight: dict[Kind, int] = dict.fromkeys(KINDS, 0)
        self._limit: dict[Kind, int] = {k: max_in_flight for k in KINDS}
        self._limit["capture"] = min(max_in_flight, CAPTURE_IN_FLIGHT)
        self._room: dict[Kind, asyncio.Event] = {}
        # the messages handed to the bridge and not settled yet (by id), with their kind
        self._held: dict[int, tuple[Kind, Any]] = {}
        self._subs: list[Any] = []  # the bound pull subscriptions
        self._closing: asyncio.Event | None = None
        self._first = threading.Event()  # the first setup ended (bound, or failed for good)
        self._failure: JetStreamError | None = None

    # --- lifecycle (any thread) ----------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Connect and bind the consumers in the background; wait up to ``timeout`` for it.
        JetStreamError when the cluster has no JetStream (or not the stream NATS's MQTT
        keeps): nothing retries that. A cluster not reachable yet is retried for ever."""
        self._thread = threading.Thread(target=self._run_loop, name="jetstream-ingest", daemon=True)
        self._thread.start()
        if not self._first.wait(timeout):
            log.warning("JetStream ingest not ready after %.0fs; still trying", timeout)
        if self._failure is not None:
            self._thread.join(5)
            raise self._failure

    def stop(self, timeout: float = 5.0) -> None:
        loop, closing = self._loop, self._closing
        if loop is not None and closing is not None and not loop.is_closed():
            loop.call_soon_threadsafe(closing.set)
        if self._thread is not None:
            self._thread.join(timeout)

    def settle(self, handles: list[Any], done: bool, timeout: float = 5.0) -> None:
        """The bridge's worker is through with these messages: ``done`` (their batch's
        transaction committed, or each was refused for good) acknowledges them to JetStream;
        else (the batch failed) they are only let go of here, and JetStream delivers them
        again after ``ack_wait_s``, to whichever replica pulls. Either way, room for more."""
        loop = self._loop
        if not handles or loop is None or loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self._ack(handles, done), loop).result(timeout)
        except Exception as e:  # the messages come again; the database keeps one copy
            log.warning("JetStream ack of %d messages failed: %s", len(handles), e)

    # --- the event loop's thread -----------------------------------------------------------------

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            self._first.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        import nats

        self._closing = asyncio.Event()
        self._room = {k: asyncio.Event() for k in KINDS}
        for room in self._room.values():
            room.set()
        delay = 0.5
        while not self._closing.is_set():
            try:
                if self._nc is None:
                    tls = self._tls_context()
                    await self._check_tls_offered()
                    self._nc = await nats.connect(
                        servers=self.urls,
                        name="edgefleet-controller-ingest",
                        max_reconnect_attempts=-1,
                        reconnect_time_wait=1,
                        connect_timeout=5,
                        error_cb=self._on_error,
                        **({"tls": tls} if tls is not None else {}),
                    )
                pulls = await self._bind(self._nc.jetstream())
                self.stats.ready = True
                self._first.set()
                delay = 0.5
                self._subs = [sub for _, sub in pulls]
                tasks = [asyncio.create_task(self._pull(k, sub)) for k, sub in pulls]
                closing = asyncio.create_task(self._closing.wait())
                done, _ = await asyncio.wait([closing, *tasks], return_when="FIRST_COMPLETED")
                if self._closing.is_set():
                    # A clean stop: each pull ends after the fetch it has in flight (at most
                    # `FETCH_TIMEOUT_S`), so that no pull request of this replica is left on
                    # the server to take what `_hand_back` NAKs (JetStream would deliver it
                    # there again, and it would wait out the ack wait once more).
                    for room in self._room.values():
                        room.set()
                    await asyncio.wait(tasks, timeout=FETCH_TIMEOUT_S + 2)
                for t in [closing, *tasks]:
                    t.cancel()
                # every task's end collected (nats-py turns a cancelled fetch into an error)
                await asyncio.gather(closing, *tasks, return_exceptions=True)
                if not self._closing.is_set():  # a pull gave up: bind again
                    ended = [t for t in done if t is not closing]
                    err = ended[0].exception() if ended and not ended[0].cancelled() else None
                    raise err if isinstance(err, Exception) else RuntimeError("a pull ended")
            except Exception as e:
                self.stats.ready = False
                failure = definitive(e)
                if failure is not None:
                    log.error("%s", failure)
                    self._failure = failure
                    break
                log.warning("JetStream ingest: %r; again in %.1fs", e, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), delay)
                delay = min(delay * 2, 5.0)
        if self._nc is not None:  # the acks handed over so far go out first
            await self._hand_back()
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()

    def _tls_context(self) -> ssl.SSLContext | None:
        """The TLS context for servers that require TLS: the given CA (else the system's) and
        client certificate; None (nats-py's default context) when none is given. A file that
        cannot be read is a JetStreamError: no retry mends it."""
        ca, cert, key = self.tls_files
        if ca is None and cert is None:
            return None
        try:
            ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
            if cert is not None:
                ctx.load_cert_chain(str(cert), str(key) if key else None)
        except (OSError, ssl.SSLError) as e:
            raise JetStreamError(f"the JetStream client's TLS files ({ca}, {cert}): {e}") from e
        return ctx

    async def _check_tls_offered(self) -> None:
        """JetStreamError when a server named by a ``tls://`` URL says it requires no TLS:
        nats-py follows the server's INFO (``tls_required``), not the URL's scheme, and would
        send the credentials in clear. Checked before each first connection, on the servers
        that answer; it catches a server configured without TLS, not a forger on the path."""
        import json
        from urllib.parse import urlsplit

        for url in self.urls:
            u = urlsplit(url)
            if u.scheme != "tls":
                continue
            where = f"{u.hostname}:{u.port or 4222}"
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(u.hostname, u.port or 4222), 5
                )
            except (OSError, TimeoutError):
                continue  # not up: nats-py tries it, and the next
            try:
                line = await asyncio.wait_for(reader.readline(), 5)
                info = json.loads(line[5:]) if line.startswith(b"INFO ") else {}
            except (OSError, TimeoutError, ValueError):
                continue
            finally:
                writer.close()
            if isinstance(info, dict) and not info.get("tls_required"):
                raise JetStreamError(
                    f"the NATS server {where} requires no TLS, but its URL says tls://: the "
                    "controller does not send its credentials in clear (enable TLS on its "
                    "client port, or give it as nats://)"
                )

    async def _on_error(self, err: Exception) -> None:
        """nats-py's report of a failed (re)connection or a server error: counted under its
        reason (`refusal`), and logged with it, once a minute per reason (nats-py retries
        every second for ever)."""
        reason, meaning = refusal(err)
        self.stats.refused[reason] = self.stats.refused.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._said.get(reason, -120.0) >= 60.0:
            self._said[reason] = now
            log.error("JetStream ingest: %s; retrying (%s)", meaning, reason)

    async def _bind(self, js: Any) -> list[tuple[Kind, Any]]:
        """Check the stream, create (or update) the durable consumers, bind to them."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        info = await js.stream_info(STREAM)  # NotFoundError until a first MQTT client came
        check_stream(info.config.retention, info.config.subjects)
        pulls: list[tuple[Kind, Any]] = []
        for kind in KINDS:
            await js.add_consumer(
                STREAM,
                ConsumerConfig(
                    durable_name=durable_name(kind),
                    filter_subject=filter_subject(kind),
                    ack_policy=AckPolicy.EXPLICIT,
                    # from its creation on (kept by the cluster from then): not whatever the
                    # stream still holds for other consumers, e.g. a persistent MQTT session
                    # of a controller that no longer runs (its devices send that again)
                    deliver_policy=DeliverPolicy.NEW,
                    ack_wait=self.ack_wait_s,
                    max_ack_pending=self.max_ack_pending,
                    max_deliver=-1,
                ),
            )
            pulls.append((kind, await js.pull_subscribe_bind(durable_name(kind), stream=STREAM)))
        return pulls

    async def _pull(self, kind: Kind, sub: Any) -> None:
        import nats.errors

        assert self._closing is not None
        failures = 0
        while not self._closing.is_set():
            await self._room[kind].wait()
            if self._closing.is_set():
                break
            room = min(
                self.max_in_flight - sum(self._in_flight.values()),
                self._limit[kind] - self._in_flight[kind],
            )
            if room <= 0:
                self._room[kind].clear()
                continue
            try:
                msgs = await sub.fetch(min(room, self.fetch_batch), timeout=FETCH_TIMEOUT_S)
                failures = 0
            except (nats.errors.TimeoutError, TimeoutError):  # nothing to pull (nats-py: either)
                continue
            except Exception as e:  # a node or leader away: nats-py reconnects by itself
                failures += 1
                if self._closing.is_set() or failures >= 5:  # bind again (`_main`)
                    raise
                log.warning("JetStream %s pull: %r", kind, e)
                await asyncio.sleep(0.5 * failures)
                continue
            self.stats.fetched[kind] += len(msgs)
            for m in msgs:
                if m.metadata.num_delivered > 1:
                    self.stats.redelivered += 1
                parsed = parse_subject(m.subject)
                if parsed is None or parsed[1] != kind:
                    self.stats.unknown_subject += 1
                    with contextlib.suppress(Exception):
                        await m.ack()
                    continue
                self._in_flight[kind] += 1
                self._held[id(m)] = (kind, m)
                self._put((parsed[0], kind, m.data, m))

    async def _hand_back(self) -> None:
        """On a clean stop: NAK every message handed to the bridge and not settled (fetched,
        still in its queue), so that JetStream delivers it to another replica at once, not
        after ``ack_wait_s``. The bridge's worker has ended first (`MqttBridge.stop`), so none
        of them is being written; one that was (a worker past its join timeout) comes again
        and the database keeps one copy."""
        held = [m for _, m in self._held.values()]
        self._held = {}
        self._in_flight = dict.fromkeys(KINDS, 0)
        # and what reached a pull's inbox after its fetch returned (nats-py keeps it there for
        # the next fetch; none comes)
        for sub in self._subs:
            pending = getattr(getattr(sub, "_sub", None), "_pending_queue", None)
            while pending is not None and not pending.empty():
                m = pending.get_nowait()
                if (m.reply or "").startswith("$JS.ACK."):  # a message, not a status (408)
                    held.append(m)
        await asyncio.sleep(0.05)  # a pull request that expired as the fetch did is gone
        naked = 0
        for m in held:
            try:
                await m.nak()
                naked += 1
            except Exception as e:  # the connection is gone: it comes again after ack_wait
                log.debug("nak of %s: %s", m.subject, e)
        self.stats.released += naked
        if held:
            log.info(
                "JetStream ingest stopped: %d of %d unprocessed messages handed back (NAK) to "
                "the other replicas",
                naked,
                len(held),
            )

    async def _ack(self, handles: list[Any], done: bool = True) -> None:
        for m in handles if done else ():
            try:
                await m.ack()
                self.stats.acked += 1
            except Exception as e:  # acked already, or the connection is gone: it comes again
                log.debug("ack of %s: %s", getattr(m, "subject", "?"), e)
        for m in handles:
            held = self._held.pop(id(m), None)
            if held is not None:
                self._in_flight[held[0]] -= 1
        for room in self._room.values():  # each pull checks its own room again
            room.set()
