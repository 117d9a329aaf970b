"""The ``.efpkg`` package: writing it, and the one verifier every component uses.

A package is an uncompressed tar holding ``manifest.json``, ``model.sig`` (an OpenSSF Model
Signing v1.0 bundle over every other member), the model and ``samples.npz``.

Verification order: size limits -> signature by a trusted, unrevoked key, every member pinned and
every pin present -> manifest fields (schema, name, validity window, version, agent version,
profile, execution providers) -> every member's sha256 while extracting. Extraction writes into a
temporary directory beside the target, fsyncs, and renames it into place only when everything
matched, so a half-written or unverified model is never visible.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.wire import signing
from edgefleet.wire.atomic import fsync_dir
from edgefleet.wire.errors import RejectError
from edgefleet.wire.manifest import (
    MANIFEST_FILE,
    format_time,
    now_utc,
    package_filename,
    parse_time,
    validate_manifest,
)
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.semver import parse_version

__all__ = [
    "ReasonCode",
    "RejectError",
    "VerifiedPackage",
    "VerifyPolicy",
    "build_package",
    "read_manifest",
    "sha256_file",
    "verify_package",
]

SIGNATURE_FILE = signing.SIGNATURE_FILE
GiB = 1024**3
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
CLOCK_SKEW = timedelta(minutes=5)
CPU_PROVIDER = "CPUExecutionProvider"
_CHUNK = 1024 * 1024


@dataclass
class VerifyPolicy:
    """What the verifying side trusts and knows about itself."""

    trusted_keys: Sequence[ec.EllipticCurvePublicKey]
    revoked_key_ids: Collection[str] = ()
    max_package_bytes: int = 4 * GiB
    max_member_bytes: int = 4 * GiB
    now: datetime | None = None
    expected_name: str | None = None
    installed_version: str | None = None  # the new version must be strictly newer ...
    allow_version: str | None = None  # ... unless it is exactly this one (an asked-for rollback)
    profiles: Sequence[str] | None = None  # profiles this device accepts; None = any
    available_providers: Sequence[str] | None = None  # None = do not check providers
    agent_version: str | None = None


@dataclass
class VerifiedPackage:
    path: Path
    manifest: dict[str, Any]
    key_id: str
    member_digests: dict[str, str]
    extracted_to: Path | None = None
    cpu_fallback_used: bool = False
    providers: list[str] = field(default_factory=list)


def sha256_file(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


# --------------------------------------------------------------------------- writing


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, int(mtime), 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def build_package(
    out_dir: Path,
    manifest: dict[str, Any],
    files: Mapping[str, Path],
    private_key: ec.EllipticCurvePrivateKey,
    *,
    now: datetime | None = None,
) -> Path:
    """Write ``out_dir/NAME-VERSION-PROFILE.efpkg`` atomically and return its path.

    ``files`` maps member names to files on disk. ``manifest["members"]`` is filled in here, and
    ``created`` when absent. The manifest is validated before anything is written.
    """
    now = now or now_utc()
    manifest = dict(manifest)
    manifest.setdefault("created", format_time(now))
    manifest.setdefault("expires", None)
    members: dict[str, dict[str, Any]] = {}
    for name, path in files.items():
        digest, size = sha256_file(Path(path))
        members[name] = {"sha256": digest, "size": size}
    manifest["members"] = members
    validate_manifest(manifest)
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"
    digests = {n: m["sha256"] for n, m in members.items()}
    digests[MANIFEST_FILE] = hashlib.sha256(manifest_bytes).hexdigest()
    bundle = signing.sign(manifest["name"], digests, private_key)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / package_filename(manifest["name"], manifest["version"], manifest["profile"])
    mtime = parse_time(manifest["created"]).timestamp()
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            tar.addfile(
                _tarinfo(MANIFEST_FILE, len(manifest_bytes), mtime), io.BytesIO(manifest_bytes)
            )
            tar.addfile(_tarinfo(SIGNATURE_FILE, len(bundle), mtime), io.BytesIO(bundle))
            for name in sorted(files):
                with open(files[name], "rb") as f:
                    tar.addfile(_tarinfo(name, members[name]["size"], mtime), f)
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out_dir)
    return target


# --------------------------------------------------------------------------- reading


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise RejectError(
            ReasonCode.NOT_A_PACKAGE, f"{path.name} is not an uncompressed tar: {e}"
        ) from e


def _members(tar: tarfile.TarFile, max_member_bytes: int) -> dict[str, tarfile.TarInfo]:
    """The archive's members by name, after the structural checks (paths, links, sizes)."""
    out: dict[str, tarfile.TarInfo] = {}
    try:
        infos = tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"truncated or corrupt archive: {e}") from e
    for ti in infos:
        name = ti.name
        parts = name.split("/")
        if (
            not name
            or name.startswith(("/", "\\"))
            or "\\" in name
            or ".." in parts
            or any(p in ("", ".") for p in parts)
            or "\x00" in name
            or (len(name) > 1 and name[1] == ":")
        ):
            raise RejectError(
                ReasonCode.UNSAFE_PATH, f"member path {name!r} is absolute or escapes the package"
            )
        if ti.issym() or ti.islnk():
            raise RejectError(
                ReasonCode.LINK_MEMBER, f"member {name!r} is a link to {ti.linkname!r}"
            )
        if not ti.isfile():
            raise RejectError(ReasonCode.UNSAFE_PATH, f"member {name!r} is not a regular file")
        if len(parts) != 1:
            raise RejectError(
                ReasonCode.UNSAFE_PATH, f"member {name!r} is not at the package's top level"
            )
        if name in out:
            raise RejectError(ReasonCode.DUPLICATE_MEMBER, f"member {name!r} appears twice")
        if ti.size > max_member_bytes:
            raise RejectError(
                ReasonCode.TOO_LARGE,
                f"member {name!r} is {ti.size} bytes, over the {max_member_bytes} limit",
            )
        out[name] = ti
    return out


def _read_small(tar: tarfile.TarFile, ti: tarfile.TarInfo, limit: int) -> bytes:
    if ti.size > limit:
        raise RejectError(
            ReasonCode.TOO_LARGE, f"{ti.name} is {ti.size} bytes, over the {limit} limit"
        )
    f = tar.extractfile(ti)
    assert f is not None
    data = f.read()
    if len(data) != ti.size:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"{ti.name} is truncated")
    return data


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest as written, without verifying anything (for ``inspect``)."""
    with _open_tar(Path(path)) as tar:
        members = _members(tar, 16 * GiB)
        if MANIFEST_FILE not in members:
            raise RejectError(ReasonCode.MEMBER_MISSING, "package has no manifest.json")
        try:
            data = json.loads(_read_small(tar, members[MANIFEST_FILE], MAX_MANIFEST_BYTES))
        except json.JSONDecodeError as e:
            raise RejectError(ReasonCode.MANIFEST_INVALID, f"manifest.json is not JSON: {e}") from e
        if not isinstance(data, dict):
            raise RejectError(ReasonCode.MANIFEST_INVALID, "manifest.json is not an object")
        return data


# --------------------------------------------------------------------------- verifying


def check_manifest_policy(manifest: dict[str, Any], policy: VerifyPolicy) -> tuple[list[str], bool]:
    """The manifest-level decisions (pure). Returns (providers to use in order, cpu fallback used)."""
    name, version = manifest["name"], manifest["version"]
    if policy.expected_name is not None and name != policy.expected_name:
        raise RejectError(
            ReasonCode.NAME_MISMATCH, f"package is {name!r}, expected {policy.expected_name!r}"
        )
    now = policy.now or now_utc()
    created = parse_time(manifest["created"])
    if created > now + CLOCK_SKEW:
        raise RejectError(
            ReasonCode.NOT_YET_VALID, f"package created {manifest['created']}, in the future"
        )
    if manifest.get("expires") and parse_time(manifest["expires"]) <= now:
        raise RejectError(ReasonCode.EXPIRED, f"package expired at {manifest['expires']}")
    if policy.agent_version is not None and parse_version(
        manifest["min_agent_version"]
    ) > parse_version(policy.agent_version):
        raise RejectError(
            ReasonCode.AGENT_TOO_OLD,
            f"package needs agent >= {manifest['min_agent_version']}, this agent is {policy.agent_version}",
        )
    if (
        policy.installed_version is not None
        and version != policy.allow_version
        and parse_version(version) <= parse_version(policy.installed_version)
    ):
        raise RejectError(
            ReasonCode.VERSION_NOT_NEWER,
            f"version {version} is not newer than the installed {policy.installed_version}"
            " (and no rollback to it was asked for)",
        )
    if policy.profiles is not None and manifest["profile"] not in policy.profiles:
        raise RejectError(
            ReasonCode.PROFILE_INCOMPATIBLE,
            f"package is for profile {manifest['profile']!r}; this device accepts {list(policy.profiles)}",
        )
    wanted = [ep["name"] for ep in manifest["execution_providers"]]
    if policy.available_providers is None:
        return wanted, False
    have = set(policy.available_providers)
    usable = [p for p in wanted if p in have]
    accelerators = [p for p in wanted if p != CPU_PROVIDER]
    if not accelerators or any(p in have for p in accelerators):
        if not usable:
            raise RejectError(ReasonCode.PROVIDER_MISSING, f"none of {wanted} is available here")
        return usable, False
    if manifest["cpu_fallback"] and CPU_PROVIDER in have:
        return [CPU_PROVIDER], True
    raise RejectError(
        ReasonCode.PROVIDER_MISSING,
        f"package needs {accelerators}, this device has {sorted(have)}; the profile does not allow CPU fallback",
    )


def _copy_hashing(src: IO[bytes], dst: IO[bytes] | None, size: int) -> str:
    h, left = hashlib.sha256(), size
    while left > 0:
        chunk = src.read(min(_CHUNK, left))
        if not chunk:
            raise RejectError(ReasonCode.NOT_A_PACKAGE, "member data is truncated")
        h.update(chunk)
        if dst is not None:
            dst.write(chunk)
        left -= len(chunk)
    return h.hexdigest()


def verify_package(
    path: Path, policy: VerifyPolicy, extract_to: Path | None = None
) -> VerifiedPackage:
    """Verify ``path`` against ``policy``; with ``extract_to``, also install its members there.

    Raises :class:`RejectError` naming the first reason for refusal. ``extract_to`` must not exist;
    it appears only once every member has been written, hashed and fsynced.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"cannot read {path}: {e.strerror}") from e
    if size > policy.max_package_bytes:
        raise RejectError(
            ReasonCode.TOO_LARGE,
            f"package is {size} bytes, over the {policy.max_package_bytes} limit",
        )
    with _open_tar(path) as tar:
        members = _members(tar, policy.max_member_bytes)
        if SIGNATURE_FILE not in members:
            raise RejectError(ReasonCode.SIGNATURE_MISSING, f"package has no {SIGNATURE_FILE}")
        signed = signing.verify(
            _read_small(tar, members[SIGNATURE_FILE], signing.MAX_BUNDLE_BYTES),
            policy.trusted_keys,
            policy.revoked_key_ids,
        )
        for name in members:
            if name != SIGNATURE_FILE and name not in signed.digests:
                raise RejectError(
                    ReasonCode.MEMBER_UNPINNED, f"member {name!r} is not pinned by the signature"
                )
        for name in signed.digests:
            if name not in members:
                raise RejectError(
                    ReasonCode.MEMBER_MISSING, f"signed member {name!r} is not in the package"
                )
        if MANIFEST_FILE not in members:
            raise RejectError(ReasonCode.MEMBER_MISSING, "package has no manifest.json")
        manifest_bytes = _read_small(tar, members[MANIFEST_FILE], MAX_MANIFEST_BYTES)
        if hashlib.sha256(manifest_bytes).hexdigest() != signed.digests[MANIFEST_FILE]:
            raise RejectError(
                ReasonCode.DIGEST_MISMATCH, "manifest.json does not match its signed digest"
            )
        try:
            manifest = validate_manifest(json.loads(manifest_bytes))
        except json.JSONDecodeError as e:
            raise RejectError(ReasonCode.MANIFEST_INVALID, f"manifest.json is not JSON: {e}") from e
        listed = set(manifest["members"])
        payload = set(members) - {SIGNATURE_FILE, MANIFEST_FILE}
        if listed != payload:
            raise RejectError(
                ReasonCode.MANIFEST_INVALID,
                f"manifest lists members {sorted(listed)} but the package holds {sorted(payload)}",
            )
        for name in payload:
            info = manifest["members"][name]
            if info["sha256"] != signed.digests[name]:
                raise RejectError(
                    ReasonCode.DIGEST_MISMATCH, f"manifest and signature disagree on {name!r}"
                )
            if info["size"] != members[name].size:
                raise RejectError(
                    ReasonCode.SIZE_MISMATCH,
                    f"{name!r} is {members[name].size} bytes, the manifest says {info['size']}",
                )
        providers, fallback = check_manifest_policy(manifest, policy)
        result = VerifiedPackage(
            path, manifest, signed.key_id, dict(signed.digests), None, fallback, providers
        )
        if extract_to is None:
            for name in sorted(payload):
                src = tar.extractfile(members[name])
                assert src is not None
                if _copy_hashing(src, None, members[name].size) != signed.digests[name]:
                    raise RejectError(
                        ReasonCode.DIGEST_MISMATCH, f"{name!r} does not match its signed digest"
                    )
            return result
        result.extracted_to = _extract(
            tar, members, signed.digests, manifest_bytes, Path(extract_to)
        )
        return result


def _extract(
    tar: tarfile.TarFile,
    members: Mapping[str, tarfile.TarInfo],
    digests: Mapping[str, str],
    manifest_bytes: bytes,
    target: Path,
) -> Path:
    if target.exists():
        raise FileExistsError(f"extraction target {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        for name, ti in members.items():
            if name in (SIGNATURE_FILE, MANIFEST_FILE):
                continue
            src = tar.extractfile(ti)
            assert src is not None
            with open(tmp / name, "xb") as dst:
                got = _copy_hashing(src, dst, ti.size)
                dst.flush()
                os.fsync(dst.fileno())
            if got != digests[name]:
                raise RejectError(
                    ReasonCode.DIGEST_MISMATCH, f"{name!r} does not match its signed digest"
                )
        for name, data in ((MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, None)):
            raw = (
                data
                if data is not None
                else _read_small(tar, members[name], signing.MAX_BUNDLE_BYTES)
            )
            with open(tmp / name, "xb") as dst:
                dst.write(raw)
                dst.flush()
                os.fsync(dst.fileno())
        fsync_dir(tmp)
        os.rename(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
