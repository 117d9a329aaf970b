"""Controller replicas as real processes: three `edgefleet controller serve` on one PostgreSQL
database of their own and one Mosquitto; the leader is killed (SIGKILL) in the middle of a wave.

Another replica takes the lease within the lease time; the rollout finishes with exact counts; no
device sees two different desired states under one seq; every status report and telemetry record
is in the database exactly once (the agent's outbox keeps each until the controller's ack).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from edgefleet.cloud_controller import auth, db
from edgefleet.cloud_controller.drift.models import TelemetryRecord
from edgefleet.cloud_controller.models import Device, RolloutDevice
from edgefleet.keys import KeyPair, generate_keypair, load_private_key
from tests.controller.conftest import wait_for
from tests.controller.simdevice import SimDevice
from tests.controller.test_api import upload
from tests.support.services import Mosquitto, free_port

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def own_database(base: str) -> Iterator[str]:
    """A PostgreSQL database of this test's own (created, then dropped)."""
    import psycopg

    name = f"edgefleet_replicas_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base, autocommit=True, connect_timeout=5) as c:
        c.execute(f"CREATE DATABASE {name}")
    head, _, _ = base.rpartition("/")
    try:
        yield f"{head}/{name}"
    finally:
        with psycopg.connect(base, autocommit=True, connect_timeout=5) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.url}/healthz", timeout=2)
        except httpx.HTTPError:
            return None
        return dict(r.json()) if r.status_code == 200 else None

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_replica(
    name: str, workdir: Path, db_url: str, broker: Mosquitto, key: Path, trusted: Path, ttl: float
) -> Replica:
    port = free_port()
    log = workdir / f"{name}.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "EDGEFLEET_CONTROLLER_SIGNING_KEY": str(key),
        "EDGEFLEET_CONTROLLER_LEASE_TTL_S": str(ttl),
        "EDGEFLEET_CONTROLLER_LEASE_RENEW_S": str(ttl / 5),
    }
    cmd = [
        sys.executable,
        "-m",
        "edgefleet",
        "controller",
        "serve",
        "--db",
        db_url,
        "--broker",
        broker.url,
        "--port",
        str(port),
        "--data-dir",
        str(workdir / name),
        "--packages",
        str(workdir / "packages"),
        "--trusted-key",
        str(trusted),
        "--replica-id",
        name,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    return Replica(name, port, proc, log)


def wait_healthy(replicas: list[Replica], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for r in replicas:
        while r.health() is None:
            if not r.alive() or time.monotonic() > deadline:
                raise AssertionError(f"{r.name} did not start:\n{r.log.read_text()[-3000:]}")
            time.sleep(0.1)


def leaders(replicas: list[Replica]) -> list[Replica]:
    return [r for r in replicas if r.alive() and (h := r.health()) and h.get("leader")]


def run_failover(
    tmp_path: Path,
    postgres_url: str,
    broker: Mosquitto,
    packager_key: KeyPair,
    packages: dict[str, Path],
    *,
    devices: int,
    waves: list[int],
    telemetry_per_device: int,
    ttl: float,
) -> float:
    """The scenario; returns the takeover time (kill to a new leader answering /healthz)."""
    key = generate_keypair(tmp_path / "keys", "controller")
    with own_database(postgres_url) as url:
        engine = db.make_engine(url)
        db.upgrade(engine)
        with db.transaction(db.session_factory(engine)) as s:
            admin = auth.create_token(s, "admin", "replica-test")
        replicas = [
            start_replica(
                f"r{i}", tmp_path, url, broker, key.private_path, packager_key.public_path, ttl
            )
            for i in range(1, 4)
        ]
        sims: list[SimDevice] = []
        try:
            wait_healthy(replicas)
            wait_for(lambda: len(leaders(replicas)) == 1, 30, "one leader")
            pub = load_private_key(key.private_path).public_key()
            tag = uuid.uuid4().hex[:6]
            ids = [f"rep-{tag}-{i}" for i in range(devices)]
            sims = [SimDevice(d, broker.host, broker.port, pub, hold=True).start() for d in ids]
            telemetry: dict[str, list[int]] = {d.device_id: [] for d in sims}

            def send_telemetry(n: int) -> None:
                for d in sims:
                    telemetry[d.device_id] += d.telemetry(n)

            per_phase = telemetry_per_device // 3
            send_telemetry(per_phase)
            hdr = {"Authorization": f"Bearer {admin}"}
            # the API on a follower: every replica serves it
            follower = next(r for r in replicas if r not in leaders(replicas))
            with httpx.Client(base_url=follower.url, headers=hdr, timeout=30) as api:
                for p in packages.values():
                    assert upload(api, p).status_code == 201
                wait_for(
                    lambda: set(ids) <= {d["device_id"] for d in api.get("/api/v1/devices").json()},
                    what="presence of every device",
                )
                r = api.post(
                    "/api/v1/rollouts",
                    json={
                        "model": "iris",
                        "version": "2.0.0",
                        "target": {"device_ids": ids},
                        "waves": waves,
                        "device_timeout_s": 120,
                        "seed": 3,
                    },
                )
                assert r.status_code == 201, r.text
                rid = r.json()["id"]
            first_wave = round(devices * waves[0] / 100)
            wait_for(lambda: sum(len(d.held) for d in sims) == first_wave, 30, "wave 1 dispatched")
            held = [d for d in sims if d.held]
            # half of wave 1 answers, then the leader dies, then the other half answers
            for d in held[: len(held) // 2]:
                d.release()
            (leader,) = leaders(replicas)
            send_telemetry(per_phase)
            killed_at = time.monotonic()
            leader.proc.send_signal(signal.SIGKILL)
            leader.proc.wait(10)
            for d in held[len(held) // 2 :]:
                d.release()
            for d in sims:
                d.hold = False  # later waves: act at once
            send_telemetry(telemetry_per_device - 2 * per_phase)
            survivors = [r for r in replicas if r is not leader]
            wait_for(lambda: len(leaders(survivors)) == 1, 30, "a new leader")
            takeover = time.monotonic() - killed_at
            (new_leader,) = leaders(survivors)
            print(f"\nleader {leader.name} killed; {new_leader.name} took over in {takeover:.2f}s")

            with httpx.Client(base_url=new_leader.url, headers=hdr, timeout=30) as api:

                def finished() -> dict[str, Any] | None:
                    body = dict(api.get(f"/api/v1/rollouts/{rid}").json())
                    return body if body["phase"] in ("succeeded", "aborted") else None

                done = wait_for(finished, 90, "rollout end after failover")
            assert done["phase"] == "succeeded", done
            assert done["counts"]["states"] == {"succeeded": devices}
            assert all(d.version == "2.0.0" and not d.rejected for d in sims)
            assert all(len(d.entries) == 1 for d in sims), "one dispatch per device"
            assert sum(d.conflicts for d in sims) == 0, "two desired states under one seq"
            wait_for(
                lambda: all(d.backlog() == (0, 0) for d in sims), 60, "every report acknowledged"
            )
            with db.session_factory(engine)() as s:
                rows = dict(
                    s.execute(
                        select(TelemetryRecord.device_id, func.count())
                        .where(TelemetryRecord.device_id.in_(ids))
                        .group_by(TelemetryRecord.device_id)
                    ).all()
                )
                assert rows == {d: len(t) for d, t in telemetry.items()}, "telemetry lost/doubled"
                stored = {
                    (dev, rec)
                    for dev, rec in s.execute(
                        select(TelemetryRecord.device_id, TelemetryRecord.record_id).where(
                            TelemetryRecord.device_id.in_(ids)
                        )
                    )
                }
                assert stored == {(d, i) for d, t in telemetry.items() for i in t}
                for d in sims:  # every status report the device sent is on record
                    dev = s.get(Device, d.device_id)
                    assert dev is not None
                    assert dev.last_status_seq == d.status_box.stats().last_id
                    rd = s.get(RolloutDevice, (rid, d.device_id))
                    assert rd is not None and rd.state == "succeeded"
            assert takeover <= 10.0, f"takeover took {takeover:.1f}s"
            return takeover
        finally:
            for d in sims:
                d.stop()
            for r in replicas:
                if r.alive():
                    r.proc.terminate()
            for r in replicas:
                try:
                    r.proc.wait(15)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
            engine.dispose()


def test_leader_killed_mid_wave_small(
    tmp_path: Path,
    postgres_url: str,
    broker: Mosquitto,
    packager_key: KeyPair,
    packages: dict[str, Path],
) -> None:
    run_failover(
        tmp_path,
        postgres_url,
        broker,
        packager_key,
        packages,
        devices=6,
        waves=[50, 100],
        telemetry_per_device=6,
        ttl=2.0,
    )


@pytest.mark.slow
def test_leader_killed_mid_wave_three_waves(
    tmp_path: Path,
    postgres_url: str,
    broker: Mosquitto,
    packager_key: KeyPair,
    packages: dict[str, Path],
) -> None:
    """Defaults for the lease (5 s, renewed every second), 30 devices, three waves."""
    run_failover(
        tmp_path,
        postgres_url,
        broker,
        packager_key,
        packages,
        devices=30,
        waves=[20, 50, 100],
        telemetry_per_device=60,
        ttl=5.0,
    )
