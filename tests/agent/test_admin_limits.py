"""The agent's admin endpoint under idle sockets: real sockets, real threads counted."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from edgefleet.agent.admin import AdminServer
from edgefleet.agent.config import dump_config, load_config


class _Agent:
    def __init__(self, config: Any) -> None:
        self.config = config

    def inventory(self) -> dict[str, Any]:
        return {"device_id": self.config.device_id, "models": {}}

    def updates(self, n: int) -> list[Any]:
        return []


def _status(port: int, token: str) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/status", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        json.loads(r.read())
        return int(r.status)


def test_300_idle_sockets_cost_the_connection_cap_in_threads_not_300(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        dump_config(
            {"device_id": "gw-1", "data_dir": "data", "admin_max_connections": 8,
             "admin_timeout_s": 1.0}
        )
    )  # fmt: skip
    cfg = load_config(path, env={})
    cfg.data_dir.mkdir()
    srv = AdminServer(_Agent(cfg))  # type: ignore[arg-type]
    port = srv.server_address[1]
    loop = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    base = threading.active_count()
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        # most are refused at once without a thread (a few more get a slot as the first
        # ones time out, on a loaded machine); the threads never exceed the cap
        deadline = time.monotonic() + 10
        while srv.refused_connections < 250:
            assert threading.active_count() <= base + 8, threading.active_count()
            assert time.monotonic() < deadline, srv.refused_connections
            time.sleep(0.05)
        assert threading.active_count() <= base + 8, threading.active_count()
        # the idle ones are closed after admin_timeout_s: the endpoint answers again
        deadline = time.monotonic() + 10
        while True:
            try:
                assert _status(port, srv.token) == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the admin endpoint never freed its slots"
                time.sleep(0.2)
        assert threading.active_count() <= base + 8
    finally:
        for s in socks:
            s.close()
        srv.shutdown()
        srv.server_close()
        loop.join(5)
