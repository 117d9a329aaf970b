"""Device reports through JetStream on a real three-node NATS cluster (broker kind "nats",
`cloud_controller/jetstream.py`): controller replicas share the durable consumers on
``$MQTT_msgs``, so each report reaches one replica; what devices publish while no controller
runs waits in the cluster for the next one, whatever its id; a replica killed with SIGKILL in
the middle of its batches loses nothing (JetStream delivers its unacknowledged messages again,
and the database keeps one copy).

Reports are published here by a bare MQTT client that never sends anything twice (no outbox),
so whatever reaches the database came through JetStream once or more, never by a resend."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.jetstream import (
    STREAM,
    JetStreamError,
    JetStreamIngest,
    check_stream,
    durable_name,
    filter_subject,
    parse_subject,
)
from edgefleet.cloud_controller.settings import Settings
from edgefleet.harness import NatsCluster, nats_server_binary, stop_processes
from edgefleet.keys import generate_keypair
from edgefleet.wire.mqtt import topic
from tests.controller.test_replicas import own_database
from tests.fleet.conftest import SecureNatsCluster, quiet_port, wait_until
from tests.support.services import require

ROOT = Path(__file__).resolve().parents[2]


# --- the pure parts ----------------------------------------------------------------------------


def test_subjects_map_to_device_topics_and_back() -> None:
    assert filter_subject("status") == "$MQTT.msgs.edgefleet.v1.devices.*.status"
    assert parse_subject("$MQTT.msgs.edgefleet.v1.devices.gw-1.status") == ("gw-1", "status")
    assert parse_subject("$MQTT.msgs.edgefleet.v1.devices.gw_2.telemetry") == (
        "gw_2",
        "telemetry",
    )
    for bad in (
        "edgefleet.v1.devices.gw-1.status",  # not the MQTT message stream's
        "$MQTT.msgs.edgefleet.v1.devices.gw.1.status",  # one token too many
        "$MQTT.msgs.other.v1.devices.gw-1.status",
        "$MQTT.msgs.edgefleet.v1.devices.gw-1.nonsense",
    ):
        assert parse_subject(bad) is None, bad


def test_a_stream_of_another_shape_is_refused_with_the_reason() -> None:
    check_stream("interest", ["$MQTT.msgs.>"])
    with pytest.raises(JetStreamError, match="retention 'limits'"):
        check_stream("limits", ["$MQTT.msgs.>"])
    with pytest.raises(JetStreamError, match=r"not \$MQTT\.msgs\.>"):
        check_stream("interest", ["$MQTT.out.>"])


def test_broker_kind_nats_needs_the_nats_urls_unless_jetstream_ingest_is_off() -> None:
    s = Settings(broker_url="mqtt://n1:1883", broker_kind="nats")
    with pytest.raises(ValueError, match="--nats-url"):
        _ = s.jetstream_urls
    assert Settings(broker_kind="nats", nats_url="nats://n1:4222").jetstream_urls == (
        "nats://n1:4222"
    )
    assert Settings(broker_kind="nats", jetstream_ingest=False).jetstream_urls is None
    assert Settings(broker_kind="mqtt", nats_url="nats://n1:4222").jetstream_urls is None


def test_the_jetstream_client_takes_the_brokers_ca_unless_given_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from edgefleet.cli import app

    ca, own, cert, key = (tmp_path / n for n in ("ca.crt", "nats-ca.crt", "c.crt", "c.key"))
    assert Settings(broker_ca_file=ca).nats_tls_files() == (ca, None, None)
    given = Settings(broker_ca_file=ca, nats_ca_file=own, nats_cert_file=cert, nats_key_file=key)
    assert given.nats_tls_files() == (own, cert, key)
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_NATS_CA_FILE", str(own))
    monkeypatch.setenv("EDGEFLEET_CONTROLLER_NATS_CERT_FILE", str(cert))
    assert Settings().with_env().nats_tls_files()[:2] == (own, cert)
    out = CliRunner().invoke(app, ["controller", "serve", "--help"], env={"COLUMNS": "200"})
    assert all(f in out.output for f in ("--nats-ca", "--nats-cert", "--nats-key")), out.output


def test_a_nats_server_without_jetstream_is_refused_at_start(tmp_path: Path) -> None:
    """A plain NATS server (no `jetstream {}`) answers no JetStream request: the ingest says so
    at start instead of waiting for ever."""
    binary = nats_server_binary()
    require(binary is not None, "nats-server is not installed (apt-get install nats-server)")
    assert binary is not None
    port = quiet_port()
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _listening(port), 10)
        ingest = JetStreamIngest(f"nats://127.0.0.1:{port}", lambda item: None)
        with pytest.raises(JetStreamError, match="no JetStream"):
            ingest.start(timeout=20)
        # a tls:// URL to a server without TLS: nats-py would go on in clear, credentials too
        ingest = JetStreamIngest(f"tls://ctl:secret@127.0.0.1:{port}", lambda item: None)
        with pytest.raises(JetStreamError, match=r"requires no TLS, but its URL says tls://"):
            ingest.start(timeout=20)
    finally:
        stop_processes([proc])


def _listening(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# --- on the cluster ----------------------------------------------------------------------------


def _status(dev: str, seq: int) -> bytes:
    return json.dumps(
        {
            "seq": seq,
            "device_id": dev,
            "at": "2026-01-01T00:00:00Z",
            "kind": "update",
            "model": "iris",
            "version": "1.0.0",
            "state": "DOWNLOADING",
            "desired_seq": 0,
        }
    ).encode()


def _telemetry(dev: str, first_id: int, n: int) -> bytes:
    records = [
        {"id": first_id + k, "at": "2026-01-01T00:00:00Z", "kind": "system", "cpu_percent": 1.0}
        for k in range(n)
    ]
    return json.dumps({"device_id": dev, "records": records}).encode()


@dataclass
class Sent:
    """What the publisher sent: per device, its last status seq and its telemetry ids."""

    status: dict[str, int]
    telemetry: dict[str, int]  # records per device, ids 1..n

    @property
    def reports(self) -> int:
        return sum(self.status.values())


def publish(
    cluster: NatsCluster, devices: list[str], statuses: int, envelopes: int, records: int = 2
) -> Sent:
    """Each device's reports, QoS 1, once each (PUBACKed: stored in the cluster), through
    one client per node, the devices spread over them."""
    clients = []
    for i, port in enumerate(cluster.mqtt_ports):
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"pub-{uuid.uuid4().hex[:6]}-{i}",
            protocol=mqtt.MQTTv311,
        )
        c.max_inflight_messages_set(200)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append(c)
    infos = []
    try:
        for n, dev in enumerate(devices):
            c = clients[n % len(clients)]
            for seq in range(1, statuses + 1):
                infos.append(c.publish(topic(dev, "status"), _status(dev, seq), qos=1))
            for e in range(envelopes):
                payload = _telemetry(dev, 1 + e * records, records)
                infos.append(c.publish(topic(dev, "telemetry"), payload, qos=1))
        for info in infos:
            info.wait_for_publish(60)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
    return Sent(dict.fromkeys(devices, statuses), dict.fromkeys(devices, envelopes * records))


def stored(url: str, devices: list[str]) -> tuple[dict[str, int], dict[str, list[int]]]:
    """(last status seq, telemetry record ids in order) per device, from the database."""
    engine = db.make_engine(url)
    try:
        with engine.connect() as c:
            seqs = {
                str(d): int(s or 0)
                for d, s in c.execute(text("SELECT id, last_status_seq FROM devices"))
                if d in devices
            }
            rows = c.execute(
                text("SELECT device_id, record_id FROM telemetry_records ORDER BY record_id")
            )
            tel: dict[str, list[int]] = {}
            for d, r in rows:
                if d in devices:
                    tel.setdefault(str(d), []).append(int(r))
        return seqs, tel
    finally:
        engine.dispose()


def complete(url: str, sent: Sent) -> bool:
    seqs, tel = stored(url, list(sent.status))
    return seqs == sent.status and all(len(tel.get(d, [])) >= n for d, n in sent.telemetry.items())


def assert_exactly_once(url: str, sent: Sent) -> None:
    seqs, tel = stored(url, list(sent.status))
    assert seqs == sent.status
    for dev, n in sent.telemetry.items():
        assert tel.get(dev) == list(range(1, n + 1)), (dev, tel.get(dev))


def consumer(cluster: NatsCluster, kind: str) -> Any:
    """The durable consumer's state (nats-py), as the cluster reports it."""
    import nats

    async def info() -> Any:
        nc = await nats.connect(cluster.nats_urls)
        try:
            return await nc.jetstream().consumer_info(STREAM, durable_name(kind))  # type: ignore[arg-type]
        finally:
            await nc.close()

    return asyncio.run(info())


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def metric(self, kind: str, name: str = "edgefleet_mqtt_messages_total") -> int:
        """Reports of ``kind`` this replica's bridge took in, or another counter of its
        /metrics (``kind`` empty: one without labels)."""
        r = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5)
        want = f'{name}{{kind="{kind}"}}' if kind else name
        for line in r.text.splitlines():
            if line.startswith(want + " "):
                return int(float(line.split()[-1]))
        return 0

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def start_replica(
    name: str, workdir: Path, db_url: str, cluster: NatsCluster, key: Path, ack_wait_s: float
) -> Replica:
    port = quiet_port()
    log = workdir / f"{name}.log"
    path = os.environ.get("PYTHONPATH")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""),
        "EDGEFLEET_CONTROLLER_SIGNING_KEY": str(key),
        "EDGEFLEET_CONTROLLER_BROKER_KIND": "nats",
        "EDGEFLEET_CONTROLLER_NATS_URL": ",".join(cluster.nats_urls),
        "EDGEFLEET_CONTROLLER_JETSTREAM_ACK_WAIT_S": str(ack_wait_s),
    }
    cmd = [
        *(sys.executable, "-m", "edgefleet", "controller", "serve"),
        *("--db", db_url, "--broker", ",".join(cluster.mqtt_urls), "--port", str(port)),
        *("--data-dir", str(workdir / name), "--replica-id", name),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    replica = Replica(name, port, proc, log)
    deadline = time.monotonic() + 90
    while not replica.healthy():
        assert proc.poll() is None and time.monotonic() < deadline, replica.tail()
        time.sleep(0.2)
    return replica


def stop(replicas: list[Replica]) -> None:
    stop_processes([r.proc for r in replicas if r.proc.poll() is None], timeout=15.0)


@pytest.mark.slow
def test_two_replicas_share_the_reports_and_store_each_once(
    nats: NatsCluster, tmp_path: Path, postgres_url: str
) -> None:
    key = generate_keypair(tmp_path / "keys", "controller")
    with own_database(postgres_url) as url:
        db.upgrade(db.make_engine(url))
        replicas = [
            start_replica(n, tmp_path, url, nats, key.private_path, 30.0) for n in ("ra", "rb")
        ]
        try:
            devices = [f"gw-share-{i}" for i in range(60)]
            sent = publish(nats, devices, statuses=5, envelopes=5)
            assert wait_until(lambda: complete(url, sent), 120, 0.5), stored(url, devices)
            assert_exactly_once(url, sent)
            shares = [r.metric("status") for r in replicas]
            tel = [r.metric("telemetry") for r in replicas]
            print(f"status per replica {shares}, telemetry envelopes per replica {tel}")
            # each took a share, neither all: with 30 s to acknowledge, nothing came twice
            assert sum(shares) == sent.reports and all(0 < s < sent.reports for s in shares)
            assert sum(tel) == 60 * 5 and all(0 < t < 60 * 5 for t in tel)
            # (had the MQTT path subscribed them too, each replica would have read every one)
            assert consumer(nats, "status").num_pending == 0
        finally:
            stop(replicas)


@pytest.mark.slow
def test_reports_published_while_no_controller_runs_reach_the_next_one(
    nats: NatsCluster, tmp_path: Path, postgres_url: str
) -> None:
    """Another replica (another MQTT client id) than the one that ran before: the reports wait
    in the shared durable consumers, not in the first replica's MQTT session."""
    key = generate_keypair(tmp_path / "keys", "controller")
    with own_database(postgres_url) as url:
        db.upgrade(db.make_engine(url))
        first = start_replica("first", tmp_path, url, nats, key.private_path, 30.0)
        stop([first])
        devices = [f"gw-away-{i}" for i in range(20)]
        sent = publish(nats, devices, statuses=3, envelopes=3)
        assert consumer(nats, "status").num_pending == sent.reports  # kept by the cluster
        assert stored(url, devices) == ({}, {})
        second = start_replica("second", tmp_path, url, nats, key.private_path, 30.0)
        try:
            assert wait_until(lambda: complete(url, sent), 60, 0.5), stored(url, devices)
            assert_exactly_once(url, sent)
            assert second.metric("status") == sent.reports
        finally:
            stop([second])


@pytest.mark.slow
def test_a_replica_killed_mid_batch_loses_nothing(
    nats: NatsCluster, tmp_path: Path, postgres_url: str
) -> None:
    key = generate_keypair(tmp_path / "keys", "controller")
    with own_database(postgres_url) as url:
        db.upgrade(db.make_engine(url))
        stop([start_replica("victim", tmp_path, url, nats, key.private_path, 3.0)])
        devices = [f"gw-kill-{i}" for i in range(200)]
        sent = publish(nats, devices, statuses=5, envelopes=3)  # a backlog for the victim
        victim = start_replica("victim", tmp_path, url, nats, key.private_path, 3.0)
        assert wait_until(lambda: victim.metric("status") > 0, 60, 0.02), victim.tail()
        victim.proc.send_signal(signal.SIGKILL)  # in the middle of its batches
        victim.proc.wait(10)
        pending = (
            consumer(nats, "status").num_ack_pending + consumer(nats, "telemetry").num_ack_pending
        )
        assert pending > 0  # it held messages it had not acknowledged
        assert not complete(url, sent)
        survivor = start_replica("survivor", tmp_path, url, nats, key.private_path, 3.0)
        try:
            assert wait_until(lambda: complete(url, sent), 120, 0.5), stored(url, devices)
            assert_exactly_once(url, sent)
            redelivered = survivor.metric("", "edgefleet_jetstream_redelivered_total")
            print(f"{pending} unacknowledged at the kill, {redelivered} delivered again")
            assert redelivered > 0
        finally:
            stop([survivor])


@pytest.mark.slow
def test_capture_goes_to_one_replica_and_the_flood_limit_holds_fleet_wide(
    nats: NatsCluster, tmp_path: Path, postgres_url: str
) -> None:
    """Capture messages come through the third shared consumer, like status and telemetry:
    two in-process controllers on one PostgreSQL database each take some, none takes one
    twice, and together they store the capture's rows per minute once (the rate is counted in
    the database, under the capture's row lock), refusing the rest once each. Read over MQTT
    on NATS (no shared subscriptions) every replica ingested every capture message: the
    refusals were counted twice, and each record was checked and acknowledged twice."""
    from sqlalchemy import func, select

    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.models import CapturedRow
    from tests.controller.conftest import start_controller
    from tests.controller.test_capture import RawDevice, _manage, _row, _start_capture

    keys = generate_keypair(tmp_path / "keys", "packager")
    with own_database(postgres_url) as url:
        common: dict[str, Any] = {
            "trusted": [keys.public_path],
            "broker_url": ",".join(nats.mqtt_urls),
            "db_url": url,
            "broker_kind": "nats",
            "nats_url": ",".join(nats.nats_urls),
            "jetstream_ack_wait_s": 30.0,
        }
        a = start_controller(tmp_path / "a", **common)
        b = None
        pub = None
        try:
            b = start_controller(
                tmp_path / "b", signing_key=tmp_path / "a" / "keys" / "controller.key", **common
            )
            for c in (a, b):
                assert c.controller.bridge.wait_connected(20)
                js = c.controller.bridge.jetstream
                assert js is not None and wait_until(lambda js=js: js.stats.ready, 30)
            dev = "cap-nats-1"
            _manage(a, [dev])
            cid = _start_capture(a, [dev], rows=100, per_minute=5)
            pub = RawDevice(_Node(nats.mqtt_ports[1]), dev)
            for i in range(40):  # one row a message
                pub.publish_capture(json.dumps({"records": [_row(cid, i)]}))
            assert wait_until(lambda: pub.acked() >= set(range(40)), 60), pub.acks
            bridges = [c.controller.bridge for c in (a, b)]
            assert wait_until(lambda: all(br.idle() for br in bridges), 30)
            taken = [br.stats.received["capture"] for br in bridges]
            refused = [br.stats.dropped.get("capture_rate", 0) for br in bridges]
            with transaction(a.controller.factory) as s:
                stored_rows = s.scalar(select(func.count()).select_from(CapturedRow))
                distinct = s.scalar(select(func.count(func.distinct(CapturedRow.record_id))))
            per = a.client("viewer").get(f"/api/v1/captures/{cid}").json()["per_device"][dev]
            print(f"\ncapture messages per replica {taken}, rate refusals per replica {refused}")
            assert sum(taken) == 40, taken  # each message ingested by one replica
            assert sum(refused) == 30, refused
            assert stored_rows == distinct == per["rows"] == 10  # 2 x 5 a minute, fleet-wide
            assert per["refused"]["capture_rate"] == 30
            for kind in ("status", "telemetry", "capture"):
                assert consumer(nats, kind).num_ack_pending == 0
        finally:
            if pub is not None:
                pub.close()
            if b is not None:
                b.stop()
            a.stop()


@dataclass
class _Node:
    """One NATS node's MQTT listener, as `RawDevice` takes a broker."""

    port: int
    host: str = "127.0.0.1"


@pytest.mark.slow
def test_a_replica_stopped_cleanly_hands_its_unprocessed_messages_to_the_next_at_once(
    nats: NatsCluster, tmp_path: Path, postgres_url: str
) -> None:
    """A replica stopped with SIGTERM while it holds a backlog it fetched and has not processed
    NAKs those messages: the next replica stores them within seconds of the stop (its own start
    included), not after the ack wait (120 s here; before, every message the stopped replica
    held waited that long). The next replica starts after the stop: a replica running beside
    it would have worked off the whole backlog with it before any stop could catch it."""
    ack_wait = 120.0
    key = generate_keypair(tmp_path / "keys", "controller")
    with own_database(postgres_url) as url:
        db.upgrade(db.make_engine(url))
        stop([start_replica("leaver", tmp_path, url, nats, key.private_path, ack_wait)])
        devices = [f"gw-leave-{i}" for i in range(500)]
        sent = publish(nats, devices, statuses=5, envelopes=3)  # a backlog, 4,000 messages
        leaver = start_replica("leaver", tmp_path, url, nats, key.private_path, ack_wait)
        stayer = None
        try:
            assert wait_until(lambda: leaver.metric("status") > 0, 60, 0.02), leaver.tail()
            held = consumer(nats, "status").num_ack_pending
            t0 = time.monotonic()
            stop([leaver])  # SIGTERM: a clean stop, in the middle of the backlog
            assert not complete(url, sent)
            stayer = start_replica("stayer", tmp_path, url, nats, key.private_path, ack_wait)
            assert wait_until(lambda: complete(url, sent), ack_wait / 4, 0.5), stored(url, devices)
            took = time.monotonic() - t0
            assert_exactly_once(url, sent)
            redelivered = stayer.metric("", "edgefleet_jetstream_redelivered_total")
            print(
                f"{held} status messages held at the stop; all stored {took:.1f} s after it "
                f"(ack wait {ack_wait:.0f} s); {redelivered} delivered again"
            )
            assert redelivered > 0  # the NAKed ones: the stayer got them again, at once
        finally:
            stop([r for r in (leaver, stayer) if r is not None])


# --- TLS and passwords ---------------------------------------------------------------------------


def _seq(url: str, device_id: str) -> int:
    engine = db.make_engine(url)
    try:
        with engine.connect() as c:
            row = c.execute(
                text("SELECT last_status_seq FROM devices WHERE id = :d"), {"d": device_id}
            ).first()
        return int(row[0] or 0) if row else 0
    finally:
        engine.dispose()


@pytest.mark.slow
def test_over_tls_with_passwords_a_device_report_is_stored_and_acked(
    secure_nats: SecureNatsCluster, tmp_path: Path, postgres_url: str
) -> None:
    """TLS and user/password on the cluster's MQTT listeners and NATS client ports: the
    controller's bridge over mqtts://user:password@..., its JetStream client over
    tls://user:password@... with the cluster's CA (--nats-ca), a device over MQTT/TLS with its
    own user; its status is stored (through JetStream) and acknowledged to it."""
    from tests.controller.conftest import start_controller

    keys = generate_keypair(tmp_path / "keys", "packager")
    with own_database(postgres_url) as url:
        run = start_controller(
            tmp_path / "ctl",
            trusted=[keys.public_path],
            broker_url=",".join(secure_nats.mqtts_urls("controller")),
            db_url=url,
            broker_kind="nats",
            broker_ca_file=secure_nats.security.ca,
            nats_url=",".join(secure_nats.tls_urls("controller")),
            nats_ca_file=secure_nats.security.ca,
        )
        dev = None
        try:
            bridge = run.controller.bridge
            assert bridge.wait_connected(20), bridge.stats
            js = bridge.jetstream
            assert js is not None and wait_until(lambda: js.stats.ready, 30), js.stats
            acks: list[bytes] = []
            dev = secure_nats.mqtt_client(2, "device", client_id="gw-tls-1")
            dev.on_message = lambda _c, _u, m: acks.append(bytes(m.payload))
            dev.connect("127.0.0.1", secure_nats.mqtt_ports[2])
            dev.loop_start()
            dev.subscribe(topic("gw-tls-1", "ack"), qos=0)
            time.sleep(0.5)
            info = dev.publish(topic("gw-tls-1", "status"), _status("gw-tls-1", 1), qos=1)
            info.wait_for_publish(20)
            assert wait_until(lambda: _seq(url, "gw-tls-1") == 1, 30), js.stats
            assert wait_until(lambda: any(b'"status"' in a for a in acks), 20), acks
            assert js.stats.fetched["status"] == 1 and js.stats.refused == {}
            assert bridge.stats.refused == {}
        finally:
            if dev is not None:
                dev.disconnect()
                dev.loop_stop()
            run.stop()


@pytest.mark.slow
def test_a_wrong_password_is_refused_with_the_reason_on_mqtt_and_on_nats(
    secure_nats: SecureNatsCluster, tmp_path: Path, postgres_url: str, caplog: Any
) -> None:
    """A wrong password (and, for NATS, a CA that is not the cluster's) is not retried in
    silence: the log and /metrics name the broker's refusal."""
    import logging

    from tests.controller.conftest import start_controller

    caplog.set_level(logging.ERROR)
    urls = secure_nats.tls_urls("controller")
    wrong = ",".join(u.replace(":ctl-Secret-1@", ":nope@") for u in urls)
    ingest = JetStreamIngest(
        wrong, lambda item: None, tls_files=(secure_nats.security.ca, None, None)
    )
    ingest.start(timeout=3)
    try:
        assert wait_until(lambda: ingest.stats.refused.get("authorization_violation", 0) > 0, 15)
        assert not ingest.stats.ready
    finally:
        ingest.stop()
    assert "refused the controller's credentials (Authorization Violation)" in caplog.text
    untrusted = JetStreamIngest(",".join(urls), lambda item: None)  # the system's CAs
    untrusted.start(timeout=3)
    try:
        assert wait_until(lambda: untrusted.stats.refused.get("tls_verify_failed", 0) > 0, 15)
    finally:
        untrusted.stop()
    assert "TLS certificate is not trusted" in caplog.text and "--nats-ca" in caplog.text

    keys = generate_keypair(tmp_path / "keys", "packager")
    with own_database(postgres_url) as url:
        run = start_controller(
            tmp_path / "ctl",
            trusted=[keys.public_path],
            broker_url=",".join(
                u.replace(":ctl-Secret-1@", ":nope@") for u in secure_nats.mqtts_urls("controller")
            ),
            db_url=url,
            broker_kind="nats",
            broker_ca_file=secure_nats.security.ca,
            jetstream_ingest=False,
        )
        try:
            bridge = run.controller.bridge
            assert wait_until(lambda: bridge.stats.refused.get("Not authorized", 0) > 0, 20)
            assert not bridge.stats.connected
            metrics = httpx.get(f"{run.url}/metrics", timeout=5).text
            assert 'edgefleet_broker_refused_total{reason="Not authorized"}' in metrics, metrics
        finally:
            run.stop()
    assert "refused the controller: Not authorized" in caplog.text


@pytest.mark.slow
def test_a_replica_holds_at_most_32_capture_messages_unacknowledged(nats: NatsCluster) -> None:
    """Capture messages are up to 2 MiB: however many wait, a replica fetches at most
    `CAPTURE_IN_FLIGHT` of them before its bridge settles some, while status keeps flowing."""
    from edgefleet.cloud_controller.jetstream import CAPTURE_IN_FLIGHT

    got: list[tuple[str, str, bytes, Any]] = []
    ingest = JetStreamIngest(",".join(nats.nats_urls), got.append, ack_wait_s=60)
    ingest.start()
    try:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="cap-pub", protocol=mqtt.MQTTv311)
        c.connect("127.0.0.1", nats.mqtt_ports[0])
        c.loop_start()
        infos = [
            c.publish(topic("gw-cap", "capture"), b'{"records": []}', qos=1) for _ in range(80)
        ]
        infos += [c.publish(topic("gw-cap", "status"), _status("gw-cap", 1), qos=1)]
        for info in infos:
            info.wait_for_publish(30)
        c.disconnect()
        c.loop_stop()
        assert wait_until(lambda: any(k == "status" for _, k, _, _ in got), 20)
        time.sleep(2.0)  # room for more pulls, were there room
        held = [m for _, k, _, m in got if k == "capture"]
        assert len(held) == CAPTURE_IN_FLIGHT == 32
        ingest.settle(held[:10], True)
        assert wait_until(lambda: sum(k == "capture" for _, k, _, _ in got) == 42, 20)
        time.sleep(1.0)
        assert sum(k == "capture" for _, k, _, _ in got) == 42
    finally:
        ingest.stop()
