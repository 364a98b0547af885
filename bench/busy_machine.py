"""The coordinate core on a busy machine (issue 14, item 6): `unique_keys`,
`pack_keys` and building a SparseTensor from user coords, at 1 and 2 threads,
on a quiet machine and with one competing process (a Python busy loop) running
meanwhile. On a 2-core machine a 2-thread call then shares the cores with the
competitor: it must not collapse (a parallel region whose second thread is
descheduled waits a whole time slice at each barrier).

    flock /work/cpu.lock .venv/bin/python bench/busy_machine.py [--repeats 21] [--out PAGE.md] [--quick]

Medians of interleaved repeats (1 thread, 2 threads, in turn); keys from the
KITTI sweep's points quantised at 0.05 m (a generated street when absent).
Writes bench/results/busy_machine.md (``--quick``: a 20k generated street,
3 repeats, the page in a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from _common import environment, page_arg, page_path, positive_int, real_sweeps, street_points, write_markdown

import pointsparse as ps  # noqa: E402  (after _common puts the repo on the path)
from pointsparse import _ext  # noqa: E402
from pointsparse import coords as _coords  # noqa: E402

VOXEL = 0.05


@contextlib.contextmanager
def competitor(busy: bool):
    """One other process spinning on a core while the block runs."""
    if not busy:
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.3)  # let it reach the loop
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def inputs(quick: bool = False) -> dict:
    """Point coords (with duplicates), their keys and the voxel coords."""
    sweeps = {} if quick else real_sweeps()
    name = "kitti-raw/000049"
    pts = sweeps[name] if name in sweeps else street_points(20_000 if quick else 100_000)
    grid = torch.from_numpy(np.floor(pts / VOXEL).astype(np.int32))
    coords = torch.cat([torch.zeros(len(grid), 1, dtype=torch.int32), grid], 1).contiguous()
    layout = _coords.KeyLayout.of(coords)
    keys = _coords.pack(coords, layout)
    voxels = torch.unique(coords, dim=0)
    return {"name": name if name in sweeps else "generated street", "coords": coords, "layout": layout,
            "keys": keys, "voxels": voxels}


def cases(data: dict) -> dict:
    """name -> fn(threads) running one call."""
    keys, coords = _ext.to_numpy(data["keys"]), _ext.to_numpy(data["coords"])
    layout = data["layout"].core()
    feats = torch.ones(len(data["voxels"]), 1)

    def tensor(nt):  # the core takes torch's thread count
        torch.set_num_threads(nt)
        ps.SparseTensor(feats, data["voxels"])
    return {f"unique_keys ({len(keys)} keys)": lambda nt: _ext.core.unique_keys(keys, nt),
            f"pack_keys ({len(coords)} rows)": lambda nt: _ext.core.pack_keys(coords, layout, nt),
            f"SparseTensor from coords ({len(feats)} voxels)": tensor}


def measure(fns: dict, repeats: int) -> dict:
    """(case, threads) -> median seconds, 1- and 2-thread calls interleaved."""
    times = {(c, nt): [] for c in fns for nt in (1, 2)}
    for _ in range(repeats):
        for c, fn in fns.items():
            for nt in (1, 2):
                t0 = time.perf_counter()
                fn(nt)
                times[(c, nt)].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=positive_int, default=None, help="interleaved repeats (default 21, --quick 3)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a 20k generated street, 3 repeats")
    p.add_argument("--out", "--output", dest="out", type=page_arg, default=None,
                   help="the page (default bench/results/busy_machine.md); --output: the same (its older name)")
    args = p.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 21)
    output = page_path(args.out, "busy_machine.md", args.quick)
    data = inputs(args.quick)
    fns = cases(data)
    for fn in fns.values():  # warm up, and check 1 and 2 threads agree
        fn(1), fn(2)
    a, b = _ext.core.unique_keys(_ext.to_numpy(data["keys"]), 1), _ext.core.unique_keys(_ext.to_numpy(data["keys"]), 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), "unique_keys differs between 1 and 2 threads"
    rows = ["| call | quiet, 1 thread ms | quiet, 2 threads ms | busy, 1 thread ms | busy, 2 threads ms | "
            "busy 2t / quiet 1t |", "|---|---|---|---|---|---|"]
    res = {}
    for busy in (False, True):
        with competitor(busy):
            res[busy] = measure(fns, repeats)
    for c in fns:
        q1, q2, b1, b2 = res[False][(c, 1)], res[False][(c, 2)], res[True][(c, 1)], res[True][(c, 2)]
        rows.append(f"| {c} | {q1 * 1e3:.2f} | {q2 * 1e3:.2f} | {b1 * 1e3:.2f} | {b2 * 1e3:.2f} | {b2 / q1:.1f}x |")
        print(rows[-1], flush=True)
    cmd = "flock /work/cpu.lock .venv/bin/python bench/busy_machine.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                      else argv)
    write_markdown(__import__("pathlib").Path(output), f"Coordinate core on a busy machine ({data['name']})",
                   cmd, environment() | {"isa": _ext.core.conv_isa()}, ["\n".join(rows)])
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
