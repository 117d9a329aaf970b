"""The FastAPI app around a `Controller`: lifespan, audit middleware, health, metrics, routers.

`Controller` lives in `controller.py` (the routers' dependencies in `deps.py` need it, and must
not import this module, which imports the routers); it is re-exported here for callers that
build an app and its controller together.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefleet.cloud_controller import db
from edgefleet.cloud_controller.api import router as api_router
from edgefleet.cloud_controller.capture.api import router as capture_router
from edgefleet.cloud_controller.controller import Controller
from edgefleet.cloud_controller.dashboard import router as dashboard_router
from edgefleet.cloud_controller.drift.api import router as drift_router
from edgefleet.cloud_controller.models import AuditEntry, Device, Rollout
from edgefleet.cloud_controller.settings import Settings

__all__ = ["Controller", "create_app"]
log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Reads that are audited too: who fetched which package file.
_AUDITED_READS = re.compile(r"/api/v1/packages/[^/]+/download|/api/v1/datasets/[^/]+/npz")
_UPLOADS = re.compile(r"/api/v1/packages/?")
_REFERENCES = re.compile(r"/api/v1/drift/[^/]+/references/?")
# Enrollment carries its own credential (the one-time token) in a small body.
_ENROLL = "/api/v1/enroll"
# Certificate renewal: a device authenticates with its download token.
_RENEW = re.compile(r"/api/v1/devices/[^/]+/certificate")


class _BodyTooLarge(HTTPException):
    """Raised from `receive` while a body streams past its limit; FastAPI lets an
    HTTPException through its body parsing, so the client gets the 413 itself."""

    def __init__(self, limit: int) -> None:
        self.message = f"body over the {limit} byte limit"
        super().__init__(413, detail={"code": "too_large", "message": self.message})


def body_limit(settings: Settings, method: str, path: str) -> int:
    """The most bytes a request body may have on this route (docs/limits.md, Controller)."""
    if method == "POST" and _UPLOADS.fullmatch(path):
        return settings.max_upload_bytes
    if _REFERENCES.fullmatch(path):
        return settings.max_reference_body_bytes
    if path == _ENROLL or _RENEW.fullmatch(path):
        return settings.max_enroll_body_bytes
    return settings.max_body_bytes


async def _send_json(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"detail": {"code": code, "message": message}}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Guard:
    """The outermost part of every HTTP request (pure ASGI, so nothing has read the body yet):

    1. a request with a body to the API must carry a valid token before one byte of its body is
       read (401 otherwise), so an anonymous client cannot make the controller buffer anything;
    2. the body may not exceed its route's limit: refused from Content-Length when declared,
       else cut off while it streams (413);
    3. every mutating call and every package download is audited with its outcome, a call that
       ends in an unhandled error included (outcome 500).
    """

    def __init__(self, app: ASGIApp, ctl: Controller) -> None:
        self.app = app
        self.ctl = ctl

    def _token_ok(self, token: str, path: str) -> bool:
        from edgefleet.cloud_controller.auth import device_for_download_token, lookup_token

        with self.ctl.factory() as s:
            if lookup_token(s, token) is not None:
                return True
            return bool(_RENEW.fullmatch(path)) and device_for_download_token(s, token) is not None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        audited = method in MUTATING or bool(_AUDITED_READS.fullmatch(path))
        status = {"code": 0, "audited": 0}

        async def audit(outcome: int) -> None:
            if audited and not status["audited"]:
                status["audited"] = 1
                await run_in_threadpool(self._audit, scope, method, path, outcome)

        async def send_(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                await audit(status["code"])  # on record before the client hears the outcome
            await send(message)

        try:
            if method in MUTATING:
                refusal = await self._refuse_early(scope)
                if refusal is not None:
                    await _send_json(send_, *refusal)
                    return
                receive = self._capped(receive, body_limit(self.ctl.settings, method, path))
            try:
                await self.app(scope, receive, send_)
            except _BodyTooLarge as e:
                if status["code"] != 0:
                    raise
                await _send_json(send_, 413, "too_large", e.message)
        finally:
            await audit(status["code"] or 500)  # an unhandled error: the 500 that follows

    async def _refuse_early(self, scope: Scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if path.startswith("/api/") and path != _ENROLL:
            scheme, _, value = headers.get("authorization", "").partition(" ")
            token = value.strip() if scheme.lower() == "bearer" else ""
            if not token:
                return 401, "unauthenticated", "send Authorization: Bearer <token>"
            if not await run_in_threadpool(self._token_ok, token, path):
                return 401, "invalid_token", "unknown or revoked token"
        limit = body_limit(self.ctl.settings, scope["method"], path)
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return 400, "bad_content_length", "Content-Length is not a number"
            if int(declared) > limit:
                return 413, "too_large", f"body of {declared} bytes, over the {limit} byte limit"
        return None

    @staticmethod
    def _capped(receive: Receive, limit: int) -> Receive:
        seen = 0

        async def receive_() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        return receive_

    def _audit(self, scope: Scope, method: str, path: str, outcome: int) -> None:
        state = scope.get("state") or {}
        route = scope.get("route")
        entry = AuditEntry(
            at=datetime.now(UTC),
            actor=str(state.get("actor") or "anonymous")[:200],
            action=f"{method} {getattr(route, 'path', path)}"[:200],
            target=path[:500],
            outcome=outcome,
            detail=state.get("audit") or {},
        )
        try:
            with db.transaction(self.ctl.factory) as s:
                s.add(entry)
        except Exception:
            log.exception("audit entry for %s %s not written", method, path)


def _install_error_handlers(app: FastAPI) -> None:
    """A request refused for an identifier outside its grammar answers like every other
    refusal, ``{"detail": {"code", "message"}}``, with the grammar in the message."""
    from fastapi.exceptions import RequestValidationError

    from edgefleet.wire.ids import IdentifierError

    async def on_invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, IdentifierError):
                return JSONResponse(
                    {"detail": {"code": cause.code, "message": str(cause)}}, status_code=422
                )
        # FastAPI's own answer echoes the refused input, and an input holding NaN or Infinity
        # cannot be written as JSON (the refusal became a 500): name where and why, not what.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, on_invalid)


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
        el = self.ctl.elector
        if el is not None:
            lg = GaugeMetricFamily(
                "edgefleet_controller_leader",
                "1 on the replica that leads rollouts",
                labels=["replica"],
            )
            lg.add_metric([el.replica_id], 1.0 if el.is_leader() else 0.0)
            yield lg
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
            cr = CounterMetricFamily(
                "edgefleet_capture_records_stored", "Captured records stored (docs/capture.md)"
            )
            cr.add_metric([], b.stats.capture_rows)
            yield cr
            sf = CounterMetricFamily(
                "edgefleet_rollout_step_failures",
                "Report batches whose rollout step failed; their status reports were left "
                "unacknowledged, so their devices send them again",
            )
            sf.add_metric([], b.stats.rollout_step_failures)
            yield sf
            c = GaugeMetricFamily("edgefleet_broker_connected", "1 when connected to the broker")
            c.add_metric([], 1.0 if b.stats.connected else 0.0)
            yield c
            br = CounterMetricFamily(
                "edgefleet_broker_refused",
                "Connections the broker refused, by CONNACK reason (e.g. Not authorized)",
                labels=["reason"],
            )
            for reason, n in b.stats.refused.items():
                br.add_metric([reason], n)
            yield br
            cf = CounterMetricFamily(
                "edgefleet_broker_connect_failed",
                "Connection attempts that failed before the broker answered, by reason (tls,"
                " tls_certificate, refused, timeout, dns, network)",
                labels=["reason"],
            )
            for reason, n in b.stats.connect_failed.items():
                cf.add_metric([reason], n)
            yield cf
            if b.jetstream is not None:  # broker kind "nats": reports through JetStream
                js = b.jetstream.stats
                f = CounterMetricFamily(
                    "edgefleet_jetstream_fetched", "Reports pulled from JetStream", labels=["kind"]
                )
                for kind, n in js.fetched.items():
                    f.add_metric([kind], n)
                yield f
                rd = CounterMetricFamily(
                    "edgefleet_jetstream_redelivered",
                    "Reports JetStream delivered more than once (a replica died, an ack lost)",
                )
                rd.add_metric([], js.redelivered)
                yield rd
                rl = CounterMetricFamily(
                    "edgefleet_jetstream_released",
                    "Reports fetched and not processed, NAKed at a clean stop (to other replicas)",
                )
                rl.add_metric([], js.released)
                yield rl
                rf = CounterMetricFamily(
                    "edgefleet_jetstream_refused",
                    "NATS connections refused or failed, by reason (authorization_violation, "
                    "tls_verify_failed, ...)",
                    labels=["reason"],
                )
                for reason, n in js.refused.items():
                    rf.add_metric([reason], n)
                yield rf
                jr = GaugeMetricFamily(
                    "edgefleet_jetstream_ready", "1 while the JetStream consumers are bound"
                )
                jr.add_metric([], 1.0 if js.ready else 0.0)
                yield jr
        yield from _drift_metrics(self.ctl)


def _drift_metrics(ctl: Controller) -> Iterator[Any]:
    """``edgefleet_drift_state{model,scope,key}`` 1 while a drift episode is open (so
    Alertmanager can page), with the statistic and p-value of the look behind it."""
    from prometheus_client.core import GaugeMetricFamily

    from edgefleet.cloud_controller.drift.alerts import gauges

    labels = ["model", "scope", "key"]
    st = GaugeMetricFamily(
        "edgefleet_drift_state", "1 while a drift episode is open, else 0", labels=labels
    )
    score = GaugeMetricFamily(
        "edgefleet_drift_statistic",
        "largest JS distance or out-of-range share among drifted features",
        labels=labels,
    )
    pv = GaugeMetricFamily(
        "edgefleet_drift_p_value", "smallest adjusted p-value of the look", labels=labels
    )
    with ctl.factory() as s:
        rows = gauges(s)
    for model, scope, key, state, stat, p in rows:
        st.add_metric([model, scope, key], state)
        score.add_metric([model, scope, key], stat)
        pv.add_metric([model, scope, key], p)
    yield st
    yield score
    yield pv


DOCS_ASSETS = "/docs/assets"


def _install_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI served from the assets the ``swagger-ui-bundle`` package ships, so
    the API docs work on a controller without internet access."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(DOCS_ASSETS, StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} · API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon-32x32.png",
        )


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
        docs_url=None,  # FastAPI's own pages load Swagger UI and ReDoc from a CDN
        redoc_url=None,
    )
    _install_docs(app)
    app.state.controller = ctl
    registry = CollectorRegistry()
    registry.register(_Metrics(ctl))  # type: ignore[arg-type,unused-ignore]

    app.add_middleware(Guard, ctl=ctl)
    _install_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {
            "ok": True,
            "broker_connected": ctl.bridge.stats.connected if ctl.bridge else None,
            "active_rollouts": len(ctl.rollouts.active_ids()),
            **ctl.leader_status(),
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api_router)
    app.include_router(drift_router)
    app.include_router(capture_router)
    app.include_router(dashboard_router)
    return app
