"""Leader election decisions (pure): which conditional write a replica makes on the lease row.

The lease row (`models.ControllerLease`, one per ``name``) holds the ``holder`` (a replica id),
an ``epoch`` (the fencing token: it goes up by one on every change of holder, never down) and
``expires_at`` (database time). :func:`decide` looks at the row as read, this replica's id and
the epoch it believes it holds, and the database's ``now``; `cloud_controller.leader` performs
what it returns as one conditional UPDATE and believes only the row count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class LeaseRow:
    holder: str | None
    epoch: int
    expires_at: datetime


@dataclass(frozen=True)
class Acquire:
    """Take the lease: ``UPDATE … SET holder=me, epoch=seen+1 WHERE epoch=seen AND …``."""

    seen_epoch: int
    why: str


@dataclass(frozen=True)
class Renew:
    """Extend my lease: ``UPDATE … SET expires_at=now+ttl WHERE holder=me AND epoch=mine``."""

    epoch: int


@dataclass(frozen=True)
class Follow:
    """Someone else holds a live lease; try again after it could have expired."""

    holder: str
    epoch: int
    expires_at: datetime


Decision = Acquire | Renew | Follow


def decide(row: LeaseRow, me: str, my_epoch: int | None, now: datetime) -> Decision:
    """What replica ``me`` (believing it holds ``my_epoch``, or None) does with ``row``."""
    if row.holder == me and my_epoch is not None and row.epoch == my_epoch:
        return Renew(my_epoch)
    if row.holder is None:
        return Acquire(row.epoch, "no holder")
    if row.expires_at <= now:
        return Acquire(row.epoch, f"lease of {row.holder} (epoch {row.epoch}) expired")
    if row.holder == me:
        # my own id with an epoch I do not hold: an earlier process of this replica (restarted
        # faster than its lease ran out). Replica ids are unique per live process.
        return Acquire(row.epoch, f"lease held by an earlier process of {me}")
    return Follow(row.holder, row.epoch, row.expires_at)


def still_leader(held_until_monotonic: float | None, now_monotonic: float, margin_s: float) -> bool:
    """Whether a replica may act as leader: its last successful write of the lease row, plus
    the lease time, minus a margin for clock drift and a pause between check and act, is
    ahead of now (on this process's monotonic clock, started before that write)."""
    return held_until_monotonic is not None and now_monotonic < held_until_monotonic - margin_s
