"""Trilinear devoxelisation (``devoxelize(mode="trilinear")``, SPVCNN's
voxel-to-point step) summed corner by corner against the (N, 8, C) gather
it replaced (every corner's rows gathered at once, multiplied by their
weights and summed over the 8), interleaved repeats, medians. Without a
gradient (the forward rows, the SPVCNN rows) the library's step is the
core's CSR product, to the same bits as its corners summed one by one.

    .venv/bin/python bench/devoxelize.py [--repeats 9] [--channels 16 64 256] [--quick]

The cloud is KITTI raw 000049 at 0.05 m (a generated street of 20k voxels
where the dataset is absent, or with ``--quick``), its points devoxelised
from random feats of its voxels. Forward and forward + backward (the feats'
gradient) are timed for each width, the corner search alone
(``trilinear_weights``: each point's 8 corner rows and weights) at strides
1, 4 and 16 on one thread and the run's, and a whole SPVCNN forward (eval mode,
its four devoxelisations among the rest) and training step (half the
repeats) with the library's step against the same model with the gather
put back in its place. Every output and
gradient is checked against the gather's (float32: a few ulps) before
anything is timed. Results in bench/results/devoxelize.md (``--quick``: one
width, 2 repeats, the page in a temporary folder).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
from contextlib import contextmanager

import numpy as np
import torch

from _common import (enforce_error, environment, interleaved, kitti_path, page_arg, page_path, positive_int,
                     quick_defaults, street_points, write_markdown)

import pointsparse as ps  # noqa: E402

V = importlib.import_module("pointsparse.voxelize")


def gathered_sum(feats, idx, weight, compute):
    """The step as it was before stop 66: all 8 corners' rows gathered into
    one (N, 8, C) tensor, weighted and summed over the corners."""
    n, c = idx.shape[0], feats.shape[1]
    rows = feats.index_select(0, idx.clamp_min(0).reshape(-1)).view(n, 8, c)
    return (rows.to(compute) * weight.to(compute)[..., None]).sum(1)


@contextmanager
def step(fn):
    """devoxelize with ``fn`` as its interpolation step."""
    library = V._interpolate
    V._interpolate = fn
    try:
        yield
    finally:
        V._interpolate = library


def cloud(quick: bool) -> tuple[str, np.ndarray]:
    """(name, (N, 3) float32 points)."""
    path = None if quick else kitti_path()
    if path is not None:
        return "KITTI raw 000049", np.fromfile(path, dtype=np.float32).reshape(-1, 4)[:, :3]
    return "a generated street of 20k voxels", street_points(20_000, 0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=positive_int, default=None, help="interleaved repeats (default 9, --quick 2)")
    parser.add_argument("--channels", type=positive_int, nargs="+", default=None,
                        help="feature widths (default 16 64 256, --quick 16)")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a 20k street, one width, 2 repeats")
    parser.add_argument("--out", type=page_arg, default="devoxelize.md",
                        help="the page's name in bench/results (default devoxelize.md)")
    args = parser.parse_args()
    quick_defaults(args, repeats=(9, 2), channels=([16, 64, 256], [16]))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, xyz = cloud(args.quick)
    from pointsparse.data import Batch, Sample
    from pointsparse.data.transforms import voxelize_sample

    sample = voxelize_sample(Sample(np.ascontiguousarray(xyz), None), 0.05, 255)
    batch = Batch.of([sample])
    coords, points, point_batch = batch.input.coords, batch.points, batch.point_batch
    rows = ["| C | points | voxels | pass | (N, 8, C) gather (ms) | corner by corner (ms) | speed-up | max abs diff |",
            "|---|---|---|---|---|---|---|---|"]
    for c in args.channels:
        feats = torch.randn(len(coords), c)
        x = ps.SparseTensor(feats, coords)

        def forward():
            return ps.devoxelize(x, points=points, voxel_size=1.0, batch=point_batch, mode="trilinear")

        grad_out = torch.randn(points.shape[0], c)

        def both():
            leaf = feats.clone().requires_grad_(True)
            out = ps.devoxelize(x.with_feats(leaf), points=points, voxel_size=1.0, batch=point_batch,
                                mode="trilinear")
            out.backward(grad_out)
            return out.detach(), leaf.grad

        for label, fn in (("forward", forward), ("forward + backward", both)):
            got = fn()
            with step(gathered_sum):
                want = fn()
            got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
            err = max(float((a - b).abs().max()) for a, b in zip(got, want))
            scale = max(float(b.abs().max()) for b in want)
            enforce_error(f"C = {c} {label}", err, 1e-6 * max(scale, 1.0))

            def old(fn=fn):
                with step(gathered_sum):
                    fn()

            before, after = interleaved({0: old, 1: fn}, args.repeats).values()
            rows.append(f"| {c} | {points.shape[0]} | {len(coords)} | {label} | {before * 1e3:.1f} "
                        f"| {after * 1e3:.1f} | {before / after:.2f}x | {err:.1e} |")
            print(rows[-1], flush=True)
    # The corner search alone (trilinear_weights: each point's 8 corner rows and weights, the core's
    # trilinear_neighbors), at the strides SPVCNN reads its points at, one thread and the run's threads.
    search = ["| stride | voxels | points | corner search, 1 thread (ms) | corner search, "
              f"{args.threads} threads (ms) |", "|---|---|---|---|---|"]
    for s in (1, 4, 16):
        grid = coords if s == 1 else torch.unique(
            torch.cat([coords[:, :1], torch.div(coords[:, 1:], s, rounding_mode="floor") * s], 1), dim=0)
        xs = ps.SparseTensor(torch.zeros(len(grid), 1), grid.to(torch.int32), s)
        times = {}
        for nt in (1, args.threads):
            torch.set_num_threads(nt)
            times[nt] = interleaved({0: lambda: V.trilinear_weights(xs, points, 1.0, point_batch)},
                                    args.repeats)[0]
        torch.set_num_threads(args.threads)
        search.append(f"| {s} | {len(xs)} | {points.shape[0]} | {times[1] * 1e3:.1f} | {times[args.threads] * 1e3:.1f} |")
        print(search[-1], flush=True)
    model = ps.models.SPVCNN(batch.input.num_channels, 19, cr=1.0).eval()
    inputs = (batch.input, batch.inverse, points, point_batch)
    with torch.inference_mode():
        got = model(*inputs)
        with step(gathered_sum):
            want = model(*inputs)
        err = enforce_error("SPVCNN logits", float((got - want).abs().max()), 1e-4 * max(float(want.abs().max()), 1))

        def old_model():
            with step(gathered_sum):
                model(*inputs)

        before, after = interleaved({0: old_model, 1: lambda: model(*inputs)}, args.repeats).values()
    net = ["| model | points | voxels | with the (N, 8, C) gather (ms) | corner by corner (ms) | speed-up "
           "| max abs diff |", "|---|---|---|---|---|---|---|",
           f"| SPVCNN cr 1.0, 19 classes, eval forward | {points.shape[0]} | {len(coords)} | {before * 1e3:.0f} "
           f"| {after * 1e3:.0f} | {before / after:.2f}x | {err:.1e} (logits) |"]
    print(net[-1], flush=True)
    model.train()
    labels = torch.randint(0, 19, (points.shape[0],), generator=torch.Generator().manual_seed(1))

    def train_step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # (the same dropout in both)
        torch.nn.functional.cross_entropy(model(*inputs), labels).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])

    state = {k: v.clone() for k, v in model.state_dict().items()}
    got = train_step()
    model.load_state_dict(state)  # (BatchNorm's running statistics: the same step twice)
    with step(gathered_sum):
        want = train_step()
    model.load_state_dict(state)
    err = enforce_error("SPVCNN gradients", float((got - want).abs().max()), 1e-4 * max(float(want.abs().max()), 1))

    def old_step():
        with step(gathered_sum):
            train_step()

    before, after = interleaved({0: old_step, 1: train_step}, max(2, args.repeats // 2)).values()
    net.append(f"| SPVCNN cr 1.0, 19 classes, a training step (forward + backward) | {points.shape[0]} "
               f"| {len(coords)} | {before * 1e3:.0f} | {after * 1e3:.0f} | {before / after:.2f}x | {err:.1e} "
               "(gradients) |")
    print(net[-1], flush=True)
    out = page_path(args.out, "devoxelize.md", args.quick)
    command = (f"bench/devoxelize.py --repeats {args.repeats} --channels {' '.join(map(str, args.channels))}"
               f" --threads {args.threads}" + (" --quick" if args.quick else "")
               + (f" --out {shlex.quote(args.out)}" if args.out != "devoxelize.md" else ""))
    write_markdown(out, f"trilinear devoxelize corner by corner against the (N, 8, C) gather ({name} at 0.05 m)",
                   command, environment(), ["\n".join(rows), "### The corner search (trilinear_weights)\n\n"
                                            + "\n".join(search), "### A whole SPVCNN forward\n\n" + "\n".join(net)])
    print(f"written {out}")


if __name__ == "__main__":
    main()
