"""Downloads against a real local HTTP server that can cut connections midway."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.download import DownloadError, fetch
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.agent.server import QuietServer
from tests.agent.helpers import served_version


@dataclass
class Behaviour:
    data: bytes = b""
    cut_after: int | None = None  # bytes sent before the connection is dropped (per request)
    cuts_left: int = 0  # how many requests are cut
    ranges: bool = True
    lie_length: int | None = None  # Content-Length to announce instead of the real one
    token: str | None = None  # when set, answer 401 unless "Authorization: Bearer <token>"
    requests: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        return

    def do_GET(self) -> None:
        b = self.server.behaviour
        rng = self.headers.get("Range")
        b.requests.append(rng or "")
        b.authorizations.append(self.headers.get("Authorization"))
        if b.token is not None and self.headers.get("Authorization") != f"Bearer {b.token}":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng and b.ranges:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(b.data):
                self.send_response(416)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(b.data) - 1}/{len(b.data)}")
        else:
            self.send_response(200)
        body = b.data[start:]
        self.send_header("Content-Length", str(b.lie_length or len(body)))
        self.end_headers()
        if b.cut_after is not None and b.cuts_left > 0:
            b.cuts_left -= 1
            self.wfile.write(body[: b.cut_after])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


class _Server(QuietServer):  # a client that hangs up early is no error here
    daemon_threads = True
    behaviour: Behaviour


@pytest.fixture
def http_server() -> Iterator[Callable[[Behaviour], str]]:
    servers: list[_Server] = []

    def serve(b: Behaviour) -> str:
        srv = _Server(("127.0.0.1", 0), _Handler)
        srv.behaviour = b
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/pkg.efpkg"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


DATA = np.random.default_rng(0).bytes(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


def test_resumes_with_range_after_cuts(
    http_server: Callable[[Behaviour], str], tmp_path: Path
) -> None:
    b = Behaviour(DATA, cut_after=70_000, cuts_left=3)
    got = fetch(
        http_server(b), tmp_path / "p.efpkg", sha256=SHA, size=len(DATA), max_bytes=10**6, retries=5
    )
    assert got.sha256 == SHA and (tmp_path / "p.efpkg").read_bytes() == DATA
    offsets = [int(r.split("=")[1].rstrip("-")) for r in b.requests[1:]]
    assert b.requests[0] == "" and len(offsets) == 3
    assert offsets == sorted(offsets) and offsets[0] > 0  # each retry resumes where it stopped
    assert got.attempts == 4


def test_resume_across_restarts_from_part_file(
    http_server: Callable[[Behaviour], str], tmp_path: Path
) -> None:
    dest = tmp_path / "p.efpkg"
    dest.with_name("p.efpkg.part").write_bytes(DATA[:123_456])  # left by a killed agent
    b = Behaviour(DATA)
    got = fetch(http_server(b), dest, sha256=SHA, max_bytes=10**6)
    assert got.resumed_from == 123_456 and b.requests == ["bytes=123456-"]
    assert dest.read_bytes() == DATA


def test_server_without_range_restarts_from_zero(
    http_server: Callable[[Behaviour], str], tmp_path: Path
) -> None:
    b = Behaviour(DATA, cut_after=100_000, cuts_left=1, ranges=False)
    got = fetch(http_server(b), tmp_path / "p.efpkg", sha256=SHA, max_bytes=10**6)
    assert got.sha256 == SHA and got.size == len(DATA)


def test_truncated_download_fails_after_bounded_retries(
    http_server: Callable[[Behaviour], str], tmp_path: Path
) -> None:
    b = Behaviour(DATA, cut_after=1000, cuts_left=100, ranges=False)
    with pytest.raises(DownloadError) as e:
        fetch(http_server(b), tmp_path / "p.efpkg", max_bytes=10**6, retries=2)
    assert e.value.code == "download_incomplete"
    assert len(b.requests) == 3
    assert not (tmp_path / "p.efpkg").exists()


def test_size_limit_stops_download(http_server: Callable[[Behaviour], str], tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as e:
        fetch(http_server(Behaviour(DATA)), tmp_path / "p.efpkg", max_bytes=100_000)
    assert e.value.code == "too_large"
    # a server that under-announces is stopped at the limit while streaming
    with pytest.raises(DownloadError) as e:
        fetch(
            http_server(Behaviour(DATA, lie_length=None)),
            tmp_path / "q.efpkg",
            max_bytes=1000,
            size=None,
        )
    assert e.value.code == "too_large"
    assert not (tmp_path / "q.efpkg.part").exists()


def test_digest_mismatch(http_server: Callable[[Behaviour], str], tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as e:
        fetch(http_server(Behaviour(DATA)), tmp_path / "p.efpkg", sha256="0" * 64, max_bytes=10**6)
    assert e.value.code == "digest_mismatch"
    assert not (tmp_path / "p.efpkg").exists()


def test_agent_installs_over_http_through_cuts(
    http_server: Callable[[Behaviour], str],
    pkgs: dict[str, Path],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    data = pkgs["v2"].read_bytes()
    url = http_server(Behaviour(data, cut_after=4000, cuts_left=2))
    agent = agent_factory(v1_copy)
    sha = hashlib.sha256(data).hexdigest()
    view = agent.wait_update(
        agent.submit_update(UpdateRequest("iris", "1.1.0", url, sha256=sha, size=len(data))), 60
    )
    assert view["state"] == "COMMITTED", view
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.1.0"


def test_agent_truncated_download_keeps_old_model(
    http_server: Callable[[Behaviour], str],
    pkgs: dict[str, Path],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    data = pkgs["v2"].read_bytes()
    url = http_server(Behaviour(data, cut_after=3000, cuts_left=100, ranges=False))
    agent = agent_factory(v1_copy, download_retries=1)
    view = agent.wait_update(agent.submit_update(UpdateRequest("iris", "", url)), 60)
    assert view["state"] == "FAILED" and view["reason_code"] == "download_incomplete", view
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.0.0"


def test_download_token_sent_only_for_controller_sources(
    http_server: Callable[[Behaviour], str],
    pkgs: dict[str, Path],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    """The device's download token goes with packages the controller's signed desired state
    names, and never to a source an operator typed (it must not leak to another host)."""
    data = pkgs["v2"].read_bytes()
    b = Behaviour(data, token="device-secret")
    url = http_server(b)
    agent = agent_factory(v1_copy, download_token="device-secret", download_retries=0)
    view = agent.wait_update(agent.submit_update(UpdateRequest("iris", "1.1.0", url)), 60)
    assert view["state"] == "FAILED" and view["reason_code"] == "http_error", view
    assert "401" in view["reason"] and b.authorizations == [None]
    req = UpdateRequest("iris", "1.1.0", url, controller_source=True)
    view = agent.wait_update(agent.submit_update(req), 60)
    assert view["state"] == "COMMITTED", view
    assert b.authorizations[1:] == ["Bearer device-secret"]
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.1.0"


def test_http_fetcher_is_the_updaters_fetcher(tmp_path: Path) -> None:
    from edgefleet.agent.download import HttpFetcher
    from edgefleet.agent.update import Fetcher

    src = tmp_path / "pkg.bin"
    src.write_bytes(b"x" * 100)
    fetcher: Fetcher = HttpFetcher(timeout_s=1.0, retries=0)  # mypy checks the Protocol
    got = fetcher.fetch(str(src), tmp_path / "d" / "p.efpkg", sha256=None, size=100, max_bytes=1000)
    assert (got.size, got.path.read_bytes()) == (100, b"x" * 100)
    with pytest.raises(DownloadError) as ei:
        fetcher.fetch(str(src), tmp_path / "e" / "p.efpkg", sha256=None, size=None, max_bytes=10)
    assert ei.value.code == "too_large"
    fetcher.discard(got.path)
    assert not got.path.exists()
