"""Train a sparse U-Net for point cloud semantic segmentation and report its mIoU.

``pointsparse train --data generated|PATH... --out DIR`` trains a MinkUNet
(generated LiDAR street scenes by default, or SemanticKITTI, .npy/.npz,
LAS/LAZ, PLY/PCD, S3DIS text), validates after every epoch, checkpoints
atomically to ``DIR/checkpoint.pt`` (``--resume`` continues exactly), and
writes ``DIR/metrics.json`` and PNGs (curves, confusion matrix, top-down
render). ``--nproc N`` (or ``torchrun --nproc_per_node N -m
pointsparse.app.train``) trains with DistributedDataParallel: gloo on the CPU,
nccl on GPUs, a DistributedSampler, synchronised batch norm, each process
scoring its shard of the validation clouds, logging and checkpoints on rank
0. ``pointsparse eval`` (:mod:`pointsparse.app.evaluate`) scores a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..data import DEFAULT_IGNORE, NUM_FEATURES, VALIDATION_SEED, Batch, CloudFiles, VoxelDataset, open_source
from ..data.datasets import is_generated
from ..data.transforms import check_voxel_extent
from ..data.generated import MAX_AZIMUTH_STEPS, MAX_BEAMS, MAX_RANGE, MAX_RAYS
from ..models import SyncBatchNorm, build_model, model_from_state
from ..models.loading import negative_variance_entry, non_finite_entry, shape_like
from ..nn import BatchStatisticsError
from . import counted, metrics
from .cli import TRACEBACK_ENV, CommandParser, given_flags
from .clouds import (FittedClouds, TrainedFeatures, held_features, nonfinite_hold, refuse_file_flags,
                     skips_nonfinite, warn_coarse_positions)
from .distributed import (Dist, destroy, finish_process, free_port, init_distributed, launch_environment,
                          worker_environment)
from .scoring import (EVAL_PREFIX, REPORT_FILES, evaluate, logits_of, refuse_together, remove_files,
                      scored_checkpoint, shard, write_report)
from .trainer import TrainingDiverged, Trainer, check_finite_loss, check_finite_weights, have_tqdm, progress_bar

__all__ = ["TrainingDiverged", "add_arguments", "add_data_arguments", "check_args", "main", "train"]

MODELS = ("minkunet", "spvcnn")
SCHEDULES = ("cosine", "onecycle", "step", "constant")
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
#: The files a run writes in its --out folder, and what each holds.
OUTPUTS = {CHECKPOINT: "checkpoint", BEST: "best epoch's checkpoint", **REPORT_FILES}
#: The files of a run in a folder that a new run there removes before its first checkpoint replaces the run's
#: checkpoint.pt (:func:`remove_previous`): the run's own but that, and the report ``eval --out`` wrote of it.
PREVIOUS_RUN = (*(name for name in OUTPUTS if name != CHECKPOINT), *(EVAL_PREFIX + name for name in REPORT_FILES))
#: The settings besides the model and the optimizer that shape a run's trajectory: its config records them
#: (``training``) and ``--resume`` takes them, as it takes the optimizer's, so that the resumed epochs are the
#: run's own. What may change on resume: how long it runs (--epochs, --time-limit, --time-budget), how often it
#: validates (--eval-every), where and how fast it runs (--device, --threads, --nproc, --no-progress), and
#: the data it is pointed at (--data, --val-data and their flags: files move; the classes must be the run's).
RUN_SETTINGS = ("schedule", "warmup", "batch_size", "class_weights", "no_augment", "seed")
#: The most classes the raw labels make without --label-map (labels 0 .. 1023): more than any label set
#: (SemanticKITTI's raw ids end at 259, LAS codes at 255); a stray larger label asked for a class per id below it.
MAX_RAW_CLASSES = 1024

# --------------------------------------------------------------------- arguments

def add_data_arguments(parser, ignore_default: int | None = DEFAULT_IGNORE, run_defaults: bool = False) -> None:
    """The data flags shared by train and eval (:mod:`.evaluate`); ``ignore_default=None`` (eval)
    means the checkpoint's ignore index, else ``DEFAULT_IGNORE``; ``run_defaults`` (eval): the help of
    --data and --label-map gives their defaults there, the run's data and label map."""
    clouds = ("point cloud files/folders/globs: SemanticKITTI sequence folders or velodyne/*.bin, .npy/.npz, "
              ".las/.laz, .ply/.pcd, S3DIS .txt or room folders")
    maps = "semantic-kitti-learning, ign-lidarhd, ahn3, s3dis, semantic3d"
    if run_defaults:
        data_help = (f"{clouds}, or 'generated' / 'generated-indoor' scenes (default: the files the run validated "
                     "on, else the run's data)")
        map_help = (f"raw class id -> training id map of the --data files: a JSON file or a name in datasets/ "
                    f"(semantic-kitti, {maps}; default: the run's (its --val-label-map, but for files of its "
                    "training clouds' format when the validation clouds' takes another default map the map the "
                    "run trained through; else its --label-map, else "
                    "the default map its clouds took, where --data's format takes it too: other formats are "
                    "refused), else semantic-kitti for .bin, semantic3d or s3dis for .txt)")
    else:
        data_help = f"'generated' (LiDAR street scenes, the default), 'generated-indoor', or {clouds}"
        map_help = (f"raw class id -> training id map: a JSON file or a name in datasets/ (semantic-kitti "
                    f"[default for .bin], {maps})")
    parser.add_argument("--data", nargs="+", default=["generated"], metavar="SOURCE", help=data_help)
    parser.add_argument("--label-map", default=None, metavar="NAME|JSON", help=map_help)
    default_text = (f"{DEFAULT_IGNORE}" if ignore_default is not None
                    else f"the checkpoint's, else {DEFAULT_IGNORE}")
    # (eval, run_defaults: one process scoring, no loss)
    parser.add_argument("--ignore-index", type=int, default=ignore_default,
                        help=f"label that is not scored (default {default_text})" if run_defaults else
                        f"label that counts nowhere, in loss or metrics (default {default_text})")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="scans per forward pass (default 2)" if run_defaults else
                        "scans per step, over all processes (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's default)" if run_defaults else
                        "torch threads per process (default: torch's default divided among processes)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def add_arguments(parser) -> None:
    add_data_arguments(parser)
    parser.add_argument("--val-data", nargs="+", default=None, metavar="SOURCE",
                        help="validation clouds (default: held-out generated scenes, or the last --val-fraction "
                             "of the --data files)")
    parser.add_argument("--val-label-map", default=None, metavar="NAME|JSON",
                        help="label map of --val-data when it differs from --label-map (same class names)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the --data files held out when --val-data is not given (default 0.2)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="train and validate on the finite points of clouds some of whose positions are NaN "
                             "or inf (organised clouds: points without a return), the others left out as eval "
                             "--skip-nonfinite leaves them; without it such a cloud is refused")
    parser.add_argument("--scenes", type=int, default=24, help="generated training scenes (default 24)")
    parser.add_argument("--val-scenes", type=int, default=4, help="generated validation scenes (default 4)")
    parser.add_argument("--max-range", type=float, default=50.0, help="generated scenes: LiDAR range in m (default 50)")
    parser.add_argument("--beams", type=int, default=64, help="generated scenes: LiDAR beams (default 64)")
    parser.add_argument("--azimuth-steps", type=int, default=1024,
                        help="generated scenes: returns per beam and turn (default 1024)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for checkpoints, metrics.json and PNGs")
    parser.add_argument("--model", choices=MODELS, default="minkunet",
                        help="minkunet (voxel U-Net, the default) or spvcnn (with a point branch; per-point logits)")
    parser.add_argument("--cr", type=float, default=0.5, help="MinkUNet width multiplier (default 0.5)")
    parser.add_argument("--blocks", type=int, default=2, help="residual blocks per stage (default 2)")
    parser.add_argument("--voxel-size", type=float, default=0.1, help="voxel edge in metres (default 0.1)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="default adamw")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="default 1e-4")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                        help="learning-rate schedule over all steps: cosine (with --warmup), onecycle, step "
                             "(x0.1 at 60%% and 85%%), constant (default cosine)")
    parser.add_argument("--warmup", type=float, default=0.05, help="--schedule cosine: warm-up share of the steps (default 0.05)")
    parser.add_argument("--class-weights", choices=("none", "sqrt-inverse"), default="none",
                        help="loss weight per class: none, or 1/sqrt(share of the training points), mean 1 over "
                             "the classes present (default none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation (default 0)")
    parser.add_argument("--no-augment", action="store_true", help="no rotation/scaling/flip/jitter")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue a run (default: DIR/checkpoint.pt) with its model, optimizer, ignore index, "
                             "schedule, batch size, class weights, augmentation and seed (another value typed is "
                             "refused) and, left out, its --epochs and data; --epochs, --time-limit, "
                             "--time-budget, --eval-every, the device and process flags and the data (same "
                             "classes) may change")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT",
                        help="start from a checkpoint's weights (fine-tuning): the run builds its architecture "
                             "(its --model, --cr and --blocks where not typed, a channel-pruned checkpoint's "
                             "widths, its VoxelSkip / VoxelPrune layers); classifier rows are matched by class "
                             "name, other layers by name and shape; a pruned checkpoint's masks come too (its "
                             "pruned weights stay zero)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop after the epoch during which this much training time has passed (the run's "
                             "in all: a resumed run counts its epochs before the resume)")
    parser.add_argument("--eval-every", type=int, default=1, metavar="N",
                        help="validate every N epochs and after the last (default 1)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="fit the number of epochs (at most --epochs) to this much training time, "
                             "re-planned after every epoch from the mean epoch time; the learning-rate schedule "
                             "follows the planned count; --resume takes the run's unless --time-budget or --epochs "
                             "is typed")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes on this machine (DistributedDataParallel; default 1)")


def max_threads() -> int:
    """The most --threads a command takes: four per core this machine has
    (at least 64); far more only starts threads that wait on each other,
    and a count in the tens of thousands crashed the OpenMP runtime."""
    return max(64, 4 * (os.cpu_count() or 1))


def check_threads(value, flag: str = "--threads") -> None:
    if value is not None and not 1 <= value <= max_threads():
        raise ValueError(f"{flag} must be in [1, {max_threads()}] (four per core of this machine's "
                         f"{os.cpu_count()}, at least 64); got {value}")


def check_args(args) -> None:
    for name in ("epochs", "batch_size", "nproc", "scenes", "val_scenes", "blocks", "eval_every", "beams",
                 "azimuth_steps", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
        if value is not None and value >= 2**63:  # (else a generator's or torch's error without the flag)
            raise ValueError(f"--{name.replace('_', '-')} must be in [1, 2**63); got {value}")
    check_threads(getattr(args, "threads", None))
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32); got {seed}")
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc > max(2, os.cpu_count() or 1):
        raise ValueError(f"--nproc must be at most this machine's {os.cpu_count()} cores (one process each); got "
                         f"{nproc}")
    for name in ("voxel_size", "lr", "cr", "max_range", "time_budget"):
        value = getattr(args, name, None)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 and finite; got {value}")
    for name in ("weight_decay", "time_limit"):  # --time-limit 0: stop after the first epoch
        value = getattr(args, name, None)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0 and finite; got {value}")
    value = getattr(args, "max_range", None)
    if value is not None and value > MAX_RANGE:
        raise ValueError(f"--max-range must be <= {MAX_RANGE:g} m; got {value}")
    for name, top in (("beams", MAX_BEAMS), ("azimuth_steps", MAX_AZIMUTH_STEPS)):
        value = getattr(args, name, None)
        if value is not None and value > top:
            raise ValueError(f"--{name.replace('_', '-')} must be <= {top}; got {value}")
    beams, steps = getattr(args, "beams", None), getattr(args, "azimuth_steps", None)
    if beams is not None and steps is not None and beams * steps > MAX_RAYS:  # (as the scenes would refuse it)
        raise ValueError(f"--beams x --azimuth-steps = {beams} x {steps} = {beams * steps:,} rays; a scan may have at "
                         f"most {MAX_RAYS:,} (e.g. --beams 64 --azimuth-steps {MAX_AZIMUTH_STEPS})")
    value = getattr(args, "val_fraction", None)
    if value is not None and not 0 < value < 1:
        raise ValueError(f"--val-fraction must be in (0, 1); got {value}")
    value = getattr(args, "warmup", None)
    if value is not None and not 0 <= value <= 1:
        raise ValueError(f"--warmup must be a share of the steps in [0, 1]; got {value}")
    value = getattr(args, "ignore_index", None)
    if value is not None and not -(1 << 31) <= value < (1 << 31):
        raise ValueError(f"--ignore-index must fit in int32 (a label value, 255 by default); got {value}")
    data = getattr(args, "data", None)
    if data and is_generated(data) and not getattr(args, "val_data", None):  # --val-data files take the maps
        refuse_file_flags(data, {"--label-map": getattr(args, "label_map", None) is not None,
                                 "--val-label-map": getattr(args, "val_label_map", None) is not None})
    # (a resumed run's batch size is its own where none is typed: take_run_flags set it before this check)
    if getattr(args, "nproc", 1) > 1 and args.batch_size % args.nproc:
        raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of --nproc ({args.nproc})")
    world = _torchrun_world()
    if hasattr(args, "nproc") and world > 1 and args.batch_size % world:
        raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of the {world} processes torchrun "
                         "started")


def _torchrun_world() -> int:
    """The processes torchrun started this one among (``WORLD_SIZE``; 1 outside torchrun;
    :func:`.distributed.launch_environment` checks it)."""
    return launch_environment()[1]


#: The flags only generated scenes read (of every kind), and those of the outdoor scenes' LiDAR alone.
SCENE_FLAGS = ("scenes", "val_scenes", "max_range", "beams", "azimuth_steps")
SENSOR_FLAGS = ("max_range", "beams", "azimuth_steps")


def _given(args, *names: str) -> list[str]:
    """``--flag value`` of each of ``names`` typed on the command line
    (:func:`.cli.given_flags`)."""
    return given_flags(args, add_arguments, *names)


def _they(flags: list) -> str:
    return "it" if len(flags) == 1 else "they"


def _them(flags: list) -> str:
    return "it" if len(flags) == 1 else "them"


#: The flags that say what a run reads: ``--resume`` takes the run's for those left out (:func:`take_run_flags`).
RUN_DATA_FLAGS = ("data", "label_map", "val_data", "val_label_map", "val_fraction", "skip_nonfinite", *SCENE_FLAGS)


def take_run_flags(args) -> None:
    """With ``--resume``: each of :data:`RUN_DATA_FLAGS` not typed set to the
    run's (the flags its checkpoint keeps, files as absolute paths), and each
    of :data:`RUN_SETTINGS` not typed to the run's training settings
    (:func:`recorded_training`), before anything is checked or read; the
    run's ``--threads`` where neither it nor ``--nproc`` is typed and the
    run had as many processes. For the
    data, the defaults took their place: a run of files resumed without its
    ``--data`` trained its later epochs on the generated scenes and
    validated there; typed, they are taken as given (files move; the classes
    are checked against the run's). The settings are the job's to take (it
    refuses another value typed); taken here too, the command's checks read
    them (the run's batch size against --nproc, --warmup against the run's
    schedule) before any --nproc worker starts, where each worker refused
    them inside torch's spawn."""
    if args.resume is None or args.init is not None:  # (--init beside --resume: check_unread_flags refuses it)
        return
    path = Path(args.out) / CHECKPOINT if args.resume == "auto" else Path(args.resume)
    if not path.is_file():  # (the job says so, naming it)
        return
    state = load_checkpoint(path)
    args._resumed = (path, state)  # (the job restores this one: read once; --nproc workers, given no _ names, read it)
    saved = state.get("args")
    if isinstance(saved, dict):  # (a checkpoint written before it kept them: the values given, as before)
        from .clouds import check_run_map_file

        for name in RUN_DATA_FLAGS:
            if name in saved and not _given(args, name):
                setattr(args, name, saved[name])
                if name in ("label_map", "val_label_map"):
                    check_run_map_file(state, saved[name], f"--resume {path}", "--" + name.replace("_", "-"))
    for name, value in recorded_training(state["config"], path, saved).items():
        if not _given(args, name):
            setattr(args, name, value)
    # (the run's length too: the default 10 took the place of a run's --epochs, and a run resumed after a kill
    # trained on past its end with its schedule stretched; typed, --epochs extends it. Only where the command
    # line records what was typed: a namespace made by hand, as prune --finetune-epochs makes, sets its epochs)
    # (its threads too, where it ran as many processes and this machine takes them: torch's own CPU ops sum in
    # an order that follows the thread count, so a run of --threads 1 resumed on the default threads went on
    # other bits than the run left alone; typed, --threads is taken as given)
    threads = saved.get("threads") if isinstance(saved, dict) else None
    if (isinstance(threads, int) and not isinstance(threads, bool) and 1 <= threads <= max_threads()
            and not _given(args, "threads", "nproc")
            and saved.get("nproc", 1) == (_torchrun_world() if _torchrun_world() > 1 else args.nproc)):
        args.threads = threads
    epochs = saved.get("epochs") if isinstance(saved, dict) else None
    typed = getattr(args, "_typed", None)
    if epochs is not None and typed is not None and "epochs" not in typed:
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"--resume {path}: the run's --epochs is no epoch count; got {epochs!r:.100}: give "
                             "--epochs")
        args.epochs = epochs
    # (and its --time-budget: resumed without it, a run planned at 5 epochs of its budget trained to its --epochs,
    # 20, its cosine schedule laid over those; typed, another budget re-plans it)
    budget = saved.get("time_budget") if isinstance(saved, dict) else None
    if budget is not None and typed is not None and "time_budget" not in typed and "epochs" not in typed:
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise ValueError(f"--resume {path}: the run's --time-budget is no number of minutes; got "
                             f"{budget!r:.100}: give --time-budget")
        args.time_budget = float(budget)


def check_unread_flags(args) -> None:
    """ValueError naming a flag that the run would leave unread: a data flag
    the chosen data does not take (the generated scenes' flags with --data
    files, the LiDAR's with the indoor scenes, --val-scenes and
    --val-fraction where --val-data or the generated scenes validate,
    --val-label-map without --val-data), --warmup with a schedule other than
    cosine, --init with --resume, --nproc under torchrun."""
    if args.nproc > 1 and _torchrun_world() > 1:
        raise ValueError(f"--nproc {args.nproc}: torchrun started this process as one of its {_torchrun_world()} "
                         "(--nproc_per_node), so it would be ignored: drop it")
    warmup = _given(args, "warmup")
    if warmup and args.schedule != "cosine":
        raise ValueError(f"{warmup[0]} is the warm-up of --schedule cosine; --schedule {args.schedule} has none "
                         "(onecycle warms up over its first 30%), so it would be ignored: drop it")
    if args.resume is not None and args.init is not None:
        raise ValueError(f"--init {args.init}: --resume continues its run's weights, so it would be ignored: drop "
                         "one or the other")
    data, val_data = args.data, args.val_data
    if val_data is not None and is_generated(val_data):
        held = ("--val-scenes N held-out scenes of its kind validate it when --val-data is not given"
                if is_generated(data) else "give --val-data files labelled as --data is")
        raise ValueError(f"--val-data {val_data[0]}: generated scenes are no validation files (they would be "
                         f"scenes from seed 0 on, the training scenes' own); {held}")
    if not is_generated(data):
        flags = _given(args, *SCENE_FLAGS)
        if flags:
            raise ValueError(f"{', '.join(flags)}: the generated scenes' settings; --data {data[0]}... is point "
                             f"cloud files, so {_they(flags)} would be ignored: drop {_them(flags)}, or give --data "
                             "generated")
    elif data[0] == "generated-indoor":
        flags = _given(args, *SENSOR_FLAGS)
        if flags:
            raise ValueError(f"{', '.join(flags)}: the LiDAR of the generated street scenes (--data generated); "
                             f"the indoor scenes (generated-indoor) are sampled without one, so {_they(flags)} "
                             f"would be ignored: drop {_them(flags)}")
    if val_data is not None:
        flags = _given(args, "val_scenes", "val_fraction")
        if flags and is_generated(data):
            raise ValueError(f"{', '.join(flags)}: --val-data {val_data[0]}... is the validation data, so "
                             f"{_they(flags)} would be ignored: drop one or the other")
        if flags:  # (files: --val-scenes was refused above)
            raise ValueError(f"{flags[0]} holds out a share of the --data files; --val-data {val_data[0]}... is "
                             "the validation data, so it would be ignored: drop one or the other")
    elif is_generated(data):
        flags = _given(args, "val_fraction", "skip_nonfinite")
        refuse_file_flags(data, {"--skip-nonfinite": flags[:1] == ["--skip-nonfinite"]})
        if flags:
            raise ValueError(f"{flags[0]} holds out a share of the --data files; the generated scenes validate on "
                             "--val-scenes held-out scenes, so it would be ignored: drop it")
    else:
        flags = _given(args, "val_label_map")
        if flags:
            raise ValueError(f"{flags[0]} maps the raw labels of --val-data; without --val-data the validation "
                             "clouds are held out of --data and read with its --label-map, so it would be "
                             "ignored: drop it, or give --val-data")


def check_out_files(out) -> None:
    """ValueError naming ``--out`` and the folder in it that bears the name
    of a file the run writes (:data:`OUTPUTS`): the run failed where it
    first wrote it (its first checkpoint, its report at the end), after the
    work, with ``checkpoint.save``'s hint to write into the folder."""
    for name, what in OUTPUTS.items():
        path = Path(out) / name
        if path.is_dir():
            raise ValueError(f"--out {out}: {path} is a folder, where the run writes its {what} ({name}): move it "
                             "away, or give another --out")


def remove_previous(out) -> str:
    """Remove the files of the run the folder ``out`` holds
    (:data:`PREVIOUS_RUN`) before a new run writes its first checkpoint
    there (train's, a pruned one: ``channels.save_pruned``): they stood
    beside the new checkpoint.pt, and eval of the folder's best.pt, or its
    metrics.json, gave the other run's. Returns what to say ("the previous
    run's best.pt, ... removed"), or "" where there were none."""
    removed = remove_files(out, PREVIOUS_RUN)
    return f"the previous run's {', '.join(removed)} removed" if removed else ""


def check_init_out(args) -> None:
    """ValueError where ``--init`` is a file of the ``--out`` folder that
    holds a run (its checkpoint.pt or best.pt): the new run's first epoch
    writes over them, the run it starts from (README: no command writes over
    what it reads), as ``prune`` refuses an --out beside its --checkpoint."""
    init = getattr(args, "init", None)
    if init is None or not Path(init).is_file():  # (the loader names a missing --init)
        return
    out = Path(args.out)
    if not out.is_dir() or Path(init).resolve().parent != out.resolve():
        return
    for name in (CHECKPOINT, BEST):
        if (out / name).exists():
            raise ValueError(f"--out {args.out}: the new run would replace {out / name}, of the run that --init "
                             f"{init} comes from (the weights it starts from); give another folder")


# --------------------------------------------------------------------- data

def require_labels(source, flag: str, dist: Dist | None = None) -> None:
    """ValueError naming the first cloud of ``source`` (of the shard of
    process ``dist``) without labels (sources cache what they read, so this
    costs no second read); ``flag`` names where the clouds came from.
    Training, validation and ``eval`` take labelled clouds only."""
    distributed = dist is not None and dist.active
    error = None
    for i in (range(len(source)) if dist is None else shard(len(source), dist.rank, dist.world)):
        sample = source[i]
        if sample.labels is None:
            error = f"{flag}: {sample.name} has no labels; training and validation need labelled clouds"
            if not distributed:
                raise ValueError(error)
            break
    if distributed:  # (every process refuses what one found, with its message)
        refuse_together(dist, error)


def require_points(source, flag: str, dist: Dist | None = None) -> None:
    """``ValueError`` where the training clouds ``source`` hold no point at
    all (empty files, or clouds whose every point was left out: positions
    NaN or inf under ``--skip-nonfinite``, LAS points flagged withheld; the
    epochs trained on nothing, without a word); a note on stderr naming
    those left empty among others."""
    emptied = [s.name for s in source if not len(s) and s.kept is not None and len(s.kept)]
    why = "--skip-nonfinite: positions NaN or inf; LAS files: points flagged withheld"
    if not any(len(s) for s in source):
        raise ValueError(f"{flag}: the training clouds hold no points: "
                         f"{f'every one was left out ({why})' if emptied else 'nothing to train on'}")
    if emptied and (dist is None or dist.main):
        shown = ", ".join(emptied[:3]) + (f" and {len(emptied) - 3} more" if len(emptied) > 3 else "")
        print(f"note: every point was left out of {len(emptied)} of the {len(source)} {flag} clouds ({why}): "
              f"{shown}", file=sys.stderr)


#: The generated training scenes of ``--seed s`` start at seed ``s * SEED_SCENES``.
SEED_SCENES = 10_000


def open_training_data(args, dist: Dist | None = None):
    """(train samples, validation samples, class names); a process of a
    distributed run (``dist``) reads only its shard of the validation clouds."""
    generated = is_generated(args.data)
    if generated:
        first = args.seed * SEED_SCENES
        held = range(VALIDATION_SEED, VALIDATION_SEED + args.val_scenes)
        if args.val_data is None and first < held.stop and held.start < first + args.scenes:
            # (--seed 100 trained on the held-out scenes and scored the model on its own training data)
            raise ValueError(f"--seed {args.seed} --scenes {args.scenes} draws the generated training scenes from "
                             f"seeds {first}..{first + args.scenes - 1}, among the held-out scenes' seeds "
                             f"{VALIDATION_SEED}..{VALIDATION_SEED + args.val_scenes - 1} (--val-scenes "
                             f"{args.val_scenes}): give another --seed (or fewer --scenes), or --val-data")
        train = generated_source(args.data, vars(args), args.scenes, first)
        val = (generated_source(args.data, vars(args), args.val_scenes, VALIDATION_SEED)
               if args.val_data is None
               else open_source(args.val_data, args.val_label_map or args.label_map, args.ignore_index))
        if args.val_data is not None:
            if val.classes is not None and list(val.classes) != list(train.classes):
                # (read through their format's default map, a .bin scan's car and road were scored as the
                # generated scenes' classes 0 and 8, road and person, without a word)
                raise ValueError(f"validation classes {list(val.classes)} differ from the training classes "
                                 f"{list(train.classes)} (the generated scenes' own): give --val-label-map of the "
                                 "--val-data labels to them")
            require_labels(val, "--val-data", dist)
            _check_scored(val, len(train.classes), args.ignore_index, dist, _val_map_flag(args))
        _note_ignored_class(train.classes, args.ignore_index, f"the generated scenes ({args.data[0]})", dist)
        return train, val, list(train.classes)
    train = open_source(args.data, args.label_map, args.ignore_index)
    if args.val_data is not None:
        val = open_source(args.val_data, args.val_label_map or args.label_map, args.ignore_index)
        if args.val_label_map is None and args.label_map is None:
            _check_default_maps(train, val)
        if val.classes is not None and train.classes is not None and val.classes != train.classes:
            raise ValueError(f"validation classes {val.classes} differ from the training classes {train.classes}")
        if dist is None or dist.main:  # (once, not from every process)
            _note_shared_clouds(train.paths, val.paths)
    else:
        held = int(round(len(train) * args.val_fraction))
        if len(train) >= 2 and held >= len(train):  # (the files were split into none to train on, unnamed)
            raise ValueError(f"--val-fraction {args.val_fraction:g} of the {len(train)} --data clouds holds out all "
                             f"of them (it rounds to {held}): none is left to train on; give a smaller one, or "
                             "--val-data")
        if len(train) < 2 or held < 1:
            why = ("one --data cloud" if len(train) < 2 else f"--val-fraction {args.val_fraction:g} of the "
                   f"{len(train)} --data clouds holds out none (it rounds to 0)")
            print(f"note: {why} and no --val-data: validating on the training cloud{'s' if len(train) > 1 else ''} "
                  "(the validation mIoU is not held out)", file=sys.stderr)
            val = train
        else:
            whole, files = train, train.paths
            val = CloudFiles(files[-held:], whole.label_map, args.ignore_index)
            train = CloudFiles(files[:-held], whole.label_map, args.ignore_index)
            val.default_map = train.default_map = whole.default_map  # (the map they are read through: --data's)
    require_labels(train, "--data")
    require_points(train, "--data", dist)
    require_labels(val, "--val-data", dist)
    classes = train.classes
    if classes is not None:
        _note_ignored_class(classes, args.ignore_index, f"the label map {train.label_map.name!r}", dist)
    else:
        top, where = max((int(np.max(s.labels[s.labels != args.ignore_index], initial=0)), s.name) for s in train)
        if top >= MAX_RAW_CLASSES:
            raise ValueError(f"--data: {where}: raw label {top}; without --label-map the raw labels are the "
                             f"classes (0 to the largest: {top + 1} here, at most {MAX_RAW_CLASSES}): give a "
                             "--label-map from the raw ids to training ids, or --ignore-index for the label that "
                             "counts nowhere")
        classes = [f"class{i}" for i in range(top + 1)]
        print(f"note: no --label-map: using the raw labels as {len(classes)} classes", file=sys.stderr)
    _check_scored(val, len(classes), args.ignore_index, dist, _val_map_flag(args))
    return train, val, list(classes)


def validation_record(args, train, val, val_data) -> dict:
    """The report's words on what the validation scored (``validation``)
    and its clouds (``val_data``): ``val_data`` (``--val-data``'s absolute
    paths), the files held out of ``--data`` (their paths), the generated
    held-out scenes (their seeds), or the training clouds themselves. It
    said "held out" for all but the first, the training clouds too."""
    if args.val_data is not None:
        return {"validation": "--val-data", "val_data": val_data}
    if is_generated(args.data):
        last = VALIDATION_SEED + args.val_scenes - 1
        return {"validation": "held-out generated scenes",
                "val_data": f"generated scenes of seeds {VALIDATION_SEED}..{last}"}
    if val is train:
        return {"validation": "the training clouds (not held out)", "val_data": "the --data clouds"}
    return {"validation": "held out of --data (--val-fraction)",
            "val_data": [os.path.abspath(p) for p in val.paths]}


def _check_default_maps(train: CloudFiles, val: CloudFiles) -> None:
    """ValueError where the validation clouds' formats take another default
    label map than the training clouds' (no --label-map, no
    --val-label-map): they were read through the training clouds' map (an
    Open3D-ML .npy of learning ids beside SemanticKITTI scans: through
    SemanticKITTI's raw ids, a validation of the wrong classes)."""
    def said(label_map) -> str:
        return "no label map (raw labels)" if label_map is None else f"label map {label_map.name!r}"

    if val.label_map != train.label_map:
        raise ValueError(f"--val-data: its clouds take {said(val.label_map)} by default ({val.paths[0]}), the "
                         f"--data clouds {said(train.label_map)} ({train.paths[0]}): give --label-map for both, or "
                         "--val-label-map for the validation clouds")


def _note_ignored_class(classes, ignore_index: int, source: str, dist: Dist | None,
                        counts: str = ", in the loss or the metrics") -> None:
    """A note on stderr where ``ignore_index`` is the training id of one of
    ``classes`` (a label map's or the generated scenes'): that class's points
    count nowhere (``counts``: where; pointsparse eval's, in the metrics)
    (``--ignore-index 0`` with semantic-kitti-learning, read as "0 is
    unlabeled", dropped car without a word: the map already ignores the raw
    ids it does not list)."""
    if (dist is None or dist.main) and 0 <= ignore_index < len(classes):
        print(f"note: --ignore-index {ignore_index} is the class {classes[ignore_index]!r} of {source}: its points "
              f"count nowhere{counts} (raw ids the label map does not list are ignored already)", file=sys.stderr)


def _note_shared_clouds(train_paths, val_paths) -> None:
    """A note on stderr naming the ``--val-data`` clouds that are training
    clouds too (the same file, however named): their validation mIoU is no
    held-out score (a folder given as --data and a file in it as --val-data
    trained on it without a word)."""
    trained = {Path(p).resolve() for p in train_paths}
    shared = [str(p) for p in val_paths if Path(p).resolve() in trained]
    if shared:
        shown = ", ".join(shared[:3]) + (f" and {len(shared) - 3} more" if len(shared) > 3 else "")
        print(f"note: {len(shared)} of the {len(val_paths)} --val-data clouds are training clouds too ({shown}): "
              "the validation mIoU is not held out", file=sys.stderr)


def _val_map_flag(args) -> str:
    """The option whose label map the validation clouds are read with."""
    return "--val-label-map" if getattr(args, "val_label_map", None) is not None else "--label-map"


def _check_scored(val, num_classes: int, ignore_index: int, dist: Dist | None, flag: str = "--label-map") -> None:
    """The validation clouds' labels as eval checks them, before any
    training (a label past the classes failed the first validation, naming
    no cloud, after an epoch's work; clouds whose every label is ignored
    gave a validation mIoU of NaN in metrics.json). A distributed run's
    processes each check their shard, and together whether any point is
    scored (they skipped the check, and failed or scored NaN as above)."""
    from .evaluate import check_scored_labels

    check_scored_labels(val, num_classes, ignore_index, "the validation clouds", dist, flag)


def generated_source(spec, options: dict, count: int, first_seed: int):
    """``count`` generated scenes of ``spec`` from ``first_seed``, with the
    sensor options (range, beams, azimuth steps) of ``options`` (a run's
    arguments) for the outdoor scenes."""
    return open_source(spec, count=count, first_seed=first_seed, **scene_kwargs(options, spec))


def scene_kwargs(options: dict, spec=("generated",)) -> dict:
    if spec[0] == "generated-indoor":
        return {}
    return {"max_range": options.get("max_range", 50.0), "beams": options.get("beams", 64),
            "azimuth_steps": options.get("azimuth_steps", 1024)}


# --------------------------------------------------------------------- model, optimiser, schedule

def lr_factor(schedule: str, step: int, total: int, warmup: float) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
    total = max(total, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 1.0 if step < 0.6 * total else (0.1 if step < 0.85 * total else 0.01)
    if schedule == "onecycle":
        up = max(1, int(0.3 * total))
        if step < up:
            return 0.04 + 0.96 * step / up
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - up) / max(1, total - up)))) * (1 - 1e-4) + 1e-4
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def run_optimizer(state: dict) -> dict:
    """``optimizer``, ``lr`` (the schedule's peak) and ``weight_decay`` of
    the run a training checkpoint continues, as its saved optimizer and
    schedule hold them (what ``--resume`` restores, whatever the flags say)."""
    group = state["optimizer"]["param_groups"][0]
    return {"optimizer": "sgd" if "momentum" in group else "adamw",
            "lr": state["scheduler"].get("base_lrs", [group["lr"]])[0], "weight_decay": group["weight_decay"]}


def recorded_training(config: dict, path, saved: dict | None = None) -> dict:
    """The training settings (:data:`RUN_SETTINGS`) that the config of the
    checkpoint at ``path`` records, each checked to be of its flag's kind
    (a ValueError naming the file otherwise: a hand-edited value failed deep
    inside training). A checkpoint written before they were recorded still
    holds the flags its run was given (``saved``: its ``args``): those; {}
    for one without them either."""
    record = config.get("training")
    if record is None:
        if not isinstance(saved, dict):
            return {}
        record = {name: saved[name] for name in RUN_SETTINGS if name in saved}
    if not isinstance(record, dict):
        raise ValueError(f"--resume {path}: its config's training must be a dict of the run's settings; got "
                         f"{record!r:.100}")
    kinds = {"schedule": lambda v: v in SCHEDULES, "class_weights": lambda v: v in ("none", "sqrt-inverse"),
             "no_augment": lambda v: isinstance(v, bool),
             "warmup": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
             "batch_size": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             "seed": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32}
    for name, ok in kinds.items():
        if name in record and not ok(record[name]):
            raise ValueError(f"--resume {path}: its config's training {name} is no --{name.replace('_', '-')} "
                             f"value; got {record[name]!r:.100}")
    return {name: record[name] for name in RUN_SETTINGS if name in record}


def _differs(name: str, typed, run) -> str:
    """``--flag value (the run's value)``; --no-augment, a switch, alone (typed, it differs from a run that
    augments)."""
    if name == "no_augment":
        return "--no-augment (the run augments)"
    return f"--{name.replace('_', '-')} {typed} (the run's {run})"


def make_optimizer(args, model) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


#: The lists a run's history keeps, one entry per step or epoch (and ``val_epoch``, where the run recorded it).
HISTORY = ("step_loss", "epoch_loss", "val_miou", "step_time", "lr")


def check_run_state(state: dict, path) -> None:
    """ValueError naming the checkpoint ``path`` and the entry where what
    ``--resume`` restores besides the weights is of another kind than a
    run's checkpoint holds: ``optimizer`` (an optimizer's state_dict: param
    groups with their params, lr and weight decay), ``scheduler`` (the run's
    LambdaLR state_dict), ``history`` (lists of numbers), ``epoch`` (an int
    >= 0), ``torch_rng`` (torch's CPU generator state) and, where present,
    ``torch_rng_ranks`` (a run of several processes: each one's state) and
    ``best_miou`` (a number). A hand-edited file, or another tool's with
    these keys, failed deep inside: a KeyError, an IndexError, torch's RNG
    size, a comparison of a str epoch."""
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def bad(entry: str, expected: str, got: str) -> None:
        raise ValueError(f"--resume {path}: its {entry} must be {expected}; got {got} (a damaged or hand-edited "
                         "checkpoint: resume from another, or --init from it to start a new run from its weights)")

    def kind(value) -> str:
        return repr(value)[:100] if isinstance(value, (int, float, str)) else f"a {type(value).__name__}"

    optimizer = state["optimizer"]
    groups = optimizer.get("param_groups") if isinstance(optimizer, dict) else None
    if not (isinstance(groups, list) and groups and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and number(g.get("lr"))
            and number(g.get("weight_decay")) for g in groups)):
        bad("optimizer", "an optimizer's state_dict (param_groups, each with its params, lr and weight_decay)",
            kind(optimizer) if not isinstance(optimizer, dict) else f"param_groups {kind(groups)}")
    scheduler = state["scheduler"]
    base_lrs = scheduler.get("base_lrs", [0.0]) if isinstance(scheduler, dict) else None
    if not (isinstance(scheduler, dict) and isinstance(scheduler.get("lr_lambdas"), list)
            and count(scheduler.get("last_epoch")) and isinstance(base_lrs, list) and base_lrs
            and all(number(v) for v in base_lrs)):
        keys = ", ".join(map(str, scheduler)) if isinstance(scheduler, dict) else ""
        bad("scheduler", "the state_dict of the run's LambdaLR (lr_lambdas, last_epoch >= 0, base_lrs)",
            f"a dict of {keys or 'nothing'}" if isinstance(scheduler, dict) else kind(scheduler))
    history = state["history"]
    if not isinstance(history, dict):
        bad("history", f"a dict of lists of numbers ({', '.join(HISTORY)})", kind(history))
    for key in HISTORY + (("val_epoch",) if "val_epoch" in history else ()):
        values = history.get(key)
        if values is None or not isinstance(values, list):
            bad("history", f"a dict of lists of numbers ({', '.join(HISTORY)})",
                f"{key} {'missing' if values is None else kind(values)}")
        odd = [v for v in values if not number(v)]
        if odd:
            bad("history", f"a dict of lists of numbers ({', '.join(HISTORY)})", f"{key} holding {kind(odd[0])}")
    if "val_epoch" in history and len(history["val_epoch"]) != len(history["val_miou"]):
        bad("history", "one val_epoch entry per val_miou entry (the epoch of each validation)",
            f"{len(history['val_epoch'])} val_epoch beside {len(history['val_miou'])} val_miou")
    if not count(state["epoch"]):
        bad("epoch", "the epochs the run trained (an int >= 0)", kind(state["epoch"]))
    own = torch.get_rng_state()

    def generator(value) -> bool:
        return isinstance(value, torch.Tensor) and value.dtype == own.dtype and value.shape == own.shape

    def described(value) -> str:
        return f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else kind(value)

    if not generator(state["torch_rng"]):
        bad("torch_rng", f"torch's CPU generator state (torch.get_rng_state(): {described(own)})",
            described(state["torch_rng"]))
    ranks = state.get("torch_rng_ranks")
    if ranks is not None and not (isinstance(ranks, list) and len(ranks) > 1 and all(map(generator, ranks))):
        odd = [r for r in ranks if not generator(r)] if isinstance(ranks, list) else []
        bad("torch_rng_ranks", f"a list of the run's processes' torch generator states (each {described(own)})",
            kind(ranks) if not isinstance(ranks, list) else
            f"a list of {len(ranks)}" + (f" holding {described(odd[0])}" if odd else ""))
    if "best_miou" in state and not number(state["best_miou"]):
        bad("best_miou", "the run's best validation mIoU (a number)", kind(state["best_miou"]))
    if "wall_time_s" in state and not (number(state["wall_time_s"]) and 0 <= state["wall_time_s"] < math.inf):
        bad("wall_time_s", "the seconds the run took (a number >= 0)", kind(state["wall_time_s"]))


def check_optimizer_state(state: dict, model: torch.nn.Module, path) -> None:
    """ValueError naming the checkpoint ``path`` where its optimizer
    ``state`` (a ``state_dict`` of :func:`make_optimizer`'s optimizer) does
    not fit ``model``: another count of parameter groups or parameters, or a
    per-parameter tensor (AdamW's moments, SGD's momentum) of another shape
    than its parameter (another model's state failed inside the first step)."""
    params = list(model.named_parameters())
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise ValueError(f"--resume {path}: its optimizer state is no optimizer state_dict (param_groups of params)")
    indices = [i for g in groups for i in g["params"]]
    if len(groups) != 1 or len(indices) != len(params):
        raise ValueError(f"--resume {path}: its optimizer state does not fit its model: {len(groups)} parameter "
                         f"group(s) of {len(indices)} parameters, where the model's optimizer has 1 of {len(params)}")
    per_param = state.get("state") or {}
    for index, (name, param) in zip(indices, params):
        for key, value in (per_param.get(index) or {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise ValueError(f"--resume {path}: its optimizer state does not fit its model: {key} of {name} is "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


def _init_sources(src: dict) -> dict:
    """A checkpoint's weights by the name of the tensor the layer computes
    with: a pruned tensor's ``name_orig * name_mask`` as ``name`` (the
    values it runs with), a VoxelSkip's wrapped layer's ``a.module.b`` as
    ``a.b`` (its name unwrapped). Values: (tensor, the source keys it
    takes)."""
    out = {}
    for name, value in src.items():
        if name.endswith("_mask") and name[:-5] + "_orig" in src:
            continue
        keys = [name]
        if name.endswith("_orig") and name[:-5] + "_mask" in src:
            mask = src[name[:-5] + "_mask"]
            keys.append(name[:-5] + "_mask")
            name, value = name[:-5], value * mask.to(value.dtype)
        out[name] = (value, keys)
        if ".module." in name:
            out.setdefault(name.replace(".module.", ".", 1), (value, keys))
    return out


def init_renaming(model: torch.nn.Module, src: dict) -> tuple[str, str, str] | None:
    """``(theirs, ours, what)`` where the checkpoint weights ``src`` name
    ``model``'s voxel U-Net another way: a MinkUNet's (``stem.0.0.weight``)
    into an SPVCNN, which keeps its U-Net under ``unet.``
    (``("", "unet.", ...)``), or an SPVCNN's into a MinkUNet
    (``("unet.", "", ...)``); ``what`` says so for the log. Else None (one
    name for one name: the classifier keeps its own, by class)."""
    from ..models import MinkUNet, SPVCNN

    if isinstance(model, SPVCNN) and src and not any(k.startswith(("unet.", "point_mlps.")) for k in src):
        return "", "unet.", "a MinkUNet's tensors as this SPVCNN's voxel U-Net (unet.*)"
    if isinstance(model, MinkUNet) and any(k.startswith("unet.") for k in src):
        return "unet.", "", "an SPVCNN's voxel U-Net (unet.*) as this MinkUNet's tensors"
    return None


#: The flags that choose a run's architecture, which ``--init`` takes from its checkpoint where not typed.
ARCHITECTURE_FLAGS = ("model", "cr", "blocks")


def init_architecture(args, checkpoint: dict, num_classes: int, log=print) -> dict:
    """What a new run started ``--init`` from ``checkpoint`` builds: the
    checkpoint's model, ``--cr`` and ``--blocks`` (set on ``args``) where
    they were not typed (``args._typed``; a namespace made by hand types
    none), and, where the run's architecture is then the checkpoint's, the
    checkpoint's structure as config entries: its channel widths (a channel
    cut's: recorded, or only in its weights' shapes), the classifier's
    outputs those of this run's ``num_classes``, and its ``voxel_skip`` /
    ``voxel_prune`` layers. A channel-pruned checkpoint built a full-width
    model that fitted none of its narrowed tensors and trained from scratch
    after one log line; a typed flag that differs from the checkpoint's
    still builds what it says (logged: the tensors that fit are copied).
    Returns the config entries to add (empty for a plain model)."""
    from ..prune.graph import widths

    config = checkpoint["config"]
    typed = getattr(args, "_typed", None) or frozenset()
    differ = []
    for flag in ARCHITECTURE_FLAGS:
        theirs = config.get(flag, "minkunet" if flag == "model" else None)
        if flag == "model" and isinstance(theirs, str):
            theirs = theirs.lower()  # (build_model's reading)
        if theirs is None or theirs == getattr(args, flag):
            continue
        if flag in typed:
            differ.append(f"--{flag} {getattr(args, flag)} (its {theirs})")
        else:
            setattr(args, flag, theirs)
    if differ:
        log(f"--init {args.init}: the run builds what was typed, {', '.join(differ)}; the checkpoint's tensors "
            "are copied where their names and shapes fit")
        return {}
    structure = {key: config[key] for key in ("voxel_skip", "voxel_prune") if config.get(key) is not None}
    try:  # (the checkpoint's own model, shaped as its weights are: its widths, recorded or only in their shapes;
        # the weights themselves are copied once, by init_from)
        source = build_model(config)
        shape_like(source, checkpoint["model"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"--init {args.init}: {error}") from error
    built = widths(source)
    # (the checkpoint's model without a channel cut: its voxel layers too, whose wrapped names differ)
    plain = widths(build_model({**config, "widths": None}))
    if built != plain:
        head = next(name for name in built if name == "classifier" or name.startswith("classifier."))
        structure["widths"] = {**built, head: {**built[head], "out": num_classes}}
    if structure:
        narrowed = sum(1 for name, w in built.items() if plain.get(name) != w)
        parts = ([f"its channel widths ({narrowed} layers narrowed)"] if "widths" in structure else []) + [
            f"its {key} layers" for key in ("voxel_skip", "voxel_prune") if key in structure]
        log(f"--init {args.init}: building its {args.model} (cr {args.cr}, blocks {args.blocks}) with "
            f"{' and '.join(parts)}")
    return structure


def init_from(model: torch.nn.Module, checkpoint: dict, classes: list[str], unused: list | None = None) -> list[str]:
    """Copy a checkpoint's weights into ``model``: every tensor with the same
    name and shape (a pruned layer's weights as it computes with them,
    ``weight_orig * weight_mask``, and a VoxelSkip's wrapped layer's by the
    layer's own name, so that a fresh model takes them), and the classifier
    rows of classes with the same name; a MinkUNet's tensors go to an
    SPVCNN's voxel U-Net (``unet.``) and back (:func:`init_renaming`).
    A pruned tensor's mask comes too
    (``torch.nn.utils.prune``'s ``custom_from_mask``: training holds its
    pruned weights at zero and the run's checkpoints store the mask; the
    classifier's by class, a class new to it dense). Returns the names of
    the tensors copied; ``unused`` (a list) receives the checkpoint's keys
    that found no place (they were dropped silently: the log's count alone
    was lower)."""
    from ..prune import custom_from_mask

    src = checkpoint["model"]
    src_classes = checkpoint["config"]["classes"]
    own = model.state_dict()
    copied, taken = [], set()
    with torch.no_grad():
        sources = _init_sources(src)
        renaming = init_renaming(model, src)
        if renaming is not None:  # (their voxel U-Net's names as ours; the classifiers by class, below)
            theirs, ours = renaming[:2]
            sources = {(ours + name[len(theirs):] if name.startswith(theirs) and not name.startswith("classifier.")
                        else name): value for name, value in sources.items()}
        for name, (value, keys) in sources.items():
            if name.startswith("classifier."):
                continue
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
                copied.append(name)
                taken.update(keys)
        head = "classifier.fn." if "classifier.fn.weight" in own else "classifier."
        src_head = "classifier.fn." if "classifier.fn.weight" in sources else "classifier."
        weight, bias = (sources.get(src_head + part, (None,))[0] for part in ("weight", "bias"))
        head_masks = {}
        if weight is not None and bias is not None and weight.shape[1] == own[head + "weight"].shape[1]:
            for part in ("weight", "bias"):
                keys = sources[src_head + part][1]
                if len(keys) == 2:  # (pruned: its mask's rows of the classes kept, a new class's row dense)
                    head_masks[head + part] = mask = torch.ones_like(own[head + part], dtype=torch.bool)
                    for i, c in enumerate(classes):
                        if c in src_classes:
                            mask[i] = src[keys[1]][src_classes.index(c)].bool()
            for i, c in enumerate(classes):
                if c in src_classes:
                    j = src_classes.index(c)
                    own[head + "weight"][i] = weight[j]
                    own[head + "bias"][i] = bias[j]
            copied.append("classifier (rows of " + ", ".join(c for c in classes if c in src_classes) + ")")
            taken.update(k for k in src if k.startswith(src_head))
    masks = {name: src[sources[name][1][1]].bool() for name in copied if name in sources
             and len(sources[name][1]) == 2}
    for name, mask in {**masks, **head_masks}.items():
        module_name, _, tensor = name.rpartition(".")
        custom_from_mask(model.get_submodule(module_name), tensor, mask.to(own[name].device))
    if unused is not None:
        unused.extend(k for k in src if k not in taken and not k.startswith("classifier."))
    return copied


def class_weights(source, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``1 / sqrt(share)`` of each class over the points of ``source``,
    scaled to mean 1 over the classes present (absent classes: 0)."""
    counts = np.zeros(num_classes, dtype=np.float64)
    for sample in source:
        labels = sample.labels[sample.labels != ignore_index]
        counts += np.bincount(labels, minlength=num_classes)[:num_classes]
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = 1.0 / np.sqrt(counts[present] / counts.sum())
    if present.any():
        w[present] /= w[present].mean()
    return torch.tensor(w, dtype=torch.float32)


# --------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically with a digest (:func:`pointsparse.checkpoint.save`):
    an interrupt leaves the previous checkpoint intact."""
    checkpoint.save(path, state)


def load_checkpoint(path) -> dict:
    """A training checkpoint, read as data only (never code); ``ValueError``
    naming the file when it is missing, damaged or not a checkpoint, and
    where its config holds a value of the wrong kind
    (``checkpoint.check_config``'s TypeError, which names the file): the
    command line reports a damaged or hand-edited file in one line, not with
    a traceback."""
    try:
        return checkpoint.load_training(path)
    except TypeError as error:
        raise ValueError(str(error)) from error


# --------------------------------------------------------------------- training

def train(args) -> dict | None:
    """Run the training job of ``args``; returns the final metrics on rank 0."""
    with _out_lock(args):
        return _train(args)[0]


_LOCK_HELD = "POINTSPARSE_OUT_LOCK_HELD"


def _out_lock(args):
    """The lock on ``--out`` for the run: taken by the process that starts it
    (the single process, torchrun's rank 0, or the parent of ``--nproc``
    workers, which then hold none), unless a command running this one in
    its process holds it already (:func:`holding_out`)."""
    held = os.environ.get(_LOCK_HELD)
    if (held and held == str(Path(args.out).resolve())) or launch_environment()[0] != 0:
        return contextlib.nullcontext()
    return checkpoint.DirectoryLock(args.out, "--out")


@contextlib.contextmanager
def holding_out(out):
    """Hold the lock on the folder ``out`` (``--out``), also for the runs
    this process starts in it: `prune --finetune-epochs` trains in its own
    --out, and :func:`_out_lock` then takes no second lock (the ``--nproc``
    workers inherit the mark)."""
    with checkpoint.DirectoryLock(out, "--out"), _marked_held(out):
        yield


@contextlib.contextmanager
def _marked_held(out):
    """The mark that ``out``'s lock is held (by this process, or by the
    parent of the processes that read it) for the time of the block."""
    before = os.environ.get(_LOCK_HELD)
    os.environ[_LOCK_HELD] = str(Path(out).resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_LOCK_HELD, None)
        else:
            os.environ[_LOCK_HELD] = before


def rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """The torch seed of process ``rank`` (> 0) of a run seeded ``seed``
    (``epoch``: the epoch a resume of another process count starts at):
    each process draws its own dropout masks (all drew the same ones from
    the one seed), while rank 0 goes on with the seed's stream, as one
    process does."""
    words = [seed % 2**32, seed // 2**32 % 2**32, rank, epoch]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)


def saved_args(args) -> dict:
    """A run's arguments as its checkpoints keep them: the files of --data
    and --val-data (and label maps, --init given as files) as absolute
    paths, so that eval and prune of the checkpoint from another folder
    read the same clouds (relative ones were read from wherever they ran)."""
    saved = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    for key in ("data", "val_data"):
        words = saved.get(key)
        if words and not is_generated(words):
            saved[key] = [os.path.abspath(w) for w in words]
    for key in ("label_map", "val_label_map", "init"):
        word = saved.get(key)
        # (a file only, as load_label_map takes a path: a map's name beside a folder of that name, such as
        # ../shared/datasets/ign-lidarhd, was saved as the folder's path, which eval then refused)
        if isinstance(word, str) and Path(word).is_file():
            saved[key] = os.path.abspath(word)
    return saved


def _train(args):
    """(final metrics on rank 0, the trained model) of one process of the job;
    its clouds read inside ``--skip-nonfinite``'s hold (``clouds.nonfinite_hold``; ``--resume`` took the
    run's flag where none was typed)."""
    # (the clouds are read, and kept, inside: the checks of their labels read them all first)
    with nonfinite_hold(skips_nonfinite(getattr(args, "skip_nonfinite", False)), "train on the other points"):
        job = TrainingJob(args, init_distributed(args))
        trainer = Trainer(job.net, job.optimizer, job.loss, job.batches, job.scheduler, job.log_step, job.end_epoch)
        if job.report_only:
            job.write_missing_report()
        else:
            trainer.fit(job.start_epoch, lambda: job.plan["epochs"])
    return job.report, job.model


def _spawn_worker(rank: int, world: int, port: int, args) -> None:
    from .cli import terminated_after_cleanup

    worker_environment(rank, world, port)
    args.nproc = 1  # (one process here; its checkpoints record the run's process count, dist.world)
    # (SIGTERM to the command's process group, a scheduler's stop: the default action killed the worker writing a
    # checkpoint and left its temporary file; it now cleans up as for a Ctrl-C and then ends by SIGTERM)
    with terminated_after_cleanup():
        try:
            with _out_lock(args):
                _, model = _train(args)
            if getattr(args, "rank_weights", None):  # set by the tests, not a command-line flag
                torch.save(model.state_dict(), Path(args.rank_weights) / f"rank{rank}.pt")
                torch.save(torch.get_rng_state(), Path(args.rank_weights) / f"rank{rank}-rng.pt")
            destroy(barrier=True)
        finally:
            destroy()
    finish_process()  # (a spawned worker: nothing runs after it; see finish_process)


class TrainingJob:
    """The pieces of one process's training run that the :class:`Trainer`
    turns: data, model, loss, optimiser and schedule, per-step logging and
    what ends an epoch (time-budget plan, validation, checkpoints, report)."""

    def __init__(self, args, dist: Dist) -> None:
        self.args, self.dist, self.out = args, dist, Path(args.out)
        check_out_files(args.out)  # (before any work: the files the run writes)
        self.progress = dist.main and not args.no_progress and have_tqdm()
        resume_state = self._config()  # (first: a resumed run reads its data with the run's ignore index)
        # (a run resumed in its own folder: --out is its checkpoint's; the other folder's files are not the run's)
        self.resumed_here = args.resume is not None and self.resume_path.resolve().parent == self.out.resolve()
        self._build(resume_state)
        self.history = {"step_loss": [], "epoch_loss": [], "val_miou": [], "step_time": [], "lr": []}
        self.start_epoch, self.best, self.report, self._val_samples = 0, -1.0, None, None
        # (a new run, or one resumed from another folder's checkpoint: the files of the run --out held are not its
        # own; its first checkpoint replaces them, see _replace_previous)
        self.replaces_previous = PREVIOUS_RUN if not self.resumed_here else ()
        self.carried_best = None  # (a resumed run's best epoch, to bring to --out: _find_best)
        self.wall_before = 0.0  # (the wall time of the epochs a resumed checkpoint holds: _restore)
        self.report_only = False  # (a finished run whose folder lacks its report: write it, train nothing)
        if resume_state is not None:
            self._restore(resume_state)
            if self.start_epoch >= self.plan["epochs"]:
                self.report_only = self._report_missing(resume_state, self.out)
            if self.report_only:
                self.log(f"--resume {self.resume_path}: the run trained its {counted(self.start_epoch, 'epoch')}; "
                         f"its report was missing ({self.out / 'metrics.json'}): validating its last epoch to write it")
            elif self.start_epoch >= self.plan["epochs"]:
                folder = self.resume_path.parent
                hint = (f"; its folder holds no report of them: train --resume {self.resume_path} --out {folder} "
                        "writes it" if self.resume_path.name == CHECKPOINT and not self.resumed_here
                        and self._report_missing(resume_state, folder) else "")
                if self.plan["epochs"] < args.epochs:
                    raise ValueError(f"--resume: the run already trained {counted(self.start_epoch, 'epoch')} of about "
                                     f"{self._fit_budget(self.start_epoch)[1]:.0f} s and --time-budget "
                                     f"{args.time_budget:g} min fits no more; give a larger --time-budget{hint}")
                raise ValueError(f"--resume: the run already trained {counted(self.start_epoch, 'epoch')} and --epochs "
                                 f"{self.plan['epochs']} asks for no more; give --epochs above "
                                 f"{self.start_epoch}{hint}")
        self.net = self.model
        if dist.active:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
        self._announce()
        self._load_data()
        self.train_time, self.t_start = sum(self.history["step_time"]), time.perf_counter()

    def _report_missing(self, state: dict, folder: Path) -> bool:
        """Whether ``folder`` is the folder of the resumed checkpoint (its
        ``checkpoint.pt``) and lacks the report of its epochs: no
        metrics.json, or one of other epochs or steps (a kill after the
        run's last checkpoint, before its report: a finished run without
        one, which --resume refused to continue)."""
        if (folder / CHECKPOINT).resolve() != self.resume_path.resolve():
            return False
        try:
            report = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            return True
        return not (isinstance(report, dict) and report.get("epochs") == state["epoch"]
                    and report.get("steps") == len(state["history"]["step_time"]))

    def write_missing_report(self) -> None:
        """The report (metrics.json, PNGs) of a finished run's last epoch,
        validated again (the checkpoint's weights: the confusion matrix its
        last validation had), where a kill after its last checkpoint left
        none."""
        cm, first = evaluate(self.model, self.val_samples(), len(self.classes), self.args.ignore_index,
                             self.dist.device, progress=self.progress, all_reduce=self.dist.active)
        self.t_start = time.perf_counter()  # (the run's wall time is the checkpoint's: this validation is no part)
        if self.dist.main:
            self._report(self.start_epoch - 1, cm, first, False)

    def log(self, *parts) -> None:
        if self.dist.main:
            print(*parts, flush=True)

    def _config(self) -> dict | None:
        """``self.config`` (the checkpoint's when resuming) and the data
        (``train_src``, ``val_src``, ``classes``); returns the resumed state or None."""
        args, state = self.args, None
        if args.resume is not None:
            path = self.resume_path = self.out / CHECKPOINT if args.resume == "auto" else Path(args.resume)
            read = getattr(args, "_resumed", None)  # (take_run_flags's read of it, where main ran it)
            state = read[1] if read is not None and read[0] == path else load_checkpoint(path)
            args._resumed = None
            missing = [k for k in ("optimizer", "scheduler", "history", "epoch", "torch_rng") if k not in state]
            if missing:
                raise ValueError(f"--resume {path}: a checkpoint of weights only (it lacks {', '.join(missing)}), "
                                 "not of a training run to resume")
            check_run_state(state, path)  # (what is restored besides the weights: of its kind)
            self.config = state["config"]
            # (the ignore index too: the default 255 took the place of a run's own, which its config still
            # recorded, and the resumed epochs trained and scored the class it numbers; and the training
            # settings: the defaults took the place of the run's schedule, batch size, ... without a word)
            recorded = recorded_training(self.config, path, state.get("args"))
            run = {**{name: self.config.get(name) for name in ("model", "cr", "blocks", "voxel_size")},
                   "ignore_index": self.config.get("ignore_index", DEFAULT_IGNORE), **run_optimizer(state),
                   **recorded}
            differ = [_differs(name, getattr(args, name), value) for name, value in run.items()
                      if getattr(args, name, None) not in (None, value) and _given(args, name)]
            if differ:
                raise ValueError(f"--resume {path} continues its run's model, optimizer, ignore index and training "
                                 f"settings; {', '.join(differ)} would be ignored: drop them, or start a new run "
                                 f"(--init {path} starts from its weights)")
            # The optimizer the run trained with (its state is restored into it, learning rate and weight decay
            # included), also where the flags were left at their defaults: the checkpoint records what runs.
            # A checkpoint written before the config recorded the training settings takes them from the flags its
            # run was given (its args), and one without those either keeps the values given.
            for name in ("optimizer", "lr", "weight_decay", "ignore_index", *recorded):
                setattr(args, name, run[name])
            check_unread_flags(args)  # (--warmup beside the run's schedule, which was not known before)
            if args.batch_size % self.dist.world:
                raise ValueError(f"--resume {path}: the run's --batch-size {args.batch_size} must be a multiple of "
                                 f"the {self.dist.world} processes")
            self.config = {**self.config, "training": {name: getattr(args, name) for name in RUN_SETTINGS}}
            self.log(f"resuming {path} after epoch {state['epoch']}")
        self.train_src, self.val_src, self.classes = open_training_data(args, self.dist)
        self.init_source, structure = None, {}
        if state is None and args.init:
            self.init_source = load_checkpoint(args.init)
            structure = init_architecture(args, self.init_source, len(self.classes), self.log)
        if state is None:
            self.config = {"in_channels": NUM_FEATURES, "classes": self.classes, "cr": args.cr,
                           "blocks": args.blocks, "voxel_size": args.voxel_size, "ignore_index": args.ignore_index,
                           "model": args.model, "training": {name: getattr(args, name) for name in RUN_SETTINGS},
                           # (the optional features its clouds held: predict and eval note clouds that lack one)
                           "point_features": held_features(
                               # (a generated source's scenes all hold the same; read, files are kept already)
                               [self.train_src[0]] if is_generated(args.data) else self.train_src),
                           **structure}
        if not is_generated(args.data):
            # The label map the clouds were read through, their formats' default included (recorded as given,
            # a file as its absolute path; None: the raw labels are the classes): eval and prune of another
            # format's files read them through the run's classes, or refuse them (a run on
            # SemanticKITTI .bin scans recorded no map, and Open3D-ML learning ids were scored one class off).
            # A resumed run keeps the map its checkpoint records; one that records none takes this run's. The
            # default is the one the training source took (the clouds' default_label_map, not searched again).
            if "label_map" not in self.config:
                self.config["label_map"] = (saved_args(args)["label_map"] if args.label_map is not None
                                            else self.train_src.default_map)
            # The bytes of each map file the run read (path -> sha256): eval, predict, prune and --resume name
            # a file gone or changed since (clouds.check_run_map_file). A resumed run records the bytes its
            # epochs read now (warned of where they changed).
            from .clouds import map_file_digest

            files, saved = self.config.setdefault("label_map_files", {}), saved_args(args)
            for word in {saved.get(key) for key in ("label_map", "val_label_map")}:
                if isinstance(word, str) and Path(word).is_file():
                    files[word] = map_file_digest(word)
        if state is not None:
            from .evaluate import check_data_classes

            check_data_classes(self.classes, self.config["classes"], f"--resume {self.resume_path}: --data",
                               not is_generated(args.data))
            self._note_other_validation(state)
        return state

    def _note_other_validation(self, state: dict) -> None:
        """A note where the resumed run validates on other clouds than the
        run did (other files, or generated scenes of other flags): its best
        epoch is then picked among mIoUs of different clouds, and the curves
        join them in one line (it was said nowhere)."""
        if not self.dist.main or not state.get("history", {}).get("val_miou"):
            return
        saved = state.get("args") if isinstance(state.get("args"), dict) else {}
        # (by file name: files moved to another folder, --data typed anew, are the run's)
        before = [Path(p).name for p in state.get("val_paths") or []]
        now = [Path(p).name for p in getattr(self.val_src, "paths", [])]
        if before or now:
            differ = sorted(before) != sorted(now)
            what = f"{counted(len(now), 'cloud')} now, {len(set(now) & set(before))} of them among its {len(before)}"
        else:  # (generated scenes: the flags that draw the validation scenes; --scenes draws the training ones)
            changed = [f"--{name.replace('_', '-')} {getattr(self.args, name)} (the run's {saved[name]})"
                       for name in SCENE_FLAGS if name != "scenes" and name in saved
                       and getattr(self.args, name, None) != saved[name]]
            differ, what = bool(changed), ", ".join(changed)
        if differ:
            print(f"note: --resume {self.resume_path}: the run validated on other clouds ({what}): its best epoch "
                  f"(best.pt) is chosen among mIoUs of different clouds from here on, and its curves join them",
                  file=sys.stderr)

    def _build(self, resume_state) -> None:
        """Model (seeded), optimiser, data sets, sampler and schedule."""
        args, dist = self.args, self.dist
        torch.manual_seed(args.seed)
        try:
            # resumed: the run's model with its weights (masks, folded biases, narrower layers: before the
            # optimizer sees them), refused as eval refuses it where they do not fit its config or hold NaN/inf
            self.model = build_model(self.config) if resume_state is None else model_from_state(resume_state)
        except (ValueError, TypeError) as error:  # a resumed checkpoint's config or weights (widths no dict, ...)
            if resume_state is None:
                raise
            raise ValueError(f"--resume {self.resume_path}: {error}") from error
        if args.init and resume_state is None:
            source = self.init_source
            name = non_finite_entry(source["model"])
            if name is not None:  # (refused as eval, --resume and load_model refuse it: not trained from)
                raise ValueError(f"--init {args.init}: {name} holds NaN or inf: the weights of a diverged run or a "
                                 "damaged file; start from an earlier checkpoint")
            name = negative_variance_entry(source["model"])
            if name is not None:
                raise ValueError(f"--init {args.init}: {name} holds negative values, but a running variance is >= 0: "
                                 "a damaged file; start from another checkpoint")
            unused: list[str] = []
            copied = init_from(self.model, source, self.classes, unused)
            renaming = init_renaming(self.model, source["model"])
            self.log(f"initialised {len(copied)} tensors from {args.init}"
                     + ("" if renaming is None else f" ({renaming[2]})")
                     + (f"; {len(unused)} of its tensors fit no tensor of this model (first: "
                        f"{', '.join(unused[:3])})" if unused else ""))
        if dist.active:
            self.model = SyncBatchNorm.convert(self.model)
        self.model.to(dist.device)
        self.optimizer = make_optimizer(args, self.model)
        voxel = self.config["voxel_size"]
        self.train_ds = VoxelDataset(self.train_src, voxel, args.ignore_index, train=not args.no_augment,
                                     seed=args.seed)
        # (a validation cloud's feature the training clouds lacked: 0, as the model saw it and as eval scores it)
        self.val_features = TrainedFeatures(self.config)
        self.val_ds = VoxelDataset(FittedClouds(self.val_src, self.val_features), voxel, args.ignore_index)
        self.sampler = torch.utils.data.DistributedSampler(self.train_ds, num_replicas=dist.world, rank=dist.rank,
                                                           shuffle=True, seed=args.seed)
        self.local_batch = args.batch_size // dist.world
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.local_batch)
        if dist.rank > 0:  # (the model drew the same weights everywhere; a rank's dropout draws its own masks)
            torch.manual_seed(rank_seed(args.seed, dist.rank))
        self.plan = {"epochs": args.epochs}
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            args.schedule, s, self.steps_per_epoch * self.plan["epochs"], args.warmup))

    def _restore(self, state: dict) -> None:
        """The run's optimizer, schedule, history and random state (its
        weights are the model's already: :meth:`_build`)."""
        check_optimizer_state(state["optimizer"], self.model, self.resume_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history = state["history"]
        # (a history without val_epoch, from before the run recorded it: its validations taken as epochs 1..k, as
        # the curves plot reads it; the next validation's entry then came alone beside them and the plot failed)
        self.history.setdefault("val_epoch", list(range(1, len(self.history["val_miou"]) + 1)))
        self.start_epoch = state["epoch"]
        if self.args.time_budget is not None:  # the plan after the epochs done (the same budget: the run's own)
            self.plan["epochs"] = min(self.args.epochs, self._fit_budget(self.start_epoch)[0])
        self.best = state.get("best_miou", -1.0)
        self._find_best(state)
        # (a checkpoint written before it kept its wall time: the step times of its epochs, the least it took)
        self.wall_before = float(state.get("wall_time_s", sum(self.history["step_time"])))
        self._restore_rng(state)
        self._follow_plan()

    def _restore_rng(self, state: dict) -> None:
        """This process's torch generator as the run left it: its rank's
        state where the checkpoint holds one per rank of as many processes
        (``torch_rng_ranks``), else the first process's (``torch_rng``) on
        rank 0 and on the others a stream of the seed, the rank and the
        epoch resumed (a run of another process count: not bit for bit)."""
        ranks, dist = state.get("torch_rng_ranks"), self.dist
        if isinstance(ranks, list) and len(ranks) == dist.world:
            torch.set_rng_state(ranks[dist.rank])
            return
        torch.set_rng_state(state["torch_rng"])
        if dist.rank > 0:
            torch.manual_seed(rank_seed(self.args.seed, dist.rank, state["epoch"]))
        saved = state.get("args") if isinstance(state.get("args"), dict) else {}
        ran = len(ranks) if isinstance(ranks, list) else saved.get("nproc", 1)
        partial = not isinstance(ranks, list) and ran > 1  # (a run older than the per-process record: one kept)
        if (ran != dist.world or partial) and dist.main:
            kept = " (its checkpoint keeps one process's random state)" if partial else ""
            self.log(f"--resume {self.resume_path}: the run ran {ran} process(es){kept}, this one {dist.world}: "
                     "the random streams of the processes the run did not keep (SPVCNN's dropout) start anew, so the "
                     "run goes on as close as it can, not bit for bit")

    def _find_best(self, state: dict) -> None:
        """The resumed run's best epoch. In its own folder: the best.pt there
        (a best.pt where the run recorded no best is another run's, removed
        at the first checkpoint: :meth:`_replace_previous`). Resumed into
        another --out: the best.pt beside its checkpoint where it holds the
        run's best (its mIoU and validations so far are the run's), brought
        to --out at the first checkpoint (``carried_best``): B/metrics.json
        of ``--resume A/checkpoint.pt --out B`` reported A's best mIoU, of a
        best.pt that B did not hold. Where no best.pt holds it (removed,
        another run's), the best is that of the epochs from the resume on,
        and a note says so."""
        beside = self.resume_path.parent / BEST
        if self.best < 0:  # (none recorded: a pruned checkpoint's, whose best is its fine-tuning's)
            if self.resumed_here and beside.is_file():
                self.replaces_previous = (BEST,)
            return
        held = (beside.is_file() or None) if self.resumed_here else self._run_best(state, beside)
        if self.resumed_here and self._is_best_epoch(state) and beside.resolve() != self.resume_path.resolve() and (
                held is None or beside.stat().st_mtime_ns < self.resume_path.stat().st_mtime_ns):
            # (a kill between the epoch's checkpoint.pt and its best.pt, which an epoch writes after it: the
            # best.pt there, of an older epoch or none, held no epoch the run reports as its best, and the run
            # went on trusting it; told by the files' times, not a second read of hundreds of MB)
            if self.dist.main:
                print(f"note: --resume {self.resume_path}: {beside} did not hold the run's best epoch "
                      f"{state['epoch']} (validation mIoU {100 * self.best:.1f}%: its write was cut short); "
                      "written again from the checkpoint", file=sys.stderr)
                self._remove_eval_of(BEST)
                save_checkpoint(beside, state)
            held = state
        if held is None:
            if self.dist.main:
                print(f"note: --resume {self.resume_path}: no {BEST} beside it holds its run's best epoch "
                      f"(validation mIoU {100 * self.best:.1f}%; {beside}): {self.out / BEST} holds the best of "
                      "the epochs from the resume on", file=sys.stderr)
            self.best = -1.0
        elif not self.resumed_here:
            self.carried_best = held

    def _is_best_epoch(self, state: dict) -> bool:
        """Whether the checkpoint ``state`` is its run's best epoch: its last
        validation was of its own epoch and scored the run's best mIoU, which
        no validation before it reached (a tie keeps the earlier epoch's
        best.pt: an epoch writes best.pt on a better mIoU only)."""
        history = state.get("history")
        scores = history.get("val_miou") if isinstance(history, dict) else None
        epochs = history.get("val_epoch") if isinstance(history, dict) else None
        return (isinstance(scores, list) and bool(scores) and isinstance(epochs, list) and bool(epochs)
                and epochs[-1] == state.get("epoch") and scores[-1] == state.get("best_miou") == self.best
                and all(score < self.best for score in scores[:-1]))

    def _run_best(self, state: dict, path: Path) -> dict | None:
        """The state of the checkpoint ``path`` where it is the best epoch of
        the run of ``state`` (the run's best mIoU, at its last validation,
        the run's validations up to it), else None."""
        if not path.is_file():
            return None
        try:
            best = state if path.resolve() == self.resume_path.resolve() else load_checkpoint(path)
        except ValueError:
            return None
        history = best.get("history")
        scores = history.get("val_miou") if isinstance(history, dict) else None
        epoch = best.get("epoch")
        if not (isinstance(scores, list) and scores and isinstance(epoch, int) and epoch <= state["epoch"]):
            return None
        run = state["history"]["val_miou"]
        return best if best.get("best_miou") == scores[-1] == self.best and run[:len(scores)] == scores else None

    def _follow_plan(self) -> None:
        """The rate of the next step as the plan now reads (``--epochs``
        extended on resume, a ``--time-budget`` re-plan): the scheduler set
        it after the last step from the plan of then, and the first step of
        the new plan ran at that (under cosine, the old plan's floor)."""
        step = self.scheduler.last_epoch
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["lr"] = base * factor(step)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _announce(self) -> None:
        if not self.dist.main:
            return
        checkpoint.make_directory(self.out)
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"{type(self.model).__name__} cr={self.config['cr']} ({n_params / 1e6:.2f} M parameters), "
                 f"{len(self.classes)} classes, voxel {self.config['voxel_size']} m; {len(self.train_src)} "
                 f"training and {len(self.val_src)} validation clouds; {self.dist.world} process(es) on "
                 f"{self.dist.device}, {torch.get_num_threads()} thread(s) each; "
                 f"{counted(self.steps_per_epoch, 'step')} per epoch")
        if self.replaces_previous == PREVIOUS_RUN and (self.out / CHECKPOINT).is_file():
            # (said before the work: the line at the first checkpoint came after the other run's files were gone)
            print(f"note: --out {self.out} holds a run: this run replaces it (its {CHECKPOINT}, {BEST}, report) at "
                  f"its first checkpoint; to continue that run instead, stop now and give train --resume --out "
                  f"{self.out}", file=sys.stderr)
        if self.resumed_here and self.resume_path.name != CHECKPOINT and (self.out / CHECKPOINT).is_file() and \
                (self.out / CHECKPOINT).resolve() != self.resume_path.resolve():
            # (--resume DIR/best.pt --out DIR: a branch from the best epoch, whose first checkpoint replaced the
            # run's later checkpoint.pt without a word)
            print(f"note: --resume {self.resume_path} in its own folder goes on from epoch {self.start_epoch}: its "
                  f"first checkpoint replaces {self.out / CHECKPOINT}, the run's last; to keep it, give another "
                  "--out", file=sys.stderr)

    def _load_data(self) -> None:
        """Generate or read every training cloud and this process's
        validation shard once, outside the timed steps, each checked to fit
        the voxel grid as the file holds it (a ValueError naming the file and
        its own extent, before "data ready"); the class weights. A run that
        only writes its missing report (``report_only``) trains nothing: its
        validation shard alone."""
        t_load = time.perf_counter()
        voxel = self.config["voxel_size"]
        # (each cloud's own extent checked at the run's voxel size as it is read: refused later, inside an
        # epoch, the extent named was the augmented one's, not the file's)
        for sample in () if self.report_only else self.train_src:
            check_voxel_extent(sample, voxel)
            if self.dist.rank == 0:  # (once: every process reads every training cloud)
                warn_coarse_positions(sample, voxel)
        if not self.report_only and self.dist.rank == 0:
            from .evaluate import warn_mostly_ignored_clouds

            warn_mostly_ignored_clouds(self.train_src, self.args.ignore_index, len(self.classes),
                                       getattr(self.train_src, "label_map", None), "the training clouds")
        error = None
        try:
            for i in self._val_shard():
                check_voxel_extent(self.val_src[i], voxel)
                warn_coarse_positions(self.val_src[i], voxel)
                self.val_features.check(self.val_src[i])
        except ValueError as refused:
            if not self.dist.active:
                raise
            error = str(refused)
        if self.dist.active:  # (a shard's refusal is every process's: the others waited in a collective)
            refuse_together(self.dist, error)
        if self.dist.main:  # (its own shard's: the clouds holding a feature the training clouds lacked)
            self.val_features.lacking.clear()  # (a validation cloud lacking one is scored as it is, unremarked)
            self.val_features.note(len(self._val_shard()))
        self.log(f"data ready in {time.perf_counter() - t_load:.1f} s")
        self.weight = None
        if getattr(self.args, "class_weights", "none") != "none" and not self.report_only:
            self.weight = class_weights(self.train_src, len(self.classes), self.args.ignore_index)
            self.weight = self.weight.to(self.dist.device)
            self.log("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(self.classes,
                                                                                 self.weight.tolist())))

    def _val_shard(self) -> range:
        return shard(len(self.val_src), self.dist.rank, self.dist.world)

    def val_samples(self) -> list:
        """This process's validation clouds, voxelised on first use and kept."""
        if self._val_samples is None:
            self._val_samples = [self.val_ds[i] for i in self._val_shard()]
        return self._val_samples

    # ----------------------------------------------------------------- the Trainer's pieces

    def batches(self, epoch: int):
        """This process's batches of ``epoch``, augmented and voxelised as they are asked for."""
        self.sampler.set_epoch(epoch)
        self.train_ds.set_epoch(epoch)
        order = list(self.sampler)
        chunks = [order[i:i + self.local_batch] for i in range(0, len(order), self.local_batch)]
        self.epoch_losses = []
        self.bar = progress_bar(chunks, f"epoch {epoch + 1}/{self.plan['epochs']}", self.progress)
        return (Batch.of([self.train_ds[i] for i in chunk]).to(self.dist.device) for chunk in self.bar)

    def loss(self, net, batch: Batch) -> tuple[torch.Tensor, float]:
        """Cross-entropy summed over every process's voxels / their global
        (weighted) count: the same loss (and, with DDP's averaging, gradient)
        as one process on the whole batch (torch's DistributedSampler pads an
        epoch whose scenes the processes do not divide with its first ones, so
        the last batch differs there). Also its value, for the log."""
        ignore = self.args.ignore_index
        # (the rate this step runs at, for the log: log_step comes after the scheduler's step)
        self.step_lr = self.optimizer.param_groups[0]["lr"]
        try:
            logits, target = logits_of(net, batch)
        except BatchStatisticsError as error:  # (the layer knows the stride; the run, what made the batch)
            shown = ", ".join(batch.names[:3]) + (f" and {len(batch.names) - 3} more" if len(batch.names) > 3 else "")
            raise BatchStatisticsError(
                f"{error}. Here: the training batch of {shown} at --voxel-size {self.config['voxel_size']:g} "
                f"(--batch-size {self.args.batch_size}): give a smaller --voxel-size or a larger --batch-size, or "
                "larger clouds") from error
        ce = torch.nn.functional.cross_entropy(logits, target, weight=self.weight, ignore_index=ignore,
                                               reduction="sum")
        valid = target != ignore
        counted = valid.sum() if self.weight is None else self.weight[target[valid]].sum()
        stats = torch.stack([ce.detach(), counted.to(ce.dtype)])
        if self.dist.active:
            torch.distributed.all_reduce(stats)
        return ce / stats[1].clamp_min(1) * self.dist.world, float(stats[0] / stats[1].clamp_min(1))

    def log_step(self, epoch: int, step_loss: float, seconds: float) -> None:
        check_finite_loss(step_loss, len(self.history["step_loss"]) + 1)
        self.train_time += seconds
        self.epoch_losses.append(step_loss)
        self.history["step_loss"].append(step_loss)
        self.history["step_time"].append(seconds)
        self.history["lr"].append(self.step_lr)
        if self.progress:
            self.bar.set_postfix(loss=f"{step_loss:.3f}", s_per_step=f"{seconds:.2f}")

    def end_epoch(self, epoch: int) -> bool:
        """Re-plan, validate, checkpoint and (after the last epoch) report;
        True when the time limit stops the run."""
        losses = self.epoch_losses
        self.history["epoch_loss"].append(float(np.mean(losses)) if losses else math.nan)
        self._replan(epoch)
        stop = self.args.time_limit is not None and self.train_time >= self.args.time_limit * 60
        if self.dist.active and self.args.time_limit is not None:
            # (each process times its own steps: one stopped while another went on into mismatched collectives,
            # and the job hung; every process follows rank 0, as for the --time-budget plan)
            stop_t = torch.tensor([int(stop)], dtype=torch.int64, device=self.dist.device)
            torch.distributed.broadcast(stop_t, 0)
            stop = bool(stop_t)
        last = epoch + 1 == self.plan["epochs"] or stop
        validate = last or (epoch + 1) % self.args.eval_every == 0
        check_finite_weights(self.model, epoch + 1)
        cm = first = None
        if validate:
            cm, first = evaluate(self.model, self.val_samples(), len(self.classes), self.args.ignore_index,
                                 self.dist.device, progress=self.progress, all_reduce=self.dist.active)
        ranks = None
        if self.dist.active:  # (every rank's generator, for a resume to go on with each: SPVCNN's dropout)
            ranks = [None] * self.dist.world
            torch.distributed.all_gather_object(ranks, torch.get_rng_state())
        if self.dist.main:
            self._checkpoint(epoch, losses, cm, ranks)
            if last:
                self._report(epoch, cm, first, stop)
        if self.dist.active:
            torch.distributed.barrier()
        return stop

    def _replan(self, epoch: int) -> None:
        """With ``--time-budget``: the epoch count that fits, re-planned after
        every epoch from the mean epoch time so far (the machine's load may
        change during the run); every process follows rank 0's plan."""
        args = self.args
        if args.time_budget is None:
            return
        fit, per_epoch = self._fit_budget(epoch + 1)
        if self.dist.active:
            fit_t = torch.tensor([fit], dtype=torch.int64, device=self.dist.device)  # (NCCL takes CUDA tensors only)
            torch.distributed.broadcast(fit_t, 0)
            fit = int(fit_t)
        if min(args.epochs, fit) != self.plan["epochs"]:
            self.plan["epochs"] = min(args.epochs, fit)
            self._follow_plan()
            self.log(f"time budget {args.time_budget} min: {counted(self.plan['epochs'], 'epoch')} of about "
                     f"{per_epoch:.0f} s")

    def _fit_budget(self, done: int) -> tuple[int, float]:
        """(the epochs that fit ``--time-budget``, at least the ``done`` ones;
        the mean seconds of the epochs done so far)."""
        per_epoch = max(sum(self.history["step_time"]) / done, 1e-9)
        return max(done, int(self.args.time_budget * 60 / per_epoch)), per_epoch

    def wall_time(self) -> float:
        """Seconds of the run since its data was ready, the epochs before a
        ``--resume`` included (the checkpoint's), as its training time counts
        them (a resumed run reported the resumed process's alone: less wall
        time than training time)."""
        return self.wall_before + time.perf_counter() - self.t_start

    def _checkpoint(self, epoch: int, losses: list, cm, ranks: list | None = None) -> None:
        """Log the epoch, write ``checkpoint.pt`` (and ``best.pt`` on a better
        mIoU); ``ranks``: every process's generator state, in rank order
        (kept as ``torch_rng_ranks``), where the run has several."""
        history = self.history
        summary = (f"epoch {epoch + 1}/{self.plan['epochs']}: loss {history['epoch_loss'][-1]:.4f}, "
                   f"{np.median(history['step_time'][-len(losses):]):.2f} s/step, "
                   f"{self.train_time / 60:.1f} min of training")
        miou = -1.0
        if cm is not None:
            miou = metrics.mean_iou(cm)
            history["val_miou"].append(miou)
            history.setdefault("val_epoch", []).append(epoch + 1)
            summary += f", val mIoU {100 * miou:.1f}%"
        self.log(summary)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                 "config": self.config, "torch_rng": torch.get_rng_state(),
                 "best_miou": max(self.best, miou) if cm is not None else self.best,
                 "planned_epochs": self.plan["epochs"], "wall_time_s": self.wall_time(),
                 "val_paths": [os.path.abspath(p) for p in getattr(self.val_src, "paths", [])],
                 "args": {**saved_args(self.args), "nproc": self.dist.world}}  # (--nproc's workers, torchrun's)
        if ranks is not None:
            state["torch_rng_ranks"] = ranks
        if self.replaces_previous:
            self._replace_previous()
        self._remove_eval_of(CHECKPOINT)
        save_checkpoint(self.out / CHECKPOINT, state)
        if cm is not None and miou > self.best:
            self.best = miou
            self._remove_eval_of(BEST)
            save_checkpoint(self.out / BEST, state)
        elif self.carried_best is not None:  # (the run's best epoch, before the resume: its folder's best.pt)
            self._remove_eval_of(BEST)
            save_checkpoint(self.out / BEST, self.carried_best)
        self.carried_best = None

    def _remove_eval_of(self, name: str) -> None:
        """Remove the report ``eval --out`` wrote in --out (``eval-`` and
        :data:`REPORT_FILES`' names, no other file) where it scored the run's
        ``name`` (checkpoint.pt, best.pt), which is written over or removed
        now: a run resumed in its folder keeps the folder's files, and the
        report of the epoch the file held stood beside the file's next
        epoch, read as its scores. A report of another file (a best.pt the
        resumed epochs do not beat, another folder's checkpoint, a program)
        still describes it and stays."""
        if scored_checkpoint(self.out) != (self.out / name).resolve():
            return
        removed = remove_files(self.out, [EVAL_PREFIX + report for report in REPORT_FILES])
        if removed:
            self.log(f"eval's report of {self.out / name} ({', '.join(removed)}) removed: it scored the epoch "
                     f"{name} held, which this run replaces")

    def _replace_previous(self) -> None:
        """At the run's first checkpoint, where --out held another run (a new
        run, or one resumed from another folder's checkpoint): remove that
        run's best.pt, metrics.json and PNGs, which this run writes later (at
        its first validation, at its end), and eval's report of it, before
        its checkpoint.pt replaces the other's (:func:`remove_previous`). A run
        stopped before this leaves the other run whole. A run resumed in its
        own folder removes a best.pt there that holds none of its epochs
        (:meth:`_find_best`). The names: ``replaces_previous``."""
        names, self.replaces_previous = self.replaces_previous, ()
        if names == (BEST,):
            self._remove_eval_of(BEST)
            if remove_files(self.out, names):
                self.log(f"{self.out / BEST} removed: it holds no epoch of the run resumed from {self.resume_path}")
            return
        said = remove_previous(self.out)
        if said:
            what = "a new run" if self.args.resume is None else f"the run resumed from {self.resume_path}"
            self.log(f"{what} in {self.out}: {said} (its {CHECKPOINT} is replaced now; train --resume continues "
                     "a run in its folder)")

    def _report(self, epoch: int, cm, first, stop: bool) -> None:
        args, times = self.args, self.history["step_time"]
        saved = saved_args(args)  # (its files, the checkpoint and the pictures by absolute paths: found from anywhere)
        extra = {"epochs": epoch + 1, "steps": len(times), "train_time_s": self.train_time,
                 "wall_time_s": self.wall_time(),
                 "step_time_s_median": statistics.median(times) if times else None,
                 "scans_per_step": args.batch_size,
                 "step_time_per_scan_s": statistics.median(times) / args.batch_size if times else None,
                 "processes": self.dist.world, "threads_per_process": torch.get_num_threads(),
                 "device": str(self.dist.device), "data": saved["data"],
                 **validation_record(args, self.train_src, self.val_src, saved["val_data"]),
                 "config": self.config, "checkpoint": os.path.abspath(self.out / CHECKPOINT), "best_miou": self.best,
                 "stopped_by_time_limit": bool(stop and epoch + 1 < self.plan["epochs"])}
        self.report = write_report(self.out, cm, self.classes, first, self.history, extra, args.ignore_index)
        self.log("\n" + metrics.format_table(cm, self.classes))


def _print_report(report: dict, out) -> None:
    """The run's closing lines: its mIoU, its metrics.json and pictures."""
    print(f"mIoU {metrics.percent(report['miou'])}  ->  {Path(out) / 'metrics.json'}")
    for name, path in report["pictures"].items():
        print(f"  {name}: {shown_in(path, out)}")


def shown_in(path, out) -> Path:
    """``path`` as a closing line names it: a file in the run folder under
    ``out`` as given (metrics.json records absolute paths; the lines mixed
    ``runs/demo/metrics.json`` with ``/home/.../runs/demo/curves.png``),
    any other as it is."""
    path = Path(path)
    try:
        inside = path.parent.resolve() == Path(out).resolve()
    except OSError:  # (a path that cannot be resolved: named as it is)
        inside = False
    return Path(out) / path.name if inside else path


def main(args) -> int:
    take_run_flags(args)  # (first: what the run reads and its settings, as if typed)
    check_args(args)
    check_unread_flags(args)
    check_init_out(args)
    if args.nproc > 1 and _torchrun_world() == 1:
        import torch.multiprocessing as mp

        port = free_port()
        # Only the options, and the record of those typed, travel to the workers (the CLI adds module objects).
        plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_") or k == "_typed"})
        with _out_lock(args), _marked_held(args.out):
            context = None
            try:
                context = mp.spawn(_spawn_worker, args=(args.nproc, port, plain), nprocs=args.nproc, join=False)
                while context is not None and not context.join():  # (None: a stand-in spawn that joined itself)
                    pass
            except mp.ProcessRaisedException as error:
                raise _worker_error(error) or error
            except mp.ProcessExitedException as error:  # (killed, or ended without an exception: a line, as Ctrl-C)
                if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                    raise
                how = f"signal {error.signal_name}" if error.signal_name else f"exit status {error.exit_code}"
                again = (" (train --resume continues from its last checkpoint)"
                         if (Path(args.out) / CHECKPOINT).is_file() else "")
                print(f"pointsparse train: error: process {error.error_index} of the {args.nproc} (pid "
                      f"{error.error_pid}) ended by {how}; torch stopped the others{again}", file=sys.stderr)
                return 1
            except KeyboardInterrupt as stop:  # (a SIGINT to this process alone: its workers, left, trained on
                if context is not None:  # while it waited for them at exit)
                    from .cli import Terminated

                    # (SIGTERM here is a process group's, mostly: the workers have one too, and a SIGINT after it
                    # cut their cleanup short; a second SIGTERM is ignored by a worker ending by one)
                    _stop_workers(context.processes, terminate=isinstance(stop, Terminated))
                raise
        metrics_path = Path(args.out) / "metrics.json"
        if metrics_path.is_file():  # (the workers' report: the lines one process prints, as it prints them)
            try:
                report = json.loads(metrics_path.read_text())
            except (OSError, ValueError):
                report = None
            if isinstance(report, dict) and isinstance(report.get("miou"), (int, float)) and \
                    isinstance(report.get("pictures"), dict):
                _print_report(report, args.out)
            else:
                print(f"metrics: {metrics_path}")
        return 0
    report = train(args)
    destroy(barrier=True)
    if report is not None:
        _print_report(report, args.out)
    if _torchrun_world() > 1:  # (a torchrun process: its group's threads outlive it; see finish_process)
        finish_process()
    return 0


def _stop_workers(processes, grace: float = 10.0, terminate: bool = False) -> None:
    """The ``--nproc`` workers still running stopped: SIGINT first (SIGTERM
    where ``terminate``; each ends as a Ctrl-C ends it, its checkpoints
    atomic), then, after ``grace`` seconds, SIGKILL."""
    import signal

    for process in processes:
        if process.is_alive() and process.pid is not None:
            try:
                os.kill(process.pid, signal.SIGTERM if terminate else signal.SIGINT)
            except OSError:  # (ended meanwhile)
                pass
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


#: The errors a ``--nproc`` worker raises that the command reports as one process does, by their class's name:
#: bad input (a ValueError) and a diverged run.
_WORKER_ERRORS = {"ValueError": ValueError, "BatchStatisticsError": ValueError, "TrainingDiverged": TrainingDiverged}


def _worker_error(error) -> Exception | None:
    """The ValueError (bad input: a flag, a file, a cloud) or
    TrainingDiverged that a ``--nproc`` worker raised, from the traceback
    text torch's spawn hands back (``ProcessRaisedException``), so that the
    command reports it in one line as one process does; None for any other
    error (its traceback stays)."""
    lines = str(error).rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("  ") or not lines[i]:
            break
        kind, colon, message = lines[i].partition(": ")
        if colon and kind.rpartition(".")[2] in _WORKER_ERRORS:
            return _WORKER_ERRORS[kind.rpartition(".")[2]]("\n".join([message, *lines[i + 1:]]))
    return None


def _cli(argv=None) -> int:
    from .cli import terminated_after_cleanup

    parser = CommandParser(prog="python -m pointsparse.app.train", description=__doc__.strip().splitlines()[0])
    add_arguments(parser)
    with terminated_after_cleanup():  # (torchrun's agent stops its processes by SIGTERM)
        return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
