"""Hardware profiles (``hardware_profiles/*.toml``): loading and schema validation.

A profile names the execution providers (with options) a device runs, the quantization
candidates the packager may build for it, the accuracy gate a candidate must meet against the
source model, the device gates the agent checks on the hardware, and whether the CPU provider is
an acceptable fallback there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.hardware_profiles import (
    ProfileFileError,
    profile_facts,
    profile_files,
    profiles_dir,
    read_profile_file,
)
from edgefleet.packager.backends.verify import CONSTRAINT_FIELDS, Constraints
from edgefleet.packager.recipe import Recipe, RecipeError, parse_recipe


class ProfileError(ValueError):
    """A profile file is missing or invalid; the message names the file and field."""


@dataclass(frozen=True)
class ExecutionProvider:
    name: str
    options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}


@dataclass(frozen=True)
class AccuracyGate:
    """What a candidate must reach against the source model on the validation data.

    ``max_accuracy_drop`` is in accuracy points (fraction, 0.01 = 1 point) and applies only when
    the validation data has labels; ``min_agreement`` is top-1 agreement with the source.
    """

    min_agreement: float
    max_accuracy_drop: float
    max_abs_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_agreement": self.min_agreement,
            "max_accuracy_drop": self.max_accuracy_drop,
            "max_abs_error": self.max_abs_error,
        }


@dataclass(frozen=True)
class DeviceGates:
    """Checked by the agent on the device during VALIDATING (recorded in the manifest)."""

    max_p95_ms: float
    max_memory_mb: float
    sample_atol: float
    sample_rtol: float
    min_sample_agreement: float


#: Target properties the packager can detect on the packaging host (``= "auto"`` in ``[target]``):
#: the CPU flags that imply each. Detection describes the packaging host, which is also where
#: candidates are validated; a fleet of other CPUs declares the property instead.
AUTO_PROPERTIES = {
    "vnni": frozenset({"avx512_vnni", "avx_vnni", "amx_int8"}),
    "dotprod": frozenset({"asimddp", "i8mm"}),
}


def resolve_target(
    target: dict[str, bool | str], host_flags: list[str]
) -> dict[str, tuple[bool, str]]:
    """Each declared target property's value and where it came from (declared or detected)."""
    out: dict[str, tuple[bool, str]] = {}
    for name, value in target.items():
        if isinstance(value, bool):
            out[name] = (value, f"declared {name} = {str(value).lower()}")
        else:
            found = sorted(AUTO_PROPERTIES.get(name, frozenset()) & set(host_flags))
            out[name] = (
                bool(found),
                f"{name} = auto: detected {'from ' + ', '.join(found) if found else 'absent'}"
                " on the packaging host",
            )
    return out


def unmet_requirements(
    requires: tuple[str, ...], target: dict[str, tuple[bool, str]]
) -> str | None:
    """Why a candidate's ``requires`` does not hold on ``target`` (None when it does)."""
    for req in requires:
        name, want = req.lstrip("!"), not req.startswith("!")
        have, how = target.get(name, (False, f"{name} not declared"))
        if have != want:
            return f"needs {'a target with' if want else 'a target without'} {name} ({how})"
    return None


@dataclass(frozen=True)
class Profile:
    id: str
    description: str
    execution_providers: tuple[ExecutionProvider, ...]
    cpu_fallback: bool
    candidates: tuple[Recipe, ...]
    accuracy_gate: AccuracyGate
    device_gates: DeviceGates
    min_agent_version: str
    source: Path | None = None
    target: dict[str, bool | str] | None = None
    #: What the target's runtime accepts (``[constraints]``); every candidate's output is
    #: checked against it, combined with its recipe's own promises, before it may be signed.
    constraints: Constraints | None = None

    @property
    def provider_names(self) -> list[str]:
        return [p.name for p in self.execution_providers]

    @property
    def accelerator(self) -> bool:
        """The profile's preferred provider is not ONNX Runtime's CPU provider."""
        return self.provider_names[0] != "CPUExecutionProvider"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "description": self.description,
            "execution_providers": [p.to_dict() for p in self.execution_providers],
            "cpu_fallback": self.cpu_fallback,
            "candidates": [c.to_dict() for c in self.candidates],
            "accuracy_gate": self.accuracy_gate.to_dict(),
            "device_gates": dict(vars(self.device_gates)),
            "min_agent_version": self.min_agent_version,
            "target": dict(self.target or {}),
            "constraints": self.constraints.to_dict() if self.constraints else None,
        }


def _num(
    table: dict[str, Any], key: str, where: str, *, lo: float, hi: float | None = None
) -> float:
    value = table.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{where}: '{key}' must be a number")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ProfileError(f"{where}: '{key}' = {value} is outside {bound}")
    return float(value)


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: missing table [{key}]")
    return value


def parse_profile(raw: dict[str, Any], where: str, source: Path | None = None) -> Profile:
    """Validate one profile document; every error names the file and the field.

    The id, provider names and architecture are checked by the core loader
    (`edgefleet.hardware_profiles.profile_facts`), the one reading the agent uses too.
    """
    known = {
        "id",
        "arch",
        "description",
        "execution_providers",
        "cpu_fallback",
        "quantization",
        "accuracy_gate",
        "device_gates",
        "min_agent_version",
        "target",
        "constraints",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ProfileError(f"{where}: unknown key(s) {unknown}")
    try:
        facts = profile_facts(raw, where)
    except ProfileFileError as exc:
        raise ProfileError(str(exc)) from exc
    pid = facts.id
    if source is not None and source.stem != pid:
        raise ProfileError(f"{where}: id {pid!r} does not match the file name {source.name!r}")
    eps = []
    for i, ep in enumerate(raw["execution_providers"]):
        options = ep.get("options", {})
        if not isinstance(options, dict):
            raise ProfileError(f"{where}: execution_providers[{i}].options must be a table")
        eps.append(ExecutionProvider(ep["name"], options))
    cpu_fallback = raw.get("cpu_fallback")
    if not isinstance(cpu_fallback, bool):
        raise ProfileError(f"{where}: 'cpu_fallback' must be true or false")
    quant = _table(raw, "quantization", where)
    cands_raw = quant.get("candidates")
    if not isinstance(cands_raw, list) or not cands_raw:
        raise ProfileError(f"{where}: [[quantization.candidates]] needs at least one recipe")
    try:
        cands = tuple(
            parse_recipe(c, f"{where}: quantization.candidates[{i}]")
            for i, c in enumerate(cands_raw)
        )
    except RecipeError as exc:
        raise ProfileError(str(exc)) from exc
    ids = [c.id for c in cands]
    if len(set(ids)) != len(ids):
        raise ProfileError(f"{where}: candidate ids must be unique, got {ids}")
    target_raw = raw.get("target", {})
    if not isinstance(target_raw, dict):
        raise ProfileError(f"{where}: [target] must be a table")
    for key, value in target_raw.items():
        if not isinstance(value, bool) and value != "auto":
            raise ProfileError(f'{where}: [target] {key} must be true, false or "auto"')
        if value == "auto" and key not in AUTO_PROPERTIES:
            raise ProfileError(
                f"{where}: [target] {key} cannot be detected (auto works for {sorted(AUTO_PROPERTIES)})"
            )
    for c in cands:
        undeclared = [r for r in c.requires if r.lstrip("!") not in target_raw]
        if undeclared:
            raise ProfileError(
                f"{where}: candidate {c.id} requires {undeclared}, not declared in [target]"
            )
    acc = _table(raw, "accuracy_gate", where)
    gate = AccuracyGate(
        min_agreement=_num(acc, "min_agreement", f"{where} [accuracy_gate]", lo=0, hi=1),
        max_accuracy_drop=_num(acc, "max_accuracy_drop", f"{where} [accuracy_gate]", lo=0, hi=1),
        max_abs_error=(
            _num(acc, "max_abs_error", f"{where} [accuracy_gate]", lo=0)
            if "max_abs_error" in acc
            else None
        ),
    )
    dev = _table(raw, "device_gates", where)
    dw = f"{where} [device_gates]"
    gates = DeviceGates(
        max_p95_ms=_num(dev, "max_p95_ms", dw, lo=0),
        max_memory_mb=_num(dev, "max_memory_mb", dw, lo=0.001),
        sample_atol=_num(dev, "sample_atol", dw, lo=0),
        sample_rtol=_num(dev, "sample_rtol", dw, lo=0),
        min_sample_agreement=_num(dev, "min_sample_agreement", dw, lo=0, hi=1),
    )
    constraints = _constraints(raw, where)
    min_agent = raw.get("min_agent_version", "0.1.0")
    if not isinstance(min_agent, str):
        raise ProfileError(f"{where}: 'min_agent_version' must be a string")
    desc = raw.get("description", "")
    return Profile(
        id=pid,
        description=str(desc),
        execution_providers=tuple(eps),
        cpu_fallback=cpu_fallback,
        candidates=cands,
        accuracy_gate=gate,
        device_gates=gates,
        min_agent_version=min_agent,
        source=source,
        target=dict(target_raw),
        constraints=constraints,
    )


def _constraints(raw: dict[str, Any], where: str) -> Constraints | None:
    """The optional ``[constraints]`` table (see :mod:`edgefleet.packager.backends.verify`)."""
    if "constraints" not in raw:
        return None
    table = raw["constraints"]
    cw = f"{where} [constraints]"
    if not isinstance(table, dict):
        raise ProfileError(f"{where}: [constraints] must be a table")
    unknown = sorted(set(table) - set(CONSTRAINT_FIELDS))
    if unknown:
        raise ProfileError(f"{cw}: unknown key(s) {unknown}; known: {sorted(CONSTRAINT_FIELDS)}")
    values: dict[str, Any] = {}
    for key, value in table.items():
        if CONSTRAINT_FIELDS[key] is bool:
            if not isinstance(value, bool):
                raise ProfileError(f"{cw}: '{key}' must be true or false")
            values[key] = value
        elif key == "min_quantized_share":
            values[key] = _num(table, key, cw, lo=0, hi=1)
        elif isinstance(value, bool) or value not in (4, 8, 16):
            raise ProfileError(f"{cw}: '{key}' must be 4, 8 or 16, got {value!r}")
        else:
            values[key] = int(value)
    return Constraints(**values)


def load_profile_file(path: Path) -> Profile:
    """Parse and validate one ``.toml`` file."""
    path = Path(path)
    try:
        raw = read_profile_file(path)
    except ProfileFileError as exc:
        raise ProfileError(str(exc)) from exc
    return parse_profile(raw, path.name, source=path)


def load_profiles(directory: Path | None = None) -> dict[str, Profile]:
    """Every profile in ``directory`` (default: the shipped ones), by id, sorted."""
    directory = Path(directory) if directory is not None else profiles_dir()
    found = {p.id: p for p in (load_profile_file(f) for f in profile_files(directory))}
    if not found:
        raise ProfileError(f"{directory}: no *.toml profiles")
    return dict(sorted(found.items()))


def get_profile(profile_id: str, directory: Path | None = None) -> Profile:
    """One profile by id, or a path to a ``.toml`` file; unknown ids name the known ones."""
    if profile_id.endswith(".toml"):
        return load_profile_file(Path(profile_id))
    profiles = load_profiles(directory)
    if profile_id not in profiles:
        raise ProfileError(f"unknown profile {profile_id!r}; known: {', '.join(profiles)}")
    return profiles[profile_id]
