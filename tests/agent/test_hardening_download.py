"""A hostile package server against the agent's downloader (TUF's endless-data and
slow-retrieval attacks), on a real HTTP server on loopback and a real agent."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.download import DownloadError, Pace, fetch
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.wire.reasons import ReasonCode, is_transient
from tests.agent.helpers import served_version

Behave = Callable[[socket.socket], None]


class _Raw(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    behave: Behave


class _RawHandler(socketserver.BaseRequestHandler):
    server: _Raw

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.recv(65536)  # the request: whatever it asks, the server does what it wants
        with contextlib.suppress(OSError):  # the client gave up: that is the point
            self.server.behave(sock)


@pytest.fixture
def raw_server() -> Iterator[Callable[[Behave], str]]:
    servers: list[_Raw] = []

    def serve(behave: Behave) -> str:
        srv = _Raw(("127.0.0.1", 0), _RawHandler)
        srv.behave = behave
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/pkg.efpkg"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def endless(sock: socket.socket) -> None:
    """No Content-Length: the body ends when the server closes, which it never does."""
    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
    block = b"\0" * 65536
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sock.sendall(block)


def trickle(every_s: float, step: int = 1) -> Behave:
    def behave(sock: socket.socket) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sock.sendall(b"x" * step)
            time.sleep(every_s)

    return behave


def test_endless_data_stops_at_the_signed_size(
    raw_server: Callable[[Behave], str], tmp_path: Path
) -> None:
    seen: list[int] = []
    with pytest.raises(DownloadError) as e:
        fetch(
            raw_server(endless),
            tmp_path / "p.efpkg",
            size=10_240,
            max_bytes=2 * 1024**3,
            retries=3,
            on_progress=seen.append,
        )
    assert e.value.code == ReasonCode.ENDLESS_DATA
    assert max(seen, default=0) <= 10_240  # not one byte past the signed size was written
    assert not (tmp_path / "p.efpkg.part").exists() and not (tmp_path / "p.efpkg").exists()


def test_slow_retrieval_is_abandoned_below_the_minimum_rate(
    raw_server: Callable[[Behave], str], tmp_path: Path
) -> None:
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as e:
        fetch(
            raw_server(trickle(0.1)),  # 10 bytes/s: each read is quick, the whole is not
            tmp_path / "p.efpkg",
            max_bytes=10**9,
            timeout_s=5.0,
            pace=Pace(min_rate=1000, window_s=1.0, deadline_s=60.0),
        )
    assert e.value.code == ReasonCode.SLOW_RETRIEVAL and "bytes/s" in e.value.message
    assert time.monotonic() - t0 < 5.0


def test_total_deadline_holds_for_a_server_just_fast_enough(
    raw_server: Callable[[Behave], str], tmp_path: Path
) -> None:
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as e:
        fetch(
            raw_server(trickle(0.05, step=100)),  # 2 kB/s: above the rate, never finishing
            tmp_path / "p.efpkg",
            max_bytes=10**9,
            pace=Pace(min_rate=100, window_s=0.5, deadline_s=1.5),
        )
    assert e.value.code == ReasonCode.SLOW_RETRIEVAL and "deadline" in e.value.message
    assert time.monotonic() - t0 < 5.0


def test_download_attack_codes_are_transient() -> None:
    assert is_transient(ReasonCode.ENDLESS_DATA) and is_transient(ReasonCode.SLOW_RETRIEVAL)


def test_agent_update_worker_survives_hostile_servers(
    raw_server: Callable[[Behave], str],
    pkgs: dict[str, Path],
    agent_factory: Callable[..., Agent],
    v1_copy: Path,
    x_iris: np.ndarray,
) -> None:
    """A real agent, configured with a minimum rate: an endless server and a trickling one each
    fail their update with their own code, nothing large is written, and the single update
    worker is free for the next (good) update."""
    agent = agent_factory(
        v1_copy, download_min_rate=1000, download_rate_window_s=1.0, download_retries=1
    )
    t0 = time.monotonic()
    req = UpdateRequest("iris", "1.1.0", raw_server(endless), size=10_240)
    view = agent.wait_update(agent.submit_update(req), 30)
    assert view["state"] == "FAILED" and view["reason_code"] == "endless_data", view
    req = UpdateRequest("iris", "1.1.0", raw_server(trickle(0.1)))
    view = agent.wait_update(agent.submit_update(req), 30)
    assert view["state"] == "FAILED" and view["reason_code"] == "slow_retrieval", view
    assert time.monotonic() - t0 < 20
    written = sum(p.stat().st_size for p in v1_copy.rglob("*") if p.is_file())
    assert written < 5 * 1024**2  # the data directory, models included: no 300 MB
    view = agent.wait_update(agent.submit_update(UpdateRequest("iris", "", str(pkgs["v2"]))), 60)
    assert view["state"] == "COMMITTED", view
    assert served_version(agent.http_port or 0, "iris", x_iris) == "1.1.0"
