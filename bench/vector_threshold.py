"""Where the vector-sparse forward beats the dense one: the measurements
behind ``_engine.vector_threshold``. A submanifold ``Conv3d(C, C, 3)`` on the
KITTI sweep (000049, 0.05 m; a generated street of 20k voxels where the
dataset is absent), one thread, through the engine's plan (``ConvPlan``):

1. *Break-even by density*: weights whose vectors (offset, input channel,
   panel) are kept at random with probability d; the same weights through
   the vector kernels and through the dense kernels (every offset run),
   interleaved; the ratio dense / vector (> 1: the vector kernels win) and
   the engine's threshold for C rows beside it.
2. *Time by listed rows* (``--listed``): every panel of every offset lists
   the same n rows (the first n input channels), the vector forward's time
   against n: its fixed cost per pair and offset and its cost per listed row;
   beside it the dense forward of ``Conv3d(n, C, 3)`` on the same map (the
   same steps a panel, input rows n channels wide).

Each output is checked against the dense kernels' first.

    python bench/vector_threshold.py [--channels 8 16 24 32 48 64] [--densities 0.2 0.3 0.5 0.7 0.9]
        [--listed 1 4 8 16 32] [--rounds 9] [--out bench/results/vector_threshold.md] [--quick]

``--quick``: C = 8 on a 20k generated street, two densities, one round (the
options given kept), the page in a temporary folder."""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch

from _common import (environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, quick_defaults,
                     write_markdown)

import pointsparse as ps
from pointsparse.nn import _engine


def median_ms(calls: dict, rounds: int) -> dict:
    """Median milliseconds of each call: run once untimed, then timed once a
    round, in a new seeded order each round (_common.interleaved)."""
    return {name: seconds * 1e3 for name, seconds in interleaved(calls, rounds).items()}


def setup(coords: torch.Tensor, channels: int):
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    plan = _engine.get_plan(ps.kmap.get_kmap(x, 3)).core
    feats = x.feats.numpy()
    out = np.empty((plan.num_out, channels), np.float32)
    want = np.empty_like(out)

    def run(weight: np.ndarray, vector: bool, dst: np.ndarray = out) -> None:
        plan.forward(feats, weight, None, dst, 1, None, False, active=None, vector=vector)

    def checked(weight: np.ndarray) -> None:
        run(weight, False, want)
        run(weight, True)
        if not np.array_equal(out, want):
            raise RuntimeError(f"C = {channels}: the vector kernels differ from the dense ones by "
                               f"{np.abs(out - want).max()}")

    return run, checked, plan, feats, out


def break_even(coords, channels: list, densities: list, rounds: int, span: int = 1) -> str:
    lines = ["| C | " + " | ".join(f"d = {d}" for d in densities) + " | engine's threshold |",
             "|---|" + "---|" * (len(densities) + 1)]
    width = _engine.panel_width(torch.float32) * span
    for c in channels:
        run, checked, *_ = setup(coords, c)
        g = torch.Generator().manual_seed(1)
        w = torch.randn(27, c, c, generator=g)
        panels = -(-c // width)
        calls = {}
        for d in densities:
            keep = (torch.rand(27, c, panels, generator=g) < d).float().repeat_interleave(width, 2)[:, :, :c]
            wd = (w * keep).contiguous().numpy()
            checked(wd)
            calls[d, False] = lambda wd=wd: run(wd, False)
            calls[d, True] = lambda wd=wd: run(wd, True)
        med = median_ms(calls, rounds)
        cells = [f"{med[d, False] / med[d, True]:.2f}x ({med[d, True]:.2f} ms)" for d in densities]
        twin = _engine.twin_threshold(c) if span == 2 else None  # a weight all in twins: the twin threshold
        threshold = _engine.vector_threshold(c) if twin is None else twin
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {threshold:.2f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def by_listed(coords, channels: int, listed: list, rounds: int) -> str:
    """The vector forward with n listed rows in every panel (the first n input
    channels), the dense forward of a ``Conv3d(n, C, 3)`` on the same map (the
    same steps a panel, but input rows n channels wide instead of C: what the
    gather of whole input rows costs), and the straight line t = a + b n
    through the vector times (a: the fixed cost of the pairs and the output
    rows, b: the cost of one listed row)."""
    run, checked, plan, feats, out = setup(coords, channels)
    w = torch.randn(27, channels, channels, generator=torch.Generator().manual_seed(2))
    calls = {"dense": lambda wd=w.numpy(): run(wd, False)}
    ns = [n for n in listed if n <= channels]
    for n in ns:
        wn = w.clone()
        wn[:, n:] = 0
        wn = wn.contiguous().numpy()
        checked(wn)  # leaves the vector forward's output in `out`
        calls[n] = lambda wn=wn: run(wn, True)
        # The first n input channels alone: the same sums as the vector run.
        fn, wnn = np.ascontiguousarray(feats[:, :n]), np.ascontiguousarray(wn[:, :n])
        dst = np.empty((plan.num_out, channels), np.float32)
        plan.forward(fn, wnn, None, dst, 1, None, False, active=None, vector=False)
        if not np.array_equal(dst, out):
            raise RuntimeError(f"C = {channels}, n = {n}: the narrow dense conv differs from the vector one by "
                               f"{np.abs(dst - out).max()}")
        calls["narrow", n] = lambda fn=fn, wnn=wnn, dst=dst: plan.forward(fn, wnn, None, dst, 1, None, False,
                                                                         active=None, vector=False)
    med = median_ms(calls, rounds)
    b, a = np.polyfit(np.array(ns, float), np.array([med[n] for n in ns]), 1) if len(ns) > 1 else (0.0, med[ns[0]])
    return "\n".join([f"C = {channels}: the vector forward with n listed rows in every panel, the dense forward "
                      f"of Conv3d(n, {channels}, 3) on the same map (the same steps a panel, input rows n wide), "
                      f"and the dense forward of the unpruned weight ({med['dense']:.2f} ms).", "",
                      "| listed rows n | " + " | ".join(str(n) for n in ns) + " |",
                      "|---|" + "---|" * len(ns),
                      "| vector forward ms | " + " | ".join(f"{med[n]:.2f}" for n in ns) + " |",
                      f"| dense Conv3d(n, {channels}, 3) ms | " + " | ".join(f"{med['narrow', n]:.2f}" for n in ns)
                      + " |", "",
                      f"Vector times against n: {a:.2f} ms + {b:.3f} ms a listed row (the fixed cost "
                      f"{a / med['dense']:.0%} of the dense forward); at the 25% of the rows listed that 75% "
                      f"vector pruning leaves (n = {channels // 4}) at most {med['dense'] / (a + b * channels / 4):.2f}x "
                      "the dense forward."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=None,
                        help="default 8 16 24 32 48 64 (--quick: 8)")
    parser.add_argument("--densities", type=float, nargs="+", default=None,
                        help="default 0.2 0.3 ... 0.9 (--quick: 0.3 0.9)")
    parser.add_argument("--listed", type=int, nargs="*", default=None,
                        help="rows listed per panel for the second table, at the largest C (none: no table; "
                             "default 1 4 8 16 32 48, --quick: 2)")
    parser.add_argument("--panels", type=int, default=1,
                        help="break-even weights keep vectors of this many adjacent panels (2: the AVX-512 "
                             "two-vector tiles, nn.functional.tile_panels)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 9 (--quick: 1)")
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/vector_threshold.md")
    parser.add_argument("--quick", action="store_true",
                        help="C = 8 on a 20k street, two densities, one round (the options given kept)")
    args = parser.parse_args()
    quick_defaults(args, channels=([8, 16, 24, 32, 48, 64], [8]),
                   densities=([0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], [0.3, 0.9]),
                   listed=([1, 4, 8, 16, 32, 48], [2]), rounds=(9, 1))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.panels < 1:
        parser.error("--panels must be at least 1")
    if any(c < 1 for c in args.channels):
        parser.error("--channels must be positive")
    if any(not 0 <= d <= 1 for d in args.densities):
        parser.error("--densities must lie in [0, 1]")
    coords, where = kitti_or_street(args.quick)
    torch.set_num_threads(1)
    tables = [f"{where} ({len(coords):,} voxels), one thread, medians of {args.rounds} rounds. Each cell: "
              "dense time / vector time for the same weight (> 1: the vector kernels win), and the vector "
              f"time; vectors of {args.panels} panel(s) kept at random with probability d.", "",
              break_even(coords, args.channels, args.densities, args.rounds, args.panels)]
    if args.listed:
        tables += ["", by_listed(coords, max(args.channels), args.listed, args.rounds)]
    command = "python bench/vector_threshold.py " + shlex.join(sys.argv[1:])
    out = page_path(args.out, "vector_threshold.md", args.quick)
    write_markdown(out, "Vector-sparse against dense forward", command.strip(), environment(), ["\n".join(tables)])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
