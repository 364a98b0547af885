"""Train a small MinkUNet on generated LiDAR street scenes for a few minutes,
score it on held-out scenes, and show where the report and pictures are.

The job is ``pointsparse train`` with settings sized for a 2-core machine:
24 generated 64-beam scans (35 m range, 0.2 m voxels), MinkUNet at cr=0.5,
batch 2, one torch thread, AdamW with a cosine schedule over a fixed
``--epochs`` (default 27: about three minutes of training on a quiet
2-core AMD EPYC Zen 4), the loss weighted by 1/sqrt(class share); then the
per-class IoU table and mIoU on 4 held-out scenes, ``DIR/metrics.json`` and
the PNGs. The plan depends on nothing measured, so a seed gives the same
mIoU on every run, however loaded the machine. ``--minutes M`` instead fits
the number of epochs to M minutes of training from the measured speed (the
result then varies with the machine's load); ``--steps N`` makes it a quick
check of N steps."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from . import counted, metrics, train

#: The demo's fixed plan: epochs of 12 steps (about 3 minutes of training on a
#: quiet 2-core Zen 4 at one thread), and the most ``--minutes`` may plan.
EPOCHS = 27
MAX_EPOCHS = 200


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {EPOCHS}; with --minutes, the most it may plan, "
                             f"default {MAX_EPOCHS})")
    parser.add_argument("--minutes", type=float, default=None,
                        help="fit the number of epochs to this much training time instead, from the measured "
                             "speed (the mIoU then varies with the machine's load; default: the fixed --epochs)")
    parser.add_argument("--cr", type=float, default=0.5, help="MinkUNet width multiplier (default 0.5)")
    parser.add_argument("--voxel-size", type=float, default=0.2, help="voxel edge in metres (default 0.2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the generated training scenes, the weights, shuffling and augmentation "
                             "(default 0; the held-out scenes are the same for every seed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: steady on a shared machine, where a second OpenMP "
                             "thread competing for a busy core can make each step ten times slower)")
    parser.add_argument("--steps", type=int, default=None,
                        help="a quick check instead: exactly this many steps on 2 scenes (no time budget)")
    parser.add_argument("--points", type=int, default=None,
                        help="about this many LiDAR returns per generated scene (default: a full 64 x 1024 scan)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


#: The generated scans' most azimuth steps (data.generated's limit), which --points is turned into.
MAX_AZIMUTH_STEPS = 65536


def training_arguments(args) -> argparse.Namespace:
    """The ``pointsparse train`` arguments the demo runs."""
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    for name in ("steps", "points", "epochs"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}")
    minutes = getattr(args, "minutes", None)
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise ValueError(f"--minutes must be a finite number > 0; got {minutes}")
    argv = ["--data", "generated", "--max-range", "35", "--cr", str(args.cr), "--voxel-size", str(args.voxel_size),
            "--batch-size", "2", "--lr", "4e-3", "--class-weights", "sqrt-inverse", "--seed", str(args.seed),
            "--out", str(args.out), "--threads", str(getattr(args, "threads", 1))]
    minutes, epochs = getattr(args, "minutes", None), getattr(args, "epochs", None)
    if getattr(args, "steps", None) and (minutes is not None or epochs is not None):
        given = " and ".join(f for f, v in (("--epochs", epochs), ("--minutes", minutes)) if v is not None)
        raise ValueError(f"{given}: --steps runs a quick check of exactly {args.steps} steps on 2 scenes instead of "
                         "the full plan they size; give one or the other")
    if getattr(args, "steps", None):
        argv += ["--scenes", "2", "--val-scenes", "1", "--epochs", str(args.steps), "--eval-every", str(args.steps)]
    elif minutes is not None:  # opt-in: as many epochs as fit, re-planned from the measured epoch time
        argv += ["--scenes", "24", "--val-scenes", "4", "--epochs", str(epochs or MAX_EPOCHS), "--eval-every", "2",
                 "--time-budget", str(minutes), "--time-limit", str(1.5 * minutes)]
    else:  # the default: a fixed plan, the same result for a seed on any machine load
        argv += ["--scenes", "24", "--val-scenes", "4", "--epochs", str(epochs or EPOCHS), "--eval-every", "2"]
    if getattr(args, "points", None):
        # About 90% of the rays of a 35 m street scan return.
        steps = max(16, round(args.points / 64 / 0.9))
        if steps > MAX_AZIMUTH_STEPS:
            raise ValueError(f"--points must be at most {int(MAX_AZIMUTH_STEPS * 64 * 0.9):,} (a scan of 64 beams and "
                             f"{MAX_AZIMUTH_STEPS} azimuth steps); got {args.points}")
        argv += ["--azimuth-steps", str(steps)]
    if args.no_progress:
        argv.append("--no-progress")
    parsed = parser.parse_args(argv)
    train.check_args(parsed)
    return parsed


def main(args) -> int:
    t0 = time.perf_counter()
    report = train.train(training_arguments(args))
    out = Path(args.out)
    print(f"\nheld-out generated scenes: mIoU {metrics.percent(report['miou'])} after {counted(report['epochs'], 'epoch')} "
          f"({counted(report['steps'], 'step')}, {report['step_time_s_median']:.2f} s per step of 2 scans); "
          f"{(time.perf_counter() - t0) / 60:.1f} min in all")
    print(f"report:   {out / 'metrics.json'}")
    for name, path in report["pictures"].items():
        print(f"{name + ':':<9} {train.shown_in(path, out)}")
    print(f"model:    {out / 'checkpoint.pt'}  (pointsparse eval --checkpoint {out / 'checkpoint.pt'})")
    return 0
