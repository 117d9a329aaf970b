"""Probation judges the model, like with like: per-sample model time against what the previous
version served with on this device, sustained over more than one window.

The pure judge first, then a real agent process that serves large valid requests during the
probation of a good release (it must commit), and a truly slower release (it must roll back).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.config import ConfigError, ProbationConfig, load_config
from edgefleet.agent.sessions import (
    LatencyReference,
    Served,
    Stats,
    batch_samples,
    judge_probation,
    probation_windows,
)
from edgefleet.agent.store import ModelStore
from edgefleet.keys import KeyPair
from tests.agent.helpers import AgentProcess, OipClient, wait_for, write_config

CFG = ProbationConfig(
    seconds=10, min_requests=5, max_error_rate=0.1, window_s=1.0, sustained_windows=2
)
REF = LatencyReference(p95_ms=1.0, ratio=1.5, slack_ms=0.5, source="1.0.0 serving here")


def _window(start: float, k: int, ms: float, n: int = 10, ok: bool = True) -> list[Served]:
    return [Served(start + k + (i + 0.5) / (n + 1), ms, ok) for i in range(n)]


def test_one_noisy_window_does_not_fail_but_a_sustained_breach_does() -> None:
    t0 = 100.0
    quiet, noisy = 1.0, 5.0  # limit 1.5 x 1.0 + 0.5 = 2.0 ms per sample
    one = _window(t0, 0, quiet) + _window(t0, 1, noisy) + _window(t0, 2, quiet)
    w = probation_windows(one, t0, t0 + 3, REF, CFG)
    assert [x.breach for x in w] == [False, True, False]
    assert judge_probation(30, 0, w, REF, CFG) is None
    two = _window(t0, 0, quiet) + _window(t0, 1, noisy) + _window(t0, 2, noisy)
    verdict = judge_probation(30, 0, probation_windows(two, t0, t0 + 3, REF, CFG), REF, CFG)
    assert verdict is not None and verdict[0] == "probation_latency"
    assert "2 windows in a row" in verdict[1] and "1.0.0 serving here" in verdict[1]


def test_windows_too_thin_to_judge_neither_fail_nor_break_a_run() -> None:
    t0 = 0.0
    served = _window(t0, 0, 9.0) + _window(t0, 1, 9.0, n=2) + _window(t0, 2, 9.0)
    w = probation_windows(served, t0, t0 + 3, REF, CFG)
    assert w[1].p95_ms is None and not w[1].breach
    assert judge_probation(22, 0, w, REF, CFG) is not None
    # an unfinished window is judged only at the end (final)
    assert len(probation_windows(served, t0, t0 + 2.5, REF, CFG)) == 2
    assert len(probation_windows(served, t0, t0 + 2.5, REF, CFG, final=True)) == 3


def test_errors_are_judged_over_the_whole_probation() -> None:
    assert judge_probation(4, 4, [], REF, CFG) is None  # below min_requests
    verdict = judge_probation(20, 3, [], REF, CFG)
    assert verdict is not None and verdict[0] == "probation_error_rate"
    assert judge_probation(20, 2, [], None, CFG) is None  # 10% is the limit, not over it


def test_latency_is_normalised_per_sample() -> None:
    s = Stats()
    s.record(40.0, True, samples=100_000)
    s.record(2.0, True, samples=1)
    s.record(3.0, False, samples=4)
    n, err, served = s.snapshot()
    assert (n, err) == (3, 1)
    assert [x.ms_per_sample for x in served] == [40.0 / 100_000, 2.0, 0.75]
    assert s.drain() == [40.0 / 100_000, 2.0]  # only successes feed the serving record
    assert s.drain() == []
    x = np.zeros((7, 4), np.float32)
    assert batch_samples({"X": x}, "X") == 7
    assert batch_samples({"X": np.array(1.0, np.float32)}, "X") == 1
    assert batch_samples({"X": x}, None) == 1


def test_serving_record_rolls_per_version(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.set_pointers("m", store.pointers("m"))
    store.add_serving_latencies("m", "1.0.0", [1.0, 2.0], keep=3)
    store.add_serving_latencies("m", "1.0.0", [3.0, 4.0], keep=3)
    assert store.serving_record("m") == ("1.0.0", [2.0, 3.0, 4.0])
    store.add_serving_latencies("m", "1.1.0", [9.0], keep=3)
    assert store.serving_record("m") == ("1.1.0", [9.0])
    store.mark_committed("m", "1.0.0")
    store.mark_committed("m", "1.1.0")
    store.mark_committed("m", "1.0.0")
    assert store.committed_versions("m") == ["1.1.0", "1.0.0"]


def test_probation_settings_are_checked(tmp_path: Path) -> None:
    base = {"EDGEFLEET_AGENT_DEVICE_ID": "gw", "EDGEFLEET_AGENT_DATA_DIR": str(tmp_path)}
    cfg = load_config(None, env={**base, "EDGEFLEET_AGENT_PROBATION_MAX_P95_RATIO": "1.3"})
    assert cfg.probation.max_p95_ratio == 1.3
    for field, bad in (("MAX_P95_RATIO", "0"), ("WINDOW_S", "nan"), ("SUSTAINED_WINDOWS", "0")):
        with pytest.raises(ConfigError, match="probation"):
            load_config(None, env={**base, f"EDGEFLEET_AGENT_PROBATION_{field}": bad})


# --------------------------------------------------------------------------- real processes


def _agent(tmp_path: Path, v1_data: Path, keys: dict[str, KeyPair], **probation: object) -> Path:
    data = tmp_path / "data"
    shutil.copytree(v1_data, data)
    return write_config(
        tmp_path / "cfg",
        data,
        [keys["trusted"].public_path],
        probation={
            "seconds": 4.0,
            "min_requests": 5,
            "window_s": 1.0,
            "sustained_windows": 2,
            **probation,
        },
    )


def test_large_valid_requests_during_probation_do_not_roll_back_a_good_release(
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    pkgs: dict[str, Path],
    x_iris: np.ndarray,
) -> None:
    """25 valid ~1.6 MB requests (100,000 samples each) while 1.1.0 is on probation: the model
    takes longer per request, not per sample; the release commits."""
    agent = AgentProcess(_agent(tmp_path, v1_data, keys))
    big = np.tile(x_iris, (100_000 // len(x_iris) + 1, 1))[:100_000].astype(np.float32)
    assert big.nbytes == 1_600_000
    c = OipClient(agent.port, timeout=60)
    try:
        for _ in range(40):  # what 1.0.0 serves with here: small requests
            assert c.infer("iris", {"X": x_iris}, binary=True)[0] == 200
        uid = agent.submit(pkgs["v2"])
        wait_for(
            lambda: c.infer("iris", {"X": x_iris}, binary=True)[1].get("model_version") == "1.1.0",
            60,
            0.05,
            "1.1.0 on probation",
        )
        for _ in range(25):
            status, meta, _ = c.infer("iris", {"X": big}, binary=True)
            assert status == 200, meta
            assert meta["model_version"] in ("1.1.0", "1.0.0")
        view = agent.wait_terminal(uid)
        assert view["state"] == "COMMITTED", view
        probation = view["history"][-1]["figures"]
        assert probation["reference"]["source"].startswith("1.0.0 serving here"), probation
    finally:
        c.close()
        agent.stop()
    record = ModelStore(agent.data_dir).serving_record("iris")
    assert record is not None and record[0] == "1.1.0"


def _mlp_package(out: Path, key: KeyPair, version: str, width: int, layers: int) -> Path:
    """A model X[N,4] -> Y[N,4] that does ``layers`` matmuls of ``width`` per sample: same I/O
    for a fast and a truly slower release."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgefleet.keys import load_private_key
    from edgefleet.wire.package import build_package

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, width)).astype(np.float32) / 4, "w_in"),
        numpy_helper.from_array(
            rng.standard_normal((width, width)).astype(np.float32) / width, "w"
        ),
        numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32), "w_out"),
    ]
    nodes = [helper.make_node("MatMul", ["X", "w_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["Y"]))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal((8, 4)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        onnx.save(model, t / "model.onnx")
        sess = ort.InferenceSession(str(t / "model.onnx"), providers=["CPUExecutionProvider"])
        np.savez(t / "samples.npz", **{"input:X": x, "output:Y": sess.run(None, {"X": x})[0]})
        manifest = {
            "format": "edgefleet.package/v1",
            "name": "mlp",
            "version": version,
            "profile": "cpu-x86_64",
            "min_agent_version": "0.1.0",
            "model": {"file": "model.onnx", "external_data": []},
            "io": {
                "inputs": [{"name": "X", "dtype": "float32", "shape": [None, 4]}],
                "outputs": [{"name": "Y", "dtype": "float32", "shape": [None, 4]}],
            },
            "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
            "cpu_fallback": True,
            "gates": {"max_p95_ms": 1000.0, "max_memory_mb": 512.0, "sample_rtol": 1e-3},
        }
        return build_package(
            out,
            manifest,
            {"model.onnx": t / "model.onnx", "samples.npz": t / "samples.npz"},
            load_private_key(key.private_path),
        )


def test_a_truly_slower_release_is_rolled_back(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    """The gate still bites: 2.0.0 does ~1000x the work per sample of 1.0.0, sustained over the
    probation; it is rolled back against what 1.0.0 served with on this device."""
    fast = _mlp_package(tmp_path / "fast", keys["trusted"], "1.0.0", width=8, layers=1)
    slow = _mlp_package(tmp_path / "slow", keys["trusted"], "2.0.0", width=1024, layers=40)
    cfg = write_config(
        tmp_path / "cfg",
        tmp_path / "data",
        [keys["trusted"].public_path],
        probation={
            "seconds": 4.0,
            "min_requests": 5,
            "window_s": 1.0,
            "sustained_windows": 2,
            "commit_after_requests": 40,
        },
    )
    agent = AgentProcess(cfg)
    x = np.ones((1, 4), np.float32)
    c = OipClient(agent.port)
    try:
        uid = agent.submit(fast)
        wait_for(lambda: c.infer("mlp", {"X": x})[0] == 200, 60, 0.05, "1.0.0 serving")
        for _ in range(60):
            c.infer("mlp", {"X": x})
        assert agent.wait_terminal(uid)["state"] == "COMMITTED"
        uid = agent.submit(slow)
        wait_for(
            lambda: c.infer("mlp", {"X": x})[1].get("model_version") == "2.0.0", 60, 0.05, "2.0.0"
        )

        def rolled_back() -> bool:
            c.infer("mlp", {"X": x})
            view = agent.admin("GET", f"/admin/updates/{uid}")
            return view["state"] == "ROLLED_BACK"

        try:
            wait_for(rolled_back, 30, 0.01, "2.0.0 rolled back")
        finally:
            view = agent.admin("GET", f"/admin/updates/{uid}")
            print(view["history"][-1])
        assert view["reason_code"] == "probation_latency", view
        assert "1.0.0 serving here" in view["reason"]
        assert c.infer("mlp", {"X": x})[1]["model_version"] == "1.0.0"
    finally:
        c.close()
        agent.stop()


def test_the_rollout_ratio_travels_in_the_desired_state() -> None:
    from edgefleet.agent.mqtt.reconcile import DesiredStateError, parse_targets

    spec = {"version": "1.0.0", "url": "http://x/p", "sha256": "ab"}
    (t,) = parse_targets({"models": {"m": {**spec, "max_p95_ratio": 1.3}}})
    assert t.max_p95_ratio == 1.3
    (t,) = parse_targets({"models": {"m": spec}})
    assert t.max_p95_ratio is None  # absent: the agent config's
    for bad in (0, -1.0, "1.3", True, float("inf")):
        with pytest.raises(DesiredStateError, match="max_p95_ratio"):
            parse_targets({"models": {"m": {**spec, "max_p95_ratio": bad}}})


def test_the_desired_state_format_checks_the_ratio() -> None:
    from edgefleet.wire.errors import RejectError
    from edgefleet.wire.mqtt import validate_desired

    state = {
        "device_id": "gw",
        "seq": 1,
        "issued_at": "2026-01-01T00:00:00Z",
        "expires_at": "2026-01-02T00:00:00Z",
        "models": {"m": {"version": "1.0.0", "url": "u", "sha256": "ab", "max_p95_ratio": 1.3}},
    }
    validate_desired(state)
    state["models"]["m"]["max_p95_ratio"] = float("nan")  # type: ignore[index]
    with pytest.raises(RejectError, match="max_p95_ratio"):
        validate_desired(state)
