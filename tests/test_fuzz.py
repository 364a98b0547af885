"""Property-based fuzzing of the public entry points (cases in tests/fuzz_cases.py).

Each family runs in a child process: a crash (a signal), a hang (the family's
time limit) or a runaway case (one case over CASE_SECONDS) fails the test
and names the case; so does an error of another type than ValueError /
TypeError, an error without a message, or a result that disagrees with the
naive reference. ``FUZZ_SEED`` and ``FUZZ_COUNT`` choose other cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("FUZZ_SEED", "20261130"))
COUNTS = {"sparse_tensor": 600, "voxelize": 500, "kmap": 400, "conv": 300, "readers": 600, "formats": 600, "cli": 600,
          "pruned_conv": 150, "pruned_module": 300, "compressed": 200}
CASE_SECONDS = 20.0
FAMILY_SECONDS = 240


def _run(family: str, count: int):
    env = dict(os.environ, PYTHONPATH=str(ROOT), FUZZ_COUNT=str(count), POINTSPARSE_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tests" / "fuzz_cases.py"), family, str(SEED)]
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


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(COUNTS))
def test_fuzz_family(family):
    lines, code, hung, stderr = _run(family, COUNTS[family])
    started = [r["start"] for r in lines if "start" in r]
    results = [r for r in lines if "result" in r]
    rerun = f"python tests/fuzz_cases.py {family} {SEED} {{}}"
    if hung or code != 0:
        last = started[-1] if started else None
        what = "hung (no answer within the time limit)" if hung else f"crashed (exit status {code})"
        pytest.fail(f"{family} case {last} {what}; rerun: {rerun.format(last)}\n{stderr[-2000:]}")
    assert len(results) == COUNTS[family]
    bad = [r for r in results if r["result"] in ("unnamed", "wrong")]
    slow = [r for r in results if r["seconds"] > CASE_SECONDS]
    report = "\n".join(f"case {r['index']}: {r['result']}: {r.get('msg')}\n{r.get('where', '')}  rerun: "
                       f"{rerun.format(r['index'])}" for r in bad[:5])
    assert not bad, f"{len(bad)} of {len(results)} {family} cases failed:\n{report}"
    assert not slow, f"runaway work in {family}: " + ", ".join(f"case {r['index']} took {r['seconds']} s" for r in slow)
    # Not vacuous: the cases reach both valid results and refusals.
    outcomes = {r["result"] for r in results}
    assert "ok" in outcomes and "refused" in outcomes, f"{family}: only {outcomes}"
