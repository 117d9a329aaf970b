"""Rollouts on a noisy fleet: real agent processes behind a link that drops connections, a host
kept busy by CPU hogs, inference traffic on every device. A good release must never abort; a
bad one (broken, or truly slower) must always abort.

Configuration (environment):

- ``EDGEFLEET_CHAOS_AGENTS`` (10): agent processes;
- ``EDGEFLEET_CHAOS_ROUNDS`` (5): good releases rolled out, and as many bad ones;
- ``EDGEFLEET_CHAOS_BAD`` (``mixed``): the bad releases: ``slower`` (the same answers from a
  model with ``EDGEFLEET_CHAOS_SLOW_LAYERS`` (100) extra dense layers: 10-20 ms an inference
  instead of 0.02 ms),
  ``broken`` (its recorded outputs disagree with its model), or ``mixed`` (alternating);
- ``EDGEFLEET_CHAOS_HOGS`` (the CPU count): busy processes on the host;
- ``EDGEFLEET_CHAOS_DROP_S`` (4): mean seconds between two dropped agent-broker connections;
- ``EDGEFLEET_CHAOS_RPS`` (15): inference requests per second per device;
- ``EDGEFLEET_CHAOS_OUT``: a JSON file for the figures (also printed).

``pytest -m slow tests/chaos`` runs the full test; `test_rollout_chaos_quick` (3 agents, one good
and one slower release, one hog; 45 s on a busy 2-core host) runs in the default suite.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent import oip
from edgefleet.cloud_controller.rollout_types import TERMINAL_PHASES
from edgefleet.demo.agents import write_agent_config
from edgefleet.demo.fleet import Fleet
from edgefleet.demo.packages import host_profile
from edgefleet.demo.rollouts import rollout_body
from edgefleet.demo.spec import MODEL_NAME, FleetError, FleetSpec
from edgefleet.harness import die_with_parent, free_port, stop_processes
from edgefleet.keys import generate_keypair
from tests.chaos.proxy import FlakyProxy
from tests.chaos.slowmodel import make_slow_package
from tests.support.packages import make_package, model_inputs
from tests.support.services import require

#: After a rollout ends, how long its devices get to confirm the rollbacks it asked for.
ROLLBACK_WAIT_S = 120.0


@dataclass(frozen=True)
class ChaosConfig:
    agents: int
    rounds: int
    hogs: int
    drop_gap_s: float
    rps: float
    bad: str = "mixed"
    slow_layers: int = 100
    # The agent judges latency in windows (2 s, >= 20 requests each, 2 breaching in a row):
    # the probation and the traffic give it several judged windows.
    probation_s: float = 8.0

    @classmethod
    def from_env(cls, **defaults: Any) -> ChaosConfig:
        env = os.environ
        return cls(
            agents=int(env.get("EDGEFLEET_CHAOS_AGENTS", defaults.get("agents", 10))),
            rounds=int(env.get("EDGEFLEET_CHAOS_ROUNDS", defaults.get("rounds", 5))),
            hogs=int(env.get("EDGEFLEET_CHAOS_HOGS", defaults.get("hogs", os.cpu_count() or 2))),
            drop_gap_s=float(env.get("EDGEFLEET_CHAOS_DROP_S", defaults.get("drop_gap_s", 4.0))),
            rps=float(env.get("EDGEFLEET_CHAOS_RPS", defaults.get("rps", 15.0))),
            bad=env.get("EDGEFLEET_CHAOS_BAD", defaults.get("bad", "mixed")),
            slow_layers=int(
                env.get("EDGEFLEET_CHAOS_SLOW_LAYERS", defaults.get("slow_layers", 100))
            ),
        )


@dataclass
class RolloutResult:
    kind: str  # good | broken | slower
    version: str
    phase: str
    seconds: float
    reason: str | None
    failed: list[dict[str, Any]] = field(default_factory=list)
    rollbacks_unconfirmed: int = 0  # asked for, not confirmed by the device in time


@dataclass
class ChaosReport:
    config: dict[str, Any]
    results: list[RolloutResult] = field(default_factory=list)
    connection_drops: int = 0
    requests: int = 0
    request_errors: int = 0
    requests_model_gone: int = 0

    @property
    def good(self) -> list[RolloutResult]:
        return [r for r in self.results if r.kind == "good"]

    @property
    def bad(self) -> list[RolloutResult]:
        return [r for r in self.results if r.kind != "good"]

    def false_aborts(self) -> int:
        return sum(r.phase != "succeeded" for r in self.good)

    def detected(self, kind: str | None = None) -> int:
        return sum(r.phase == "aborted" for r in self.bad if kind in (None, r.kind))

    def summary(self) -> dict[str, Any]:
        g, b = len(self.good), len(self.bad)
        per_kind = {
            f"{k}_detected": f"{self.detected(k)}/{sum(r.kind == k for r in self.bad)}"
            for k in sorted({r.kind for r in self.bad})
        }
        return {
            **self.config,
            "good_rollouts": g,
            "false_aborts": self.false_aborts(),
            "false_abort_rate": self.false_aborts() / g if g else None,
            "bad_rollouts": b,
            "detected": self.detected(),
            "detection_rate": self.detected() / b if b else None,
            **per_kind,
            "rollbacks_unconfirmed": sum(r.rollbacks_unconfirmed for r in self.results),
            "failure_reasons": sorted(
                {str(d.get("reason_code")) for r in self.results for d in r.failed}
            ),
            "connection_drops": self.connection_drops,
            "inference_requests": self.requests,
            "inference_errors": self.request_errors,
            "inference_404_after_serving": self.requests_model_gone,
        }

    def text(self) -> str:
        lines = ["rollout chaos: " + json.dumps(self.summary())]
        for r in self.results:
            lines.append(
                f"  {r.kind:6} {r.version:7} -> {r.phase:10} in {r.seconds:5.1f}s"
                + (f"  reason: {r.reason}" if r.reason else "")
                + (
                    f"  ({r.rollbacks_unconfirmed} rollback(s) never confirmed)"
                    if r.rollbacks_unconfirmed
                    else ""
                )
            )
            for d in r.failed:
                lines.append(f"      {d}")
        return "\n".join(lines)


class ChaosFleet(Fleet):
    """The demo's fleet whose agents reach the broker through a flaky proxy."""

    proxy: FlakyProxy | None = None

    def write_agent_config(self, device_id: str) -> Path:
        assert self.proxy is not None
        port = self.agent_ports.setdefault(device_id, free_port())
        path = write_agent_config(
            self.agent_dir(device_id),
            device_id,
            spec=self.spec,
            broker_url=self.proxy.url,
            keys=self.keys,
            creds=self.credentials.get(device_id, {}),
            http_port=port,
        )
        return path


@contextmanager
def cpu_hogs(n: int) -> Iterator[None]:
    """``n`` processes that spin on a CPU each, for as long as the block runs."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )
        for _ in range(n)
    ]
    try:
        yield
    finally:
        stop_processes(procs, timeout=5, kill=True)


class Traffic:
    """Inference requests to every device at ``rps`` each (a client pool of this process)."""

    def __init__(self, ports: dict[str, int], rps: float) -> None:
        x = model_inputs("digits")[:1].astype(np.float32)
        self.body, self.headers = oip.encode_request({"X": x})
        self.ports = ports
        self.rps = rps
        self.requests = 0
        self.errors = 0
        self.lost = 0  # 404s from a device that had served the model before
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(p,), daemon=True) for p in ports.values()
        ]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def _loop(self, port: int) -> None:
        rng = random.Random(port)
        served = False
        while not self._stop.wait(rng.expovariate(self.rps)):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                c.request("POST", f"/v2/models/{MODEL_NAME}/infer", self.body, self.headers)
                status = c.getresponse().status
                c.close()
            except OSError:
                status = 0
            self.requests += 1
            if status == 404 and served:  # the model this device served is gone
                self.lost += 1
            # 404 before the device's first install is no error of a release
            self.errors += status not in (200, 404)
            served = served or status == 200


def _packages(fleet: Fleet, cfg: ChaosConfig) -> list[tuple[str, str, Path]]:
    """(kind, version, package) in rollout order: good 1.0.0, bad 1.1.0, good 1.2.0, ...

    A ``broken`` release records expected outputs its model does not produce: every device's
    validation refuses it, as it would a model miscompiled for the hardware. A ``slower`` one
    gives the same answers as the good ones, much more slowly (`tests.chaos.slowmodel`)."""
    key = generate_keypair(fleet.root / "keys", "packager")
    fleet.make_keys()
    out = fleet.root / "packages"
    bad = {"mixed": ["slower", "broken"], "slower": ["slower"], "broken": ["broken"]}[cfg.bad]
    built = []
    for i in range(cfg.rounds):
        good, worse = f"1.{2 * i}.0", f"1.{2 * i + 1}.0"
        pkg = make_package(
            out, name=MODEL_NAME, version=good, key=key, model="digits", profile=host_profile()
        )
        built.append(("good", good, pkg))
        kind = bad[i % len(bad)]
        if kind == "slower":
            pkg, _ = make_slow_package(
                out,
                name=MODEL_NAME,
                version=worse,
                key=key,
                profile=host_profile(),
                layers=cfg.slow_layers,
            )
        else:
            pkg = make_package(
                out,
                name=MODEL_NAME,
                version=worse,
                key=key,
                model="digits",
                profile=host_profile(),
                corrupt_samples=True,
            )
        built.append((kind, worse, pkg))
    return built


def run_chaos(root: Path, cfg: ChaosConfig) -> ChaosReport:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    report = ChaosReport(config=asdict(cfg))
    spec = FleetSpec(
        root,
        devices=cfg.agents,
        broker="mosquitto",
        secure=False,
        probation_s=cfg.probation_s,
        telemetry_interval_s=5.0,
        device_prefix="cx",
    )
    fleet = ChaosFleet(spec)
    plan = _packages(fleet, cfg)
    try:
        fleet.start_controller()
        fleet.register_devices()
        fleet.start_broker()
        fleet.proxy = FlakyProxy(fleet.broker.port, mean_gap_s=cfg.drop_gap_s, seed=1)
        fleet.start_agents()
        for _, _, path in plan:
            fleet.upload(path)
        fleet.wait_online(timeout=180)
        devices = spec.device_ids()
        with cpu_hogs(cfg.hogs), Traffic(fleet.agent_ports, cfg.rps) as traffic:
            fleet.proxy.start_drops()
            for kind, version, _ in plan:
                body = rollout_body(version, devices, device_timeout_s=180.0)
                t0 = time.monotonic()
                rid = fleet.create_rollout(body)
                detail = fleet.wait_rollout(
                    rid, timeout=900, until=lambda d: d["phase"] in TERMINAL_PHASES
                )
                seconds = time.monotonic() - t0
                unconfirmed = 0
                try:  # then every rollback it asked for, confirmed by its device
                    detail = fleet.wait_rollout(rid, timeout=ROLLBACK_WAIT_S)
                except FleetError:
                    detail = fleet.rollout(rid)
                    counts = detail["counts"]
                    unconfirmed = int(counts.get("rollback_requested", 0)) - int(
                        counts.get("rolled_back", 0)
                    )
                report.results.append(
                    RolloutResult(
                        kind,
                        version,
                        detail["phase"],
                        seconds,
                        detail.get("reason"),
                        [
                            {
                                k: d.get(k)
                                for k in ("device_id", "state", "reason_code", "reason", "rollback")
                            }
                            for d in detail["devices"]
                            if d["state"] not in ("succeeded", "skipped", "pending")
                        ],
                        unconfirmed,
                    )
                )
                print(report.results[-1], flush=True)
            fleet.proxy.stop_drops()
        report.connection_drops = fleet.proxy.drops
        report.requests, report.request_errors = traffic.requests, traffic.errors
        report.requests_model_gone = traffic.lost
    finally:
        if fleet.proxy is not None:
            fleet.proxy.close()
        fleet.close()
    return report


def _publish(report: ChaosReport, record: Any, name: str) -> None:
    print("\n" + report.text(), flush=True)
    record("chaos", json.dumps(report.summary()))
    out = os.environ.get("EDGEFLEET_CHAOS_OUT")
    if out:
        if name != "full":  # the quick variant beside the full one: FILE.quick.json
            out = str(Path(out).with_suffix(f".{name}.json"))
        Path(out).write_text(
            json.dumps(
                {"summary": report.summary(), "rollouts": [asdict(r) for r in report.results]},
                indent=2,
            )
        )


def _judge(report: ChaosReport) -> None:
    unconfirmed = report.summary()["rollbacks_unconfirmed"]
    assert unconfirmed == 0, f"{unconfirmed} rollback(s) never landed:\n" + report.text()
    assert report.false_aborts() == 0, "a good release did not succeed:\n" + report.text()
    assert report.detected() == len(report.bad), "a bad release was not aborted:\n" + (
        report.text()
    )


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_rollout_chaos(tmp_path: Path, record_property: Any) -> None:
    """>= 10 agents, CPU hogs, dropped links: 5 good releases succeed, 5 bad ones abort."""
    report = run_chaos(tmp_path, ChaosConfig.from_env())
    _publish(report, record_property, "full")
    _judge(report)


@pytest.mark.timeout(600)
def test_rollout_chaos_quick(tmp_path: Path, record_property: Any) -> None:
    """The same on 3 agents, one good and one slower release, one CPU hog."""
    cfg = ChaosConfig(agents=3, rounds=1, hogs=1, drop_gap_s=4.0, rps=15.0, bad="slower")
    report = run_chaos(tmp_path, cfg)
    _publish(report, record_property, "quick")
    _judge(report)
