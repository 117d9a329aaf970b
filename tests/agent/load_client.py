"""A separate load-generating client process: steady KServe v2 requests until a stop file appears.

python -m tests.agent.load_client PORT MODEL STOP_FILE OUT_JSON [--threads N] [--max-seconds S]
Writes {"ok", "failed", "errors": [...], "versions": {version: count}, "latencies_ms": [...]}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np

from edgefleet.agent import oip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("model")
    ap.add_argument("stop_file", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=60.0)
    ap.add_argument("--features", type=int, default=4)
    args = ap.parse_args()
    x = np.random.default_rng(0).random((1, args.features), dtype=np.float32) * 5
    body, headers = oip.encode_request({"X": x})
    lock = threading.Lock()
    res: dict = {"ok": 0, "failed": 0, "errors": [], "versions": {}, "latencies_ms": []}
    deadline = time.monotonic() + args.max_seconds
    started = args.out.with_suffix(".started")

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
        while not args.stop_file.exists() and time.monotonic() < deadline:
            t0 = time.perf_counter()
            try:
                conn.request("POST", f"/v2/models/{args.model}/infer", body=body, headers=headers)
                r = conn.getresponse()
                raw = r.read()
                ms = (time.perf_counter() - t0) * 1000
                if r.status == 200:
                    v = json.loads(raw)["model_version"]
                    with lock:
                        res["ok"] += 1
                        res["versions"][v] = res["versions"].get(v, 0) + 1
                        res["latencies_ms"].append(ms)
                else:
                    with lock:
                        res["failed"] += 1
                        res["errors"].append(f"{r.status} {raw[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                with lock:
                    res["failed"] += 1
                    res["errors"].append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
            if res["ok"] >= 20 and not started.exists():
                started.write_text("1")
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=args.max_seconds + 30)
    res["errors"] = res["errors"][:20]
    args.out.write_text(json.dumps(res))


if __name__ == "__main__":
    main()
