"""Kernel maps built back to back in a process that does nothing else: the
submanifold k3 map of a cloud through ``_core.kmap_mergesort`` on 1 and 2
threads, each setting in a child process of its own (glibc's heap state is
the process's), with glibc's defaults and with
``pointsparse.reuse_freed_memory(True)``. A loop like this is what a
benchmark of map building runs; ``bench/kmap.py`` times whole
``kmap.build`` calls in a process that allocates much else between them.

    flock /work/cpu.lock .venv/bin/python bench/map_loop.py [--calls 15] [--runs 2] [--quick]

On KITTI raw 000049 at 0.05 m (a generated street of 20k voxels where the
dataset is absent, or with ``--quick``: 3 calls and one run unless given, the
page in a temporary folder). Each child reports the median of its calls and its minor
page faults a call; the children run in turn, ``--runs`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys

from _common import environment, kitti_or_street, page_arg, page_path, positive_int, quick_defaults, write_markdown

CHILD = r"""
import json, resource, statistics, sys, time
import numpy as np, torch
import pointsparse as ps
coords = torch.load(sys.argv[1], weights_only=True).numpy()
threads, calls, reuse = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if reuse:
    ps.reuse_freed_memory(True)
core = ps._ext.core
off = np.array([[x, y, z] for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1)], dtype=np.int32)
core.kmap_mergesort(coords, None, off, threads)
times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(calls):
    t = time.perf_counter()
    core.kmap_mergesort(coords, None, off, threads)
    times.append(time.perf_counter() - t)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / calls
print(json.dumps({"ms": 1e3 * statistics.median(times), "faults": faults}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=positive_int, default=None, help="default 15 (--quick: 3)")
    parser.add_argument("--runs", type=positive_int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None)
    args = parser.parse_args()
    quick_defaults(args, calls=(15, 3), runs=(2, 1))
    import tempfile

    import torch

    coords, name = kitti_or_street(args.quick)
    settings = [(t, r) for r in (0, 1) for t in (1, 2)]
    got = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "coords.pt")
        torch.save(coords.contiguous(), path)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        for _ in range(args.runs):
            for threads, reuse in settings:
                out = subprocess.run([sys.executable, "-c", CHILD, path, str(threads), str(args.calls), str(reuse)],
                                     capture_output=True, text=True, env=env, check=True)
                got[threads, reuse].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(threads, reuse, got[threads, reuse][-1], flush=True)
    rows = [f"| {'reuse_freed_memory(True)' if reuse else 'glibc defaults'} | {threads} | "
            + " / ".join(f"{r['ms']:.2f}" for r in got[threads, reuse]) + " | "
            + " / ".join(f"{r['faults']:.0f}" for r in got[threads, reuse]) + " |" for threads, reuse in settings]
    table = [f"### {name}: {len(coords):,} voxels, submanifold k3 built {args.calls} times a child process, "
             f"medians (one a run)", "",
             "| memory | threads | ms a map | minor faults a map |", "|---|---|---|---|", *rows]
    page = page_path(args.out, "map_loop.md", args.quick)
    write_markdown(page, "Kernel maps built back to back", "python bench/map_loop.py " + shlex.join(sys.argv[1:]),
                   environment(), ["\n".join(table)])
    print(page)


if __name__ == "__main__":
    main()
