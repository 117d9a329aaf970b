"""``manifest.json``: the package's self-description, and its validation.

Validation is hand-written (no schema library on the gateway) and names the first field that is
wrong. Unknown extra fields are allowed so that newer packagers can add information.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

from edgefleet.wire import ids
from edgefleet.wire.blocks import check_blocks
from edgefleet.wire.errors import RejectError
from edgefleet.wire.message import json_problem
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.semver import InvalidVersion, parse_version

FORMAT = "edgefleet.package/v1"
MAX_MANIFEST_DEPTH = 16  # a real manifest nests 4 levels
MANIFEST_FILE = "manifest.json"
# Whole-string patterns (fullmatch; ``$`` would let a trailing newline through), ASCII only.
# Anchored with \Z so that callers using .match() get the same answer as the grammar.
NAME_RE = re.compile(rf"\A(?:{ids.MODEL_NAME.pattern.pattern})\Z", re.ASCII)
PROFILE_RE = re.compile(rf"\A(?:{ids.PROFILE.pattern.pattern})\Z", re.ASCII)
MEMBER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}", re.ASCII)
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)


def package_filename(name: str, version: str, profile: str) -> str:
    return f"{name}-{version}-{profile}.efpkg"


def now_utc() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    """RFC 3339 time; naive times are refused because the device must compare them to its clock."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError(f"time {value!r} has no time zone")
    return t


def _bad(field: str, why: str) -> RejectError:
    return RejectError(ReasonCode.MANIFEST_INVALID, f"manifest field {field!r} {why}")


def _req(obj: dict[str, Any], field: str, kind: type | tuple[type, ...], path: str = "") -> Any:
    full = f"{path}{field}"
    if field not in obj:
        raise _bad(full, "is missing")
    value = obj[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(full, f"has the wrong type {type(value).__name__}")
    return value


def _tensor_specs(specs: Any, field: str) -> None:
    if not isinstance(specs, list) or not specs:
        raise _bad(field, "must be a non-empty list")
    for i, s in enumerate(specs):
        if not isinstance(s, dict):
            raise _bad(f"{field}[{i}]", "must be an object")
        _req(s, "name", str, f"{field}[{i}].")
        _req(s, "dtype", str, f"{field}[{i}].")
        shape = _req(s, "shape", list, f"{field}[{i}].")
        for d in shape:
            if not (d is None or isinstance(d, str) or (isinstance(d, int) and d >= 0)):
                raise _bad(f"{field}[{i}].shape", f"has a bad dimension {d!r}")


def validate_manifest(m: Any) -> dict[str, Any]:
    """Check the manifest's structure; return it unchanged or raise ``MANIFEST_INVALID``."""
    if not isinstance(m, dict):
        raise RejectError(ReasonCode.MANIFEST_INVALID, "manifest is not a JSON object")
    problem = json_problem(m, MAX_MANIFEST_DEPTH)
    if problem is not None:  # deep nesting, NaN/Infinity, NUL, integers beyond int64
        raise RejectError(ReasonCode.MANIFEST_INVALID, f"manifest {problem}")
    if m.get("format") != FORMAT:
        raise _bad("format", f"is {m.get('format')!r}, expected {FORMAT!r}")
    for field, grammar in (("name", ids.MODEL_NAME), ("profile", ids.PROFILE)):
        try:
            ids.check(grammar, _req(m, field, str))
        except ids.IdentifierError as e:
            raise _bad(field, str(e)) from e
    for field in ("version", "min_agent_version"):
        try:
            parse_version(_req(m, field, str))
        except InvalidVersion as e:
            raise _bad(field, str(e)) from e
    try:
        parse_time(_req(m, "created", str))
        if m.get("expires") is not None:
            parse_time(_req(m, "expires", str))
    except ValueError as e:
        raise _bad("created/expires", f"is not an RFC 3339 time: {e}") from e
    members = _req(m, "members", dict)
    if not members:
        raise _bad("members", "is empty")
    for name, info in members.items():
        if (
            not isinstance(name, str)
            or not MEMBER_RE.fullmatch(name)
            or name in (MANIFEST_FILE, "model.sig")
        ):
            raise _bad(f"members.{name}", "is not an allowed member name")
        if not isinstance(info, dict):
            raise _bad(f"members.{name}", "must be an object")
        if not _HEX64.fullmatch(str(info.get("sha256", ""))):
            raise _bad(f"members.{name}.sha256", "is not a sha256 hex digest")
        size = info.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _bad(f"members.{name}.size", "is not a non-negative integer")
        if info.get("blocks") is not None:  # content addresses for delta updates (wire.blocks)
            check_blocks(info["blocks"], size, f"members.{name}.blocks")
    model = _req(m, "model", dict)
    model_file = _req(model, "file", str, "model.")
    if model_file not in members:
        raise _bad("model.file", f"names {model_file!r}, which is not a member")
    external = model.get("external_data", []) or []
    if not isinstance(external, list):
        raise _bad("model.external_data", "must be a list of member names")
    for ext in external:
        if not isinstance(ext, str) or ext not in members:
            raise _bad("model.external_data", f"names {ext!r}, which is not a member")
    io = _req(m, "io", dict)
    _tensor_specs(io.get("inputs"), "io.inputs")
    _tensor_specs(io.get("outputs"), "io.outputs")
    eps = _req(m, "execution_providers", list)
    if not eps:
        raise _bad("execution_providers", "is empty")
    for i, ep in enumerate(eps):
        if not isinstance(ep, dict) or not isinstance(ep.get("name"), str):
            raise _bad(f"execution_providers[{i}]", "must be an object with a name")
        if not isinstance(ep.get("options", {}), dict):
            raise _bad(f"execution_providers[{i}].options", "must be an object")
    _req(m, "cpu_fallback", bool)
    gates = _req(m, "gates", dict)
    for g, v in gates.items():
        if v is not None and (
            not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v)
        ):
            raise _bad(f"gates.{g}", "must be a finite number or null")
    for opt in ("quantization", "validation", "benchmark", "drift_reference", "lineage"):
        if opt in m and m[opt] is not None and not isinstance(m[opt], dict):
            raise _bad(opt, "must be an object")
    return m
