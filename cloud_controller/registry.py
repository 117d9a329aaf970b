"""Package registry: verified uploads, releases (name + version across profiles), lookups."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.cloud_controller.db import iso, transaction
from edgefleet.cloud_controller.models import DesiredState, Package


class UploadRejected(Exception):
    """An upload the registry refuses; `code` is a ReasonCode value or a registry reason."""

    def __init__(self, code: str, message: str, status: int = 422) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


BLOB_DIR = "sha256"  # packages are stored by content: <packages dir>/sha256/<digest>.efpkg


@dataclass(frozen=True)
class VerifiedUpload:
    name: str
    version: str
    profile: str
    sha256: str
    size: int
    key_id: str
    manifest: dict[str, Any]


def verify_upload(
    tmp_file: Path,
    trusted_keys: Sequence[ec.EllipticCurvePublicKey],
    *,
    max_bytes: int,
    revoked_key_ids: Sequence[str] = (),
    now: datetime | None = None,
) -> VerifiedUpload:
    """Verify `tmp_file` against the trusted packager keys (no database, no registry write)."""
    from edgefleet.wire.errors import RejectError
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
    except (RecursionError, ValueError, TypeError) as e:  # never a 500 for a bad package
        raise UploadRejected("manifest_invalid", f"package refused: {e}") from e
    m = verified.manifest
    sha, size = sha256_file(tmp_file)
    return VerifiedUpload(
        str(m["name"]), str(m["version"]), str(m["profile"]), sha, size, verified.key_id, m
    )


def put_blob(tmp_file: Path, packages_dir: Path, sha256: str) -> str:
    """File the verified bytes under their own digest (fsync, then an atomic rename); the path
    relative to `packages_dir`. Two uploads never write the same path with different bytes, so
    a row can never advertise one digest while the file holds another package."""
    blob_dir = packages_dir / BLOB_DIR
    blob_dir.mkdir(parents=True, exist_ok=True)
    dest = blob_dir / f"{sha256}.efpkg"
    if not dest.exists():
        part = blob_dir / f".{sha256}.{uuid.uuid4().hex}.part"
        try:
            shutil.copyfile(tmp_file, part)
            with open(part, "rb") as f:
                os.fsync(f.fileno())
            os.replace(part, dest)
        finally:
            part.unlink(missing_ok=True)
    return f"{BLOB_DIR}/{dest.name}"


def record_upload(
    session: Session,
    up: VerifiedUpload,
    filename: str,
    uploader: str,
    now: datetime | None = None,
) -> tuple[Package, bool]:
    """Publish the package row: (package, created). The unique name/version/profile row is the
    one winner of concurrent uploads; the same bytes again are a no-op, other bytes a 409."""
    existing = find(session, up.name, up.version, up.profile)
    if existing is not None:
        if existing.sha256 == up.sha256:
            return existing, False
        raise UploadRejected(
            "already_exists",
            f"{up.name} {up.version} for {up.profile} exists with another digest; "
            "versions are immutable",
            status=409,
        )
    pkg = Package(
        name=up.name,
        version=up.version,
        profile=up.profile,
        filename=filename,
        sha256=up.sha256,
        size=up.size,
        key_id=up.key_id,
        manifest=up.manifest,
        uploaded_at=now or datetime.now(UTC),
        uploaded_by=uploader,
    )
    session.add(pkg)
    session.flush()
    return pkg, True


def publish_upload(
    factory: sessionmaker[Session],
    tmp_file: Path,
    packages_dir: Path,
    up: VerifiedUpload,
    uploader: str,
    now: datetime | None = None,
    attempts: int = 5,
) -> tuple[Package, bool]:
    """Store the blob, then publish its row in its own transaction; a transaction that loses a
    race (unique violation, or SQLite's stale snapshot) is retried and then sees the winner."""
    with factory() as s:  # the usual refusal writes nothing (a lost race may leave a blob)
        existing = find(s, up.name, up.version, up.profile)
        if existing is not None and existing.sha256 != up.sha256:
            record_upload(s, up, "", uploader, now)  # raises the 409
    filename = put_blob(tmp_file, packages_dir, up.sha256)
    for attempt in range(attempts):
        try:
            with transaction(factory) as s:
                pkg, created = record_upload(s, up, filename, uploader, now)
                s.expunge(pkg)
                return pkg, created
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


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
    """Verify `tmp_file` and file it in `session`'s transaction; (package, created).

    Re-uploading the identical file is a no-op; a different file under an existing
    name/version/profile is refused (`already_exists`): versions are immutable.
    """
    up = verify_upload(
        tmp_file, trusted_keys, max_bytes=max_bytes, revoked_key_ids=revoked_key_ids, now=now
    )
    return record_upload(session, up, put_blob(tmp_file, packages_dir, up.sha256), uploader, now)


def desired_names(desired: DesiredState | None, pkg: Package) -> bool:
    """Whether a device's desired state names `pkg` (its download token reaches only those)."""
    if desired is None:
        return False
    entry = (desired.models or {}).get(pkg.name)
    return (
        isinstance(entry, dict)
        and entry.get("sha256") == pkg.sha256
        and entry.get("version") == pkg.version
        and entry.get("profile", pkg.profile) == pkg.profile
    )


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
