"""The running controller: database, signing and trusted keys, rollout service, MQTT bridge and
the rollout ticker thread. `app.create_app` serves one; the routers reach it through `deps`."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.desired import Signer
from edgefleet.cloud_controller.mqtt_bridge import MqttBridge
from edgefleet.cloud_controller.rollouts import RolloutService
from edgefleet.cloud_controller.settings import Settings

log = logging.getLogger(__name__)
SEQ_HIGH_FILE = "desired_seq_high"


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
    _stop: threading.Event = field(default_factory=threading.Event)
    _ticker: threading.Thread | None = None

    @classmethod
    def build(cls, settings: Settings) -> Controller:
        engine = db.make_engine(settings.database_url)
        db.upgrade(engine)
        factory = db.session_factory(engine)
        signer = Signer(load_signing_key(settings), timedelta(seconds=settings.desired_ttl_s))
        settings.package_dir.mkdir(parents=True, exist_ok=True)
        service = RolloutService(factory, signer, settings.base_url)
        ctl = cls(settings, engine, factory, signer, load_trusted_keys(settings), service)
        if settings.broker_url:
            ctl.bridge = MqttBridge(
                settings.broker_url,
                factory,
                service,
                client_id=settings.mqtt_client_id,
                max_bytes={
                    "presence": settings.max_presence_bytes,
                    "status": settings.max_status_bytes,
                    "telemetry": settings.max_telemetry_bytes,
                },
                signer=signer,
                protocol=settings.resolved_mqtt_protocol,
            )
            service.publish = ctl.bridge.publish
        return ctl

    _seq_high: int = 0

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

    def start(self) -> None:
        self.recover_seq_high()
        self.resync_stale()
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
        try:
            self.persist_seq_high()
        except Exception:
            log.exception("desired seq high-water mark not written")
        self.engine.dispose()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            try:
                self.rollouts.tick()
            except Exception:
                log.exception("rollout tick failed")
            try:
                self.persist_seq_high()
            except Exception:
                log.exception("desired seq high-water mark not written")
