"""Delta updates (docs/delta.md): the planner, and fetch_delta against a real HTTP server that
serves Range requests, including one that lies. Trust never gets weaker than the full download's."""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.rangeserver import RangeServer
from edgefleet.agent.delta import coalesce, plan, tar_entry
from edgefleet.agent.delta_fetch import DeltaDownloaded, blocks_dir, fetch_delta
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.agent.update.events import UpdateEvent
from edgefleet.agent.update.fetcher import FetchError
from edgefleet.keys import KeyPair, load_public_key
from edgefleet.wire import blocks
from edgefleet.wire.blocks import Block
from edgefleet.wire.errors import RejectError
from edgefleet.wire.reasons import ReasonCode
from edgefleet.wire.trust import TrustStore
from tests.agent.helpers import tar_members, write_tar
from tests.support.delta_models import mlp_bytes, mlp_package

MiB = 1024 * 1024


def _b(offset: int, length: int, tag: str) -> Block:
    return Block(offset, length, hashlib.sha256(tag.encode()).hexdigest())


def test_plan_reuses_by_hash_and_length_never_by_offset() -> None:
    new = [_b(0, 10, "a"), _b(10, 10, "b"), _b(20, 10, "c"), _b(30, 5, "d")]
    local = [_b(100, 10, "c"), _b(0, 10, "a"), Block(50, 6, _b(0, 5, "d").sha256)]
    p = plan(new, local)
    assert [(n.offset, s.offset) for n, s in p.reuse] == [(0, 0), (20, 100)]
    assert [b.offset for b in p.fetch] == [10, 30]  # "d" has another length locally
    assert p.reuse_bytes == 20 and p.fetch_bytes == 15


def test_coalesce_joins_adjacent_blocks_up_to_a_cap() -> None:
    bs = [_b(0, 4, "a"), _b(4, 4, "b"), _b(8, 4, "c"), _b(20, 4, "d"), _b(24, 4, "e")]
    assert [(s.start, s.end) for s in coalesce(bs)] == [(0, 12), (20, 28)]
    assert [(s.start, s.end) for s in coalesce(bs, max_bytes=8)] == [(0, 8), (8, 12), (20, 28)]


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=512, max_size=512))
def test_any_tar_header_is_an_entry_the_end_or_refused(header: bytes) -> None:
    try:
        entry = tar_entry(header, 0)
    except RejectError as e:
        assert e.code is ReasonCode.NOT_A_PACKAGE
    else:
        assert entry is None or entry.size >= 0


@pytest.fixture(scope="module")
def dpkgs(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, KeyPair]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dpkgs")
    k = keys["trusted"]
    return {
        "v1": mlp_package(d / "v1", version="1.0.0", key=k),
        "v2": mlp_package(d / "v2", version="1.1.0", key=k, head_seed=1),
        "v3": mlp_package(d / "v3", version="1.2.0", key=k, head_seed=2),
        "v2_unknown_key": mlp_package(d / "uk", version="1.1.0", key=keys["unknown"], head_seed=1),
        "v2_no_blocks": mlp_package(
            d / "nb", version="1.1.0", key=k, head_seed=1, with_blocks=False
        ),
    }


@pytest.fixture
def trust(keys: dict[str, KeyPair]) -> TrustStore:
    return TrustStore([load_public_key(keys["trusted"].public_path)])


@pytest.fixture
def basis(tmp_path: Path) -> Path:
    p = tmp_path / "current"
    p.mkdir()
    (p / "model.onnx").write_bytes(mlp_bytes(0))
    return p


def _delta(
    server: RangeServer, pkg: Path, dest: Path, basis: Path | None, trust: TrustStore
) -> DeltaDownloaded:
    data = pkg.read_bytes()
    return fetch_delta(
        server.url("/pkg"),
        dest,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        max_bytes=64 * MiB,
        basis=basis,
        trust=trust,
        expected_name="mlp",
        retries=0,
    )


def _model_at(pkg: Path) -> tuple[int, int]:
    with tarfile.open(pkg) as t:
        ti = t.getmember("model.onnx")
        return ti.offset_data, ti.size


def test_a_head_only_change_fetches_a_small_fraction(
    dpkgs: dict[str, Path], basis: Path, trust: TrustStore, tmp_path: Path
) -> None:
    with RangeServer({"/pkg": dpkgs["v2"]}) as srv:
        got = _delta(srv, dpkgs["v2"], tmp_path / "dl" / "u.efpkg", basis, trust)
    assert got.path.read_bytes() == dpkgs["v2"].read_bytes()
    assert got.figures["bytes_over_wire"] == srv.sent
    assert srv.sent < 0.15 * dpkgs["v2"].stat().st_size, got.figures
    assert got.figures["reused_blocks"] > 0 and not blocks_dir(got.path).exists()
    assert all(status == 206 for _, _, status in srv.requests)


def test_a_delta_that_would_save_nothing_is_not_made(
    dpkgs: dict[str, Path], trust: TrustStore, tmp_path: Path
) -> None:
    """Nothing installed to reuse: the delta stops after the header walk (the full download
    follows), rather than fetch every block one by one."""
    pkg = dpkgs["v2"]
    with RangeServer({"/pkg": pkg}) as srv, pytest.raises(FetchError) as e:
        _delta(srv, pkg, tmp_path / "u.efpkg", None, trust)
    assert e.value.code is ReasonCode.DELTA_UNAVAILABLE
    assert srv.sent < 0.05 * pkg.stat().st_size


def test_a_poisoned_local_block_is_not_reused(
    dpkgs: dict[str, Path], basis: Path, trust: TrustStore, tmp_path: Path
) -> None:
    clean = (basis / "model.onnx").read_bytes()
    with RangeServer({"/pkg": dpkgs["v2"]}) as srv:
        first = _delta(srv, dpkgs["v2"], tmp_path / "a.efpkg", basis, trust)
        poisoned = bytearray(clean)
        poisoned[len(clean) // 3] ^= 0xFF  # inside w2, shared by v1 and v2
        (basis / "model.onnx").write_bytes(bytes(poisoned))
        sent = srv.sent
        second = _delta(srv, dpkgs["v2"], tmp_path / "b.efpkg", basis, trust)
    assert second.path.read_bytes() == dpkgs["v2"].read_bytes()
    assert second.figures["reused_blocks"] == first.figures["reused_blocks"] - 1
    assert srv.sent - sent > sent  # the poisoned block came over the wire instead


def _flip_model_bytes(pkg: Path) -> Callable[[str, int, bytes], bytes]:
    at, size = _model_at(pkg)

    def tamper(path: str, pos: int, data: bytes) -> bytes:
        if pos + len(data) <= at or pos >= at + size:
            return data
        i = max(at - pos, 0)
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]

    return tamper


def test_a_server_that_returns_wrong_bytes_for_a_range_is_refused(
    dpkgs: dict[str, Path], basis: Path, trust: TrustStore, tmp_path: Path
) -> None:
    dest = tmp_path / "u.efpkg"
    with (
        RangeServer({"/pkg": dpkgs["v2"]}, tamper=_flip_model_bytes(dpkgs["v2"])) as srv,
        pytest.raises(FetchError) as e,
    ):
        _delta(srv, dpkgs["v2"], dest, basis, trust)
    assert e.value.code is ReasonCode.DIGEST_MISMATCH
    assert not dest.exists() and not list(blocks_dir(dest).glob("*.blk"))


def test_blocks_of_another_version_are_refused(
    dpkgs: dict[str, Path], basis: Path, trust: TrustStore, tmp_path: Path
) -> None:
    """The head of v2 (its signed block list) with v3's model bytes at the same place."""
    at, size = _model_at(dpkgs["v2"])
    at3, size3 = _model_at(dpkgs["v3"])
    assert size == size3
    v3 = dpkgs["v3"].read_bytes()

    def other_version(path: str, pos: int, data: bytes) -> bytes:
        if pos < at:
            return data
        return v3[at3 + pos - at : at3 + pos - at + len(data)]

    with (
        RangeServer({"/pkg": dpkgs["v2"]}, tamper=other_version) as srv,
        pytest.raises(FetchError) as e,
    ):
        _delta(srv, dpkgs["v2"], tmp_path / "u.efpkg", basis, trust)
    assert e.value.code is ReasonCode.DIGEST_MISMATCH


def test_a_manifest_with_another_versions_signature_is_refused_before_any_block(
    dpkgs: dict[str, Path], basis: Path, trust: TrustStore, tmp_path: Path
) -> None:
    v2, v3 = (
        dict((ti.name, (ti, d)) for ti, d in tar_members(dpkgs["v2"])),
        dict((ti.name, (ti, d)) for ti, d in tar_members(dpkgs["v3"])),
    )
    mixed = write_tar(
        tmp_path / "mixed.efpkg",
        [v2["manifest.json"], v3["model.sig"], v2["model.onnx"], v2["samples.npz"]],
    )
    at, _ = _model_at(mixed)
    with RangeServer({"/pkg": mixed}) as srv, pytest.raises(FetchError) as e:
        _delta(srv, mixed, tmp_path / "u.efpkg", basis, trust)
    assert e.value.code is ReasonCode.DIGEST_MISMATCH
    assert srv.sent <= at + 16 * 1024  # nothing past the head was asked for


def test_an_untrusted_signer_is_refused_before_any_block(
    dpkgs: dict[str, Path], basis: Path, trust: TrustStore, tmp_path: Path
) -> None:
    pkg = dpkgs["v2_unknown_key"]
    with RangeServer({"/pkg": pkg}) as srv, pytest.raises(FetchError) as e:
        _delta(srv, pkg, tmp_path / "u.efpkg", basis, trust)
    assert e.value.code is ReasonCode.UNTRUSTED_KEY
    assert srv.sent <= _model_at(pkg)[0] + 16 * 1024


@pytest.mark.parametrize("case", ["no_range", "no_blocks"])
def test_no_delta_possible_says_so(
    case: str, dpkgs: dict[str, Path], basis: Path, trust: TrustStore, tmp_path: Path
) -> None:
    pkg = dpkgs["v2_no_blocks" if case == "no_blocks" else "v2"]
    with (
        RangeServer({"/pkg": pkg}, ranges=case != "no_range") as srv,
        pytest.raises(FetchError) as e,
    ):
        _delta(srv, pkg, tmp_path / "u.efpkg", basis, trust)
    assert e.value.code is ReasonCode.DELTA_UNAVAILABLE


def test_an_interrupted_delta_resumes_with_the_blocks_it_kept(
    dpkgs: dict[str, Path], trust: TrustStore, tmp_path: Path
) -> None:
    """The device holds half of w2 (two of its four 256 KiB blocks); the link drops inside the
    last one; the next attempt asks only for what it had not checked and kept."""
    pkg = dpkgs["v2"]
    at, _ = _model_at(pkg)
    full = [b for b in blocks.cut(mlp_bytes(1)) if b.length == blocks.CHUNK]
    assert len(full) == 4
    model = mlp_bytes(1)
    basis = tmp_path / "installed"
    basis.mkdir()
    (basis / "part.bin").write_bytes(b"".join(model[b.offset : b.end] for b in full[:2]))
    cut_at = at + full[3].offset + 1000
    dest = tmp_path / "u.efpkg"

    def drop(path: str, pos: int, data: bytes) -> bytes:
        if pos <= cut_at < pos + len(data):
            raise ConnectionResetError("link dropped")
        return data

    with RangeServer({"/pkg": pkg}, tamper=drop) as srv, pytest.raises(FetchError):
        _delta(srv, pkg, dest, basis, trust)
    kept = sum(p.stat().st_size for p in blocks_dir(dest).glob("*.blk"))
    assert kept >= blocks.CHUNK  # w2's third block at least
    with RangeServer({"/pkg": pkg}) as srv:
        got = _delta(srv, pkg, dest, basis, trust)
    assert got.path.read_bytes() == pkg.read_bytes()
    assert got.figures["resumed_bytes"] == kept
    assert got.figures["reused_bytes"] >= 2 * blocks.CHUNK
    assert srv.sent < pkg.stat().st_size - kept - 2 * blocks.CHUNK + 64 * 1024


def _install(agent: Agent, source: str, version: str, pkg: Path) -> list[UpdateEvent]:
    events: list[UpdateEvent] = []
    agent.add_listener(events.append)
    data = pkg.read_bytes()
    req = UpdateRequest(
        "mlp", version, source, sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    view = agent.wait_update(agent.submit_update(req), 60)
    agent.remove_listener(events.append)
    assert view["state"] == "COMMITTED", view
    return events


def _verifying_figures(events: list[UpdateEvent]) -> dict[str, object]:
    (ev,) = [e for e in events if e.state == "VERIFYING"]
    return dict(ev.figures or {})


def test_the_agent_updates_by_delta_and_falls_back_to_a_full_download(
    dpkgs: dict[str, Path], agent_factory: Callable[..., Agent]
) -> None:
    agent = agent_factory()
    _install(agent, str(dpkgs["v1"]), "1.0.0", dpkgs["v1"])
    with RangeServer({"/pkg": dpkgs["v2"]}) as srv:
        figures = _verifying_figures(_install(agent, srv.url("/pkg"), "1.1.0", dpkgs["v2"]))
    delta = figures["delta"]
    assert isinstance(delta, dict) and delta["reused_blocks"] > 0, figures
    assert srv.sent < 0.15 * dpkgs["v2"].stat().st_size
    # a server that lies about ranges: the delta is refused, the full download installs v3
    with RangeServer({"/pkg": dpkgs["v3"]}, tamper=None) as srv:
        srv.tamper = lambda p, pos, d: d if srv.requests[-1][1] is None else d[::-1]
        figures = _verifying_figures(_install(agent, srv.url("/pkg"), "1.2.0", dpkgs["v3"]))
    assert figures["delta_fallback"] in ("digest_mismatch", "not_a_package"), figures
    assert figures["bytes"] == dpkgs["v3"].stat().st_size
