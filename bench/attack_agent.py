"""The agent's inference API under the attacks that once cost it memory and time, measured on a
real agent process: peak resident growth (VmHWM, Linux), status, and other clients' latency.

Run it against any checkout to compare two of them (the agent process imports the code of the
tree on PYTHONPATH)::

    PYTHONPATH=/path/to/tree python -m bench.attack_agent
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from edgefleet.agent import oip
from edgefleet.agent.config import AgentConfig, dump_config
from edgefleet.agent.runtime import Agent, UpdateRequest
from edgefleet.harness import free_port, wait_listening
from edgefleet.keys import generate_keypair
from tests.support.packages import make_package, model_inputs


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    kp = generate_keypair(tmp, "k")
    pkg = make_package(tmp / "p", name="iris", version="1.0.0", key=kp)
    data = tmp / "data"
    cfg0 = AgentConfig(
        device_id="m", data_dir=data, trusted_keys=[kp.public_path], http_port=0, admin_port=0
    )
    a = Agent(cfg0)
    a.start(serve_http=False, serve_admin=False)
    view = a.wait_update(a.submit_update(UpdateRequest("iris", "1.0.0", str(pkg))), 60)
    assert view["state"] == "COMMITTED", view
    a.stop()
    port = free_port()
    cfg = tmp / "agent.toml"
    values = {
        "device_id": "m",
        "data_dir": str(data),
        "trusted_keys": [str(kp.public_path)],
        "http_port": port,
        "admin_port": 0,
        "telemetry": {"enabled": False},
    }
    cfg.write_text(dump_config(values))
    cmd = [sys.executable, "-m", "edgefleet", "agent", "run", "--config", str(cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening("127.0.0.1", port, timeout=60)
        time.sleep(1)
        run(proc.pid, port)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def run(pid: int, port: int) -> None:
    def hwm() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
        return 0.0

    def post(path: str, body: bytes, headers: dict[str, str]) -> tuple[object, int]:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            c.request("POST", path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, len(r.read())
        except (OSError, http.client.HTTPException) as e:
            return type(e).__name__, 0
        finally:
            c.close()

    x = model_inputs("iris")[:3]
    post("/v2/models/iris/infer", *oip.encode_request({"X": x}))
    base = hwm()
    print(f"baseline peak RSS {base:.0f} MB")
    spec = {"name": "X", "datatype": "BYTES", "shape": [50_000_000]}
    hdr = json.dumps({"inputs": [{**spec, "parameters": {"binary_data_size": 8}}]}).encode()
    res: list[tuple[object, int]] = []
    bomb = hdr + b"\0" * 8

    def attack(model: str) -> None:
        res.append(post(f"/v2/models/{model}/infer", bomb, {oip.HEADER_LENGTH: str(len(hdr))}))

    ts = [threading.Thread(target=attack, args=(m,)) for m in ("iris", "nope") * 4]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    statuses = sorted(str(s) for s, _ in res)
    print(f"8 x {len(bomb)}-byte BYTES [5e7]: {statuses}, peak +{hwm() - base:.0f} MB")
    for mb in (50, 8):
        rows = mb * 1024 * 1024 // 16
        xb = np.tile(x, (rows // 3 + 1, 1)).astype(np.float32)[:rows]
        body, headers = oip.encode_request({"X": xb}, binary=True)
        lat: list[float] = []
        done = threading.Event()

        def other(done: threading.Event = done, lat: list[float] = lat) -> None:
            while not done.is_set():
                t0 = time.perf_counter()
                post("/v2/models/iris/infer", *oip.encode_request({"X": x}))
                lat.append(time.perf_counter() - t0)
                time.sleep(0.05)

        t = threading.Thread(target=other)
        t.start()
        b0 = hwm()
        t0 = time.perf_counter()
        status, size = post("/v2/models/iris/infer", body, headers)
        took = time.perf_counter() - t0
        done.set()
        t.join()
        print(
            f"{mb} MB binary request, JSON outputs: {status} ({size} bytes) in {took:.1f} s,"
            f" peak +{hwm() - b0:.0f} MB, other clients' worst {max(lat, default=0):.2f} s"
        )
    for i in range(3000):
        post(f"/v2/models/m{i}/infer", b"{}", {})
    c = http.client.HTTPConnection("127.0.0.1", port)
    c.request("GET", "/metrics")
    print(f"/metrics after 3000 unknown-model requests: {len(c.getresponse().read())} bytes")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    main()
