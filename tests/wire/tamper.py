"""Rewrite real packages into bad ones, member by member, for rejection tests."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from edgefleet.keys import KeyPair, load_private_key
from edgefleet.wire import signing

Member = tuple[tarfile.TarInfo, bytes | None]


def read_members(pkg: Path) -> list[Member]:
    out: list[Member] = []
    with tarfile.open(pkg, "r:") as tar:
        for ti in tar.getmembers():
            f = tar.extractfile(ti) if ti.isfile() else None
            out.append((ti, f.read() if f else None))
    return out


def write_members(path: Path, members: list[Member]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            ti = tarfile.TarInfo(ti.name) if data is not None and ti.size != len(data) else ti
            if data is not None:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return path


def rewrite(pkg: Path, out: Path, edit: Callable[[list[Member]], list[Member]]) -> Path:
    return write_members(out, edit(read_members(pkg)))


def resign(members: list[Member], key: KeyPair, name: str = "iris") -> list[Member]:
    """Sign whatever members there are now (a signer who signs something bad on purpose)."""
    import hashlib

    digests = {
        ti.name: hashlib.sha256(d).hexdigest()
        for ti, d in members
        if ti.name != "model.sig" and d is not None
    }
    bundle = signing.sign(name, digests, load_private_key(key.private_path))
    out = [(ti, d) for ti, d in members if ti.name != "model.sig"]
    out.insert(1, (tarfile.TarInfo("model.sig"), bundle))
    return out


def edit_manifest(members: list[Member], change: Callable[[dict], None]) -> list[Member]:
    out = []
    for ti, d in members:
        if ti.name == "manifest.json" and d is not None:
            m = json.loads(d)
            change(m)
            d = json.dumps(m).encode()
        out.append((ti, d))
    return out
