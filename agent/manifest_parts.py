"""Typed reads of the parts of an installed manifest.json that the agent uses (pure).

The manifest was validated by `edgefleet.wire.manifest` before it was installed, so each part
has its checked type there; these readers narrow the JSON value to that type and fall back as
the agent always did where a part is absent.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgefleet.wire.message import JsonObject, JsonValue

DEFAULT_MODEL_FILE = "model.onnx"


def profile(manifest: Mapping[str, JsonValue]) -> str | None:
    value = manifest.get("profile")
    return value if isinstance(value, str) else None


def model_file(manifest: Mapping[str, JsonValue]) -> str:
    """``model.file``: the member ONNX Runtime loads."""
    model = manifest.get("model", {})
    value = model.get("file", DEFAULT_MODEL_FILE) if isinstance(model, dict) else None
    return value if isinstance(value, str) else DEFAULT_MODEL_FILE


def provider_options(manifest: Mapping[str, JsonValue]) -> dict[str, JsonObject]:
    """Execution provider name -> its ``options`` ({} when it has none)."""
    eps = manifest.get("execution_providers", [])
    out: dict[str, JsonObject] = {}
    for ep in eps if isinstance(eps, list) else []:
        if isinstance(ep, dict) and isinstance(name := ep.get("name"), str):
            options = ep.get("options")
            out[name] = options if isinstance(options, dict) else {}
    return out


def gates(manifest: Mapping[str, JsonValue]) -> JsonObject:
    """``gates``: gate name -> a number or null ({} when absent)."""
    value = manifest.get("gates")
    return value if isinstance(value, dict) else {}


def number(obj: Mapping[str, JsonValue], key: str) -> float | None:
    """``obj[key]`` when it is a number (not a bool), else None."""
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value
