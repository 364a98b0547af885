"""Inference of a float16 model against the same model in float32 and bfloat16.

    python bench/half_inference.py [--rounds 7] [--cr 0.5] [--out PAGE.md] [--quick]

A Conv3d(64, 64, 3) and a MinkUNet (``--cr``) of random weights on the north
star's sweep (KITTI raw 000049 at 0.05 m; a generated street where it is
absent), each converted with ``.to(dtype)`` and run under ``no_grad``: the
medians of interleaved rounds, the ratios against float32 in the same run,
and each 16-bit output's largest difference from the float32 one, relative
to the float32 output's largest magnitude. Until stop 75 a float16 model's
inference ran every pair in torch ops; it runs the float32 kernels on its
values widened now."""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

import torch

from _common import environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, quick_defaults, \
    write_markdown

from pointsparse import SparseTensor, nn
from pointsparse.models import MinkUNet

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=None, help="interleaved rounds (default 7, --quick 2)")
    parser.add_argument("--cr", type=float, default=0.5, help="the MinkUNet's channel ratio")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page (default bench/results/half_inference.md)")
    args = parser.parse_args()
    quick_defaults(args, rounds=(7, 2))
    coords, where = kitti_or_street(args.quick)
    torch.manual_seed(0)
    cases = {"Conv3d(64, 64, 3)": (nn.Conv3d(64, 64, 3).eval(), 64),
             f"MinkUNet cr {args.cr}": (MinkUNet(4, 19, cr=args.cr).eval(), 4)}
    rows = []
    for name, (model, channels) in cases.items():
        feats = torch.randn(len(coords), channels)
        runs, outputs = {}, {}
        for dtype in DTYPES:
            m = copy.deepcopy(model).to(dtype)
            x = SparseTensor(feats.to(dtype), coords)

            def run(m=m, x=x):
                with torch.no_grad():
                    return m(x).feats

            outputs[dtype] = run().float()
            runs[dtype] = run
        times = interleaved(runs, args.rounds)
        scale = float(outputs[torch.float32].abs().max())
        for dtype in DTYPES:
            error = float((outputs[dtype] - outputs[torch.float32]).abs().max()) / scale
            rows.append(f"| {name} | {str(dtype).split('.')[1]} | {1e3 * times[dtype]:.1f} | "
                        f"{times[torch.float32] / times[dtype]:.2f}x | {error:.1e} |")
            print(rows[-1], flush=True)
    table = ("| model | dtype | ms (median) | speed against float32 | max difference / max float32 output |\n"
             "|---|---|---|---|---|\n" + "\n".join(rows))
    write_markdown(page_path(args.out, "half_inference.md", args.quick),
                   "A float16 model's inference against float32 and bfloat16",
                   "python bench/half_inference.py " + shlex.join(sys.argv[1:]), environment(), [table],
                   f"{where}, {len(coords):,} voxels; random weights and features; `.to(dtype)` of the whole model; "
                   f"no_grad; medians of {args.rounds} interleaved rounds.")


if __name__ == "__main__":
    main()
