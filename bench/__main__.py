"""Run every benchmark (or the named ones): ``python -m bench [--quick] [packager agent controller fleet drift fuzz shadow delta scale]``.

Each ``bench/bench_NAME.py`` prints its own table with ratios against a baseline measured in the
same run. A benchmark that fails is reported and the others still run; the exit code says so.
"""

from __future__ import annotations

import importlib
import sys
import time

NAMES = ("packager", "agent", "controller", "fleet", "drift", "fuzz", "shadow", "delta", "scale")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    names = [a for a in args if not a.startswith("-")] or list(NAMES)
    flags = [a for a in args if a.startswith("-")]
    failed = []
    for name in names:
        if name not in NAMES:
            print(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}", file=sys.stderr)
            return 2
        print(f"\n=== bench {name} {' '.join(flags)} ===", flush=True)
        start = time.perf_counter()
        try:
            rc = importlib.import_module(f"bench.bench_{name}").main(flags)
        except Exception as e:  # report and go on with the other benchmarks
            print(f"bench {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
        print(f"=== bench {name}: rc={rc} in {time.perf_counter() - start:.1f}s ===", flush=True)
        if rc:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
