"""Kernel-map builds back to back in fresh processes: the 2-thread slow spell.

A review of stop 77 timed ``kmap.build`` (submanifold k3 on the KITTI sweep at
0.05 m) 20-30 times back to back in a fresh process at 2 threads and found
two speeds: some processes ran every build about 3.5x slower than others.
This script runs that loop in ``--processes`` fresh processes, alternating
glibc's defaults with ``pointsparse.reuse_freed_memory(True)`` (freed heap
kept in the process, so a build finds its pages mapped), and tables each
process's median and its builds' spread, every map checked equal to the
first process's (a generated street where the sweep is absent).

    python bench/kmap_loop.py [--quick] [--processes 6] [--builds 40] [--threads 2] [--out PAGE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import _common as c

# One process: the cloud, then the builds; prints one JSON line.
CHILD = r"""
import hashlib, json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
import _common as c
import pointsparse as ps
threads, builds, reuse, quick = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
torch.set_num_threads(threads)
if reuse and not ps.reuse_freed_memory(True):
    raise SystemExit("the C library is not glibc: reuse_freed_memory changes nothing")
coords, name = c.kitti_or_street(quick)
times, digest = [], None
for _ in range(builds):
    t0 = time.perf_counter()
    kmap = ps.kmap.build(coords, 3)
    times.append(time.perf_counter() - t0)
    if digest is None:
        h = hashlib.sha256()
        for t in (kmap.in_idx, kmap.out_idx, kmap.sizes, kmap.out_coords):
            h.update(t.contiguous().numpy().tobytes())
        digest = h.hexdigest()
print(json.dumps({"name": name, "rows": len(coords), "times": times, "digest": digest}))
"""


def child(threads: int, builds: int, reuse: bool, quick: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent), str(threads), str(builds),
                           "1" if reuse else "0", "1" if quick else "0"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kmap_loop: a child process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small street, 2 processes of 5 builds")
    ap.add_argument("--processes", type=c.positive_int, default=None,
                    help="fresh processes of each setting, alternated (default 6, --quick 1)")
    ap.add_argument("--builds", type=c.positive_int, default=None, help="builds a process (default 40, --quick 5)")
    ap.add_argument("--threads", type=c.positive_int, default=2)
    ap.add_argument("--out", type=c.page_arg, default=None,
                    help="default bench/results/kmap_loop.md (--quick: a temporary folder)")
    args = ap.parse_args()
    out = c.page_path(args.out, "kmap_loop.md", args.quick)
    processes = args.processes or (1 if args.quick else 6)
    builds = args.builds or (5 if args.quick else 40)
    rows, medians, first = [], {False: [], True: []}, None
    for i in range(processes):
        for reuse in (False, True):
            r = child(args.threads, builds, reuse, args.quick)
            if first is None:
                first = r
            elif r["digest"] != first["digest"]:
                raise SystemExit("kmap_loop: a process built another map than the first")
            ms = [1e3 * t for t in r["times"]]
            med = statistics.median(ms[1:] if len(ms) > 1 else ms)  # (the first build: the process's warm-up)
            medians[reuse].append(med)
            setting = "reuse_freed_memory(True)" if reuse else "glibc defaults"
            rows.append(f"| {i + 1} | {setting} | {med:.2f} | {min(ms):.2f} | {max(ms):.2f} |")
            print(rows[-1], flush=True)
    table = ("| process | malloc | median ms a build | fastest | slowest |\n|---|---|---|---|---|\n"
             + "\n".join(rows))
    summary = (f"Medians of the processes' medians: glibc defaults {statistics.median(medians[False]):.2f} ms, "
               f"reuse_freed_memory(True) {statistics.median(medians[True]):.2f} ms.")
    notes = (f"`kmap.build(coords, 3)` on {first['name']} ({first['rows']:,} rows), {builds} builds back to back in "
             f"each fresh process at {args.threads} threads (a process's median leaves its first build out), the "
             "two settings alternated process by process; every process's map equal to the first's (sha256 of its "
             "arrays). " + summary)
    c.write_markdown(out, "Kernel-map builds back to back in fresh processes", "python bench/kmap_loop.py " + shlex.join(sys.argv[1:]),
                     c.environment(), [table], notes)
    print(summary)


if __name__ == "__main__":
    main()
