"""Whether the vector-sparse forward's fixed part (bench/RESULTS.md: at C =
64 the kernels take a share of time a conv call that does not shrink with
the listed rows) is memory or the core: the unpruned submanifold
``Conv3d(C, C, 3)`` and its pruned variants (bench/conv_instructions.py's
kinds: ``vector`` / ``twin`` 75%, ``twin50``) on spatial crops of the KITTI
sweep (000049, 0.05 m; a generated street of 20k voxels where the dataset is
absent), the crops taking the voxels of smallest x, so that features and
output go from far beyond the caches (the whole sweep: 23 MB each at C = 64)
to a few hundred KB. Through the engine's plan (``ConvPlan.forward`` into one
output buffer, the engine's own choice of kernels for each weight), one
thread, interleaved, medians; each crop's call repeated so that a round takes
about as long as one call on the whole sweep. If the speed-ups over the
unpruned conv stay the same from the whole sweep down to the smallest crop,
the fixed part is spent in the core (per tile of rows: the accumulators'
loads and stores, the walk), not waiting on memory. Each pruned output is
checked against the unpruned conv on the masked weight first.

    python bench/vector_crop.py [--channels 64] [--fractions 1 0.25 0.06 0.02] [--rounds 7] [--out PAGE.md] [--quick]

``--quick``: C = 16, the 20k generated street, fractions 1 and 0.25, one
round, the page in a temporary folder."""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch

from _common import environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, write_markdown
from conv_instructions import KINDS, variants

import pointsparse as ps
from pointsparse.nn import _engine


def table(coords: torch.Tensor, channels: int, fractions: list, kinds: list, rounds: int) -> str:
    by_name = {name: conv for name, _, _, conv in variants(channels, sorted({k.rstrip("0123456789") for k in kinds}))}
    weights = {"dense": torch.randn(27, channels, channels) / (27 * channels) ** 0.5}
    weights.update({k: by_name[KINDS[k]].weight.detach().contiguous() for k in kinds})
    order = torch.argsort(coords[:, 1], stable=True)
    lines = [f"C = {channels}: ms a call (speed-up over the unpruned conv in the same rounds); pairs without "
             "the identity's", "", "| crop | voxels | pairs | unpruned | " + " | ".join(KINDS[k] for k in kinds)
             + " |", "|---|---|---|---|" + "---|" * len(kinds)]
    full_cost = None
    for fraction in fractions:
        n = max(1, int(round(len(coords) * fraction)))
        torch.manual_seed(0)
        x = ps.SparseTensor(torch.randn(n, channels), coords[order[:n]])
        kmap = ps.kmap.get_kmap(x, 3)
        plan = _engine.get_plan(kmap).core
        feats = x.feats.numpy()
        out = np.empty((kmap.num_out, channels), dtype=np.float32)
        runs = {}
        for kind, weight in weights.items():
            run = _engine.choose_execution(weight)
            runs[kind] = (weight.numpy(), run.active, run.vector, run.name)
            got = np.empty_like(out)
            plan.forward(feats, weight.numpy(), None, got, 1, None, False, active=run.active, vector=run.vector)
            ref = torch.from_numpy(np.empty_like(out))
            plan.forward(feats, weight.numpy(), None, ref.numpy(), 1, None, False)  # every offset, dense
            if not torch.allclose(torch.from_numpy(got), ref, rtol=1e-5, atol=1e-5):
                raise RuntimeError(f"C = {channels}, {n} voxels, {kind}: the engine's path ({run.name}) differs "
                                   "from the dense conv")
        if full_cost is None:  # the first (largest) crop sets the calls a round
            full_cost = n
        repeats = max(1, full_cost // n)

        def call(kind, repeats=repeats):
            w, active, vector, _ = runs[kind]
            for _ in range(repeats):
                plan.forward(feats, w, None, out, 1, None, False, active=active, vector=vector)

        med = {k: v / repeats for k, v in interleaved({k: (lambda k=k: call(k)) for k in runs}, rounds).items()}
        base = med["dense"]
        cells = [f"{1e3 * med[k]:.3f} ({base / med[k]:.2f}x)" for k in kinds]
        lines.append(f"| {fraction:g} | {n:,} | {int(kmap.sizes.sum()):,} | {1e3 * base:.3f} | " + " | ".join(cells)
                     + " |")
        print(lines[-1], flush=True)
    paths = ", ".join(f"{KINDS[k]}: {runs[k][3]}" for k in kinds)
    lines += ["", f"Engine paths: {paths}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[64])
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.25, 0.06, 0.02])
    parser.add_argument("--kinds", nargs="+", default=["vector", "twin", "twin50"],
                        choices=[k for k in KINDS if k.startswith(("vector", "twin"))])
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/vector_crop.md")
    parser.add_argument("--quick", action="store_true", help="C = 16 on a 20k street, fractions 1 and 0.25, one round")
    args = parser.parse_args()
    if args.quick:
        args.channels, args.fractions, args.rounds = [16], [1.0, 0.25], 1
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if any(c < 1 for c in args.channels):
        parser.error("--channels must be positive")
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    args.fractions = sorted(set(args.fractions), reverse=True)
    coords, where = kitti_or_street(args.quick)
    torch.set_num_threads(1)
    tables = [f"{where} ({len(coords):,} voxels), crops of the smallest x, one thread, medians of {args.rounds} "
              "interleaved rounds."]
    tables += [table(coords, c, args.fractions, args.kinds, args.rounds) for c in args.channels]
    command = "python bench/vector_crop.py " + shlex.join(sys.argv[1:])
    out = page_path(args.out, "vector_crop.md", args.quick)
    write_markdown(out, "Vector-sparse forward on crops of the sweep", command.strip(), environment(), tables)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
