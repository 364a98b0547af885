"""voxelize in one trip into the core against the four trips it replaced
(core.quantize -> core.unique_keys -> core.segment_reduce -> core.unpack_keys,
the keys handed back and forth through Python), interleaved repeats, medians.

    .venv/bin/python bench/voxelize.py [--repeats 15] [--quick]

Both paths are checked equal before timing; results go to bench/results/voxelize.md
(``--quick``: one 20k street, 2 repeats, the page in a temporary folder)."""

from __future__ import annotations

import argparse
import importlib

import torch

import numpy as np

from _common import environment, interleaved, real_sweeps, results_path, street_points, write_markdown

import pointsparse as ps  # noqa: E402
from pointsparse import coords as C  # noqa: E402

V = importlib.import_module("pointsparse.voxelize")


def four_trips(points, feats, voxel_size, reduce):
    """The composition voxelize ran before (each step one core call)."""
    keys, layout = V.quantize_keys(points, voxel_size)
    uniq, inverse, perm, seg_ptr = C.unique(keys)
    out = V._SegmentReduce.apply(feats, inverse, perm, seg_ptr, V.REDUCE_MODES[reduce])
    return C.unpack(uniq, layout), out, inverse


def one_trip(points, feats, voxel_size, reduce):
    x, inverse = ps.voxelize(points, feats, voxel_size, reduce=reduce)
    return x.coords, x.feats, inverse



def clouds(quick: bool) -> dict:
    """name -> (N, 3) points: generated streets, and the KITTI sweeps present."""
    if quick:
        return {"street 20k": street_points(20_000, 0.05)}
    out = {f"street {n // 1000}k": street_points(n, 0.05) for n in (100_000, 400_000)}
    out.update({k: v for k, v in real_sweeps().items() if k.startswith("kitti")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 15, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one 20k street, 2 repeats")
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.quick else 15)
    rows = ["| cloud | points | voxels | reduce | four trips (ms) | one trip (ms) | speed-up |", "|---|---|---|---|---|---|---|"]
    for name, cloud in clouds(args.quick).items():
        voxel_size = 0.05
        points = torch.from_numpy(np.ascontiguousarray(cloud)).float()
        feats = torch.randn(points.shape[0], 4)
        for reduce in ("mean", "max"):
            a = four_trips(points, feats, voxel_size, reduce)
            b = one_trip(points, feats, voxel_size, reduce)
            assert all(torch.equal(u, v) for u, v in zip(a, b)), "the paths differ"
            run = [lambda: four_trips(points, feats, voxel_size, reduce),
                   lambda: one_trip(points, feats, voxel_size, reduce)]
            before, after = interleaved(dict(enumerate(run)), repeats, warmup=False).values()  # warm: a and b
            rows.append(f"| {name} @ {voxel_size} m | {points.shape[0]} | {len(b[0])} | {reduce} "
                        f"| {before * 1e3:.2f} | {after * 1e3:.2f} | {before / after:.2f}x |")
            print(rows[-1], flush=True)
    out = results_path("voxelize.md", args.quick)
    write_markdown(out, "voxelize: one trip into the core against four",
                   f"bench/voxelize.py --repeats {repeats}" + (" --quick" if args.quick else ""), environment(),
                   ["\n".join(rows)])
    print(f"written {out}")


if __name__ == "__main__":
    main()
