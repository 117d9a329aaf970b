"""The root `edgefleet` command on a gateway: `verify`, `inspect` and `agent` load neither the
quantization stack nor a web server, although the root CLI registers every component."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.keys import generate_keypair
from tests.support.packages import make_package

# Top-level packages a gateway's `edgefleet verify` must not pay for.
HEAVY = ("onnx", "onnxruntime", "torch", "fastapi", "starlette", "uvicorn", "sqlalchemy", "httpx")

# Runs the root CLI with the given arguments, then prints the imported module names as JSON.
PROBE = """
import atexit, json, sys
atexit.register(lambda: print("MODULES=" + json.dumps(sorted(sys.modules)), file=sys.stderr))
sys.argv = ["edgefleet", *sys.argv[1:]]
from edgefleet.cli import main
main()
"""


def run_probe(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=120
    )
    line = next(x for x in proc.stderr.splitlines() if x.startswith("MODULES="))
    return proc, {m.split(".")[0] for m in json.loads(line.removeprefix("MODULES="))}


@pytest.fixture(scope="module")
def signed_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("root-cli")
    kp = generate_keypair(out, "packager")
    return make_package(out, name="iris", version="1.0.0", key=kp), kp.public_path


def test_verify_and_inspect_load_no_quantization_stack_or_web_server(
    signed_package: tuple[Path, Path],
) -> None:
    package, pub = signed_package
    verify, loaded = run_probe("verify", str(package), "--trust", str(pub), "--json")
    assert verify.returncode == 0, verify.stderr[-2000:]
    assert json.loads(verify.stdout)["ok"] is True
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    inspect, loaded = run_probe("inspect", str(package), "--json")
    assert inspect.returncode == 0 and json.loads(inspect.stdout)["name"] == "iris"
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_every_group_is_registered_and_agent_help_stays_light() -> None:
    root, loaded = run_probe("--help")
    assert root.returncode == 0
    for group in ("keys", "verify", "inspect", "package", "agent", "controller", "packages",
                  "devices", "rollout", "drift", "demo"):  # fmt: skip
        assert f" {group} " in root.stdout, group
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
    agent, loaded = run_probe("agent", "--help")
    assert agent.returncode == 0 and "run" in agent.stdout
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
