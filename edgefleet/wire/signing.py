"""OpenSSF Model Signing v1.0 signatures, made and checked with ``cryptography``.

A signature is a Sigstore bundle (v0.3, JSON) holding a DSSE envelope whose payload is an in-toto
Statement v1 with predicate ``https://model_signing/signature/v1.0``: one resource per signed file
with its sha256, and a subject whose digest is the sha256 over the resources' raw digests in name
order. The DSSE signature is ECDSA P-256/SHA-256 over the PAE encoding of the payload. The standard
``model_signing verify key`` command accepts these bundles over the extracted package directory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.wire.errors import RejectError
from edgefleet.wire.keyid import KeyIdError, canonical_key_ids, key_id
from edgefleet.wire.message import loads_bounded
from edgefleet.wire.reasons import ReasonCode

BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
SIGNATURE_FILE = "model.sig"
MAX_BUNDLE_BYTES = 4 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)  # whole string: fullmatch


@dataclass(frozen=True)
class SignedContent:
    """What a valid signature vouches for."""

    key_id: str
    model_name: str
    digests: dict[str, str]  # resource name -> sha256 hex


def key_ids(keys: Iterable[ec.EllipticCurvePublicKey]) -> set[str]:
    """The ids of ``keys``, as a bundle names its signer."""
    return {key_id(k) for k in keys}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding."""
    return b"DSSEv1 %d %s %d %s" % (
        len(payload_type.encode()),
        payload_type.encode(),
        len(payload),
        payload,
    )


def root_digest(digests: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(bytes.fromhex(digests[name]))
    return h.hexdigest()


def make_statement(model_name: str, digests: Mapping[str, str]) -> dict[str, Any]:
    """The in-toto statement listing every signed file with its sha256."""
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": model_name, "digest": {"sha256": root_digest(digests)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "resources": [
                {"name": name, "algorithm": "sha256", "digest": digests[name]}
                for name in sorted(digests)
            ],
            "serialization": {
                "method": "files",
                "hash_type": "sha256",
                "allow_symlinks": False,
                "ignore_paths": [SIGNATURE_FILE],
            },
        },
    }


def sign(
    model_name: str, digests: Mapping[str, str], private_key: ec.EllipticCurvePrivateKey
) -> bytes:
    """A Sigstore bundle (JSON bytes) signing ``digests`` (file name -> sha256 hex)."""
    for name, digest in digests.items():
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise ValueError(f"digest of {name!r} is not a sha256 hex string")
    payload = json.dumps(make_statement(model_name, digests), indent=2).encode()
    sig = private_key.sign(pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    bundle = {
        "mediaType": BUNDLE_MEDIA_TYPE,
        "verificationMaterial": {
            "publicKey": {"hint": key_id(private_key.public_key())},
            "tlogEntries": [],
        },
        "dsseEnvelope": {
            "payload": base64.b64encode(payload).decode(),
            "payloadType": PAYLOAD_TYPE,
            "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}],
        },
    }
    return json.dumps(bundle, indent=2).encode()


def _invalid(msg: str) -> RejectError:
    return RejectError(ReasonCode.SIGNATURE_INVALID, msg)


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise _invalid(f"{what} is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _invalid(f"{what} is not valid base64") from e


def verify(
    bundle_bytes: bytes,
    trusted_keys: Collection[ec.EllipticCurvePublicKey],
    revoked_key_ids: Collection[str] = (),
) -> SignedContent:
    """Check a bundle against trusted keys; return what it signs or raise :class:`RejectError`."""
    if len(bundle_bytes) > MAX_BUNDLE_BYTES:
        raise RejectError(ReasonCode.TOO_LARGE, f"signature bundle over {MAX_BUNDLE_BYTES} bytes")
    try:
        bundle = loads_bounded(bundle_bytes)
    except ValueError as e:  # not JSON, too deep, an integer of 5000 digits, NaN
        raise _invalid(f"signature bundle is not acceptable JSON: {e}") from e
    if not isinstance(bundle, dict) or bundle.get("mediaType") != BUNDLE_MEDIA_TYPE:
        raise _invalid(f"not a Sigstore bundle of media type {BUNDLE_MEDIA_TYPE}")
    env = bundle.get("dsseEnvelope")
    if not isinstance(env, dict):
        raise _invalid("bundle holds no DSSE envelope")
    if env.get("payloadType") != PAYLOAD_TYPE:
        raise _invalid(f"DSSE payload type is {env.get('payloadType')!r}, not {PAYLOAD_TYPE}")
    sigs = env.get("signatures")
    if not isinstance(sigs, list) or len(sigs) != 1 or not isinstance(sigs[0], dict):
        raise _invalid("DSSE envelope must hold exactly one signature")
    payload = _b64(env.get("payload"), "DSSE payload")
    signature = _b64(sigs[0].get("sig"), "DSSE signature")

    try:
        revoked_key_ids = canonical_key_ids(revoked_key_ids)
    except KeyIdError as e:  # a revocation list that names no key must not pass silently
        raise RejectError(ReasonCode.REVOKED_KEY, f"revocation list refused: {e}") from e
    by_id = {key_id(k): k for k in trusted_keys}
    material = bundle.get("verificationMaterial")
    hint = None
    if isinstance(material, dict) and isinstance(material.get("publicKey"), dict):
        hint = material["publicKey"].get("hint") or None
    if hint is not None and (not isinstance(hint, str) or not _HEX64.fullmatch(hint)):
        raise _invalid("the bundle's public-key hint is not a key id (64 lower-case hex digits)")
    if hint is not None and hint in revoked_key_ids:
        raise RejectError(ReasonCode.REVOKED_KEY, f"signed with revoked key {hint}")
    candidates = [(hint, by_id[hint])] if hint in by_id else []
    if hint is None:
        candidates = list(by_id.items())
    if not candidates:
        raise RejectError(
            ReasonCode.UNTRUSTED_KEY,
            f"signed with key {hint} which is not among the {len(by_id)} trusted key(s)",
        )
    message = pae(PAYLOAD_TYPE, payload)
    signer = None
    for kid, key in candidates:
        try:
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        signer = kid
        break
    if signer is None:
        raise _invalid("the signature does not verify with the trusted key")
    if signer in revoked_key_ids:
        raise RejectError(ReasonCode.REVOKED_KEY, f"signed with revoked key {signer}")
    return SignedContent(signer, *_parse_statement(payload))


def _parse_statement(payload: bytes) -> tuple[str, dict[str, str]]:
    try:
        st = loads_bounded(payload)
    except ValueError as e:
        raise _invalid(f"signed statement is not acceptable JSON: {e}") from e
    if not isinstance(st, dict) or st.get("_type") != STATEMENT_TYPE:
        raise _invalid("signed payload is not an in-toto Statement v1")
    if st.get("predicateType") != PREDICATE_TYPE:
        raise _invalid(f"predicate type is {st.get('predicateType')!r}, not {PREDICATE_TYPE}")
    subjects = st.get("subject")
    if not isinstance(subjects, list) or len(subjects) != 1 or not isinstance(subjects[0], dict):
        raise _invalid("statement must have exactly one subject")
    subject = subjects[0]
    predicate = st.get("predicate")
    resources = predicate.get("resources") if isinstance(predicate, dict) else None
    if not isinstance(resources, list):
        raise _invalid("statement predicate has no resources list")
    digests: dict[str, str] = {}
    for r in resources:
        if not isinstance(r, dict) or not isinstance(r.get("name"), str):
            raise _invalid("malformed resource in statement")
        if r.get("algorithm") != "sha256" or not _HEX64.fullmatch(str(r.get("digest", ""))):
            raise _invalid(f"resource {r['name']!r} is not pinned by a sha256 digest")
        if r["name"] in digests:
            raise _invalid(f"resource {r['name']!r} listed twice")
        digests[r["name"]] = r["digest"]
    digest = subject.get("digest")
    if not isinstance(digest, dict):
        raise _invalid("statement subject has no digest object")
    expected = digest.get("sha256")
    if expected != root_digest(digests):
        raise _invalid("subject digest does not match the listed resources")
    return str(subject.get("name", "")), digests
