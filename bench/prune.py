"""Pruning toolkit benchmark.

1. Mask computation time of every granularity on a sparse-conv weight
   (27, C, C) and a dense Conv2d weight, against torch's own
   L1Unstructured on the same tensor (ratio measured in the same run).
2. What each granularity at a matching sparsity does to the FLOPs of a
   two-layer sparse net on a street scene (FLOPs from the kernel maps of the
   scene, via pointsparse.prune.sparsity_report), and how long the report
   takes.

Correctness first: every mask is checked for its structure before timing.
Run: .venv/bin/python bench/prune.py [--out PAGE.md] [--quick]; the page is
bench/results/prune.md (or ``--out``; ``--quick``: a temporary folder)."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch
from torch import nn

from _common import environment, page_arg, page_path, street_scene, timeit, write_markdown

import pointsparse as ps
import pointsparse.prune as prune
from pointsparse.nn import Conv3d

LAYOUT_SPARSE = prune.WeightLayout(2, 1, (0,))


def methods(layout):
    return {
        "torch L1Unstructured 50% (baseline)": prune.L1Unstructured(0.5),
        "vector (axis -1) 50%": prune.VectorStructured(0.5, axis=-1),
        "kernel (pair) 50%": prune.KernelStructured(0.5, layout=layout),
        "kernel offset 50%": prune.KernelStructured(0.5, scope="offset", layout=layout),
        "channel (out) 50%": prune.ChannelStructured(0.5, layout=layout),
        "block 4x4 50%": prune.BlockStructured(0.5, block_size=4, layout=layout),
        "stripe 50%": prune.StripeStructured(0.5, layout=layout),
        "N:M 2:4": prune.NMStructured(2, 4, layout=layout),
        "pattern (8 learned, size 4)": None,  # built per tensor below
    }


def mask_table(shapes, repeats):
    rows = ["| weight | method | median ms | x torch L1 |", "|---|---|---:|---:|"]
    for label, shape, layout in shapes:
        torch.manual_seed(0)
        weight = torch.randn(shape)
        ones = torch.ones_like(weight)
        base = None
        for name, method in methods(layout).items():
            if method is None:
                method = prune.PatternStructured(prune.learn_patterns(weight, 8, 4, layout), layout)
            mask = method.compute_mask(weight, ones)
            assert mask.shape == weight.shape and set(mask.unique().tolist()) <= {0.0, 1.0}
            if isinstance(method, prune.NMStructured):
                assert prune.is_nm_sparse(weight * mask, 2, 4, layout)
            seconds = timeit(lambda: method.compute_mask(weight, ones), repeats=repeats)
            base = seconds if base is None else base
            rows.append(f"| {label} {tuple(shape)} | {name} | {seconds * 1e3:.2f} | {seconds / base:.2f} |")
    return "\n".join(rows)


class Net(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.first = Conv3d(4, channels, 3)
        self.second = Conv3d(channels, channels, 3)

    def forward(self, x):
        return self.second(self.first(x))


GRANULARITIES = {
    "dense": lambda m: None,
    "unstructured 50%": lambda m: prune.l1_unstructured(m, "weight", 0.5),
    "N:M 2:4": lambda m: prune.nm_structured(m, "weight", 2, 4),
    "block 4x4 50%": lambda m: prune.block_structured(m, "weight", 0.5, block_size=4),
    "kernel (pair) 50%": lambda m: prune.kernel_structured(m, "weight", 0.5),
    "kernel offset 50%": lambda m: prune.kernel_structured(m, "weight", 0.5, scope="offset"),
    "channel (out) 50%": lambda m: prune.channel_structured(m, "weight", 0.5),
}


def flops_table(num_voxels, channels, repeats):
    coords = street_scene(num_voxels)
    x = ps.SparseTensor(torch.randn(coords.shape[0], 4), coords)
    rows = [
        f"Scene: generated street, {coords.shape[0]} voxels; net Conv3d(4->{channels}) -> Conv3d({channels}->{channels}), k=3.",
        "",
        "| granularity (second layer) | weight sparsity | FLOPs | x dense | report ms (incl. one forward) |",
        "|---|---:|---:|---:|---:|",
    ]
    dense = None
    for name, apply in GRANULARITIES.items():
        torch.manual_seed(0)
        net = Net(channels)
        apply(net.second)
        report = prune.sparsity_report(net, x)
        layer = report["layers"]["second"]
        seconds = timeit(lambda: prune.sparsity_report(net, x), repeats=repeats, warmup=0)
        dense = layer["flops"] if dense is None else dense
        rows.append(
            f"| {name} | {100 * layer['sparsity']:.1f}% | {layer['flops'] / 1e6:.1f} M | "
            f"{layer['flops'] / dense:.3f} | {seconds * 1e3:.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/prune.md)")
    args = parser.parse_args()
    c, repeats = (32, 3) if args.quick else (64, 7)
    shapes = [
        ("sparse conv", (27, c, c), LAYOUT_SPARSE),
        ("Conv2d", (4 * c, 4 * c, 3, 3), prune.WeightLayout(0, 1, (2, 3))),
    ]
    tables = ["## Mask computation\n\n" + mask_table(shapes, repeats)]
    tables.append("## FLOPs of a pruned sparse net (kernel-map counts)\n\n" + flops_table(
        5000 if args.quick else 40000, 16 if args.quick else 32, 1 if args.quick else 3))
    command = "flock /tmp/ps-heavy.lock .venv/bin/python bench/prune.py " + shlex.join(sys.argv[1:])
    notes = (
        "Numbers taken on a shared 2-core machine under load from other jobs; ratios are within one run. "
        "FLOPs are exact counts (2 * sum over offsets of pairs(o) * nnz(W[o])), not timings."
    )
    for table in tables:
        print(table, "\n")
    output = page_path(args.out, "prune.md", args.quick)
    write_markdown(output, "Pruning toolkit", command.strip(), environment(), tables, notes)
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
