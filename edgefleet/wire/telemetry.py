"""Telemetry envelopes, device -> controller on ``.../telemetry``: a batch of records.

``{"device_id", "records": [...]}``. Each record is a JSON object with an increasing ``id`` and a
``kind``; what a record holds is the drift module's business (`edgefleet.drift`, and the
controller's `drift.ingest`, which also drops records without an integer id or a known kind).
This module only frames the batch: :meth:`TelemetryEnvelope.to_dict` on the agent,
:func:`parse` on the controller.

A ``sketch`` record's ``sketch`` holds ``{"reference_id", "n", "counts", "missing"}`` and, from
agents that count the reference's observed range, ``"range": {feature: [checked, below, above,
nan, inf]}`` (:data:`RANGE_SLOTS`): of the ``checked`` live values, how many were finite and below
the reference minimum, finite and above its maximum, NaN, and +-inf. A sketch without ``range``
(an older agent, or a reference without a recorded range) is judged by its bins alone; both
parse and merge alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from edgefleet.wire.message import Fields, JsonObject, decode_object

RANGE_SLOTS = ("checked", "below", "above", "nan", "inf")


@dataclass(frozen=True)
class TelemetryEnvelope:
    device_id: str | None
    records: Sequence[JsonObject]
    skipped: int = 0  # entries of the records list that were not objects (parse only)

    def to_dict(self) -> JsonObject:
        out: JsonObject = {"device_id": self.device_id, "records": list(self.records)}
        if self.device_id is None:
            del out["device_id"]
        return out


def parse(
    raw: bytes | str | Mapping[str, object], device_id: str | None = None
) -> TelemetryEnvelope:
    """An envelope from its JSON; refuses (MessageError) a payload without a records list or
    one naming a device other than ``device_id`` (the topic's). Entries of ``records`` that are
    not objects are skipped and counted in ``skipped``."""
    f = Fields("telemetry", decode_object("telemetry", raw))
    dev = f.opt_string("device_id")
    if dev is not None and device_id is not None and dev != device_id:
        raise f.bad("device_id", f"{dev!r} on the topic of {device_id!r}")
    records = f.obj.get("records")
    if not isinstance(records, list):
        raise f.bad("records", "no records list")
    objects = [r for r in records if isinstance(r, dict)]
    return TelemetryEnvelope(
        device_id=dev or device_id,
        records=[cast(JsonObject, r) for r in objects],  # decoded JSON: string keys
        skipped=len(records) - len(objects),
    )
