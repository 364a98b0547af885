"""How far the project is from its goal: a pruned MinkUNet-class network
segmenting a full KITTI sweep at 0.05 m (~80-90k voxels) in <= 100 ms on 2
cores, within 2 mIoU of the unpruned network.

    flock /work/cpu.lock python bench/north_star.py [--rounds 5] [--threads 2]

On KITTI raw 000049 (skipped cleanly when ../shared/datasets, or the folder
``$POINTSPARSE_DATASETS`` names, lacks it):
MinkUNet(4, 19, cr=1.0) (seeded random weights: no trained full-width
model exists here) at full width and with what the toolkit gives, step by
step: channel pruning through the dependency graph (``prune.graph``, every
coupled group kept at 0.5 and 0.25, counts rounded to 8, as
bench/prune_speed.py), ``nn.fuse_for_inference`` (BatchNorm folded, ReLU in
the conv's store), bfloat16 features and weights (the AVX512-BF16 kernels),
vector sparsity (``prune.panel_structured`` 75% on every conv with more than
one offset, made permanent; 16 x 1 blocks, or 16 x 2 (``rows=2``: whole bf16
vectors) for the "pair vectors" rows, which the bf16 kernels skip (75%,
and 85%: the sparsest whose fine-tuned model stays above the unpruned
one on held-out scenes on two seeds, bench/RESULTS.md stop 42); the 75%
model is also timed with its maps built ahead, side by side (``nn.MapsAhead``:
the schedule recorded in the warm-up call), and as a ``pointsparse.export``
program written to a file and loaded back, whose maps are built inside every
call), offsets 74% (``pointsparse prune offsets``: 7 of the 27 kernel offsets
of every k3 conv kept, by norm; the AMX tiles run the kept ones; fast, but
12.9 mIoU points under the unpruned model after fine-tuning,
bench/results/prune_finetune_offsets_xeon.md) and ``nn.VoxelPrune(0.5)`` before the three
coarse decoder stages (bench/voxel_prune.py); on a CPU with AMX-BF16 the two
unpruned bf16 rows again with the AMX tiles off. Each is timed end to end from
the points (voxelize, every kernel map and plan built, the network; no
gradients) and with the maps cached (the network alone), interleaved, medians
of ``--rounds``. The output difference is against the unpruned float32 model
on the same voxels: the largest logit difference over the largest logit, and
the share of voxels whose argmax agrees. With untrained weights the pruned
rows' differences say only that pruning changes the function; the accuracy
after fine-tuning is measured in bench/prune_finetune.py (channels) and
bench/voxel_prune.py (voxels).

``--program NAME=FILE.pt2`` (repeatable) times trained models too: programs
``pointsparse export`` wrote (say, the checkpoints bench/prune_finetune.py
fine-tuned and scored on held-out scenes), run as ``pointsparse predict``
runs them on the sweep: its points' features (``point_features``), voxelized
at ``--voxel-size`` (whatever voxel the model was trained at: the time is
that of this sweep's voxels), the program, every point's class; and the
program alone on the cached voxels (it builds its maps inside every call).
Interleaved with each other, medians of ``--rounds``; ``--no-variants``
times only them.

``--reuse-memory``: ``pointsparse.reuse_freed_memory(True)`` first, as a
user serving many sweeps from one process may set it (process-wide, so
compare whole runs with and without it, alternated: bench/RESULTS.md
stop 51)."""

from __future__ import annotations

import argparse
from pathlib import Path
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from _common import (environment, kitti_searched, page_arg, page_path, positive_int, quick_defaults, real_sweeps,
                     write_markdown)
from prune_speed import _variants
from voxel_prune import add_voxel_prune

import pointsparse as ps
from pointsparse import _core, prune

TARGET_MS = 100.0


def inputs(points: np.ndarray):
    """``(xyz, feats)`` torch tensors of the sweep: positions (metres) and
    (x / 50, y / 50, z / 50, intensity) point features."""
    xyz = torch.from_numpy(np.ascontiguousarray(points[:, :3]))
    feats = torch.cat([xyz / 50.0, torch.from_numpy(np.ascontiguousarray(points[:, 3:4]))], 1)
    return xyz, feats


def vector_sparse(model: torch.nn.Module, amount: float, rows: int | None = None) -> torch.nn.Module:
    for module in model.modules():
        if isinstance(module, ps.nn.Conv3d) and module.weight.shape[0] > 1:
            prune.panel_structured(module, "weight", amount, rows=rows)
            prune.remove(module, "weight")
    return model


def offset_sparse(model: torch.nn.Module, amount: float) -> torch.nn.Module:
    """``amount`` of the kernel offsets of every conv whose windows overlap
    pruned by norm and made permanent (what ``pointsparse prune offsets``
    masks: the k3 convs, not the k2 s2 ones)."""
    from pointsparse.app.channels import overlapping_convs

    for module in overlapping_convs(model):
        prune.kernel_structured(module, "weight", amount, scope="offset")
        prune.remove(module, "weight")
    return model


def variants(x: ps.SparseTensor) -> dict:
    """name -> (model, dtype): the unpruned float32 model first; each later
    row adds one step to a row before it."""
    nets, _ = _variants(x, [(0.5, 8), (0.25, 8)])
    full, half, quarter = nets["dense"], nets["keep 0.5 (x8)"], nets["keep 0.25 (x8)"]
    fused_full, fused_quarter = ps.nn.fuse_for_inference(full), ps.nn.fuse_for_inference(quarter)
    out = {"full width, float32": (full, torch.float32),
           "full width + fuse_for_inference": (fused_full, torch.float32),
           "full width + fuse + bf16": (ps.nn.fuse_for_inference(full).to(torch.bfloat16), torch.bfloat16),
           "channels keep 0.5": (half, torch.float32),
           "channels keep 0.25": (quarter, torch.float32),
           "keep 0.25 + fuse": (fused_quarter, torch.float32),
           "keep 0.25 + fuse + bf16": (ps.nn.fuse_for_inference(quarter).to(torch.bfloat16), torch.bfloat16)}
    if _core.conv_amx():  # the bf16 rows again without the AMX tiles (vdpbf16ps only)
        for name in ("full width + fuse + bf16", "keep 0.25 + fuse + bf16"):
            out[name + ", AMX tiles off"] = (NoTiles(out[name][0]), torch.bfloat16)
    sparse = vector_sparse(ps.nn.fuse_for_inference(quarter), 0.75)
    out["keep 0.25 + fuse + vectors 75%"] = (sparse, torch.float32)
    spatial = vector_sparse(ps.nn.fuse_for_inference(quarter), 0.75)
    add_voxel_prune(spatial, 0.5, (0, 1, 2))
    out["keep 0.25 + fuse + vectors 75% + VoxelPrune(0.5)"] = (spatial, torch.float32)
    bf16_spatial = ps.nn.fuse_for_inference(quarter).to(torch.bfloat16)
    add_voxel_prune(bf16_spatial, 0.5, (0, 1, 2))
    out["keep 0.25 + fuse + bf16 + VoxelPrune(0.5)"] = (bf16_spatial, torch.bfloat16)
    out["keep 0.25 + fuse + vectors 75% + bf16"] = (
        vector_sparse(ps.nn.fuse_for_inference(quarter), 0.75).to(torch.bfloat16), torch.bfloat16)
    out["keep 0.25 + fuse + pair vectors 50% + bf16"] = (
        vector_sparse(ps.nn.fuse_for_inference(quarter), 0.5, rows=2).to(torch.bfloat16), torch.bfloat16)
    pairs = vector_sparse(ps.nn.fuse_for_inference(quarter), 0.75, rows=2).to(torch.bfloat16)
    out["keep 0.25 + fuse + pair vectors 75% + bf16"] = (pairs, torch.bfloat16)
    out["the same + maps built ahead (nn.MapsAhead)"] = (ps.nn.MapsAhead(pairs), torch.bfloat16)
    out["the same, exported (.pt2 written and loaded back)"] = (
        Program(pairs, ps.SparseTensor(x.feats.bfloat16(), x.coords)), torch.bfloat16)
    out["keep 0.25 + fuse + pair vectors 85% + bf16"] = (
        vector_sparse(ps.nn.fuse_for_inference(quarter), 0.85, rows=2).to(torch.bfloat16), torch.bfloat16)
    offsets = offset_sparse(ps.nn.fuse_for_inference(quarter), 0.74).to(torch.bfloat16)
    out["keep 0.25 + fuse + offsets 74% + bf16"] = (offsets, torch.bfloat16)
    return out


class NoTiles(torch.nn.Module):
    """``model`` run with the bf16 forward's AMX tiles turned off
    (``nn._engine.BF16_TILES``), for the rows that compare the two on a CPU
    with AMX-BF16."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: ps.SparseTensor) -> ps.SparseTensor:
        from pointsparse.nn import _engine

        before, _engine.BF16_TILES = _engine.BF16_TILES, False
        try:
            return self.model(x)
        finally:
            _engine.BF16_TILES = before


class Program(torch.nn.Module):
    """``model`` as a ``pointsparse.export`` program, written to a file and
    loaded back, called as the eager models are (a SparseTensor in, one
    out). The program builds its maps and plans in every call (no cache
    between calls): its "network alone" time includes them."""

    def __init__(self, model: torch.nn.Module, example: ps.SparseTensor) -> None:
        import tempfile

        from pointsparse import export

        super().__init__()
        with tempfile.TemporaryDirectory() as tmp:
            export.save(export.export_model(model, example), Path(tmp) / "model.pt2")
            self.run = export.ProgramModel.load(Path(tmp) / "model.pt2")

    def forward(self, x: ps.SparseTensor) -> ps.SparseTensor:
        return self.run(x)


def end_to_end(model, dtype, xyz, feats, voxel_size):
    x, _ = ps.voxelize(xyz, feats, voxel_size=voxel_size)
    return model(ps.SparseTensor(x.feats.to(dtype), x.coords))


def round_orders(names: list, rounds: int):
    """Each round's order of ``names``: a new (seeded) permutation a round,
    so that no model always follows the same one."""
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        yield [names[i] for i in rng.permutation(len(names))]


def measure(points: np.ndarray, voxel_size: float, rounds: int) -> str:
    xyz, feats = inputs(points)
    base, _ = ps.voxelize(xyz, feats, voxel_size=voxel_size)
    models = variants(ps.SparseTensor(base.feats, base.coords))
    cached = {name: ps.SparseTensor(base.feats.to(dtype), base.coords) for name, (_, dtype) in models.items()}
    with torch.no_grad():
        outs = {name: m(cached[name]).feats.float() for name, (m, _) in models.items()}  # warm-up too
        e2e, net = {n: [] for n in models}, {n: [] for n in models}
        for order in round_orders(list(models), rounds):
            for name in order:
                m, dtype = models[name]
                t0 = time.perf_counter()
                end_to_end(m, dtype, xyz, feats, voxel_size)
                t1 = time.perf_counter()
                m(cached[name])
                e2e[name].append(t1 - t0)
                net[name].append(time.perf_counter() - t1)
    ref = outs["full width, float32"]
    scale = float(ref.abs().max())
    lines = [f"### KITTI raw 000049 at {voxel_size} m: {len(base):,} voxels, {torch.get_num_threads()} threads, "
             f"medians of {rounds} interleaved rounds", "",
             "| model | end to end ms | network alone ms | speed-up (end to end) | x of 100 ms | "
             "max logit diff / max logit | argmax agrees |", "|---|---|---|---|---|---|---|"]
    first = statistics.median(e2e["full width, float32"])
    for name in models:
        t, n = statistics.median(e2e[name]), statistics.median(net[name])
        diff = float((outs[name] - ref).abs().max()) / scale
        agree = float((outs[name].argmax(1) == ref.argmax(1)).float().mean())
        lines.append(f"| {name} | {1e3 * t:.0f} | {1e3 * n:.0f} | {first / t:.2f}x | {1e3 * t / TARGET_MS:.1f} | "
                     f"{diff:.1e} | {100 * agree:.1f}% |")
    return "\n".join(lines)


def program_specs(specs: list[str]) -> dict:
    """``--program NAME=FILE.pt2`` arguments as {name: Path}; ValueError
    naming the flag for a spec without both parts, a repeated name or a
    missing file."""
    out = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--program takes NAME=FILE.pt2; got {spec!r}")
        if name in out:
            raise ValueError(f"--program {name}: the name is given twice")
        if not Path(file).is_file():
            raise ValueError(f"--program {name}: {file} does not exist")
        out[name] = Path(file)
    return out


def program_rows(specs: dict, voxel_size: float, rounds: int) -> str:
    """The table of ``--program NAME=FILE.pt2`` rows (see the module doc)."""
    from _common import kitti_path

    from pointsparse.app.evaluate import program_and_state
    from pointsparse.app.scoring import feats_dtype, predict
    from pointsparse.data import Batch
    from pointsparse.data.readers import read_cloud
    from pointsparse.data.transforms import voxelize_sample

    programs = {name: (file, *program_and_state(file)) for name, file in specs.items()}
    sample = read_cloud(kitti_path(), None, -1)
    v = voxelize_sample(sample, voxel_size, -1)
    cached = {}
    with torch.no_grad():
        for name, (file, model, state) in programs.items():
            if v.feats.shape[1] != state["config"]["in_channels"]:
                raise ValueError(f"--program {name}: the sweep's points give {v.feats.shape[1]} features; {file} "
                                 f"takes {state['config']['in_channels']}")
            cached[name] = ps.SparseTensor(v.input.feats.to(feats_dtype(model, torch.float32)), v.input.coords)
            model(cached[name])  # warm-up
        e2e, net = {n: [] for n in programs}, {n: [] for n in programs}
        for order in round_orders(list(programs), rounds):
            for name in order:
                file, model, state = programs[name]
                t0 = time.perf_counter()
                predict(model, Batch.of([voxelize_sample(sample, voxel_size, -1)]))  # (voxel logits, point classes)
                t1 = time.perf_counter()
                model(cached[name])
                e2e[name].append(t1 - t0)
                net[name].append(time.perf_counter() - t1)
    lines = [f"### Trained programs on KITTI raw 000049 at {voxel_size} m: {len(sample):,} points, "
             f"{len(v.input):,} voxels, {torch.get_num_threads()} threads, medians of {rounds} "
             "interleaved rounds", "",
             "| program | file | MB | inference | trained at (m) | end to end ms (points to classes) | "
             "program alone ms | x of 100 ms |", "|---|---|---|---|---|---|---|---|"]
    for name, (file, model, state) in programs.items():
        t, n = statistics.median(e2e[name]), statistics.median(net[name])
        lines.append(f"| {name} | `{file}` | {file.stat().st_size / 1e6:.1f} | {state.get('inference', '?')} | "
                     f"{state['config']['voxel_size']} | {1e3 * t:.0f} | {1e3 * n:.0f} | {1e3 * t / TARGET_MS:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 5 (--quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--voxel-size", type=float, default=0.05)
    parser.add_argument("--quick", action="store_true", help="one round unless --rounds")
    parser.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/north_star.md)")
    parser.add_argument("--program", action="append", default=[], metavar="NAME=FILE.pt2",
                        help="also time this exported program as pointsparse predict runs it (repeatable)")
    parser.add_argument("--no-variants", action="store_true",
                        help="time only the --program rows, not the random-weight models")
    parser.add_argument("--reuse-memory", action="store_true",
                        help="pointsparse.reuse_freed_memory(True) first (process-wide: compare runs with and "
                             "without it, alternated)")
    args = parser.parse_args()
    quick_defaults(args, rounds=(5, 1))
    if args.no_variants and not args.program:
        parser.error("--no-variants leaves nothing to time without --program")
    try:
        programs = program_specs(args.program)
    except ValueError as error:
        parser.error(str(error))
    if "kitti-raw/000049" not in real_sweeps():
        print(f"north_star: {kitti_searched()} is absent; nothing measured")
        return
    torch.set_num_threads(args.threads)
    if args.reuse_memory and not ps.reuse_freed_memory(True):
        print("north_star: --reuse-memory: the C library is not glibc; nothing changed")
    tables = [] if args.no_variants else [measure(kitti_points(), args.voxel_size, args.rounds)]
    if args.program:
        tables.append(program_rows(programs, args.voxel_size, args.rounds))
    print("\n\n".join(tables))
    out = page_path(args.out, "north_star.md", args.quick)
    write_markdown(out, "North star: MinkUNet on a full KITTI sweep in <= 100 ms",
                   "python bench/north_star.py " + shlex.join(sys.argv[1:]), environment(), tables,
                   (("" if args.no_variants else
                    "Seeded random weights (MinkUNet(4, 19, cr=1.0), BatchNorm at its initial statistics): the "
                    "times are the network's, the differences only show how far each step moves the function. ")
                   + ("The programs' rows: the files' own weights and form (`pointsparse export --inference`); "
                      "their accuracy is measured where they were trained and scored, not on this unlabelled "
                      "sweep. " if args.program else "")
                   + ("" if _core.conv_bf16() else " This CPU has no AVX512-BF16 kernels (`_core.conv_bf16()` "
                      "is false): its bf16 rows run the float32 kernels on the widened inputs.")).strip())


def kitti_points() -> np.ndarray:
    """(N, 4) float32 x, y, z (shifted to start at 0, as real_sweeps) and intensity of KITTI 000049."""
    from _common import kitti_path

    raw = np.fromfile(kitti_path(), dtype=np.float32).reshape(-1, 4)
    xyz = real_sweeps()["kitti-raw/000049"]
    return np.concatenate([xyz, raw[:, 3:4]], axis=1).astype(np.float32)


if __name__ == "__main__":
    main()
