"""Every reason code an agent can put in a status report, each classified once.

A code is *transient* when the same release may succeed on the same device if it is tried
again later (a dropped link, a truncated download, an interrupted swap): the controller retries
it with backoff. Every other code is *final* for that release on that device: the package, its
signature or the device's facts will not change by waiting.

Package and desired-state refusals (`edgefleet.wire.errors.RejectError`) use the same enum, so a
code means one thing wherever it is read.
"""

from __future__ import annotations

from enum import StrEnum

from edgefleet.wire.message import member_named


class ReasonCode(StrEnum):
    # --- package and desired-state verification (RejectError) ---------------------------
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
    VERSION_MISMATCH = "version_mismatch"  # the package holds another version than asked for
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    VERSION_NOT_NEWER = "version_not_newer"
    PROFILE_INCOMPATIBLE = "profile_incompatible"
    PROVIDER_MISSING = "provider_missing"
    AGENT_TOO_OLD = "agent_too_old"
    DEVICE_MISMATCH = "device_mismatch"
    REPLAYED = "replayed"
    MALFORMED = "malformed"  # a desired state that is not even a signed envelope
    # --- download ----------------------------------------------------------------------
    SOURCE_MISSING = "source_missing"
    HTTP_ERROR = "http_error"
    DOWNLOAD_INCOMPLETE = "download_incomplete"
    DOWNLOAD_FAILED = "download_failed"
    # --- device facts ------------------------------------------------------------------
    DISK_FULL = "disk_full"
    MEMORY_INSUFFICIENT = "memory_insufficient"
    # --- install, validate, activate -----------------------------------------------------
    INTEGRITY = "integrity"  # installed files no longer match their signed digests
    LOAD_FAILED = "load_failed"
    VALIDATION_ERROR = "validation_error"
    SAMPLE_MISMATCH = "sample_mismatch"
    LATENCY_GATE = "latency_gate"
    MEMORY_GATE = "memory_gate"
    ACTIVATION_FAILED = "activation_failed"
    # --- probation ---------------------------------------------------------------------
    PROBATION_ERROR_RATE = "probation_error_rate"
    PROBATION_LATENCY = "probation_latency"
    PROBATION_REPLACED = "replaced"  # the version under probation stopped serving
    INTERRUPTED_PROBATION = "interrupted_probation"  # the agent restarted during probation
    # --- shadow evaluation (docs/shadow.md): the candidate is loaded next to the serving
    # version, never serves; each is final for that release on that device ----------------
    SHADOW_MEMORY = "shadow_memory"  # not enough memory to hold the candidate beside it
    SHADOW_NO_SERVING = "shadow_no_serving"  # nothing serves the model: no traffic to mirror
    SHADOW_DROPPED = "shadow_dropped"  # the controller no longer wants the candidate
    SHADOW_EXPIRED = "shadow_expired"  # no decision came within the device's own limit
    # the controller's verdicts on a wave's shadow figures
    SHADOW_DISAGREEMENT = "shadow_disagreement"
    SHADOW_TOO_SLOW = "shadow_too_slow"
    SHADOW_NO_TRAFFIC = "shadow_no_traffic"  # the timeout came with no request compared
    # --- the agent itself --------------------------------------------------------------
    SUBMIT_REFUSED = "submit_refused"
    REMOVE_REFUSED = "remove_refused"
    INTERNAL_ERROR = "internal_error"
    RESUME_LIMIT = "resume_limit"  # the agent was interrupted in this update too many times
    # A rollback to a version committed on the device could not land (state ROLLBACK_FAILED;
    # the figures' "cause" holds the underlying code). Final: an operator must act.
    ROLLBACK_FAILED = "rollback_failed"
    # --- the controller's own, for a device that did not answer in time ------------------
    TIMEOUT = "timeout"
    # --- informational: carried by a successful report, never a failure ------------------
    CPU_FALLBACK = "cpu_fallback"
    ALREADY_INSTALLED = "already"
    # A package could not be fetched as a delta (no block list, no Range support, no earlier
    # version, a refused block): a full download follows, which alone decides the outcome.
    DELTA_UNAVAILABLE = "delta_unavailable"
    # --- download, against a hostile or broken server (TUF's endless-data and slow-retrieval
    # attacks): the download is abandoned, the release itself is not judged ---------------
    ENDLESS_DATA = "endless_data"  # the server sent more bytes than the signed size
    SLOW_RETRIEVAL = "slow_retrieval"  # below the minimum rate, or past the total deadline
    # --- the device's anti-replay state (reported as desired_rejected, never a release's
    # failure) --------------------------------------------------------------------------
    # A signed desired state whose seq is below the highest this device acted on: a replay,
    # or the controller's sequence went backwards (a database restore). `figures` carries
    # ``last_seq`` so the controller can re-issue its state above it.
    SEQ_REGRESSED = "seq_regressed"
    # The device's record of the highest seq was missing or corrupt at start; `figures` says
    # what was recovered. Anti-rollback then rests on the installed versions themselves.
    LINK_STATE_LOST = "link_state_lost"
    # --- the link: an ack from the controller (wire.mqtt.parse_ack) that the agent ignores --
    ACK_INVALID = "ack_invalid"


#: Worth another attempt of the same release on the same device, after a backoff.
TRANSIENT = frozenset(
    {
        ReasonCode.HTTP_ERROR,
        ReasonCode.DOWNLOAD_INCOMPLETE,
        ReasonCode.DOWNLOAD_FAILED,
        # A download that arrived short or altered in transit: the next one may not be.
        ReasonCode.DIGEST_MISMATCH,
        ReasonCode.SIZE_MISMATCH,
        ReasonCode.DISK_FULL,
        ReasonCode.MEMORY_INSUFFICIENT,
        ReasonCode.ACTIVATION_FAILED,
        ReasonCode.INTERNAL_ERROR,
        # A restart (power cut, deploy) during probation says nothing about the release.
        ReasonCode.INTERRUPTED_PROBATION,
        ReasonCode.TIMEOUT,
        # A server or a path that misbehaves now (too many bytes, too slow) says nothing about
        # the signed release: another attempt later, perhaps from another mirror, may succeed.
        # The controller's retry budget bounds how often an attacker can make the device try.
        ReasonCode.ENDLESS_DATA,
        ReasonCode.SLOW_RETRIEVAL,
    }
)
#: Never a failure: the report that carries it is a success with a remark.
INFORMATIONAL = frozenset(
    {ReasonCode.CPU_FALLBACK, ReasonCode.ALREADY_INSTALLED, ReasonCode.DELTA_UNAVAILABLE}
)
#: Final for this release on this device: retrying cannot help.
FINAL = frozenset(ReasonCode) - TRANSIENT - INFORMATIONAL


def parse_reason(text: object) -> ReasonCode | None:
    """The code named by ``text``, or None when it names none."""
    return member_named(ReasonCode, text)


def reason_of(text: str) -> ReasonCode | str:
    """The code named by ``text``; a code unknown here (from a newer agent) stays its text."""
    return parse_reason(text) or text


def is_transient(code: object) -> bool:
    """True for a code worth retrying; an unknown code is final (never retried blindly)."""
    parsed = parse_reason(code)
    return parsed is not None and parsed in TRANSIENT


class CaptureReason(StrEnum):
    """Every refusal on the capture path (docs/capture.md), a code each: a device's refusal to
    capture (sent by the device), and the controller's refusal of one capture record (counted
    per capture and device, never stored). All are final for that record: the controller acks
    a refused record so the device lets it go."""

    FORBIDDEN = "capture_forbidden"  # the device's config ([capture] allowed = false) forbids it
    UNKNOWN = "capture_unknown"  # no such capture, or this device is not one of its targets
    WRONG_MODEL = "capture_wrong_model"  # the record names another model than the capture's
    # a version the device neither runs nor was asked to run (its report or desired state)
    WRONG_VERSION = "capture_wrong_version"
    CLOSED = "capture_closed"  # the capture was stopped, finished or expired
    OVER_QUOTA = "capture_over_quota"  # beyond the rows asked of this device
    RATE = "capture_rate"  # faster than the capture's max_rows_per_minute allows (a flood)
    BAD_TENSOR = "capture_bad_tensor"  # dtype outside the whitelist, shape x itemsize != bytes
    TOO_LARGE = "capture_too_large"  # a record over the per-record byte cap
    BYTES_LIMIT = "capture_bytes_limit"  # the capture's (or the controller's) byte budget is spent
    MALFORMED = "capture_malformed"  # not a capture record at all


class EnrollReason(StrEnum):
    """Every refusal of `POST /api/v1/enroll` and of a certificate renewal, a code each (the
    ``detail.code`` of the HTTP answer; `edgefleet agent enroll` prints it)."""

    TOKEN_INVALID = "enroll_token_invalid"  # no such token (or not an enrollment token)
    TOKEN_USED = "enroll_token_used"  # spent by an earlier enrollment: tokens are one-time
    TOKEN_EXPIRED = "enroll_token_expired"
    DEVICE_MISMATCH = "enroll_device_mismatch"  # the token is bound to another device id
    DEVICE_EXISTS = "device_exists"  # the id is a registered device: revoke it first
    DEVICE_REVOKED = "device_revoked"  # renewal for a device cut off by `devices revoke`
    INVALID_DEVICE_ID = "invalid_device_id"  # outside the device id grammar (wire.ids)
    CSR_INVALID = "csr_invalid"  # not a CSR, bad signature, not EC P-256, extra subject
    CSR_MISMATCH = "csr_mismatch"  # the CSR's CN is not the device being enrolled/renewed
    PKI_UNAVAILABLE = "pki_unavailable"  # the controller has no CA (cannot issue)
