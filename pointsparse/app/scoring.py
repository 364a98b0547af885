"""Scoring a segmentation model: predictions, the point-level confusion
matrix (each DDP rank scores its shard, the matrices are summed), and the
report (``metrics.json`` and the PNGs)."""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import checkpoint
from .._modes import evaluating
from ..data import Batch, VoxelSample
from ..models import SPVCNN
from ..voxelize import devoxelize
from . import metrics
from .trainer import progress_bar


def _inner(model):
    """The network inside DistributedDataParallel and ``nn.MapsAhead``."""
    from ..nn import MapsAhead

    inner = getattr(model, "module", model)
    return inner.model if isinstance(inner, MapsAhead) else inner


def point_level(model) -> bool:
    """Whether the model (maybe inside DistributedDataParallel) returns per-point
    logits: SPVCNN, or an exported program of one (``export.ProgramModel``)."""
    inner = _inner(model)
    return isinstance(inner, SPVCNN) or getattr(inner, "point_level", False) is True


def feats_dtype(model, default: torch.dtype) -> torch.dtype:
    """The dtype the model takes its voxels' feats in: an exported program's
    (``ProgramModel.dtype``), SPVCNN's voxel branch's (bfloat16 in its bf16
    inference form, whose point branch is float32), else the first floating
    weight's; ``default`` for a model without one."""
    inner = _inner(model)
    if isinstance(inner, SPVCNN):
        inner = inner.unet
    dtype = getattr(inner, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((p.dtype for p in inner.parameters() if p.is_floating_point()), default)


def _input_of(model, batch: Batch):
    """The batch's voxels, their feats cast to the model's dtype (a model
    cast for inference, bf16)."""
    x = batch.input
    dtype = feats_dtype(model, x.feats.dtype)
    return x if dtype == x.feats.dtype else x.with_feats(x.feats.to(dtype))


def _model_inputs(batch: Batch, points: bool, voxels=None):
    """What a model is called with on ``batch``: a voxel model its voxels
    (``voxels``, default ``batch.input``), a point-level one (SPVCNN, called
    ``model(*inputs)``) the tuple ``(voxels, inverse, points, point_batch)``."""
    voxels = batch.input if voxels is None else voxels
    return (voxels, batch.inverse, batch.points, batch.point_batch) if points else voxels


def logits_of(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the labels they are scored against): per voxel for MinkUNet,
    per point for SPVCNN; the voxels' feats cast to the model's dtype (a
    model cast for inference, bf16). A voxel model that prunes voxels at
    stride 1 (a VoxelPrune there) gives logits on the kept voxels: they are
    scored against the kept voxels' labels (:func:`kept_labels`)."""
    x = _input_of(model, batch)
    if point_level(model):
        return model(*_model_inputs(batch, True, x)), batch.point_labels
    out = model(x)
    return out.feats, kept_labels(out, batch.labels)


def kept_labels(out, labels: torch.Tensor) -> torch.Tensor:
    """The labels of the voxels a voxel model's output ``out`` holds, from
    ``labels`` (one per input voxel): where the model kept some of them at
    stride 1 (a VoxelPrune there), those of the kept ones, in their order (the
    selection the output's coordinate cache records); else ``labels``. A
    ValueError where ``out`` holds another number of voxels and records no
    such selection."""
    rows = _kept_rows(out, labels.shape[0])
    return labels if rows is None else labels.index_select(0, rows.to(labels.device))


def voxel_classes(out, n: int) -> torch.Tensor:
    """The predicted class of each of the ``n`` voxels a voxel model was
    given, from its output ``out``: the argmax of their logits; where the
    model kept some of them at stride 1 (a VoxelPrune there), class 0 for
    the dropped ones (as :func:`predict` gives their points)."""
    pred = out.feats.argmax(1)
    rows = _kept_rows(out, n)
    return pred if rows is None else pred.new_zeros(n).index_copy(0, rows.to(pred.device), pred)


def _kept_rows(out, n: int) -> torch.Tensor | None:
    """The rows of the ``n`` input voxels that ``out`` holds, where it holds a
    selection of them at stride 1 (:func:`kept_labels`); None where it holds
    them all."""
    kept = out.cache.kept.get(out.stride) if out.stride == (1, 1, 1) else None
    if kept is not None and int(kept[1]) == n and kept[0].shape[0] == out.coords.shape[0]:
        return kept[0]
    if out.coords.shape[0] != n:
        raise ValueError(f"the model gives logits for {out.coords.shape[0]} voxels (stride {out.stride}), but its "
                         f"input has {n} voxels and no selection of them is recorded (a VoxelPrune at stride 1 "
                         "records the voxels it keeps): a segmentation model gives logits on its input's voxels")
    return None


@torch.no_grad()
def predict(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(voxel logits, per-point predicted class) of a batch; a voxel
    model's points read their voxel's logits through ``devoxelize`` (a
    model that prunes voxels at stride 1 gives logits on the kept ones:
    zeros, class 0, for the points of dropped voxels)."""
    if point_level(model):
        logits, _ = logits_of(model, batch)
        return logits, logits.argmax(1)
    out = model(_input_of(model, batch))
    # each voxel's class, taken to its points (a column of float64: exact class numbers; 0 for a dropped voxel's)
    classes = out.with_feats(out.feats.argmax(1, keepdim=True).to(torch.float64))
    return out.feats, devoxelize(classes, batch.inverse)[:, 0].long()


@contextlib.contextmanager
def loaded_frozen():
    """While a command runs its model over many clouds: what is alive when it
    starts (torch, the model, an exported program's graph: some 330k
    objects) collected once and left out of the cyclic collector's passes
    (``gc.freeze``), then put back (``gc.unfreeze``: nothing is kept from
    the collector for good). torch's export wrapper leaves a few reference
    cycles on every call, so full collections keep coming, and each
    traverses every object: 130-190 ms inside one cloud's call, once in
    40-150 calls in some processes (bench/RESULTS.md stop 51). Where the
    process has frozen objects already (its own policy), nothing is changed."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def shard(count: int, rank: int, world: int) -> range:
    """The indices of ``count`` items that process ``rank`` of ``world`` reads and scores."""
    return range(rank, count, world)


def refuse_together(dist, error: str | None, value=None) -> list:
    """Every process's ``(error, value)`` of a distributed run (``dist``):
    a ValueError of the first ``error`` any process met (each checked its
    shard), so that all refuse with the same message (one that refused
    alone left the others in their next collective, whose 'connection
    closed' / 'connection reset' spawn could report instead); else every
    process's ``value``, in rank order."""
    outcomes = [None] * dist.world
    torch.distributed.all_gather_object(outcomes, (error, value))
    errors = [message for message, _ in outcomes if message]
    if errors:
        raise ValueError(errors[0])
    return [flag for _, flag in outcomes]


@torch.no_grad()
def evaluate(model, samples: Sequence[VoxelSample], num_classes: int, ignore_index: int, device,
             batch_size: int = 1, progress: bool = False, keep_first: bool = True, all_reduce: bool = False):
    """Point-level confusion matrix over ``samples`` (summed over every
    process with ``all_reduce``: each scores its own shard) and, for the
    first sample, (xyz, labels, predictions, name) for the render."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    first = None
    chunks = [range(i, min(i + batch_size, len(samples))) for i in range(0, len(samples), batch_size)]
    with evaluating(model):  # (each module given back its own mode, after an error too)
        for chunk in progress_bar(chunks, "eval", progress):
            batch = Batch.of([samples[i] for i in chunk]).to(device)
            _, pred = predict(model, batch)
            cm += metrics.confusion_matrix(pred, batch.point_labels, num_classes, ignore_index)
            if keep_first and first is None:
                sel = (batch.point_batch == 0).cpu()
                first = (batch.xyz[0], batch.point_labels.cpu()[sel].numpy(), pred.cpu()[sel].numpy(),
                         batch.names[0])
    if all_reduce:
        total = torch.from_numpy(cm).to(device)
        torch.distributed.all_reduce(total)
        cm = total.cpu().numpy()
    return cm, first


#: The files :func:`write_report` writes (each name behind its ``prefix``), and what each holds: train's
#: ``--out`` checks and a new run's replacing of another's report take them from here.
REPORT_FILES = {"metrics.json": "report", "curves.png": "loss and mIoU curves", "confusion.png": "confusion matrix",
                "topdown.png": "top-down render"}
#: The prefix of the report ``pointsparse eval --out`` writes (beside a run's own, which it leaves alone).
EVAL_PREFIX = "eval-"


def scored_checkpoint(out) -> Path | None:
    """The checkpoint whose scores the report ``eval --out`` wrote in the
    folder ``out`` holds (its ``checkpoint``, resolved), or None: no such
    report, one that cannot be read, or one of a program."""
    try:
        report = json.loads((Path(out) / (EVAL_PREFIX + "metrics.json")).read_text())
    except (OSError, ValueError):
        return None
    scored = report.get("checkpoint") if isinstance(report, dict) else None
    return Path(scored).resolve() if isinstance(scored, str) else None


def remove_files(out, names) -> list[str]:
    """Remove the files ``names`` in the folder ``out`` (an earlier report's,
    another run's: left beside the new ones, they were taken for theirs);
    returns the names of those removed, in the order of ``names``."""
    removed = []
    for name in names:
        path = Path(out) / name
        if path.is_file():
            path.unlink()
            removed.append(name)
    return removed


def json_finite(value):
    """``value`` (dicts, lists, tuples, Python, numpy and 0-d or n-d torch
    numbers, strings) as plain Python values, each float that is NaN or
    infinite replaced by None (JSON's null), for ``json.dumps(...,
    allow_nan=False)``."""
    if isinstance(value, (np.ndarray, np.generic, torch.Tensor)):
        value = value.tolist()  # (Python numbers and lists of them: numpy's and torch's are no JSON)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_finite(v) for v in value]
    return value


def write_report(out: Path, cm, classes, first, history, extra: dict, ignore_index: int, prefix: str = "") -> dict:
    """metrics.json and the PNGs (none, with a warning, where matplotlib
    cannot be imported); returns the metrics dictionary. The pictures are
    named by absolute paths, found from any folder (as typed, relative to
    the folder the command ran in, they were found from there alone). The
    files of :data:`REPORT_FILES` behind ``prefix`` that this report does
    not write (an earlier report's) are removed."""
    from . import plots

    checkpoint.make_directory(out)
    report = metrics.summary(cm, classes)
    report.update(extra)
    report["classes"] = list(classes)
    report["confusion"] = np.asarray(cm).tolist()
    pictures = {}
    if not plots.available():
        print("matplotlib is not importable: no PNG figures written (pip install matplotlib)", file=sys.stderr)
    else:
        if history and history.get("step_loss"):
            pictures["curves"] = os.path.abspath(plots.curves(history, out / f"{prefix}curves.png"))
        pictures["confusion"] = os.path.abspath(plots.confusion(cm, classes, out / f"{prefix}confusion.png"))
        if first is not None:
            xyz, labels, pred, _ = first
            pictures["topdown"] = os.path.abspath(plots.topdown(xyz, labels, pred, classes,
                                                                out / f"{prefix}topdown.png",
                                                                ignore_index=ignore_index))
    report["pictures"] = pictures
    if history:
        report["history"] = history
    # (JSON has no NaN or inf: a validation that scored nothing, a diverged loss, wrote a bare NaN, which strict
    # readers refuse; they are null, as metrics.summary's are)
    text = (json.dumps(json_finite(report), indent=1, allow_nan=False) + "\n").encode()
    checkpoint.atomic_write(out / f"{prefix}metrics.json", lambda f: f.write(text))
    written = {"metrics", *pictures}
    remove_files(out, [prefix + name for name in REPORT_FILES if Path(name).stem not in written])
    return report
