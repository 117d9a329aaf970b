"""Installed model versions: DATA_DIR/models/NAME/VERSION/, plus NAME/pointers.json holding the
`current` and `previous` versions (one file, replaced atomically, so both move together).

Two more files per model feed the update gates: NAME/committed.json lists the versions this
device has committed (a rollback to one of them is not held to the forward gates), and
NAME/serving.json is the rolling record of the committed version's per-sample serving latencies
(probation compares a new version with it)."""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Required, TypedDict, cast

from edgefleet.agent.fsio import atomic_write_json, clean_temp, read_json_object, remove_tree
from edgefleet.wire.message import JsonObject

INSTALL_RECORD = ".install.json"
_CHUNK = 1 << 20


class IntegrityError(RuntimeError):
    """An installed version's files do not match what was verified at install time."""


class InstallRecord(TypedDict, total=False):
    """VERSION/.install.json: what INSTALLING verified, and what VALIDATING measured."""

    member_digests: Required[dict[str, str]]  # member path -> sha256 verified at install
    key_id: str
    providers: list[str]
    cpu_fallback_used: bool
    installed_at: float
    update_id: str
    validation: JsonObject  # `validation.Figures.to_dict()`, added by VALIDATING


@dataclass(frozen=True)
class Pointers:
    current: str | None = None
    previous: str | None = None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class ModelStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "models"
        self.root.mkdir(parents=True, exist_ok=True)

    def model_dir(self, name: str) -> Path:
        return self.root / name

    def version_dir(self, name: str, version: str) -> Path:
        return self.root / name / version

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def pointers(self, name: str) -> Pointers:
        p = self.model_dir(name) / "pointers.json"
        if not p.exists():
            return Pointers()
        d = read_json_object(p)
        cur, prev = d.get("current"), d.get("previous")
        return Pointers(
            cur if isinstance(cur, str) else None, prev if isinstance(prev, str) else None
        )

    def set_pointers(self, name: str, ptr: Pointers) -> None:
        self.model_dir(name).mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.model_dir(name) / "pointers.json",
            {"current": ptr.current, "previous": ptr.previous},
        )

    def is_installed(self, name: str, version: str) -> bool:
        return (self.version_dir(name, version) / INSTALL_RECORD).exists()

    def installed_versions(self, name: str) -> list[str]:
        d = self.model_dir(name)
        if not d.is_dir():
            return []
        return sorted(
            p.name
            for p in d.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / INSTALL_RECORD).exists()
        )

    def record_install(self, name: str, version: str, record: InstallRecord) -> None:
        """Mark a verified, extracted version as installed (written last, atomically)."""
        atomic_write_json(self.version_dir(name, version) / INSTALL_RECORD, record)

    def install_record(self, name: str, version: str) -> InstallRecord:
        rec = read_json_object(self.version_dir(name, version) / INSTALL_RECORD)
        # The agent's own file, written only by `record_install` (atomically): its shape is
        # InstallRecord's.
        return cast(InstallRecord, rec)

    def manifest(self, name: str, version: str) -> JsonObject:
        """The installed manifest.json (verified and validated at install by the wire rules)."""
        return read_json_object(self.version_dir(name, version) / "manifest.json")

    def check_integrity(self, name: str, version: str) -> InstallRecord:
        """Re-hash every member against the digests verified at install; return the record."""
        vdir = self.version_dir(name, version)
        try:
            rec = self.install_record(name, version)
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{name} {version}: no install record ({e})") from e
        for member, digest in rec["member_digests"].items():
            p = vdir / member
            if not p.is_file() or p.is_symlink():
                raise IntegrityError(f"{name} {version}: member {member} is missing")
            if sha256_file(p) != digest:
                raise IntegrityError(f"{name} {version}: member {member} digest differs")
        return rec

    def discard_incomplete(self, name: str) -> None:
        """Remove what interrupted installs left: extraction directories (``.*.partial``) and
        version directories without an install record; then a model directory that holds
        nothing installed and no pointers at all."""
        d = self.model_dir(name)
        if not d.is_dir():
            return
        clean_temp(d)
        keep = self.pointers(name)
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(".partial"):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            elif (
                p.is_dir()
                and not p.name.startswith(".")
                and not (p / INSTALL_RECORD).exists()
                and p.name not in (keep.current, keep.previous)
            ):
                remove_tree(p)
        if not any(d.iterdir()):
            d.rmdir()

    # ------------------------------------------------------------------ gate records

    def committed_versions(self, name: str) -> list[str]:
        """Versions this device has committed (oldest first, bounded)."""
        p = self.model_dir(name) / "committed.json"
        try:
            v = read_json_object(p).get("versions")
        except (OSError, ValueError):
            return []
        return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

    def mark_committed(self, name: str, version: str) -> None:
        versions = [v for v in self.committed_versions(name) if v != version] + [version]
        atomic_write_json(self.model_dir(name) / "committed.json", {"versions": versions[-32:]})

    def serving_record(self, name: str) -> tuple[str, list[float]] | None:
        """(version, per-sample latencies in ms) the model's committed version served with."""
        try:
            d = read_json_object(self.model_dir(name) / "serving.json")
        except (OSError, ValueError):
            return None
        version, lat = d.get("version"), d.get("ms_per_sample")
        if not isinstance(version, str) or not isinstance(lat, list):
            return None
        return version, [
            float(x) for x in lat if isinstance(x, int | float) and math.isfinite(x) and x >= 0
        ]

    def add_serving_latencies(
        self, name: str, version: str, latencies: list[float], keep: int
    ) -> None:
        """Append to the serving record of ``version`` (a record of another version is
        replaced); the newest ``keep`` values are kept."""
        if not latencies or not self.model_dir(name).is_dir():
            return
        old = self.serving_record(name)
        base = old[1] if old and old[0] == version else []
        atomic_write_json(
            self.model_dir(name) / "serving.json",
            {
                "version": version,
                "ms_per_sample": [round(x, 6) for x in [*base, *latencies][-max(keep, 1) :]],
            },
        )

    def remove_version(self, name: str, version: str) -> None:
        ptr = self.pointers(name)
        if version in (ptr.current, ptr.previous):
            raise ValueError(f"refusing to remove {name} {version}: it is current or previous")
        remove_tree(self.version_dir(name, version))

    def remove_model(self, name: str) -> list[str]:
        """Uninstall `name`: pointers and every version directory go (the model directory is
        renamed away first, so a crash never leaves a half-deleted model a loader could see).
        Returns the versions that were installed; [] when nothing was (idempotent)."""
        versions = self.installed_versions(name)
        remove_tree(self.model_dir(name))
        clean_temp(self.root)
        return versions

    def prune(self, name: str, keep: int = 2) -> list[str]:
        """Remove installed versions other than current and previous (keep >= 2 keeps both)."""
        ptr = self.pointers(name)
        protected = [v for v in (ptr.current, ptr.previous) if v][: max(keep, 1)]
        removed = []
        for v in self.installed_versions(name):
            if v not in protected:
                remove_tree(self.version_dir(name, v))
                removed.append(v)
        return removed
