"""The seam between the update worker and the network: a `Fetcher` is handed to the `Updater`
(`agent.download.HttpFetcher` in the agent, anything with the same methods in a test)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgefleet.wire.reasons import ReasonCode


class FetchError(RuntimeError):
    """The download was refused or could not complete; `code` names why."""

    def __init__(self, code: ReasonCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Fetched(Protocol):
    """A package on disk, checked against the expected sha256 and size when they were given."""

    @property
    def path(self) -> Path: ...
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def resumed_from(self) -> int: ...


class Fetcher(Protocol):
    def fetch(
        self,
        source: str,
        dest: Path,
        *,
        sha256: str | None,
        size: int | None,
        max_bytes: int,
        token: str | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> Fetched:
        """Bring ``source`` to ``dest`` or raise `FetchError` (OSError for the local disk)."""
        ...

    def discard(self, dest: Path) -> None:
        """Delete ``dest`` and anything kept to resume it."""
        ...
