"""Whether the vector-sparse speed-up at C = 64 depends on where the conv's
arrays are when it starts: the unpruned conv and the vector-sparse ones that
``bench/prune_exec.py`` times (twin 75% / 50%, vector 75%), their kernels
alone (``ConvPlan.forward``, the engine's choice), one output buffer for
all, timed in one process in three conditions, every (variant, condition)
once a round in a new seeded order:

- warm: the call follows another call, which left the sweep's input and
  output rows in the caches as far as they hold them (what a layer of a
  network finds of the rows its previous layer wrote);
- cold: before the call, untimed, a pass that reads and writes ``--mb`` MB of
  other memory (64 by default: more than the conv's 45 MB of input and
  output rows), as in ``prune_exec.py``'s rounds, where some twenty convs
  each write an output of their own between two calls of the same conv;
- cold, streamed: as cold, the output summed in scratch blocks and written
  with non-temporal stores (``_core.conv_stream_bytes(0)``), no
  write-allocate.

Every variant's output is first checked bit for bit against the engine's
own module path on the same weight, and the streamed one against the in
place one. The ratios are the unpruned conv's median over each variant's in
the same condition.

    flock /work/cpu.lock .venv/bin/python bench/cache_state.py [--channels 64] [--rounds 15] [--mb 64]
        [--threads 1] [--split] [--out PAGE.md] [--quick]

``--split``: the unpruned and twin 75% weights also with only the identity
offset kept and with it zeroed (the pass that writes every output row, and
the gathered offsets without it), in the same rounds.

``--quick``: C = 16 on a generated street of 20k voxels, 2 MB passes, two
rounds (``--channels``, ``--mb`` and ``--rounds`` where given), the page in a
temporary folder.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from _common import environment, kitti_or_street, page_arg, page_path, positive_int, quick_defaults, write_markdown
from prune_exec import variants

import pointsparse as ps
from pointsparse.nn import _engine
from pointsparse.nn import functional as F

CORE = ps._ext.core
NEVER = 1 << 62
WANTED = ("unpruned", "twin 75%", "twin 50%", "vector 75%")
CONDITIONS = ("warm", "cold", "cold, streamed")


def cases(channels: int, coords: torch.Tensor, threads: int, split: bool = False):
    """(name, engine path, forward(out) -> out) of each wanted variant on one
    plan, each output checked against the module's; ``split``: the unpruned
    and twin 75% weights also with only the identity offset kept and with it
    zeroed (checked against ``nn.functional.conv3d`` on that weight)."""
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap)
    feats = x.feats.numpy()
    found = []
    weights = []
    for name, _, _, conv in variants(channels, ["vector", "twin"]):
        if name not in WANTED:
            continue
        weights.append((name, conv.weight.detach().contiguous()))
        if split and name in ("unpruned", "twin 75%"):
            alone = torch.zeros_like(weights[-1][1])
            alone[plan.identity] = weights[-1][1][plan.identity]
            without = weights[-1][1].clone()
            without[plan.identity] = 0
            weights += [(f"{name}, the identity alone", alone), (f"{name}, all but the identity", without)]
    for name, weight in weights:
        run = _engine.choose_execution(weight)

        def forward(out, w=weight.numpy(), run=run):
            plan.core.forward(feats, w, None, out, threads, None, False, active=run.active, vector=run.vector)
            return out

        with torch.no_grad():
            want = F.conv3d(x, weight, 3).feats.numpy()
        got = forward(np.empty((kmap.num_out, channels), np.float32))
        if not np.array_equal(got, want):
            raise RuntimeError(f"C = {channels}, {name}: the kernels' output differs from the module's")
        found.append((name, run.name, forward))
    return found, kmap.num_out


def measure(channels: int, coords: torch.Tensor, rounds: int, mb: float, threads: int,
            split: bool = False) -> list[str]:
    found, rows = cases(channels, coords, threads, split)
    out = torch.empty(rows, channels).numpy()  # 64-byte aligned, as torch allocates
    other = np.ones(max(1, int(mb * 2**20) // 8))

    def call(forward, condition):
        CORE.conv_stream_bytes(0 if condition == "cold, streamed" else NEVER)
        if condition != "warm":
            other.__iadd__(1.0)  # untimed: the conv's rows leave the caches
        t0 = time.perf_counter()
        forward(out)
        return time.perf_counter() - t0

    previous = CORE.conv_stream_bytes()
    try:
        plain = [forward(np.empty_like(out)).copy() for _, _, forward in found]
        CORE.conv_stream_bytes(0)
        for (name, _, forward), want in zip(found, plain):
            if not np.array_equal(forward(out), want):
                raise RuntimeError(f"C = {channels}, {name}: the streamed output differs from the in-place one")
        keys = [(i, c) for i in range(len(found)) for c in CONDITIONS]
        times = {key: [] for key in keys}
        order = np.random.default_rng(0)
        for key in keys:  # warm-up, untimed
            call(found[key[0]][2], key[1])
        for _ in range(rounds):
            for j in order.permutation(len(keys)):
                i, condition = keys[j]
                times[keys[j]].append(call(found[i][2], condition))
    finally:
        CORE.conv_stream_bytes(previous)
    med = {key: statistics.median(v) for key, v in times.items()}
    lines = []
    for i, (name, path, _) in enumerate(found):
        cells = []
        for condition in CONDITIONS:
            ms = med[(i, condition)] * 1e3
            cells.append(f"{ms:.2f}" if i == 0 else f"{ms:.2f} ({med[(0, condition)] / med[(i, condition)]:.2f}x)")
        lines.append(f"| {channels} | {name} | {path} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 64 (--quick: 16)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 15 (--quick: 2)")
    parser.add_argument("--mb", type=float, default=None,
                        help="MB of other memory passed over before a cold call (default 64; --quick: 2)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--out", type=page_arg, default=None)
    parser.add_argument("--split", action="store_true",
                        help="also the unpruned and twin 75%% weights with only the identity offset kept and with "
                             "it zeroed: where the sparse conv's time goes")
    parser.add_argument("--quick", action="store_true",
                        help="C = 16 on a 20k generated street, 2 MB passes, 2 rounds, where those are not given")
    args = parser.parse_args()
    quick_defaults(args, channels=([64], [16]), rounds=(15, 2), mb=(64.0, 2.0))
    torch.set_num_threads(args.threads)
    coords, where = kitti_or_street(args.quick)
    table = [f"### {where} ({len(coords):,} voxels), {args.threads} thread(s), medians of {args.rounds} rounds; "
             f"cold: {args.mb:g} MB of other memory read and written before each call",
             "",
             "| C | pruning | engine path | warm ms (speed-up) | cold ms (speed-up) | cold, streamed ms (speed-up) |",
             "|---|---|---|---|---|---|"]
    for channels in args.channels:
        table += measure(channels, coords, args.rounds, args.mb, args.threads, args.split)
    path = page_path(args.out, "cache_state.md", args.quick)
    command = "python bench/cache_state.py " + shlex.join(sys.argv[1:])
    write_markdown(path, "Vector-sparse speed-ups with the conv's rows in cache and in memory", command,
                   environment(), ["\n".join(table)],
                   "Speed-ups: the unpruned conv's median over the variant's in the same condition, the same "
                   "rounds.")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
