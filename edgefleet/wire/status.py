"""Status reports, device -> controller on ``.../status``: how an update (or a refused desired
state) went.

The agent builds a :class:`StatusReport` and queues ``to_dict()`` in its outbox; the outbox id
becomes the report's ``seq`` when it is published (:func:`with_seq`), so that the controller drops
the duplicates at-least-once delivery brings. The controller reads it back with :func:`parse`.

Wire fields: ``device_id, at, seq, id, kind, model, version, state, reason_code, reason,
rollout_id, update_id, from_version, desired_seq, already_installed, local, figures``.
``local`` (optional, absent means false) marks an update an operator started on the device itself
(`edgefleet agent install --force`), not asked for by the controller's desired state: the
device may now differ from what the controller wants. Simulators may
send ``benchmark`` instead of ``figures``, omit ``kind`` (an update) and give ``at`` in epoch
seconds; all of that is still read. A refused desired state has kind ``desired_rejected``, state
``REJECTED`` and no model. A shadow window has kind ``shadow``, state ``SHADOW``, the model and the
candidate version, and figures that `edgefleet.wire.shadow.parse_figures` accepts.

``desired_seq`` is the highest desired-state seq the device has accepted: on an update report the
state it is acting on, on a ``desired_rejected`` report with reason ``replayed`` (a state whose
seq is not above the device's) the seq the device already holds, so that a controller whose
sequence went backwards (a database restore) learns where to continue.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from edgefleet.wire.message import Fields, JsonObject, JsonValue, decode_object
from edgefleet.wire.reasons import ReasonCode, is_transient, reason_of
from edgefleet.wire.shadow import ShadowError, parse_figures
from edgefleet.wire.states import UpdateState, parse_state

StatusKind = Literal["update", "desired_rejected", "shadow"]
#: The ``state`` of a ``desired_rejected`` report: no update ran.
REJECTED = "REJECTED"
#: The ``state`` of a ``shadow`` report: one window of a shadow evaluation (docs/shadow.md);
#: its ``figures`` are `edgefleet.wire.shadow.ShadowFigures`, checked here.
SHADOW = "SHADOW"
_KINDS: tuple[StatusKind, ...] = ("update", "desired_rejected", "shadow")


@dataclass(frozen=True)
class StatusReport:
    """One status report. ``state`` is None exactly for a ``desired_rejected`` report.

    ``reason_code`` is a :class:`ReasonCode` when the code is known here; a code from a newer
    agent stays its raw string (and counts as final: see :attr:`transient`).
    """

    device_id: str
    at: str | float | None
    kind: StatusKind
    state: UpdateState | None
    model: str | None = None
    version: str | None = None
    reason_code: ReasonCode | str | None = None
    reason: str | None = None
    rollout_id: str | None = None
    update_id: str | None = None
    from_version: str | None = None
    desired_seq: int | None = None
    already_installed: bool = False
    local: bool = False  # started on the device, not by the desired state
    figures: JsonObject | None = None
    seq: int | None = None  # set by the outbox when published; required when parsed

    @property
    def transient(self) -> bool:
        """The reason is worth retrying the same release for (unknown codes are final)."""
        return is_transient(self.reason_code)

    def to_dict(self) -> JsonObject:
        out: JsonObject = {
            "device_id": self.device_id,
            "at": self.at,
            "kind": self.kind,
            "state": self.state.value
            if self.state is not None
            else (SHADOW if self.kind == "shadow" else REJECTED),
            "reason_code": str(self.reason_code) if self.reason_code is not None else None,
            "reason": self.reason,
            "rollout_id": self.rollout_id,
        }
        optional: dict[str, JsonValue] = {
            "model": self.model,
            "version": self.version,
            "update_id": self.update_id,
            "from_version": self.from_version,
            "desired_seq": self.desired_seq,
            "figures": self.figures or None,
            "seq": self.seq,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        if self.already_installed:
            out["already_installed"] = True
        if self.local:
            out["local"] = True
        return out


def with_seq(record: Mapping[str, JsonValue], seq: int) -> JsonObject:
    """A queued report as published: its outbox id is its ``seq``."""
    return {**record, "seq": seq}


def parse(raw: bytes | str | Mapping[str, object], device_id: str | None = None) -> StatusReport:
    """A status report from its JSON; refuses (MessageError naming the field) a wrong type, a
    missing ``seq``, an unknown state, or an update without model and version.

    ``device_id`` is the one in the topic: a message without one gets it, one that names
    another device is refused.
    """
    f = Fields("status", decode_object("status", raw))
    dev = f.device_id(device_id)
    kind = f.obj.get("kind", "update")
    if kind not in _KINDS:
        raise f.bad("kind", f"unknown kind {kind!r}")
    seq = f.integer("seq")
    raw_state = f.obj.get("state")
    state = parse_state(raw_state)
    if kind == "update" and state is None:
        raise f.bad("state", f"not an update state: {raw_state!r}")
    if kind == "desired_rejected" and raw_state not in (REJECTED, None):
        raise f.bad("state", f"a rejected desired state reports {REJECTED}, not {raw_state!r}")
    if kind == "shadow" and raw_state not in (SHADOW, None):
        raise f.bad("state", f"a shadow report has state {SHADOW}, not {raw_state!r}")
    model, version = f.opt_string("model"), f.opt_string("version")
    if kind in ("update", "shadow"):
        model, version = f.string("model"), f.string("version")
    code = f.opt_string("reason_code")
    figures = f.json_object("figures")
    if kind == "shadow":
        try:
            parse_figures(figures)
        except ShadowError as e:
            raise f.bad("figures", str(e)) from e
    return StatusReport(
        device_id=dev,
        at=f.timestamp("at"),
        kind="update" if kind == "update" else "shadow" if kind == "shadow" else "desired_rejected",
        state=state if kind == "update" else None,
        model=model,
        version=version,
        reason_code=reason_of(code) if code is not None else None,
        reason=f.opt_string("reason"),
        rollout_id=f.opt_string("rollout_id"),
        update_id=f.opt_string("update_id"),
        from_version=f.opt_string("from_version"),
        desired_seq=f.opt_integer("desired_seq"),
        already_installed=f.boolean("already_installed", False),
        local=f.boolean("local", False),
        figures=figures if figures is not None else f.json_object("benchmark"),
        seq=seq,
    )
