"""``pointsparse prune channels``: cut every coupled channel group of a
trained checkpoint's model and write a checkpoint that records the pruned
widths (``pointsparse eval``, ``train --resume`` and
``pointsparse.models.load_model`` rebuild it); optionally fine-tune it by
resuming training for a few epochs."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CRITERIA = ("l1", "l2", "bn", "taylor")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", type=Path, help="channels: a checkpoint written by pointsparse train")
    parser.add_argument("--data", nargs="+", default=None, metavar="SOURCE",
                        help="channels: clouds for the example input and the criterion (default: the run's data)")
    parser.add_argument("--label-map", default=None, help="channels: label map of --data")
    parser.add_argument("--ratio", type=float, default=0.5, help="channels: fraction of each group's channels kept")
    parser.add_argument("--criterion", choices=CRITERIA, default="l1",
                        help="channels: importance (l1/l2 weight norms, bn: BatchNorm scale, taylor: first-order)")
    parser.add_argument("--scope", choices=("group", "global"), default="group",
                        help="channels: keep --ratio of every group, or of all channels ranked together")
    parser.add_argument("--multiple", type=int, default=None,
                        help="channels: kept counts rounded to this multiple (default 8, measured fastest)")
    parser.add_argument("--finetune-epochs", type=int, default=0, help="channels: epochs of fine-tuning afterwards")


def _batches(state: dict, data, label_map, count: int = 1) -> list:
    """The first ``count`` clouds of ``data`` (default: the run's), one batch each."""
    from ..data import VoxelDataset, collate
    from ..data import open_source
    config, saved = state["config"], state.get("args", {})
    spec = data or saved.get("data") or ["generated"]
    if len(spec) == 1 and spec[0].startswith("generated"):
        source = open_source(spec, count=count, first_seed=0)
    else:
        source = open_source(spec, label_map or saved.get("label_map"), config.get("ignore_index", 255))
    dataset = VoxelDataset(source, config["voxel_size"], config.get("ignore_index", 255))
    return [collate([dataset[i % len(dataset)]]) for i in range(count)]


def _example_batch(state: dict, data, label_map):
    return _batches(state, data, label_map)[0]


def load_state(checkpoint) -> dict:
    """A training checkpoint as data (weights_only, digest checked)."""
    from ..train import load_checkpoint
    return load_checkpoint(checkpoint)


def save_pruned(state: dict, model, out) -> Path:
    """``out/checkpoint.pt``: ``state`` with ``model``'s weights and widths
    (``config["widths"]``) and a fresh optimizer state for its shapes."""
    from ..train import CHECKPOINT, make_optimizer, save_checkpoint
    from .graph import widths
    new = dict(state, model=model.state_dict(), config=dict(state["config"], widths=widths(model)))
    if state.get("args"):
        new["optimizer"] = make_optimizer(argparse.Namespace(**state["args"]), model).state_dict()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / CHECKPOINT, new)
    return out / CHECKPOINT


def checkpoint_task(checkpoint, data=None, label_map=None, clouds: int = 4):
    """A :class:`~pointsparse.prune.tasks.Task` on a trained MinkUNet
    checkpoint and the user's clouds (the first ``clouds - 1`` train, the last
    validates; metric voxel mIoU), so that AMC, NetAdapt and the other
    procedures run on a real model and real data."""
    from .. import metrics
    from ..models import build_model
    from .tasks import Task, _train_loop
    state = load_state(checkpoint)
    if str(state["config"].get("model", "minkunet")).lower() != "minkunet":
        raise ValueError("the procedures' --checkpoint takes a MinkUNet run (SPVCNN: use prune channels)")
    batches = _batches(state, data, label_map, clouds)
    train, val = batches[:-1] or batches, batches[-1]
    ignore = state["config"].get("ignore_index", 255)
    classes = len(state["config"]["classes"])
    cursor = {"i": 0}

    def make_model(seed=0):
        model = build_model(state["config"])
        model.load_state_dict(state["model"])
        return model.eval()

    def batch_fn():
        cursor["i"] = (cursor["i"] + 1) % len(train)
        return train[cursor["i"]].input, train[cursor["i"]].labels

    def loss_fn(out, labels):
        return torch.nn.functional.cross_entropy(out.feats, labels, ignore_index=ignore)

    def evaluate(model):
        was = model.training
        model.eval()
        with torch.no_grad():
            pred = model(val.input).feats.argmax(1)
        model.train(was)
        return metrics.mean_iou(metrics.confusion_matrix(pred, val.labels, classes, ignore))

    lr = float(state.get("args", {}).get("lr", 0.05)) * 0.1
    return state, Task("checkpoint", make_model, lambda m, steps, lr=lr: _train_loop(m, steps, lr, batch_fn, loss_fn),
                       evaluate, evaluate, batch_fn, loss_fn, val.input, lr, 60, "mIoU")


def _scores(criterion: str, model, batch, ignore_index: int):
    from . import criteria
    from ..train import logits_of
    if criterion in ("l1", "l2"):
        return criteria.magnitude(model, p=1 if criterion == "l1" else 2)
    if criterion == "bn":
        return criteria.bn_scaling(model)

    def loss_fn(m, b):
        logits, labels = logits_of(m, b)
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)

    return criteria.taylor(model, loss_fn, [batch])


def prune_checkpoint(checkpoint, out, ratio: float = 0.5, data=None, label_map=None, criterion: str = "l1",
                     scope: str = "group", multiple: int | None = None) -> Path:
    """Write ``out/checkpoint.pt``: the checkpoint's model with ``ratio`` of
    every coupled channel group kept (ranked by ``criterion``), the widths in
    ``config["widths"]``, a fresh optimizer state for the smaller model and
    the run's epoch, schedule and history. Returns its path."""
    from ..models import build_model
    from ..train import point_level
    from .graph import DEFAULT_MULTIPLE, DependencyGraph, plan
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio (the kept fraction) must be in (0, 1]; got {ratio}")
    state = load_state(checkpoint)
    model = build_model(state["config"])
    model.load_state_dict(state["model"])
    model.eval()  # scoring (Taylor's backward included) leaves the BatchNorm statistics alone
    batch = _example_batch(state, data, label_map)
    example = ((batch.input, batch.inverse, batch.points, batch.point_batch) if point_level(model)
               else batch.input)
    scores = _scores(criterion, model, batch, state["config"].get("ignore_index", 255))
    graph = DependencyGraph(model, example)
    graph.cut(plan(graph, ratio, scores, scope, multiple or DEFAULT_MULTIPLE), retrace=False)
    return save_pruned(state, model, out)


def finetune(path: Path, epochs: int) -> None:
    """Resume training the checkpoint at ``path`` for ``epochs`` more epochs
    (same options as the run that wrote it; output beside it)."""
    from ..train import main
    state = load_state(path)
    args = argparse.Namespace(**state["args"])
    args.out, args.resume = str(path.parent), str(path)
    args.epochs = int(state["epoch"]) + epochs
    args.time_budget = args.time_limit = None
    main(args)


def main(args) -> int:
    if args.checkpoint is None:
        raise SystemExit("prune channels needs --checkpoint DIR/checkpoint.pt")
    path = prune_checkpoint(args.checkpoint, args.out, args.ratio, args.data, args.label_map, args.criterion,
                            args.scope, args.multiple)
    before = sum(t.numel() for t in load_state(args.checkpoint)["model"].values())
    after = sum(t.numel() for t in load_state(path)["model"].values())
    print(f"pruned checkpoint {path}: {before} -> {after} stored values ({after / before:.2f})")
    if args.finetune_epochs > 0:
        finetune(path, args.finetune_epochs)
    return 0
