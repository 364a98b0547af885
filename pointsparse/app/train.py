"""Train a sparse U-Net for point cloud semantic segmentation and report its mIoU.

``pointsparse train --data generated|PATH... --out DIR`` trains a MinkUNet
(generated LiDAR street scenes by default, or SemanticKITTI, .npy/.npz,
LAS/LAZ, PLY/PCD, S3DIS text), validates after every epoch, checkpoints
atomically to ``DIR/checkpoint.pt`` (``--resume`` continues exactly), and
writes ``DIR/metrics.json`` and PNGs (curves, confusion matrix, top-down
render). ``--nproc N`` (or ``torchrun --nproc_per_node N -m
pointsparse.train``) trains with DistributedDataParallel: gloo on the CPU,
nccl on GPUs, a DistributedSampler, synchronised batch norm, logging and
checkpoints on rank 0. ``pointsparse eval --checkpoint C --data D`` scores a
checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, metrics
from .data import (DEFAULT_IGNORE, NUM_FEATURES, VALIDATION_SEED, Batch, CloudFiles, VoxelDataset, collate,
                   open_source)
from .data.generated import MAX_AZIMUTH_STEPS, MAX_BEAMS, MAX_RANGE
from .models import SPVCNN, SyncBatchNorm

MODELS = ("minkunet", "spvcnn")
SCHEDULES = ("cosine", "onecycle", "step", "constant")
OPTIMIZERS = ("adamw", "sgd")
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"


# --------------------------------------------------------------------- arguments

def add_data_arguments(parser, ignore_default: int | None = DEFAULT_IGNORE) -> None:
    """The data flags shared by train and eval; ``ignore_default=None`` (eval)
    means the checkpoint's ignore index, else ``DEFAULT_IGNORE``."""
    parser.add_argument("--data", nargs="+", default=["generated"], metavar="SOURCE",
                        help="'generated' (LiDAR street scenes, the default), 'generated-indoor', or point cloud "
                             "files/folders/globs: SemanticKITTI sequence folders or velodyne/*.bin, .npy/.npz, "
                             ".las/.laz, .ply/.pcd, S3DIS .txt or room folders")
    parser.add_argument("--label-map", default=None, metavar="NAME|JSON",
                        help="raw class id -> training id map: a JSON file or a name in datasets/ "
                             "(semantic-kitti [default for .bin], semantic-kitti-learning, ign-lidarhd, s3dis)")
    default_text = (f"{DEFAULT_IGNORE}" if ignore_default is not None
                    else f"the checkpoint's, else {DEFAULT_IGNORE}")
    parser.add_argument("--ignore-index", type=int, default=ignore_default,
                        help=f"label that counts nowhere, in loss or metrics (default {default_text})")
    parser.add_argument("--batch-size", type=int, default=2, help="scans per step, over all processes (default 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: torch's default divided among processes)")
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
    parser.add_argument("--scenes", type=int, default=24, help="generated training scenes (default 24)")
    parser.add_argument("--val-scenes", type=int, default=4, help="generated validation scenes (default 4)")
    parser.add_argument("--max-range", type=float, default=50.0, help="generated scenes: LiDAR range in m (default 50)")
    parser.add_argument("--beams", type=int, default=64, help="generated scenes: LiDAR beams (default 64)")
    parser.add_argument("--azimuth-steps", type=int, default=1024,
                        help="generated scenes: returns per beam and turn (default 1024)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for checkpoints, metrics.json and PNGs")
    parser.add_argument("--model", choices=MODELS, default="minkunet",
                        help="minkunet (voxel U-Net) or spvcnn (with a point branch; per-point logits)")
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
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up share of the steps (default 0.05)")
    parser.add_argument("--class-weights", choices=("none", "sqrt-inverse"), default="none",
                        help="loss weight per class: none, or 1/sqrt(share of the training points), mean 1 over "
                             "the classes present (default none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, shuffling and augmentation")
    parser.add_argument("--no-augment", action="store_true", help="no rotation/scaling/flip/jitter")
    parser.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue a run (default: DIR/checkpoint.pt)")
    parser.add_argument("--init", default=None, metavar="CHECKPOINT",
                        help="start from a checkpoint's weights (fine-tuning); classifier rows are matched by "
                             "class name, other layers by name and shape")
    parser.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                        help="stop after the epoch during which this much training time has passed")
    parser.add_argument("--eval-every", type=int, default=1, metavar="N",
                        help="validate every N epochs and after the last (default 1)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="fit the number of epochs (at most --epochs) to this much training time, "
                             "re-planned after every epoch from the mean epoch time; the learning-rate schedule "
                             "follows the planned count")
    parser.add_argument("--nproc", type=int, default=1,
                        help="training processes on this machine (DistributedDataParallel; default 1)")


def add_eval_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by pointsparse train")
    add_data_arguments(parser, ignore_default=None)
    parser.set_defaults(data=None)
    parser.add_argument("--out", default=None, metavar="DIR", help="also write metrics.json and PNGs here")


def _check_args(args) -> None:
    for name in ("epochs", "batch_size", "nproc", "scenes", "val_scenes", "blocks", "eval_every", "beams",
                 "azimuth_steps", "threads"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
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
    value = getattr(args, "val_fraction", None)
    if value is not None and not 0 < value < 1:
        raise ValueError(f"--val-fraction must be in (0, 1); got {value}")
    value = getattr(args, "warmup", None)
    if value is not None and not 0 <= value <= 1:
        raise ValueError(f"--warmup must be a share of the steps in [0, 1]; got {value}")
    if getattr(args, "nproc", 1) > 1 and args.batch_size % args.nproc:
        raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of --nproc ({args.nproc})")


# --------------------------------------------------------------------- data

def _require_labels(source, flag: str) -> None:
    """ValueError naming the first cloud of ``source`` without labels (sources
    cache what they read, so this costs no second read)."""
    for sample in source:
        if sample.labels is None:
            raise ValueError(f"{flag}: {sample.name} has no labels; training and validation need labelled clouds")


def open_training_data(args):
    """(train samples, validation samples, class names)."""
    generated = args.data[0].startswith("generated") and len(args.data) == 1
    if generated:
        kwargs = _scene_kwargs(vars(args)) if args.data[0] != "generated-indoor" else {}
        train = open_source(args.data, count=args.scenes, first_seed=args.seed * 10_000, **kwargs)
        val = (open_source(args.data, count=args.val_scenes, first_seed=VALIDATION_SEED, **kwargs)
               if args.val_data is None
               else open_source(args.val_data, args.val_label_map or args.label_map, args.ignore_index))
        if args.val_data is not None:
            _require_labels(val, "--val-data")
        return train, val, list(train.classes)
    train = open_source(args.data, args.label_map, args.ignore_index)
    if args.val_data is not None:
        val = open_source(args.val_data, args.val_label_map or args.label_map or train.label_map,
                          args.ignore_index)
        if val.classes is not None and train.classes is not None and val.classes != train.classes:
            raise ValueError(f"validation classes {val.classes} differ from the training classes {train.classes}")
    else:
        held = int(round(len(train) * args.val_fraction))
        if len(train) < 2 or held < 1:
            print("note: one training cloud and no --val-data: validating on the training data", file=sys.stderr)
            val = train
        else:
            files = train.paths
            val = CloudFiles(files[-held:], train.label_map, args.ignore_index)
            train = CloudFiles(files[:-held], train.label_map, args.ignore_index)
    _require_labels(train, "--data")
    _require_labels(val, "--val-data")
    classes = train.classes
    if classes is None:
        top = max(int(np.max(s.labels[s.labels != args.ignore_index], initial=0)) for s in train)
        classes = [f"class{i}" for i in range(top + 1)]
        print(f"note: no --label-map: using the raw labels as {len(classes)} classes", file=sys.stderr)
    return train, val, list(classes)


def _scene_kwargs(options: dict) -> dict:
    return {"max_range": options.get("max_range", 50.0), "beams": options.get("beams", 64),
            "azimuth_steps": options.get("azimuth_steps", 1024)}


# --------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pick_device(name, rank: int) -> torch.device:
    if name is None:
        return torch.device(f"cuda:{rank % torch.cuda.device_count()}") if torch.cuda.is_available() else \
            torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{rank % max(torch.cuda.device_count(), 1)}")
    return device


def _init_distributed(args) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = _pick_device(args.device, local)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    threads = args.threads or max(1, torch.get_num_threads() // max(world, 1))
    torch.set_num_threads(threads)
    return Dist(rank, world, device)


def _spawn_worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    args.nproc = 1
    try:
        with _out_lock(args):
            _, model = _train(args)
        if getattr(args, "rank_weights", None):  # set by the tests, not a command-line flag
            torch.save(model.state_dict(), Path(args.rank_weights) / f"rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------- model, optimiser, schedule

def build_model(config: dict) -> torch.nn.Module:
    """The config's model, dense or with the pruned widths it records."""
    from .models import build_model as build
    return build(config)


def point_level(model) -> bool:
    """Whether the model (maybe inside DistributedDataParallel) returns per-point logits."""
    return isinstance(getattr(model, "module", model), SPVCNN)


def logits_of(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the labels they are scored against): per voxel for MinkUNet,
    per point for SPVCNN."""
    if point_level(model):
        return model(batch.input, batch.inverse, batch.points, batch.point_batch), batch.point_labels
    return model(batch.input).feats, batch.labels


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


def make_optimizer(args, model) -> torch.optim.Optimizer:
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)


def init_from(model: torch.nn.Module, checkpoint: dict, classes: list[str]) -> list[str]:
    """Copy a checkpoint's weights into ``model``: every tensor with the same
    name and shape, and the classifier rows of classes with the same name.
    Returns the names of the tensors copied."""
    src = checkpoint["model"]
    src_classes = checkpoint["config"]["classes"]
    own = model.state_dict()
    copied = []
    with torch.no_grad():
        for name, value in src.items():
            if name.startswith("classifier."):
                continue
            if name in own and own[name].shape == value.shape:
                own[name].copy_(value)
                copied.append(name)
        head = "classifier.fn." if "classifier.fn.weight" in own else "classifier."
        src_head = "classifier.fn." if "classifier.fn.weight" in src else "classifier."
        weight, bias = src.get(src_head + "weight"), src.get(src_head + "bias")
        if weight is not None and weight.shape[1] == own[head + "weight"].shape[1]:
            for i, c in enumerate(classes):
                if c in src_classes:
                    j = src_classes.index(c)
                    own[head + "weight"][i] = weight[j]
                    own[head + "bias"][i] = bias[j]
            copied.append("classifier (rows of " + ", ".join(c for c in classes if c in src_classes) + ")")
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
    naming the file when it is missing, damaged or not a checkpoint."""
    state = checkpoint.load(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a pointsparse training checkpoint")
    return state


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite."""


def check_finite_loss(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the training loss is {loss} at step {step}: training diverged (lower --lr, "
                               "check the data for NaN/inf features); no checkpoint was written for this epoch")


def check_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise TrainingDiverged(f"{name} holds NaN/inf after epoch {epoch}: training diverged (lower --lr); "
                                   "no checkpoint was written for this epoch")


# --------------------------------------------------------------------- evaluation

@torch.no_grad()
def predict(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(voxel logits, per-point predicted class) of a batch."""
    logits, _ = logits_of(model, batch)
    if point_level(model):
        return logits, logits.argmax(1)
    return logits, logits.argmax(1)[batch.inverse]


@torch.no_grad()
def evaluate(model, dataset: VoxelDataset, num_classes: int, ignore_index: int, device, batch_size: int = 1,
             progress: bool = False, keep_first: bool = True):
    """Point-level confusion matrix over ``dataset`` and, for the first
    sample, (xyz, labels, predictions) for the render."""
    was_training = model.training
    model.eval()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    first = None
    indices = list(range(len(dataset)))
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    bar = _bar(chunks, "eval", progress)
    for chunk in bar:
        batch = collate([dataset[i] for i in chunk]).to(device)
        _, pred = predict(model, batch)
        cm += metrics.confusion_matrix(pred, batch.point_labels, num_classes, ignore_index)
        if keep_first and first is None:
            sel = (batch.point_batch == 0).cpu()
            first = (batch.xyz[0], batch.point_labels.cpu()[sel].numpy(), pred.cpu()[sel].numpy(), batch.names[0])
    model.train(was_training)
    return cm, first


def _have_tqdm() -> bool:
    """tqdm is a dependency, but a trimmed install still trains (no bars)."""
    import importlib.util

    try:
        return importlib.util.find_spec("tqdm") is not None
    except (ImportError, ValueError):
        return False


def _bar(iterable, desc: str, enabled: bool, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **kwargs)


def write_report(out: Path, cm, classes, first, history, extra: dict, ignore_index: int, prefix: str = "") -> dict:
    """metrics.json and the PNGs (none, with a warning, where matplotlib
    cannot be imported); returns the metrics dictionary."""
    from . import plots

    out.mkdir(parents=True, exist_ok=True)
    report = metrics.summary(cm, classes)
    report.update(extra)
    report["classes"] = list(classes)
    report["confusion"] = np.asarray(cm).tolist()
    pictures = {}
    if not plots.available():
        print("matplotlib is not importable: no PNG figures written (pip install matplotlib)", file=sys.stderr)
    else:
        if history and history.get("step_loss"):
            pictures["curves"] = str(plots.curves(history, out / f"{prefix}curves.png"))
        pictures["confusion"] = str(plots.confusion(cm, classes, out / f"{prefix}confusion.png"))
        if first is not None:
            xyz, labels, pred, _ = first
            pictures["topdown"] = str(plots.topdown(xyz, labels, pred, classes, out / f"{prefix}topdown.png",
                                                    ignore_index=ignore_index))
    report["pictures"] = pictures
    if history:
        report["history"] = history
    text = (json.dumps(report, indent=1) + "\n").encode()
    checkpoint.atomic_write(out / f"{prefix}metrics.json", lambda f: f.write(text))
    return report


# --------------------------------------------------------------------- training

def train(args) -> dict | None:
    """Run the training job of ``args``; returns the final metrics on rank 0."""
    with _out_lock(args):
        return _train(args)[0]


_LOCK_HELD = "POINTSPARSE_OUT_LOCK_HELD"


def _out_lock(args):
    """The lock on ``--out`` for the run: taken by the process that starts it
    (the single process, torchrun's rank 0, or the parent of ``--nproc``
    workers, which then hold none)."""
    import contextlib

    if os.environ.get(_LOCK_HELD) == str(args.out) or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return checkpoint.DirectoryLock(args.out, "--out")


def _train(args):
    dist = _init_distributed(args)
    out = Path(args.out)
    progress = dist.main and not args.no_progress and _have_tqdm()
    log = (lambda *a: print(*a, flush=True)) if dist.main else (lambda *a: None)

    train_src, val_src, classes = open_training_data(args)
    resume_state = None
    if args.resume is not None:
        path = out / CHECKPOINT if args.resume == "auto" else Path(args.resume)
        resume_state = load_checkpoint(path)
        config = resume_state["config"]
        log(f"resuming {path} after epoch {resume_state['epoch']}")
    else:
        config = {"in_channels": NUM_FEATURES, "classes": classes, "cr": args.cr, "blocks": args.blocks,
                  "voxel_size": args.voxel_size, "ignore_index": args.ignore_index, "model": args.model}
    if config["classes"] != classes:
        raise ValueError(f"the checkpoint's classes {config['classes']} differ from the data's {classes}")

    torch.manual_seed(args.seed)
    model = build_model(config)
    if args.init and resume_state is None:
        copied = init_from(model, load_checkpoint(args.init), classes)
        log(f"initialised {len(copied)} tensors from {args.init}")
    if dist.active:
        model = SyncBatchNorm.convert(model)
    model.to(dist.device)
    optimizer = make_optimizer(args, model)
    train_ds = VoxelDataset(train_src, config["voxel_size"], args.ignore_index, train=not args.no_augment,
                            seed=args.seed)
    val_ds = VoxelDataset(val_src, config["voxel_size"], args.ignore_index)
    sampler = torch.utils.data.DistributedSampler(train_ds, num_replicas=dist.world, rank=dist.rank, shuffle=True,
                                                  seed=args.seed)
    local_batch = args.batch_size // dist.world
    steps_per_epoch = math.ceil(len(sampler) / local_batch)
    plan = {"epochs": args.epochs}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(args.schedule, s, steps_per_epoch * plan["epochs"], args.warmup))
    history = {"step_loss": [], "epoch_loss": [], "val_miou": [], "step_time": [], "lr": []}
    start_epoch, best = 0, -1.0
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        history = resume_state["history"]
        start_epoch = resume_state["epoch"]
        if args.time_budget is not None:  # keep the plan made on the first epoch
            plan["epochs"] = resume_state.get("planned_epochs", args.epochs)
        best = resume_state.get("best_miou", -1.0)
        torch.set_rng_state(resume_state["torch_rng"])

    net = model
    if dist.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"{type(model).__name__} cr={config['cr']} ({n_params / 1e6:.2f} M parameters), "
            f"{len(classes)} classes, voxel "
            f"{config['voxel_size']} m; {len(train_src)} training and {len(val_src)} validation clouds; "
            f"{dist.world} process(es) on {dist.device}, {torch.get_num_threads()} thread(s) each; "
            f"{steps_per_epoch} steps per epoch")

    t_load = time.perf_counter()
    for source in (train_src, val_src):
        for _ in source:  # generate or read every cloud once, outside the timed steps
            pass
    log(f"data ready in {time.perf_counter() - t_load:.1f} s")
    weight = None
    if getattr(args, "class_weights", "none") != "none":
        weight = class_weights(train_src, len(classes), args.ignore_index).to(dist.device)
        log("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(classes, weight.tolist())))
    t_start = time.perf_counter()
    train_time = sum(history["step_time"])
    report = None
    epoch = start_epoch
    while epoch < plan["epochs"]:
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        order = list(sampler)
        chunks = [order[i:i + local_batch] for i in range(0, len(order), local_batch)]
        net.train()
        losses = []
        bar = _bar(chunks, f"epoch {epoch + 1}/{plan['epochs']}", progress)
        for chunk in bar:
            t0 = time.perf_counter()
            batch = collate([train_ds[i] for i in chunk]).to(dist.device)
            logits, target = logits_of(net, batch)
            ce = torch.nn.functional.cross_entropy(logits, target, weight=weight, ignore_index=args.ignore_index,
                                                   reduction="sum")
            valid = target != args.ignore_index
            counted = valid.sum() if weight is None else weight[target[valid]].sum()
            stats = torch.stack([ce.detach(), counted.to(ce.dtype)])
            if dist.active:
                torch.distributed.all_reduce(stats)
            # Sum over every process's voxels / their global count: the same
            # loss (and, with DDP's averaging, gradient) as one process on the
            # whole batch.
            loss = ce / stats[1].clamp_min(1) * dist.world
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_loss = float(stats[0] / stats[1].clamp_min(1))
            check_finite_loss(step_loss, len(history["step_loss"]) + 1)
            dt = time.perf_counter() - t0
            train_time += dt
            losses.append(step_loss)
            history["step_loss"].append(step_loss)
            history["step_time"].append(dt)
            history["lr"].append(optimizer.param_groups[0]["lr"])
            if progress:
                bar.set_postfix(loss=f"{step_loss:.3f}", s_per_step=f"{dt:.2f}")
        history["epoch_loss"].append(float(np.mean(losses)) if losses else math.nan)
        if args.time_budget is not None:
            # Re-planned after every epoch from the mean epoch time so far
            # (the machine's load may change during the run).
            per_epoch = max(sum(history["step_time"]) / (epoch + 1), 1e-9)
            fit = max(epoch + 1, int(args.time_budget * 60 / per_epoch))
            if dist.active:  # every process must follow rank 0's plan
                fit_t = torch.tensor([fit], dtype=torch.int64)
                torch.distributed.broadcast(fit_t, 0)
                fit = int(fit_t)
            if min(args.epochs, fit) != plan["epochs"]:
                plan["epochs"] = min(args.epochs, fit)
                log(f"time budget {args.time_budget} min: {plan['epochs']} epochs of about {per_epoch:.0f} s")
        stop = args.time_limit is not None and train_time >= args.time_limit * 60
        last = epoch + 1 == plan["epochs"] or stop
        validate = last or (epoch + 1) % args.eval_every == 0
        check_finite_weights(model, epoch + 1)
        if dist.main:
            summary = (f"epoch {epoch + 1}/{plan['epochs']}: loss {history['epoch_loss'][-1]:.4f}, "
                       f"{np.median(history['step_time'][-len(losses):]):.2f} s/step, "
                       f"{train_time / 60:.1f} min of training")
            miou = -1.0
            if validate:
                cm, first = evaluate(model, val_ds, len(classes), args.ignore_index, dist.device, progress=progress)
                miou = metrics.mean_iou(cm)
                history["val_miou"].append(miou)
                history.setdefault("val_epoch", []).append(epoch + 1)
                summary += f", val mIoU {100 * miou:.1f}%"
            log(summary)
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                     "config": config, "torch_rng": torch.get_rng_state(),
                     "best_miou": max(best, miou) if validate else best,
                     "planned_epochs": plan["epochs"],
                     "val_paths": [str(p) for p in getattr(val_src, "paths", [])],
                     "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}
            save_checkpoint(out / CHECKPOINT, state)
            if validate and miou > best:
                best = miou
                save_checkpoint(out / BEST, state)
            if last:
                times = history["step_time"]
                extra = {"epochs": epoch + 1, "steps": len(times), "train_time_s": train_time,
                         "wall_time_s": time.perf_counter() - t_start,
                         "step_time_s_median": statistics.median(times) if times else None,
                         "scans_per_step": args.batch_size,
                         "step_time_per_scan_s": statistics.median(times) / args.batch_size if times else None,
                         "processes": dist.world, "threads_per_process": torch.get_num_threads(),
                         "device": str(dist.device), "data": args.data, "val_data": args.val_data or "held out",
                         "config": config, "checkpoint": str(out / CHECKPOINT), "best_miou": best,
                         "stopped_by_time_limit": bool(stop and epoch + 1 < plan["epochs"])}
                report = write_report(out, cm, classes, first, history, extra, args.ignore_index)
                log("\n" + metrics.format_table(cm, classes))
        if dist.active:
            torch.distributed.barrier()
        if stop:
            break
        epoch += 1
    return report, model


def main(args) -> int:
    _check_args(args)
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        import torch.multiprocessing as mp

        port = _free_port()
        # Only the options travel to the workers (the CLI adds module objects).
        plain = argparse.Namespace(**{k: v for k, v in vars(args).items() if not k.startswith("_")})
        with _out_lock(args):
            os.environ[_LOCK_HELD] = str(args.out)
            try:
                mp.spawn(_spawn_worker, args=(args.nproc, port, plain), nprocs=args.nproc, join=True)
            finally:
                os.environ.pop(_LOCK_HELD, None)
        metrics_path = Path(args.out) / "metrics.json"
        if metrics_path.is_file():
            print(f"metrics: {metrics_path}")
        return 0
    report = train(args)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if report is not None:
        print(f"mIoU {100 * report['miou']:.1f}%  ->  {Path(args.out) / 'metrics.json'}")
        for name, path in report["pictures"].items():
            print(f"  {name}: {path}")
    return 0


# --------------------------------------------------------------------- eval command

def evaluate_main(args) -> int:
    """``pointsparse eval``: score a checkpoint on clouds (by default the data
    it was validated on)."""
    _check_args(args)
    state = load_checkpoint(args.checkpoint)
    config = state["config"]
    saved = state.get("args", {})
    # An explicit --ignore-index always wins, 255 included.
    ignore_index = (args.ignore_index if args.ignore_index is not None
                    else config.get("ignore_index", DEFAULT_IGNORE))
    device = _pick_device(args.device, 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    label_map = args.label_map
    if args.data:
        spec = args.data
    elif state.get("val_paths"):  # the files the run validated on
        spec = state["val_paths"]
        label_map = label_map or saved.get("val_label_map") or saved.get("label_map")
    else:
        spec = saved.get("data") or ["generated"]
        label_map = label_map or saved.get("label_map")
    if len(spec) == 1 and spec[0].startswith("generated"):
        source = open_source(spec, count=saved.get("val_scenes", 4), first_seed=VALIDATION_SEED,
                             **(_scene_kwargs(saved) if spec[0] != "generated-indoor" else {}))
        classes = list(source.classes)
    else:
        source = open_source(spec, label_map, ignore_index)
        classes = list(source.classes or config["classes"])
    if classes != config["classes"]:
        raise ValueError(f"the data's classes {classes} differ from the checkpoint's {config['classes']}")
    model = build_model(config)
    model.load_state_dict(state["model"])
    model.to(device)
    dataset = VoxelDataset(source, config["voxel_size"], ignore_index)
    t0 = time.perf_counter()
    cm, first = evaluate(model, dataset, len(classes), ignore_index, device, args.batch_size,
                         progress=not args.no_progress and _have_tqdm())
    elapsed = time.perf_counter() - t0
    print(metrics.format_table(cm, classes))
    print(f"{len(source)} clouds in {elapsed:.1f} s ({elapsed / max(len(source), 1):.2f} s per cloud)")
    if args.out:
        report = write_report(Path(args.out), cm, classes, first, None,
                              {"checkpoint": str(args.checkpoint), "data": spec, "eval_time_s": elapsed,
                               "eval_time_per_cloud_s": elapsed / max(len(source), 1)}, ignore_index, "eval-")
        print(f"metrics: {Path(args.out) / 'eval-metrics.json'}; pictures: {', '.join(report['pictures'].values())}")
    return 0


def _cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pointsparse.train", description=__doc__.strip().splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
