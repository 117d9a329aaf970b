"""Assembly: `Controller` (database, keys, rollout service, MQTT bridge, ticker) and the app."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Request, Response
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.desired import Signer
from edgefleet.cloud_controller.models import AuditEntry, Device, Rollout
from edgefleet.cloud_controller.mqtt_bridge import MqttBridge
from edgefleet.cloud_controller.rollouts import RolloutService
from edgefleet.cloud_controller.settings import Settings

log = logging.getLogger(__name__)
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


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
                settings.broker_url, factory, service, client_id=settings.mqtt_client_id
            )
            service.publish = ctl.bridge.publish
        return ctl

    def start(self) -> None:
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
        self.engine.dispose()

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            try:
                self.rollouts.tick()
            except Exception:
                log.exception("rollout tick failed")


class _Metrics:
    """Prometheus collector reading the controller's figures at scrape time."""

    def __init__(self, ctl: Controller) -> None:
        self.ctl = ctl

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.ctl.factory() as s:
            online = s.scalar(select(func.count()).select_from(Device).where(Device.online)) or 0
            total = s.scalar(select(func.count()).select_from(Device)) or 0
            phases = dict(
                s.execute(select(Rollout.phase, func.count()).group_by(Rollout.phase)).all()
            )
        g = GaugeMetricFamily("edgefleet_devices", "Devices in the inventory", labels=["online"])
        g.add_metric(["true"], online)
        g.add_metric(["false"], total - online)
        yield g
        r = GaugeMetricFamily("edgefleet_rollouts", "Rollouts by phase", labels=["phase"])
        for phase, n in phases.items():
            r.add_metric([str(phase)], float(n))
        yield r
        b = self.ctl.bridge
        if b is not None:
            m = CounterMetricFamily(
                "edgefleet_mqtt_messages", "MQTT messages received", labels=["kind"]
            )
            for kind, n in b.stats.received.items():
                m.add_metric([kind], n)
            yield m
            d = CounterMetricFamily(
                "edgefleet_mqtt_dropped", "MQTT messages dropped", labels=["reason"]
            )
            for reason, n in b.stats.dropped.items():
                d.add_metric([reason], n)
            yield d
            c = GaugeMetricFamily("edgefleet_broker_connected", "1 when connected to the broker")
            c.add_metric([], 1.0 if b.stats.connected else 0.0)
            yield c


def _drift_and_dashboard_routers(app: FastAPI) -> None:
    """The drift API and the dashboard pages."""
    from edgefleet.cloud_controller.dashboard import router as dashboard_router
    from edgefleet.cloud_controller.drift.api import router as drift_router

    app.include_router(drift_router)
    app.include_router(dashboard_router)


def create_app(settings: Settings, controller: Controller | None = None) -> FastAPI:
    """The FastAPI app; it builds (or takes) a `Controller` and runs it for its lifetime."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    from edgefleet.cloud_controller.api import router

    ctl = controller or Controller.build(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        ctl.start()
        try:
            yield
        finally:
            ctl.stop()

    app = FastAPI(
        title="edgefleet controller",
        version="1",
        description="Registry, devices and staged rollouts for edgefleet gateways.",
        lifespan=lifespan,
    )
    app.state.controller = ctl
    registry = CollectorRegistry()
    registry.register(_Metrics(ctl))  # type: ignore[arg-type,unused-ignore]

    @app.middleware("http")
    async def audit(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if request.method in MUTATING:
            route = request.scope.get("route")
            entry = AuditEntry(
                at=datetime.now(UTC),
                actor=getattr(request.state, "actor", None) or "anonymous",
                action=f"{request.method} {getattr(route, 'path', request.url.path)}",
                target=request.url.path,
                outcome=response.status_code,
                detail=getattr(request.state, "audit", None) or {},
            )
            from fastapi.concurrency import run_in_threadpool

            def write() -> None:
                with db.transaction(ctl.factory) as s:
                    s.add(entry)

            await run_in_threadpool(write)
        return response

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {
            "ok": True,
            "broker_connected": ctl.bridge.stats.connected if ctl.bridge else None,
            "active_rollouts": len(ctl.rollouts.active_ids()),
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(router)
    _drift_and_dashboard_routers(app)
    return app
