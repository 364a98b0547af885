"""The peak memory of `pointsparse eval` against the number of clouds it scores.

    python bench/eval_memory.py [--clouds 40 200] [--distinct 20] [--cr 0.5] [--out PAGE.md] [--quick]

Writes ``--distinct`` generated street scenes (64 beams x 2048 azimuth steps,
about 131k points each, labels of the generated classes) as ``.npz`` files,
links them into folders of each ``--clouds`` count, saves a MinkUNet
checkpoint of random weights (``--cr``) for those classes, and runs
``pointsparse eval`` on each folder in its own process; the page gives each
child's peak resident set size (``getrusage``'s ``ru_maxrss``) and time.
Before stop 75, eval read and kept every cloud before scoring any, so its
peak grew with the count; it now holds one at a time."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import environment, page_arg, page_path, positive_int, quick_defaults, write_markdown

from pointsparse.data import NUM_FEATURES, generated
from pointsparse.models import MinkUNet

ROOT = Path(__file__).resolve().parent.parent


def write_scenes(folder: Path, distinct: int, beams: int, steps: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for seed in range(distinct):
        scene = generated.outdoor_scene(seed=seed, beams=beams, azimuth_steps=steps)
        path = folder / f"scene{seed:03d}.npz"
        np.savez(path, xyz=scene.xyz, labels=scene.labels, intensity=scene.intensity)
        paths.append(path)
    return paths


def linked(scenes: list[Path], folder: Path, count: int) -> Path:
    """``count`` hard links to ``scenes`` (cycled) in ``folder``."""
    folder.mkdir(parents=True)
    for i in range(count):
        os.link(scenes[i % len(scenes)], folder / f"{i:06d}.npz")
    return folder


def peak_of(command: list[str]) -> tuple[float, float, str]:
    """(peak RSS MB, seconds, last line) of a child running ``command``."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter()\n"
            "run = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "elapsed = time.perf_counter() - t\n"
            "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
            "lines = (run.stdout + run.stderr).strip().splitlines()\n"
            "print(run.returncode, peak, elapsed, lines[-1] if lines else '')\n")
    # (a child of its own per run: RUSAGE_CHILDREN is the largest peak of a process's children)
    out = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, env=env,
                         check=True).stdout.split(maxsplit=3)
    if out[0] != "0":
        raise SystemExit(f"eval failed (exit {out[0]}): {out[3] if len(out) > 3 else ''}")
    return float(out[1]), float(out[2]), out[3].strip() if len(out) > 3 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clouds", type=positive_int, nargs="+", default=None,
                        help="cloud counts, one eval each (default 40 200; --quick 2 6)")
    parser.add_argument("--distinct", type=positive_int, default=None,
                        help="distinct scenes the folders link to (default 20; --quick 2)")
    parser.add_argument("--cr", type=float, default=0.5, help="the MinkUNet's channel ratio")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/eval_memory.md)")
    args = parser.parse_args()
    quick_defaults(args, clouds=([40, 200], [2, 6]), distinct=(20, 2))
    beams, steps = (16, 256) if args.quick else (64, 2048)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scenes = write_scenes(tmp / "scenes", args.distinct, beams, steps)
        torch.manual_seed(0)
        classes = list(generated.OUTDOOR_CLASSES)
        model = MinkUNet(NUM_FEATURES, len(classes), cr=args.cr)
        config = {"in_channels": NUM_FEATURES, "classes": classes, "cr": args.cr, "blocks": 2,
                  "voxel_size": 0.05, "ignore_index": 255, "model": "minkunet"}
        ckpt = tmp / "checkpoint.pt"
        torch.save({"model": model.state_dict(), "config": config}, ckpt)
        points = sum(len(np.load(p)["xyz"]) for p in scenes) / len(scenes)
        for count in args.clouds:
            folder = linked(scenes, tmp / f"clouds{count}", count)
            peak, seconds, last = peak_of([sys.executable, "-m", "pointsparse", "eval", "--checkpoint", str(ckpt),
                                           "--data", str(folder), "--no-progress", "--device", "cpu"])
            rows.append(f"| {count} | {count * points / 1e6:.1f} | {peak:.0f} | {seconds:.1f} |")
            print(rows[-1], flush=True)
    table = ("| clouds | points (millions) | peak RSS MB | seconds |\n|---|---|---|---|\n" + "\n".join(rows))
    write_markdown(page_path(args.out, "eval_memory.md", args.quick),
                   "The peak memory of pointsparse eval against the clouds it scores",
                   "python bench/eval_memory.py " + shlex.join(sys.argv[1:]), environment(), [table],
                   f"Generated street scenes of about {points:,.0f} points ({beams} beams x {steps} azimuth steps), "
                   f"{args.distinct} distinct, linked; MinkUNet cr {args.cr} of random weights at 0.05 m; one eval "
                   "process per row (its peak: getrusage's ru_maxrss of that child).")


if __name__ == "__main__":
    main()
