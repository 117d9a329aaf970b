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
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller.drift.analysis import event_dict, get_settings
from edgefleet.cloud_controller.drift.models import DriftEvent

log = logging.getLogger("edgefleet.controller.drift")
HEADER = "X-Edgefleet-Signature"
MAX_ATTEMPTS = 5
_deliver_lock = threading.Lock()


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    return bool(header) and hmac.compare_digest(sign(secret, body), str(header))


def payload(ev: DriftEvent) -> bytes:
    doc: dict[str, Any] = {
        "type": "edgefleet.drift",
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
