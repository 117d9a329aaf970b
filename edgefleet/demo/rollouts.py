"""Rollouts as the demo asks for and reads them: the request body, when one has settled, and
its outcome as ``edgefleet demo --json`` prints it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgefleet.cloud_controller.rollout_types import TERMINAL_PHASES
from edgefleet.demo.spec import MODEL_NAME


def rollout_body(version: str, devices: list[str], **overrides: Any) -> dict[str, Any]:
    """A rollout of the example model to ``devices`` in waves of 20/60/100 %."""
    body: dict[str, Any] = {
        "model": MODEL_NAME,
        "version": version,
        "target": {"device_ids": devices},
        "waves": [20.0, 60.0, 100.0],
        "device_timeout_s": 45.0,
        # A report lost on the way (a broker dropping a QoS 1 flow) costs one timeout, not
        # the device: the retry's new desired seq makes the device report where it stands.
        "max_retries": 1,
        "retry_backoff_s": 1.0,
        "success_threshold_pct": 100.0,
        "abort_failure_pct": 30.0,
        "abort_min_finished": 1,
        # the demo's bad release is put back on every device that moved
        "on_abort": "rollback",
        "seed": 7,
    }
    body.update(overrides)
    return body


def rollout_settled(detail: Mapping[str, Any]) -> bool:
    """Terminal, and every rollback the controller asked for is answered by its device
    (confirmed, or failed for good)."""
    if detail["phase"] not in TERMINAL_PHASES:
        return False
    counts = detail["counts"]
    answered = int(counts.get("rolled_back", 0)) + int(counts.get("rollback_failed", 0))
    return int(counts.get("rollback_requested", 0)) == answered


def outcome(detail: Mapping[str, Any]) -> dict[str, Any]:
    """A rollout's final state and per-device outcome, as ``--json`` prints it."""
    return {
        "id": detail["id"],
        "model": detail["model"],
        "version": detail["version"],
        "phase": detail["phase"],
        "reason": detail.get("reason"),
        "wave_sizes": detail.get("wave_sizes"),
        "counts": detail["counts"],
        "devices": [
            {
                "device_id": d["device_id"],
                "wave": d["wave"],
                "state": d["state"],
                "agent_state": d.get("agent_state"),
                "reason_code": d.get("reason_code"),
                "reason": d.get("reason"),
                "rollback": d.get("rollback"),
            }
            for d in detail.get("devices", [])
        ],
    }
