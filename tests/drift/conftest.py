"""Drift fixtures: migrated controller databases, the iris reference, telemetry messages."""

from __future__ import annotations

import functools
import itertools
import json
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from edgefleet.drift.latency import histogram
from edgefleet.drift.reference import build_reference
from edgefleet.drift.sketch import Sketch


def migrated_factory(url: str) -> sessionmaker[Session]:
    from edgefleet.cloud_controller import db

    engine = db.make_engine(url)
    db.upgrade(engine)
    return db.session_factory(engine)


@pytest.fixture
def factory(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    f = migrated_factory(f"sqlite:///{tmp_path / 'controller.db'}")
    yield f
    bind = f.kw["bind"]
    bind.dispose()


@functools.lru_cache(maxsize=1)
def iris() -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    x = x.astype(np.float32)
    return build_reference({"X": x}, {"label": y.astype(np.int64)}), x, y


_ids = itertools.count(1)


def sketch_record(
    x: np.ndarray,
    y: np.ndarray,
    *,
    model: str = "iris",
    version: str = "1.0.0",
    at: datetime,
    rid: int | None = None,
) -> dict[str, Any]:
    ref, _, _ = iris()
    sk = Sketch(ref)
    sk.update({"X": x}, {"label": y})
    ts = at.isoformat()
    return {
        "id": rid or next(_ids),
        "at": ts,
        "kind": "sketch",
        "model": model,
        "version": version,
        "window_start": ts,
        "window_end": ts,
        "sketch": sk.to_dict(),
    }


def inference_record(
    latencies_ms: np.ndarray,
    errors: int = 0,
    *,
    model: str = "iris",
    version: str = "1.0.0",
    at: datetime,
    rid: int | None = None,
) -> dict[str, Any]:
    ts = at.isoformat()
    return {
        "id": rid or next(_ids),
        "at": ts,
        "kind": "inference",
        "model": model,
        "version": version,
        "window_start": ts,
        "window_end": ts,
        "requests": len(latencies_ms) + errors,
        "errors": errors,
        "latency_ms": {
            "p50": float(np.quantile(latencies_ms, 0.5)),
            "p95": float(np.quantile(latencies_ms, 0.95)),
        },
        "latency_hist": histogram(latencies_ms),
    }


class Hook:
    """A real loopback HTTP server recording webhook calls."""

    def __init__(self, fail_first: int = 0) -> None:
        calls: list[tuple[dict[str, str], bytes]] = []
        self.calls = calls
        self.received = threading.Event()
        self.fail_left = fail_first

        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if hook.fail_left > 0:  # a receiver that is not ready yet
                    hook.fail_left -= 1
                    self.send_response(503)
                    self.end_headers()
                    return
                calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()
                hook.received.set()

            def log_message(self, *args: Any) -> None:
                pass

        hook = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/retrain"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(b) for _, b in self.calls]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    h = Hook()
    yield h
    h.close()


class Served:
    """The real controller app (create_app) served by uvicorn on a free loopback port."""

    def __init__(self, data_dir: Path) -> None:
        import time

        import uvicorn

        from edgefleet.cloud_controller import auth
        from edgefleet.cloud_controller.app import Controller, create_app
        from edgefleet.cloud_controller.db import transaction
        from edgefleet.cloud_controller.settings import Settings
        from tests.support.services import free_port

        port = free_port()
        settings = Settings(data_dir=data_dir, port=port, tick_s=0.2)
        self.ctl = Controller.build(settings)
        with transaction(self.ctl.factory) as s:
            self.admin = auth.create_token(s, "admin", "drift-admin")
            self.viewer = auth.create_token(s, "viewer", "drift-viewer")
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, self.ctl),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="on",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("controller did not start")
            time.sleep(0.02)

    @property
    def factory(self) -> sessionmaker[Session]:
        return self.ctl.factory  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
