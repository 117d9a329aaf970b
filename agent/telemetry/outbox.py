"""A persistent, bounded, at-least-once outbox of JSON records (one SQLite file).

Records get strictly increasing ids that survive restarts; a fresh file starts its ids at the
current time in microseconds, so even a wiped outbox never reuses an id the controller has seen.
When the stored records exceed ``max_bytes`` the oldest are dropped and counted in ``dropped``
(visible in :meth:`Outbox.stats` and persisted). Records stay until ``ack``-ed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class OutboxError(ValueError):
    """A record the outbox cannot take; the message names why."""


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    bytes: int
    dropped: int
    last_id: int
    max_bytes: int

    def to_dict(self) -> dict[str, int]:
        return {
            "pending": self.pending,
            "bytes": self.bytes,
            "dropped": self.dropped,
            "last_id": self.last_id,
            "max_bytes": self.max_bytes,
        }


class Outbox:
    """``append`` -> id; ``pending(limit)`` -> [(id, record)] oldest first; ``ack(ids)``."""

    def __init__(self, path: Path | str, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_bytes <= 0:
            raise OutboxError(f"max_bytes must be positive, got {max_bytes}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=30
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        with self._tx():
            row = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='records'"
            ).fetchone()
            if row is None:
                start = time.time_ns() // 1000
                self._db.execute(
                    "INSERT INTO sqlite_sequence(name, seq) VALUES ('records', ?)", (start,)
                )
            self._db.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('dropped', 0)")
        total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0]
        self._bytes = int(total)

    def _tx(self) -> _Tx:
        return _Tx(self._db)

    def append(self, record: Mapping[str, Any]) -> int:
        """Store a record durably; return its id (also set as ``record["id"]`` when read back)."""
        body = json.dumps(dict(record), separators=(",", ":"), default=_json_default)
        size = len(body.encode())
        if size > self.max_bytes:
            with self._lock, self._tx():
                self._bump_dropped(1)
            raise OutboxError(f"record of {size} bytes exceeds the outbox limit {self.max_bytes}")
        with self._lock, self._tx():
            dropped = 0
            while self._bytes + size > self.max_bytes:
                old = self._db.execute(
                    "SELECT id, size FROM records ORDER BY id LIMIT 64"
                ).fetchall()
                if not old:
                    break
                for rid, rsize in old:
                    self._db.execute("DELETE FROM records WHERE id=?", (rid,))
                    self._bytes -= rsize
                    dropped += 1
                    if self._bytes + size <= self.max_bytes:
                        break
            if dropped:
                self._bump_dropped(dropped)
            cur = self._db.execute("INSERT INTO records(body, size) VALUES (?, ?)", (body, size))
            self._bytes += size
            rid = cur.lastrowid
        assert rid is not None
        return int(rid)

    def _bump_dropped(self, n: int) -> None:
        self._db.execute("UPDATE meta SET value = value + ? WHERE key='dropped'", (n,))

    def pending(self, limit: int = 100) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``limit`` unacknowledged records, oldest first, each with its ``id`` set."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body FROM records ORDER BY id LIMIT ?", (limit,)
            ).fetchall()
        out: list[tuple[int, dict[str, Any]]] = []
        for rid, body in rows:
            rec = json.loads(body)
            rec["id"] = int(rid)
            out.append((int(rid), rec))
        return out

    def ack(self, ids: Iterable[int]) -> int:
        """Forget delivered records; returns how many were still stored."""
        ids = list(ids)
        removed = 0
        with self._lock, self._tx():
            for chunk_start in range(0, len(ids), 500):
                chunk = ids[chunk_start : chunk_start + 500]
                marks = ",".join("?" * len(chunk))
                size = self._db.execute(
                    f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM records WHERE id IN ({marks})",
                    chunk,
                ).fetchone()
                self._db.execute(f"DELETE FROM records WHERE id IN ({marks})", chunk)
                self._bytes -= int(size[0])
                removed += int(size[1])
        return removed

    @property
    def dropped(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0])

    def stats(self) -> OutboxStats:
        with self._lock:
            pending = self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
            last = self._db.execute(
                "SELECT seq FROM sqlite_sequence WHERE name='records'"
            ).fetchone()
            dropped = self._db.execute("SELECT value FROM meta WHERE key='dropped'").fetchone()[0]
        return OutboxStats(int(pending), self._bytes, int(dropped), int(last[0]), self.max_bytes)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT/ROLLBACK on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _json_default(o: Any) -> Any:
    tolist = getattr(o, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")
