"""Streamed against in-place output rows in the fused forward: the same
build, the same process, the threshold (``_core.conv_stream_bytes``) switched
between calls, so the two ways alternate round by round.

    python bench/stream_output.py [--channels 32 64 128] [--threads 1] [--rounds 15] [--mb 16]
        [--network] [--chain] [--amounts 0.5 0.75 ...] [--out PAGE.md] [--quick]

In place, a block's rows are summed where they live in the output: each line
of a large output is read from memory before it is first written (a
write-allocate) and written back later. Streamed (outputs of at least
``--mb`` MB here; the engine's default threshold is off, and the threshold
of the offset-pruned forwards it streams itself, ``_core.conv_stream_auto_bytes``,
is turned off for the in-place columns), a thread sums its block in a
scratch block that stays in L2 and writes it out with non-temporal stores a
tile's worth of rows at a time while its next block runs.

Table 1: a submanifold ``Conv3d(C, C, 3)`` on the KITTI sweep (000049, 0.05
m; a generated street of 20k voxels where the dataset is absent), unpruned
and pruned as ``bench/prune_exec.py`` prunes it (offsets 75%, vectors 50% and
75%), run by the engine's choice of kernels (``ConvPlan.forward``, the
kernels alone); both outputs equal bit for bit first. Each conv is timed writing one output buffer again and again and writing a
new output each call (as a module call allocates it: its pages are faulted in
by the first write). ``--network``: also the
full-width ``MinkUNet(4, 19)`` after ``fuse_for_inference`` on the same sweep
(at 16 MB its 96-channel decoder rows and the 64-channel ones are streamed;
the rest are summed in place either way), logits compared first. ``--chain``:
module calls of the offset-pruned conv (75%) alone and followed by a second
conv reading its output (see :func:`chain_rows`), outputs compared first.
``--amounts``: the rule the engine streams by, convs offset-pruned by each
fraction followed by themselves (see :func:`amount_rows`). Medians; the ratio is
in-place time over streamed time (above 1: streaming is faster).
``--quick``: C = 8 on the generated street with the threshold at 0, one
round, the page in a temporary folder.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch

from _common import environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, write_markdown
from prune_exec import variants

import pointsparse as ps
from pointsparse import prune
from pointsparse.nn import _engine

CORE = ps._ext.core
NEVER = 1 << 62
WANTED = ("unpruned", "offset 75%", "vector 50%", "vector 75%")


def with_threshold(fn, threshold):
    """fn with outputs of `threshold` bytes and more streamed and the rest
    summed in place (the offset-pruned forward's own threshold,
    ``_core.conv_stream_auto_bytes``, off)."""
    def call():
        CORE.conv_stream_bytes(threshold)
        CORE.conv_stream_auto_bytes(NEVER)
        return fn()
    return call


def conv_rows(channels: int, coords: torch.Tensor, threads: int, rounds: int, threshold: int) -> list[str]:
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap)
    feats = x.feats.numpy()
    out = np.empty((kmap.num_out, channels), np.float32)
    rows = []
    for name, _, _, conv in variants(channels, ["offset", "vector"]):
        if name not in WANTED:
            continue
        weight = conv.weight.detach().contiguous().numpy()
        run = _engine.choose_execution(conv.weight.detach())

        def forward(dst=out, weight=weight, run=run):
            plan.core.forward(feats, weight, None, dst, threads, None, False, active=run.active, vector=run.vector)
            return dst

        def fresh(forward=forward):  # a new output each call, as a module call allocates it
            return forward(np.empty_like(out))

        results = [with_threshold(fresh, t)() for t in (NEVER, threshold)]
        if not np.array_equal(results[0], results[1]):
            raise RuntimeError(f"C = {channels}, {name}: the streamed output differs from the in-place one")
        t = interleaved({"in place": with_threshold(forward, NEVER), "streamed": with_threshold(forward, threshold),
                         "in place, new": with_threshold(fresh, NEVER), "streamed, new": with_threshold(fresh, threshold)},
                        rounds)
        rows.append(f"| {channels} | {name} | {run.name} | {kmap.num_out * channels * 4 / 2**20:.1f} | "
                    f"{t['in place'] * 1e3:.2f} | {t['streamed'] * 1e3:.2f} | {t['in place'] / t['streamed']:.3f} | "
                    f"{t['in place, new'] * 1e3:.2f} | {t['streamed, new'] * 1e3:.2f} | "
                    f"{t['in place, new'] / t['streamed, new']:.3f} |")
    return rows


def time_chain(first, second, x: ps.SparseTensor, threshold: int, rounds: int, what: str) -> dict:
    """Medians of ``second(first(x))`` (or ``first(x)`` alone where
    ``second`` is None), module calls without gradients, with the first
    conv's output summed in place and streamed from ``threshold`` bytes (the
    second's in place either way), interleaved; both results compared bit
    for bit first (RuntimeError naming ``what``)."""
    def call(threshold_first):
        with torch.no_grad():
            CORE.conv_stream_bytes(threshold_first)
            CORE.conv_stream_auto_bytes(NEVER)
            y = first(x)
            CORE.conv_stream_bytes(NEVER)
            return y.feats if second is None else second(y).feats

    if not torch.equal(call(NEVER), call(threshold)):
        raise RuntimeError(f"{what}: the streamed chain differs from the in-place one")
    return interleaved({"in place": lambda: call(NEVER), "streamed": lambda: call(threshold)}, rounds)


def chain_rows(channels: int, coords: torch.Tensor, rounds: int, threshold: int) -> list[str]:
    """Module calls (a new output each call) of the offset-pruned conv
    (75%, as prune_exec prunes it) alone and followed by a second conv that
    reads its output (unpruned, or offset-pruned too), the first conv's
    output streamed or in place (the second's in place either way): what
    streaming gains where the next layer reads the rows it wrote."""
    by_name = {name: conv for name, _, _, conv in variants(channels, ["offset"])}
    first = by_name["offset 75%"]
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    rows = []
    for label, second in (("alone", None), ("then unpruned", by_name["unpruned"]),
                          ("then offset 75%", first)):
        t = time_chain(first, second, x, threshold, rounds, f"C = {channels}, {label}")
        rows.append(f"| {channels} | offset 75% {label} | {t['in place'] * 1e3:.2f} | {t['streamed'] * 1e3:.2f} | "
                    f"{t['in place'] / t['streamed']:.3f} |")
    return rows


def amount_rows(channels: int, coords: torch.Tensor, rounds: int, threshold: int, amounts) -> list[str]:
    """The rule behind ``ConvPlan.streams_output``: a conv offset-pruned by
    each of ``amounts`` (``kernel_structured(scope="offset")`` of the same
    seeded weight) followed by itself, its first call's output streamed or in
    place, with the pairs a row it runs, whether it keeps the identity offset
    and whether the engine marks it."""
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    base = ps.nn.Conv3d(channels, channels, 3)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap)
    pairs = kmap.sizes.clone()
    pairs[plan.identity] = kmap.num_out  # the identity's pairs are not in the map's lists
    rows = []
    for amount in amounts:
        conv = ps.nn.Conv3d(channels, channels, 3)
        conv.load_state_dict(base.state_dict())
        prune.kernel_structured(conv, "weight", amount, scope="offset")
        prune.remove(conv, "weight")
        active = _engine.choose_execution(conv.weight.detach()).active
        kept = torch.as_tensor(active, dtype=torch.bool)
        t = time_chain(conv, conv, x, threshold, rounds, f"C = {channels}, offsets {amount:.0%}")
        rows.append(f"| {channels} | {amount:.0%} | {float(pairs[kept].sum()) / kmap.num_out:.2f} | "
                    f"{'yes' if bool(kept[plan.identity]) else 'no'} | "
                    f"{'yes' if plan.core.streams_output(active) else 'no'} | {t['in place'] * 1e3:.2f} | "
                    f"{t['streamed'] * 1e3:.2f} | {t['in place'] / t['streamed']:.3f} |")
    return rows


def network_row(threads: int, rounds: int, threshold: int) -> str:
    from north_star import inputs, kitti_points

    xyz, feats = inputs(kitti_points())
    x, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
    torch.manual_seed(0)
    model = ps.nn.fuse_for_inference(ps.models.MinkUNet(4, 19, cr=1.0).eval())

    def forward():
        with torch.inference_mode():
            return model(ps.SparseTensor(x.feats, x.coords)).feats

    logits = [with_threshold(forward, t)() for t in (NEVER, threshold)]
    if not torch.equal(logits[0], logits[1]):
        raise RuntimeError("MinkUNet: the streamed logits differ from the in-place ones")
    t = interleaved({"in place": with_threshold(forward, NEVER), "streamed": with_threshold(forward, threshold)},
                    rounds)
    return (f"| MinkUNet(4, 19) fused, {len(x.coords):,} voxels | {t['in place'] * 1e3:.1f} | "
            f"{t['streamed'] * 1e3:.1f} | {t['in place'] / t['streamed']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--mb", type=float, default=16.0, help="streamed from this output size (MB)")
    parser.add_argument("--network", action="store_true", help="also the full-width MinkUNet on the sweep")
    parser.add_argument("--chain", action="store_true",
                        help="also module calls of the offset-pruned conv followed by a conv reading its output")
    parser.add_argument("--amounts", type=float, nargs="*", default=None,
                        help="also chains of an offset-pruned conv and itself at these fractions of the offsets")
    parser.add_argument("--out", type=page_arg, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    coords, scene = kitti_or_street(args.quick)
    channels, rounds = ([8], 1) if args.quick else (args.channels, args.rounds)
    default, default_auto = CORE.conv_stream_bytes(), CORE.conv_stream_auto_bytes()
    threshold = 0 if args.quick else int(args.mb * 2**20)
    torch.set_num_threads(args.threads)
    try:
        rows = []
        for c in channels:
            rows += conv_rows(c, coords, args.threads, rounds, threshold)
            print(rows[-1], flush=True)
        tables = [f"### One conv, {scene} ({len(coords):,} voxels), {args.threads} thread(s), medians of {rounds} "
                  f"rounds\n\n| C | pruning | kernels | output MB | in place ms | streamed ms | ratio | "
                  "new output: in place ms | streamed ms | ratio |\n"
                  "|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)]
        if args.chain:
            chained = []
            for c in channels:
                chained += chain_rows(c, coords, rounds, threshold)
                print("\n".join(chained[-3:]), flush=True)
            tables.append(f"### Module calls, the offset-pruned conv's output streamed or not, {args.threads} "
                          f"thread(s), medians of {rounds} rounds\n\n| C | calls | in place ms | streamed ms | "
                          "ratio |\n|---|---|---|---|---|\n" + "\n".join(chained))
        if args.amounts:
            rule = []
            for c in channels:
                rule += amount_rows(c, coords, rounds, threshold, args.amounts)
                print("\n".join(rule[-len(args.amounts):]), flush=True)
            tables.append(f"### An offset-pruned conv followed by itself, its first output streamed or not, "
                          f"{args.threads} thread(s), medians of {rounds} rounds\n\n| C | offsets pruned | "
                          "pairs a row run | identity kept | marked (streams_output) | in place ms | "
                          "streamed ms | ratio |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(rule))
        if args.network and not args.quick:
            row = network_row(args.threads, rounds, threshold)
            print(row, flush=True)
            tables.append(f"### Whole network, {args.threads} thread(s), medians of {rounds} rounds\n\n"
                          "| model | in place ms | streamed ms | ratio |\n|---|---|---|---|\n" + row)
    finally:
        CORE.conv_stream_bytes(default)
        CORE.conv_stream_auto_bytes(default_auto)
    out = page_path(args.out, "stream_output.md", args.quick)
    command = "python bench/stream_output.py " + shlex.join(sys.argv[1:])
    write_markdown(out, "Streamed against in-place output rows", command, environment(), tables,
                   f"Threshold: outputs of {threshold:,} bytes and more streamed (ratio: in place / streamed).")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
