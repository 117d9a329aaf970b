"""The seam between the update worker and the network: a `Fetcher` is handed to the `Updater`
(`agent.download.HttpFetcher` in the agent, anything with the same methods in a test)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from edgefleet.wire.reasons import ReasonCode

if TYPE_CHECKING:
    from edgefleet.wire.trust import TrustStore


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


@runtime_checkable
class DeltaFetcher(Protocol):
    """A `Fetcher` that can also bring a package by fetching only the blocks the device
    lacks (`agent.delta_fetch`); the update worker tries it first when a version is installed."""

    def fetch_delta(
        self,
        source: str,
        dest: Path,
        *,
        sha256: str,
        size: int,
        max_bytes: int,
        basis: Path | None,
        trust: TrustStore,
        expected_name: str | None,
        token: str | None = None,
    ) -> Fetched:
        """Bring ``source`` to ``dest`` reusing the hash-matched blocks of the files in ``basis``
        (the installed version's directory), or raise
        `FetchError` (the caller then falls back to `Fetcher.fetch`)."""
        ...
