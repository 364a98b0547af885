"""Run the benchmark suites of a source checkout (``bench/*.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def suites() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_")) if BENCH_DIR.is_dir() else []


def add_arguments(parser) -> None:
    parser.add_argument("suite", nargs="*", help=f"suites to run (default: all); found: {', '.join(suites()) or 'none'}")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats, to check that they run")


def main(args) -> int:
    found = suites()
    if not found:
        print(f"no benchmark suites found in {BENCH_DIR} (benchmarks run from a source checkout)", file=sys.stderr)
        return 2
    wanted = args.suite or found
    unknown = [s for s in wanted if s not in found]
    if unknown:
        print(f"unknown suite(s) {unknown}; available: {found}", file=sys.stderr)
        return 2
    status = 0
    for name in wanted:
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py")] + (["--quick"] if args.quick else [])
        print(f"$ {' '.join(cmd)}", flush=True)
        status |= subprocess.call(cmd)
    return status
