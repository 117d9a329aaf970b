"""Rollbacks that land, and fail loudly when they cannot; a restart during probation keeps the
version before; what interrupted installs leave is gone after a restart; revocation reaches
installed models. Real agent processes throughout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgefleet.agent.store import ModelStore
from edgefleet.keys import KeyPair, load_public_key
from edgefleet.wire.keyid import key_id
from tests.agent.helpers import AgentProcess, OipClient, served_version, wait_for, write_config


def _config(
    tmp_path: Path, v1_data: Path, trusted: list[Path], **extra: object
) -> tuple[Path, Path]:
    data = tmp_path / "data"
    shutil.copytree(v1_data, data)
    return write_config(tmp_path / "cfg", data, trusted, **extra), data


def _commit(
    agent: AgentProcess, pkg: Path, x: np.ndarray, requests: int = 0, version: str = "1.1.0"
) -> None:
    uid = agent.submit(pkg)
    if requests:
        c = OipClient(agent.port)
        try:
            wait_for(
                lambda: c.infer("iris", {"X": x})[1].get("model_version") == version,
                60,
                0.05,
                f"{version} serving",
            )
            for _ in range(requests):
                c.infer("iris", {"X": x})
        finally:
            c.close()
    assert agent.wait_terminal(uid)["state"] == "COMMITTED"


def test_rollback_to_a_committed_version_skips_the_forward_gates(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    """A forward update here must serve 5 healthy requests or 60 s of probation; the rollback
    to 1.0.0 (committed here) is not held to probation nor to the benchmark: it lands at once,
    with no request at all."""
    cfg, data = _config(
        tmp_path,
        v1_data,
        [keys["trusted"].public_path],
        probation={"seconds": 60.0, "min_requests": 1, "commit_after_requests": 5},
    )
    agent = AgentProcess(cfg)
    try:
        _commit(agent, pkgs["v2"], x_iris, requests=5)
        uid = agent.submit(pkgs["v1"], version="1.0.0", allow_downgrade=True)
        view = agent.wait_terminal(uid, timeout=30)  # far below the 60 s of a probation
        assert view["state"] == "COMMITTED", view
        assert view["rollback"] is True
        figures = {t["state"]: t.get("figures") or {} for t in view["history"]}
        assert "skipped" in str(figures["ACTIVATING"]["gates"])
        assert "skipped" in str(figures["COMMITTED"]["probation"])
        assert "p95_ms" not in figures["ACTIVATING"]  # no benchmark ran
        assert served_version(agent.port, "iris", x_iris) == "1.0.0"
        ptr = ModelStore(data).pointers("iris")
        assert (ptr.current, ptr.previous) == ("1.0.0", "1.1.0")
    finally:
        agent.stop()


def test_a_rollback_that_cannot_land_is_rollback_failed(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    cfg, data = _config(tmp_path, v1_data, [keys["trusted"].public_path])
    agent = AgentProcess(cfg)
    try:
        _commit(agent, pkgs["v2"], x_iris)
        model = data / "models" / "iris" / "1.0.0" / "model.onnx"
        raw = bytearray(model.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # the committed version's file no longer matches its hash
        model.write_bytes(bytes(raw))
        uid = agent.submit(pkgs["v1"], model="iris", version="1.0.0", allow_downgrade=True)
        view = agent.wait_terminal(uid)
        assert view["state"] == "ROLLBACK_FAILED", view
        assert view["reason_code"] == "rollback_failed"
        assert view["history"][-1]["figures"]["cause"] == "digest_mismatch"
        assert served_version(agent.port, "iris", x_iris) == "1.1.0"  # still what it ran
        assert ModelStore(data).pointers("iris").current == "1.1.0"
    finally:
        agent.stop()


def test_kill_during_probation_keeps_previous_and_leaves_no_stale_version(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    trusted = [keys["trusted"].public_path, keys["second"].public_path]
    cfg, data = _config(tmp_path, v1_data, trusted)
    agent = AgentProcess(cfg)
    try:
        _commit(agent, pkgs["v2"], x_iris)  # current 1.1.0, previous 1.0.0
    finally:
        agent.stop()
    agent = AgentProcess(cfg, pause_at="PROBATION")
    try:
        uid = agent.submit(pkgs["second_key"])  # 1.2.0
        wait_for(lambda: (data / "paused-PROBATION").exists(), 60, what="pause in PROBATION")
    finally:
        agent.kill()
    (data / "paused-PROBATION").unlink()
    agent = AgentProcess(cfg)
    try:
        view = agent.wait_terminal(uid)
        assert view["state"] == "ROLLED_BACK" and view["reason_code"] == "interrupted_probation"
        assert served_version(agent.port, "iris", x_iris) == "1.1.0"
        store = ModelStore(data)
        ptr = store.pointers("iris")
        assert (ptr.current, ptr.previous) == ("1.1.0", "1.0.0")  # previous kept
        assert store.installed_versions("iris") == ["1.0.0", "1.1.0"]  # 1.2.0 not left behind
    finally:
        agent.stop()


def test_interrupted_installs_leave_no_partial_directories(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    """kill -9 in INSTALLING; the extraction directories such a kill leaves (of this model and
    of a first install of another) are gone after the restart, which finishes the update."""
    cfg, data = _config(tmp_path, v1_data, [keys["trusted"].public_path])
    agent = AgentProcess(cfg, pause_at="INSTALLING")
    try:
        uid = agent.submit(pkgs["v2"])
        wait_for(lambda: (data / "paused-INSTALLING").exists(), 60, what="pause in INSTALLING")
    finally:
        agent.kill()
    (data / "paused-INSTALLING").unlink()
    # what a kill mid-extraction leaves (`edgefleet.wire.package` extracts into .V.XXXX.partial)
    left = [
        data / "models" / "iris" / ".1.1.0.k9x2.partial",
        data / "models" / "digits" / ".1.0.0.a7f1.partial",
    ]
    for p in left:
        p.mkdir(parents=True)
        (p / "model.onnx").write_bytes(b"half")
    agent = AgentProcess(cfg)
    try:
        assert not [p for p in left if p.exists()]
        assert not (data / "models" / "digits").exists()  # nothing was ever installed there
        assert agent.wait_terminal(uid)["state"] == "COMMITTED"
        assert served_version(agent.port, "iris", x_iris) == "1.1.0"
        assert "digits" not in agent.admin("GET", "/admin/status")["models"]
    finally:
        agent.stop()


def test_kill_mid_extraction_leaves_no_partial_directory(
    tmp_path: Path, keys: dict[str, KeyPair]
) -> None:
    """kill -9 while INSTALLING extracts a 32 MB model (its `.partial` directory exists); the
    restarted agent removes it, finishes the install and serves."""
    import os
    import signal

    from tests.agent.helpers import lookup_package

    pkg = lookup_package(
        tmp_path / "pkg",
        name="lookup",
        version="1.0.0",
        key=keys["trusted"],
        table=[float(i % 10) for i in range(8_000_000)],
    )
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "cfg", data, [keys["trusted"].public_path])
    agent = AgentProcess(cfg, pause_at="INSTALLING")
    model_dir = data / "models" / "lookup"

    def partial() -> list[Path]:
        return [p for p in model_dir.glob(".*.partial")] if model_dir.is_dir() else []

    try:
        uid = agent.submit(pkg)
        wait_for(lambda: (data / "paused-INSTALLING").exists(), 60, what="pause in INSTALLING")
        (data / "paused-INSTALLING").unlink()  # go on: extraction starts now
        wait_for(partial, 30, 0.002, "extraction under way")
        os.kill(agent.proc.pid, signal.SIGKILL)
    finally:
        agent.kill()
    left = partial()  # what the kill left
    assert left
    agent = AgentProcess(cfg)
    try:
        # the restarted agent resumes INSTALLING, which extracts again into a directory of a new
        # name: only the ones the kill left must be gone once it is up
        assert not [p for p in left if p.exists()]
        assert agent.wait_terminal(uid)["state"] == "COMMITTED"
        assert served_version(agent.port, "lookup", np.array([3.0], np.float32)) == "1.0.0"
        assert not partial()
    finally:
        agent.stop()


def test_revocation_reaches_installed_models(
    tmp_path: Path, v1_data: Path, keys: dict[str, KeyPair], x_iris: np.ndarray
) -> None:
    """A model signed by a key that is revoked (at start) or leaves the trust store (while the
    agent runs) stops serving."""
    kid = key_id(load_public_key(keys["trusted"].public_path))
    key_file = tmp_path / "trusted.pub.pem"
    shutil.copyfile(keys["trusted"].public_path, key_file)
    cfg, data = _config(tmp_path, v1_data, [key_file], trust_check_s=0.2)
    agent = AgentProcess(cfg)
    c = OipClient(agent.port)
    try:
        assert c.infer("iris", {"X": x_iris})[0] == 200
        # the operator replaces the trusted key: iris 1.0.0's signer is no longer trusted
        shutil.copyfile(keys["second"].public_path, key_file)
        wait_for(lambda: c.infer("iris", {"X": x_iris})[0] == 404, 30, 0.1, "iris unloaded")
    finally:
        c.close()
        agent.stop()
    assert "stops serving" in (tmp_path / "cfg" / "agent.log").read_text()
    shutil.copyfile(keys["trusted"].public_path, key_file)
    cfg = write_config(
        tmp_path / "cfg",
        data,
        [key_file],
        revoked_key_ids=[f" {kid.upper()} "],
        http_port=agent.port,
    )
    # revoked at start (spelled in upper case with blanks: one canonical form): never serves
    agent = AgentProcess(cfg)
    try:
        assert OipClient(agent.port).infer("iris", {"X": x_iris})[0] == 404
    finally:
        agent.stop()


def test_rollback_to_a_pruned_committed_version(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    """1.0.0 was committed here, then pruned (1.1.0 and 1.2.0 came after). A rollback whose
    package is gone ends ROLLBACK_FAILED; with the package it is downloaded, verified and lands
    without probation (60 s here for a forward update)."""
    trusted = [keys["trusted"].public_path, keys["second"].public_path]
    cfg, data = _config(
        tmp_path,
        v1_data,
        trusted,
        probation={"seconds": 60.0, "min_requests": 1, "commit_after_requests": 3},
    )
    agent = AgentProcess(cfg)
    try:
        _commit(agent, pkgs["v2"], x_iris, requests=3)
        _commit(agent, pkgs["second_key"], x_iris, requests=3, version="1.2.0")
        assert ModelStore(data).installed_versions("iris") == ["1.1.0", "1.2.0"]
        gone = tmp_path / "gone" / "iris-1.0.0.efpkg"
        uid = agent.submit(gone, model="iris", version="1.0.0", allow_downgrade=True)
        view = agent.wait_terminal(uid)
        assert view["state"] == "ROLLBACK_FAILED", view
        assert view["history"][-1]["figures"]["cause"] == "source_missing"
        assert served_version(agent.port, "iris", x_iris) == "1.2.0"
        uid = agent.submit(pkgs["v1"], model="iris", version="1.0.0", allow_downgrade=True)
        view = agent.wait_terminal(uid, timeout=30)
        assert view["state"] == "COMMITTED" and view["rollback"] is True, view
        assert served_version(agent.port, "iris", x_iris) == "1.0.0"
    finally:
        agent.stop()
