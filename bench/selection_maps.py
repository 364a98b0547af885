"""A selection's downsampling maps (``VoxelPrune``, ``functional.select_voxels``):
the map from the stride-s voxels onto the kept half of the stride-2s ones,
restricted from the map onto every stride-2s voxel (``KernelMap.restricted``:
the core's ``kmap_restrict``, and the same in torch ops) against a search
onto the kept coords (``kmap.build`` with ``out_coords``: what a selection's
transposed conv ran before, ``kmap_parents`` refusing given coords). Every
restricted map is first checked equal to the search's, pair for pair.

    flock /work/cpu.lock .venv/bin/python bench/selection_maps.py [--rounds 21] [--threads 2] [--keep 0.5]
        [--quick]

On KITTI raw 000049 at 0.05 m (a generated street of 20k voxels where the
dataset is absent, or with ``--quick``: one round, the page in a temporary
folder): the k2 s2 maps of strides 1 -> 2, 2 -> 4, 4 -> 8, the kept rows a
seeded random ``--keep`` share of the coarse voxels. Medians of interleaved
rounds.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from _common import environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, write_markdown

import pointsparse as ps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=21)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    coords, name = kitti_or_street(args.quick)
    fine = coords
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for s in (1, 2, 4):
        full = ps.kmap.build(fine, 2, 2, tensor_stride=s)
        coarse = full.out_coords
        rows = torch.sort(torch.randperm(len(coarse), generator=g)[:round(args.keep * len(coarse))]).values
        kept = coarse[rows]
        search = ps.kmap.build(fine, 2, 2, tensor_stride=s, out_coords=kept)
        for label, made in (("core", full.restricted(rows, kept)), ("torch", _torch(full, rows, kept))):
            if not (torch.equal(made.in_idx, search.in_idx) and torch.equal(made.out_idx, search.out_idx)
                    and torch.equal(made.sizes, search.sizes)):
                sys.exit(f"selection_maps: the {label} restriction at stride {s} differs from the search")
        t = interleaved({"core": lambda: full.restricted(rows, kept), "torch": lambda: _torch(full, rows, kept),
                         "search": lambda: ps.kmap.build(fine, 2, 2, tensor_stride=s, out_coords=kept)},
                        args.rounds)
        rows_out.append(f"| {s} -> {2 * s} | {len(fine):,} -> {len(kept):,} of {len(coarse):,} | "
                        f"{search.num_pairs:,} | {1e3 * t['search']:.2f} | {1e3 * t['torch']:.2f} | "
                        f"{1e3 * t['core']:.2f} | {t['search'] / t['core']:.1f}x |")
        print(rows_out[-1], flush=True)
        fine = coarse
    table = [f"### {name}: k2 s2 maps onto {args.keep:g} of the coarse voxels, {args.threads} threads, medians of "
             f"{args.rounds} interleaved rounds", "",
             "| strides | voxels: fine -> kept of coarse | pairs | search ms | restricted, torch ops ms | "
             "restricted, core ms | search / core |", "|---|---|---|---|---|---|---|", *rows_out]
    page = page_path(args.out, "selection_maps.md", args.quick)
    write_markdown(page, "A selection's downsampling maps: restricted against searched",
                   "python bench/selection_maps.py " + shlex.join(sys.argv[1:]), environment(), ["\n".join(table)])
    print(page)


def _torch(full, rows, kept):
    """``full.restricted`` on the torch path (torch ops, as on another device)."""
    with ps._ext.torch_path():
        return full.restricted(rows, kept)


if __name__ == "__main__":
    main()
