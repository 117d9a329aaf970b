"""The seam between the MQTT link and `agent.runtime`: requests in, events and inventory out.

Kept in one module so that the link's logic does not depend on the runtime's field names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgefleet.agent.mqtt.reconcile import ModelTarget


def _plain(value: Any) -> Any:
    from edgefleet.agent.mqtt_link import jsonable

    return jsonable(value)


def make_update_request(target: ModelTarget, *, desired_seq: int) -> Any:
    """An `agent.runtime.UpdateRequest` for ``target`` (a rollback when allow_downgrade)."""
    from edgefleet.agent.runtime import UpdateRequest

    del desired_seq  # the link keeps it; the runtime does not need it
    return UpdateRequest(
        model=target.name,
        version=target.version,
        source=target.url,
        sha256=target.sha256,
        size=target.size,
        rollout_id=target.rollout_id,
        allow_downgrade=target.allow_downgrade,
        controller_source=True,
    )


def installed_versions(inventory: Any) -> dict[str, str]:
    """model name -> version it serves, from `agent.inventory()`."""
    inv = _plain(inventory)
    models = inv.get("models", inv) if isinstance(inv, Mapping) else inv
    out: dict[str, str] = {}
    if isinstance(models, Mapping):
        for name, info in models.items():
            version = info.get("version") if isinstance(info, Mapping) else info
            if isinstance(version, str):
                out[str(name)] = version
    elif isinstance(models, list):
        for info in models:
            if isinstance(info, Mapping) and info.get("name") and info.get("version"):
                out[str(info["name"])] = str(info["version"])
    return out


def unfinished_updates(agent: Any) -> dict[str, str]:
    """model -> version of updates the agent still runs (e.g. resumed after a restart)."""
    from edgefleet.agent.states import TERMINAL, State

    out: dict[str, str] = {}
    updates = getattr(agent, "updates", None)
    if updates is None:
        return out
    for view in updates(50):
        try:
            done = State(str(view.get("state"))) in TERMINAL
        except ValueError:
            continue
        if view.get("action", "install") != "install":
            continue  # a removal in flight installs nothing
        if not done and view.get("model") and view.get("version"):
            out[str(view["model"])] = str(view["version"])
    return out


def event_status(event: Any) -> dict[str, Any]:
    """A status report body from an `UpdateEvent`: model, version, state, reason, figures."""
    raw = _plain(event)
    if not isinstance(raw, dict):
        raw = {"event": raw}
    body: dict[str, Any] = {"kind": "update"}
    body["model"] = raw.get("model", raw.get("name"))
    body["version"] = raw.get("version")
    body["state"] = str(raw.get("state", "")).upper() or None
    reason = raw.get("reason")
    if isinstance(reason, Mapping):  # {"code", "message"} from RejectError.to_dict()
        body["reason_code"] = reason.get("code")
        body["reason"] = reason.get("message")
    else:
        body["reason_code"] = raw.get("reason_code")
        body["reason"] = reason
    figures = raw.get("figures", raw.get("benchmark"))
    if figures:
        body["figures"] = figures
    for key in ("update_id", "rollout_id", "from_version"):
        if raw.get(key) is not None:
            body[key] = raw[key]
    if raw.get("timestamp"):
        body["at"] = raw["timestamp"]
    return body


def presence_fields(agent: Any, config: Any) -> dict[str, Any]:
    """Inventory for the presence message: agent version, providers, profiles, models."""
    from edgefleet import __version__

    fields: dict[str, Any] = {"agent_version": __version__}
    try:
        import onnxruntime as ort

        fields["execution_providers"] = list(ort.get_available_providers())
    except ImportError:
        fields["execution_providers"] = []
    profiles = list(getattr(config, "profiles", []) or [])
    if not profiles:
        from edgefleet.agent.config import default_profiles

        profiles = default_profiles(fields["execution_providers"])
    fields["profiles"] = profiles
    inv = _plain(agent.inventory())
    if isinstance(inv, Mapping):
        for key, value in inv.items():
            fields.setdefault(str(key), value)
    # The controller's inventory reads installed[model]["version"].
    fields["installed"] = {n: {"version": v} for n, v in installed_versions(inv).items()}
    return fields
