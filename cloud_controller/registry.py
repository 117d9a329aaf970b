"""Package registry: verified uploads, releases (name + version across profiles), lookups."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.cloud_controller.db import iso
from edgefleet.cloud_controller.models import Package


class UploadRejected(Exception):
    """An upload the registry refuses; `code` is a ReasonCode value or a registry reason."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def store_upload(
    session: Session,
    tmp_file: Path,
    packages_dir: Path,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    uploader: str,
    *,
    max_bytes: int,
    revoked_key_ids: Sequence[str] = (),
    now: datetime | None = None,
) -> tuple[Package, bool]:
    """Verify `tmp_file` against the trusted packager keys and file it; (package, created).

    Re-uploading the identical file is a no-op; a different file under an existing
    name/version/profile is refused (`already_exists`): versions are immutable.
    """
    from edgefleet.wire.errors import RejectError
    from edgefleet.wire.manifest import package_filename
    from edgefleet.wire.package import VerifyPolicy, sha256_file, verify_package

    if not trusted_keys:
        raise UploadRejected("untrusted_key", "the controller trusts no packager key yet")
    try:
        verified = verify_package(
            tmp_file,
            VerifyPolicy(
                trusted_keys=list(trusted_keys),
                revoked_key_ids=list(revoked_key_ids),
                max_package_bytes=max_bytes,
                now=now,
            ),
        )
    except RejectError as e:
        raise UploadRejected(str(e.code), e.message) from e
    m = verified.manifest
    name, version, profile = str(m["name"]), str(m["version"]), str(m["profile"])
    sha, size = sha256_file(tmp_file)
    existing = session.scalar(
        select(Package).where(
            Package.name == name, Package.version == version, Package.profile == profile
        )
    )
    if existing is not None:
        if existing.sha256 == sha:
            return existing, False
        raise UploadRejected(
            "already_exists",
            f"{name} {version} for {profile} exists with another digest; versions are immutable",
            status=409,
        )
    filename = package_filename(name, version, profile)
    dest_dir = packages_dir / name
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    part = dest_dir / (filename + ".part")
    shutil.copyfile(tmp_file, part)
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
    pkg = Package(
        name=name,
        version=version,
        profile=profile,
        filename=str(dest.relative_to(packages_dir)),
        sha256=sha,
        size=size,
        key_id=verified.key_id,
        manifest=m,
        uploaded_at=now or datetime.now(UTC),
        uploaded_by=uploader,
    )
    session.add(pkg)
    session.flush()
    return pkg, True


def find(session: Session, name: str, version: str, profile: str) -> Package | None:
    return session.scalar(
        select(Package).where(
            Package.name == name, Package.version == version, Package.profile == profile
        )
    )


def release_profiles(session: Session, name: str, version: str) -> list[str]:
    return sorted(
        session.scalars(
            select(Package.profile).where(Package.name == name, Package.version == version)
        )
    )


def list_packages(session: Session, name: str | None = None) -> list[Package]:
    q = select(Package).order_by(Package.name, Package.uploaded_at, Package.profile)
    if name:
        q = q.where(Package.name == name)
    return list(session.scalars(q))


def to_dict(pkg: Package, base_url: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": pkg.id,
        "name": pkg.name,
        "version": pkg.version,
        "profile": pkg.profile,
        "sha256": pkg.sha256,
        "size": pkg.size,
        "key_id": pkg.key_id,
        "uploaded_at": iso(pkg.uploaded_at),
        "uploaded_by": pkg.uploaded_by,
    }
    if base_url is not None:
        out["url"] = download_url(pkg, base_url)
    return out


def releases(session: Session) -> list[dict[str, Any]]:
    """One entry per model name and version, with its profiles."""
    from edgefleet.wire.semver import parse_version

    grouped: dict[tuple[str, str], list[Package]] = {}
    for p in list_packages(session):
        grouped.setdefault((p.name, p.version), []).append(p)

    def order(k: tuple[str, str]) -> tuple[str, Any]:
        try:
            return (k[0], parse_version(k[1]))
        except ValueError:
            return (k[0], parse_version("0.0.0"))

    return [
        {
            "name": n,
            "version": v,
            "profiles": sorted(p.profile for p in grouped[(n, v)]),
            "uploaded_at": iso(min(p.uploaded_at for p in grouped[(n, v)])),
        }
        for n, v in sorted(grouped, key=order)
    ]


def download_url(pkg: Package, base_url: str) -> str:
    return f"{base_url}/api/v1/packages/{pkg.id}/download"


def desired_entry(
    pkg: Package, base_url: str, rollout_id: str | None, allow_downgrade: bool
) -> dict[str, Any]:
    """The desired-state model entry for this package."""
    return {
        "version": pkg.version,
        "url": download_url(pkg, base_url),
        "sha256": pkg.sha256,
        "size": pkg.size,
        "profile": pkg.profile,
        "rollout_id": rollout_id,
        "allow_downgrade": allow_downgrade,
    }
