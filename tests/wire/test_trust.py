"""The pure trust decisions of `edgefleet.wire.trust`, over bytes and facts: no tar file, no disk."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.keys import key_id
from edgefleet.wire import signing, trust
from edgefleet.wire.errors import RejectError
from edgefleet.wire.manifest import format_time
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.trust import DeviceFacts, Limits, MemberInfo, MemberKind, TrustStore

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_package_bytes=10**9, max_member_bytes=10**9)
SIGNER = ec.generate_private_key(ec.SECP256R1())
STRANGER = ec.generate_private_key(ec.SECP256R1())
SIGNER_ID = key_id(SIGNER.public_key())
STORE = TrustStore([SIGNER.public_key()])
CUDA = {"name": "CUDAExecutionProvider", "options": {}}
CPU = {"name": "CPUExecutionProvider", "options": {}}


@dataclass
class Pkg:
    """A package as its reader hands it to trust: headers, signature bytes, manifest bytes."""

    infos: list[MemberInfo]
    bundle: bytes
    manifest: bytes

    def verify(
        self, store: TrustStore = STORE, facts: DeviceFacts | None = None, size: int = 1000
    ) -> trust.Verdict:
        return trust.verify_bytes(
            size, self.infos, self.bundle, self.manifest, store, facts or DeviceFacts(), LIMITS, NOW
        )


def manifest(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {
        "format": "edgefleet.package/v1",
        "name": "iris",
        "version": "1.2.0",
        "profile": "cpu-x86_64",
        "min_agent_version": "0.1.0",
        "created": format_time(NOW - timedelta(days=1)),
        "expires": None,
        "model": {"file": "model.onnx", "external_data": []},
        "io": {
            "inputs": [{"name": "X", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": "Y", "dtype": "float32", "shape": [None, 3]}],
        },
        "execution_providers": [CPU],
        "cpu_fallback": True,
        "gates": {},
    }
    m.update(over)
    return m


def package(
    key: ec.EllipticCurvePrivateKey = SIGNER,
    files: dict[str, bytes] | None = None,
    sign_files: dict[str, bytes] | None = None,
    **over: Any,
) -> Pkg:
    """Sign ``files`` (the model by default) with a manifest listing them; ``sign_files``
    signs other contents than the headers carry."""
    files = files if files is not None else {"model.onnx": b"onnx bytes"}
    m = manifest(**over)
    m.setdefault(
        "members",
        {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()},
    )
    mbytes = json.dumps(m).encode()
    signed = {n: hashlib.sha256(d).hexdigest() for n, d in (sign_files or files).items()}
    signed["manifest.json"] = hashlib.sha256(mbytes).hexdigest()
    bundle = signing.sign("iris", signed, key)
    infos = [MemberInfo("manifest.json", len(mbytes)), MemberInfo("model.sig", len(bundle))]
    infos += [MemberInfo(n, len(d)) for n, d in files.items()]
    return Pkg(infos, bundle, mbytes)


def refused(code: ReasonCode, pkg: Pkg, **kw: Any) -> RejectError:
    with pytest.raises(RejectError) as ei:
        pkg.verify(**kw)
    assert ei.value.code is code, ei.value
    return ei.value


def test_a_good_package_gives_a_verdict() -> None:
    v = package().verify(facts=DeviceFacts(available_providers=["CPUExecutionProvider"]))
    assert v.key_id == SIGNER_ID
    assert v.manifest["name"] == "iris"
    assert set(v.digests) == {"manifest.json", "model.onnx"}
    assert v.payload == ["model.onnx"]
    assert (v.providers, v.cpu_fallback) == (["CPUExecutionProvider"], False)
    v.check_digest("model.onnx", hashlib.sha256(b"onnx bytes").hexdigest())
    with pytest.raises(RejectError) as ei:
        v.check_digest("model.onnx", hashlib.sha256(b"other bytes").hexdigest())
    assert ei.value.code is ReasonCode.DIGEST_MISMATCH


@pytest.mark.parametrize(
    ("info", "code"),
    [
        (MemberInfo("../evil", 1), ReasonCode.UNSAFE_PATH),
        (MemberInfo("/abs", 1), ReasonCode.UNSAFE_PATH),
        (MemberInfo("C:x", 1), ReasonCode.UNSAFE_PATH),
        (MemberInfo("sub/file", 1), ReasonCode.UNSAFE_PATH),
        (MemberInfo("dir", 0, MemberKind.OTHER), ReasonCode.UNSAFE_PATH),
        (MemberInfo("ln", 0, MemberKind.SYMLINK, "/etc/passwd"), ReasonCode.LINK_MEMBER),
        (MemberInfo("hl", 0, MemberKind.HARDLINK, "model.onnx"), ReasonCode.LINK_MEMBER),
        (MemberInfo("model.onnx", 1), ReasonCode.DUPLICATE_MEMBER),
        (MemberInfo("huge", 10**10), ReasonCode.TOO_LARGE),
    ],
)
def test_member_headers_are_judged_before_any_byte_is_read(
    info: MemberInfo, code: ReasonCode
) -> None:
    pkg = package()
    pkg.infos.append(info)
    refused(code, pkg)


def test_package_size_signature_presence_and_pins() -> None:
    refused(ReasonCode.TOO_LARGE, package(), size=LIMITS.max_package_bytes + 1)
    no_sig = package()
    no_sig.infos = [i for i in no_sig.infos if i.name != "model.sig"]
    refused(ReasonCode.SIGNATURE_MISSING, no_sig)
    extra = package()
    extra.infos.append(MemberInfo("extra.bin", 3))
    refused(ReasonCode.MEMBER_UNPINNED, extra)
    missing = package(files={"model.onnx": b"m", "samples.npz": b"s"})
    missing.infos = [i for i in missing.infos if i.name != "samples.npz"]
    refused(ReasonCode.MEMBER_MISSING, missing)
    bad = package()
    refused(ReasonCode.SIGNATURE_INVALID, replace(bad, bundle=bad.bundle.replace(b"{", b"[", 1)))


def test_keys_untrusted_and_revoked() -> None:
    refused(ReasonCode.UNTRUSTED_KEY, package(key=STRANGER))
    refused(ReasonCode.REVOKED_KEY, package(), store=TrustStore(STORE.trusted_keys, {SIGNER_ID}))


def test_manifest_against_its_pin_the_signature_and_the_headers() -> None:
    pkg = package()
    refused(ReasonCode.DIGEST_MISMATCH, replace(pkg, manifest=pkg.manifest + b" "))
    lying = package(sign_files={"model.onnx": b"what was really signed"})
    refused(ReasonCode.DIGEST_MISMATCH, lying)
    short = package()
    short.infos = [
        replace(i, size=i.size + 1) if i.name == "model.onnx" else i for i in short.infos
    ]
    refused(ReasonCode.SIZE_MISMATCH, short)
    refused(ReasonCode.MANIFEST_INVALID, package(format="other/v9"))


@pytest.mark.parametrize(
    ("over", "facts", "code"),
    [
        ({}, DeviceFacts(expected_name="digits"), ReasonCode.NAME_MISMATCH),
        ({"created": format_time(NOW + timedelta(hours=1))}, DeviceFacts(), ReasonCode.NOT_YET_VALID),
        ({"expires": format_time(NOW)}, DeviceFacts(), ReasonCode.EXPIRED),
        ({"min_agent_version": "9.0.0"}, DeviceFacts(agent_version="1.0.0"), ReasonCode.AGENT_TOO_OLD),
        ({}, DeviceFacts(installed_version="1.2.0"), ReasonCode.VERSION_NOT_NEWER),
        ({}, DeviceFacts(installed_version="2.0.0", allow_version="1.1.0"), ReasonCode.VERSION_NOT_NEWER),
        ({}, DeviceFacts(profiles=["cpu-arm64"]), ReasonCode.PROFILE_INCOMPATIBLE),
        ({"execution_providers": [CUDA], "cpu_fallback": False}, DeviceFacts(available_providers=["CPUExecutionProvider"]), ReasonCode.PROVIDER_MISSING),
        ({}, DeviceFacts(available_providers=["CUDAExecutionProvider"]), ReasonCode.PROVIDER_MISSING),
    ],
)  # fmt: skip
def test_policy_refusals(over: dict[str, Any], facts: DeviceFacts, code: ReasonCode) -> None:
    refused(code, package(**over), facts=facts)


def test_policy_allows_newer_rollback_asked_for_and_cpu_fallback() -> None:
    assert package().verify(facts=DeviceFacts(installed_version="1.2.0-rc.1"))
    assert package().verify(facts=DeviceFacts(installed_version="2.0.0", allow_version="1.2.0"))
    lenient = package(execution_providers=[CUDA, CPU], cpu_fallback=True)
    v = lenient.verify(facts=DeviceFacts(available_providers=["CPUExecutionProvider"]))
    assert (v.providers, v.cpu_fallback) == (["CPUExecutionProvider"], True)
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    v = lenient.verify(facts=DeviceFacts(available_providers=both))
    assert (v.providers, v.cpu_fallback) == (both, False)


def test_stages_run_in_order() -> None:
    pt = trust.PackageTrust(STORE, DeviceFacts(), LIMITS, NOW)
    with pytest.raises(RuntimeError, match="check_members must run first"):
        pt.check_signature(package().bundle)


def test_unverified_name() -> None:
    assert trust.unverified_name(package().manifest) == "iris"
    for bad in (b"not json", b"[1]", b"{}", b'{"name": 3}'):
        with pytest.raises(RejectError) as ei:
            trust.unverified_name(bad)
        assert ei.value.code is ReasonCode.MANIFEST_INVALID


def test_rollback_to_an_installed_version_needs_its_key_still_trusted() -> None:
    m = manifest()
    digests = {"model.onnx": "0" * 64}
    facts = DeviceFacts(installed_version="2.0.0", allow_version="1.2.0")
    v = trust.check_installed(m, SIGNER_ID, digests, STORE, facts, NOW)
    assert (v.key_id, v.digests, v.providers) == (SIGNER_ID, digests, ["CPUExecutionProvider"])
    # The signer's key was removed from the trust store since the version was installed.
    gone = TrustStore([STRANGER.public_key()])
    with pytest.raises(RejectError) as ei:
        trust.check_installed(m, SIGNER_ID, digests, gone, facts, NOW)
    assert ei.value.code is ReasonCode.UNTRUSTED_KEY
    revoked = TrustStore(STORE.trusted_keys, {SIGNER_ID})
    with pytest.raises(RejectError) as ei:
        trust.check_installed(m, SIGNER_ID, digests, revoked, facts, NOW)
    assert ei.value.code is ReasonCode.REVOKED_KEY
    with pytest.raises(RejectError) as ei:
        trust.check_installed(m, None, digests, STORE, facts, NOW)
    assert ei.value.code is ReasonCode.UNTRUSTED_KEY
    with pytest.raises(RejectError) as ei:  # and the policy still applies
        trust.check_installed(m, SIGNER_ID, digests, STORE, replace(facts, allow_version=None), NOW)
    assert ei.value.code is ReasonCode.VERSION_NOT_NEWER
