"""Property-based fuzzing of the public entry points (cases in tests/fuzz_cases.py).

Each family runs in a child process: a crash (a signal), a hang (the family's
time limit) or a runaway case (one case over CASE_SECONDS) fails the test
and names the case; so does an error of another type than ValueError /
TypeError, an error without a message, or a result that disagrees with the
naive reference. ``FUZZ_SEED`` chooses other cases.

Each family also runs a quarter of its cases on a seed of the day (UTC,
``YYYYMMDD``; ``FUZZ_DAY_SEED`` sets it, ``FUZZ_DAY_SEED=0`` leaves these
out), so that CI meets new cases over time; a failure names its seed and the
command that reruns the case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SEED = 20261130
SEED = int(os.environ.get("FUZZ_SEED", str(DEFAULT_SEED)))
DAY_SEED = int(os.environ.get("FUZZ_DAY_SEED", time.strftime("%Y%m%d", time.gmtime())))
COUNTS = {"sparse_tensor": 600, "voxelize": 500, "kmap": 400, "conv": 300, "readers": 600, "formats": 600, "cli": 600,
          "pruned_conv": 150, "pruned_module": 300, "compressed": 200, "threads": 40}
#: The families that compare thread counts: they need two processors.
TWO_THREADS = {"threads"}
CASE_SECONDS = 20.0
FAMILY_SECONDS = 240


def _run(family: str, runs: list):
    """The family's cases of each ``(seed, count)`` of ``runs`` in one child process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), POINTSPARSE_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tests" / "fuzz_cases.py"), family, *(f"{seed}:{count}" for seed, count in runs)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env,
                              timeout=FAMILY_SECONDS)
        stdout, code, hung = proc.stdout, proc.returncode, False
        stderr = proc.stderr
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code, hung = None, True
    lines = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return lines, code, hung, stderr


def _runs(family: str) -> list:
    """(seed, count): the built-in seed's cases, then a quarter of them on
    the day's seed (its seed read when the test runs, not in its id:
    pytest-xdist's workers must collect the same tests, across midnight
    too), in one child process: a child's start is some seconds of
    importing torch (two children a family: 45 s of the suite's worker
    time on an AMD Zen 3, bench/RESULTS.md stop 78)."""
    runs = [(SEED, COUNTS[family])]
    if DAY_SEED and DAY_SEED != SEED:
        runs.append((DAY_SEED, max(10, COUNTS[family] // 4)))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(COUNTS))
def test_fuzz_family(family):
    if family in TWO_THREADS and _ext_max_threads() < 2:
        pytest.skip(f"{family} compares 1 and 2 threads; this process may run on one processor")
    runs = _runs(family)
    lines, code, hung, stderr = _run(family, runs)
    started = [(r["seed"], r["start"]) for r in lines if "start" in r]
    results = [r for r in lines if "result" in r]
    rerun = f"python tests/fuzz_cases.py {family} {{}} {{}}"
    if hung or code != 0:
        seed, last = started[-1] if started else (runs[0][0], None)
        what = "hung (no answer within the time limit)" if hung else f"crashed (exit status {code})"
        pytest.fail(f"{family} case {last} of seed {seed} {what}; rerun: {rerun.format(seed, last)}\n"
                    f"{stderr[-2000:]}")
    for seed, count in runs:
        mine = [r for r in results if r["seed"] == seed]
        assert len(mine) == count, (seed, len(mine), count)
        bad = [r for r in mine if r["result"] in ("unnamed", "wrong")]
        slow = [r for r in mine if r["seconds"] > CASE_SECONDS]
        report = "\n".join(f"case {r['index']}: {r['result']}: {r.get('msg')}\n{r.get('where', '')}  rerun: "
                           f"{rerun.format(seed, r['index'])}" for r in bad[:5])
        assert not bad, f"{len(bad)} of {len(mine)} {family} cases of seed {seed} failed:\n{report}"
        assert not slow, (f"runaway work in {family}: " +
                          ", ".join(f"case {r['index']} of seed {seed} took {r['seconds']} s" for r in slow))
        # Not vacuous: the built-in seed's cases reach both valid results and
        # refusals (another seed, a day's quarter, may draw too few to meet both).
        outcomes = {r["result"] for r in mine}
        assert seed != DEFAULT_SEED or "ok" in outcomes and "refused" in outcomes, f"{family}: only {outcomes}"


def _ext_max_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1
