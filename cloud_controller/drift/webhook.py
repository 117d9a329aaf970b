"""Retraining webhook: HMAC-SHA256-signed JSON with the drift evidence.

``POST webhook_url`` with body ``{"type": "edgefleet.drift", "event": {...}, "evidence": {...},
"sent_at"}`` and header ``X-Edgefleet-Signature: sha256=<hex HMAC-SHA256(secret, body)>``.
Receivers check it with :func:`verify_signature`. Delivery is at least once: pending events are
retried (bounded attempts) and their state is kept on the event.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller.drift.analysis import event_dict, get_settings, utc
from edgefleet.cloud_controller.drift.models import DriftEvent

log = logging.getLogger("edgefleet.controller.drift")
HEADER = "X-Edgefleet-Signature"
MAX_ATTEMPTS = 5
_deliver_lock = threading.Lock()


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(sign(secret, body), str(header))


def alert_fields(ev: DriftEvent) -> dict[str, Any]:
    """The flat fields a CI job reads (docs/retrain.md): what drifted, where, how sure, since
    when, and the capture command to run (with the capture's id if one was started)."""
    evd = ev.evidence or {}
    ep = evd.get("episode") or {}
    at = (utc(ev.at) or datetime.now(UTC)).isoformat()
    window = evd.get("window")
    if not isinstance(window, dict):  # a closed bucket: the bucket is the window
        bs = utc(ev.bucket_start) or datetime.now(UTC)
        plan = (evd.get("plan") or {}).get("bucket_s")
        window = {"start": bs.isoformat(), "end": None, "seconds": plan}
    devices = evd.get("devices")
    if devices is None and ev.scope == "device":
        devices = [ev.scope_key]
    capture = evd.get("capture")
    if not isinstance(capture, dict):
        target = list(devices or [])
        capture = {
            "command": capture_hint(ev.model, ev.scope, ev.scope_key, target, ev.id)
            if (target or ev.scope == "group")
            else None,
            "id": None,
        }
    return {
        "model": ev.model,
        "versions": list(ev.versions),
        "scope": ev.scope,
        "scope_key": ev.scope_key,
        "devices": devices,
        "statistic": {"name": "drift_score", "value": evd.get("drift_score", 0.0)},
        "p_value": evd.get("min_p_adjusted"),
        "threshold": evd.get("alpha"),
        "features": list(ev.features),
        "window": window,
        "first_seen": ep.get("first_seen", at),
        "capture": capture,
    }


def payload(ev: DriftEvent) -> bytes:
    doc: dict[str, Any] = {
        "type": "edgefleet.drift",
        **alert_fields(ev),
        "event": event_dict(ev),
        "evidence": ev.evidence,
        "sent_at": datetime.now(UTC).isoformat(),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def deliver_pending(factory: sessionmaker[Session], timeout_s: float = 5.0) -> int:
    """POST every pending event's webhook once; returns how many were delivered."""
    import httpx

    delivered = 0
    with _deliver_lock, factory() as session, session.begin():
        pending = list(
            session.scalars(
                select(DriftEvent).where(DriftEvent.webhook_state == "pending").limit(100)
            )
        )
        for ev in pending:
            s = get_settings(session, ev.model)
            if not s.webhook_url:
                ev.webhook_state = "none"
                continue
            body = payload(ev)
            headers = {"Content-Type": "application/json"}
            if s.webhook_secret:
                headers[HEADER] = sign(s.webhook_secret, body)
            ev.webhook_attempts += 1
            try:
                r = httpx.post(s.webhook_url, content=body, headers=headers, timeout=timeout_s)
                if 200 <= r.status_code < 300:
                    ev.webhook_state = "delivered"
                    ev.webhook_error = None
                    delivered += 1
                    continue
                ev.webhook_error = f"HTTP {r.status_code} from {s.webhook_url}"
            except httpx.HTTPError as e:
                ev.webhook_error = f"{type(e).__name__}: {e}"
            if ev.webhook_attempts >= MAX_ATTEMPTS:
                ev.webhook_state = "failed"
            log.warning("drift webhook for event %s: %s", ev.id, ev.webhook_error)
    return delivered


CAPTURE_ROWS = 1000


def capture_hint(
    model: str,
    scope: str,
    key: str,
    devices: Iterable[str],
    event_id: int | None,
    rows: int = CAPTURE_ROWS,
) -> str:
    """The exact CLI a pipeline runs to capture field data for this event."""
    target = f"--group {key}" if scope == "group" else "--devices " + ",".join(sorted(devices))
    cmd = f"edgefleet capture start {model} {target} --rows {rows}"
    return cmd + (f" --drift-event {event_id}" if event_id is not None else "")
