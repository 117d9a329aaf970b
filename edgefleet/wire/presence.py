"""Presence, device -> controller on ``.../presence`` (retained): is the device online, and what
does it run.

The agent publishes :meth:`Presence.to_dict` on every connect and after every finished update;
its last will is :func:`offline` (only ``online: false``: the controller keeps the inventory it
had). The controller reads both with :func:`parse`.

Wire fields: ``device_id, online, at, agent_version, execution_providers, profiles, hardware,
models`` (name -> ``{version, previous, state}``), ``installed`` (name -> ``{version}``, what
the controller's inventory keeps) and ``desired_seq`` (the highest desired-state seq the device
has accepted: a controller whose own sequence is lower, after a database restore, continues
above it). Every field but ``online`` may be absent: absent means "unchanged", not "empty".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from edgefleet.wire import ids
from edgefleet.wire.message import Fields, JsonObject, JsonValue, MessageError, decode_object


@dataclass(frozen=True)
class InstalledModel:
    version: str
    previous: str | None = None
    state: str | None = None  # the last update's state, or SERVING / INSTALLED

    def to_dict(self) -> JsonObject:
        return {"version": self.version, "previous": self.previous, "state": self.state}


@dataclass(frozen=True)
class Presence:
    device_id: str
    online: bool
    at: str | float | None = None
    agent_version: str | None = None
    execution_providers: list[str] | None = None
    profiles: list[str] | None = None
    hardware: JsonObject | None = None
    models: dict[str, InstalledModel] | None = None
    desired_seq: int | None = None

    def to_dict(self) -> JsonObject:
        out: JsonObject = {"device_id": self.device_id, "online": self.online}
        fields: dict[str, JsonValue] = {
            "at": self.at,
            "agent_version": self.agent_version,
            "execution_providers": list(self.execution_providers)
            if self.execution_providers is not None
            else None,
            "profiles": list(self.profiles) if self.profiles is not None else None,
            "hardware": self.hardware,
            "desired_seq": self.desired_seq,
        }
        out.update({k: v for k, v in fields.items() if v is not None})
        if self.models is not None:
            out["models"] = {n: m.to_dict() for n, m in self.models.items()}
            out["installed"] = {n: {"version": m.version} for n, m in self.models.items()}
        return out


def offline(device_id: str) -> Presence:
    """The last will and the clean goodbye: offline, inventory unchanged."""
    return Presence(device_id=device_id, online=False)


def _models(f: Fields, field: str) -> dict[str, InstalledModel] | None:
    table = f.json_object(field)
    if table is None:
        return None
    out: dict[str, InstalledModel] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise f.bad(field, f"entry {name!r} is not an object")
        e = Fields(f"{f.message} {field}[{name!r}]", entry)
        try:
            out[ids.model_name(name)] = InstalledModel(
                ids.version(e.string("version")),
                _opt_version(e.opt_string("previous")),
                e.opt_string("state"),
            )
        except (MessageError, ids.IdentifierError) as err:
            raise f.bad(field, str(err)) from err
    return out


def _opt_version(text: str | None) -> str | None:
    return None if text is None else ids.version(text)


def _profiles(f: Fields) -> list[str] | None:
    profiles = f.string_list("profiles")
    if profiles is not None:
        for p in profiles:
            if not ids.is_valid(ids.PROFILE, p):
                raise f.bad("profiles", f"{p!r} is not a profile id ({ids.PROFILE.spelled})")
    return profiles


def parse(raw: bytes | str | Mapping[str, object], device_id: str | None = None) -> Presence:
    """A presence message from its JSON; refuses (MessageError naming the field) wrong types.

    ``device_id`` is the one in the topic: a message without one gets it, one that names
    another device is refused. The inventory is read from ``installed`` (what simulators send)
    or else from ``models``.
    """
    f = Fields("presence", decode_object("presence", raw))
    dev = f.device_id(device_id)
    models = _models(f, "installed")
    return Presence(
        device_id=dev,
        online=f.boolean("online", False),
        at=f.timestamp("at"),
        agent_version=f.opt_string("agent_version"),
        execution_providers=f.string_list("execution_providers"),
        profiles=_profiles(f),
        hardware=f.json_object("hardware"),
        models=models if models is not None else _models(f, "models"),
        desired_seq=_seq(f),
    )


def _seq(f: Fields) -> int | None:
    seq = f.opt_integer("desired_seq")
    if seq is not None and seq < 0:
        raise f.bad("desired_seq", "negative")
    return seq
