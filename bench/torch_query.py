"""The torch method's two kernel-map queries on this CPU: offset by offset
(``kmap._query_offsets``, what the CPU runs) against every offset at once
(``kmap._query_all``, what a GPU runs: fewer launches and host reads), on a
generated street; interleaved rounds, medians, the pairs checked equal.

    python bench/torch_query.py [--voxels 85000] [--rounds 7] [--threads 2] [--quick]

Rows: a submanifold k3 map, a k3 s2 map (a k2 s2 map takes neither: its
parents come from the downsampling's unique)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pointsparse import kmap as km  # noqa: E402
from _common import interleaved, street_scene  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--voxels", type=int, default=85_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="10k voxels, 2 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.voxels, args.rounds = 10_000, 2
    torch.set_num_threads(args.threads)
    coords = street_scene(args.voxels)
    loop = km._query_offsets
    print(f"{len(coords)} voxels, {torch.get_num_threads()} threads, medians of {args.rounds} interleaved rounds")
    print("| map | offset by offset ms | all at once ms | ratio |\n|---|---|---|---|")
    for k, t in ((3, 1), (3, 2)):
        def build(query):
            def run():
                km._query_offsets = query  # (the CPU's choice in _query_torch, replaced for the call)
                try:
                    return km.build(coords, k, t, method="torch")
                finally:
                    km._query_offsets = loop
            return run
        a, b = build(loop)(), build(km._query_all)()
        assert torch.equal(a.in_idx, b.in_idx) and torch.equal(a.out_idx, b.out_idx)
        times = interleaved({"loop": build(loop), "all": build(km._query_all)}, args.rounds)
        print(f"| k{k} s{t} | {times['loop'] * 1e3:.1f} | {times['all'] * 1e3:.1f} | "
              f"{times['all'] / times['loop']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
