"""TelemetryService on a real Agent serving a real signed package through ONNX Runtime."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.agent.config import AgentConfig, ProbationConfig
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.agent.telemetry.outbox import Outbox
from edgefleet.agent.telemetry.service import TelemetryService, TelemetrySettings
from edgefleet.drift.decision import DriftConfig, decide
from edgefleet.drift.latency import quantile
from edgefleet.drift.reference import build_reference
from edgefleet.keys import generate_keypair
from tests.support.packages import make_package, model_inputs


def _iris_reference() -> dict:
    import onnxruntime as ort

    from tests.support.packages import _model_bytes

    onnx_bytes, _ = _model_bytes("iris", 0)
    x = model_inputs("iris")
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, {"X": x}), strict=True))
    return build_reference({"X": x}, outs)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Agent, AgentConfig, dict]]:
    tmp = tmp_path_factory.mktemp("telemetry-agent")
    key = generate_keypair(tmp / "keys")
    ref = _iris_reference()
    pkg = make_package(tmp / "pkgs", name="iris", version="1.0.0", key=key, drift_reference=ref)
    cfg = AgentConfig(
        device_id="dev-1",
        data_dir=tmp / "agent",
        trusted_keys=[key.public_path],
        probation=ProbationConfig(seconds=0.2, min_requests=1),
    )
    agent = Agent(cfg)
    agent.start(serve_http=False, serve_admin=False)
    uid = agent.submit_update(UpdateRequest(model="", version="", source=str(pkg)))
    view = agent.wait_update(uid, timeout=60)
    assert view["state"] == "COMMITTED", view
    try:
        yield agent, cfg, ref
    finally:
        agent.stop()


def test_records_cover_system_agent_inference_and_sketch(
    served: tuple[Agent, AgentConfig, dict], tmp_path: Path
) -> None:
    agent, cfg, ref = served
    settings = TelemetrySettings.from_config(cfg)
    settings.outbox_path = tmp_path / "outbox.sqlite"
    svc = TelemetryService(agent, settings)
    x = model_inputs("iris")
    for i in range(150):
        agent.sessions.infer("iris", None, {"X": x[i : i + 1]})
    for i in range(0, 150, 50):  # batched requests count every row
        agent.sessions.infer("iris", None, {"X": x[i : i + 50]})
    ids = svc.tick()
    records = [r for _, r in svc.outbox.pending(100)]
    assert [r["id"] for r in records] == ids
    kinds = [r["kind"] for r in records]
    assert kinds[:2] == ["system", "agent"] and "inference" in kinds and "sketch" in kinds
    system = records[0]
    assert system["memory"]["total_mb"] > 0 and system["cpu_percent"] >= 0
    assert system["disk"]["total_mb"] > 0
    agent_rec = records[1]
    assert agent_rec["models"] == {"iris": "1.0.0"}
    assert agent_rec["outbox"]["dropped"] == 0
    inf = next(r for r in records if r["kind"] == "inference")
    assert (inf["model"], inf["version"], inf["requests"], inf["errors"]) == (
        "iris",
        "1.0.0",
        153,
        0,
    )
    assert sum(inf["latency_hist"]) == 153
    assert inf["latency_ms"]["p95"] is not None
    assert quantile(inf["latency_hist"], 0.5) > 0
    sk = next(r for r in records if r["kind"] == "sketch")["sketch"]
    assert sk["reference_id"] == ref["id"] and sk["n"] == 300
    for f in ref["features"]:  # the training data counted twice = twice the reference counts
        assert sk["counts"][f["name"]] == [2 * c for c in f["counts"]], f["name"]
    assert decide(ref, sk, DriftConfig()).status == "ok"
    # no raw inputs leave the device by default: no input value appears in any record
    blob = json.dumps(records)
    assert "sample" not in kinds and all("inputs" not in r for r in records)
    assert str(float(x[7, 0]) + 1e-9)[:12] not in blob and f"{x[7, 2]:.6f}" not in blob
    svc.stop()


def test_shifted_live_data_is_flagged_from_the_agents_own_sketch(
    served: tuple[Agent, AgentConfig, dict], tmp_path: Path
) -> None:
    agent, _, ref = served
    settings = TelemetrySettings(outbox_path=tmp_path / "o.sqlite", system=False)
    svc = TelemetryService(agent, settings)
    x = model_inputs("iris").copy()
    x[:, 2] += 1.0  # petal length +1 cm
    for i in range(0, 150, 10):
        agent.sessions.infer("iris", None, {"X": x[i : i + 10]})
    svc.tick()
    sk = next(r for _, r in svc.outbox.pending(10) if r["kind"] == "sketch")["sketch"]
    d = decide(ref, sk, DriftConfig(alpha=0.01))
    assert d.drift and "X[2]" in d.drifted_features
    svc.stop()


def test_raw_inputs_are_sampled_only_when_enabled(
    served: tuple[Agent, AgentConfig, dict], tmp_path: Path
) -> None:
    agent, _, _ = served
    settings = TelemetrySettings(
        outbox_path=tmp_path / "s.sqlite",
        sample_inputs=True,
        sample_rate=1.0,
        sample_max_per_window=3,
        system=False,
    )
    svc = TelemetryService(agent, settings)
    x = model_inputs("iris")
    for i in range(5):
        agent.sessions.infer("iris", None, {"X": x[i : i + 1]})
    svc.tick()
    recs = [r for _, r in svc.outbox.pending(50)]
    samples = [r for r in recs if r["kind"] == "sample"]
    assert len(samples) == 3  # capped per window
    assert samples[0]["inputs"]["X"] == x[0:1].tolist()
    assert next(r for r in recs if r["kind"] == "inference")["requests"] == 5
    svc.stop()


def test_service_thread_ticks_and_stop_flushes(
    served: tuple[Agent, AgentConfig, dict], tmp_path: Path
) -> None:
    agent, _, _ = served
    box = Outbox(tmp_path / "t.sqlite")
    svc = TelemetryService(agent, TelemetrySettings(interval_s=0.1, system=False), outbox=box)
    svc.start()
    agent.sessions.infer("iris", None, {"X": model_inputs("iris")[:1]})
    svc.stop()
    agent.sessions.infer("iris", None, {"X": model_inputs("iris")[:1]})  # after stop: ignored
    assert [r["kind"] for r in svc.collect()] == ["agent"]
    recs = [r for _, r in box.pending(1000)]
    assert sum(r["requests"] for r in recs if r["kind"] == "inference") == 1
    assert sum(1 for r in recs if r["kind"] == "agent") >= 1
    box.close()


def test_agent_toml_reaches_the_telemetry_settings(tmp_path: Path) -> None:
    """Every setting the service reads can be set in agent.toml's [telemetry] table (and raw
    input sampling stays off unless it is)."""
    from edgefleet.agent.config import load_config
    from edgefleet.agent.telemetry.service import TelemetrySettings

    p = tmp_path / "agent.toml"
    p.write_text('device_id = "gw"\ndata_dir = "data"\n')
    assert TelemetrySettings.from_config(load_config(p, env={})).sample_inputs is False
    p.write_text(
        'device_id = "gw"\ndata_dir = "data"\n[telemetry]\ninterval_s = 2.0\nsystem = false\n'
        "sample_inputs = true\nsample_rate = 0.5\nsample_max_per_window = 3\nflush_rows = 64\n"
    )
    s = TelemetrySettings.from_config(load_config(p, env={}))
    assert (s.interval_s, s.system, s.sample_inputs, s.sample_rate) == (2.0, False, True, 0.5)
    assert (s.sample_max_per_window, s.flush_rows) == (3, 64)
    assert s.data_dir == tmp_path / "data"
