"""voxelize in one trip into the core against the four trips it replaced
(core.quantize -> core.unique_keys -> core.segment_reduce -> core.unpack_keys,
the keys handed back and forth through Python), interleaved repeats, medians.

    .venv/bin/python bench/voxelize.py [--repeats 15] [--quick]

Both paths are checked equal before timing; results go to bench/results/voxelize.md
(``--quick``: one 20k street, 2 repeats, the page in a temporary folder). A second
table times ``data.transforms.voxelize_sample`` (what ``pointsparse predict``,
``eval`` and training run on a cloud: the shift to voxel 0, the point features,
voxelize, the voxel labels) against the plain numpy formulas it used before
(:func:`numpy_sample`), checked equal first, on the clouds with their
intensity where the file has it (KITTI 000049)."""

from __future__ import annotations

import argparse
import importlib
import shlex

import torch

import numpy as np

from _common import (environment, interleaved, page_arg, page_path, positive_int, real_sweeps, street_points,
                     write_markdown)

import pointsparse as ps  # noqa: E402
from pointsparse import coords as C  # noqa: E402

V = importlib.import_module("pointsparse.voxelize")


def four_trips(points, feats, voxel_size, reduce):
    """The composition voxelize ran before (each step one core call)."""
    keys, layout = V.quantize_keys(points, voxel_size)
    uniq, inverse, perm, seg_ptr = C.unique(keys)
    out = V._SegmentReduce.apply(feats, inverse, perm, seg_ptr, V.REDUCE_MODES[reduce])[0]
    return C.unpack(uniq, layout), out, inverse


def one_trip(points, feats, voxel_size, reduce):
    x, inverse = ps.voxelize(points, feats, voxel_size, reduce=reduce)
    return x.coords, x.feats, inverse



def numpy_sample(sample, voxel_size: float, ignore_index: int = 255):
    """``voxelize_sample`` in plain numpy, as it was written before stop 41:
    numpy's reductions over the (N, 3) rows, the features centred in one
    broadcast; each point's voxel floor(x / voxel_size) less the first, in
    float64 (stop 59: the float32 positions shifted by the first voxel put
    points just below a boundary one voxel on); the points in voxel units
    kept inside their voxels as stop 45's. (coords, feats, inverse, points,
    labels)."""
    from pointsparse.data.transforms import NUM_FEATURES, majority_labels

    scaled = sample.xyz.astype(np.float64) / voxel_size
    first = np.floor(sample.xyz.astype(np.float64).min(0) / voxel_size) if len(scaled) else np.zeros(3)
    cells = np.floor(scaled) - first
    feats = np.zeros((len(sample), NUM_FEATURES), dtype=np.float32)
    if len(sample):
        feats[:, :3] = sample.xyz
        feats[:, :2] -= sample.xyz[:, :2].mean(0)
    if sample.intensity is not None:
        feats[:, 3:4] = sample.intensity
    tensor, inverse = ps.voxelize(torch.from_numpy(cells + 0.5), torch.from_numpy(feats), voxel_size=1.0,
                                  reduce="mean")
    labels = np.full(len(sample), ignore_index, dtype=np.int64)
    vox_labels = majority_labels(inverse.numpy(), labels, len(tensor), ignore_index)
    below = torch.from_numpy(cells).float()  # (each point kept inside its voxel, as voxelize_sample does since stop 45)
    inside = torch.minimum(torch.maximum(torch.from_numpy(scaled - first).float(), below),
                           torch.nextafter(below + 1, below))
    return tensor.coords, tensor.feats, inverse.long(), inside, vox_labels


def app_sample(sample, voxel_size: float, ignore_index: int = 255):
    """``voxelize_sample``'s result in :func:`numpy_sample`'s order."""
    from pointsparse.data.transforms import voxelize_sample

    v = voxelize_sample(sample, voxel_size, ignore_index)
    return v.coords, v.feats, v.inverse, v.points, v.labels.numpy()


def samples(quick: bool, points: dict) -> dict:
    """name -> data.Sample of each cloud (KITTI 000049 read from its file, intensity included)."""
    from _common import kitti_path
    from pointsparse.data import Sample
    from pointsparse.data.readers import read_cloud

    out = {name: Sample(np.ascontiguousarray(cloud, dtype=np.float32), None) for name, cloud in points.items()}
    if not quick and "kitti-raw/000049" in out and kitti_path() is not None:
        out["kitti-raw/000049"] = read_cloud(kitti_path(), None, 255)
    return out


def clouds(quick: bool) -> dict:
    """name -> (N, 3) points: generated streets, and the KITTI sweeps present."""
    if quick:
        return {"street 20k": street_points(20_000, 0.05)}
    out = {f"street {n // 1000}k": street_points(n, 0.05) for n in (100_000, 400_000)}
    out.update({k: v for k, v in real_sweeps().items() if k.startswith("kitti")})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="interleaved repeats (default 15, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one 20k street, 2 repeats")
    parser.add_argument("--out", type=page_arg, default="voxelize.md",
                        help="the page's name in bench/results (default voxelize.md)")
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
    app = ["| cloud (Sample) | points | numpy formulas (ms) | voxelize_sample (ms) | speed-up |", "|---|---|---|---|---|"]
    for name, sample in samples(args.quick, clouds(args.quick)).items():
        a, b = numpy_sample(sample, 0.05), app_sample(sample, 0.05)
        assert all((torch.equal(u, v) if torch.is_tensor(u) else np.array_equal(u, v)) for u, v in zip(a, b)), \
            f"{name}: voxelize_sample differs from the numpy formulas"
        before, after = interleaved({0: lambda: numpy_sample(sample, 0.05), 1: lambda: app_sample(sample, 0.05)},
                                    repeats, warmup=False).values()
        app.append(f"| {name} @ 0.05 m{' (with intensity)' if sample.intensity is not None else ''} | {len(sample)} "
                   f"| {before * 1e3:.2f} | {after * 1e3:.2f} | {before / after:.2f}x |")
        print(app[-1], flush=True)
    out = page_path(args.out, "voxelize.md", args.quick)
    write_markdown(out, "voxelize: one trip into the core against four",
                   f"bench/voxelize.py --repeats {repeats}" + (" --quick" if args.quick else "")
                   + (f" --out {shlex.quote(args.out)}" if args.out != "voxelize.md" else ""), environment(),
                   ["\n".join(rows), "### voxelize_sample against the numpy formulas it replaced\n\n" + "\n".join(app)])
    print(f"written {out}")


if __name__ == "__main__":
    main()
