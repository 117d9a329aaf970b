"""Attacks on a real agent process's inference API (loopback): shape bombs, oversize and
malformed requests, unbounded metric labels, slowloris. Each attack is answered with a reason,
costs the agent no more memory or threads than its limits allow, and the model keeps serving.

Memory is the process's own peak resident size (``VmHWM``), threads its ``Threads``, both from
/proc: the agent runs in its own process so that nothing of the test is counted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.agent import oip
from edgefleet.keys import KeyPair
from tests.agent.helpers import AgentProcess, OipClient, served_version, wait_for, write_config

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

MB = 1024 * 1024


def _proc(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_mb(pid: int) -> float:
    return _proc(pid, "VmHWM") / 1024


def threads(pid: int) -> int:
    return _proc(pid, "Threads")


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, v1_data: Path, keys: dict[str, KeyPair]
) -> Iterator[AgentProcess]:
    tmp = tmp_path_factory.mktemp("hardening")
    data = tmp / "data"
    shutil.copytree(v1_data, data)
    cfg = write_config(
        tmp / "cfg",
        data,
        [keys["trusted"].public_path],
        serving={
            "max_connections": 16,
            "header_timeout_s": 2.0,
            "idle_timeout_s": 2.0,
            "body_timeout_s": 2.0,
            "evict_after_s": 0.5,
        },
    )
    proc = AgentProcess(cfg)
    try:
        yield proc
    finally:
        proc.stop()
    assert b"Traceback" not in (tmp / "cfg" / "agent.log").read_bytes()


def post(
    port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", path, body=body, headers=headers or {})
        r = c.getresponse()
        raw = r.read()
        return r.status, json.loads(raw) if raw else None
    finally:
        c.close()


def test_bytes_shape_bomb_allocates_nothing(agent: AgentProcess, x_iris: np.ndarray) -> None:
    """180 bytes declaring a BYTES tensor of 5e7 elements, to a served and an unknown model,
    four at a time: refused with a reason, and the agent's peak memory does not move."""
    served_version(agent.port, "iris", x_iris)
    before = peak_mb(agent.proc.pid)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "X",
                    "datatype": "BYTES",
                    "shape": [50_000_000],
                    "parameters": {"binary_data_size": 8},
                }
            ]
        }
    ).encode()
    body = header + b"\0" * 8
    assert len(body) < 200
    results: list[tuple[int, Any]] = []

    def attack(model: str) -> None:
        results.append(
            post(
                agent.port,
                f"/v2/models/{model}/infer",
                body,
                {oip.HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
            )
        )

    ts = [threading.Thread(target=attack, args=(m,)) for m in ("iris", "nope") * 4]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert sorted(s for s, _ in results) == [400] * 4 + [404] * 4, results
    assert all(r["error"] for _, r in results)
    # refused from the declaration (element bound, the model's datatype), not from its data
    assert all("elements" in r["error"] or "FP32" in r["error"] for s, r in results if s == 400)
    assert peak_mb(agent.proc.pid) - before < 20
    assert served_version(agent.port, "iris", x_iris) == "1.0.0"


def test_bytes_count_is_checked_against_the_data() -> None:
    """The pure parser, for a BYTES input a model does take: the declared count must fit the
    bytes actually sent before the object array is made."""
    header = b'{"inputs":[{"name":"s","datatype":"BYTES","shape":[10000000],"parameters":{"binary_data_size":8}}]}'
    spec = {"s": oip.InputSpec("s", "BYTES", (None,))}
    with pytest.raises(oip.ProtocolError, match="cannot hold"):
        oip.parse_request(header + b"\0" * 8, len(header), model_inputs=spec)


MALFORMED: list[tuple[str, bytes, dict[str, str], int]] = [
    ("shape 10**20", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[100000000000000000000,4],"data":[1]}]}', {}, 400),
    ("float shape", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1.0,4],"data":[1,2,3,4]}]}', {}, 400),
    ("bool shape", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[true,4],"data":[1,2,3,4]}]}', {}, 400),
    ("parameters list", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"data":[1,2,3,4],"parameters":[1]}]}', {}, 400),
    ("request parameters list", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}],"parameters":[]}', {}, 400),
    ("outputs object", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}],"outputs":{"a":1}}', {}, 400),
    ("deep JSON", b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, 400),
    ("deep data", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"data":' + b"[" * 500 + b"1" + b"]" * 500 + b"}]}", {}, 400),
    ("objects in data", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"data":[{},1,2,3]}]}', {}, 400),
    ("strings as numbers", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"data":["1","2","3","4"]}]}', {}, 400),
    ("binary size a string", b'{"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"parameters":{"binary_data_size":"16"}}]}' + b"\0" * 16, {oip.HEADER_LENGTH: "97"}, 400),
    ("header length not a number", b"{}", {oip.HEADER_LENGTH: "1e9"}, 400),
    ("not JSON", b"\xff\xfe", {}, 400),
    ("NaN id", b'{"id":{"a":1},"inputs":[{"name":"X","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}', {}, 400),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "body", "headers", "status"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_request_gets_a_reason(
    agent: AgentProcess, what: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    if what == "binary size a string":
        headers = {oip.HEADER_LENGTH: str(body.index(b"}]}") + 3)}
    got, reply = post(agent.port, "/v2/models/iris/infer", body, headers)
    assert got == status and isinstance(reply, dict) and reply["error"], (what, got, reply)


def test_oversize_requests_are_refused_before_they_are_read(
    agent: AgentProcess, x_iris: np.ndarray
) -> None:
    """A declared Content-Length over the limit is answered 413 at once (the body is never
    read); a chunked body is cut at the limit; other clients keep being served."""
    before = peak_mb(agent.proc.pid)
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 1000000000000\r\n\r\n"
        )
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds" in reply
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(
            b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n" % (MB,) + b"\0" * MB + b"\r\n"
        status = b""
        try:
            for _ in range(40):  # 40 MB offered, the limit is 32 MiB
                s.sendall(chunk)
        except OSError:
            pass
        status = s.recv(65536)
    assert status.startswith(b"HTTP/1.1 413"), status[:200]
    # an ordinary client sending a 40 MB body reads the 413 (the server lets it finish
    # sending, discarding, instead of resetting the connection under it)
    got, reply = post(agent.port, "/v2/models/iris/infer", b"\0" * (40 * MB), {})
    assert got == 413 and "exceeds" in reply["error"], reply
    assert served_version(agent.port, "iris", x_iris) == "1.0.0"
    assert peak_mb(agent.proc.pid) - before < 80


def test_large_binary_request_with_json_outputs_is_streamed(
    agent: AgentProcess, x_iris: np.ndarray
) -> None:
    """An 8 MB binary request asking for JSON outputs (~30 MB of JSON): answered, with a peak
    a small multiple of the payload (it was 1.15 GB for 50 MB), while another client is served
    in the meantime."""
    served_version(agent.port, "iris", x_iris)
    before = peak_mb(agent.proc.pid)
    rows = MB // 2
    x = np.tile(x_iris, (rows // 3 + 1, 1)).astype(np.float32)[:rows]  # 4 floats a row: 8 MB
    body, headers = oip.encode_request({"X": x}, binary=True)
    latencies: list[float] = []
    done = threading.Event()

    def other_client() -> None:
        c = OipClient(agent.port)
        while not done.is_set():
            t0 = time.perf_counter()
            status, _, _ = c.infer("iris", {"X": x_iris})
            assert status == 200
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)
        c.close()

    t = threading.Thread(target=other_client)
    t.start()
    try:
        c = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)
        c.request("POST", "/v2/models/iris/infer", body=body, headers=headers)
        r = c.getresponse()
        raw = r.read()
        c.close()
    finally:
        done.set()
        t.join()
    assert r.status == 200, raw[:300]
    out = json.loads(raw)["outputs"]
    assert [o["shape"] for o in out] == [[rows], [rows, 3]]
    growth = peak_mb(agent.proc.pid) - before
    assert growth < 400, growth
    assert latencies and max(latencies) < 3.0, max(latencies)


def test_response_over_the_limit_is_refused(agent: AgentProcess, x_iris: np.ndarray) -> None:
    """Outputs that would make a JSON response over max_response_bytes (64 MiB): 413, with a
    reason naming binary outputs; the process did not build the response."""
    x = np.tile(x_iris, (1_000_000, 1)).astype(np.float32)[:2_000_000]  # 32 MB in
    body, headers = oip.encode_request({"X": x}, binary=True)
    status, reply = post(agent.port, "/v2/models/iris/infer", body, headers)
    assert status == 413 and "binary outputs" in reply["error"], reply


def test_metric_labels_name_only_served_models(agent: AgentProcess, x_iris: np.ndarray) -> None:
    c = OipClient(agent.port)
    for i in range(300):
        c.infer(f"m{i:04d}", {"X": x_iris})
        c.request("POST", f"/v2/models/iris/versions/v{i}/infer", b"{}")
    status, text, _ = c.request("GET", "/metrics")
    c.close()
    assert status == 200
    assert b"m0001" not in text and b"v299" not in text
    assert b'model="_unknown"' in text


def test_slowloris_holds_no_more_than_the_connection_limit(
    agent: AgentProcess, x_iris: np.ndarray
) -> None:
    """200 sockets trickling their headers: the agent's threads stay bounded by
    max_connections (16 here), a real client is served at once, and the slow sockets are
    closed by the server."""
    pid = agent.proc.pid
    base = threads(pid)
    socks: list[socket.socket] = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
        s.sendall(b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: x\r\n")
        socks.append(s)
    time.sleep(1.0)
    try:
        assert threads(pid) <= base + 16 + 2
        t0 = time.monotonic()
        assert served_version(agent.port, "iris", x_iris) == "1.0.0"
        assert time.monotonic() - t0 < 3.0
        for s in socks:  # keep trickling: the header deadline still ends them
            with contextlib.suppress(OSError):
                s.sendall(b"X")
        time.sleep(0.5)
        assert threads(pid) <= base + 16 + 2
        wait_for(lambda: threads(pid) <= base + 1, 10, what="slow connections closed")
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 MB tmpfs of its own, to fill up (needs the right to mount; skipped without it)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], capture_output=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_answered_not_dropped(
    small_disk: Path,
    tmp_path: Path,
    v1_data: Path,
    keys: dict[str, KeyPair],
    x_iris: np.ndarray,
) -> None:
    """The admin update call on a full disk answers 507 disk_full (it dropped the connection);
    the model keeps serving, and once there is room again updates are taken."""
    data = small_disk / "data"
    shutil.copytree(v1_data, data)
    cfg = write_config(tmp_path / "cfg", data, [keys["trusted"].public_path])
    agent = AgentProcess(cfg)
    try:
        filler = small_disk / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * MB)
        reply = agent.admin("POST", "/admin/updates", {"source": str(tmp_path / "none.efpkg")})
        assert reply.get("reason_code") == "disk_full" and "No space" in reply["error"], reply
        assert served_version(agent.port, "iris", x_iris) == "1.0.0"
        filler.unlink()
        uid = agent.submit(tmp_path / "none.efpkg")
        assert agent.wait_terminal(uid)["reason_code"] == "source_missing"
    finally:
        agent.stop()
    assert b"Traceback" not in (tmp_path / "cfg" / "agent.log").read_bytes()


_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=4)
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_INPUT = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["X", "s", "q"]) | _SCALARS,
        "datatype": st.sampled_from(["FP32", "BYTES", "BOOL", "UINT8", "INT64"]) | _SCALARS,
        "shape": st.lists(st.integers(-1, 2**64) | _SCALARS, max_size=3) | _JSON,
    },
    optional={
        "data": _JSON,
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 64) | _SCALARS})
        | _JSON,
    },
)


@settings(max_examples=150, deadline=None)
@given(
    st.fixed_dictionaries(
        {"inputs": st.lists(_INPUT, max_size=3) | _JSON},
        optional={"outputs": _JSON, "parameters": _JSON, "id": _JSON},
    ),
    st.binary(max_size=40),
    st.booleans(),
)
def test_request_parser_refuses_with_a_reason_and_nothing_else(
    req: dict[str, Any], tail: bytes, binary: bool
) -> None:
    """Whatever the JSON, the parser returns a request or raises ProtocolError (a 400 with its
    reason), with and without the model's inputs to check against."""
    try:
        head = json.dumps(req).encode()
    except ValueError:
        return
    specs = {"X": oip.InputSpec("X", "FP32", (None, 4)), "s": oip.InputSpec("s", "BYTES", (None,))}
    for model in (None, specs):
        with contextlib.suppress(oip.ProtocolError):
            if binary:
                oip.parse_request(head + tail, len(head), model_inputs=model)
            else:
                oip.parse_request(head, None, model_inputs=model)
