"""Run the benchmark suites of a source checkout (``bench/*.py``)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


#: The suite and ``--args`` the help and the README show (a test runs them through that suite's parser).
EXAMPLE = ("conv", "--threads 1 --repeats 5")


def suites() -> list[str]:
    return sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_")) if BENCH_DIR.is_dir() else []


def add_arguments(parser) -> None:
    parser.add_argument("suite", nargs="*", help=f"suites to run (default: all); found: {', '.join(suites()) or 'none'}")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats, to check that they run")
    parser.add_argument("--args", default="", metavar="'OPTIONS'",
                        help="options handed to each suite, quoted as one argument (pointsparse bench "
                             f"{EXAMPLE[0]} --args '{EXAMPLE[1]}'); each suite's --help lists its own")
    parser.verbatim_options = ("--args",)  # (CommandParser: '--args --no-variants' is a value, not two options)


def main(args) -> int:
    """Runs the suites in turn (each its own process); the exit status is
    nonzero where one failed. No suites found, an unknown suite or
    ``--args`` that do not split as a shell would are a ValueError (the
    command's ``pointsparse bench: error:`` line, status 2)."""
    found = suites()
    if not found:
        raise ValueError(f"no benchmark suites found in {BENCH_DIR} (benchmarks run from a source checkout)")
    wanted = args.suite or found
    unknown = [s for s in wanted if s not in found]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; available: {', '.join(found)}")
    try:
        extra = shlex.split(args.args)
    except ValueError as error:  # (an unclosed quote)
        raise ValueError(f"--args {args.args!r} does not split into options: {error}") from None
    status = 0
    for name in wanted:
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py")] + (["--quick"] if args.quick else []) + extra
        print(f"$ {' '.join(cmd)}", flush=True)
        status |= subprocess.call(cmd)
    return status
