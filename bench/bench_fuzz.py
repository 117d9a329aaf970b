"""Fuzzing, the long run: every parser of outside bytes, >= 10^5 inputs each.

``python -m bench fuzz [--quick] [--engine=atheris|hypothesis] [--runs=N] [--only=NAME,...]``
(``python -m bench`` passes only ``--flag=value`` forms on), or ``python -m bench.bench_fuzz``.

Each input is judged by the property of `tests.fuzz.targets`: accepted, or refused with the
parser's own error type and a reason; no other exception, no hang (5 s of CPU time per input), peak
memory (tracemalloc) under 64 x the input size + 16 MiB. A violation does not stop the run: each
distinct one (exception type and innermost edgefleet frame) is counted with its first input.

Engines: ``atheris`` (coverage-guided libFuzzer, one child process per parser, seeded with valid
messages and structure-aware hostile examples; in the ``bench`` extra) and ``hypothesis`` (the
property tests' structure-aware strategies, generation only). The default is atheris when it is
installed. ``--quick``: 2,000 inputs per parser. Exit code 1 when any parser had a violation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Stats:
    target: str
    engine: str
    inputs: int = 0
    accepted: int = 0
    refused: int = 0
    violations: dict[str, str] = field(default_factory=dict)  # signature -> first input (repr)
    violation_count: int = 0
    hangs: int = 0
    max_ms: float = 0.0
    max_peak_bytes: int = 0
    max_bound_ratio: float = 0.0  # peak / bound, worst input
    seconds: float = 0.0

    def record(self, data: bytes, out: Any, target: Any) -> None:
        from tests.fuzz import targets as T

        self.inputs += 1
        self.max_ms = max(self.max_ms, out.seconds * 1000)
        self.max_peak_bytes = max(self.max_peak_bytes, out.peak_bytes)
        self.max_bound_ratio = max(self.max_bound_ratio, out.peak_bytes / T.mem_bound(len(data)))
        try:
            T.judge(target, data, out)
        except T.Violation as v:
            self.violation_count += 1
            if isinstance(out.error, T.Hang):
                self.hangs += 1
                sig = "hang"
            elif out.error is not None and not isinstance(out.error, target.errors):
                sig = T.crash_signature(out.error)
            else:
                sig = "memory over bound" if out.peak_bytes > T.mem_bound(len(data)) else str(v)
            self.violations.setdefault(sig, repr(data[:200]) + f" ({len(data)} bytes)")
            return
        if out.accepted:
            self.accepted += 1
        else:
            self.refused += 1


# --------------------------------------------------------------------------- hypothesis


def run_hypothesis(name: str, runs: int) -> Stats:
    from hypothesis import HealthCheck, Phase, given, settings

    from tests.fuzz import targets as T
    from tests.fuzz.strategies import STRATEGIES

    target = T.targets()[name]
    stats = Stats(name, "hypothesis")

    @settings(
        max_examples=runs,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(STRATEGIES[name])
    def one(data: bytes) -> None:
        stats.record(data, T.run_bounded(target.fn, data), target)

    t0 = time.perf_counter()
    one()
    stats.seconds = time.perf_counter() - t0
    return stats


# --------------------------------------------------------------------------- atheris


def _seed_corpus(name: str, directory: Path, hostile: int = 64) -> None:
    from hypothesis.errors import NonInteractiveExampleWarning

    from tests.fuzz import targets as T
    from tests.fuzz.strategies import STRATEGIES

    directory.mkdir(parents=True, exist_ok=True)
    seeds = T.targets()[name].seeds()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonInteractiveExampleWarning)
        for _ in range(hostile):
            data = STRATEGIES[name].example()
            if len(data) <= 65536:
                seeds.append(data)
    for i, data in enumerate(seeds):
        (directory / f"seed-{i:03d}").write_bytes(data)


def atheris_child(name: str, runs: int, corpus: Path, out: Path) -> None:
    """In a child process: libFuzzer over one parser; writes `Stats` JSON to ``out``."""
    import atheris

    with atheris.instrument_imports(include=["edgefleet"]):
        from tests.fuzz import targets as T

    target = T.targets()[name]
    stats = Stats(name, "atheris")
    t0 = time.perf_counter()

    def flush() -> None:
        stats.seconds = time.perf_counter() - t0
        out.write_text(json.dumps(asdict(stats)))

    def one(data: bytes) -> None:
        stats.record(data, T.run_bounded(target.fn, data), target)
        if stats.inputs % 5000 == 0:
            flush()
        if stats.inputs >= runs:
            flush()
            os._exit(0)

    atheris.Setup(
        [
            sys.argv[0],
            f"-runs={runs + 10_000}",
            "-max_len=65536",
            "-rss_limit_mb=4096",
            # libFuzzer writes slow-unit-*/crash-* files; keep them in the run's scratch folder
            f"-artifact_prefix={corpus.parent}/",
            str(corpus),
        ],
        one,
    )
    atheris.Fuzz()


def run_atheris(name: str, runs: int, time_limit: float) -> Stats:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        corpus, out = Path(tmp) / "corpus", Path(tmp) / "stats.json"
        _seed_corpus(name, corpus)
        argv = [sys.executable, "-m", "bench.bench_fuzz", "--child", name, "--runs", str(runs)]
        argv += ["--corpus", str(corpus), "--out", str(out)]
        log = Path(tmp) / "child.log"
        with open(log, "wb") as lf:
            try:
                proc = subprocess.run(
                    argv, cwd=REPO, stdout=lf, stderr=subprocess.STDOUT, timeout=time_limit
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = -1
        stats = Stats(**json.loads(out.read_text())) if out.exists() else Stats(name, "atheris")
        if rc != 0:  # libFuzzer itself stopped (out of memory, a crash in native code, time)
            tail = log.read_text(errors="replace")[-600:]
            stats.violations[f"fuzzer stopped (rc {rc})"] = tail
            stats.violation_count += 1
        return stats


# --------------------------------------------------------------------------- table


def _table(rows: list[Stats]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fuzzing: every parser of outside bytes")
    for col in (
        "parser",
        "engine",
        "inputs",
        "accepted",
        "refused",
        "violations",
        "distinct",
        "hangs",
        "max ms/input",
        "peak MiB (max)",
        "peak/bound (max)",
        "inputs/s",
    ):
        t.add_column(col, justify="left" if col in ("parser", "engine") else "right")
    for s in rows:
        t.add_row(
            s.target,
            s.engine,
            f"{s.inputs:,}",
            f"{s.accepted:,}",
            f"{s.refused:,}",
            f"{s.violation_count:,}",
            str(len(s.violations)),
            str(s.hangs),
            f"{s.max_ms:.1f}",
            f"{s.max_peak_bytes / 2**20:.1f}",
            f"{s.max_bound_ratio:.2f}",
            f"{s.inputs / s.seconds:,.0f}" if s.seconds else "-",
        )
    Console(width=200).print(t)
    for s in rows:
        for sig, first in s.violations.items():
            print(f"  {s.target}: {sig}\n      first input: {first[:300]}")


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz import targets as T

    p = argparse.ArgumentParser(prog="python -m bench fuzz")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--engine", choices=["atheris", "hypothesis"])
    p.add_argument("--runs", type=int)
    p.add_argument("--only", default="")
    p.add_argument("--child")
    p.add_argument("--corpus", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    runs = a.runs or (2_000 if a.quick else 100_000)
    if a.child:
        atheris_child(a.child, runs, a.corpus, a.out)
        return 0
    engine = a.engine
    if engine is None:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
    names = [n for n in a.only.split(",") if n] or list(T.targets())
    rows = []
    for name in names:
        t0 = time.perf_counter()
        s = run_atheris(name, runs, 3600) if engine == "atheris" else run_hypothesis(name, runs)
        print(
            f"{name}: {s.inputs} inputs, {len(s.violations)} distinct violations"
            f" in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        rows.append(s)
    _table(rows)
    if a.json:
        a.json.write_text(json.dumps([asdict(s) for s in rows], indent=2))
    return 1 if any(s.violation_count for s in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
