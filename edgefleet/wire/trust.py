"""Every package trust decision, pure: bytes and facts in, a verdict or a named refusal out.

Nothing here opens a file or reads a clock. `edgefleet.wire.package` reads the tar (headers,
``model.sig``, ``manifest.json``, member bytes) and hands each piece to a `PackageTrust`, whose
stages must run in order, each refusing with a `RejectError` naming its `ReasonCode`:

1. `check_size` and `check_members`: size limits, and the members' names and types as read from
   the tar headers (no absolute or escaping paths, no links, no duplicates, top level only);
2. `check_signature`: the bundle verifies with a trusted, unrevoked key, it pins every member and
   every pin is present;
3. `check_manifest`: the manifest bytes match their pin, parse, agree with the signature and the
   headers, and pass the device's policy (`check_policy`); the `Verdict` it returns then judges
   each member's sha256 as the reader streams it (`Verdict.check_digest`).

`check_installed` is the same policy for a version already on the device (a rollback to it): the
key that signed it must still be trusted and not revoked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.wire import signing
from edgefleet.wire.errors import RejectError
from edgefleet.wire.keyid import KeyIdError, canonical_key_ids
from edgefleet.wire.manifest import MANIFEST_FILE, parse_time, validate_manifest
from edgefleet.wire.message import json_depth_ok
from edgefleet.wire.protowire import Malformed, length_delimited, varint
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.semver import parse_version

SIGNATURE_FILE = signing.SIGNATURE_FILE
CLOCK_SKEW = timedelta(minutes=5)
CPU_PROVIDER = "CPUExecutionProvider"

_T = TypeVar("_T")
Manifest = dict[str, Any]  # a validated manifest.json (JSON: values of any JSON type)


class MemberKind(StrEnum):
    """A tar member's type, from its header."""

    FILE = "file"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    OTHER = "other"  # directory, device, fifo...


@dataclass(frozen=True)
class MemberInfo:
    """One tar header: what the archive says a member is, before any byte of it is read."""

    name: str
    size: int
    kind: MemberKind = MemberKind.FILE
    link_target: str = ""


@dataclass(frozen=True)
class TrustStore:
    """The keys a device accepts signatures from, and the key ids it no longer accepts."""

    trusted_keys: Sequence[ec.EllipticCurvePublicKey]
    revoked_key_ids: Collection[str] = ()

    def __post_init__(self) -> None:
        # One canonical key-id form (wire.keyid): an id in upper case still revokes its key,
        # and an entry that names no key (the 16-digit short form) refuses, never passes.
        try:
            revoked = canonical_key_ids(self.revoked_key_ids)
        except KeyIdError as e:
            raise RejectError(ReasonCode.REVOKED_KEY, f"revocation list refused: {e}") from e
        object.__setattr__(self, "revoked_key_ids", revoked)

    def trusts(self, kid: str) -> bool:
        return kid not in self.revoked_key_ids and kid in signing.key_ids(self.trusted_keys)


@dataclass(frozen=True)
class DeviceFacts:
    """What the verifying side knows about itself; None means "do not check this"."""

    expected_name: str | None = None
    installed_version: str | None = None  # a new version must be strictly newer ...
    allow_version: str | None = None  # ... unless it is exactly this one (an asked-for rollback)
    profiles: Sequence[str] | None = None  # profiles this device accepts
    available_providers: Sequence[str] | None = None
    agent_version: str | None = None


@dataclass(frozen=True)
class Limits:
    max_package_bytes: int
    max_member_bytes: int


@dataclass(frozen=True)
class Verdict:
    """A package the device may install: the verified manifest and what was signed."""

    manifest: Manifest
    key_id: str
    digests: dict[str, str]  # every signed member (manifest.json included) -> sha256
    providers: list[str]  # the execution providers to use here, in order
    cpu_fallback: bool  # the accelerators are missing and the profile allows the CPU

    @property
    def payload(self) -> list[str]:
        """The members to hash and install: all but the signature and the manifest."""
        return sorted(set(self.manifest["members"]))

    def check_digest(self, name: str, sha256: str) -> None:
        """Refuse a member whose streamed sha256 is not the signed one."""
        if sha256 != self.digests[name]:
            raise RejectError(
                ReasonCode.DIGEST_MISMATCH, f"{name!r} does not match its signed digest"
            )


# --------------------------------------------------------------------------- members


def _unsafe(name: str) -> bool:
    parts = name.split("/")
    return (
        not name
        or name.startswith(("/", "\\"))
        or "\\" in name
        or ".." in parts
        or any(p in ("", ".") for p in parts)
        or "\x00" in name
        or (len(name) > 1 and name[1] == ":")
    )


def check_members(infos: Iterable[MemberInfo], max_member_bytes: int) -> dict[str, MemberInfo]:
    """The archive's members by name, after the structural checks (paths, links, sizes)."""
    out: dict[str, MemberInfo] = {}
    for m in infos:
        name = m.name
        if _unsafe(name):
            raise RejectError(
                ReasonCode.UNSAFE_PATH, f"member path {name!r} is absolute or escapes the package"
            )
        if m.kind in (MemberKind.SYMLINK, MemberKind.HARDLINK):
            raise RejectError(
                ReasonCode.LINK_MEMBER, f"member {name!r} is a link to {m.link_target!r}"
            )
        if m.kind is not MemberKind.FILE:
            raise RejectError(ReasonCode.UNSAFE_PATH, f"member {name!r} is not a regular file")
        if "/" in name:
            raise RejectError(
                ReasonCode.UNSAFE_PATH, f"member {name!r} is not at the package's top level"
            )
        if name in out:
            raise RejectError(ReasonCode.DUPLICATE_MEMBER, f"member {name!r} appears twice")
        if m.size > max_member_bytes:
            raise RejectError(
                ReasonCode.TOO_LARGE,
                f"member {name!r} is {m.size} bytes, over the {max_member_bytes} limit",
            )
        out[name] = m
    return out


def check_read_size(name: str, size: int, limit: int) -> None:
    """Refuse to read a small member (signature, manifest) bigger than its limit."""
    if size > limit:
        raise RejectError(ReasonCode.TOO_LARGE, f"{name} is {size} bytes, over the {limit} limit")


#: JSON nesting a manifest or a signature bundle may have (a manifest needs 5 levels).
MAX_JSON_DEPTH = 32


def load_json(data: bytes, what: str, code: ReasonCode, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON from bytes that came from outside: not JSON, or nested deeper than ``max_depth``
    (which would exhaust the recursion of any code walking it), is refused with ``code``."""
    try:
        doc = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int of 5000 digits
        raise RejectError(code, f"{what} is not JSON: {e}") from e
    except RecursionError as e:
        raise RejectError(code, f"{what} nests deeper than {max_depth} levels") from e
    if not json_depth_ok(doc, max_depth):
        raise RejectError(code, f"{what} nests deeper than {max_depth} levels")
    return doc


def check_bundle_shape(bundle: bytes) -> None:
    """What `signing.verify` assumes of a bundle's JSON before it looks keys up: bounded
    nesting, and a key hint that is a string when present (a list or an object is refused
    here as an invalid signature, never a crash)."""
    doc = load_json(bundle, "signature bundle", ReasonCode.SIGNATURE_INVALID)
    material = doc.get("verificationMaterial") if isinstance(doc, dict) else None
    public_key = material.get("publicKey") if isinstance(material, dict) else None
    hint = public_key.get("hint") if isinstance(public_key, dict) else None
    if hint is not None and not isinstance(hint, str):
        raise RejectError(
            ReasonCode.SIGNATURE_INVALID,
            f"the bundle's key hint is a {type(hint).__name__}, not a key id",
        )


def parse_manifest_json(data: bytes) -> Manifest:
    """Manifest bytes as a JSON object, unverified (for ``inspect`` and reading a name)."""
    doc = load_json(data, "manifest.json", ReasonCode.MANIFEST_INVALID)
    if not isinstance(doc, dict):
        raise RejectError(ReasonCode.MANIFEST_INVALID, "manifest.json is not an object")
    return doc


def unverified_name(data: bytes) -> str:
    """The model name a package claims, before it is verified (to look up what is installed)."""
    name = parse_manifest_json(data).get("name")
    if not isinstance(name, str) or not name:
        raise RejectError(ReasonCode.MANIFEST_INVALID, "manifest.json names no model")
    return name


# --------------------------------------------------------------------------- external data

#: How the ONNX messages that can hold a tensor nest (field number -> message kind); every
#: other field is skipped by its wire type. ModelProto: graph, training_info, functions;
#: TrainingInfoProto: initialization, algorithm; GraphProto: node, initializer,
#: sparse_initializer; FunctionProto: node; NodeProto: attribute; AttributeProto: t, g,
#: tensors, graphs, sparse_tensor, sparse_tensors; SparseTensorProto: values, indices;
#: TensorProto: external_data (StringStringEntryProto: key 1, value 2).
_ONNX_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}
MAX_ONNX_NESTING = 64


def _entry(buf: memoryview, pos: int, end: int) -> tuple[str | None, str | None]:
    key = value = None
    while pos < end:
        tag, pos = varint(buf, pos, end)
        if tag & 7 != 2:
            raise Malformed("external_data entry field is not a string")
        n, pos = varint(buf, pos, end)
        if pos + n > end:
            raise Malformed("string runs past its message")
        text = bytes(buf[pos : pos + n]).decode("utf-8", "replace")
        if tag >> 3 == 1:
            key = text
        elif tag >> 3 == 2:
            value = text
        pos += n
    return key, value


def external_data_locations(model: memoryview | bytes, what: str = "model") -> list[str]:
    """Every ``location`` an ONNX model's tensors name for their external data, anywhere in it
    (initializers, node attributes, subgraphs, functions, training graphs), read from the
    protobuf wire format without a protobuf library and without recursion. Refuses a model
    whose bytes are not a well-formed protobuf or nest deeper than `MAX_ONNX_NESTING`."""
    buf = memoryview(model)
    out: list[str] = []
    stack: list[tuple[str, int, int, int]] = [("model", 0, len(buf), 1)]
    try:
        while stack:
            kind, pos, end, depth = stack.pop()
            fields = _ONNX_FIELDS[kind]
            for number, _, vpos, vend in length_delimited(buf, pos, end):
                sub = fields.get(number)
                if sub == "entry":
                    key, value = _entry(buf, vpos, vend)
                    if key == "location":
                        out.append(value or "")
                elif sub is not None:
                    if depth >= MAX_ONNX_NESTING:
                        raise Malformed(f"nests deeper than {MAX_ONNX_NESTING} messages")
                    stack.append((sub, vpos, vend, depth + 1))
    except Malformed as e:
        raise RejectError(
            ReasonCode.NOT_A_PACKAGE, f"{what} is not a well-formed ONNX model: {e}"
        ) from e
    return out


def check_external_data(locations: Iterable[str], payload: Collection[str], model: str) -> None:
    """Every external-data location must be a file of this package: a top-level member other
    than the model itself (members are regular files, never links: `check_members`). Whatever
    the runtime would do with ``../`` or an absolute path, it is never asked to."""
    for loc in locations:
        if _unsafe(loc) or "/" in loc:
            raise RejectError(
                ReasonCode.UNSAFE_PATH,
                f"{model} takes external data from {loc!r}, outside the package",
            )
        if loc not in payload or loc == model:
            raise RejectError(
                ReasonCode.UNSAFE_PATH,
                f"{model} takes external data from {loc!r}, which is not a file of the package",
            )


# --------------------------------------------------------------------------- policy


def check_policy(manifest: Manifest, facts: DeviceFacts, now: datetime) -> tuple[list[str], bool]:
    """The manifest-level decisions. Returns (providers to use in order, cpu fallback used)."""
    name, version = manifest["name"], manifest["version"]
    if facts.expected_name is not None and name != facts.expected_name:
        raise RejectError(
            ReasonCode.NAME_MISMATCH, f"package is {name!r}, expected {facts.expected_name!r}"
        )
    if parse_time(manifest["created"]) > now + CLOCK_SKEW:
        raise RejectError(
            ReasonCode.NOT_YET_VALID, f"package created {manifest['created']}, in the future"
        )
    if manifest.get("expires") and parse_time(manifest["expires"]) <= now:
        raise RejectError(ReasonCode.EXPIRED, f"package expired at {manifest['expires']}")
    if facts.agent_version is not None and parse_version(
        manifest["min_agent_version"]
    ) > parse_version(facts.agent_version):
        raise RejectError(
            ReasonCode.AGENT_TOO_OLD,
            f"package needs agent >= {manifest['min_agent_version']},"
            f" this agent is {facts.agent_version}",
        )
    check_version(version, facts)
    if facts.profiles is not None and manifest["profile"] not in facts.profiles:
        raise RejectError(
            ReasonCode.PROFILE_INCOMPATIBLE,
            f"package is for profile {manifest['profile']!r};"
            f" this device accepts {list(facts.profiles)}",
        )
    wanted = [str(ep["name"]) for ep in manifest["execution_providers"]]
    return choose_providers(wanted, bool(manifest["cpu_fallback"]), facts.available_providers)


def check_version(version: str, facts: DeviceFacts) -> None:
    """Anti-rollback: only a strictly newer version, or exactly the rollback asked for."""
    if (
        facts.installed_version is not None
        and version != facts.allow_version
        and parse_version(version) <= parse_version(facts.installed_version)
    ):
        raise RejectError(
            ReasonCode.VERSION_NOT_NEWER,
            f"version {version} is not newer than the installed {facts.installed_version}"
            " (and no rollback to it was asked for)",
        )


def choose_providers(
    wanted: Sequence[str], cpu_fallback: bool, available: Sequence[str] | None
) -> tuple[list[str], bool]:
    """The providers to use, in the package's order, and whether that is the CPU fallback."""
    if available is None:
        return list(wanted), False
    have = set(available)
    usable = [p for p in wanted if p in have]
    accelerators = [p for p in wanted if p != CPU_PROVIDER]
    if not accelerators or any(p in have for p in accelerators):
        if not usable:
            raise RejectError(ReasonCode.PROVIDER_MISSING, f"none of {wanted} is available here")
        return usable, False
    if cpu_fallback and CPU_PROVIDER in have:
        return [CPU_PROVIDER], True
    raise RejectError(
        ReasonCode.PROVIDER_MISSING,
        f"package needs {accelerators}, this device has {sorted(have)};"
        " the profile does not allow CPU fallback",
    )


def check_installed(
    manifest: Manifest,
    signer: str | None,
    digests: Mapping[str, str],
    trust: TrustStore,
    facts: DeviceFacts,
    now: datetime,
) -> Verdict:
    """A version already installed here, judged again before it serves again (a rollback).

    Its files were verified at install time (the store re-hashes them); what may have changed
    since is the trust store and the device: the key that signed it must still be trusted and
    not revoked, and the manifest must still pass `check_policy`.
    """
    what = f"{manifest.get('name')} {manifest.get('version')}"
    if signer is None:
        raise RejectError(ReasonCode.UNTRUSTED_KEY, f"{what} has no recorded signing key")
    if signer in trust.revoked_key_ids:
        raise RejectError(ReasonCode.REVOKED_KEY, f"{what} was signed by a revoked key")
    if not trust.trusts(signer):
        raise RejectError(
            ReasonCode.UNTRUSTED_KEY,
            f"{what} was signed by key {signer}, no longer among the"
            f" {len(trust.trusted_keys)} trusted key(s)",
        )
    providers, fallback = check_policy(manifest, facts, now)
    return Verdict(manifest, signer, dict(digests), providers, fallback)


# --------------------------------------------------------------------------- a package


class PackageTrust:
    """The decisions about one package file, taken stage by stage as its reader supplies bytes.

    Each stage needs the one before (a programming error otherwise, not a refusal).
    """

    def __init__(self, trust: TrustStore, facts: DeviceFacts, limits: Limits, now: datetime):
        self.trust = trust
        self.facts = facts
        self.limits = limits
        self.now = now
        self.members: dict[str, MemberInfo] | None = None
        self.signed: signing.SignedContent | None = None

    def check_size(self, size: int) -> None:
        if size > self.limits.max_package_bytes:
            raise RejectError(
                ReasonCode.TOO_LARGE,
                f"package is {size} bytes, over the {self.limits.max_package_bytes} limit",
            )

    def check_members(self, infos: Iterable[MemberInfo]) -> dict[str, MemberInfo]:
        self.members = check_members(infos, self.limits.max_member_bytes)
        if SIGNATURE_FILE not in self.members:
            raise RejectError(ReasonCode.SIGNATURE_MISSING, f"package has no {SIGNATURE_FILE}")
        return self.members

    def check_signature(self, bundle: bytes) -> signing.SignedContent:
        """The bundle verifies, pins every member, and every pin is a member."""
        members = self._need(self.members, "check_members")
        if len(bundle) <= signing.MAX_BUNDLE_BYTES:  # larger: signing.verify says too_large
            check_bundle_shape(bundle)
        signed = signing.verify(bundle, self.trust.trusted_keys, self.trust.revoked_key_ids)
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
        self.signed = signed
        return signed

    def check_manifest(self, manifest_bytes: bytes) -> Verdict:
        """The signed manifest, consistent with the signature and the headers, and the policy."""
        members = self._need(self.members, "check_members")
        signed = self._need(self.signed, "check_signature")
        if hashlib.sha256(manifest_bytes).hexdigest() != signed.digests[MANIFEST_FILE]:
            raise RejectError(
                ReasonCode.DIGEST_MISMATCH, "manifest.json does not match its signed digest"
            )
        manifest = validate_manifest(parse_manifest_json(manifest_bytes))
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
        providers, fallback = check_policy(manifest, self.facts, self.now)
        return Verdict(manifest, signed.key_id, dict(signed.digests), providers, fallback)

    @staticmethod
    def _need(value: _T | None, stage: str) -> _T:
        if value is None:
            raise RuntimeError(f"PackageTrust: {stage} must run first")
        return value


def verify_bytes(
    size: int,
    infos: Sequence[MemberInfo],
    bundle: bytes,
    manifest_bytes: bytes,
    trust: TrustStore,
    facts: DeviceFacts,
    limits: Limits,
    now: datetime,
) -> Verdict:
    """Every stage at once, for callers that already hold the bytes (and for tests)."""
    pt = PackageTrust(trust, facts, limits, now)
    pt.check_size(size)
    pt.check_members(infos)
    pt.check_signature(bundle)
    return pt.check_manifest(manifest_bytes)
