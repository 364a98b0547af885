"""The peak memory of a MinkUNet inference forward: decoder stages run block by block against whole.

    python bench/inference_memory.py [--copies 8] [--cr 1.0] [--rounds 3] [--out PAGE.md] [--quick]

Batches ``--copies`` copies of the KITTI raw sweep 000049 (one batch item
each, 0.05 m; a generated street of 20k voxels where the dataset is absent
or with ``--quick``), builds a MinkUNet of ``--cr`` (seeded weights, eval
mode) and measures, in a fresh child process per measurement, how far the
resident peak (``VmHWM``, reset through ``/proc/self/clear_refs``) grows
over one ``no_grad`` forward after a warm-up forward on the same input.
Two forms, interleaved round by round in a seeded order:

- ``block by block``: the model's forward (since stop 76): the previous
  stage's output dies before the decoder's cat allocates, and the joined
  input after the stage's first block;
- ``whole stage``: the forward as it was before stop 76 (``fuse(cat([up(y),
  skip]))``, which held both through the whole stage), set on the class in
  the child.

Both forms' logits are compared (bit-equal expected). Linux only (it reads
``/proc``)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from _common import (add_peak_options, child_peaks, environment, page_path, peak_table, positive_int,
                     quick_defaults, write_markdown)

BENCH = Path(__file__).resolve().parent

CHILD = r"""
import hashlib, json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import pointsparse as ps
from pointsparse import nn as spnn
from pointsparse.models import MinkUNet
from _common import kitti_path, street_points

form, copies, cr, quick = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"

def whole_stage(self, x):  # (MinkUNet.forward before stop 76, its checks left out)
    skips = [self.stem(x)]
    for stage in self.down:
        skips.append(stage(skips[-1]))
    y = skips.pop()
    for up, fuse in zip(self.up, self.fuse):
        y = fuse(spnn.cat([up(y), skips.pop()]))
    return self.classifier(y)

if form == "whole stage":
    MinkUNet.forward = whole_stage
kitti = None if quick else kitti_path()
source = "KITTI raw 000049" if kitti is not None else "a generated street of 20k voxels"
if kitti is not None:
    raw = np.fromfile(kitti, dtype=np.float32).reshape(-1, 4)
    points, feats = torch.from_numpy(raw[:, :3]), torch.from_numpy(raw)
else:
    points = torch.from_numpy(street_points(20_000)).float()
    feats = torch.cat([points, torch.ones(len(points), 1)], 1)
points = (points - points.min(0).values).repeat(copies, 1)
batch = torch.arange(copies).repeat_interleave(len(feats))
x, _ = ps.voxelize(points, feats.repeat(copies, 1), 0.05, batch=batch)
torch.manual_seed(0)
model = MinkUNet(4, 19, cr=cr).eval()

def peak():
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) * 1024

with torch.no_grad():
    model(ps.SparseTensor(x.feats, x.coords))  # (warm: the output pool, the allocator)
    inp = ps.SparseTensor(x.feats, x.coords)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = peak()
    logits = model(inp).feats
    grown = peak() - before
print(json.dumps({"voxels": len(x), "grown": grown, "source": source,
                  "sha": hashlib.sha256(logits.numpy().tobytes()).hexdigest()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=positive_int, default=None,
                        help="sweeps batched into one input (default 8; --quick 1)")
    parser.add_argument("--cr", type=float, default=1.0, help="the MinkUNet's channel ratio (default 1.0)")
    add_peak_options(parser, "inference_memory.md")
    args = parser.parse_args()
    quick_defaults(args, copies=(8, 1), rounds=(3, 1))
    forms = ["block by block", "whole stage"]
    grown, seen = child_peaks(forms, lambda form: [CHILD, str(BENCH), form, str(args.copies), str(args.cr),
                                                   "1" if args.quick else "0"], args.rounds, "inference_memory.py")
    voxels = seen[forms[0]]["voxels"]
    equal = seen[forms[0]]["sha"] == seen[forms[1]]["sha"]
    table = peak_table(grown, "whole stage")
    source = seen[forms[0]]["source"]
    write_markdown(page_path(args.out, "inference_memory.md", args.quick),
                   "MinkUNet inference peak memory: decoder stages block by block against whole",
                   "python bench/inference_memory.py " + shlex.join(sys.argv[1:]), environment(), [table],
                   f"{args.copies} cop{'y' if args.copies == 1 else 'ies'} of {source} batched at 0.05 m "
                   f"({voxels:,} voxels); MinkUNet cr {args.cr}, seeded weights, eval, no_grad; the growth of the "
                   f"resident peak over one forward after a warm-up forward, one child process per measurement, "
                   f"{args.rounds} interleaved round(s). Logits of both forms bit-equal: {'yes' if equal else 'NO'}.")
    if not equal:
        raise SystemExit("the two forms' logits differ")


if __name__ == "__main__":
    main()
