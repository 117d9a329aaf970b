"""The KServe v2 API of a running agent: endpoints, JSON and binary tensors, errors, metrics,
several models, observers, inventory, probation rollback."""

from __future__ import annotations

import http.server
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from edgefleet.agent import oip
from edgefleet.agent.config import ProbationConfig
from edgefleet.agent.runtime import Agent, UpdateRequest
from tests.agent.helpers import OipClient, wait_for


def test_endpoints_json_binary_and_errors(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy)
    seen: list[tuple[str, str, bool]] = []
    agent.add_inference_observer(lambda m, v, i, o, lat, ok: seen.append((m, v, ok)))
    c = OipClient(agent.http_port or 0)
    assert c.get_json("/v2/health/live") == (200, {"live": True})
    assert c.get_json("/v2/health/ready")[0] == 200
    status, meta = c.get_json("/v2")
    assert status == 200 and "binary_tensor_data" in meta["extensions"]
    status, md = c.get_json("/v2/models/iris")
    assert md["versions"] == ["1.0.0"] and md["inputs"] == [
        {"name": "X", "datatype": "FP32", "shape": [-1, 4]}
    ]
    assert c.get_json("/v2/models/iris/versions/1.0.0")[0] == 200
    assert c.get_json("/v2/models/iris/ready")[0] == 200
    assert c.get_json("/v2/models/iris/versions/9.9.9")[0] == 404
    assert c.get_json("/v2/models/nope/ready")[0] == 404

    raw = ort.InferenceSession(str(v1_copy / "models/iris/1.0.0/model.onnx")).run(
        None, {"X": x_iris}
    )
    for binary in (False, True):
        status, meta, out = c.infer("iris", {"X": x_iris}, binary=binary)
        assert status == 200 and meta["model_name"] == "iris" and meta["model_version"] == "1.0.0"
        assert np.array_equal(out["label"], raw[0]) and np.allclose(out["probabilities"], raw[1])
        if binary:
            assert all("binary_data_size" in o["parameters"] for o in meta["outputs"])
    status, _, out = c.infer("iris", {"X": x_iris}, version="1.0.0")
    assert status == 200
    assert c.infer("iris", {"X": x_iris}, version="0.1.0")[0] == 404
    assert c.infer("nope", {"X": x_iris})[0] == 404
    status, err, _ = c.infer("iris", {"X": x_iris.astype(np.float64)})
    assert status == 400 and "float32" in err["error"]
    status, err, _ = c.infer("iris", {"Z": x_iris})
    assert status == 400 and "unknown input" in err["error"]
    status, err, _ = c.infer("iris", {"X": x_iris[:, :3]})
    assert status == 400 and "shape" in err["error"]
    status, body, _ = c.request(
        "POST", "/v2/models/iris/infer", b"{", {"Content-Type": "application/json"}
    )
    assert status == 400 and b"error" in body
    assert c.request("GET", "/v2/nothing")[0] == 404
    body, headers = oip.encode_request({"X": x_iris})  # chunked transfer encoding works too
    c.conn.request(
        "POST",
        "/v2/models/iris/infer",
        body=iter([body[:7], body[7:]]),
        headers=headers,
        encode_chunked=True,
    )
    r = c.conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["model_version"] == "1.0.0"

    status, metrics, _ = c.request("GET", "/metrics")
    text = metrics.decode()
    assert status == 200
    assert (
        'edgefleet_inference_requests_total{model="iris",protocol="json",version="1.0.0"} 3.0'
        in text
    )
    assert (
        'edgefleet_inference_requests_total{model="iris",protocol="binary",version="1.0.0"} 1.0'
        in text
    )
    assert 'edgefleet_inference_errors_total{code="bad_request",model="iris"} 4.0' in text
    assert 'edgefleet_model_info{model="iris",version="1.0.0"} 1.0' in text
    assert "edgefleet_inference_latency_seconds_bucket" in text
    c.close()
    assert ("iris", "1.0.0", True) in seen and len(seen) == 4


def test_several_models_inventory_reference_and_probation_rollback(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(
        v1_copy,
        probation=ProbationConfig(
            seconds=30.0, min_requests=4, max_error_rate=0.2, commit_after_requests=6
        ),
    )
    events: list[Any] = []
    agent.add_listener(events.append)
    c = OipClient(agent.http_port or 0)
    ok = {"X": np.array([1.0, 3.0], np.float32)}
    uid = agent.submit_update(UpdateRequest("lookup", "1.0.0", str(pkgs["lookup1"])))
    wait_for(lambda: agent.sessions.get("lookup") is not None, 30, what="lookup serving")
    for _ in range(6):
        assert c.infer("lookup", ok)[0] == 200
    assert agent.wait_update(uid, 30)["state"] == "COMMITTED"
    assert c.infer("iris", {"X": x_iris})[0] == 200  # both models by name
    inv = agent.inventory()
    assert (
        set(inv["models"]) == {"iris", "lookup"} and inv["models"]["lookup"]["version"] == "1.0.0"
    )
    assert (
        inv["profiles"] == ["cpu-x86_64"] and "CPUExecutionProvider" in inv["execution_providers"]
    )
    assert agent.reference("lookup") == {"kind": "test", "features": {}}
    assert agent.reference("iris") is None and agent.reference("nope") is None

    uid = agent.submit_update(UpdateRequest("lookup", "2.0.0", str(pkgs["lookup2"])))
    wait_for(lambda: agent.sessions.get("lookup").version == "2.0.0", 30, what="2.0.0 serving")  # type: ignore[union-attr]
    assert c.infer("lookup", ok)[1]["model_version"] == "2.0.0"
    for _ in range(4):  # out-of-table index: the new model fails at run time (500)
        assert c.infer("lookup", {"X": np.array([50.0], np.float32)})[0] == 500
    view = agent.wait_update(uid, 30)
    assert view["state"] == "ROLLED_BACK" and view["reason_code"] == "probation_error_rate", view
    # listeners and counters run right after the journal write that wait_update reads
    wait_for(lambda: events and events[-1].state == "ROLLED_BACK", 10, what="ROLLED_BACK event")
    status, meta, out = c.infer("lookup", ok)
    assert status == 200 and meta["model_version"] == "1.0.0" and out["Y"].tolist() == [1.0, 3.0]
    assert agent.store.pointers("lookup").current == "1.0.0"
    assert [e.state for e in events if e.update_id == uid][-2:] == ["ROLLING_BACK", "ROLLED_BACK"]
    status, metrics, _ = c.request("GET", "/metrics")
    assert (
        b'edgefleet_updates_total{outcome="ROLLED_BACK",reason_code="probation_error_rate"} 1.0'
        in metrics
    )
    c.close()


def test_corrupted_current_version_is_never_loaded(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy)
    assert (
        agent.wait_update(agent.submit_update(UpdateRequest("iris", "", str(pkgs["v2"]))), 60)[
            "state"
        ]
        == "COMMITTED"
    )
    agent.stop()
    model = v1_copy / "models/iris/1.1.0/model.onnx"
    data = bytearray(model.read_bytes())
    data[100] ^= 0x01  # bit rot / a tampered file on disk
    model.write_bytes(bytes(data))
    agent = agent_factory(v1_copy)
    c = OipClient(agent.http_port or 0)
    status, meta, _ = c.infer("iris", {"X": x_iris})
    c.close()
    assert status == 200 and meta["model_version"] == "1.0.0"  # the verified previous version
    assert agent.store.pointers("iris").current == "1.0.0"


def test_orderly_stop_in_probation_resumes_it(
    pkgs: dict[str, Path], agent_factory: Callable[..., Agent], v1_copy: Path, x_iris: np.ndarray
) -> None:
    agent = agent_factory(v1_copy, probation=ProbationConfig(seconds=60.0, min_requests=0))
    uid = agent.submit_update(UpdateRequest("iris", "", str(pkgs["v2"])))
    wait_for(lambda: agent.update(uid)["state"] == "PROBATION", 30, what="PROBATION")  # type: ignore[index]
    agent.stop()  # SIGTERM-like: not a crash
    assert agent.update(uid)["stopped_gracefully"] is True  # type: ignore[index]
    agent = agent_factory(v1_copy, probation=ProbationConfig(seconds=0.2, min_requests=0))
    view = agent.wait_update(uid, 30)
    assert view["state"] == "COMMITTED" and view["resumes"] == 1, view
    c = OipClient(agent.http_port or 0)
    assert c.infer("iris", {"X": x_iris})[1]["model_version"] == "1.1.0"
    c.close()


def test_client_disconnects_are_not_printed_but_other_errors_are_logged(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Edge clients drop connections constantly: no traceback on stderr for that, while a real
    serving error still reaches the log with its stack."""
    from edgefleet.agent.server import QuietServer

    srv = QuietServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    try:
        for err in (
            ConnectionResetError(104, "reset"),
            BrokenPipeError(32, "pipe"),
            TimeoutError(),
        ):
            try:
                raise err
            except OSError:
                srv.handle_error(None, ("127.0.0.1", 1))
        assert capsys.readouterr().err == "" and not caplog.records
        try:
            raise ValueError("bad state")
        except ValueError:
            srv.handle_error(None, ("127.0.0.1", 2))
        assert capsys.readouterr().err == ""
        logged = [r.exc_info[1] for r in caplog.records if r.exc_info]
        assert len(logged) == 1 and isinstance(logged[0], ValueError)
    finally:
        srv.server_close()
