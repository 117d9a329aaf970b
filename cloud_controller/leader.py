"""Leader election and fencing through the database (the I/O around `leader_decide`).

Every replica serves the API and ingests its share of device reports; one, the leader, runs the
rollout ticker and publishes desired states. On PostgreSQL the leader holds a lease row
(`models.ControllerLease`): every ``renew_s`` each replica reads the row and performs what
`leader_decide.decide` says as ONE conditional UPDATE (take it: ``WHERE epoch = <seen> AND
(expired OR no holder)``, raising the epoch; renew it: ``WHERE holder = me AND epoch = mine``),
with the database's clock. The epoch is the fencing token: every transaction the ticker writes
in begins with :meth:`LeaseElector.fence`, which reads the lease row ``FOR SHARE`` and refuses
(:class:`Fenced`, the transaction rolls back) unless it still names this replica and its epoch.
A replica that takes the lease must first wait for that lock, so a deposed leader's write either
committed before the new epoch existed or is refused. On SQLite (one process) the controller is
always the leader (:class:`AlwaysLeader`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller.db import transaction
from edgefleet.cloud_controller.leader_decide import (
    Acquire,
    Follow,
    LeaseRow,
    Renew,
    decide,
    still_leader,
)
from edgefleet.cloud_controller.models import ControllerLease

log = logging.getLogger(__name__)
LEASE_NAME = "controller"


class Fenced(RuntimeError):
    """A write by a replica that no longer holds the lease (its epoch was superseded)."""


def default_replica_id() -> str:
    """Unique per live process: host name and process id (in the replica id grammar)."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).strip("-._") or "host"
    return f"{host[:48]}-{os.getpid()}"


class Elector(Protocol):
    replica_id: str

    def is_leader(self) -> bool: ...

    def epoch(self) -> int | None: ...

    def fence(self, session: Session) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class AlwaysLeader:
    """One process on SQLite: the leader, epoch 0; nothing to fence."""

    def __init__(self, replica_id: str) -> None:
        self.replica_id = replica_id

    def is_leader(self) -> bool:
        return True

    def epoch(self) -> int | None:
        return 0

    def fence(self, session: Session) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None


class LeaseElector:
    """The lease on PostgreSQL; ``on_change(leader)`` is called from its thread on each change."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        replica_id: str,
        *,
        ttl_s: float = 5.0,
        renew_s: float = 1.0,
        name: str = LEASE_NAME,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not 0 < renew_s < ttl_s / 2:
            raise ValueError(f"renew_s ({renew_s}) must be below half of ttl_s ({ttl_s})")
        self.replica_id = replica_id
        self.name = name
        self.ttl_s, self.renew_s = ttl_s, renew_s
        self.margin_s = renew_s  # stop acting one renewal before the lease could lapse
        self.on_change = on_change
        self.acquisitions = 0
        self._factory = factory
        self._epoch: int | None = None
        self._held_until: float | None = None  # monotonic
        self._was_leader = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the rest of the controller asks ---------------------------------------------

    def is_leader(self) -> bool:
        with self._lock:
            return still_leader(self._held_until, time.monotonic(), self.margin_s)

    def epoch(self) -> int | None:
        with self._lock:
            return self._epoch if self.is_leader_unlocked() else None

    def is_leader_unlocked(self) -> bool:
        return still_leader(self._held_until, time.monotonic(), self.margin_s)

    def fence(self, session: Session) -> None:
        """First statement of every transaction the leader's ticker writes in: lock the lease
        row for share (a takeover waits for this transaction) and refuse unless it is mine."""
        with self._lock:
            mine = self._epoch if self.is_leader_unlocked() else None
        row = session.execute(
            select(ControllerLease.holder, ControllerLease.epoch)
            .where(ControllerLease.name == self.name)
            .with_for_update(read=True)
        ).first()
        if mine is None:
            raise Fenced(f"replica {self.replica_id} does not hold the lease")
        if row is None or row[0] != self.replica_id or row[1] != mine:
            held = "nobody" if row is None else f"{row[0]} at epoch {row[1]}"
            raise Fenced(
                f"replica {self.replica_id} (epoch {mine}) was deposed: the lease is {held}"
            )

    # --- the election ---------------------------------------------------------------------

    def step(self) -> bool:
        """One round: read the lease row, make the decision's conditional write; leader?"""
        started = time.monotonic()
        ttl = timedelta(seconds=self.ttl_s)
        with self._lock:
            my_epoch = self._epoch
        with transaction(self._factory) as s:
            self._ensure_row(s)
            holder, epoch, expires_at, now = s.execute(
                select(
                    ControllerLease.holder,
                    ControllerLease.epoch,
                    ControllerLease.expires_at,
                    func.now(),
                ).where(ControllerLease.name == self.name)
            ).one()
            row = LeaseRow(holder, int(epoch), _utc(expires_at))
            d = decide(row, self.replica_id, my_epoch, _utc(now))
            won: int | None = None
            if isinstance(d, Renew):
                res = s.execute(
                    update(ControllerLease)
                    .where(
                        ControllerLease.name == self.name,
                        ControllerLease.holder == self.replica_id,
                        ControllerLease.epoch == d.epoch,
                    )
                    .values(expires_at=func.now() + ttl)
                    .execution_options(synchronize_session=False)
                )
                won = d.epoch if _count(res) == 1 else None
            elif isinstance(d, Acquire):
                res = s.execute(
                    update(ControllerLease)
                    .where(
                        ControllerLease.name == self.name,
                        ControllerLease.epoch == d.seen_epoch,
                        or_(
                            ControllerLease.holder.is_(None),
                            ControllerLease.holder == self.replica_id,
                            ControllerLease.expires_at <= func.now(),
                        ),
                    )
                    .values(
                        holder=self.replica_id,
                        epoch=d.seen_epoch + 1,
                        expires_at=func.now() + ttl,
                        acquired_at=func.now(),
                    )
                    .execution_options(synchronize_session=False)
                )
                won = d.seen_epoch + 1 if _count(res) == 1 else None
                if won is not None:
                    log.warning(
                        "replica %s is the leader at epoch %d (%s)", self.replica_id, won, d.why
                    )
            else:
                assert isinstance(d, Follow)
        with self._lock:
            self._epoch = won
            self._held_until = started + self.ttl_s if won is not None else None
            if won is not None and isinstance(d, Acquire):
                self.acquisitions += 1
            leader = self.is_leader_unlocked()
            changed = leader != self._was_leader
            self._was_leader = leader
        if changed:
            if not leader:
                log.warning("replica %s is no longer the leader", self.replica_id)
            if self.on_change is not None:
                self.on_change(leader)
        return leader

    def _ensure_row(self, s: Session) -> None:
        from sqlalchemy.dialects import postgresql

        s.execute(
            postgresql.insert(ControllerLease)
            .values(
                name=self.name,
                holder=None,
                epoch=0,
                expires_at=datetime(1970, 1, 1, tzinfo=UTC),
                acquired_at=None,
            )
            .on_conflict_do_nothing(index_elements=["name"])
        )

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leader-elector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop campaigning and give the lease up (expire it now), so another takes over at
        once rather than after ``ttl_s``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            mine, self._epoch, self._held_until = self._epoch, None, None
        if mine is None:
            return
        try:
            with transaction(self._factory) as s:
                s.execute(
                    update(ControllerLease)
                    .where(
                        ControllerLease.name == self.name,
                        ControllerLease.holder == self.replica_id,
                        ControllerLease.epoch == mine,
                    )
                    .values(expires_at=func.now())
                    .execution_options(synchronize_session=False)
                )
        except Exception:
            log.exception("lease of %s not released (it expires by itself)", self.replica_id)

    def _run(self) -> None:
        while True:
            try:
                self.step()
            except Exception:
                log.exception("leader election round failed (leadership lapses with the lease)")
                with self._lock:
                    leader = self.is_leader_unlocked()
                    changed = leader != self._was_leader
                    self._was_leader = leader
                if changed and self.on_change is not None:
                    self.on_change(leader)
            if self._stop.wait(self.renew_s):
                return


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _count(res: object) -> int:
    return int(getattr(res, "rowcount", 0))
