"""``pointsparse prune channels``: cut every coupled channel group of a
trained checkpoint's model and write a checkpoint that records the pruned
widths (``pointsparse eval``, ``train --resume`` and
``pointsparse.models.load_model`` rebuild it); optionally fine-tune it by
resuming training for a few epochs. ``pointsparse prune vectors``: mask the
engine's vectors of every sparse conv of a checkpoint's model (the
granularity the fused kernels skip) and write a checkpoint that stores the
masks, which fine-tuning keeps. ``pointsparse prune offsets``: the same with
whole kernel offsets of every conv whose windows overlap (the engine leaves
a zero offset's pairs out; on AMX CPUs the bf16 tiles run the kept ones).
``pointsparse prune voxels``: spatial pruning, VoxelSkip around the convs
of every residual block of a MinkUNet's decoder stages (an SPVCNN's voxel
U-Net's; or VoxelPrune on their input), recorded in the checkpoint's config."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .. import checkpoint
from ..nn import VoxelPrune
from ..prune.workflow import CRITERIA, channel_scores, check_options, prune_channels
from ..tensor import positive_int

#: ``prune voxels``' placements: VoxelSkip around each residual block's convs, or VoxelPrune on a stage's input.
PLACEMENTS = ("skip", "prune")


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", type=Path,
                        help="a checkpoint written by pointsparse train: channels, vectors, offsets, voxels prune it; "
                             "sensitivity, schedule, lottery, init, rigl, amc, netadapt run on its MinkUNet or SPVCNN "
                             "and its run's clouds (all but sensitivity write the pruned checkpoint in --out)")
    parser.add_argument("--data", nargs="+", default=None, metavar="SOURCE",
                        help="with --checkpoint, clouds (default: the run's data) for channels' example input and "
                             "criterion, and for the task of sensitivity, schedule, lottery, init, rigl, amc, "
                             "netadapt")
    parser.add_argument("--label-map", default=None,
                        help="the label map of --data (channels, sensitivity, schedule, lottery, init, rigl, amc, "
                             "netadapt; default: as eval reads --data, the run's (its --val-label-map but for files "
                             "of its training clouds' format), or the default map its clouds took where --data's "
                             "format takes it too: other formats are refused, and so are labelled files whose "
                             "format reads them through another map of the run's classes, as eval refuses them)")
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="read the finite points of clouds some of whose positions are NaN or inf (organised "
                             "clouds: points without a return), the others left out as train --skip-nonfinite "
                             "leaves them (channels, sensitivity, schedule, lottery, init, rigl, amc, netadapt); "
                             "without it such a cloud is refused (the run's data, without --data, are read as its "
                             "train --skip-nonfinite read them)")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="channels: fraction of each group's channels kept; voxels: fraction of the voxels each "
                             "VoxelSkip / VoxelPrune keeps (its keep_ratio), default 0.5")
    parser.add_argument("--criterion", choices=CRITERIA, default="l1",
                        help="channels: importance (l1/l2 weight norms, bn: BatchNorm scale, taylor: first-order)")
    parser.add_argument("--scope", choices=("group", "global"), default="group",
                        help="channels: keep --ratio of every group, or of all channels ranked together")
    parser.add_argument("--multiple", type=int, default=None,
                        help="channels: kept counts rounded to this multiple (default 8, measured fastest)")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="channels, vectors, offsets, voxels: epochs of fine-tuning afterwards")
    parser.add_argument("--no-progress", action="store_true",
                        help="channels, vectors, offsets, voxels: no tqdm progress bars in --finetune-epochs' "
                             "training (as train's --no-progress)")
    parser.add_argument("--placement", choices=PLACEMENTS, default="skip",
                        help="voxels: skip (default, measured best: VoxelSkip around the convs of every residual "
                             "block of the stages; the voxels it skips pass through the block's shortcut) or prune "
                             "(VoxelPrune on the stages' input: the voxels it drops leave the stage)")
    parser.add_argument("--stages", type=int, nargs="+", default=None, metavar="J",
                        help="voxels: the decoder stages fuse[J] (SPVCNN's unet.fuse[J]; 0: stride 8 .. 3: stride 1) "
                             "to prune; default 0 1 2 (bench/voxel_prune.py's); prune takes 0 1 2 (stage 3 feeds the "
                             "classifier), of an SPVCNN 0 2 3 (default 0 2: its points are averaged into stage 1's "
                             "voxels, every point into its own)")
    parser.add_argument("--score", choices=VoxelPrune.SCORES, default="magnitude",
                        help="voxels: what ranks the voxels: magnitude (feature norm, default) or learned (a "
                             "Linear(C, 1) score, untrained until --finetune-epochs trains it with the weights)")
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


def check_out_beside(source, out, finetune: bool = False, flags=("path", "out")) -> None:
    """ValueError where the files written in ``out`` would replace the
    checkpoint ``source`` or, in its own folder (its run's), the
    checkpoint.pt beside it (the pruned checkpoint), or remove ``source``: a
    pruned checkpoint is a new run in ``out`` and removes the run's files
    there (``train.PREVIOUS_RUN``, :func:`save_pruned`). With ``finetune``
    (the resumed training writes its best epoch) a best.pt given is refused
    too. ``flags`` name the two in the message (the CLI's --checkpoint and
    --out)."""
    from .train import BEST, CHECKPOINT, PREVIOUS_RUN

    source_flag, out_flag = flags
    path, folder = Path(source), Path(out)
    written = folder / CHECKPOINT
    if not path.exists():
        return  # (the loader names a missing checkpoint)
    if written.exists() and path.resolve() == written.resolve():
        raise ValueError(f"{out_flag} {out}: the pruned checkpoint would replace {source}, the one it "
                         f"prunes ({source_flag}); give another folder")
    if not folder.is_dir() or path.resolve().parent != folder.resolve():
        return
    if written.exists():
        raise ValueError(f"{out_flag} {out}: the pruned checkpoint would replace {written}, the checkpoint of the "
                         f"run that {source} ({source_flag}) comes from; give another folder")
    if finetune and path.name == BEST:
        raise ValueError(f"{out_flag} {out}: --finetune-epochs would replace {source} ({source_flag}) with "
                         f"its best epoch ({BEST}); give another folder")
    if path.name in PREVIOUS_RUN:
        raise ValueError(f"{out_flag} {out}: the pruned checkpoint would remove {source} ({source_flag}), "
                         f"a file of the run this folder holds, which a new run there replaces; give another folder")


def save_pruned(state: dict, model, out) -> Path:
    """``out/checkpoint.pt``: ``state`` with ``model``'s weights, widths
    (``config["widths"]``), VoxelSkip and VoxelPrune layers (``voxel_skip``,
    ``voxel_prune``: :func:`pointsparse.models.voxel_skips` /
    :func:`~pointsparse.models.voxel_prunes`, left out where it has none)
    and a fresh optimizer state for its shapes and parameters (a learned
    scorer's among them). The dense run's best mIoU is left out: the pruned
    model's own best epoch (``--finetune-epochs``, ``train --resume``) is
    its ``best.pt``. The pruned model is a new run in ``out``: the files of
    the run there (its best.pt, report, eval's report) are removed first,
    saying so, as a new train run's first checkpoint removes them
    (``train.remove_previous``: a best.pt of another run beside the pruned
    checkpoint was read by eval and export of the folder's best.pt)."""
    from ..models import voxel_prunes, voxel_skips
    from ..prune.graph import widths
    from .train import CHECKPOINT, make_optimizer, remove_previous
    config = dict(state["config"], widths=widths(model))
    for key, recorded in (("voxel_skip", voxel_skips(model)), ("voxel_prune", voxel_prunes(model))):
        if recorded:
            config[key] = recorded
        else:
            config.pop(key, None)
    new = dict(state, model=model.state_dict(), config=config)
    new.pop("best_miou", None)  # (the dense model's: the pruned one's best is its fine-tuning's, best.pt there)
    if state.get("args"):
        new["optimizer"] = make_optimizer(argparse.Namespace(**state["args"]), model).state_dict()
    out = Path(out)
    checkpoint.make_directory(out)
    said = remove_previous(out)
    if said:
        print(f"the pruned checkpoint in {out}: {said}")
    checkpoint.save(out / CHECKPOINT, new)
    return out / CHECKPOINT


def prune_checkpoint(path, out, ratio: float = 0.5, data=None, label_map=None, criterion: str = "l1",
                     scope: str = "group", multiple: int | None = None, skip_nonfinite: bool = False,
                     flops: list | None = None) -> Path:
    """Write ``out/checkpoint.pt``: the checkpoint's model with ``ratio`` of
    every coupled channel group kept (ranked by ``criterion``), the widths in
    ``config["widths"]``, a fresh optimizer state for the smaller model and
    the run's epoch, schedule and history (``skip_nonfinite``: the finite
    points of ``data``'s clouds, :func:`.tasks.checkpoint_batches`).
    Returns its path. ``flops`` (a list) receives the model's FLOPs on the
    example cloud (``sparsity_report``'s total ``flops``: its nonzero
    weights' products) before and after the cut."""
    from .evaluate import checkpoint_model
    from .tasks import checkpoint_batches
    from .scoring import _model_inputs, logits_of, point_level
    check_options(criterion, ratio)
    check_out_beside(path, out)
    state = load_state(path)
    model = checkpoint_model(state, path).eval()  # scoring (Taylor's backward included) leaves the BatchNorm statistics alone
    batch = checkpoint_batches(state, data, label_map, skip_nonfinite=skip_nonfinite)[0]
    example = _model_inputs(batch, point_level(model))
    ignore_index = state["config"].get("ignore_index", 255)
    if criterion == "taylor":
        from .tasks import require_labelled

        require_labelled([batch], ignore_index, "--criterion taylor (scores by the loss's gradient)", data,
                         len(state["config"]["classes"]))

    def loss_fn(m, b):
        logits, labels = logits_of(m, b)
        return torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index)

    scores = channel_scores(criterion, model, loss_fn, [batch])
    if flops is not None:
        flops.append(_flops(model, example))
    prune_channels(model, example, ratio, scores, scope, multiple)
    if flops is not None:
        flops.append(_flops(model, example))
    return save_pruned(state, model, out)


def _flops(model, example) -> int:
    """``model``'s FLOPs on ``example`` (its nonzero weights' products, as
    ``sparsity_report`` counts them), the model left in its mode."""
    from ..prune import sparsity_report

    return int(sparsity_report(model, example)["total"]["flops"])


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
    state is fresh. Returns its path; a ValueError (nothing written) where
    ``amount`` would prune every vector of a conv."""
    return _prune_vectors(path, out, amount, square, rows, panels)[0]


def _prune_vectors(path, out, amount: float, square: bool, rows: int | None = None,
                   panels: int = 1, before: list | None = None) -> tuple[Path, int, int, list]:
    """:func:`prune_vectors_checkpoint`, the weights its masks keep and
    cover, and its ragged convs: ``(name, output panels, kept share)`` of
    each conv of more output panels than ``panels`` that ``panels`` does
    not divide (each row's last block is narrower there and counts as one
    block, so the share kept differs from ``1 - amount``). ``before`` (a
    list) receives the weights the checkpoint's masks kept already, of the
    same total (a pruned checkpoint is pruned further: ``amount`` of what
    each conv had left, torch's rule)."""
    from .evaluate import checkpoint_model
    from ..nn import Conv3d
    from ..prune import adapters, panel_structured
    _check_amount(amount, "vectors")
    panels = positive_int(panels, "panels (--panels: adjacent panels per block)")
    check_out_beside(path, out)
    state = load_state(path)
    model = checkpoint_model(state, path)
    # (offsets the conv runs: a kernel_region conv of one offset is a 1x1x1 conv in effect)
    convs = [m for m in model.modules() if isinstance(m, Conv3d) and adapters.kernel_volume(m) > 1]
    if not convs:
        raise ValueError(f"{path}: the model has no sparse conv with more than one offset to prune by vectors")
    _check_panels(panels, convs, model)
    if before is not None:
        before.append(sum(int(_weights_of(m, _held_mask(m)).count_nonzero()) for m in convs))
    for module in convs:
        panel_structured(module, "weight", float(amount), square=square, rows=rows, panels=panels)
    names = {module: name for name, module in model.named_modules()}
    for module in convs:  # (round(amount * vectors) of a small conv's vectors can be all of them)
        if not bool(_weights_of(module, module.weight_mask).any()):
            raise ValueError(f"amount (--sparsity) {amount:g} prunes every engine vector of conv "
                             f"{names[module]!r}: it would give zeros; give a smaller one")
    masks = [_weights_of(m, m.weight_mask) for m in convs]
    ragged = [(names[m], _panels_of(m), int(mask.count_nonzero()) / mask.numel()) for m, mask in zip(convs, masks)
              if _panels_of(m) > panels and _panels_of(m) % panels]
    return (save_pruned(state, model, out), sum(int(m.count_nonzero()) for m in masks), sum(m.numel() for m in masks),
            ragged)


def _held_mask(conv):
    """The pruning mask ``conv`` holds, or all ones where it holds none."""
    mask = conv.pruning_mask()
    return torch.ones_like(conv.weight, dtype=torch.bool) if mask is None else mask


def _panels_of(conv) -> int:
    """Output panels (``nn.functional.panel_width`` columns each) of ``conv``."""
    from ..nn.functional import panel_width
    return -(-conv.weight.shape[2] // panel_width(conv.weight.dtype))


def _check_panels(panels: int, convs, model) -> None:
    """ValueError naming --panels where its blocks (``panels`` panels of
    ``nn.functional.panel_width`` columns) are wider than every conv of
    ``convs`` (a block spans at most a conv's output columns, so a wider
    one masks no differently, and a huge one overflowed the block ids)."""
    from ..nn.functional import panel_width

    widest = max(convs, key=_panels_of)
    most = _panels_of(widest)
    if panels > most:
        name = next(n for n, m in model.named_modules() if m is widest)
        raise ValueError(f"panels (--panels: adjacent panels per block) {panels}: blocks wider than every conv of "
                         f"the model (the widest, {name!r}, has {widest.weight.shape[2]} output channels, {most} "
                         f"panels of {panel_width(widest.weight.dtype)}); give at most {most}")


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
    Returns its path; a ValueError (nothing written) where ``amount`` would
    prune every offset of a conv (0.99 of 27: round(26.73) = 27)."""
    return _prune_offsets(path, out, amount)[0]


def _check_amount(amount, what: str) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount) \
            or not 0.0 <= amount < 1.0:
        raise ValueError(f"amount (--sparsity) must be a number in [0, 1): the fraction of each conv's {what} "
                         f"pruned; got {amount!r}")


def _prune_offsets(path, out, amount: float, before: list | None = None) -> tuple[Path, int, int]:
    """:func:`prune_offsets_checkpoint`, and the offsets its masks keep and
    cover; ``before`` (a list) receives the offsets the checkpoint's masks
    kept already (as :func:`_prune_vectors`'s)."""
    from .evaluate import checkpoint_model
    from ..prune import kernel_structured
    _check_amount(amount, "kernel offsets")
    check_out_beside(path, out)
    state = load_state(path)
    model = checkpoint_model(state, path)
    convs = overlapping_convs(model)
    if not convs:
        raise ValueError(f"{path}: the model has no sparse conv whose windows overlap (kernel wider than its "
                         "stride) to prune by offsets")
    if before is not None:
        before.append(sum(int(_weights_of(m, _held_mask(m)).flatten(1).any(1).sum()) for m in convs))
    for module in convs:
        kernel_structured(module, "weight", float(amount), scope="offset")
    _check_kept_offsets(model, convs, amount)
    kept = sum(int(_weights_of(m, m.weight_mask).flatten(1).any(1).sum()) for m in convs)
    return save_pruned(state, model, out), kept, sum(_weights_of(m, m.weight_mask).shape[0] for m in convs)


def _check_kept_offsets(model, convs, amount: float) -> None:
    """ValueError naming the first of ``convs`` whose every kernel offset
    ``amount`` pruned (torch's rounding: round(amount * offsets)), a conv
    that would give zeros, and the most ``amount`` can be for every conv to
    keep one."""
    names = {module: name for name, module in model.named_modules()}
    offsets = [_weights_of(module, module.weight_mask).flatten(1).any(1) for module in convs]
    most = min(math.floor((len(kept) - 0.5) / len(kept) * 1e4) / 1e4 for kept in offsets)
    for module, kept in zip(convs, offsets):
        if not bool(kept.any()):
            n = len(kept)
            raise ValueError(f"amount (--sparsity) {amount:g} prunes all {n} kernel offsets of conv "
                             f"{names[module]!r} (round({amount:g} * {n}) = {round(amount * n)}): it would give "
                             f"zeros; give at most {most:.4f}")


def prune_voxels_checkpoint(path, out, keep_ratio: float = 0.5, placement: str = "skip", stages=None,
                            score: str = "magnitude") -> Path:
    """Write ``out/checkpoint.pt``: the checkpoint's MinkUNet or SPVCNN
    (dense or pruned) with, in each decoder stage ``model.fuse[j]`` (an
    SPVCNN's ``model.unet.fuse[j]``) of ``stages`` (default every stage but
    the last, stride 1; an SPVCNN's with ``"prune"``, 0 and 2), a
    :class:`~pointsparse.nn.VoxelSkip` of ``keep_ratio`` and ``score``
    around the convs (``main``) of every residual block (``placement=
    "skip"``) or a :class:`~pointsparse.nn.VoxelPrune` on the stage's input
    (``"prune"``, :func:`pointsparse.models.add_voxel_prune`; not a
    MinkUNet's last stage, whose dropped voxels would get no prediction,
    nor an SPVCNN's stage 1, into whose voxels it averages every point: its
    last stage is taken, its points classified by the point branch, a
    point whose voxel was dropped from the kept voxels around it), recorded
    in its config (``voxel_skip`` / ``voxel_prune``), so that ``load_model``,
    ``eval``, ``predict``, ``export`` and ``train --resume`` build the model
    with them. A learned score's scorers are initialised from a fixed seed
    (the same file every run) and are in the fresh optimizer state. The
    run's epoch, schedule and history are kept. Returns its path."""
    return _prune_voxels(path, out, keep_ratio, placement, stages, score)[0]


#: SPVCNN's decoder stage after which its points are averaged into the voxels (stride 4), every point into its own:
#: a VoxelPrune on that stage's input would leave points without a voxel (``models.spvcnn.point_rows``).
SPVCNN_POINTS_STAGE = 1


def _decoder(model) -> tuple[str, torch.nn.ModuleList | None]:
    """(the prefix of the modules' names, the decoder stages ``fuse``) of
    ``model``: a MinkUNet's own, an SPVCNN's voxel U-Net's (``unet.``)."""
    from ..models import SPVCNN
    if isinstance(model, SPVCNN):
        return "unet.", getattr(model.unet, "fuse", None)
    return "", getattr(model, "fuse", None)


def _voxel_stages(path, model, placement: str, stages) -> list[int]:
    """``stages`` checked against ``model``'s decoder stages (default all
    but the last; an SPVCNN's with ``placement="prune"``, all but the last
    and :data:`SPVCNN_POINTS_STAGE`): ValueError naming a model without
    them (with the file), a stage out of range (with the range), a stage
    given twice, a stage the placement cannot take (with why)."""
    from ..models import SPVCNN
    fuse = _decoder(model)[1]
    if not isinstance(fuse, torch.nn.ModuleList) or not fuse or not all(
            isinstance(stage, torch.nn.Sequential) and all(hasattr(block, "main") for block in stage)
            for stage in fuse):
        raise ValueError(f"{path}: its model ({type(model).__name__}) has no decoder stages fuse[j] of residual "
                         "blocks (MinkUNet's, SPVCNN's unet.fuse[j]) to put VoxelSkip or VoxelPrune in")
    # (a point-level model classifies every point from the point branch: its last stage may drop voxels too)
    points = isinstance(model, SPVCNN)
    last = len(fuse) - 1 if placement == "skip" or points else len(fuse) - 2
    refused = SPVCNN_POINTS_STAGE if placement == "prune" and points else None
    if stages is None:
        return [j for j in range(len(fuse) - 1) if j != refused]
    if not isinstance(stages, (list, tuple)) or not stages or not all(
            isinstance(j, int) and not isinstance(j, bool) for j in stages):
        raise ValueError(f"stages (--stages) must be a non-empty list of decoder stage numbers; got {stages!r}")
    for j in stages:
        if not 0 <= j < len(fuse):
            raise ValueError(f"--stages {j}: the model's decoder stages are 0..{len(fuse) - 1}")
        if j > last:
            raise ValueError(f"--stages {j}: --placement prune takes stages 0..{last} (stage {j} runs at stride 1 "
                             "into the classifier: the voxels dropped there would get no prediction); "
                             "--placement skip takes it")
        if j == refused:
            taken = ", ".join(str(i) for i in range(len(fuse)) if i != refused)
            raise ValueError(f"--stages {j}: an SPVCNN averages its points into the voxels that decoder stage {j} "
                             f"gives (stride {2 ** (len(fuse) - 1 - j)}), so every point needs its voxel there: "
                             f"--placement prune takes stages {taken} of an SPVCNN; --placement skip (which keeps "
                             f"every voxel) takes stage {j}")
    twice = [j for i, j in enumerate(stages) if j in stages[:i]]
    if twice:
        raise ValueError(f"--stages {' '.join(map(str, stages))}: stage {twice[0]} is given twice")
    return sorted(stages)


def _prune_voxels(path, out, keep_ratio: float, placement: str, stages, score: str) \
        -> tuple[Path, list[int], list[str]]:
    """:func:`prune_voxels_checkpoint`, the decoder stages pruned (checked,
    sorted) and the names of the modules wrapped (skip) or whose input is
    pruned (prune)."""
    from .evaluate import checkpoint_model
    from ..models import add_voxel_prune, add_voxel_skip, voxel_prunes
    from ..nn import Conv3d, VoxelSkip
    from ..nn.functional import keep_ratio_of
    if placement not in PLACEMENTS:
        raise ValueError(f"placement (--placement) must be one of {', '.join(PLACEMENTS)}; got {placement!r}")
    if score not in VoxelPrune.SCORES:
        raise ValueError(f"score (--score) must be one of {', '.join(VoxelPrune.SCORES)}; got {score!r}")
    try:
        keep_ratio = keep_ratio_of(keep_ratio)
    except (TypeError, ValueError) as error:
        raise type(error)(f"keep_ratio (--ratio) must be a number in (0, 1]: the fraction of the voxels kept; got "
                          f"{keep_ratio!r}") from None
    check_out_beside(path, out)
    state = load_state(path)
    model = checkpoint_model(state, path)
    stages = _voxel_stages(path, model, placement, stages)
    prefix, fuse = _decoder(model)
    prunes = voxel_prunes(model)

    def channels(module) -> int | None:  # a learned scorer's: the input width of the module's first conv
        return next(m for m in module.modules() if isinstance(m, Conv3d)).in_channels if score == "learned" else None

    places = []
    for j in stages:
        if placement == "prune":
            if f"{prefix}fuse.{j}" in prunes:
                raise ValueError(f"{path}: decoder stage {j} has a VoxelPrune on its input already ({prefix}fuse.{j}, "
                                 "in its config's voxel_prune)")
            places.append(f"{prefix}fuse.{j}")
            continue
        for i, block in enumerate(fuse[j]):
            name = f"{prefix}fuse.{j}.{i}.main"
            if isinstance(block.main, VoxelSkip):
                raise ValueError(f"{path}: decoder stage {j} has VoxelSkip already ({name}, in its config's "
                                 "voxel_skip)")
            # (no VoxelPrune inside the block's main: add_voxel_prune refuses one there, so the model holds none)
            places.append(name)
    add = add_voxel_prune if placement == "prune" else add_voxel_skip
    with torch.random.fork_rng(devices=[]):  # (a learned scorer's initial weights: the same every run)
        torch.manual_seed(0)
        for name in places:
            add(model, name, keep_ratio, score, channels(model.get_submodule(name)))
    return save_pruned(state, model, out), stages, places


def finetune(path: Path, epochs: int, progress: bool = True) -> int:
    """Resume training the checkpoint at ``path`` for ``epochs`` more epochs
    (same options as the run that wrote it, in one process; output beside
    it; no progress bars where ``progress`` is False, else as the run
    showed them); train's exit status."""
    from .train import main
    state = load_state(path)
    if not state.get("args"):  # (None, absent or {}: load_training takes them; save_pruned made no optimizer)
        raise ValueError(f"{path}: --finetune-epochs resumes the run with its flags, and the checkpoint records no "
                         "flags of its run (its args: a checkpoint written by hand or by another tool); the pruned "
                         "checkpoint is written there, not fine-tuned")
    args = argparse.Namespace(**state["args"])
    args.out, args.resume = str(path.parent), str(path)
    args.init = None  # (the run's --init gave its first weights; the resumed ones are the checkpoint's)
    args.epochs = int(state["epoch"]) + epochs
    args.time_budget = args.time_limit = None
    # (one process, as it always ran: a run of --nproc N records N now, and prune takes no --nproc or --device)
    args.nproc = 1
    if not progress:
        args.no_progress = True
    return main(args)


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
    before: list = []
    path, kept, total, ragged = _prune_vectors(args.checkpoint, args.out, amount, args.square,
                                               2 if args.pairs else None, args.panels, before)
    print(f"pruned checkpoint {path}: engine vectors masked, {kept} of the {total} weights of its convs with more "
          f"than one offset kept ({kept / total:.2f})")
    _note_pruned_further(args, amount, "weights", before[0], kept, total)
    if ragged:
        shown = ", ".join(f"{name!r} ({count} panel{'' if count == 1 else 's'}, {share:.2f} kept)" for name, count, share in ragged[:3])
        print(f"note: --panels {args.panels} does not divide the output panels of {len(ragged)} of its "
              f"{'conv' if len(ragged) == 1 else 'convs'} ({shown}{', ...' if len(ragged) > 3 else ''}): "
              f"each row's last block is narrower there and counts as one block, so the share kept differs from "
              f"1 - --sparsity", file=sys.stderr)
    if args.finetune_epochs > 0:
        return finetune(path, args.finetune_epochs, not args.no_progress)
    return 0


def offsets_main(args) -> int:
    _check_flags(args, "offsets")
    amount = 0.74 if args.sparsity is None else args.sparsity
    before: list = []
    path, kept, total = _prune_offsets(args.checkpoint, args.out, amount, before)
    print(f"pruned checkpoint {path}: kernel offsets masked, {kept} of the {total} offsets of its convs whose "
          f"windows overlap kept ({kept / total:.2f})")
    _note_pruned_further(args, amount, "offsets", before[0], kept, total)
    if args.finetune_epochs > 0:
        return finetune(path, args.finetune_epochs, not args.no_progress)
    return 0


def _note_pruned_further(args, amount: float, what: str, before: int, kept: int, total: int) -> None:
    """A note (stderr) where the checkpoint's masks had pruned some of
    ``what`` already: ``--sparsity`` then pruned that share of what each
    conv had left (torch's rule), so the total is sparser than it says."""
    if before < total:
        print(f"note: --checkpoint {args.checkpoint} was pruned already ({before} of the {total} {what} kept, "
              f"{before / total:.2f}): --sparsity {amount:g} pruned that share of what each conv had left "
              f"(torch.nn.utils.prune's rule), so {kept / total:.2f} of them stay in all, not {1 - amount:.2f}",
              file=sys.stderr)


def voxels_main(args) -> int:
    _check_flags(args, "voxels")
    path, stages, places = _prune_voxels(args.checkpoint, args.out, args.ratio, args.placement, args.stages,
                                         args.score)
    stages = ", ".join(map(str, stages))
    added = (f"VoxelSkip(keep_ratio={args.ratio}, score={args.score!r}) around {', '.join(places)} (the convs of "
             f"every residual block of decoder stages {stages})" if args.placement == "skip" else
             f"VoxelPrune(keep_ratio={args.ratio}, score={args.score!r}) on the input of {', '.join(places)} "
             f"(decoder stages {stages})")
    untrained = "; its scorers are untrained: give --finetune-epochs" if args.score == "learned" and \
        args.finetune_epochs == 0 else ""
    print(f"pruned checkpoint {path}: {added}{untrained}")
    if args.finetune_epochs > 0:
        return finetune(path, args.finetune_epochs, not args.no_progress)
    return 0


def main(args) -> int:
    _check_flags(args, "channels")
    flops: list = []
    path = prune_checkpoint(args.checkpoint, args.out, args.ratio, args.data, args.label_map, args.criterion,
                            args.scope, args.multiple, args.skip_nonfinite, flops)
    before = sum(t.numel() for t in load_state(args.checkpoint)["model"].values())
    after = sum(t.numel() for t in load_state(path)["model"].values())
    # (Torch-Pruning's users read a cut's MACs: the stored values alone do not tell the work, which a conv's
    # pairs weigh)
    print(f"pruned checkpoint {path}: {before} -> {after} stored values ({after / before:.2f}); "
          f"{flops[0] / 1e9:.3g} -> {flops[1] / 1e9:.3g} GFLOPs on the example cloud"
          f"{f' ({flops[1] / flops[0]:.2f})' if flops[0] else ''}")
    if args.finetune_epochs > 0:
        return finetune(path, args.finetune_epochs, not args.no_progress)
    return 0
