"""Python's cyclic collector inside a model's calls: an exported program run
sweep after sweep as ``pointsparse predict`` runs it, with what the process
loaded left in the collector's passes (Python's default) and frozen out of
them (``app.scoring.loaded_frozen``, which predict and eval now use).

    flock /work/cpu.lock .venv/bin/python bench/collector_stalls.py [--program FILE.pt2] [--calls 160]
        [--threads 2] [--quick]

Each setting in a child process of its own (the collector's state is the
process's), the settings alternated ``--runs`` times. Each call: the cloud
voxelised at the program's voxel size (or 0.05 m without ``--program``), the
program, every point's class (``scoring.predict``); ``--voxel-size``
another voxel than the program's (the north star's trained files run at
0.05 m). After ``WARMUP`` calls,
the table gives the full (generation 2) collections seen and their times
(``gc.callbacks``), and the calls' median, 95th percentile and maximum.
Without ``--program``: a random-weight MinkUNet(4, 19, cr=0.5) exported on
the KITTI sweep (a generated street where the dataset is absent). The sweep:
KITTI raw 000049, or a generated street of 20k voxels (``--quick``: that,
40 calls and one run unless given, the page in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import (environment, kitti_path, page_arg, page_path, positive_int, quick_defaults, street_points,
                     write_markdown)

#: Calls before the counting starts (maps, plans and the collector's first passes after loading).
WARMUP = 10

_CHILD = r"""
import gc, json, statistics, sys, time
import contextlib
import numpy as np
import torch
import pointsparse as ps
from pointsparse import export
from pointsparse.app.evaluate import program_and_state
from pointsparse.app.scoring import loaded_frozen, predict
from pointsparse.data import Batch, VoxelSample
from pointsparse.data.readers import read_cloud
from pointsparse.data.transforms import voxelize_sample

setting, program, cloud, calls, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
voxel = float(sys.argv[6])
torch.set_num_threads(threads)
model, state = program_and_state(program)
sample = read_cloud(cloud, None, -1)
voxel = voxel if voxel > 0 else state["config"]["voxel_size"]
log, start = [], {}

def watch(phase, info):
    if phase == "start":
        start["t"] = time.perf_counter()
    elif info["generation"] == 2:
        log.append(time.perf_counter() - start["t"])

times = []
with torch.no_grad(), (loaded_frozen() if setting == "frozen" else contextlib.nullcontext()):
    for i in range(calls):
        if i == {warmup}:
            gc.callbacks.append(watch)
        t0 = time.perf_counter()
        predict(model, Batch.of([voxelize_sample(sample, voxel, -1)]))
        times.append(time.perf_counter() - t0)
gc.callbacks.remove(watch)
times = sorted(times[{warmup}:])
print(json.dumps({"full": log, "median": statistics.median(times), "p95": times[int(0.95 * (len(times) - 1))],
                  "max": times[-1], "calls": len(times)}))
""".replace("{warmup}", str(WARMUP))


def default_program(folder: Path, cloud: Path, quick: bool) -> Path:
    """A random-weight MinkUNet exported on ``cloud`` (its point features), written into ``folder``."""
    import torch

    from pointsparse import export
    from pointsparse.data.readers import read_cloud
    from pointsparse.data.transforms import voxelize_sample
    from pointsparse.models import MinkUNet

    torch.manual_seed(0)
    v = voxelize_sample(read_cloud(cloud, None, -1), 0.05, -1)
    model = MinkUNet(v.feats.shape[1], 19, cr=0.25 if quick else 0.5).eval()
    path = folder / "model.pt2"
    with torch.no_grad():
        program = export.export_model(model, v.input)
    export.save(program, path, {"voxel_size": 0.05, "in_channels": int(v.feats.shape[1]),
                                "classes": [f"class{i}" for i in range(19)]})
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--program", default=None, metavar="FILE.pt2", help="a program pointsparse export wrote")
    parser.add_argument("--calls", type=positive_int, default=None, help=f"default 160 (--quick: {4 * WARMUP})")
    parser.add_argument("--runs", type=positive_int, default=None,
                        help="times each setting runs, alternated (default 2; --quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--voxel-size", type=float, default=0.0,
                        help="voxelise at this size (default: the program's; north_star.py runs the trained files "
                             "at 0.05 m)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None)
    args = parser.parse_args()
    quick_defaults(args, calls=(160, 4 * WARMUP), runs=(2, 1))
    if args.calls <= WARMUP:
        parser.error(f"--calls must be more than the {WARMUP} warm-up calls")
    with tempfile.TemporaryDirectory() as tmp:
        kitti = None if args.quick else kitti_path()
        if kitti is None:
            import numpy as np

            cloud = Path(tmp) / "street.npy"
            xyz = street_points(20_000)
            np.save(cloud, np.concatenate([xyz, np.zeros((len(xyz), 1))], 1).astype(np.float32))
            name = "a generated street of 20k voxels"
        else:
            cloud, name = kitti, "KITTI raw 000049"
        program = Path(args.program) if args.program else default_program(Path(tmp), cloud, args.quick)
        rows = []
        for run in range(args.runs):
            for setting in ("default", "frozen"):
                out = subprocess.run([sys.executable, "-c", _CHILD, setting, str(program), str(cloud),
                                      str(args.calls), str(args.threads), str(args.voxel_size)], capture_output=True, text=True,
                                     cwd=Path(__file__).resolve().parents[1])
                if out.returncode:
                    sys.exit(f"collector_stalls: the {setting} child failed:\n{out.stderr[-3000:]}")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                full = ", ".join(f"{1e3 * t:.0f}" for t in r["full"]) or "-"
                rows.append(f"| {run + 1} | {setting} | {r['calls']} | {len(r['full'])} | {full} | "
                            f"{1e3 * r['median']:.1f} | {1e3 * r['p95']:.1f} | {1e3 * r['max']:.1f} |")
                print(rows[-1], flush=True)
    table = [f"### {'the program ' + str(program) if args.program else 'a random-weight MinkUNet program'} on "
             f"{name}, {args.threads} threads, calls after the first {WARMUP}", "",
             "| run | collector | calls | full collections | their ms | median ms | p95 ms | max ms |",
             "|---|---|---|---|---|---|---|---|", *rows]
    page = page_path(args.out, "collector_stalls.md", args.quick)
    write_markdown(page, "Full collections inside a model's calls",
                   "python bench/collector_stalls.py " + shlex.join(sys.argv[1:]), environment(), ["\n".join(table)])
    print(page)


if __name__ == "__main__":
    main()
