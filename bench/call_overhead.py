"""What an inference forward pays besides the conv kernels: the per-call
cost of a ``Conv3d`` module (argument checks, the map lookup, the engine's
choice of kernels, the output's allocation) and the residual blocks' sums
and ReLUs, on the north star's pruned MinkUNet.

    flock /work/cpu.lock .venv/bin/python bench/call_overhead.py [--rounds 15] [--threads 2]
        [--parts calls residual cache] [--quick]

Table 1: one submanifold ``Conv3d(C, C, 3)`` on a 64-voxel cloud (the kernels
take microseconds there), called through the module and through the core's
``ConvPlan.forward`` alone (plan, choice and output made once), for a dense
and a vector-pruned weight (``panel_structured`` 75%, made permanent); the
difference is what every conv call of a network pays on top of its kernels.
Table 2: the north star's "keep 0.25 + fuse + vectors 75%" MinkUNet on KITTI
raw 000049 at 0.05 m (maps cached: the network alone) as
``fuse_for_inference`` leaves it (each residual block's sum and ReLU in its
last conv's store) and the same model with the sum (``nn.add``) and the ReLU
after the conv, as before; outputs compared bit for bit first. Table 3
(``cache``): steps that coords in key order let skip work, against the way
they take otherwise (see :func:`cache_steps`). Medians of interleaved rounds. ``--quick``: a 20k generated street, one round unless
``--rounds`` is given, the page in a temporary folder.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys

import numpy as np
import torch

from _common import (environment, interleaved, kitti_path, page_arg, page_path, positive_int, quick_defaults,
                     street_scene, write_markdown)

import pointsparse as ps
from pointsparse import prune
from pointsparse.nn import _engine
from north_star import inputs, vector_sparse
from prune_speed import _variants


def per_call(rounds: int, channels: int = 16, calls: int = 200) -> str:
    """Table 1 (``--channels``); a last column times ``ConvPlan.forward_bf16``
    alone on the same weight in bf16 (the engine's vector threshold), where
    the CPU has AVX512-BF16."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = torch.cat([torch.zeros(len(grid), 1, dtype=torch.int64), grid], 1).int()
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    torch.manual_seed(0)
    dense = ps.nn.Conv3d(channels, channels, 3)
    pruned = copy.deepcopy(dense)
    prune.panel_structured(pruned, "weight", 0.75)
    prune.remove(pruned, "weight")
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap, x.cache)
    fns = {}
    for name, conv in (("dense", dense), ("vectors 75%", pruned)):
        w = conv.weight.detach().contiguous()
        run = _engine.choose_execution(w)
        out = x.feats.new_empty((kmap.num_out, channels))
        args = (x.feats.numpy(), w.numpy(), None, out.numpy(), torch.get_num_threads())

        def module(conv=conv):
            with torch.no_grad():
                for _ in range(calls):
                    conv(x)

        def core(args=args, run=run):
            for _ in range(calls):
                plan.core.forward(*args, active=run.active, vector=run.vector)

        fns[(name, "module")], fns[(name, "core")] = module, core
        if _engine.bf16_kernels():  # the bf16 forward alone: its choice and packing are per call too
            bits = (x.feats.bfloat16().view(torch.int16).numpy(), w.bfloat16().view(torch.int16).numpy())
            out32, threshold = out.float().numpy(), _engine.bf16_vector_threshold(channels)

            def core_bf16(bits=bits, out32=out32, threshold=threshold):
                for _ in range(calls):
                    plan.core.forward_bf16(*bits, None, out32, torch.get_num_threads(), vector_density=threshold)

            fns[(name, "bf16")] = core_bf16
    med = interleaved(fns, rounds)
    lines = [f"### One Conv3d({channels}, {channels}, 3) call on {len(coords)} voxels (a 4 x 4 x 4 block), "
             f"{torch.get_num_threads()} threads, medians of {rounds} interleaved rounds of {calls} calls", "",
             "| weight | module call us | core forward alone us | the module's own cost us | "
             "core bf16 forward alone us |", "|---|---|---|---|---|"]
    for name in ("dense", "vectors 75%"):
        m, c = (1e6 * med[(name, k)] / calls for k in ("module", "core"))
        b = f"{1e6 * med[(name, 'bf16')] / calls:.1f}" if (name, "bf16") in med else "(no AVX512-BF16)"
        lines.append(f"| {name} | {m:.0f} | {c:.0f} | {m - c:.0f} | {b} |")
    return "\n".join(lines)


def cache_steps(rounds: int, quick: bool) -> str:
    """Two steps of an end-to-end inference that a tensor in key order lets
    skip work, each against the way it takes otherwise, in the same rounds:
    ``SparseTensor(feats, coords)`` on the sweep's voxels (in key order: one
    comparison pass finds no duplicate) and the same checks with ``unique``
    finding the duplicates, as before stop 28; the 1x1x1 map a coordinate cache builds (every row
    with itself) and ``kmap.build(coords, 1)`` (the merge-sort builder)."""
    if quick or kitti_path() is None:
        coords, scene = street_scene(20_000), "a generated street of 20k voxels"
    else:
        xyz, feats = inputs(np.fromfile(str(kitti_path()), dtype=np.float32).reshape(-1, 4))
        coords, scene = ps.voxelize(xyz, feats, voxel_size=0.05)[0].coords, "KITTI raw 000049 at 0.05 m"
    f = torch.randn(len(coords), 4)
    from pointsparse import coords as C
    from pointsparse import kmap as K
    from pointsparse import tensor as T

    def with_unique():  # validate_coords' checks, duplicates found by unique's sort
        T.check_coords_type(coords)
        bool((coords[:, 0] < 0).any())
        keys = C.pack(coords)
        if C.unique(keys)[0].numel() != keys.numel():
            raise SystemExit("call_overhead: duplicate coords")
        return ps.SparseTensor(f, coords, validate=False)

    cached = K._build(coords, (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1), trusted=True)
    built = K.build(coords, 1, method="mergesort")
    if not (torch.equal(cached.in_idx, built.in_idx) and torch.equal(cached.out_idx, built.out_idx)):
        raise SystemExit("call_overhead: the cached 1x1x1 map differs from the builder's")
    med = interleaved({
        "in order": lambda: ps.SparseTensor(f, coords),
        "with unique": with_unique,
        "cached": lambda: K._build(coords, (1, 1, 1), (1, 1, 1), (1, 1, 1), (1, 1, 1), trusted=True),
        "builder": lambda: K.build(coords, 1, method="mergesort")}, rounds)
    return "\n".join([
        f"### {scene} ({len(coords):,} voxels), {torch.get_num_threads()} threads, medians of {rounds} "
        "interleaved rounds", "",
        "| step | the usual way ms | the other way ms | ratio |", "|---|---|---|---|",
        f"| `SparseTensor(feats, coords)` / the same checks by `unique` (before stop 28) | "
        f"{1e3 * med['in order']:.2f} | {1e3 * med['with unique']:.2f} | "
        f"{med['with unique'] / med['in order']:.2f}x |",
        f"| 1x1x1 map: a coordinate cache's / `kmap.build(coords, 1)` (merge sort) | {1e3 * med['cached']:.2f} | "
        f"{1e3 * med['builder']:.2f} | {med['builder'] / med['cached']:.2f}x |", "",
        "The cached map equals the builder's."])


def residual(rounds: int, quick: bool) -> str:
    if quick or kitti_path() is None:
        coords, scene = street_scene(20_000), "a generated street of 20k voxels"
        base = ps.SparseTensor(torch.randn(len(coords), 4), coords)
    else:
        xyz, feats = inputs(np.fromfile(str(kitti_path()), dtype=np.float32).reshape(-1, 4))
        base, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
        scene = f"KITTI raw 000049 at 0.05 m ({len(base):,} voxels)"
    x = ps.SparseTensor(base.feats, base.coords)
    nets, _ = _variants(x, [(0.25, 8)])
    fused = vector_sparse(ps.nn.fuse_for_inference(nets["keep 0.25 (x8)"]), 0.75)
    after = copy.deepcopy(fused)
    blocks = 0
    for m in after.modules():
        if getattr(m, "sum_in_conv", None) is not None:
            m.main[m.sum_in_conv].relu, m.relu, m.sum_in_conv = False, ps.nn.ReLU(inplace=True), None
            blocks += 1
    with torch.no_grad():
        same = torch.equal(fused(x).feats, after(x).feats)
        med = interleaved({"in": lambda: fused(x), "after": lambda: after(x)}, rounds)
    if not same:
        raise SystemExit("call_overhead: the fused residual changed the output")
    return "\n".join([
        f"### The north star's keep 0.25 + fuse + vectors 75% MinkUNet on {scene}, network alone, "
        f"{torch.get_num_threads()} threads, medians of {rounds} interleaved rounds", "",
        "| residual blocks' sum and ReLU | forward ms | ratio |", "|---|---|---|",
        f"| after the conv (nn.add, then ReLU) | {1e3 * med['after']:.1f} | 1.00x |",
        f"| in the last conv's store ({blocks} blocks, fuse_for_inference) | {1e3 * med['in']:.1f} | "
        f"{med['after'] / med['in']:.2f}x |", "",
        "Outputs equal bit for bit."])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 15 (--quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--parts", nargs="+", choices=("calls", "residual", "cache"),
                        default=("calls", "residual", "cache"))
    parser.add_argument("--channels", type=int, default=16, help="table 1's C (default 16)")
    parser.add_argument("--quick", action="store_true", help="a 20k generated street, 1 round unless --rounds is given")
    parser.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/call_overhead.md)")
    args = parser.parse_args()
    quick_defaults(args, rounds=(15, 1))
    torch.set_num_threads(args.threads)
    rounds = args.rounds
    tables = ([per_call(rounds, args.channels)] if "calls" in args.parts else []) + (
        [residual(rounds, args.quick)] if "residual" in args.parts else []) + (
        [cache_steps(rounds, args.quick)] if "cache" in args.parts else [])
    path = page_path(args.out, "call_overhead.md", args.quick)
    command = "python bench/call_overhead.py " + shlex.join(sys.argv[1:])
    write_markdown(path, "Per-call costs of an inference forward", command.strip(), environment(), tables)
    print(path.read_text())


if __name__ == "__main__":
    main()
