"""The demo's packages: the packager pipeline's example model, signed, once per version."""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Iterable
from pathlib import Path

from edgefleet.demo.spec import MODEL_NAME, FleetError


def host_profile() -> str:
    """The CPU hardware profile of this machine (``cpu-x86_64`` or ``cpu-arm64``)."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}
    return f"cpu-{arch.get(platform.machine().lower(), 'x86_64')}"


def build_packages(
    root: Path,
    key: Path,
    good: Iterable[str],
    bad: Iterable[str],
    bench_runs: int = 50,
    bench_seconds: float = 0.5,
) -> dict[str, Path]:
    """Package the example model under ``root/packages``, signed with ``key``; version -> path.

    A ``bad`` version asks for a p95 below a microsecond on the device: every gateway's own
    benchmark refuses it in VALIDATING, while the old version keeps serving.
    """
    from edgefleet.packager.examples import build_mlp, digits_split
    from edgefleet.packager.pipeline import package_model
    from edgefleet.packager.profiles import get_profile
    from edgefleet.wire.semver import parse_version

    out = root / "packages"
    example = build_mlp(root / "examples" / "digits-mlp", digits_split())  # the CNN is not used
    profile = get_profile(host_profile())
    impossible = dataclasses.replace(
        profile, device_gates=dataclasses.replace(profile.device_gates, max_p95_ms=0.001)
    )
    built: dict[str, Path] = {}
    plan = [(v, profile) for v in good] + [(v, impossible) for v in bad]
    for version, prof in sorted(plan, key=lambda vp: parse_version(vp[0])):
        report = package_model(
            example.model,
            name=MODEL_NAME,
            version=version,
            profiles=[prof],
            calibration=example.calibration,
            validation=example.validation,
            key=key,
            out_dir=out,
            bench_runs=bench_runs,
            bench_seconds=bench_seconds,
        )
        result = report.profiles[0]
        if not result.ok or result.package is None:
            raise FleetError(f"packaging {version} failed: {result.failure}")
        built[version] = result.package
    return built
