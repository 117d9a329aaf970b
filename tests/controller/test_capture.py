"""Capture on demand with real parts: Mosquitto, the controller (API, bridge, ticker) on SQLite
and PostgreSQL, the agent's capture service, outbox and delivery on the real wire, a real ONNX
model answering the sampled requests, and the packager's npz reader on the export.

A device that allows capture sends its rows and stops at its share; one whose config forbids it
says ``capture_forbidden`` once and never publishes a raw tensor. Adversarial records (unknown
capture, wrong model, over quota, lying shapes and dtypes, oversize, a flood) are refused and
counted, never stored; retention deletes ended captures."""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from edgefleet.agent.capture import CaptureService
from edgefleet.agent.config import AgentConfig, CaptureConfig
from edgefleet.agent.mqtt.delivery import Delivery
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.keys import KeyPair
from edgefleet.wire import capture as wc
from edgefleet.wire.mqtt import Kind, topic, verify_desired
from edgefleet.wire.reasons import CaptureReason
from tests.controller.conftest import Running, start_controller
from tests.support.packages import _model_bytes, model_inputs

pytestmark = pytest.mark.timeout(120)
MODEL = "iris"


class CaptureDevice:
    """The agent's capture path on the wire: desired states verified and handed to
    `CaptureService.apply`, records delivered by `Delivery` and released on the controller's
    ack. Every capture payload it publishes is recorded."""

    def __init__(
        self, device_id: str, broker: Any, key: ec.EllipticCurvePublicKey, data: Path, allowed: bool
    ) -> None:
        self.device_id, self.key = device_id, key
        cfg = AgentConfig(
            device_id=device_id, data_dir=data, capture=CaptureConfig(allowed=allowed)
        )
        self.capture = CaptureService(None, cfg)
        self.delivery = Delivery(
            device_id, Outbox(data / "status.sqlite"), None, capture=self.capture.outbox,
            acks="on", resend_after_s=2.0,
        )  # fmt: skip
        self.published: list[dict[str, Any]] = []
        self.jobs: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.jobs.put((m.topic, bytes(m.payload)))
        self.client.on_publish = lambda _c, _u, mid, *_a: self.delivery.on_puback(mid)
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _on_connect(self, client: Any, *_a: Any) -> None:
        client.subscribe([(topic(self.device_id, "desired"), 1), (topic(self.device_id, "ack"), 1)])
        self.since = time.monotonic()
        self.connected.set()

    def _publish(self, kind: Kind, payload: bytes) -> int:
        self.published.append(json.loads(payload))
        return self.client.publish(topic(self.device_id, kind), payload, qos=1).mid

    def _run(self) -> None:
        last_seq: int | None = None
        while not self.stopping.is_set():
            try:
                t, raw = self.jobs.get(timeout=0.05)
            except queue.Empty:
                t, raw = "", b""
            if t.endswith("/desired") and raw:
                state = verify_desired(raw, [self.key], device_id=self.device_id, last_seq=None)
                if last_seq is None or state["seq"] > last_seq:
                    last_seq = state["seq"]
                    self.capture.apply(state)
            elif t.endswith("/ack"):
                self.delivery.on_ack_message(raw)
            self.capture.drain(1.0)
            self.delivery.drain_acks()
            if self.connected.is_set():
                self.delivery.flush(self._publish, self.since)

    def serve(self, n: int) -> None:
        """``n`` requests answered by the real iris model, each seen by the capture observer."""
        import onnxruntime as ort

        onnx, _ = _model_bytes(MODEL, 0)
        sess = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        x = model_inputs(MODEL)
        for i in range(n):
            row = x[i % len(x) : i % len(x) + 1]
            outs = sess.run(None, {name: row})
            outputs = {o.name: v for o, v in zip(sess.get_outputs(), outs, strict=True)}
            self.capture.observe(MODEL, "1.0.0", {name: row}, outputs, 0.001, True)

    def raw_records(self) -> list[dict[str, Any]]:
        return [r for p in self.published for r in p["records"]]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.client.disconnect()
        self.client.loop_stop()
        self.capture.stop()


def _start_capture(run: Running, devices: list[str], rows: int, per_minute: int) -> str:
    """Start a capture of MODEL on ``devices`` through the API (as an operator); its id."""
    r = run.client("operator").post(
        "/api/v1/captures",
        json={"model": MODEL, "devices": devices, "rows": rows, "max_rows_per_minute": per_minute},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _manage(run: Running, devices: list[str]) -> None:
    """Each device's desired state names the model (what a rollout leaves there)."""
    from edgefleet.cloud_controller import desired
    from edgefleet.cloud_controller.db import transaction

    ctl = run.controller
    with transaction(ctl.factory) as s:
        rows = [
            desired.set_model(
                s,
                ctl.signer,
                d,
                MODEL,
                {"version": "1.0.0", "url": "http://x/p", "sha256": "0" * 64},
            )
            for d in devices
        ]
        for r in rows:
            s.expunge(r)
    ctl.rollouts.publish_committed(rows)


def _cli(run: Running, role: str, *args: str) -> str:
    from edgefleet.cli import app

    token = run.admin if role == "admin" else run.tokens[role]
    res = CliRunner().invoke(app, [*args, "--url", run.url, "--token", token])
    assert res.exit_code == 0, res.output
    return res.output


def _wait(pred: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


class RawDevice:
    """A device that speaks the capture protocol by hand (no agent): publishes what a test
    gives it and collects the controller's acks."""

    def __init__(self, broker: Any, device_id: str) -> None:
        self.id = device_id
        self.acks: list[dict[str, Any]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id)
        self.client.on_message = lambda _c, _u, m: self.acks.append(json.loads(m.payload))
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic(device_id, "ack"), qos=1)
        self.client.loop_start()
        time.sleep(0.3)  # subscribed before anything is acked

    def publish_capture(self, payload: bytes | str) -> None:
        self.client.publish(topic(self.id, "capture"), payload, qos=1)

    def acked(self) -> set[int]:
        """The capture record ids the controller acknowledged."""
        return {i for a in self.acks for i in a.get("capture", [])}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def ctl(tmp_path: Path, broker: Any, db_url: str, packager_key: KeyPair) -> Iterator[Running]:
    run = start_controller(
        tmp_path / "ctl", trusted=[packager_key.public_path], broker_url=broker.url, db_url=db_url
    )
    try:
        assert run.controller.bridge.wait_connected(10)
        yield run
    finally:
        run.stop()


def test_capture_start_rows_export_and_a_device_that_forbids_it(
    ctl: Running, broker: Any, tmp_path: Path
) -> None:
    from edgefleet.packager.npzio import load_npz
    from edgefleet.packager.pipeline import _load_data

    tag = tmp_path.name[-8:].replace("_", "-")
    ok_id, no_id = f"cap-ok-{tag}", f"cap-no-{tag}"
    _manage(ctl, [ok_id, no_id])
    key = ctl.controller.signer.key.public_key()
    ok = CaptureDevice(ok_id, broker, key, tmp_path / "ok", allowed=True)
    no = CaptureDevice(no_id, broker, key, tmp_path / "no", allowed=False)
    try:
        t0 = time.monotonic()
        cid = _cli(
            ctl, "operator", "capture", "start", MODEL, "--devices", f"{ok_id},{no_id}",
            "--rows", "40", "--sample-rate", "1", "--max-rows-per-minute", "600",
        ).strip()  # fmt: skip
        assert wc.is_capture_id(cid)  # the id alone: scripts read it
        assert _wait(lambda: ok.capture._active and no.capture.progress())
        ok.serve(60)  # more requests than its share of 20: it stops at 20
        no.serve(60)
        viewer = ctl.client("viewer")

        def done() -> bool:
            c = viewer.get(f"/api/v1/captures/{cid}").json()
            per = c["per_device"]
            return (
                per[ok_id]["rows"] == 20
                and per[ok_id]["done"] == "rows"
                and per[no_id]["forbidden"]
            )

        assert _wait(done), viewer.get(f"/api/v1/captures/{cid}").json()
        capture_s = time.monotonic() - t0
        assert _wait(lambda: ok.capture.outbox.stats().pending == 0)  # all acked
        # the forbidding device said so once, and never published a tensor
        kinds = [r["kind"] for r in no.raw_records()]
        assert kinds == ["refused"] and no.raw_records()[0]["reason"] == "capture_forbidden"
        assert no.capture.outbox.stats().pending == 0
        assert sum(r["kind"] == "row" for r in ok.raw_records()) == 20
        metrics = viewer.get("/metrics").text
        assert "edgefleet_capture_records_stored_total 20.0" in metrics
        assert 'edgefleet_mqtt_messages_total{kind="capture"}' in metrics
        # export: the packager's reader takes both files, with the model's input name
        cal, val = tmp_path / "cal.npz", tmp_path / "val.npz"
        out = _cli(
            ctl, "publisher", "capture", "export", cid, "--out", str(cal),
            "--holdout", "0.25", "--holdout-out", str(val), "--seed", "7",
        )  # fmt: skip
        lines = out.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("ds-")
        import hashlib

        assert lines[0].split()[1] == hashlib.sha256(cal.read_bytes()).hexdigest()
        c_arr, v_arr = _load_data(cal, ["X"], "calibration"), _load_data(val, ["X"], "validation")
        assert c_arr["X"].shape == (15, 4) and v_arr["X"].shape == (5, 4)
        assert c_arr["X"].dtype == np.float32
        assert load_npz(val)["output:probabilities"].shape == (5, 3)
        # rows are the device's: every exported row is one of the iris inputs it served
        x = model_inputs(MODEL)
        assert all((x == r).all(axis=1).any() for r in np.concatenate([c_arr["X"], v_arr["X"]]))
        shown = json.loads(_cli(ctl, "viewer", "capture", "show", cid, "--json"))
        (ds,) = [d for d in shown["datasets"] if d["part"] == "calibration"]
        assert ds["lineage"]["devices"] == [ok_id] and ds["lineage"]["versions"] == ["1.0.0"]
        assert ds["rows"] == 15 and ds["lineage"]["seed"] == 7
        # a viewer may not export raw data
        r = ctl.client("viewer").post(f"/api/v1/captures/{cid}/export", json={})
        assert r.status_code == 403
        print(f"capture of 20 rows from the allowed device: {capture_s:.2f}s")
    finally:
        ok.stop()
        no.stop()


def _tensor(arr: np.ndarray) -> dict[str, Any]:
    return wc.encode_tensor(arr.dtype.name, arr.shape, arr.tobytes())


def _row(cid: str, rid: int, **kw: Any) -> dict[str, Any]:
    x = np.ones((1, 4), np.float32)
    rec = {
        "id": rid, "kind": "row", "capture_id": cid, "model": MODEL, "version": "1.0.0",
        "ts": "2026-01-01T00:00:00Z", "inputs": {"X": _tensor(x)},
        "outputs": {"probabilities": _tensor(np.ones((1, 3), np.float32))},
    }  # fmt: skip
    rec.update(kw)
    return rec


def test_adversarial_records_are_refused_counted_and_never_stored(
    ctl: Running, broker: Any, tmp_path: Path
) -> None:
    from sqlalchemy import func, select

    from edgefleet.cloud_controller.capture import service as svc
    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.models import CapturedRow

    dev = f"cap-adv-{tmp_path.name[-8:].replace('_', '-')}"
    _manage(ctl, [dev])
    cid = _start_capture(ctl, [dev], rows=5, per_minute=1)
    huge = {"dtype": "float32", "shape": [2**40, 2**40], "data": "AAAA"}
    lying = {"dtype": "float32", "shape": [1, 4], "data": base64.b64encode(b"\0" * 12).decode()}
    records = [
        _row("cap-" + "0" * 16, 1),  # unknown capture
        _row(cid, 2, model="other"),  # wrong model
        _row(cid, 6, version="9.9.9"),  # a version the device neither runs nor was asked to
        _row(cid, 3, inputs={"X": lying}),  # shape says 16 bytes, data has 12
        _row(cid, 4, inputs={"X": {**lying, "dtype": "object"}}),  # dtype outside the list
        _row(cid, 5, inputs={"X": huge}),  # 2**80 elements: refused before decoding
        *[_row(cid, 10 + i) for i in range(8)],  # a flood past 5 rows and 1 row/minute
    ]
    pub = RawDevice(broker, dev)
    try:
        pub.publish_capture(json.dumps({"records": records}))
        # over the message cap: refused whole, before parsing
        pub.publish_capture(b"{" + b" " * (2 * 1024**2 + 1) + b"}")
        want = {1, 2, 3, 4, 5, 6, *range(10, 18)}
        assert _wait(lambda: pub.acked() >= want), pub.acks
    finally:
        pub.close()
    drops = ctl.controller.bridge.stats.dropped
    assert drops.get("capture_unknown") == 1 and drops.get("capture_wrong_model") == 1
    assert drops.get("capture_wrong_version") == 1
    assert drops.get("capture_bad_tensor") == 2 and drops.get("capture_too_large", 0) >= 1
    assert drops.get("capture_too_large") == 2  # the huge tensor and the oversize message
    c = ctl.client("viewer").get(f"/api/v1/captures/{cid}").json()
    per = c["per_device"][dev]
    # 1 row per minute: the controller lets twice that through, the rest is the flood
    assert per["rows"] == c["rows"] == 2 and per["refused"]["capture_rate"] == 6
    with transaction(ctl.controller.factory) as s:
        assert s.scalar(select(func.count()).select_from(CapturedRow)) == 2
        # a resend of a stored record is acked, not stored twice
        res = svc.ingest(s, dev, [_row(cid, 10)], datetime.now(UTC), svc.RateWindow())
        assert res.acked == [10] and res.stored == 0
        # beyond the 5 rows asked of this device (a minute apart each: not a flood; the
        # rate counts the stored rows, whichever replica's window asks)
        t = datetime.now(UTC)
        results = [
            svc.ingest(
                s, dev, [_row(cid, 20 + i)], t + timedelta(seconds=61 * (i + 1)), svc.RateWindow()
            )
            for i in range(4)
        ]
        assert [r.stored for r in results] == [1, 1, 1, 0]
        assert results[-1].refused == {"capture_over_quota": 1}
        assert s.scalar(select(func.count()).select_from(CapturedRow)) == 5


def test_retention_deletes_ended_captures(ctl: Running, tmp_path: Path) -> None:
    from sqlalchemy import func, select

    from edgefleet.cloud_controller.capture import service as svc
    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.models import CaptureDataset, CapturedRow, CaptureSession

    dev = f"cap-ret-{tmp_path.name[-8:].replace('_', '-')}"
    _manage(ctl, [dev])
    lim = svc.CaptureLimits(retention_days=1.0)
    now = datetime.now(UTC)
    with transaction(ctl.controller.factory) as s:
        cap = svc.start_capture(s, model=MODEL, devices=[dev], rows=3, created_by="t", lim=lim)
        svc.activate(s, ctl.controller.signer, now)
        res = svc.ingest(s, dev, [_row(cap.id, 1), _row(cap.id, 2)], now, svc.RateWindow(), lim)
        assert res.stored == 2
        svc.export(s, cap.id, created_by="t")
        cid = cap.id
    with transaction(ctl.controller.factory) as s:
        _, counts = svc.tick(s, ctl.controller.signer, now + timedelta(hours=25), lim)
        assert counts["expired"] == 1 and counts["deleted"] == 0  # ended, still kept
    with transaction(ctl.controller.factory) as s:
        _, counts = svc.tick(s, ctl.controller.signer, now + timedelta(hours=50), lim)
        assert counts["deleted"] == 1
        for table in (CaptureSession, CapturedRow, CaptureDataset):
            assert s.scalar(select(func.count()).select_from(table)) == 0
    assert ctl.client("viewer").get(f"/api/v1/captures/{cid}").status_code == 404


def test_tensor_bounds_are_checked_before_anything_is_decoded() -> None:
    ok = _tensor(np.arange(6, dtype=np.int64).reshape(2, 3))
    t = wc.decode_tensor(ok, "x", wc.MAX_RECORD_BYTES)
    assert t.shape == (2, 3) and len(t.data) == 48
    cases = {
        CaptureReason.BAD_TENSOR: [
            {**ok, "dtype": "object"},
            {**ok, "dtype": ">f4"},
            {**ok, "shape": [2, -3]},
            {**ok, "shape": [2, True]},
            {**ok, "shape": [1] * 9},
            {**ok, "shape": [2, 2]},  # 32 bytes declared, 48 sent
            {**ok, "data": "!" * len(str(ok["data"]))},
        ],
        # the product stops at the cap: a 2**200-element declaration is never multiplied out
        CaptureReason.TOO_LARGE: [
            {**ok, "shape": [2**100, 2**100]},
            {**ok, "shape": [wc.MAX_RECORD_BYTES // 8 + 1]},
        ],
    }
    for code, values in cases.items():
        for v in values:
            with pytest.raises(wc.CaptureError) as e:
                wc.decode_tensor(v, "x", wc.MAX_RECORD_BYTES)
            assert e.value.code == code, v
    # a record's tensors share one budget: two that fit alone do not fit together
    half = _tensor(np.zeros(wc.MAX_RECORD_BYTES // 4 // 2 + 1, np.float32)[None])
    rec = _row("cap-" + "1" * 16, 1, inputs={"a": half, "b": half})
    with pytest.raises(wc.CaptureError) as e:
        wc.parse_record(rec)
    assert e.value.code == CaptureReason.TOO_LARGE
    # the spec in the desired state
    spec = wc.parse_spec(
        {"id": "cap-" + "a" * 16, "rows": 3, "until": "2030-01-01T00:00:00Z", "sample_rate": 0.5}
    )
    assert spec is not None and spec.max_rows_per_minute == 60
    for bad in ({"id": "x", "rows": 1, "until": "2030-01-01T00:00:00Z"}, {"rows": 0}):
        with pytest.raises(wc.CaptureError):
            wc.parse_spec(bad)


def test_a_drift_event_starts_a_capture_when_the_setting_is_on(
    ctl: Running, tmp_path: Path
) -> None:
    from sqlalchemy import select

    from edgefleet.cloud_controller.capture import service as svc
    from edgefleet.cloud_controller.db import transaction
    from edgefleet.cloud_controller.drift.models import DriftEvent
    from edgefleet.cloud_controller.models import CaptureSession, DesiredState

    dev = f"cap-drift-{tmp_path.name[-8:].replace('_', '-')}"
    _manage(ctl, [dev])
    now = datetime.now(UTC)
    with transaction(ctl.controller.factory) as s:
        event = DriftEvent(
            at=now, model=MODEL, reference_id="r" * 16, scope="device", scope_key=dev,
            bucket_start=now, versions=["1.0.0"], features=["f0"], evidence={},
            webhook_state="none",
        )  # fmt: skip
        s.add(event)
        s.flush()
        assert svc.start_capture_for_event(s, event) is None  # capture_on_drift is off
        before = svc.limits()
        svc.configure(svc.CaptureLimits(on_drift=True, on_drift_rows=7))
        try:
            cid = svc.start_capture_for_event(s, event)
            assert cid is not None and svc.start_capture_for_event(s, event) == cid  # once
        finally:
            svc.configure(before)
        event_id = event.id
    # the leader's ticker sends it: the device's signed desired state carries it
    assert _wait(lambda: ctl.controller.capture_tick(force=True) is not None and _active(ctl, cid))
    with transaction(ctl.controller.factory) as s:
        cap = s.scalar(select(CaptureSession).where(CaptureSession.id == cid))
        assert cap is not None and cap.drift_event_id == event_id and cap.rows_wanted == 7
        entry = s.get(DesiredState, dev).models[MODEL]  # type: ignore[union-attr]
        assert entry["capture"]["id"] == cid and entry["capture"]["rows"] == 7


def _active(run: Running, cid: str) -> bool:
    return run.client("viewer").get(f"/api/v1/captures/{cid}").json()["state"] == "active"
