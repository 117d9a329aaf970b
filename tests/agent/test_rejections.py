"""Every rejection with a real package; after each, the previous model still answers over HTTP."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.keys import KeyPair
from tests.agent.helpers import (
    file_info,
    link_info,
    served_version,
    tampered,
    wait_for,
    with_extra_member,
)


def _update(agent: Agent, source: Path | str, **kw: Any) -> dict[str, Any]:
    uid = agent.submit_update(
        UpdateRequest(kw.pop("model", "iris"), kw.pop("version", ""), str(source), **kw)
    )
    return agent.wait_update(uid, 60)


def _assert_rejected(agent: Agent, view: dict[str, Any], code: str, x: np.ndarray) -> None:
    assert view["state"] == "FAILED", view
    assert view["reason_code"] == code, view
    assert view["reason"]
    assert served_version(agent.http_port or 0, "iris", x) == "1.0.0"
    assert agent.store.pointers("iris").current == "1.0.0"
    # nothing of the refused package stays installed or downloaded
    assert agent.store.installed_versions("iris") == ["1.0.0"]
    assert not any((agent.data_dir / "downloads").iterdir())


def _bad_tar(tmp_path: Path, pkgs: dict[str, Path], kind: str) -> Path:
    out = tmp_path / f"{kind}.efpkg"
    src = pkgs["v2"]
    if kind == "tampered":
        return tampered(src, out)
    if kind == "unpinned":
        ti = file_info("extra.bin")
        return with_extra_member(src, out, ti, b"not signed")
    if kind == "traversal":
        return with_extra_member(src, out, file_info("../../evil.py"), b"print('pwned')")
    if kind == "absolute":
        return with_extra_member(src, out, file_info("/tmp/evil.py"), b"print('pwned')")
    if kind == "link":
        return with_extra_member(src, out, link_info("samples2.npz", "/etc/passwd"), None)
    if kind == "truncated":
        data = src.read_bytes()
        with tarfile.open(src) as t:  # inside member data: a cut at a header is a short archive
            model = t.getmember("model.onnx")
        out.write_bytes(data[: model.offset_data + model.size // 2])
        return out
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("tampered", "digest_mismatch"),
        ("unpinned", "member_unpinned"),
        ("traversal", "unsafe_path"),
        ("absolute", "unsafe_path"),
        ("link", "link_member"),
        ("truncated", "not_a_package"),
    ],
)
def test_crafted_package_rejected(
    kind: str,
    code: str,
    tmp_path: Path,
    pkgs: dict[str, Path],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    agent = agent_factory(v1_copy)
    bad = _bad_tar(tmp_path, pkgs, kind)
    view = _update(agent, bad)
    _assert_rejected(agent, view, code, x_iris)
    assert not (tmp_path.parent / "evil.py").exists()


@pytest.mark.parametrize(
    ("pkg", "code", "kw"),
    [
        ("unknown_key", "untrusted_key", {}),
        ("second_key", "revoked_key", {"revoked": True}),
        ("expired", "expired", {}),
        ("arm", "profile_incompatible", {}),
        ("needs_new_agent", "agent_too_old", {}),
        ("cuda_no_fallback", "provider_missing", {}),
        ("v0", "version_not_newer", {}),
        ("v1", "version_not_newer", {}),
        ("bad_samples", "sample_mismatch", {}),
        ("slow_gate", "latency_gate", {}),
    ],
)
def test_package_rejected(
    pkg: str,
    code: str,
    kw: dict[str, Any],
    pkgs: dict[str, Path],
    keys: dict[str, KeyPair],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    extra = {"revoked_key_ids": [keys["second"].key_id]} if kw.get("revoked") else {}
    agent = agent_factory(v1_copy, **extra)
    events: list[Any] = []
    agent.add_listener(events.append)
    view = _update(agent, pkgs[pkg])
    _assert_rejected(agent, view, code, x_iris)
    # listeners run right after the journal write that wait_update reads: wait for them too
    wait_for(lambda: events and events[-1].state == "FAILED", 10, what="FAILED event")
    assert events[-1].reason_code == code and events[-1].reason
    assert [e.state for e in events][:3] == ["IDLE", "DOWNLOADING", "VERIFYING"]
    if code in ("sample_mismatch", "latency_gate"):
        figures = view["history"][-1]["figures"]
        assert figures["samples"] == 32 and "p95_ms" in figures and "agreement" in figures
        if code == "latency_gate":
            assert figures["p95_ms"] > 0.000001


def test_oversize_package_rejected(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy, max_package_bytes=pkgs["v2"].stat().st_size - 1)
    _assert_rejected(agent, _update(agent, pkgs["v2"]), "too_large", x_iris)


def test_wrong_sha256_rejected(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy)
    _assert_rejected(agent, _update(agent, pkgs["v2"], sha256="0" * 64), "digest_mismatch", x_iris)


def test_wrong_name_rejected(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy)
    view = _update(agent, pkgs["lookup1"], model="iris")
    _assert_rejected(agent, view, "name_mismatch", x_iris)


def test_memory_insufficient_rejected(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    from edgefleet.agent.config import SwapConfig

    agent = agent_factory(v1_copy, swap=SwapConfig(memory_budget_mb=1.0))  # + 32 MB headroom
    _assert_rejected(agent, _update(agent, pkgs["v2"]), "memory_insufficient", x_iris)


def test_rollback_asked_for_is_accepted(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy)
    view = _update(agent, pkgs["v0"], version="0.9.0", allow_downgrade=True)
    assert view["state"] == "COMMITTED", view
    assert served_version(agent.http_port or 0, "iris", x_iris) == "0.9.0"
    # allow_downgrade names one version: another older one is still refused
    view = _update(agent, pkgs["v0"], version="0.8.0", allow_downgrade=True)
    assert view["state"] == "FAILED" and view["reason_code"] == "version_not_newer"


def test_cpu_fallback_is_said(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy)
    view = _update(agent, pkgs["cuda_fallback"])
    assert view["state"] == "COMMITTED", view
    fallback = [t for t in view["history"] if t["reason_code"] == "cpu_fallback"]
    assert fallback and "CUDAExecutionProvider" in fallback[0]["reason"]
    assert agent.inventory()["models"]["iris"]["providers"] == ["CPUExecutionProvider"]
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.2.0"


def test_unsafe_member_never_written_outside(
    tmp_path: Path, pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path
) -> None:
    agent = agent_factory(v1_copy)
    bad = with_extra_member(pkgs["v2"], tmp_path / "t.efpkg", file_info("../escaped.txt"), b"x")
    view = _update(agent, bad)
    assert view["reason_code"] == "unsafe_path"
    assert not list(agent.data_dir.rglob("escaped.txt"))
    assert not list(tmp_path.rglob("escaped.txt"))
    with tarfile.open(bad) as t:  # the crafted archive really holds the member
        assert "../escaped.txt" in t.getnames()


def test_rollback_to_installed_previous_needs_no_download(
    pkgs: dict[str, Path],
    keys: dict[str, KeyPair],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    agent = agent_factory(v1_copy)
    assert _update(agent, pkgs["v2"])["state"] == "COMMITTED"
    assert agent.store.pointers("iris").previous == "1.0.0"
    gone = "http://127.0.0.1:9/nothing-listens-here.efpkg"
    view = _update(agent, gone, version="1.0.0", allow_downgrade=True)
    assert view["state"] == "COMMITTED", view
    assert view["history"][2]["figures"] == {"download": "skipped, installed"}
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.0.0"
    assert agent.store.pointers("iris").previous == "1.1.0"
    # without allow_downgrade the same request is a refused older version
    view = _update(agent, pkgs["v2"], version="1.1.0")
    assert view["state"] == "COMMITTED"
    view = _update(agent, pkgs["v1"], version="1.0.0")
    assert view["state"] == "FAILED" and view["reason_code"] == "version_not_newer"
    assert agent.store.is_installed("iris", "1.0.0")  # the previous version is kept


def test_disk_full_rejected(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy, disk_headroom_bytes=2**60)  # more than any disk has free
    _assert_rejected(agent, _update(agent, pkgs["v2"]), "disk_full", x_iris)


def test_rollback_to_installed_version_whose_key_is_no_longer_trusted(
    pkgs: dict[str, Path],
    keys: dict[str, KeyPair],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    agent = agent_factory(v1_copy)
    assert _update(agent, pkgs["v2"])["state"] == "COMMITTED"
    agent.stop()
    # The key that signed 1.0.0 and 1.1.0 leaves the trust store (not revoked: just gone).
    agent = agent_factory(v1_copy, trusted_keys=[keys["second"].public_path])
    assert agent.store.is_installed("iris", "1.0.0")
    # Revocation reaches installed models: 1.1.0, signed by that key, no longer serves ...
    assert agent.sessions.get("iris") is None
    # ... and the instant rollback to 1.0.0 (committed here, same key) is refused, loudly.
    view = _update(agent, pkgs["v1"], version="1.0.0", allow_downgrade=True)
    assert view["state"] == "ROLLBACK_FAILED", view
    assert view["reason_code"] == "rollback_failed", view
    assert "untrusted_key" in view["reason"]
    assert view["history"][-1]["figures"]["cause"] == "untrusted_key"
    assert agent.sessions.get("iris") is None
    assert agent.store.pointers("iris").current == "1.1.0"
    assert agent.store.is_installed("iris", "1.0.0")  # refused, not deleted
