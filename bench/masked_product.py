"""What a masked conv's ``weight_orig * weight_mask`` costs a forward: one
submanifold ``Conv3d(C, C, 3)`` on the KITTI sweep (0.05 m), its weight
pruned in twin vectors (``panel_structured(..., panels=2)``), run forward
without gradients four ways in interleaved rounds:

* ``dense``: the unpruned module (the baseline of every ratio);
* ``masked``: the pruning hook's ``weight_orig * weight_mask`` made before
  every forward (as torch's hook makes it: a product kept while the version
  counters held went stale under changes through ``.data``, stop 54);
* ``removed``: after ``prune.remove`` (the product made permanent);
* ``kernels``: ``ConvPlan.forward`` alone on the pruned weight (plan, choice
  and output made once).

    flock /work/cpu.lock .venv/bin/python bench/masked_product.py [--channels 64] [--amount 0.75]
        [--rounds 21] [--threads 2] [--quick]

The masked module's output is checked against the removed one's first
(bit for bit: the same weight values reach the same kernels). ``--quick``: a 20k
generated street, C = 16, one round, the page in a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

import torch

from _common import (environment, interleaved, kitti_searched, page_arg, page_path, positive_int, real_scene,
                     real_sweeps, street_scene, write_markdown)
from prune_exec import core_forward

import pointsparse as ps
from pointsparse import prune
from pointsparse.nn import _engine


def modules(channels: int, amount: float) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    dense = ps.nn.Conv3d(channels, channels, 3)
    masked = copy.deepcopy(dense)
    prune.panel_structured(masked, "weight", amount, panels=2)
    removed = copy.deepcopy(masked)
    prune.remove(removed, "weight")
    return {"dense": dense, "masked": masked, "removed": removed}


def table(channels: int, amount: float, coords: torch.Tensor, rounds: int) -> str:
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    convs = modules(channels, amount)
    with torch.no_grad():
        want = convs["removed"](x).feats
        if not torch.equal(convs["masked"](x).feats, want):
            sys.exit("masked_product: the masked module differs from the removed one")
    kmap = ps.kmap.get_kmap(x, 3)
    run = _engine.choose_execution(convs["removed"].weight.detach())

    def forward(conv):
        def call():
            with torch.no_grad():
                conv(x)
        return call

    fns = {name: forward(conv) for name, conv in convs.items()}
    fns["kernels"] = core_forward(convs["removed"], x, kmap, _engine.VECTOR_DENSITY)
    med = interleaved(fns, rounds)
    med.update({f"{k} (2)": v for k, v in interleaved({
        "kernels dense": core_forward(convs["dense"], x, kmap, _engine.VECTOR_DENSITY),
        "kernels": fns["kernels"]}, rounds).items()})
    lines = [f"### C = {channels}, twin vectors {amount:.0%} ({run.name} kernels; {len(coords):,} voxels, "
             f"{kmap.num_pairs:,} pairs, {torch.get_num_threads()} threads)", "",
             "| run as | forward ms | speed-up over the dense module |", "|---|---|---|"]
    for name in ("dense", "masked", "removed", "kernels"):
        lines.append(f"| {name} | {1e3 * med[name]:.3f} | {med['dense'] / med[name]:.2f}x |")
    lines += ["", f"The kernels alone against the dense kernels alone (rounds of their own): "
                  f"{1e3 * med['kernels (2)']:.3f} / {1e3 * med['kernels dense (2)']:.3f} ms, "
                  f"{med['kernels dense (2)'] / med['kernels (2)']:.2f}x."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 64 (--quick 16)")
    parser.add_argument("--amount", type=float, default=0.75)
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 21 (--quick 1)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/masked_product.md")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    channels = args.channels or ([16] if args.quick else [64])
    rounds = args.rounds or (1 if args.quick else 21)
    if args.quick:
        coords, scene = street_scene(20_000), "generated street 20k @ 0.05 m"
    else:
        sweeps = real_sweeps()
        if "kitti-raw/000049" not in sweeps:
            print(f"masked_product: {kitti_searched()} is absent; nothing measured")
            return
        coords, scene = real_scene(sweeps["kitti-raw/000049"], 0.05), "kitti-raw/000049 @ 0.05 m"
    tables = [table(c, args.amount, coords, rounds) for c in channels]
    for t in tables:
        print(t, "\n")
    output = page_path(args.out, "masked_product.md", args.quick)
    write_markdown(output, f"A masked conv's product per forward ({scene})",
                   "python bench/masked_product.py " + shlex.join(sys.argv[1:]), environment(), tables,
                   "Medians of interleaved rounds on the machine named above.")
    print(f"written {output}")


if __name__ == "__main__":
    main()
