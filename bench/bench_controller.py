"""Controller benchmarks: status messages absorbed per second, and the pure engine's speed.

``python -m bench.bench_controller [--quick] [--devices N] [--broker mosquitto|amqtt]``

1. Status absorption over a real broker: one rollout to N devices, each device sends four
   status messages (DOWNLOADING, VALIDATING, PROBATION, COMMITTED) through MQTT; we time from
   the first publish until the rollout has succeeded (every message parsed, de-duplicated,
   stored, fed to the engine). The bridge's batched worker (500 messages per transaction) is
   compared with one transaction per message (the baseline), in the same run, on SQLite.
2. The pure engine: plan() and one StatusReport per device for N devices, in events/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()
STATES = ("DOWNLOADING", "VALIDATING", "PROBATION", "COMMITTED")


def _setup_db(root: Path, n: int) -> Any:
    from edgefleet.cloud_controller import db, devices
    from edgefleet.cloud_controller.models import Package

    engine = db.make_engine(f"sqlite:///{root / 'c.db'}")
    db.upgrade(engine)
    factory = db.session_factory(engine)
    now = datetime.now(UTC)
    with db.transaction(factory) as s:
        s.add(
            Package(
                name="iris", version="2.0.0", profile="cpu-x86_64", filename="x", sha256="0" * 64,
                size=1, key_id="k", manifest={}, uploaded_at=now, uploaded_by="bench",
            )
        )  # fmt: skip
        for i in range(n):
            devices.apply_presence(
                s,
                f"b{i:05d}",
                {"online": True, "profiles": ["cpu-x86_64"], "installed": {}},
                now,
            )
    return engine, factory


def absorb(n: int, broker_url: str, host: str, port: int, batch: int) -> dict[str, float]:
    """Seconds for the controller to take in 4*n status messages and finish the rollout."""
    import paho.mqtt.client as mqtt

    from edgefleet.cloud_controller.desired import Signer
    from edgefleet.cloud_controller.mqtt_bridge import MqttBridge
    from edgefleet.cloud_controller.rollouts import RolloutService
    from edgefleet.wire.mqtt import topic

    root = Path(tempfile.mkdtemp(prefix="bench-ctl-"))
    try:
        from datetime import timedelta

        from cryptography.hazmat.primitives.asymmetric import ec

        engine, factory = _setup_db(root, n)
        signer = Signer(ec.generate_private_key(ec.SECP256R1()), timedelta(days=7))
        svc = RolloutService(factory, signer, "http://127.0.0.1:1", health=None)
        bridge = MqttBridge(broker_url, factory, svc, batch_size=batch)
        svc.publish = bridge.publish
        bridge.start()
        if not bridge.wait_connected(20):
            raise RuntimeError("controller bridge did not connect")
        t0 = time.perf_counter()
        st = svc.create(
            {
                "model": "iris",
                "version": "2.0.0",
                "target": {"groups": [], "tags": [], "device_ids": [f"b{i:05d}" for i in range(n)]},
                "waves": [100],
                "device_timeout_s": 3600,
            },
            "bench",
        )
        t_create = time.perf_counter() - t0
        rid = st.spec.rollout_id
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{batch}")
        pub.max_inflight_messages_set(1000)
        pub.max_queued_messages_set(0)
        pub.connect(host, port)
        pub.loop_start()
        t0 = time.perf_counter()
        last = None
        for seq, state in enumerate(STATES, 1):
            for i in range(n):
                dev = f"b{i:05d}"
                msg = {
                    "device_id": dev, "seq": seq, "model": "iris", "version": "2.0.0",
                    "rollout_id": rid, "state": state, "reason_code": None, "reason": None,
                    "at": time.time(), "benchmark": {"p95_ms": 1.0},
                }  # fmt: skip
                last = pub.publish(topic(dev, "status"), json.dumps(msg), qos=1)
        assert last is not None
        last.wait_for_publish(120)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            got = svc.get_state(rid)
            if got is not None and got.phase.value == "succeeded":
                break
            time.sleep(0.02)
        else:
            raise RuntimeError("rollout did not finish within 300 s")
        elapsed = time.perf_counter() - t0
        pub.loop_stop()
        pub.disconnect()
        bridge.stop()
        engine.dispose()
        return {"create_s": t_create, "absorb_s": elapsed, "msgs": 4.0 * n}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def engine_speed(n: int) -> dict[str, float]:
    from edgefleet.cloud_controller import rollout_engine as E

    devs = [E.DeviceInfo(f"d{i}", ("cpu-x86_64",), ("all",)) for i in range(n)]
    spec = E.RolloutSpec("r", "iris", "2.0.0", E.Target(groups=("all",)), waves=(100.0,))
    t0 = time.perf_counter()
    d = E.plan(spec, devs, ["cpu-x86_64"], 0.0)
    t_plan = time.perf_counter() - t0
    st = d.state
    t0 = time.perf_counter()
    for i in range(n):
        st = E.handle(st, E.StatusReport(f"d{i}", "2.0.0", "COMMITTED"), 1.0).state
    t_events = time.perf_counter() - t0
    assert st.phase == E.Phase.SUCCEEDED
    return {"plan_s": t_plan, "events_s": t_events}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_controller")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--broker", default="mosquitto", choices=["mosquitto", "amqtt"])
    args = ap.parse_args(argv)
    n = args.devices or (200 if args.quick else 1000)
    from edgefleet.devbroker import embedded_broker

    kind = args.broker if shutil.which("mosquitto") or args.broker == "amqtt" else "amqtt"
    work = Path(tempfile.mkdtemp(prefix="bench-broker-"))
    broker = embedded_broker(kind, work)  # type: ignore[arg-type]
    broker.start()
    try:
        url = f"mqtt://{broker.host}:{broker.port}"
        base = absorb(n, url, broker.host, broker.port, batch=1)
        fast = absorb(n, url, broker.host, broker.port, batch=500)
    finally:
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    eng = engine_speed(n)
    t = Table(title=f"controller: {n} devices, {kind} broker, SQLite")
    for col in ("measure", "value", "baseline (1 msg/txn)", "ratio"):
        t.add_column(col, justify="right" if col != "measure" else "left")
    rate_fast = fast["msgs"] / fast["absorb_s"]
    rate_base = base["msgs"] / base["absorb_s"]
    t.add_row(
        "status msgs absorbed /s", f"{rate_fast:,.0f}", f"{rate_base:,.0f}",
        f"{rate_fast / rate_base:.1f}x",
    )  # fmt: skip
    t.add_row(
        f"{int(fast['msgs'])} statuses -> rollout done (s)", f"{fast['absorb_s']:.2f}",
        f"{base['absorb_s']:.2f}", f"{base['absorb_s'] / fast['absorb_s']:.1f}x faster",
    )  # fmt: skip
    t.add_row(
        "create rollout: plan, sign + persist desired (s)", f"{fast['create_s']:.2f}", "-", "-"
    )
    t.add_row("engine plan (ms)", f"{eng['plan_s'] * 1000:.1f}", "-", "-")
    t.add_row(
        "engine status events /s (pure)", f"{n / eng['events_s']:,.0f}", "-", "-"
    )  # fmt: skip
    console.print(t)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
