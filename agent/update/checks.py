"""Device checks before installing: free disk and memory, what only the device knows.

`check_resources` is pure; the caller measures the disk and memory."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.agent.update.events import StepFailed
from edgefleet.wire.reasons import ReasonCode

if TYPE_CHECKING:
    from edgefleet.wire.trust import Manifest


@dataclass(frozen=True)
class Resources:
    """What the device has now (bytes on disk, MB of memory) and keeps in reserve."""

    free_disk: int | None  # None: the version is already installed, no disk is needed
    available_mb: float
    disk_headroom: int
    memory_headroom_mb: float


def package_bytes(manifest: Manifest) -> int:
    return sum(int(m["size"]) for m in manifest["members"].values())


def weights_mb(manifest: Manifest) -> float:
    """What loading may take: ONNX Runtime needs about twice the weights (file + arena)."""
    members: Mapping[str, Mapping[str, int]] = manifest["members"]
    model = manifest.get("model") or {}
    weights = [model.get("file", "model.onnx"), *(model.get("external_data") or [])]
    wbytes = sum(int(members[w]["size"]) for w in weights if w in members)
    return 2.0 * (wbytes or package_bytes(manifest)) / 2**20


def check_resources(manifest: Manifest, have: Resources) -> None:
    """Refuse with DISK_FULL or MEMORY_INSUFFICIENT when the package will not fit (pure)."""
    need = package_bytes(manifest)
    if have.free_disk is not None and need + have.disk_headroom > have.free_disk:
        raise StepFailed(
            ReasonCode.DISK_FULL,
            f"installing needs {need} bytes + {have.disk_headroom} headroom, {have.free_disk} free",
        )
    want_mb = weights_mb(manifest)
    if want_mb + have.memory_headroom_mb > have.available_mb:
        raise StepFailed(
            ReasonCode.MEMORY_INSUFFICIENT,
            f"the model may use {want_mb:.0f} MB + {have.memory_headroom_mb:.0f} MB headroom,"
            f" {have.available_mb:.0f} MB available",
        )
