"""Where a masked conv's forward time goes, beside the kernels alone (issue 13 at C = 64).

    python bench/masked_overhead.py [--channels 64] [--kind twin] [--amount 0.75] [--rounds 15]
        [--threads N] [--out PAGE] [--quick]

One pruned ``Conv3d(C, C, 3)`` on the KITTI sweep (0.05 m; ``--quick``: a
20k-voxel generated street), timed five ways against the unpruned module in
interleaved rounds (medians; forwards without gradients, as inference):

* ``masked module``: the conv as ``prune`` leaves it (``weight_orig`` times
  ``weight_mask`` in torch's pre-hook on each call, then the engine's choice
  of kernels on that product);
* ``made permanent``: a copy after ``torch.nn.utils.prune.remove`` (no hook,
  the same weight);
* ``functional with mask``: ``nn.functional.conv3d(x, weight, weight_mask=m)``
  on the product made once (the module's call without the hook's product);
* ``functional, product each call``: the same on ``weight_orig * m`` made
  each call (the hook's product, without the module and its hook);
* ``kernels alone``: the fused kernels on a plan and a choice made once
  (``bench/prune_exec.py``'s ``core`` column);
* ``kernels, fresh output``: the same with a new output buffer each call.

Each output is checked against the unpruned module's form on the same
weight (the dense reference: ``nn.reference.conv_sum``). The page goes to
``--out`` (default ``bench/results/masked_overhead.md``)."""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

import torch

from _common import environment, interleaved, page_arg, page_path, positive_int, write_markdown
from prune_exec import AMOUNTS, _Density, _prune, check, core_forward

import pointsparse as ps
from pointsparse.nn import _engine
from pointsparse.nn import functional as F


def measure(channels: int, coords: torch.Tensor, kind: str, amount: float, rounds: int) -> str:
    torch.manual_seed(0)
    base = ps.nn.Conv3d(channels, channels, 3).eval()
    masked = copy.deepcopy(base)
    _prune(masked, kind, amount)
    permanent = copy.deepcopy(masked)
    torch.nn.utils.prune.remove(permanent, "weight")
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    for conv in (base, masked, permanent):
        check(conv, x, kmap)
    product = (masked.weight_orig * masked.weight_mask).detach()
    mask = masked.weight_mask
    with torch.no_grad():
        torch.testing.assert_close(F.conv3d(x, product, weight_mask=mask).feats, masked(x).feats, rtol=0, atol=0)
    kernels = core_forward(permanent, x, kmap, _engine.VECTOR_DENSITY)
    weight = permanent.weight.detach().contiguous()
    with _Density(_engine.VECTOR_DENSITY):
        run = _engine.choose_execution(weight)
    plan = _engine.get_plan(kmap)
    threads = torch.get_num_threads()

    def fresh():
        out = x.feats.new_empty((kmap.num_out, channels))
        plan.core.forward(x.feats.numpy(), weight.numpy(), None, out.numpy(), threads, active=run.active,
                          vector=run.vector)

    def call(module):
        def once():
            with torch.no_grad():
                module(x)
        return once

    def functional():
        with torch.no_grad():
            F.conv3d(x, product, weight_mask=mask)

    def functional_fresh():  # (the hook's product made each call, as the module's, without the module)
        with torch.no_grad():
            F.conv3d(x, masked.weight_orig * mask, weight_mask=mask)

    med = interleaved({"unpruned module": call(base), "masked module": call(masked),
                       "made permanent": call(permanent), "functional with mask": functional,
                       "functional, product each call": functional_fresh,
                       "kernels alone": kernels, "kernels, fresh output": fresh}, rounds)
    dense = med["unpruned module"]
    lines = [f"### C = {channels}, {kind} {amount:.0%} ({len(coords):,} voxels, {int(kmap.sizes.sum()):,} pairs; "
             f"the engine runs it as {run.name})", "",
             "| run as | forward ms | speed-up against the unpruned module | ms above the kernels alone |",
             "|---|---|---|---|"]
    for name, t in med.items():
        lines.append(f"| {name} | {1e3 * t:.2f} | {dense / t:.2f}x | {1e3 * (t - med['kernels alone']):+.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=positive_int, default=None, help="default 64 (--quick 32)")
    parser.add_argument("--kind", choices=list(AMOUNTS), default="twin", help="the pruning granularity (default twin)")
    parser.add_argument("--amount", type=float, default=0.75, help="the share pruned (default 0.75)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 15 (--quick 3)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/masked_overhead.md")
    parser.add_argument("--quick", action="store_true", help="a smoke run: C = 32, a 20k generated street, 3 rounds")
    args = parser.parse_args()
    if not 0.0 < args.amount < 1.0:
        parser.error(f"--amount must be in (0, 1); got {args.amount}")
    from _common import kitti_or_street
    coords, scene = kitti_or_street(args.quick)
    torch.set_num_threads(args.threads)
    channels = args.channels or (32 if args.quick else 64)
    table = measure(channels, coords, args.kind, args.amount, args.rounds or (3 if args.quick else 15))
    print(f"{scene}\n\n{table}\n")
    output = page_path(args.out, "masked_overhead.md", args.quick)
    write_markdown(output, f"A masked conv's forward against the kernels alone ({scene})",
                   "python bench/masked_overhead.py " + shlex.join(sys.argv[1:]), environment(), [table],
                   "Medians of interleaved rounds, forwards without gradients; ratios against the unpruned module "
                   "of the same rounds, on the machine named above.")
    print(f"written {output}")


if __name__ == "__main__":
    main()
