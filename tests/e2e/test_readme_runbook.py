"""README's "Running a fleet" runs as written: its ```sh blocks marked ``<!-- runbook -->`` are
extracted and run top to bottom by bash, against real Mosquitto (the generated TLS config) and
PostgreSQL (a database of this test's own), with substitutions only for what must differ on a
shared machine: ports, directories, the database URL. Commands ending in ``&`` run in the
background; the test waits for what each one opens before the next line runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import cli_spec
from tests.support.services import POSTGRES_URL, free_port, postgres_available, require

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"<!-- runbook(?:: (?P<tag>[a-z-]+))? -->\s*\n```sh\n(?P<body>.*?)\n```", re.S)
RUNBOOK_DB = "postgresql://edgefleet:change-me@localhost:5432/edgefleet"


def blocks(text: str, tag: str | None = None) -> list[str]:
    """The bodies of the ```sh blocks marked ``<!-- runbook -->`` (or ``<!-- runbook: TAG -->``)."""
    return [m["body"] for m in FENCE.finditer(text) if m["tag"] == tag]


def logical_lines(script: str) -> list[str]:
    return [ln for ln in re.sub(r"\\\n\s*", " ", script).splitlines() if ln.strip()]


def test_runbook_commands_exist_and_the_install_is_from_this_checkout() -> None:
    text = README.read_text()
    runbook = blocks(text)
    assert len(runbook) >= 4, "the runbook blocks went missing from README.md"
    script = "\n".join(runbook)
    for needle in ("controller init", "mosquitto-config", "mosquitto -c", "controller serve",
                   "enroll-token create", "agent enroll", "agent run", "packages upload",
                   "rollout create", "--watch", "drift show"):  # fmt: skip
        assert needle in script, needle
    (install,) = blocks(text, "install")
    assert "pip install -e '.[all]'" in install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "all" in extras["optional-dependencies"]
    for argv in cli_spec.commands_in_shell(script):
        assert cli_spec.problems(argv) == [], argv
    assert not cli_spec.edgefleet_vars(script) - cli_spec.env_names() - {
        "EDGEFLEET_URL", "EDGEFLEET_TOKEN"
    }  # fmt: skip


# --- running it -----------------------------------------------------------------------------
@pytest.fixture
def databases() -> Iterator[Callable[[], str]]:
    """Makes a fresh database per call (each run of the runbook starts from nothing); all are
    dropped at the end."""
    require(postgres_available(), f"PostgreSQL not reachable at {POSTGRES_URL}")
    import psycopg

    admin = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    made: list[str] = []

    def make() -> str:
        name = f"runbook_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return admin.rsplit("/", 1)[0] + "/" + name

    try:
        yield make
    finally:
        with psycopg.connect(admin, autocommit=True) as c:
            for name in made:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def root_dir() -> Iterator[Path]:
    # Mosquitto drops to its own user: every directory above its files must let it pass
    # (pytest's tmp_path is 0700).
    d = Path(tempfile.mkdtemp(prefix="edgefleet-runbook-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _script(text: str, root: Path, db: str) -> str:
    ports = {p: free_port() for p in ("8400", "8883", "8081", "8082")}
    subs = {
        "/var/lib/edgefleet-controller": str(root / "controller"),
        "/etc/mosquitto/edgefleet": str(root / "broker"),
        "/var/lib/edgefleet-agent": str(root / "agents"),
        RUNBOOK_DB: db,
        **{p: str(n) for p, n in ports.items()},
    }
    lines = ["set -euo pipefail", _WAIT]
    agent_ports = {"gw-001": ports["8081"], "gw-002": ports["8082"]}
    for line in logical_lines("\n".join(blocks(text))):
        for a, b in subs.items():
            line = line.replace(a, b)
        lines.append(line)
        if not line.rstrip().endswith("&"):
            continue
        if line.startswith("mosquitto "):
            lines.append(f"ef_wait_port {ports['8883']} mosquitto")
        elif "controller serve" in line:
            lines.append(f"ef_wait_port {ports['8400']} controller")
        elif (m := re.search(r"agent run --config \S*/(gw-\d+)/", line)) is not None:
            lines.append(f"ef_wait_port {agent_ports[m[1]]} {m[1]}")
        else:
            raise AssertionError(f"a background command the test cannot wait for: {line}")
    lines.append("echo RUNBOOK-DONE")
    return "\n".join(lines) + "\n"


_WAIT = r"""
ef_wait_port() {  # PORT NAME: until something listens there (60 s)
  for _ in $(seq 600); do
    (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0
    sleep 0.1
  done
  echo "runbook test: $2 never listened on $1" >&2; return 1
}
"""


# The test picks free ports before the runbook's services bind them; on a busy host another
# process can take one in between. The runbook is not idempotent (a fresh database, `controller
# init`), so such a run is started again from nothing: new directory, database and ports.
PORT_TAKEN = re.compile(r"Address already in use|EADDRINUSE|Errno 98")


@pytest.mark.timeout(600)
def test_readme_runbook_runs_top_to_bottom(root_dir: Path, databases: Callable[[], str]) -> None:
    require(shutil.which("mosquitto") is not None, "mosquitto is not installed")
    for attempt in range(1, 4):
        root = root_dir / f"run{attempt}"
        root.mkdir()
        root.chmod(0o755)
        rc, script, output, took = _run_runbook(root, databases())
        if rc == 0 or not PORT_TAKEN.search(output):
            break
        print(f"runbook run {attempt}: a port was taken by another process; again from nothing")
    assert rc == 0 and "RUNBOOK-DONE" in output, f"rc={rc}\n{script}\n--- log ---\n{output[-6000:]}"
    assert "change-me" not in output  # no database password printed anywhere
    assert "gw-001" in output and "gw-002" in output
    assert re.search(r"succeeded", output, re.I), output[-3000:]
    print(f"runbook ran in {took:.1f} s")


def _run_runbook(root: Path, database: str) -> tuple[int | None, str, str, float]:
    """One run of the whole runbook in ``root``: (exit code, script, its output, seconds)."""
    script = _script(README.read_text(), root, database)
    work = root / "work"
    work.mkdir()
    (root / "runbook.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        EDGEFLEET_AGENT_PROBATION_SECONDS="1",  # the agents' probation: 1 s, not 10
        EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S="1",
    )
    log = root / "runbook.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", str(root / "runbook.sh")],
            cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            rc: int | None = proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _stop_group(proc)
    return rc, script, log.read_text(errors="replace"), time.monotonic() - started


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End the runbook's background processes (its own process group, started here)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap bash itself: a zombie still counts in its group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        if proc.poll() is None:
            proc.wait(1)
