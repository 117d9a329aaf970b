"""Capture benchmark: records per second the controller's capture ingest stores in SQLite
(each record checked: dtype, shape x item size against the bytes, quota, rate, budgets), 64
records per transaction as the bridge batches them, and the time to export them as .npz.

``python -m bench.bench_capture``
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric import ec

from edgefleet.cloud_controller import db, desired
from edgefleet.cloud_controller.capture import service as svc
from edgefleet.cloud_controller.desired import Signer
from edgefleet.wire import capture as wc


def _record(rid: int, cid: str, shape: tuple[int, ...]) -> dict[str, Any]:
    x = np.random.default_rng(rid).random(shape, dtype=np.float32)
    p = np.zeros((shape[0], 3), np.float32)
    return {
        "id": rid, "kind": "row", "capture_id": cid, "model": "m", "version": "1.0.0",
        "ts": "2026-01-01T00:00:00Z",
        "inputs": {"x": wc.encode_tensor("float32", shape, x.tobytes())},
        "outputs": {"p": wc.encode_tensor("float32", p.shape, p.tobytes())},
    }  # fmt: skip


def main() -> None:
    signer = Signer(ec.generate_private_key(ec.SECP256R1()), timedelta(days=1))
    for name, shape, n in (
        ("1x4 float32", (1, 4), 2000),
        ("1x3x64x64 float32", (1, 3, 64, 64), 300),
    ):
        d = Path(tempfile.mkdtemp())
        engine = db.make_engine(f"sqlite:///{d / 'c.db'}")
        db.upgrade(engine)
        factory = db.session_factory(engine)
        with db.transaction(factory) as s:
            entry = {"version": "1.0.0", "url": "http://x", "sha256": "0" * 64}
            desired.set_model(s, signer, "gw-1", "m", entry)
            cap = svc.start_capture(
                s, model="m", devices=["gw-1"], rows=100_000, max_rows_per_minute=60_000,
                created_by="bench",
            )  # fmt: skip
            svc.activate(s, signer)
            cid = cap.id
        records = [_record(i, cid, shape) for i in range(n)]
        rate = svc.RateWindow()
        t0 = time.perf_counter()
        for k in range(0, n, 64):
            with db.transaction(factory) as s:
                svc.ingest(s, "gw-1", records[k : k + 64], datetime.now(UTC), rate)
        dt = time.perf_counter() - t0
        with db.transaction(factory) as s:
            t1 = time.perf_counter()
            parts = svc.export(s, cid, holdout=0.2, created_by="bench")
            de = time.perf_counter() - t1
            sizes = ", ".join(f"{p.part} {p.rows} rows {p.size} B" for p in parts)
        print(
            f"{name}: ingest {n} records in {dt:.2f}s = {n / dt:.0f} records/s;"
            f" export ({sizes}) in {de:.2f}s"
        )
        engine.dispose()


if __name__ == "__main__":
    main()
