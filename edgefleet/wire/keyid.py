"""How a public key is named on the wire: signatures, desired states and revocation lists.

The key id is the sha256 (hex) of the public key's SubjectPublicKeyInfo PEM: the same value that
OpenSSF model_signing records as the public-key hint of its bundles, so both tools name a key alike.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """sha256 hex of the SubjectPublicKeyInfo PEM."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()
