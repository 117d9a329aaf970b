"""The FastAPI app around a `Controller`: lifespan, audit middleware, health, metrics, routers.

`Controller` lives in `controller.py` (the routers' dependencies in `deps.py` need it, and must
not import this module, which imports the routers); it is re-exported here for callers that
build an app and its controller together.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from sqlalchemy import func, select

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.api import router as api_router
from edgefleet.cloud_controller.controller import Controller
from edgefleet.cloud_controller.dashboard import router as dashboard_router
from edgefleet.cloud_controller.drift.api import router as drift_router
from edgefleet.cloud_controller.models import AuditEntry, Device, Rollout
from edgefleet.cloud_controller.settings import Settings

__all__ = ["Controller", "create_app"]

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


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


def create_app(settings: Settings, controller: Controller | None = None) -> FastAPI:
    """The FastAPI app; it builds (or takes) a `Controller` and runs it for its lifetime."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

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

    app.include_router(api_router)
    app.include_router(drift_router)
    app.include_router(dashboard_router)
    return app
