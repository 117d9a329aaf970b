"""Every rejection of the shared verifier, each with a real (re)written package."""

from __future__ import annotations

import json
import os
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgefleet.keys import KeyPair, load_public_key
from edgefleet.wire.manifest import format_time
from edgefleet.wire.package import RejectError, VerifyPolicy, verify_package
from edgefleet.wire.reasons import ReasonCode
from tests.support.packages import make_package
from tests.wire.tamper import edit_manifest, read_members, resign, rewrite, write_members

CPU = ["CPUExecutionProvider"]


def reject(pkg: Path, policy: VerifyPolicy, code: ReasonCode, tmp_path: Path) -> RejectError:
    target = tmp_path / "install"
    with pytest.raises(RejectError) as ei:
        verify_package(pkg, policy, extract_to=target)
    assert ei.value.code == code, ei.value
    assert ei.value.message
    # nothing half-written is left where a loader could find it
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".install")]
    return ei.value


def test_good_package_verifies_and_extracts(
    good_package: Path, trusted: list, tmp_path: Path
) -> None:
    v = verify_package(
        good_package, VerifyPolicy(trusted, available_providers=CPU), extract_to=tmp_path / "x"
    )
    assert v.manifest["name"] == "iris" and v.manifest["version"] == "1.2.0"
    assert v.providers == CPU and not v.cpu_fallback_used
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.sig",
        "samples.npz",
    ]
    assert set(v.member_digests) == {"manifest.json", "model.onnx", "samples.npz"}


def test_tampered_member(good_package: Path, trusted: list, tmp_path: Path) -> None:
    def flip(ms):  # type: ignore[no-untyped-def]
        return [
            (ti, (d[:-1] + bytes([d[-1] ^ 1])) if ti.name == "model.onnx" else d) for ti, d in ms
        ]

    bad = rewrite(good_package, tmp_path / "bad.efpkg", flip)
    err = reject(bad, VerifyPolicy(trusted), ReasonCode.DIGEST_MISMATCH, tmp_path)
    assert "model.onnx" in err.message


def test_tampered_manifest(good_package: Path, trusted: list, tmp_path: Path) -> None:
    bad = rewrite(
        good_package,
        tmp_path / "bad.efpkg",
        lambda ms: edit_manifest(ms, lambda m: m.update(version="9.9.9")),
    )
    err = reject(bad, VerifyPolicy(trusted), ReasonCode.DIGEST_MISMATCH, tmp_path)
    assert "manifest" in err.message


def test_unknown_key(good_package: Path, other_keys: KeyPair, tmp_path: Path) -> None:
    reject(
        good_package,
        VerifyPolicy([load_public_key(other_keys.public_path)]),
        ReasonCode.UNTRUSTED_KEY,
        tmp_path,
    )


def test_revoked_key(good_package: Path, keys: KeyPair, trusted: list, tmp_path: Path) -> None:
    err = reject(
        good_package,
        VerifyPolicy(trusted, revoked_key_ids={keys.key_id}),
        ReasonCode.REVOKED_KEY,
        tmp_path,
    )
    assert keys.key_id in err.message


def test_forged_signature(good_package: Path, trusted: list, tmp_path: Path) -> None:
    def forge(ms):  # type: ignore[no-untyped-def]
        out = []
        for ti, d in ms:
            if ti.name == "model.sig":
                b = json.loads(d)
                b["dsseEnvelope"]["signatures"][0]["sig"] = "MEUCIQ" + "A" * 90
                d = json.dumps(b).encode()
            out.append((ti, d))
        return out

    reject(
        rewrite(good_package, tmp_path / "bad.efpkg", forge),
        VerifyPolicy(trusted),
        ReasonCode.SIGNATURE_INVALID,
        tmp_path,
    )


def test_missing_signature(good_package: Path, trusted: list, tmp_path: Path) -> None:
    bad = rewrite(
        good_package, tmp_path / "bad.efpkg", lambda ms: [m for m in ms if m[0].name != "model.sig"]
    )
    reject(bad, VerifyPolicy(trusted), ReasonCode.SIGNATURE_MISSING, tmp_path)


def test_unpinned_member(good_package: Path, trusted: list, tmp_path: Path) -> None:
    bad = rewrite(
        good_package,
        tmp_path / "bad.efpkg",
        lambda ms: [*ms, (tarfile.TarInfo("extra.so"), b"\x7fELF")],
    )
    err = reject(bad, VerifyPolicy(trusted), ReasonCode.MEMBER_UNPINNED, tmp_path)
    assert "extra.so" in err.message


def test_missing_member(good_package: Path, trusted: list, tmp_path: Path) -> None:
    bad = rewrite(
        good_package,
        tmp_path / "bad.efpkg",
        lambda ms: [m for m in ms if m[0].name != "samples.npz"],
    )
    reject(bad, VerifyPolicy(trusted), ReasonCode.MEMBER_MISSING, tmp_path)


@pytest.mark.parametrize(
    "name", ["../evil.onnx", "/etc/cron.d/evil", "sub/../../evil", "C:evil", "dir/model.onnx"]
)
def test_unsafe_paths(good_package: Path, trusted: list, tmp_path: Path, name: str) -> None:
    bad = rewrite(
        good_package, tmp_path / "bad.efpkg", lambda ms: [*ms, (tarfile.TarInfo(name), b"x")]
    )
    reject(bad, VerifyPolicy(trusted), ReasonCode.UNSAFE_PATH, tmp_path)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_link_members(good_package: Path, trusted: list, tmp_path: Path, kind: bytes) -> None:
    link = tarfile.TarInfo("evil")
    link.type, link.linkname = kind, "/etc/passwd"
    bad = rewrite(good_package, tmp_path / "bad.efpkg", lambda ms: [*ms, (link, None)])
    reject(bad, VerifyPolicy(trusted), ReasonCode.LINK_MEMBER, tmp_path)


def test_duplicate_member(good_package: Path, trusted: list, tmp_path: Path) -> None:
    def dup(ms):  # type: ignore[no-untyped-def]
        return [*ms, (tarfile.TarInfo("model.onnx"), b"not the signed model")]

    reject(
        rewrite(good_package, tmp_path / "bad.efpkg", dup),
        VerifyPolicy(trusted),
        ReasonCode.DUPLICATE_MEMBER,
        tmp_path,
    )


def test_oversize_package_and_member(good_package: Path, trusted: list, tmp_path: Path) -> None:
    size = good_package.stat().st_size
    reject(
        good_package,
        VerifyPolicy(trusted, max_package_bytes=size - 1),
        ReasonCode.TOO_LARGE,
        tmp_path,
    )
    reject(
        good_package, VerifyPolicy(trusted, max_member_bytes=100), ReasonCode.TOO_LARGE, tmp_path
    )


def test_truncated_and_garbage(good_package: Path, trusted: list, tmp_path: Path) -> None:
    data = good_package.read_bytes()
    trunc = tmp_path / "trunc.efpkg"
    # cut inside a member's data (a cut at or inside a header reads as a shorter archive whose
    # signed members are missing: member_missing, also a refusal)
    with tarfile.open(good_package) as t:
        model = t.getmember("model.onnx")
    trunc.write_bytes(data[: model.offset_data + model.size // 2])
    reject(trunc, VerifyPolicy(trusted), ReasonCode.NOT_A_PACKAGE, tmp_path)
    junk = tmp_path / "junk.efpkg"
    junk.write_bytes(os.urandom(4096))
    reject(junk, VerifyPolicy(trusted), ReasonCode.NOT_A_PACKAGE, tmp_path)


def test_signed_but_invalid_manifest(
    good_package: Path, keys: KeyPair, trusted: list, tmp_path: Path
) -> None:
    bad = rewrite(
        good_package,
        tmp_path / "bad.efpkg",
        lambda ms: resign(edit_manifest(ms, lambda m: m.update(version="one")), keys),
    )
    err = reject(bad, VerifyPolicy(trusted), ReasonCode.MANIFEST_INVALID, tmp_path)
    assert "version" in err.message


def test_signed_manifest_lying_about_size(
    good_package: Path, keys: KeyPair, trusted: list, tmp_path: Path
) -> None:
    def lie(m: dict) -> None:
        m["members"]["samples.npz"]["size"] += 1
        m["members"]["samples.npz"].pop("blocks", None)  # else its block list no longer tiles it

    bad = rewrite(
        good_package, tmp_path / "bad.efpkg", lambda ms: resign(edit_manifest(ms, lie), keys)
    )
    reject(bad, VerifyPolicy(trusted), ReasonCode.SIZE_MISMATCH, tmp_path)


def test_expired_and_not_yet_valid(keys: KeyPair, trusted: list, tmp_path: Path) -> None:
    past = format_time(datetime.now(UTC) - timedelta(days=1))
    old = make_package(tmp_path / "a", name="iris", version="1.0.0", key=keys, expires=past)
    reject(old, VerifyPolicy(trusted), ReasonCode.EXPIRED, tmp_path)
    future = format_time(datetime.now(UTC) + timedelta(days=1))
    early = make_package(tmp_path / "b", name="iris", version="1.0.0", key=keys, created=future)
    reject(early, VerifyPolicy(trusted), ReasonCode.NOT_YET_VALID, tmp_path)


def test_versions(good_package: Path, trusted: list, tmp_path: Path) -> None:
    reject(
        good_package,
        VerifyPolicy(trusted, installed_version="1.2.0"),
        ReasonCode.VERSION_NOT_NEWER,
        tmp_path,
    )
    reject(
        good_package,
        VerifyPolicy(trusted, installed_version="1.10.0"),
        ReasonCode.VERSION_NOT_NEWER,
        tmp_path,
    )
    verify_package(good_package, VerifyPolicy(trusted, installed_version="1.2.0-rc.1"))
    # an older version only as the exact rollback the controller asked for
    verify_package(
        good_package, VerifyPolicy(trusted, installed_version="2.0.0", allow_version="1.2.0")
    )
    reject(
        good_package,
        VerifyPolicy(trusted, installed_version="2.0.0", allow_version="1.1.0"),
        ReasonCode.VERSION_NOT_NEWER,
        tmp_path,
    )


def test_name_profile_agent(good_package: Path, trusted: list, tmp_path: Path) -> None:
    reject(
        good_package,
        VerifyPolicy(trusted, expected_name="digits"),
        ReasonCode.NAME_MISMATCH,
        tmp_path,
    )
    reject(
        good_package,
        VerifyPolicy(trusted, profiles=["cpu-arm64"]),
        ReasonCode.PROFILE_INCOMPATIBLE,
        tmp_path,
    )
    reject(
        good_package,
        VerifyPolicy(trusted, agent_version="0.0.9"),
        ReasonCode.AGENT_TOO_OLD,
        tmp_path,
    )


def test_missing_provider_and_cpu_fallback(keys: KeyPair, trusted: list, tmp_path: Path) -> None:
    cuda = [
        {"name": "CUDAExecutionProvider", "options": {}},
        {"name": "CPUExecutionProvider", "options": {}},
    ]
    strict = make_package(
        tmp_path / "a",
        name="iris",
        version="1.0.0",
        key=keys,
        profile="gpu-cuda",
        providers=cuda,
        cpu_fallback=False,
    )
    err = reject(
        strict,
        VerifyPolicy(trusted, available_providers=CPU),
        ReasonCode.PROVIDER_MISSING,
        tmp_path,
    )
    assert "CUDAExecutionProvider" in err.message
    lenient = make_package(
        tmp_path / "b",
        name="iris",
        version="1.0.0",
        key=keys,
        profile="gpu-cuda",
        providers=cuda,
        cpu_fallback=True,
    )
    v = verify_package(lenient, VerifyPolicy(trusted, available_providers=CPU))
    assert v.cpu_fallback_used and v.providers == CPU
    v = verify_package(
        lenient, VerifyPolicy(trusted, available_providers=["CUDAExecutionProvider", *CPU])
    )
    assert not v.cpu_fallback_used and v.providers == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_extract_target_must_not_exist(good_package: Path, trusted: list, tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(FileExistsError):
        verify_package(good_package, VerifyPolicy(trusted), extract_to=tmp_path / "x")


def test_rewritten_identical_package_still_verifies(
    good_package: Path, trusted: list, tmp_path: Path
) -> None:
    """The tamper helpers themselves do not break a package (so the rejections above are real)."""
    same = write_members(tmp_path / "same.efpkg", read_members(good_package))
    verify_package(same, VerifyPolicy(trusted))


# --------------------------------------------------------------------------- crafted JSON


def _with_hint(members: list, hint: object) -> list:
    out = []
    for ti, d in members:
        if ti.name == "model.sig" and d is not None:
            b = json.loads(d)
            b["verificationMaterial"]["publicKey"]["hint"] = hint
            d = json.dumps(b).encode()
        out.append((ti, d))
    return out


def _deep_manifest(members: list) -> list:
    out = []
    for ti, d in members:
        if ti.name == "manifest.json" and d is not None:
            d = d.rstrip()[:-1] + b',"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        out.append((ti, d))
    return out


def _cli(*args: str) -> tuple[int, str]:
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "edgefleet", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("hint", [["a", "b"], {"k": "v"}, 7, [[[]]]])
def test_key_hint_of_the_wrong_type_is_a_clean_rejection(
    good_package: Path, keys: KeyPair, trusted: list, tmp_path: Path, hint: object
) -> None:
    pkg = rewrite(good_package, tmp_path / "h.efpkg", lambda ms: _with_hint(ms, hint))
    for revoked in (set(), {"0" * 64}):  # a set made `hint in revoked` raise TypeError
        e = reject(
            pkg,
            VerifyPolicy(trusted, revoked_key_ids=revoked),
            ReasonCode.SIGNATURE_INVALID,
            tmp_path,
        )
        assert "hint" in e.message
    code, out = _cli("verify", str(pkg), "--trust", str(keys.public_path), "--revoked", "0" * 64)
    assert code == 1 and "signature_invalid" in out and "Traceback" not in out, out


def test_deeply_nested_manifest_is_a_clean_rejection(
    good_package: Path, keys: KeyPair, trusted: list, tmp_path: Path
) -> None:
    """Signed or not, a manifest nested 100,000 deep is refused as manifest_invalid by the
    verifier, ``verify`` and ``inspect`` (no RecursionError)."""
    pkg = rewrite(good_package, tmp_path / "d.efpkg", lambda ms: resign(_deep_manifest(ms), keys))
    e = reject(pkg, VerifyPolicy(trusted), ReasonCode.MANIFEST_INVALID, tmp_path)
    assert "deeper" in e.message
    for args in (["verify", str(pkg), "--trust", str(keys.public_path)], ["inspect", str(pkg)]):
        code, out = _cli(*args)
        assert code == 1 and "manifest_invalid" in out and "Traceback" not in out, out
