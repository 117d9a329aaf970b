"""Pure reconciliation: from a verified desired state and what the device runs, what to do.

Desired state is a state, not a command: each model converges to its desired version. A model
already at that version is reported as such (so a rollout counts it); one already being updated
to that version is left alone; anything else is installed (a rollback when the controller set
``allow_downgrade``).

Removal is explicit only: a model named in the desired state's ``remove`` list is uninstalled; a
model merely absent from ``models`` is left alone (an operator may have installed it locally).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from edgefleet.wire.shadow import ShadowError, ShadowSpec, parse_spec


class DesiredStateError(ValueError):
    """A verified desired state whose models table is malformed; the message says where."""


@dataclass(frozen=True)
class ModelTarget:
    name: str
    version: str
    url: str
    sha256: str
    size: int | None
    profile: str | None
    rollout_id: str | None
    allow_downgrade: bool
    # The rollout's probation latency ratio (optional ``max_p95_ratio`` of the model's entry):
    # the new version's per-sample serving p95 may be at most this times the previous one's.
    max_p95_ratio: float | None = None
    # Shadow first (optional ``shadow`` of the model's entry, docs/shadow.md).
    shadow: ShadowSpec | None = None


def _ratio(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DesiredStateError(f"desired model {name!r}: max_p95_ratio is not a number")
    if not math.isfinite(value) or value <= 0:
        raise DesiredStateError(f"desired model {name!r}: max_p95_ratio must be positive")
    return float(value)


@dataclass(frozen=True)
class Action:
    kind: Literal["install", "report"]
    target: ModelTarget
    reason: str


def parse_targets(desired: Mapping[str, Any]) -> list[ModelTarget]:
    """The models of a desired state payload, sorted by name."""
    models = desired.get("models", {})
    if not isinstance(models, Mapping):
        raise DesiredStateError("desired state 'models' is not an object")
    out: list[ModelTarget] = []
    for name in sorted(models):
        spec = models[name]
        if not isinstance(spec, Mapping):
            raise DesiredStateError(f"desired model {name!r} is not an object")
        for key in ("version", "url", "sha256"):
            if not isinstance(spec.get(key), str) or not spec.get(key):
                raise DesiredStateError(f"desired model {name!r} lacks a string {key!r}")
        size = spec.get("size")
        rollout = spec.get("rollout_id")
        try:
            shadow = parse_spec(spec.get("shadow"))
        except ShadowError as e:
            raise DesiredStateError(f"desired model {name!r}: {e}") from e
        out.append(
            ModelTarget(
                name=str(name),
                version=str(spec["version"]),
                url=str(spec["url"]),
                sha256=str(spec["sha256"]).lower(),
                size=int(size) if isinstance(size, int) else None,
                profile=str(spec["profile"]) if spec.get("profile") else None,
                rollout_id=str(rollout) if rollout is not None else None,
                allow_downgrade=bool(spec.get("allow_downgrade", False)),
                max_p95_ratio=_ratio(str(name), spec.get("max_p95_ratio")),
                shadow=shadow,
            )
        )
    return out


def plan(
    targets: list[ModelTarget],
    installed: Mapping[str, str],
    in_flight: Mapping[str, str],
) -> list[Action]:
    """Actions that bring ``installed`` (name -> serving version) to ``targets``.

    ``in_flight`` maps a model name to the version an unfinished update is installing.
    """
    actions: list[Action] = []
    for t in targets:
        if in_flight.get(t.name) == t.version:
            continue
        if installed.get(t.name) == t.version:
            actions.append(Action("report", t, f"already serving {t.name} {t.version}"))
            continue
        current = installed.get(t.name)
        why = (
            f"install {t.name} {t.version}"
            if current is None
            else f"{'roll back' if t.allow_downgrade else 'update'} {t.name} {current} -> {t.version}"
        )
        actions.append(Action("install", t, why))
    return actions


def parse_removals(desired: Mapping[str, Any]) -> list[str]:
    """The names in the desired state's ``remove`` list (absent: none), sorted."""
    remove = desired.get("remove", [])
    if not isinstance(remove, list) or not all(isinstance(n, str) and n for n in remove):
        raise DesiredStateError("desired state 'remove' is not a list of model names")
    models = desired.get("models", {})
    both = sorted(set(remove) & set(models if isinstance(models, Mapping) else ()))
    if both:
        raise DesiredStateError(f"desired state both installs and removes {both}")
    return sorted(set(remove))


def plan_removals(
    remove: list[str],
    installed: Mapping[str, str],
    in_flight: Mapping[str, str],
    confirmed: Collection[str],
) -> list[str]:
    """Names to hand to ``agent.remove_model``, in order.

    A name is removed when the device has it installed or an update of it in flight (the
    removal queues behind that update), or when this device has not yet confirmed its removal:
    a device that never got the model still answers REMOVED once, so a controller waiting for
    the confirmation is not left waiting. ``confirmed`` holds the names already reported removed
    (and not desired since).
    """
    return [
        name for name in remove if name in installed or name in in_flight or name not in confirmed
    ]
