"""The peak memory of `voxelize(reduce="max")` under no_grad: without the max's source rows against with them.

    python bench/voxelize_memory.py [--points 2000000] [--channels 32] [--rounds 3] [--out PAGE.md] [--quick]

Draws ``--points`` uniform points in a 100 m cube with ``--channels`` random
features and voxelises them at 0.5 m with ``reduce="max"``, in a fresh
child process per measurement, under ``torch.no_grad()``; the page gives how
far the resident peak (``VmHWM``, reset through ``/proc/self/clear_refs``)
grows over the call. Two forms, interleaved round by round in a seeded
order:

- ``no source rows``: ``pointsparse.voxelize`` (since stop 76: no gradient
  will route through the max, so the core makes no int64 ``(M, C)`` rows);
- ``with source rows``: the autograd path's core call
  (``voxelize._VoxelizeCore``), which makes them, as every call did before.

Both forms' voxels and features are compared (bit-equal expected). Linux
only (it reads ``/proc``)."""

from __future__ import annotations

import argparse
import shlex
import sys

from _common import (add_peak_options, child_peaks, environment, page_path, peak_table, positive_int,
                     quick_defaults, write_markdown)


CHILD = r"""
import hashlib, importlib, json, sys
import torch
import pointsparse as ps
V = importlib.import_module("pointsparse.voxelize")
form, n, c = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
points = torch.rand(n, 3, generator=g) * 100
feats = torch.randn(n, c, generator=g)

def peak():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024

with torch.no_grad():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak()
    if form == "with source rows":
        out = V._VoxelizeCore.apply(feats, points, (0.5,) * 3, None, V.REDUCE_MODES["max"])
        reduced, coords = out[0], out[1]
    else:
        x = ps.voxelize(points, feats, voxel_size=0.5, reduce="max")[0]
        reduced, coords = x.feats, x.coords
    grown = peak() - before
digest = hashlib.sha256(reduced.numpy().tobytes() + coords.numpy().tobytes()).hexdigest()
print(json.dumps({"voxels": len(coords), "grown": grown, "sha": digest}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=positive_int, default=None, help="points (default 2,000,000; --quick 50,000)")
    parser.add_argument("--channels", type=positive_int, default=32, help="feature channels (default 32)")
    add_peak_options(parser, "voxelize_memory.md")
    args = parser.parse_args()
    quick_defaults(args, points=(2_000_000, 50_000), rounds=(3, 1))
    forms = ["no source rows", "with source rows"]
    grown, seen = child_peaks(forms, lambda form: [CHILD, form, str(args.points), str(args.channels)], args.rounds,
                              "voxelize_memory.py")
    equal = seen[forms[0]]["sha"] == seen[forms[1]]["sha"]
    table = peak_table(grown, "with source rows")
    write_markdown(page_path(args.out, "voxelize_memory.md", args.quick),
                   "voxelize(reduce='max') under no_grad: peak memory without and with the max's source rows",
                   "python bench/voxelize_memory.py " + shlex.join(sys.argv[1:]), environment(), [table],
                   f"{args.points:,} uniform points in a 100 m cube, {args.channels} random channels, 0.5 m voxels "
                   f"({seen[forms[0]]['voxels']:,} voxels), reduce='max' under no_grad; the growth of the resident "
                   f"peak over the call, one child process per measurement, {args.rounds} interleaved round(s). "
                   f"Voxels and features of both forms bit-equal: {'yes' if equal else 'NO'}.")
    if not equal:
        raise SystemExit("the two forms' results differ")


if __name__ == "__main__":
    main()
