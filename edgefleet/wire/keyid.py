"""How a public key is named on the wire: signatures, desired states and revocation lists.

The key id is the sha256 (hex) of the public key's SubjectPublicKeyInfo PEM: the same value that
OpenSSF model_signing records as the public-key hint of its bundles, so both tools name a key alike.

Its one canonical form is 64 lower-case hex digits. Every place that takes a key id from a person
or a file (a revocation list, ``--revoked``) reads it with :func:`canonical_key_id`, which accepts
upper case and surrounding blanks (the same id, spelled differently) and refuses anything else with
a reason, so a revocation can never silently name no key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.wire.ids import KEY_ID, IdentifierError

SHORT_ID_LEN = 16  # what `edgefleet verify` prints after "signed by"
_HEX = re.compile(r"[0-9a-f]+", re.ASCII)


class KeyIdError(IdentifierError):
    """A key id that is not one; the message says what a key id is."""


def public_pem(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """sha256 hex of the SubjectPublicKeyInfo PEM."""
    return hashlib.sha256(public_pem(public_key)).hexdigest()


def short_key_id(kid: str) -> str:
    """The display form (first 16 hex digits); never accepted back as a key id."""
    return kid[:SHORT_ID_LEN]


def canonical_key_id(text: object) -> str:
    """The canonical key id (64 lower-case hex digits) that ``text`` spells, or
    :class:`KeyIdError` saying why it names no key."""
    if not isinstance(text, str):
        raise KeyIdError(KEY_ID, text, f"is not a string ({type(text).__name__})")
    kid = text.strip(" \t\r\n").lower()
    if len(kid) == 64 and _HEX.fullmatch(kid):
        return kid
    if len(kid) == SHORT_ID_LEN and _HEX.fullmatch(kid):
        raise KeyIdError(
            KEY_ID,
            text,
            "is the 16-digit short form that `edgefleet verify` prints; give the full 64-digit "
            "key id (`edgefleet verify --json` or `edgefleet keygen` print it)",
        )
    raise KeyIdError(KEY_ID, text)


def canonical_key_ids(texts: Iterable[object]) -> frozenset[str]:
    """A revocation list in canonical form; one bad entry refuses the whole list."""
    if isinstance(texts, str | bytes):
        raise KeyIdError(KEY_ID, texts, "list is a single string, not a list of key ids")
    return frozenset(canonical_key_id(t) for t in texts)
