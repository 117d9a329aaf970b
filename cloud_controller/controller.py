"""The running controller: database, signing and trusted keys, rollout service, MQTT bridge and
the rollout ticker thread. `app.create_app` serves one; the routers reach it through `deps`."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import db, pki
from edgefleet.cloud_controller.desired import Signer
from edgefleet.cloud_controller.leader import AlwaysLeader, Elector, LeaseElector
from edgefleet.cloud_controller.mqtt_bridge import MqttBridge
from edgefleet.cloud_controller.rollouts import RolloutService
from edgefleet.cloud_controller.settings import Settings

log = logging.getLogger(__name__)
SEQ_HIGH_FILE = "desired_seq_high"


BROKER_DIRS_FILE = "broker-dirs"


def broker_dirs(pki_dir: Path) -> list[Path]:
    """Broker config directories (`controller mosquitto-config --out`) that get every new CRL."""
    try:
        lines = (pki_dir / BROKER_DIRS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [Path(x) for x in dict.fromkeys(line.strip() for line in lines) if x]


def add_broker_dir(pki_dir: Path, directory: Path) -> None:
    from edgefleet.wire.atomic import atomic_write_bytes

    dirs = [*broker_dirs(pki_dir), directory.resolve()]
    text = "".join(f"{d}\n" for d in dict.fromkeys(dirs))
    atomic_write_bytes(pki_dir / BROKER_DIRS_FILE, text.encode(), 0o600)


def _mosquitto_pid(pid_file: Path) -> int | None:
    """The pid in a broker's pid file when that process is a running Mosquitto (a stale pid
    file must not make the controller signal whatever process took the number since)."""
    try:
        text = pid_file.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None
    try:
        comm = Path(f"/proc/{text}/comm").read_text().strip()
    except OSError:
        return None
    return int(text) if comm == "mosquitto" else None


def load_signing_key(settings: Settings) -> ec.EllipticCurvePrivateKey:
    """The controller's desired-state key; created on first start (`controller.key`/`.pub`)."""
    from edgefleet.keys import generate_keypair, load_private_key

    path = settings.signing_key_path
    if not path.exists():
        generate_keypair(path.parent, path.stem, settings.signing_key_passphrase)
        log.warning("created controller signing key %s", path)
    return load_private_key(path, settings.signing_key_passphrase)


def load_trusted_keys(settings: Settings) -> list[ec.EllipticCurvePublicKey]:
    """Packager public keys: `settings.trusted_keys` plus `<data dir>/trusted/*.pub`."""
    from edgefleet.keys import load_public_key

    paths = list(settings.trusted_keys)
    trusted_dir = settings.data_dir / "trusted"
    if trusted_dir.is_dir():
        paths += sorted(trusted_dir.glob("*.pub"))
    return [load_public_key(Path(p)) for p in paths]


@dataclass
class Controller:
    """One controller's running parts; `build` makes them from settings, `start`/`stop` run
    the MQTT bridge and the ticker that advances rollouts every ``settings.tick_s``."""

    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    signer: Signer
    trusted_keys: list[ec.EllipticCurvePublicKey]
    rollouts: RolloutService
    bridge: MqttBridge | None = None
    elector: Elector | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _ticker: threading.Thread | None = None
    _looker: Any = None

    @property
    def drift_looker(self) -> Any:
        """Early drift looks (edgefleet.cloud_controller.drift.alerts.Looker), made on first use."""
        if self._looker is None:
            from edgefleet.cloud_controller.drift.alerts import Looker

            self._looker = Looker(self.factory, capture_on_drift=self.settings.capture_on_drift)
        return self._looker

    @classmethod
    def build(cls, settings: Settings) -> Controller:
        engine = db.make_engine(settings.database_url)
        db.upgrade(engine)
        from edgefleet.cloud_controller.capture import service as capture

        capture.configure(capture.CaptureLimits.from_settings(settings))
        factory = db.session_factory(engine)
        signer = Signer(load_signing_key(settings), timedelta(seconds=settings.desired_ttl_s))
        settings.package_dir.mkdir(parents=True, exist_ok=True)
        service = RolloutService(factory, signer, settings.base_url)
        ctl = cls(settings, engine, factory, signer, load_trusted_keys(settings), service)
        from edgefleet.cloud_controller.leader import default_replica_id
        from edgefleet.wire import ids

        replica = ids.replica_id(settings.replica_id or default_replica_id())
        if engine.dialect.name == "postgresql":
            ctl.elector = LeaseElector(
                factory,
                replica,
                ttl_s=settings.lease_ttl_s,
                renew_s=settings.lease_renew_s,
                on_change=ctl._on_leadership,
            )
        else:  # SQLite: one process, always the leader
            ctl.elector = AlwaysLeader(replica)
        service.fence = ctl.elector.fence
        service.may_publish = ctl.elector.is_leader
        if settings.broker_url:
            ctl.bridge = MqttBridge(
                settings.broker_url,
                factory,
                service,
                client_id=settings.bridge_client_id,
                shared=settings.use_shared_subscriptions,
                acks=settings.acks,
                max_bytes={
                    "presence": settings.max_presence_bytes,
                    "status": settings.max_status_bytes,
                    "telemetry": settings.max_telemetry_bytes,
                    "capture": settings.max_capture_bytes,
                },
                signer=signer,
                tls_files=settings.broker_tls_files(),
                protocol=settings.resolved_mqtt_protocol,
                jetstream_urls=settings.jetstream_urls,
                jetstream_ack_wait_s=settings.jetstream_ack_wait_s,
                jetstream_tls_files=settings.nats_tls_files(),
            )
            service.publish = ctl.bridge.publish
        return ctl

    _seq_high: int = 0
    _ca: object = None

    @property
    def ca(self) -> pki.CertificateAuthority:
        """The controller's CA (`pki`), created in ``<data dir>/pki`` on first use."""
        if not isinstance(self._ca, pki.CertificateAuthority):
            self._ca = pki.CertificateAuthority.load_or_create(self.settings.pki_dir)
        return self._ca

    def refresh_crl(self) -> list[str]:
        """Rewrite the CRL from the database (here and in every broker directory that
        `controller mosquitto-config` registered), then signal each broker whose pid file is
        there to reload it (Mosquitto re-reads its crlfile on SIGHUP). What was done, in words."""
        import os
        import signal
        from datetime import UTC, datetime

        from edgefleet.cloud_controller import enroll

        with self.factory() as s:
            revoked = enroll.revoked_serials(s)
        dirs = broker_dirs(self.settings.pki_dir)
        data = self.ca.write_crl(revoked, datetime.now(UTC))
        done = [f"CRL with {len(revoked)} revoked certificate(s) written"]
        for d in dirs:
            try:
                pki.write_like(d / "crl.pem", data)
            except OSError as e:
                done.append(f"{d}: CRL not written ({e}); copy {self.ca.crl_path} there")
                continue
            pid = _mosquitto_pid(d / "mosquitto.pid")
            if pid is None:
                done.append(f"{d}: no running broker found (reload it: kill -HUP)")
                continue
            try:
                os.kill(pid, signal.SIGHUP)
                done.append(f"{d}: broker {pid} told to reload (SIGHUP)")
            except OSError as e:
                done.append(f"{d}: broker {pid} not signalled ({e}); reload it: kill -HUP")
        return done

    @property
    def seq_high_path(self) -> Path:
        """Outside the database: the highest desired seq this controller has seen issued."""
        return self.settings.data_dir / SEQ_HIGH_FILE

    def persist_seq_high(self) -> int:
        """Write the database's highest desired seq to `seq_high_path` when it rose (each
        tick), so that a database restored from an older backup is noticed at startup."""
        from sqlalchemy import func, select

        from edgefleet.cloud_controller.models import DesiredState
        from edgefleet.wire.atomic import atomic_write_bytes

        with self.factory() as s:
            top = s.scalar(select(func.max(DesiredState.seq))) or 0
        if top > self._seq_high:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.seq_high_path, f"{top}\n".encode())
            self._seq_high = top
        return top

    def recover_seq_high(self) -> int:
        """At startup: when the database's sequences are below what this controller issued
        before (a restore), every device's next state continues above that; the floor used."""
        from datetime import UTC, datetime

        from sqlalchemy import func, select

        from edgefleet.cloud_controller import devices
        from edgefleet.cloud_controller.models import DesiredState

        try:
            text = self.seq_high_path.read_text().strip()
        except FileNotFoundError:
            return 0
        if not text.isdigit() or not 0 < int(text) < 2**62:
            log.error("ignoring %s: %r is not a sequence number", self.seq_high_path, text[:40])
            return 0
        high = int(text)
        self._seq_high = high
        with db.transaction(self.factory) as s:
            top = s.scalar(select(func.max(DesiredState.seq))) or 0
            if top >= high:
                return 0
            n = devices.raise_floor(s, high, datetime.now(UTC))
        log.warning(
            "database desired seqs (max %d) are below the %d this controller issued before "
            "(restored from a backup?): %d device(s) continue above it",
            top,
            high,
            n,
        )
        return high

    def resync_stale(self) -> int:
        """Issue again, above the device's own seq, every desired state a device reported
        holding a newer seq for (they are published on the bridge's connect); how many."""
        from datetime import UTC, datetime

        from edgefleet.cloud_controller import desired

        with db.transaction(self.factory) as s:
            rows = desired.resync(s, self.signer, datetime.now(UTC))
        if rows:
            log.warning("continued the desired-state sequence of %d device(s)", len(rows))
        return len(rows)

    @property
    def is_leader(self) -> bool:
        return self.elector is None or self.elector.is_leader()

    def leader_status(self) -> dict[str, object]:
        """For /healthz: this replica, whether it leads, its fencing epoch."""
        el = self.elector
        if el is None:
            return {"replica_id": None, "leader": True, "epoch": None}
        return {"replica_id": el.replica_id, "leader": el.is_leader(), "epoch": el.epoch()}

    def _on_leadership(self, leader: bool) -> None:
        """The elector's thread, on each change: a new leader reloads every rollout (a
        follower's copy may be behind) and publishes again every desired state, so what the
        previous leader left unpublished goes out."""
        if not leader:
            return
        try:
            self.rollouts.load()
        except Exception:
            log.exception("reloading rollouts on taking the lead failed")
        if self.bridge is not None:
            self.bridge.request_republish()

    def start(self) -> None:
        self.recover_seq_high()
        self.resync_stale()
        if self.elector is not None:
            if isinstance(self.elector, LeaseElector):
                try:
                    self.elector.step()  # one round now: a lone replica leads from its start
                except Exception:
                    log.exception("first leader election round failed")
            self.elector.start()
        self.persist_seq_high()
        if self.bridge is not None:
            self.bridge.start()
        self._stop.clear()
        self._ticker = threading.Thread(target=self._tick_loop, name="rollout-ticker", daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(10)
        if self.bridge is not None:
            self.bridge.stop()
        if self.elector is not None:
            self.elector.stop()
        try:
            self.persist_seq_high()
        except Exception:
            log.exception("desired seq high-water mark not written")
        self.engine.dispose()

    _capture_next: float = 0.0

    def capture_tick(self, force: bool = False) -> dict[str, int]:
        """The leader's capture duties (docs/capture.md), at most every 2 s unless forced:
        send pending captures, end expired ones, delete what is past the retention."""
        import time as _time

        from edgefleet.cloud_controller.capture import service as capture

        if not force and _time.monotonic() < self._capture_next:
            return {}
        self._capture_next = _time.monotonic() + 2.0
        with db.transaction(self.factory) as session:
            if self.elector is not None:
                self.elector.fence(session)
            rows, counts = capture.tick(session, self.signer)
            rows = list({id(r): r for r in rows}.values())  # a device issued twice: its newest
            for row in rows:
                session.expunge(row)
        if rows:
            self.rollouts.publish_committed(rows)
        return counts

    def _tick_loop(self) -> None:
        """The leader advances rollouts and publishes what followers committed; a follower
        only keeps its copy of the rollouts current (it serves the API and ingests)."""
        from edgefleet.cloud_controller.leader import Fenced

        while not self._stop.wait(self.settings.tick_s):
            if not self.is_leader:
                try:
                    self.rollouts.sync()
                except Exception:
                    log.exception("rollout sync failed")
                continue
            try:
                self.rollouts.tick()
                self.rollouts.publish_pending()
            except Fenced as e:
                log.warning("rollout tick refused: %s", e)
            except Exception:
                log.exception("rollout tick failed")
            try:
                self.capture_tick()
            except Fenced as e:
                log.warning("capture tick refused: %s", e)
            except Exception:
                log.exception("capture tick failed")
            try:
                self.persist_seq_high()
            except Exception:
                log.exception("desired seq high-water mark not written")
            try:  # early drift looks (docs/drift.md, Alerts in minutes): the leader only
                self.drift_looker.tick()
            except Exception:
                log.exception("drift look failed")
