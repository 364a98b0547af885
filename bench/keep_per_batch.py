"""VoxelPrune's selection per batch item (``nn.functional.keep_per_batch``)
against the loop it replaced before stop 66 (each item's rows found by
comparing every row with the item's id: items x rows), interleaved
repeats, medians.

    .venv/bin/python bench/keep_per_batch.py [--repeats 9] [--rows 90000 720000] [--items 2 128 2048] [--quick]

Random float32 scores, batch ids sorted (as a tensor's key-ordered coords
give them, what VoxelPrune passes) and, in a second table, shuffled;
keep_ratio 0.5. Both selections are checked equal before timing. Results in
bench/results/keep_per_batch.md (``--quick``: 20k rows, 2 and 64 items, 2
repeats, the page in a temporary folder).
"""

from __future__ import annotations

import argparse
import math
import shlex

import torch

from _common import environment, interleaved, page_arg, page_path, positive_int, quick_defaults, write_markdown

from pointsparse.nn import functional as F  # noqa: E402


def per_item_loop(scores: torch.Tensor, batch: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """The selection as written before stop 66 (finite scores): for each
    item id, its rows by a comparison over all rows, the top of them."""
    count = lambda k: max(1, math.ceil(round(keep_ratio * k, 9)))  # noqa: E731
    kept = []
    for b in torch.unique(batch).tolist():
        rows = (batch == b).nonzero().flatten()
        kept.append(rows[F._top_mask(scores[rows], count(rows.numel()))])
    return torch.sort(torch.cat(kept)).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=None, help="interleaved repeats (default 9, --quick 2)")
    parser.add_argument("--rows", type=positive_int, nargs="+", default=None,
                        help="rows of scores (default 90000 720000, --quick 20000)")
    parser.add_argument("--items", type=positive_int, nargs="+", default=None,
                        help="batch items the rows split into (default 2 128 2048, --quick 2 64)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20k rows, 2 and 64 items, 2 repeats")
    parser.add_argument("--out", type=page_arg, default="keep_per_batch.md",
                        help="the page's name in bench/results (default keep_per_batch.md)")
    args = parser.parse_args()
    quick_defaults(args, repeats=(9, 2), rows=([90_000, 720_000], [20_000]), items=([2, 128, 2048], [2, 64]))
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    tables = []
    for ids in ("sorted", "shuffled"):
        rows = ["| rows | items | batch ids | per-item loop (ms) | keep_per_batch (ms) | speed-up |",
                "|---|---|---|---|---|---|"]
        for n in args.rows:
            for items in args.items:
                scores = torch.rand(n, generator=gen)
                batch = torch.sort(torch.randint(0, items, (n,), generator=gen)).values
                if ids == "shuffled":
                    batch = batch[torch.randperm(n, generator=gen)]
                want, got = per_item_loop(scores, batch, 0.5), F.keep_per_batch(scores, batch, 0.5)
                if not torch.equal(want, got):
                    raise RuntimeError(f"{n} rows, {items} items ({ids}): the selections differ; nothing timed")
                before, after = interleaved({0: lambda: per_item_loop(scores, batch, 0.5),
                                             1: lambda: F.keep_per_batch(scores, batch, 0.5)}, args.repeats).values()
                rows.append(f"| {n} | {items} | {ids} | {before * 1e3:.1f} | {after * 1e3:.1f} "
                            f"| {before / after:.2f}x |")
                print(rows[-1], flush=True)
        tables.append("\n".join(rows))
    out = page_path(args.out, "keep_per_batch.md", args.quick)
    command = (f"bench/keep_per_batch.py --repeats {args.repeats} --rows {' '.join(map(str, args.rows))} "
               f"--items {' '.join(map(str, args.items))} --threads {args.threads}" + (" --quick" if args.quick else "")
               + (f" --out {shlex.quote(args.out)}" if args.out != "keep_per_batch.md" else ""))
    write_markdown(out, "keep_per_batch against the per-item loop it replaced (keep_ratio 0.5)", command,
                   environment(), tables)
    print(f"written {out}")


if __name__ == "__main__":
    main()
