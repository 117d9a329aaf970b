"""The hardware profiles shipped as ``*.toml`` beside this file, and the facts every component
reads from them: a profile's id, its execution providers in order, and (CPU profiles) the CPU
architecture it is built for.

These files are the one source of the profile -> execution provider mapping: the agent derives
the profiles a device accepts from them, the packager parses the same files (through
`read_profile_file`) for its recipes and gates. Standard library only: this is the core layer.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CPU_PROVIDER = "CPUExecutionProvider"
#: ``platform.machine()`` spellings -> the architecture names the profiles use.
_MACHINE_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}


class ProfileFileError(ValueError):
    """A profile file is missing, not TOML, or lacks a fact; the message names file and field."""


@dataclass(frozen=True)
class ProfileFacts:
    id: str
    providers: tuple[str, ...]  # execution provider names, preferred first
    arch: str | None = None  # CPU architecture, for profiles that run on the CPU provider

    @property
    def primary_provider(self) -> str:
        return self.providers[0]


def profiles_dir() -> Path:
    """The directory of the shipped profiles."""
    return Path(__file__).resolve().parent


def profile_files(directory: Path | None = None) -> list[Path]:
    """The ``*.toml`` files of ``directory`` (default: the shipped ones), sorted by name."""
    return sorted(Path(directory or profiles_dir()).glob("*.toml"))


def read_profile_file(path: Path) -> dict[str, object]:
    """One profile file as a TOML document (nothing checked beyond TOML syntax)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ProfileFileError(f"{path}: no such profile file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileFileError(f"{path}: not valid TOML: {exc}") from exc


def profile_facts(raw: Mapping[str, object], where: str) -> ProfileFacts:
    """The id, provider names and architecture of one profile document, checked."""
    pid = raw.get("id")
    if not isinstance(pid, str) or not pid:
        raise ProfileFileError(f"{where}: 'id' must be a non-empty string")
    eps = raw.get("execution_providers")
    if not isinstance(eps, list) or not eps:
        raise ProfileFileError(
            f"{where}: 'execution_providers' must be a non-empty array of tables"
        )
    names: list[str] = []
    for i, ep in enumerate(eps):
        name = ep.get("name") if isinstance(ep, dict) else None
        if not isinstance(name, str):
            raise ProfileFileError(f"{where}: execution_providers[{i}] needs a 'name'")
        if not name.endswith("ExecutionProvider"):
            raise ProfileFileError(f"{where}: execution_providers[{i}] name {name!r} is not an EP")
        names.append(name)
    arch = raw.get("arch")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise ProfileFileError(f"{where}: 'arch' must be a non-empty string")
    return ProfileFacts(pid, tuple(names), arch)


@functools.lru_cache(maxsize=8)
def load_profile_facts(directory: Path | None = None) -> Mapping[str, ProfileFacts]:
    """Every profile's facts in ``directory`` (default: the shipped ones), by id."""
    facts = (profile_facts(read_profile_file(f), f.name) for f in profile_files(directory))
    return {f.id: f for f in facts}


def machine_arch(machine: str) -> str:
    """The profiles' name for a ``platform.machine()`` value (unknown ones lower-cased)."""
    return _MACHINE_ARCH.get(machine.lower(), machine.lower())


def device_profiles(
    providers: Sequence[str], machine: str, directory: Path | None = None
) -> list[str]:
    """Profiles a device can run: one per accelerator provider it has (the profile whose
    preferred provider that is), then its CPU profile (``cpu-ARCH`` when no file names ARCH)."""
    facts = load_profile_facts(directory).values()
    by_provider = {f.primary_provider: f.id for f in facts if f.primary_provider != CPU_PROVIDER}
    arch = machine_arch(machine)
    cpu = next((f.id for f in facts if f.arch == arch), f"cpu-{arch}")
    return [*(by_provider[p] for p in providers if p in by_provider), cpu]
