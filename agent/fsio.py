"""Crash-safe file operations of the agent; the atomic writes themselves are `edgefleet.wire.atomic`'s."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from edgefleet.wire.atomic import atomic_write_bytes, fsync_dir
from edgefleet.wire.atomic import atomic_write_json as _atomic_write_json
from edgefleet.wire.message import JsonObject, JsonValue

__all__ = [
    "atomic_write_bytes",
    "atomic_write_json",
    "clean_temp",
    "fsync_dir",
    "read_json",
    "read_json_object",
    "remove_tree",
]


def atomic_write_json(path: Path, obj: object, mode: int = 0o644) -> None:
    """``obj`` is anything ``json.dumps`` takes (dataclass dicts, TypedDicts, JSON values)."""
    _atomic_write_json(path, obj, mode, indent=1)


def read_json(path: Path) -> JsonValue:
    value: JsonValue = json.loads(path.read_text())
    return value


def read_json_object(path: Path) -> JsonObject:
    """The JSON object in ``path``; ValueError when the file holds another JSON value."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a JSON object")
    return value


def remove_tree(path: Path) -> None:
    """Remove a directory so that no half-removed copy keeps its name: rename first, then delete."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def clean_temp(directory: Path) -> None:
    """Remove leftovers of interrupted writes (dot-files ending .tmp, .trash-* directories)."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if p.name.startswith(".trash-") or (p.name.startswith(".") and p.name.endswith(".tmp")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
