"""The one grammar of every identifier that reaches a file, a topic, a label or a log.

Device ids, group and tag names, model names, hardware profile ids, versions and key ids are
written into Mosquitto's password and ACL files, MQTT topic levels, file names, Prometheus labels
and log lines. Each has a strict grammar of printable ASCII, checked at every entry point (the
controller's API and CLI, the package manifest, the desired-state builder, the agent's config) and
again where a file is generated; a value outside it is refused, never escaped or trimmed.

The grammars (docs/limits.md, "Identifiers", is their documentation):

- device id: ``[A-Za-z0-9][A-Za-z0-9._-]*``, 1-128 characters;
- group and tag names: the same, 1-64;
- model name and API token name: the same, 1-128;
- hardware profile id: ``[a-z0-9][a-z0-9_-]*``, 1-64;
- version: semantic version 2.0.0 in ASCII digits, without leading zeros, up to 128;
- key id: ``[0-9a-f]{64}`` (the sha256 of the public key PEM).

No identifier may contain a space, a control character (newline, NUL), ``:`` (the password
file's separator), ``/ + #`` (MQTT topic syntax) or a non-ASCII character (Unicode digits such as
``"١"`` would otherwise read as numbers). The device id ``edgefleet-controller`` is reserved for
the controller's own broker user. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

CONTROLLER_USER = "edgefleet-controller"
RESERVED_DEVICE_IDS = frozenset({CONTROLLER_USER})


@dataclass(frozen=True)
class Grammar:
    kind: str  # "device id", as the refusal names it
    code: str  # the API's refusal code, e.g. "invalid_device_id"
    pattern: re.Pattern[str]
    spelled: str  # the grammar as documentation and refusals print it
    max_len: int


def _g(kind: str, code: str, regex: str, spelled: str, max_len: int) -> Grammar:
    return Grammar(kind, code, re.compile(regex, re.ASCII), spelled, max_len)


_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_LABEL = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_NAME_SPELLED = "ASCII letters, digits, '.', '_' and '-', starting with a letter or digit"
DEVICE_ID = _g("device id", "invalid_device_id", _NAME, _NAME_SPELLED, 128)
GROUP = _g("group name", "invalid_group", _LABEL, _NAME_SPELLED, 64)
TAG = _g("tag name", "invalid_tag", _LABEL, _NAME_SPELLED, 64)
MODEL_NAME = _g("model name", "invalid_model_name", _NAME, _NAME_SPELLED, 128)
PROFILE = _g(
    "profile id",
    "invalid_profile",
    r"[a-z0-9][a-z0-9_-]{0,63}",
    "lower-case ASCII letters, digits, '_' and '-', starting with a letter or digit",
    64,
)
KEY_ID = _g(
    "key id",
    "invalid_key_id",
    r"[0-9a-f]{64}",
    "64 lower-case hex digits (the sha256 of the public key PEM)",
    64,
)
# A controller replica (its lease holder name and MQTT client id suffix).
REPLICA_ID = _g("replica id", "invalid_replica_id", _LABEL, _NAME_SPELLED, 64)
TOKEN_NAME = _g("token name", "invalid_token_name", _NAME, _NAME_SPELLED, 128)
_NUM = r"(?:0|[1-9][0-9]*)"
_PRE_ID = r"(?:0|[1-9][0-9]*|[0-9]*[A-Za-z-][0-9A-Za-z-]*)"
SEMVER_RE = re.compile(
    rf"({_NUM})\.({_NUM})\.({_NUM})"
    rf"(?:-({_PRE_ID}(?:\.{_PRE_ID})*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?",
    re.ASCII,
)
VERSION = Grammar(
    "version",
    "invalid_version",
    SEMVER_RE,
    "a semantic version MAJOR.MINOR.PATCH[-PRE][+BUILD] in ASCII digits, without leading zeros",
    128,
)


class IdentifierError(ValueError):
    """A value outside its identifier grammar; the message names the grammar."""

    def __init__(self, grammar: Grammar, value: object, why: str | None = None) -> None:
        self.grammar = grammar
        self.value = value
        self.code = grammar.code
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(
            f"{grammar.kind} {shown} "
            + (
                why
                or f"does not match the {grammar.kind} grammar: {grammar.spelled}, "
                f"1-{grammar.max_len} characters"
            )
        )


def check(grammar: Grammar, value: object) -> str:
    """``value`` when it matches ``grammar`` as a whole; else :class:`IdentifierError`."""
    if not isinstance(value, str):
        raise IdentifierError(grammar, value, f"is not a string ({type(value).__name__})")
    if not 1 <= len(value) <= grammar.max_len or grammar.pattern.fullmatch(value) is None:
        raise IdentifierError(grammar, value)
    return value


def device_id(value: object) -> str:
    dev = check(DEVICE_ID, value)
    if dev in RESERVED_DEVICE_IDS:
        raise IdentifierError(DEVICE_ID, value, "is reserved for the controller")
    return dev


def group(value: object) -> str:
    return check(GROUP, value)


def tag(value: object) -> str:
    return check(TAG, value)


def model_name(value: object) -> str:
    return check(MODEL_NAME, value)


def profile(value: object) -> str:
    return check(PROFILE, value)


def token_name(value: object) -> str:
    return check(TOKEN_NAME, value)


def replica_id(value: object) -> str:
    return check(REPLICA_ID, value)


def version(value: object) -> str:
    return check(VERSION, value)


def key_id(value: object) -> str:
    return check(KEY_ID, value)


def labels(grammar: Grammar, values: object) -> list[str]:
    """A list of group or tag names, each checked; sorted and without repeats."""
    if not isinstance(values, list | tuple):
        raise IdentifierError(grammar, values, "list is not a list")
    return sorted({check(grammar, v) for v in values})


def is_valid(grammar: Grammar, value: object) -> bool:
    try:
        check(grammar, value)
    except IdentifierError:
        return False
    return True
