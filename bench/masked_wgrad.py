"""The masked weight gradient against the dense one: the measurements behind
the AVX-512 build of ``wgrad_masked`` (cpp/conv/sparse_wgrad.h) and
``_engine.MASKED_WGRAD_DENSITY``. A submanifold ``Conv3d(C, C, 3)`` on the
KITTI sweep (000049, 0.05 m; a generated street of 20k voxels where the
dataset is absent), one thread, through the engine's plan
(``ConvPlan.backward_weight``): the dense weight gradient of the widest
build and of avx2, and for masks of ``prune.panel_structured`` (``vector``:
vectors of one panel; ``twin``: of two, ``panels=2``; ``square2``: 32 x 32
blocks) the masked gradient of every build that runs, interleaved, medians.
Each masked result is first checked against the dense gradient times the
mask, bit for bit.

    python bench/masked_wgrad.py [--channels 32 64 128] [--amounts 0.5 0.75] [--rounds 7] [--threads 1] [--out PAGE.md] [--quick]

``--quick``: C = 16, amount 0.75 on a 20k generated street, one round
(``--channels``, ``--amounts`` and ``--rounds`` where given), the page in a
temporary folder."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from _common import (environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, quick_defaults,
                     write_markdown)

import pointsparse as ps
from pointsparse import prune
from pointsparse.nn import _engine

KINDS = {"vector": dict(panels=1), "twin": dict(panels=2), "square2": dict(panels=2, square=True)}


def table(coords: torch.Tensor, channels: int, amounts: list, rounds: int, threads: int = 1) -> str:
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap).core
    feats = x.feats.numpy()
    grad = torch.randn(kmap.num_out, channels).numpy()
    isas = [isa for isa in ps._ext.core.runnable_isas() if isa != "generic"] or ["generic"]
    out = torch.empty(27, channels, channels)
    ref = torch.empty_like(out)
    plan.backward_weight(feats, grad, ref.numpy(), threads)
    calls = {("dense", isa): (lambda isa=isa: plan.backward_weight(feats, grad, out.numpy(), threads, isa=isa))
             for isa in isas}
    rows = []
    for kind, options in KINDS.items():
        for amount in amounts:
            conv = ps.nn.Conv3d(channels, channels, 3)
            prune.panel_structured(conv, "weight", amount, **options)
            mask = conv.weight_mask.contiguous()
            active, _ = _engine.weight_execution(mask, None)
            name = f"{kind} {amount:.0%}"
            rows.append(name)
            for isa in isas:
                got = torch.empty_like(out)
                plan.backward_weight(feats, grad, got.numpy(), threads, isa=isa, active=active, mask=mask.numpy())
                if not torch.equal(got, ref * (mask != 0)):
                    raise RuntimeError(f"C = {channels}, {name}, {isa}: the masked gradient differs from the dense "
                                       "one times the mask")
                calls[name, isa] = (lambda isa=isa, active=active, m=mask.numpy():
                                    plan.backward_weight(feats, grad, out.numpy(), threads, isa=isa, active=active, mask=m))
    med = interleaved(calls, rounds)
    base = med["dense", isas[0]]
    lines = [f"C = {channels}: ms (speed-up over the dense {isas[0]} gradient)", "",
             "| mask | " + " | ".join(isas) + " |", "|---|" + "---|" * len(isas),
             "| none (dense) | " + " | ".join(f"{1e3 * med['dense', i]:.2f} ({base / med['dense', i]:.2f}x)"
                                           for i in isas) + " |"]
    for name in rows:
        lines.append(f"| {name} | " + " | ".join(f"{1e3 * med[name, i]:.2f} ({base / med[name, i]:.2f}x)"
                                               for i in isas) + " |")
    print("\n".join(lines), flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 32 64 128 (--quick: 16)")
    parser.add_argument("--amounts", type=float, nargs="+", default=None, help="default 0.5 0.75 (--quick: 0.75)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 7 (--quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/masked_wgrad.md")
    parser.add_argument("--quick", action="store_true", help="C = 16, amount 0.75 on a 20k street, one round, where those are not given")
    args = parser.parse_args()
    quick_defaults(args, channels=([32, 64, 128], [16]), amounts=([0.5, 0.75], [0.75]), rounds=(7, 1))
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if any(c < 1 for c in args.channels):
        parser.error("--channels must be positive")
    if any(not 0 <= a < 1 for a in args.amounts):
        parser.error("--amounts must lie in [0, 1)")
    coords, where = kitti_or_street(args.quick)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    torch.set_num_threads(args.threads)
    tables = [f"{where} ({len(coords):,} voxels), {args.threads} thread(s), medians of {args.rounds} interleaved rounds."]
    tables += [table(coords, c, args.amounts, args.rounds, args.threads) for c in args.channels]
    command = "python bench/masked_wgrad.py " + shlex.join(sys.argv[1:])
    out = page_path(args.out, "masked_wgrad.md", args.quick)
    write_markdown(out, "Masked weight gradient against dense", command.strip(), environment(), tables)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
