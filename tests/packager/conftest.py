"""Packager fixtures: example models, a signing key and full packaging runs, built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.keys import KeyPair, generate_keypair
from edgefleet.packager.examples import ExampleModel, build_examples
from edgefleet.packager.pipeline import PackageReport, package_model
from edgefleet.packager.profiles import load_profiles

FAST_BENCH = {"bench_runs": 20, "bench_seconds": 0.2}


@pytest.fixture(scope="session")
def examples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ExampleModel]:
    return build_examples(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return generate_keypair(tmp_path_factory.mktemp("pkgkeys"), "packager-test")


@pytest.fixture(scope="session")
def all_reports(
    examples: dict[str, ExampleModel],
    signing_key: KeyPair,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[PackageReport, Path]]:
    """Both example models packaged for every shipped profile (the real pipeline)."""
    out: dict[str, tuple[PackageReport, Path]] = {}
    for name, ex in examples.items():
        out_dir = tmp_path_factory.mktemp(f"pkg-{name}")
        report = package_model(
            ex.model,
            name=name,
            version="1.2.3",
            profiles=list(load_profiles()),
            calibration=ex.calibration,
            validation=ex.validation,
            key=signing_key.private_path,
            out_dir=out_dir,
            training_run="run-42",
            expires_days=30,
            **FAST_BENCH,  # type: ignore[arg-type]
        )
        out[name] = (report, out_dir)
    return out
