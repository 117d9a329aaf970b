"""ECDSA P-256 signing keys: generation and loading (files, passphrases).

How a key is named (its key id) is a wire format: `edgefleet.wire.keyid`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.wire.atomic import atomic_write_bytes
from edgefleet.wire.keyid import key_id, public_pem

__all__ = [
    "KeyError_",
    "KeyPair",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "passphrase_from_env",
    "public_pem",
]


class KeyError_(ValueError):
    """A key file that cannot be used, with the reason."""


@dataclass(frozen=True)
class KeyPair:
    key_id: str
    private_path: Path
    public_path: Path


def generate_keypair(
    out_dir: Path, name: str = "edgefleet", passphrase: str | None = None
) -> KeyPair:
    """Write ``NAME.key`` (private, mode 0600, encrypted when a passphrase is given) and ``NAME.pub``."""
    if not name or "/" in name or name.startswith("."):
        raise KeyError_(f"bad key name {name!r}: use a plain file stem")
    out_dir.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode())
        if passphrase
        else serialization.NoEncryption()
    )
    priv_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    priv_path, pub_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    if priv_path.exists():
        raise KeyError_(f"refusing to overwrite existing key {priv_path}")
    atomic_write_bytes(priv_path, priv_pem, mode=0o600)
    atomic_write_bytes(pub_path, public_pem(private.public_key()), mode=0o644)
    return KeyPair(key_id(private.public_key()), priv_path, pub_path)


def load_private_key(path: Path, passphrase: str | None = None) -> ec.EllipticCurvePrivateKey:
    """Load a PEM private key; it must be ECDSA P-256."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyError_(f"cannot read private key {path}: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(data, passphrase.encode() if passphrase else None)
    except TypeError as e:
        raise KeyError_(f"private key {path} is encrypted: give its passphrase") from e
    except ValueError as e:
        raise KeyError_(f"cannot load private key {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise KeyError_(f"private key {path} is not an ECDSA P-256 key")
    return key


def load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a PEM public key; it must be ECDSA P-256."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KeyError_(f"cannot read public key {path}: {e.strerror}") from e
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as e:
        raise KeyError_(f"cannot load public key {path}: {e}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise KeyError_(f"public key {path} is not an ECDSA P-256 key")
    return key


def passphrase_from_env(var: str | None) -> str | None:
    """The passphrase held in environment variable ``var`` (never on the command line)."""
    if not var:
        return None
    value = os.environ.get(var)
    if value is None:
        raise KeyError_(f"environment variable {var} (the key passphrase) is not set")
    return value
