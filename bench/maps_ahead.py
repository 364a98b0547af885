"""The north star's model end to end with its kernel maps built ahead
(``nn.build_maps``) against the maps built by the network as it runs.

    flock /work/cpu.lock .venv/bin/python bench/maps_ahead.py [--rounds 21] [--quick]

The model of bench/north_star.py's fastest row (MinkUNet(4, 19, cr=1.0),
channels kept at 0.25 through the dependency graph, fused, pair vectors 75%,
bfloat16; float32 where the CPU has no AVX512-BF16) on the KITTI sweep at
0.05 m (a generated street of 20k voxels when absent or with ``--quick``).
Per round, in alternating order: voxelize + the network building its maps
(as it runs); voxelize + ``build_maps(x, schedule, workers=1)`` (every map
first, in order, on all threads) + the network; the same with ``workers=2``
(two maps at a time, one core thread each). The schedule is recorded once
(``nn.map_schedule``). The three outputs are checked equal bit for bit
first. Writes bench/results/maps_ahead.md.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from _common import environment, page_arg, page_path, positive_int, real_sweeps, street_points, write_markdown
from north_star import inputs, kitti_points, vector_sparse
from prune_speed import _variants

import pointsparse as ps  # noqa: E402
from pointsparse import _core  # noqa: E402


def model_of(x: ps.SparseTensor, dtype: torch.dtype) -> torch.nn.Module:
    nets, _ = _variants(x, [(0.25, 8)])
    return vector_sparse(ps.nn.fuse_for_inference(nets["keep 0.25 (x8)"]), 0.75, rows=2).to(dtype)


def measure(points: np.ndarray, rounds: int) -> tuple[str, int]:
    dtype = torch.bfloat16 if _core.conv_bf16() else torch.float32
    xyz, feats = inputs(points)
    base, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
    model = model_of(ps.SparseTensor(base.feats, base.coords), dtype)
    schedule = ps.nn.map_schedule(model, ps.SparseTensor(base.feats.to(dtype), base.coords))

    def run(workers: int) -> torch.Tensor:
        v, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
        x = ps.SparseTensor(v.feats.to(dtype), v.coords)
        if workers:
            ps.nn.build_maps(x, schedule, workers=workers)
        return model(x).feats

    names = {0: "maps built as the network runs", 1: "maps built ahead, in order (workers=1)",
             2: "maps built ahead, two at a time (workers=2)"}
    times = {w: [] for w in names}
    with torch.no_grad():
        outs = [run(w) for w in names]
        if not all(torch.equal(o.float(), outs[0].float()) for o in outs):
            raise AssertionError("the maps built ahead gave other outputs")
        for r in range(rounds):
            for w in (tuple(names) if r % 2 else tuple(reversed(names))):
                t0 = time.perf_counter()
                run(w)
                times[w].append(time.perf_counter() - t0)
    first = statistics.median(times[0])
    lines = [f"{len(schedule.maps)} maps ({len(schedule.plans)} with plans), {dtype}, "
             f"{torch.get_num_threads()} threads, medians of {rounds} rounds", "",
             "| end to end | ms | against the first |", "|---|---|---|"]
    for w, name in names.items():
        t = statistics.median(times[w])
        lines.append(f"| {name} | {1e3 * t:.1f} | {t / first:.3f}x |")
    return "\n".join(lines), len(base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 21 (--quick: 3)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--quick", action="store_true", help="a generated street of 20k voxels, 3 rounds unless --rounds")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page's name in bench/results (default maps_ahead.md)")
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 21)  # (--quick: only the default)
    torch.set_num_threads(args.threads)
    kitti = not args.quick and "kitti-raw/000049" in real_sweeps()
    points = kitti_points() if kitti else _street_with_intensity()
    table, voxels = measure(points, args.rounds)
    print(table)
    scene = "KITTI raw 000049 at 0.05 m" if kitti else "a generated street"
    write_markdown(page_path(args.out, "maps_ahead.md", args.quick),
                   f"Kernel maps built ahead: {scene} ({voxels:,} voxels)",
                   "python bench/maps_ahead.py " + shlex.join(sys.argv[1:]), environment(), [table])


def _street_with_intensity() -> np.ndarray:
    """A generated street of about 20k voxels with an intensity column of zeros (the sweep's layout)."""
    xyz = street_points(20_000)
    return np.concatenate([xyz, np.zeros((len(xyz), 1), dtype=xyz.dtype)], 1)


if __name__ == "__main__":
    main()
