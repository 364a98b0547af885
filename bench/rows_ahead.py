"""The fused kernels with and without rows ahead (``_core.conv_rows_ahead``):
the same build, the same process, the setting switched between calls, so the
ways alternate round by round.

    python bench/rows_ahead.py [--channels 32 64 128] [--kinds unpruned "twin 75%" ...]
        [--passes forward input bf16] [--threads 1] [--rounds 15] [--network] [--program NAME=FILE.pt2 ...]
        [--out PAGE.md] [--quick]

On a submanifold map a thread's block of written rows starts with the
identity pass, which reads the block's own rows and writes every one of them:
the block's traffic with memory comes at its start, its other offsets then
run from cache. With rows ahead, after each tile the walk fetches into L2 a
share of the lines the thread's next block's identity pass will read and
write (``cpp/conv/fused.h``), so that the fetches overlap the products.

Table 1: a submanifold ``Conv3d(C, C, 3)`` on the KITTI sweep (000049, 0.05
m; a generated street of 20k voxels where the dataset is absent), unpruned
and pruned as ``bench/prune_exec.py`` prunes it, each pass run by the
engine's choice of kernels (the kernels alone, one output buffer): ``forward``
(float32), ``input`` (the input gradient), ``bf16`` (the inference forward
in bfloat16, a CPU with AVX512-BF16). Rows ahead off, on, and as the build's
rule decides (``auto``); outputs of all three equal bit for bit first.
``--network``: also the full-width ``MinkUNet(4, 19)`` after
``fuse_for_inference`` (float32) on the same sweep; ``--program``: a program
``pointsparse export`` wrote (its feats of the program's dtype), each module
call off / auto / on, logits compared first. Medians; each ratio is the time
over the time with rows ahead off (below 1: faster with them).
``--quick``: C = 8 on the generated street, one round, the page in a
temporary folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from _common import environment, interleaved, kitti_or_street, results_path, write_markdown
from prune_exec import variants

import pointsparse as ps
from pointsparse.nn import _engine

CORE = ps._ext.core
MODES = ("off", "auto", "on")
KINDS = ("unpruned", "offset 75%", "vector 50%", "vector 75%", "twin 50%", "twin 75%")


def with_mode(fn, mode: str):
    def call():
        CORE.conv_rows_ahead(mode)
        return fn()
    return call


def timed(fns: dict, rounds: int, what: str) -> dict:
    """Each ``fns[name]`` (a call returning its result) under every mode,
    the results compared bit for bit first (RuntimeError naming ``what``),
    then medians of interleaved rounds: {(name, mode): seconds}."""
    calls = {(name, mode): with_mode(fn, mode) for name, fn in fns.items() for mode in MODES}
    for name in fns:
        got = [np.asarray(calls[name, mode]()) for mode in MODES]
        if not all(np.array_equal(got[0], g) for g in got[1:]):
            raise RuntimeError(f"{what}, {name}: the outputs differ with rows ahead on and off")
    return interleaved(calls, rounds)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.bfloat16().view(torch.int16).numpy()


def conv_rows(channels: int, coords: torch.Tensor, kinds, passes, threads: int, rounds: int) -> list[str]:
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap)
    feats = x.feats.numpy()
    feats16 = bits(x.feats)
    grad = np.random.default_rng(0).standard_normal((kmap.num_out, channels)).astype(np.float32)
    out = np.empty((kmap.num_out, channels), np.float32)
    out16 = np.empty((kmap.num_out, channels), np.int16)
    grad_in = np.empty_like(feats)
    families = sorted({k.split()[0] for k in kinds if k != "unpruned"})
    rows = []
    for name, _, _, conv in variants(channels, families):
        if name not in kinds:
            continue
        weight = conv.weight.detach().contiguous()
        run = _engine.choose_execution(weight)
        w, w16 = weight.numpy(), bits(weight)
        fns, paths = {}, {}
        if "forward" in passes:
            fns["forward"] = lambda w=w, run=run: plan.core.forward(feats, w, None, out, threads, None, False,
                                                                    active=run.active, vector=run.vector) or out
            paths["forward"] = run.name
        if "input" in passes:
            fns["input"] = lambda w=w, run=run: plan.core.backward_input(grad, w, grad_in, threads, None,
                                                                         active=run.active, vector=run.vector) \
                or grad_in
            paths["input"] = run.name
        if "bf16" in passes and CORE.conv_bf16():
            density = float(_engine.bf16_vector_threshold(channels))
            paths["bf16"] = "bf16 " + plan.core.forward_bf16(feats16, w16, None, out, threads, False, out_bf16=out16,
                                                             vector_density=density)
            fns["bf16"] = lambda w16=w16, density=density: plan.core.forward_bf16(
                feats16, w16, None, out, threads, False, out_bf16=out16, vector_density=density) and out16
        t = timed(fns, rounds, f"C = {channels}, {name}")
        for which in fns:
            off = t[which, "off"]
            rows.append(f"| {channels} | {name} | {which} ({paths[which]}) | {off * 1e3:.2f} | "
                        + " | ".join(f"{t[which, m] * 1e3:.2f} ({t[which, m] / off:.3f})" for m in MODES[1:])
                        + " |")
    return rows


def network_rows(models: dict, rounds: int) -> list[str]:
    """Module calls of each model (name -> (model, its input))."""
    rows = []
    for name, (model, y) in models.items():
        def forward(model=model, y=y):
            with torch.inference_mode():
                return model(y).feats.float().numpy()

        t = timed({name: forward}, rounds, name)
        off = t[name, "off"]
        rows.append(f"| {name} | {off * 1e3:.1f} | "
                    + " | ".join(f"{t[name, m] * 1e3:.1f} ({t[name, m] / off:.3f})" for m in MODES[1:]) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--passes", nargs="+", choices=("forward", "input", "bf16"),
                        default=["forward", "input", "bf16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--network", action="store_true", help="also the fused full-width MinkUNet on the sweep")
    parser.add_argument("--program", action="append", default=[], metavar="NAME=FILE.pt2",
                        help="also a program pointsparse export wrote (repeatable)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    from north_star import program_specs

    try:
        programs = program_specs(args.program)
    except ValueError as exc:
        parser.error(str(exc))
    coords, scene = kitti_or_street(args.quick)
    channels, rounds = ([8], 1) if args.quick else (args.channels, args.rounds)
    default = CORE.conv_rows_ahead()
    torch.set_num_threads(args.threads)
    head = "| off ms | auto ms (/ off) | on ms (/ off) |"
    try:
        rows = []
        for c in channels:
            rows += conv_rows(c, coords, args.kinds, args.passes, args.threads, rounds)
            print("\n".join(rows[-len(args.kinds) * len(args.passes):]), flush=True)
        tables = [f"### One conv, {scene} ({len(coords):,} voxels), {args.threads} thread(s), kernels alone, "
                  f"medians of {rounds} rounds\n\n| C | pruning | pass (engine path) {head}\n"
                  "|---|---|---|---|---|---|\n" + "\n".join(rows)]
        models = {}
        if (args.network or programs) and not args.quick:
            if args.network:  # the north star's sweep and features (x, y, z, intensity)
                from north_star import inputs, kitti_points

                x, _ = ps.voxelize(*inputs(kitti_points()), voxel_size=0.05)
                torch.manual_seed(0)
                models[f"MinkUNet(4, 19) fused, float32, {len(x):,} voxels"] = (
                    ps.nn.fuse_for_inference(ps.models.MinkUNet(4, 19, cr=1.0).eval()), x)
            if programs:  # as `pointsparse predict` gives them the sweep (north_star.py --program)
                from _common import kitti_path

                from pointsparse import export
                from pointsparse.data.readers import read_cloud
                from pointsparse.data.transforms import voxelize_sample

                v = voxelize_sample(read_cloud(kitti_path(), None, -1), 0.05, -1).input
                for name, path in programs.items():
                    program = export.ProgramModel.load(path)
                    models[f"{name} (`{path}`, {len(v):,} voxels)"] = (
                        program, ps.SparseTensor(v.feats.to(program.dtype), v.coords))
            net = network_rows(models, rounds)
            print("\n".join(net), flush=True)
            tables.append(f"### Whole networks on {scene}, {args.threads} thread(s), module calls, medians of "
                          f"{rounds} rounds\n\n| model {head}\n|---|---|---|---|\n" + "\n".join(net))
    finally:
        CORE.conv_rows_ahead(default)
    out = Path(args.out) if args.out else results_path("rows_ahead.md", args.quick)
    command = "python bench/rows_ahead.py " + " ".join(sys.argv[1:])
    write_markdown(out, "Rows ahead against none", command, environment(), tables,
                   f"Default setting: {default!r} (auto: the rule of `rows_ahead_for` in cpp/conv/fused.h).")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
