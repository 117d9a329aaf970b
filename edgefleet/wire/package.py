"""The ``.efpkg`` package: writing it, and the one verifier every component uses.

A package is an uncompressed tar holding ``manifest.json``, ``model.sig`` (an OpenSSF Model
Signing v1.0 bundle over every other member), the model and ``samples.npz``.

Verification order: size limits -> signature by a trusted, unrevoked key, every member pinned and
every pin present -> manifest fields (schema, name, validity window, version, agent version,
profile, execution providers) -> every member's sha256 while extracting. Each of those decisions
is taken by `edgefleet.wire.trust` (pure); this module reads and writes the tar. Extraction writes
into a temporary directory beside the target, fsyncs, and renames it into place only when
everything matched, so a half-written or unverified model is never visible.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.wire import signing, trust
from edgefleet.wire.atomic import fsync_dir
from edgefleet.wire.blocks import cut_file, to_json
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
from edgefleet.wire.trust import Manifest, MemberInfo, MemberKind

__all__ = [
    "ReasonCode",
    "RejectError",
    "VerifiedPackage",
    "VerifyPolicy",
    "build_package",
    "read_manifest",
    "read_name",
    "sha256_file",
    "verify_package",
]

SIGNATURE_FILE = signing.SIGNATURE_FILE
GiB = 1024**3
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
_CHUNK = 1024 * 1024


@dataclass
class VerifyPolicy:
    """What the verifying side trusts and knows about itself (flat, for callers; `judge()` splits
    it into the trust store, device facts, limits and clock that `edgefleet.wire.trust` takes)."""

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

    def judge(self) -> trust.PackageTrust:
        return trust.PackageTrust(
            self.trust_store(),
            self.device_facts(),
            trust.Limits(self.max_package_bytes, self.max_member_bytes),
            self.clock(),
        )

    def trust_store(self) -> trust.TrustStore:
        return trust.TrustStore(self.trusted_keys, self.revoked_key_ids)

    def clock(self) -> datetime:
        return self.now or now_utc()

    def device_facts(self) -> trust.DeviceFacts:
        return trust.DeviceFacts(
            expected_name=self.expected_name,
            installed_version=self.installed_version,
            allow_version=self.allow_version,
            profiles=self.profiles,
            available_providers=self.available_providers,
            agent_version=self.agent_version,
        )


@dataclass
class VerifiedPackage:
    path: Path
    manifest: Manifest
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
    block_lists: bool = True,
) -> Path:
    """Write ``out_dir/NAME-VERSION-PROFILE.efpkg`` atomically and return its path.

    ``files`` maps member names to files on disk. ``manifest["members"]`` is filled in here, with
    each member's block list (``block_lists=False`` writes none, as packagers before delta
    updates did), and ``created`` when absent. The manifest is validated before anything is
    written.
    """
    now = now or now_utc()
    manifest = dict(manifest)
    manifest.setdefault("created", format_time(now))
    manifest.setdefault("expires", None)
    members: dict[str, dict[str, Any]] = {}
    for name, path in files.items():
        digest, size = sha256_file(Path(path))
        # the content addresses a device's delta update reuses blocks by (docs/delta.md)
        members[name] = {"sha256": digest, "size": size}
        if block_lists:
            members[name]["blocks"] = to_json(cut_file(Path(path)))
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


def _kind(ti: tarfile.TarInfo) -> MemberKind:
    if ti.issym():
        return MemberKind.SYMLINK
    if ti.islnk():
        return MemberKind.HARDLINK
    return MemberKind.FILE if ti.isfile() else MemberKind.OTHER


def _headers(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every tar header; trust judges them as `MemberInfo`s (`_info`)."""
    try:
        return tar.getmembers()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"truncated or corrupt archive: {e}") from e


def _info(ti: tarfile.TarInfo) -> MemberInfo:
    return MemberInfo(ti.name, ti.size, _kind(ti), ti.linkname)


def _read_small(tar: tarfile.TarFile, ti: tarfile.TarInfo, limit: int) -> bytes:
    trust.check_read_size(ti.name, ti.size, limit)
    f = tar.extractfile(ti)
    assert f is not None
    data = f.read()
    if len(data) != ti.size:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"{ti.name} is truncated")
    return data


def _manifest_bytes(path: Path) -> bytes:
    with _open_tar(path) as tar:
        headers = _headers(tar)
        trust.check_members(map(_info, headers), 16 * GiB)
        found = [ti for ti in headers if ti.name == MANIFEST_FILE]
        if not found:
            raise RejectError(ReasonCode.MEMBER_MISSING, "package has no manifest.json")
        return _read_small(tar, found[0], MAX_MANIFEST_BYTES)


def read_manifest(path: Path) -> Manifest:
    """The manifest as written, without verifying anything (for ``inspect``)."""
    return trust.parse_manifest_json(_manifest_bytes(Path(path)))


def read_name(path: Path) -> str:
    """The model name the package claims, unverified: verify the package by it afterwards."""
    return trust.unverified_name(_manifest_bytes(Path(path)))


# --------------------------------------------------------------------------- verifying


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
    it appears only once every member has been written, hashed and fsynced. Every decision is
    `edgefleet.wire.trust`'s; this function only reads the tar and feeds it the bytes.
    """
    path = Path(path)
    judge = policy.judge()
    try:
        size = path.stat().st_size
    except OSError as e:
        raise RejectError(ReasonCode.NOT_A_PACKAGE, f"cannot read {path}: {e.strerror}") from e
    judge.check_size(size)
    with _open_tar(path) as tar:
        listed = _headers(tar)
        judge.check_members(map(_info, listed))
        headers = {ti.name: ti for ti in listed}
        judge.check_signature(_read_small(tar, headers[SIGNATURE_FILE], signing.MAX_BUNDLE_BYTES))
        manifest_bytes = _read_small(tar, headers[MANIFEST_FILE], MAX_MANIFEST_BYTES)
        verdict = judge.check_manifest(manifest_bytes)
        result = VerifiedPackage(
            path,
            verdict.manifest,
            verdict.key_id,
            dict(verdict.digests),
            None,
            verdict.cpu_fallback,
            verdict.providers,
        )
        if extract_to is None:
            for name in verdict.payload:
                src = tar.extractfile(headers[name])
                assert src is not None
                verdict.check_digest(name, _copy_hashing(src, None, headers[name].size))
            _check_external_data(path, headers, verdict)
            return result
        result.extracted_to = _extract(
            tar, headers, verdict, manifest_bytes, Path(extract_to), path
        )
        return result


def _check_external_data(
    path: Path, headers: Mapping[str, tarfile.TarInfo], verdict: trust.Verdict
) -> None:
    """The model's external-data locations, read in place from the (uncompressed) tar once its
    digest matched, must all be files of this package."""
    model = manifest_parts_model_file(verdict.manifest)
    ti = headers.get(model)
    if ti is None or ti.size == 0:
        return
    start, size = ti.offset_data, ti.size
    locations = _read_locations(path, model, lambda view: view[start : start + size])
    trust.check_external_data(locations, verdict.payload, model)


def check_installed_external_data(version_dir: Path, manifest: Manifest) -> None:
    """The same refusal for a version already on disk, before a runtime loads it (a version
    installed by an older verifier): every external-data location of its model must be one of
    its signed members, a regular file, not a link."""
    model = manifest_parts_model_file(manifest)
    path = Path(version_dir) / model
    members = manifest.get("members")
    payload = set(members) if isinstance(members, dict) else set()
    if not path.is_file() or path.stat().st_size == 0:
        return
    locations = _read_locations(path, model, lambda view: view)
    trust.check_external_data(locations, payload, model)
    for loc in locations:
        if (Path(version_dir) / loc).is_symlink():
            raise RejectError(ReasonCode.LINK_MEMBER, f"{model}'s external data {loc!r} is a link")


def _read_locations(path: Path, model: str, part: Callable[[memoryview], memoryview]) -> list[str]:
    """``trust.external_data_locations`` of ``part`` of the file at ``path``, read in place.

    A refusal is re-raised as a fresh error once the file is unmapped: the original's traceback
    holds frames whose views still pin the mapping, and closing it then raised ``BufferError``
    in place of the refusal."""
    problem: RejectError | None = None
    locations: list[str] = []
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm,
        memoryview(mm) as view,
        part(view) as region,
    ):
        try:
            locations = list(trust.external_data_locations(region, model))
        except RejectError as e:
            problem = RejectError(e.code, e.message)
    if problem is not None:
        raise problem
    return locations


def manifest_parts_model_file(manifest: Manifest) -> str:
    """``model.file`` of a validated manifest (``model.onnx`` when absent)."""
    model = manifest.get("model")
    name = model.get("file") if isinstance(model, dict) else None
    return name if isinstance(name, str) else "model.onnx"


def _extract(
    tar: tarfile.TarFile,
    headers: Mapping[str, tarfile.TarInfo],
    verdict: trust.Verdict,
    manifest_bytes: bytes,
    target: Path,
    package: Path,
) -> Path:
    if target.exists():
        raise FileExistsError(f"extraction target {target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        for name in verdict.payload:
            ti = headers[name]
            src = tar.extractfile(ti)
            assert src is not None
            with open(tmp / name, "xb") as dst:
                got = _copy_hashing(src, dst, ti.size)
                dst.flush()
                os.fsync(dst.fileno())
            verdict.check_digest(name, got)
        _check_external_data(package, headers, verdict)
        bundle = _read_small(tar, headers[SIGNATURE_FILE], signing.MAX_BUNDLE_BYTES)
        for name, raw in ((MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, bundle)):
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
