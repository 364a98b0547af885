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
    """Runs the suites in turn (each its own process; a suite named twice
    once); the exit status is the failed suite's own where one failed (1
    for a signal), 1 where several did, which a closing line names. No
    suites found, an unknown suite, ``--args`` that do not split as a shell
    would, or that name one ``--out`` for several suites (each page written
    over the one before), are a ValueError (the command's ``pointsparse
    bench: error:`` line, status 2)."""
    found = suites()
    if not found:
        raise ValueError(f"no benchmark suites found in {BENCH_DIR} (benchmarks run from a source checkout)")
    wanted = list(dict.fromkeys(args.suite)) or found  # (a suite named twice runs once)
    unknown = [s for s in wanted if s not in found]
    if unknown:
        raise ValueError(f"unknown suite(s) {unknown}; available: {', '.join(found)}")
    try:
        extra = shlex.split(args.args)
    except ValueError as error:  # (an unclosed quote)
        raise ValueError(f"--args {args.args!r} does not split into options: {error}") from None
    if len(wanted) > 1 and any(a == "--out" or a.startswith("--out=") for a in extra):
        # (each suite wrote its page to that one file, the last one's left, every one saying "written")
        raise ValueError(f"--args names one --out for {len(wanted)} suites ({', '.join(wanted)}): each would write "
                         "its page over the one before; run the suites one at a time to name each page")
    failed = {}  # name -> its exit status
    for name in wanted:
        cmd = [sys.executable, str(BENCH_DIR / f"{name}.py")] + (["--quick"] if args.quick else []) + extra
        print(f"$ {' '.join(cmd)}", flush=True)
        code = subprocess.call(cmd)
        if code:
            failed[name] = code
    if failed and len(wanted) > 1:
        said = ", ".join(f"{name} ({f'signal {-code}' if code < 0 else f'exit {code}'})" for name, code in failed.items())
        print(f"pointsparse bench: {len(failed)} of {len(wanted)} suites failed: {said}", file=sys.stderr, flush=True)
    # One suite's own status where it alone failed (a signal: 1); 1 where several did. (An OR of the
    # statuses made 247 of a signal's -9, or 3 of a 1 and a 2.)
    codes = list(failed.values())
    return 0 if not codes else codes[0] if len(codes) == 1 and codes[0] > 0 else 1
