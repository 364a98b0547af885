"""What a process pays to start on pointsparse: ``import pointsparse`` (and
its nn and models), the tool's ``--help``, a command's ``--help``, a first
``prune.sparsity_report``. Each case is a fresh Python process (the imports
are the process's), run ``--rounds`` times, the cases and trees interleaved
round by round; its wall time and its CPU time (user + system, of the child
alone) are taken, medians reported.

    flock /work/cpu.lock .venv/bin/python bench/startup.py [TREE ...] [--rounds 7] [--out PAGE.md] [--quick]

``TREE``: checkouts to compare (their package first on the path, each with
its extension module built in it; default: this one), the ratios against
the first. ``--quick``: two rounds (unless given), the page in a temporary
folder.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import environment, page_arg, page_path, positive_int, quick_defaults, write_markdown

ROOT = Path(__file__).resolve().parents[1]

#: (name, the child's arguments after the interpreter)
CASES = [
    ("import pointsparse", ["-c", "import pointsparse"]),
    ("import pointsparse.nn, .models", ["-c", "import pointsparse.nn, pointsparse.models"]),
    ("pointsparse --help", ["-m", "pointsparse", "--help"]),
    ("pointsparse train --help", ["-m", "pointsparse", "train", "--help"]),
    ("pointsparse export --help", ["-m", "pointsparse", "export", "--help"]),
    ("pointsparse prune --help", ["-m", "pointsparse", "prune", "--help"]),
    ("first prune.sparsity_report", ["-c", "import torch, pointsparse as ps; from pointsparse import prune; "
                                     "prune.sparsity_report(torch.nn.Sequential(ps.nn.Conv3d(4, 8, 3)))"]),
]


def run_once(tree: Path, argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one child on ``tree``'s package."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} in {tree} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", help="checkouts to compare (default: this one)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 7 (--quick: 2)")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="default bench/results/startup.md (--quick: a temporary folder)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    quick_defaults(args, rounds=(7, 2))
    trees = [Path(t).resolve() for t in args.trees] or [ROOT]
    for tree in trees:
        if not (tree / "pointsparse" / "__init__.py").is_file() or not list((tree / "pointsparse").glob("_core*.so")):
            raise SystemExit(f"{tree}: no pointsparse package with its extension module built in it")
    # (by the tree's place on the command line: one tree given twice, `. .`, is timed as two)
    got = {(i, name): [] for i in range(len(trees)) for name, _ in CASES}
    order = list(range(len(trees)))
    for r in range(args.rounds):
        for name, argv in CASES:
            for i in order if r % 2 == 0 else order[::-1]:  # (each tree first in every other round)
                got[i, name].append(run_once(trees[i], argv))
        print(f"round {r + 1}/{args.rounds}", flush=True)

    def median(tree, name, i):
        return statistics.median(x[i] for x in got[tree, name])

    head = "| case | " + " | ".join(f"{t} wall s | CPU s" + (" | CPU ratio" if i else "")
                                     for i, t in enumerate(trees)) + " |"
    lines = [f"### Fresh processes, medians of {args.rounds} interleaved rounds (ratio: the first tree's CPU "
             f"time over this one's)", "", head, "|" + "---|" * (1 + 2 * len(trees) + len(trees) - 1)]
    for name, _ in CASES:
        cells = []
        for i in order:
            cells += [f"{median(i, name, 0):.2f}", f"{median(i, name, 1):.2f}"]
            if i:
                cells.append(f"{median(0, name, 1) / median(i, name, 1):.2f}x")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    page = page_path(args.out, "startup.md", args.quick)
    write_markdown(page, "What a process pays to start on pointsparse",
                   "python bench/startup.py " + shlex.join(sys.argv[1:]), environment(), ["\n".join(lines)])
    print("\n".join(lines))
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
