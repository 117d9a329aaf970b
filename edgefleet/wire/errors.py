"""Rejection reasons: every refusal of a package or a desired state names one of these codes."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class RejectCode(StrEnum):
    TOO_LARGE = "too_large"
    NOT_A_PACKAGE = "not_a_package"
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    UNTRUSTED_KEY = "untrusted_key"
    REVOKED_KEY = "revoked_key"
    MEMBER_UNPINNED = "member_unpinned"
    MEMBER_MISSING = "member_missing"
    DIGEST_MISMATCH = "digest_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    UNSAFE_PATH = "unsafe_path"
    LINK_MEMBER = "link_member"
    DUPLICATE_MEMBER = "duplicate_member"
    MANIFEST_INVALID = "manifest_invalid"
    NAME_MISMATCH = "name_mismatch"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    VERSION_NOT_NEWER = "version_not_newer"
    PROFILE_INCOMPATIBLE = "profile_incompatible"
    PROVIDER_MISSING = "provider_missing"
    AGENT_TOO_OLD = "agent_too_old"
    DEVICE_MISMATCH = "device_mismatch"
    REPLAYED = "replayed"


class RejectError(Exception):
    """A refusal with a machine-readable code and a message a person can act on."""

    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message}


class ReplayError(RejectError):
    """A desired state whose sequence number is not newer than the last one acted on."""

    def __init__(self, message: str) -> None:
        super().__init__(RejectCode.REPLAYED, message)
