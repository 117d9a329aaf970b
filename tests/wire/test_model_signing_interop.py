"""Our signatures are OpenSSF Model Signing v1.0: the reference implementation agrees both ways."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgefleet.keys import KeyPair, load_public_key
from edgefleet.wire.package import RejectError, VerifyPolicy, verify_package
from edgefleet.wire.reasons import ReasonCode

model_signing = pytest.importorskip(
    "model_signing", reason="model-signing is a test dependency: pip install -e .[test]"
)


def reference_verify(keys: KeyPair, model_dir: Path) -> subprocess.CompletedProcess[str]:
    """`model_signing verify key` on an extracted package, run by this interpreter (the venv's
    bin need not be on PATH)."""
    return subprocess.run(
        [sys.executable, "-m", "model_signing", "verify", "key", "--public_key",
         str(keys.public_path), "--signature", str(model_dir / "model.sig"), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def test_reference_verifier_accepts_our_signature(
    good_package: Path, keys: KeyPair, trusted: list, tmp_path: Path
) -> None:
    out = verify_package(
        good_package, VerifyPolicy(trusted), extract_to=tmp_path / "model"
    ).extracted_to
    assert out is not None
    r = reference_verify(keys, out)
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and it notices tampering, so the check above is meaningful
    (out / "samples.npz").write_bytes(b"tampered")
    r = reference_verify(keys, out)
    assert r.returncode != 0


def test_we_accept_a_reference_signature(
    good_package: Path, keys: KeyPair, trusted: list, tmp_path: Path
) -> None:
    from model_signing import signing as ms_signing

    model_dir = tmp_path / "model"
    verify_package(good_package, VerifyPolicy(trusted), extract_to=model_dir)
    (model_dir / "model.sig").unlink()
    ms_signing.Config().use_elliptic_key_signer(private_key=keys.private_path).sign(
        model_dir, model_dir / "model.sig"
    )
    pkg = tmp_path / "theirs.efpkg"
    with tarfile.open(pkg, "w") as tar:
        for p in sorted(model_dir.iterdir()):
            tar.add(p, arcname=p.name)
    v = verify_package(pkg, VerifyPolicy(trusted))
    assert v.key_id == keys.key_id
    assert set(v.member_digests) == {"manifest.json", "model.onnx", "samples.npz"}
    with pytest.raises(RejectError) as ei:
        verify_package(pkg, VerifyPolicy([]))
    assert ei.value.code == ReasonCode.UNTRUSTED_KEY


def test_key_ids_match_reference_hint(good_package: Path, keys: KeyPair) -> None:
    import json

    with tarfile.open(good_package) as tar:
        f = tar.extractfile("model.sig")
        assert f is not None
        bundle = json.loads(f.read())
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == keys.key_id
    assert keys.key_id == __import__("edgefleet.keys", fromlist=["key_id"]).key_id(
        load_public_key(keys.public_path)
    )
