"""Where an exported program's time goes, operator by operator: a
``pointsparse export`` file (a ``.pt2``) run on the KITTI sweep under
``torch.profiler``, its operators' CPU time per call of the program
(``pointsparse::conv_inference``, the kernel-map builders, torch's own), and
the maps its graph builds (the builder wrapped: each map's kernel, stride,
rows, pairs, time, and its fused plan's time).

    flock /work/cpu.lock .venv/bin/python bench/program_profile.py FILE.pt2 [--voxel-size 0.05]
        [--calls 5] [--out PAGE.md] [--quick]

``--quick`` without a file: a small random-weight MinkUNet exported here
(``pointsparse export --inference fused``) on the generated street, one
profiled call, the page in a temporary folder: a smoke run of the script.

The program runs on the sweep (KITTI raw 000049, a generated street of 20k
voxels where the dataset is absent or with ``--quick``) voxelized at
``--voxel-size`` (default 0.05 m: the north star's, whatever the file was
trained at), three calls to warm up, then ``--calls`` profiled calls (their
sum divided by the calls) and one more call with the map builders wrapped.
``bench/north_star.py --program`` times the same files end to end; this
says where a call's time goes. Times are wall or CPU times of one process on
this machine, as noisy as any: a breakdown, not a benchmark to compare
across runs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from _common import (environment, kitti_path, kitti_searched, page_arg, page_path, positive_int, quick_defaults,
                     street_points, write_markdown)

import pointsparse as ps  # noqa: E402  (after _common puts the repo on the path)
from pointsparse import kmap as _kmap  # noqa: E402
from pointsparse.nn import _engine  # noqa: E402


def sweep_input(model, voxel_size: float, quick: bool) -> tuple[ps.SparseTensor, str]:
    """The program's input: the sweep voxelized as ``predict`` voxelizes it
    (a generated street with ``quick``, and where the sweep is absent: said
    on stdout too, not on the page alone)."""
    from pointsparse.app.scoring import feats_dtype
    from pointsparse.data.readers import read_cloud
    from pointsparse.data.transforms import voxelize_sample

    from pointsparse.data.sample import Sample

    path = None if quick else kitti_path()
    if path is None:
        points = street_points(20_000, voxel_size)
        sample = Sample(xyz=points[:, :3].astype("float32"), labels=None,  # (no intensity made: a middle one)
                        intensity=np.full((len(points), 1), 0.5, dtype=np.float32), name="a generated street")
        name = "a generated street of 20k voxels"
        if not quick:
            print(f"program_profile: {kitti_searched()} is absent; profiling {name} instead")
    else:
        sample, name = read_cloud(path, None, -1), "KITTI raw 000049"
    v = voxelize_sample(sample, voxel_size, -1)
    return ps.SparseTensor(v.input.feats.to(feats_dtype(model, torch.float32)), v.input.coords), name


def operator_table(model, x, calls: int) -> str:
    """The operators' CPU time per program call (self time, and calls)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            model(x)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / calls / 1e3
    lines = [f"### Operators, CPU self time a program call ({calls} calls profiled; {total:.1f} ms in all)", "",
             "| operator | ms a call | share | calls a call |", "|---|---|---|---|"]
    shown = 0.0
    for e in rows[:15]:
        ms = e.self_cpu_time_total / calls / 1e3
        shown += ms
        lines.append(f"| `{e.key}` | {ms:.2f} | {100 * ms / total:.1f}% | {e.count / calls:g} |")
    lines.append(f"| (the rest) | {total - shown:.2f} | {100 * (total - shown) / total:.1f}% | |")
    return "\n".join(lines)


def map_table(model, x) -> str:
    """One call with the map and plan builders wrapped: each map and plan."""
    build, plan = _kmap._build, _engine.make_fused_plan
    log = []

    def timed_build(coords, k, t, d, ts, method, out_coords, trusted=False):
        t0 = time.perf_counter()
        m = build(coords, k, t, d, ts, method, out_coords, trusted=trusted)
        log.append(["map", len(coords), k, t, ts, m.num_pairs, time.perf_counter() - t0])
        return m

    def timed_plan(kmap):
        t0 = time.perf_counter()
        p = plan(kmap)
        log.append(["plan", kmap.num_in, kmap.key.kernel_size, kmap.key.stride, kmap.key.tensor_stride,
                    kmap.num_pairs, time.perf_counter() - t0])
        return p

    _kmap._build, _engine.make_fused_plan = timed_build, timed_plan
    try:
        with torch.no_grad():
            model(x)
    finally:
        _kmap._build, _engine.make_fused_plan = build, plan
    lines = ["### The maps one call builds, in order (wall ms)", "",
             "| built | rows in | kernel | stride | tensor stride | pairs | ms |", "|---|---|---|---|---|---|---|"]
    sums = defaultdict(float)
    for what, rows, k, t, ts, pairs, s in log:
        lines.append(f"| {what} | {rows:,} | {k} | {t} | {ts} | {pairs:,} | {1e3 * s:.2f} |")
        kind = "plans" if what == "plan" else ("k3 maps" if k == (3, 3, 3) else "1x1x1 maps" if k == (1, 1, 1)
                                                else "other maps")
        sums[kind] += 1e3 * s
    lines += ["", "Sums: " + ", ".join(f"{k} {v:.1f} ms" for k, v in sums.items()) + "."]
    return "\n".join(lines)


def small_program(folder: Path, voxel_size: float = 0.05) -> Path:
    """``--quick``'s program: a MinkUNet at cr 0.25 with one block a stage,
    random weights, exported as ``pointsparse export --inference fused``
    exports a checkpoint (its input the seven point features voxelize_sample
    makes; ``voxel_size``: the one its config says it was trained at)."""
    from pointsparse.app.cli import main as cli_main
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    model = MinkUNet(7, 4, cr=0.25, blocks=1).eval()
    checkpoint = folder / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": {
        "in_channels": 7, "classes": ["a", "b", "c", "d"], "cr": 0.25, "blocks": 1, "voxel_size": voxel_size,
        "ignore_index": 255, "model": "minkunet"}}, checkpoint)
    program = folder / "small.pt2"
    if cli_main(["export", "--checkpoint", str(checkpoint), "--out", str(program), "--inference", "fused"]) != 0:
        raise RuntimeError("pointsparse export of the small MinkUNet failed")
    return program


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("program", type=Path, nargs="?", default=None,
                        help="a .pt2 file of `pointsparse export` (--quick without one: a small one made here)")
    parser.add_argument("--voxel-size", type=float, default=0.05)
    parser.add_argument("--calls", type=positive_int, default=None, help="default 5 (--quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None)
    args = parser.parse_args()
    quick_defaults(args, calls=(5, 1))
    if args.program is None and not args.quick:
        parser.error("program: the .pt2 file to profile is needed (only --quick makes a small one)")
    if args.program is not None and not args.program.is_file():
        parser.error(f"program: {args.program} does not exist")
    if not args.voxel_size > 0:
        parser.error(f"--voxel-size must be a positive number of metres; got {args.voxel_size}")
    torch.set_num_threads(args.threads)
    from pointsparse.app.evaluate import program_and_state

    with tempfile.TemporaryDirectory() as tmp:
        program = args.program if args.program is not None else small_program(Path(tmp))
        model, _state = program_and_state(program)
        x, name = sweep_input(model, args.voxel_size, args.quick)
        with torch.no_grad():
            for _ in range(3):
                model(x)
        what = f"`{args.program}`" if args.program is not None else "a small random-weight MinkUNet (--quick)"
        tables = [f"{name} at {args.voxel_size} m: {len(x):,} voxels, {args.threads} threads, program {what}",
                  operator_table(model, x, args.calls), map_table(model, x)]
    page = page_path(args.out, "program_profile.md", args.quick)
    write_markdown(page, "Where an exported program's time goes",
                   "python bench/program_profile.py " + shlex.join(sys.argv[1:]), environment(), tables)
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
