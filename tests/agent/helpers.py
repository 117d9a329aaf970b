"""Helpers of the agent tests: packages with deliberate defects, an OIP client, a subprocess agent."""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent import oip
from edgefleet.agent.config import dump_config
from edgefleet.keys import KeyPair, load_private_key
from edgefleet.wire.package import build_package
from edgefleet.wire.states import TERMINAL_STATES
from tests.support.services import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- packages


def tar_members(pkg: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(pkg, "r:") as tar:
        out = []
        for ti in tar.getmembers():
            f = tar.extractfile(ti) if ti.isfile() else None
            out.append((ti, f.read() if f else None))
        return out


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for ti, data in members:
            if data is not None:
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                tar.addfile(ti)
    return path


def tampered(pkg: Path, out: Path, member: str = "model.onnx") -> Path:
    """Same signature and manifest, one member's bytes changed (same size)."""
    members = []
    for ti, data in tar_members(pkg):
        if ti.name == member and data is not None:
            b = bytearray(data)
            b[len(b) // 2] ^= 0xFF
            data = bytes(b)
        members.append((ti, data))
    return write_tar(out, members)


def with_extra_member(pkg: Path, out: Path, ti: tarfile.TarInfo, data: bytes | None) -> Path:
    return write_tar(out, [*tar_members(pkg), (ti, data)])


def file_info(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    return ti


def link_info(name: str, target: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.SYMTYPE
    ti.linkname = target
    return ti


def lookup_package(
    out_dir: Path, *, name: str, version: str, key: KeyPair, table: list[float], **overrides: Any
) -> Path:
    """Y = table[int(X)]: fine on its samples (X in 0..len-1), a runtime error for X out of range."""
    import onnx
    from onnx import TensorProto, helper

    n = len(table)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["X"], ["idx"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "idx"], ["Y"], axis=0),
        ],
        "lookup",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None])],
        [helper.make_tensor("table", TensorProto.FLOAT, [n], table)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.arange(n, dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        onnx.save(model, t / "model.onnx")
        np.savez(t / "samples.npz", **{"input:X": x, "output:Y": np.asarray(table, np.float32)})
        manifest: dict[str, Any] = {
            "format": "edgefleet.package/v1",
            "name": name,
            "version": version,
            "profile": "cpu-x86_64",
            "min_agent_version": "0.1.0",
            "model": {"file": "model.onnx", "external_data": []},
            "io": {
                "inputs": [{"name": "X", "dtype": "float32", "shape": [None]}],
                "outputs": [{"name": "Y", "dtype": "float32", "shape": [None]}],
            },
            "execution_providers": [{"name": "CPUExecutionProvider", "options": {}}],
            "cpu_fallback": True,
            "gates": {"max_p95_ms": 1000.0, "max_memory_mb": 512.0},
            "drift_reference": {"kind": "test", "features": {}},
        }
        manifest.update(overrides)
        return build_package(
            out_dir,
            manifest,
            {"model.onnx": t / "model.onnx", "samples.npz": t / "samples.npz"},
            load_private_key(key.private_path),
        )


# --------------------------------------------------------------------------- clients


class OipClient:
    """A keep-alive KServe v2 client on one connection."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, Any]:
        self.conn.request(method, path, body=body, headers=headers or {})
        r = self.conn.getresponse()
        return r.status, r.read(), r.headers

    def get_json(self, path: str) -> tuple[int, Any]:
        status, body, _ = self.request("GET", path)
        return status, json.loads(body) if body else None

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        binary: bool = False,
        version: str | None = None,
    ) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
        body, headers = oip.encode_request(inputs, binary=binary, binary_outputs=binary)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, raw, hdrs = self.request("POST", path, body, headers)
        if status != 200:
            return status, json.loads(raw), {}
        hl = hdrs.get(oip.HEADER_LENGTH)
        meta = json.loads(raw[: int(hl)] if hl else raw)
        return status, meta, oip.decode_response(raw, hdrs)

    def close(self) -> None:
        self.conn.close()


def served_version(port: int, model: str, x: np.ndarray, input_name: str = "X") -> str:
    c = OipClient(port)
    try:
        status, meta, _ = c.infer(model, {input_name: x})
        assert status == 200, meta
        return str(meta["model_version"])
    finally:
        c.close()


def wait_for(
    pred: Callable[[], Any], timeout: float, step: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise TimeoutError(f"{what} not reached within {timeout}s")


# --------------------------------------------------------------------------- subprocess agent


def write_config(directory: Path, data_dir: Path, trusted: list[Path], **extra: Any) -> Path:
    values: dict[str, Any] = {
        "device_id": "gw-test",
        "data_dir": str(data_dir),
        "trusted_keys": [str(p) for p in trusted],
        "http_port": free_port(),
        "admin_port": 0,
        "probation": {"seconds": 0.3, "min_requests": 0},
        "validation": {"bench_runs": 20, "bench_warmup": 2},
        "telemetry": {"enabled": False},
    }
    for k, v in extra.items():
        if isinstance(v, dict):
            values.setdefault(k, {}).update(v)
        else:
            values[k] = v
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.toml"
    path.write_text(dump_config(values))
    return path


class AgentProcess:
    """`edgefleet agent run` in a subprocess, killable with SIGKILL."""

    def __init__(self, config: Path, *, pause_at: str | None = None) -> None:
        import tomllib

        self.config = config
        self.cfg = tomllib.loads(config.read_text())
        self.data_dir = Path(self.cfg["data_dir"])
        self.port = int(self.cfg["http_port"])
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("EDGEFLEET_AGENT_PAUSE_AT", None)
        if pause_at:
            env["EDGEFLEET_AGENT_PAUSE_AT"] = pause_at
        self.log = open(config.parent / "agent.log", "ab")  # noqa: SIM115 - closed in stop()
        (self.data_dir / "admin.json").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(config)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=str(REPO),
        )
        try:
            wait_port(self.port, timeout=60)
            wait_for(lambda: (self.data_dir / "admin.json").exists(), 30, what="admin.json")
        except BaseException:
            self.kill()
            raise

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        info = json.loads((self.data_dir / "admin.json").read_text())
        token = (self.data_dir / "admin.token").read_text().strip()
        c = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=10)
        try:
            c.request(
                method,
                path,
                body=json.dumps(body).encode() if body is not None else None,
                headers={"Authorization": f"Bearer {token}"},
            )
            r = c.getresponse()
            return json.loads(r.read())
        finally:
            c.close()

    def submit(self, source: Path | str, **kw: Any) -> str:
        return str(self.admin("POST", "/admin/updates", {"source": str(source), **kw})["id"])

    def wait_terminal(self, uid: str, timeout: float = 60.0) -> dict[str, Any]:
        def done() -> Any:
            v = self.admin("GET", f"/admin/updates/{uid}")
            return v if v.get("state") in TERMINAL_STATES else None

        return dict(wait_for(done, timeout, 0.1, f"update {uid} terminal"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()
