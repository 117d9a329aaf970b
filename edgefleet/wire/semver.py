"""Semantic versions (semver 2.0.0): parsing and precedence."""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering

from edgefleet.wire.ids import SEMVER_RE

_SEMVER = SEMVER_RE  # one grammar: edgefleet.wire.ids (ASCII digits, no leading zeros)


class InvalidVersion(ValueError):
    """A string that is not a semantic version."""


@total_ordering
@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: str = ""

    def __str__(self) -> str:
        s = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            s += "-" + ".".join(self.prerelease)
        if self.build:
            s += "+" + self.build
        return s

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A release sorts after all of its pre-releases; numeric identifiers sort before
        # alphanumeric ones and compare as numbers. Build metadata has no precedence.
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()


def parse_version(text: str) -> Version:
    """Parse ``text`` as a semantic version or raise :class:`InvalidVersion` naming it.

    The whole text must be the version: no surrounding space, no trailing newline, ASCII digits
    only (``"1\u0660.0.0"`` is refused, not read as 10.0.0)."""
    m = _SEMVER.fullmatch(text) if isinstance(text, str) and len(text) <= 128 else None
    if m is None:
        raise InvalidVersion(
            f"not a semantic version (MAJOR.MINOR.PATCH[-PRE][+BUILD], ASCII digits): {text!r}"
        )
    major, minor, patch, pre, build = m.groups()
    return Version(
        int(major), int(minor), int(patch), tuple(pre.split(".")) if pre else (), build or ""
    )
