"""``pointsparse prune channels``: cut every coupled channel group of a
trained checkpoint's model and write a checkpoint that records the pruned
widths (``pointsparse eval``, ``train --resume`` and
``pointsparse.models.load_model`` rebuild it); optionally fine-tune it by
resuming training for a few epochs. ``pointsparse prune vectors``: mask the
engine's vectors of every sparse conv of a checkpoint's model (the
granularity the fused kernels skip) and write a checkpoint that stores the
masks, which fine-tuning keeps. ``pointsparse prune offsets``: the same with
whole kernel offsets of every conv whose windows overlap (the engine leaves
a zero offset's pairs out; on AMX CPUs the bf16 tiles run the kept ones)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from .. import checkpoint
from ..prune.workflow import CRITERIA, channel_scores, check_options, prune_channels
from ..tensor import positive_int


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
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="channels, vectors, offsets: epochs of fine-tuning afterwards")
    parser.add_argument("--square", action="store_true",
                        help="vectors: width x width blocks, which the input gradient skips too")
    parser.add_argument("--pairs", action="store_true",
                        help="vectors: blocks of two input channels (whole bf16 vectors, which the bf16 kernels "
                             "skip too)")
    parser.add_argument("--panels", type=int, default=1,
                        help="vectors: adjacent 16-column panels per block (2: the AVX-512 tile's width, whose "
                             "vector kernels run such blocks two vectors a row; nn.functional.tile_panels)")


def load_state(path) -> dict:
    """A training checkpoint as data (weights_only, digest checked);
    ``train.load_checkpoint``: a config value of the wrong kind a
    ValueError naming the file."""
    from .train import load_checkpoint
    return load_checkpoint(path)


def save_pruned(state: dict, model, out) -> Path:
    """``out/checkpoint.pt``: ``state`` with ``model``'s weights, widths
    (``config["widths"]``), VoxelSkip and VoxelPrune layers (``voxel_skip``,
    ``voxel_prune``: :func:`pointsparse.models.voxel_skips` /
    :func:`~pointsparse.models.voxel_prunes`, left out where it has none)
    and a fresh optimizer state for its shapes and parameters (a learned
    scorer's among them)."""
    from ..models import voxel_prunes, voxel_skips
    from ..prune.graph import widths
    from .train import CHECKPOINT, make_optimizer
    config = dict(state["config"], widths=widths(model))
    for key, recorded in (("voxel_skip", voxel_skips(model)), ("voxel_prune", voxel_prunes(model))):
        if recorded:
            config[key] = recorded
        else:
            config.pop(key, None)
    new = dict(state, model=model.state_dict(), config=config)
    if state.get("args"):
        new["optimizer"] = make_optimizer(argparse.Namespace(**state["args"]), model).state_dict()
    out = Path(out)
    checkpoint.make_directory(out)
    checkpoint.save(out / CHECKPOINT, new)
    return out / CHECKPOINT


def prune_checkpoint(path, out, ratio: float = 0.5, data=None, label_map=None, criterion: str = "l1",
                     scope: str = "group", multiple: int | None = None) -> Path:
    """Write ``out/checkpoint.pt``: the checkpoint's model with ``ratio`` of
    every coupled channel group kept (ranked by ``criterion``), the widths in
    ``config["widths"]``, a fresh optimizer state for the smaller model and
    the run's epoch, schedule and history. Returns its path."""
    from .evaluate import checkpoint_model
    from .tasks import checkpoint_batches
    from .scoring import logits_of, point_level
    check_options(criterion, ratio)
    state = load_state(path)
    model = checkpoint_model(state, path).eval()  # scoring (Taylor's backward included) leaves the BatchNorm statistics alone
    batch = checkpoint_batches(state, data, label_map)[0]
    example = ((batch.input, batch.inverse, batch.points, batch.point_batch) if point_level(model)
               else batch.input)
    ignore_index = state["config"].get("ignore_index", 255)
    if criterion == "taylor":
        from .tasks import require_labelled

        require_labelled([batch], ignore_index, "--criterion taylor (scores by the loss's gradient)", data)

    def loss_fn(m, b):
        logits, labels = logits_of(m, b)
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)

    scores = channel_scores(criterion, model, loss_fn, [batch])
    prune_channels(model, example, ratio, scores, scope, multiple)
    return save_pruned(state, model, out)


def prune_vectors_checkpoint(path, out, amount: float, square: bool = False, rows: int | None = None,
                             panels: int = 1) -> Path:
    """Write ``out/checkpoint.pt``: the checkpoint's model (dense or
    channel-pruned) with ``amount`` of the alive engine vectors of every
    sparse conv with more than one offset (a ``kernel_region`` conv's: its
    region's) pruned by magnitude (:func:`pointsparse.prune.panel_structured`; ``square``: width x width
    blocks; ``rows``: input channels per block, 2 for whole bf16 vectors;
    ``panels``: adjacent panels per block), the masks stored as ``torch.nn.utils.prune`` stores them
    (``weight_orig`` + ``weight_mask``): ``load_model``, ``pointsparse eval``
    and ``train --resume`` rebuild them, and fine-tuning keeps the masked
    weights at zero (they get no gradient). ``prune.remove`` (or
    ``nn.fuse_for_inference`` after it) makes them plain weights for
    inference. The run's epoch, schedule and history are kept, the optimizer
    state is fresh. Returns its path."""
    return _prune_vectors(path, out, amount, square, rows, panels)[0]


def _prune_vectors(path, out, amount: float, square: bool, rows: int | None = None,
                   panels: int = 1) -> tuple[Path, int, int]:
    """:func:`prune_vectors_checkpoint`, and the weights its masks keep and cover."""
    from .evaluate import checkpoint_model
    from ..nn import Conv3d
    from ..prune import adapters, panel_structured
    _check_amount(amount, "vectors")
    panels = positive_int(panels, "panels (--panels: adjacent panels per block)")
    state = load_state(path)
    model = checkpoint_model(state, path)
    # (offsets the conv runs: a kernel_region conv of one offset is a 1x1x1 conv in effect)
    convs = [m for m in model.modules() if isinstance(m, Conv3d) and adapters.kernel_volume(m) > 1]
    if not convs:
        raise ValueError(f"{path}: the model has no sparse conv with more than one offset to prune by vectors")
    for module in convs:
        panel_structured(module, "weight", float(amount), square=square, rows=rows, panels=panels)
    masks = [_weights_of(m, m.weight_mask) for m in convs]
    return save_pruned(state, model, out), sum(int(m.count_nonzero()) for m in masks), sum(m.numel() for m in masks)


def _weights_of(module, mask):
    """The entries of ``mask`` (of ``module``'s weight shape) at the conv's
    weights: a ``kernel_region`` conv's region's offsets (the others, never
    run, count as neither kept nor pruned)."""
    from ..prune import adapters
    return adapters.adapter_for(module).used_weights(module, mask)


def overlapping_convs(model) -> list:
    """The sparse convs of ``model`` whose windows overlap (a kernel wider
    than its stride on some axis: submanifold and strided k3 convs), the
    ones ``prune offsets`` prunes: in a conv whose kernel equals its stride
    (MinkUNet's k2 s2 down- and upsampling) every input row meets one output
    row through one offset, so a pruned offset would cut those voxels off.
    A ``kernel_region`` conv's windows are its region's offsets (the box they
    span against the stride)."""
    from ..nn import Conv3d
    from ..prune import adapters
    return [m for m in model.modules() if isinstance(m, Conv3d) and adapters.kernel_volume(m) > 1
            and any(k > s for k, s in zip(adapters.kernel_extents(m), m.stride))]


def prune_offsets_checkpoint(path, out, amount: float) -> Path:
    """Write ``out/checkpoint.pt``: the checkpoint's model (dense or
    channel-pruned) with ``amount`` of the kernel offsets of every conv of
    :func:`overlapping_convs` pruned by their weights' L2 norm
    (:func:`pointsparse.prune.kernel_structured`, ``scope="offset"``; of 27
    offsets, 0.74 prunes 20 and keeps 7), stored and kept through
    fine-tuning as :func:`prune_vectors_checkpoint`'s masks. The engine runs
    only the kept offsets' pairs, forward and backward, and its bf16 forward
    runs them on the AMX tiles where the CPU has them (bench/RESULTS.md).
    Returns its path."""
    return _prune_offsets(path, out, amount)[0]


def _check_amount(amount, what: str) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
            or not 0.0 <= amount < 1.0:
        raise ValueError(f"amount (--sparsity) must be a number in [0, 1): the fraction of each conv's {what} "
                         f"pruned; got {amount!r}")


def _prune_offsets(path, out, amount: float) -> tuple[Path, int, int]:
    """:func:`prune_offsets_checkpoint`, and the offsets its masks keep and cover."""
    from .evaluate import checkpoint_model
    from ..prune import kernel_structured
    _check_amount(amount, "kernel offsets")
    state = load_state(path)
    model = checkpoint_model(state, path)
    convs = overlapping_convs(model)
    if not convs:
        raise ValueError(f"{path}: the model has no sparse conv whose windows overlap (kernel wider than its "
                         "stride) to prune by offsets")
    for module in convs:
        kernel_structured(module, "weight", float(amount), scope="offset")
    kept = sum(int(_weights_of(m, m.weight_mask).flatten(1).any(1).sum()) for m in convs)
    return save_pruned(state, model, out), kept, sum(_weights_of(m, m.weight_mask).shape[0] for m in convs)


def finetune(path: Path, epochs: int) -> None:
    """Resume training the checkpoint at ``path`` for ``epochs`` more epochs
    (same options as the run that wrote it; output beside it)."""
    from .train import main
    state = load_state(path)
    args = argparse.Namespace(**state["args"])
    args.out, args.resume = str(path.parent), str(path)
    args.init = None  # (the run's --init gave its first weights; the resumed ones are the checkpoint's)
    args.epochs = int(state["epoch"]) + epochs
    args.time_budget = args.time_limit = None
    main(args)


def _check_flags(args, procedure: str) -> None:
    """ValueError (exit status 2, as for the other bad flags) naming a missing
    --checkpoint, a negative --finetune-epochs, a --multiple under 1 or an
    --out that is a file, before any work (nothing is made here: the pruned
    checkpoint's writer makes --out)."""
    if args.checkpoint is None:
        raise ValueError(f"prune {procedure} needs --checkpoint DIR/checkpoint.pt (a checkpoint written by "
                         "pointsparse train)")
    if args.finetune_epochs < 0:
        raise ValueError(f"--finetune-epochs must be >= 0 (0: no fine-tuning); got {args.finetune_epochs}")
    if getattr(args, "multiple", None) is not None and args.multiple < 1:
        raise ValueError(f"--multiple must be >= 1 (kept channel counts are rounded to it); got {args.multiple}")
    if args.out is not None:
        checkpoint.check_directory(args.out)


def vectors_main(args) -> int:
    _check_flags(args, "vectors")
    amount = 0.75 if args.sparsity is None else args.sparsity
    if args.square and args.pairs:
        raise ValueError("--square and --pairs are two block shapes: give one")
    path, kept, total = _prune_vectors(args.checkpoint, args.out, amount, args.square, 2 if args.pairs else None,
                                       args.panels)
    print(f"pruned checkpoint {path}: engine vectors masked, {kept} of the {total} weights of its convs with more "
          f"than one offset kept ({kept / total:.2f})")
    if args.finetune_epochs > 0:
        finetune(path, args.finetune_epochs)
    return 0


def offsets_main(args) -> int:
    _check_flags(args, "offsets")
    amount = 0.74 if args.sparsity is None else args.sparsity
    path, kept, total = _prune_offsets(args.checkpoint, args.out, amount)
    print(f"pruned checkpoint {path}: kernel offsets masked, {kept} of the {total} offsets of its convs whose "
          f"windows overlap kept ({kept / total:.2f})")
    if args.finetune_epochs > 0:
        finetune(path, args.finetune_epochs)
    return 0


def main(args) -> int:
    _check_flags(args, "channels")
    path = prune_checkpoint(args.checkpoint, args.out, args.ratio, args.data, args.label_map, args.criterion,
                            args.scope, args.multiple)
    before = sum(t.numel() for t in load_state(args.checkpoint)["model"].values())
    after = sum(t.numel() for t in load_state(path)["model"].values())
    print(f"pruned checkpoint {path}: {before} -> {after} stored values ({after / before:.2f})")
    if args.finetune_epochs > 0:
        finetune(path, args.finetune_epochs)
    return 0
