"""Two independent jobs side by side, one core thread each, against the same
jobs one after another on all threads (the way a network runs them): does
task parallelism beat the data parallelism of each call on this machine?

    flock /work/cpu.lock .venv/bin/python bench/side_by_side.py [--rounds 15] [--reuse-memory] [--quick]

The question behind it: a network's kernel maps are largely independent of
each other (the submanifold map at a stride needs only that stride's
coords), and most of their work is sorts and passes over 10^4-10^5 rows
that gain little from a second thread. Built as tasks of one thread each,
two at a time on Python threads (the core releases the GIL), they would
leave no thread waiting at a barrier. Measured on the north star's sweep
(KITTI raw 000049 at 0.05 m; a generated street of 20k voxels when absent
or with ``--quick``), two pairs of jobs, each job a direct core call:

- maps: the submanifold k3 map (``_core.kmap_mergesort``) and the k2 s2
  downsampling map (``_core.kmap_parents``) of the sweep;
- convs (control, compute-bound): two dense float32 ``Conv3d(32, 32, 3)``
  forwards on the sweep's k3 plan (``ConvPlan.forward``).

Each pair three ways, interleaved round by round: one after another on
2 threads each, one after another on 1 thread each, and side by side on
two Python threads, 1 thread each (two threads kept for the whole run).
Every way computes the same arrays (checked first). ``--reuse-memory``:
``pointsparse.reuse_freed_memory(True)`` first, so that the jobs' output
arrays come from pages the process keeps instead of fresh pages that the
kernel faults in (a second thread's faults contend with the first's).
Writes bench/results/side_by_side.md.
"""

from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
import shlex
import sys

import numpy as np
import torch

from _common import environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, write_markdown

import pointsparse as ps  # noqa: E402
from pointsparse import _ext  # noqa: E402
from pointsparse import kmap as _kmap  # noqa: E402
from pointsparse.nn import _engine  # noqa: E402


def map_jobs(coords: torch.Tensor):
    """(submanifold k3 map, k2 s2 parents map) as callables of a thread count."""
    c = np.ascontiguousarray(coords.numpy())
    offsets = _kmap._offsets((3, 3, 3), (1, 1, 1), (1, 1, 1)).numpy()
    return (lambda nt: _ext.core.kmap_mergesort(c, None, offsets, nt),
            lambda nt: _ext.core.kmap_parents(c, [2, 2, 2], [2, 2, 2], None, nt))


def conv_jobs(coords: torch.Tensor, channels: int = 32):
    """Two dense float32 convs (their own output arrays) on the sweep's k3 plan."""
    plan = _engine.make_fused_plan(ps.kmap.build(coords, 3))
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(len(coords), channels, generator=g).numpy()
    weight = (torch.randn(27, channels, channels, generator=g) / channels ** 0.5).numpy()
    outs = [np.empty((len(coords), channels), dtype=np.float32) for _ in range(2)]

    def job(i):
        return lambda nt: (plan.core.forward(feats, weight, None, outs[i], nt), outs[i])[1]

    return job(0), job(1)


# Two threads kept for every side-by-side run: a thread made for one call
# would pay for its own start and for its first call's thread-local state
# (the core's scratch buffers, OpenMP's per-thread data) every time.
_POOL = ThreadPoolExecutor(max_workers=2)


def side_by_side(a, b) -> list:
    """a(1) and b(1) on two Python threads at once; their results."""
    futures = [_POOL.submit(fn, 1) for fn in (a, b)]
    return [f.result() for f in futures]


def snapshot(x):
    """A copy of a job's result (arrays, or tuples of them): a job may return
    an array it writes again in its next call (the conv jobs' outputs)."""
    if isinstance(x, tuple):
        return tuple(snapshot(p) for p in x)
    return np.array(x, copy=True)


def same(x, y) -> bool:
    if isinstance(x, tuple):
        return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y))
    return np.array_equal(np.asarray(x), np.asarray(y))


def measure(coords: torch.Tensor, rounds: int) -> str:
    lines = ["| jobs | one after another, 2 threads each ms | one after another, 1 thread each ms | "
             "side by side, 1 thread each ms | side by side / 2 threads each |", "|---|---|---|---|---|"]
    for name, (a, b) in (("maps: k3 submanifold + k2 s2 parents", map_jobs(coords)),
                         ("convs (control): two dense Conv3d(32, 32, 3) forwards", conv_jobs(coords))):
        want = [snapshot(a(2)), snapshot(b(2))]  # (copied: the side-by-side calls write the same arrays)
        got = side_by_side(a, b)
        if not (same(want[0], got[0]) and same(want[1], got[1])):
            raise AssertionError(f"{name}: the jobs side by side computed other arrays")
        t = interleaved({"2": lambda: (a(2), b(2)), "1": lambda: (a(1), b(1)), "side": lambda: side_by_side(a, b)},
                        rounds)
        lines.append(f"| {name} | {1e3 * t['2']:.2f} | {1e3 * t['1']:.2f} | {1e3 * t['side']:.2f} | "
                     f"{t['side'] / t['2']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--quick", action="store_true", help="a generated street of 20k voxels, 3 rounds")
    parser.add_argument("--reuse-memory", action="store_true", help="pointsparse.reuse_freed_memory(True) first")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page's name in bench/results (default side_by_side.md)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
    if _ext.max_threads() < 2:
        print("side_by_side: this process may run on one processor only; nothing to compare")
        return
    if args.reuse_memory and not ps.reuse_freed_memory(True):
        print("side_by_side: this C library is not glibc; --reuse-memory changes nothing here")
    coords, scene = kitti_or_street(args.quick)
    table = measure(coords, args.rounds)
    print(table)
    write_markdown(page_path(args.out, "side_by_side.md", args.quick),
                   f"Two jobs side by side against one after another: {scene} ({len(coords):,} voxels)",
                   "python bench/side_by_side.py " + shlex.join(sys.argv[1:]), environment(),
                   [table], "Medians of interleaved rounds; a ratio below 1.00x: side by side is faster.")


if __name__ == "__main__":
    main()
