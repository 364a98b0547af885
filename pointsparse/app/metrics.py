"""Segmentation scores from a confusion matrix: per-class IoU, mIoU,
accuracy."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.readers import _ignore_index


def confusion_matrix(pred, target, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """int64 ``(C, C)``: row = true class, column = predicted class. Targets
    equal to ``ignore_index`` are skipped; other targets must lie in
    ``[0, num_classes)``. ``pred`` and ``target`` hold class indices:
    integers, or floats that are whole numbers (class ids stored as floats,
    as the readers take them); a fraction (a probability) is a ValueError."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1; got {num_classes!r}")
    if num_classes > MAX_CLASSES:
        raise ValueError(f"num_classes must be at most {MAX_CLASSES} (its C x C int64 matrix); got {num_classes}")
    num_classes = int(num_classes)
    if ignore_index is not None:
        ignore_index = _ignore_index(ignore_index)  # (the readers' check: an int in int64, not a bool)
    (pred, pred_shape), (target, target_shape) = (_class_indices(t, name)
                                                  for t, name in ((pred, "pred"), (target, "target")))
    if pred.numel() != target.numel():
        raise ValueError(f"pred and target must have the same length; got {pred.numel()} and {target.numel()}")
    if _without_ones(pred_shape) != _without_ones(target_shape):
        # (one count, other shapes: a transposed batch scored in the wrong order; dims of one, as (N, 1)
        # against (N,), line up the same values)
        raise ValueError(f"pred and target must have the same shape (dims of 1 aside); got {tuple(pred_shape)} "
                         f"and {tuple(target_shape)}")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}")
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"predictions must lie in [0, {num_classes})")
    cm = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return cm.reshape(num_classes, num_classes).numpy().astype(np.int64)


def _without_ones(shape: tuple) -> tuple:
    """``shape`` without its dims of size 1."""
    return tuple(d for d in shape if d != 1)


#: the most classes confusion_matrix counts (a 16384 x 16384 int64 matrix is 2 GiB)
MAX_CLASSES = 2**14


def _class_indices(labels, name: str) -> tuple[torch.Tensor, tuple]:
    """``labels`` as a flat int64 CPU tensor, and the shape it had before
    flattening (a ragged list, no shape, is named here): integers (or bools), or floats
    that are whole numbers in int64 (class ids stored as floats); a
    ValueError naming ``name`` for other floats (``.long()`` truncated
    probabilities and max-logit values into classes), a TypeError for
    complex ones and for what holds no numbers (strings, None, a meta
    tensor), a ValueError for uint64 ids past int64 (cast, they wrapped
    round to negative ids, ``ignore_index`` among them)."""
    if isinstance(labels, torch.Tensor) and labels.is_meta:
        raise TypeError(f"{name} must hold integer class indices (e.g. logits.argmax(1)); got a meta tensor "
                        "(shapes without values)")
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as exc:  # (torch's words, naming neither argument)
        raise TypeError(f"{name} must hold integer class indices (e.g. logits.argmax(1)); got "
                        f"{type(labels).__name__} ({exc})") from None
    if labels.dtype == getattr(torch, "uint64", None) and labels.numel():
        wide = labels.detach().cpu().numpy()  # (torch's uint64 has no max nor comparison on the CPU)
        if int(wide.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"{name} must hold class indices that fit int64; got {int(wide.max())}")
    if labels.is_complex():
        raise TypeError(f"{name} must hold integer class indices (e.g. logits.argmax(1)); got dtype {labels.dtype}")
    if labels.is_floating_point():
        flat = labels.detach().reshape(-1)
        whole = torch.isfinite(flat) & (flat == flat.floor()) & (flat.abs() < 2.0 ** 63)
        if not bool(whole.all()):
            bad = flat[~whole][0].item()
            raise ValueError(f"{name} must hold integer class indices (e.g. logits.argmax(1)); got {bad} in its "
                             f"{labels.dtype} values")
    return labels.reshape(-1).long().cpu(), tuple(labels.shape)


def _square(cm) -> np.ndarray:
    """``cm`` as an array; ValueError unless it is a ``(C, C)`` matrix of
    counts (finite, >= 0: a negative one gave an IoU of 2.0)."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"the confusion matrix must be square (C, C); got shape {cm.shape}")
    if cm.dtype.kind not in "biuf" or (cm.size and not (np.isfinite(cm).all() and cm.min() >= 0)):
        raise ValueError("the confusion matrix must hold counts (finite numbers >= 0); got "
                         f"{cm.dtype} values from {cm.min() if cm.size and cm.dtype.kind in 'biuf' else '?'}")
    return cm


def _named(cm, classes) -> tuple[np.ndarray, list]:
    """(``cm``, square; ``classes`` as a list: read once, a generator's names too), with ValueError unless
    ``classes`` names each of its classes."""
    cm = _square(cm)
    classes = list(classes)
    if len(classes) != cm.shape[0]:
        raise ValueError(f"classes: {len(classes)} names for the {cm.shape[0]} classes of the {cm.shape} "
                         "confusion matrix")
    return cm, classes


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class; NaN where the class appears neither
    in the targets nor in the predictions."""
    cm = _square(cm).astype(np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(cm: np.ndarray) -> float:
    """Mean IoU over the classes that occur in the targets (a class only
    predicted, never true, is left out); NaN when nothing was scored."""
    cm = _square(cm)
    iou = iou_per_class(cm)
    present = cm.sum(1) > 0
    vals = iou[present]
    return float(vals.mean()) if vals.size else math.nan


def accuracy(cm: np.ndarray) -> float:
    cm = _square(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total else math.nan


def summary(cm: np.ndarray, classes) -> dict:
    """``{"miou", "accuracy", "per_class": {name: iou or None}, "miou_classes":
    [name], "points": {name: count}}``: None for classes absent from targets
    and predictions, and for ``miou`` and ``accuracy`` where no point was
    scored (JSON has no NaN: a bare NaN in metrics.json was refused by strict
    readers); ``miou_classes`` names the classes ``miou`` averages, those
    with points in the targets (a class only predicted has an IoU of 0 in
    ``per_class`` but is not in the mean, as :func:`mean_iou` says)."""
    cm, classes = _named(cm, classes)
    iou = iou_per_class(cm)
    counts = np.asarray(cm).sum(1)
    miou, acc = mean_iou(cm), accuracy(cm)
    return {
        "miou": None if math.isnan(miou) else miou,
        "accuracy": None if math.isnan(acc) else acc,
        "per_class": {str(c): (None if math.isnan(v) else float(v)) for c, v in zip(classes, iou)},
        "miou_classes": [str(c) for c, n in zip(classes, counts) if n > 0],
        "points": {str(c): int(n) for c, n in zip(classes, counts)},
    }


def percent(value) -> str:
    """A summary's ``miou`` or ``accuracy`` as printed: ``61.5%``, or ``n/a
    (no point scored)`` for its None."""
    return "n/a (no point scored)" if value is None else f"{100 * value:.1f}%"


def format_table(cm: np.ndarray, classes) -> str:
    """The per-class IoU table and mIoU as text."""
    cm, classes = _named(cm, classes)
    iou = iou_per_class(cm)
    counts = np.asarray(cm).sum(1)
    width = max([len(str(c)) for c in classes] + [5])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'points':>9}"]
    predicted_only = False
    for c, v, n in zip(classes, iou, counts):
        shown = "   -  " if math.isnan(v) else f"{100 * v:6.1f}"
        # (a class predicted but never true: its IoU 0 is shown, and mean_iou leaves it out: marked)
        mark = " *" if n == 0 and not math.isnan(v) else ""
        predicted_only = predicted_only or bool(mark)
        lines.append(f"{c:<{width}}  {shown}  {int(n):>9d}{mark}")
    lines.append(f"{'mIoU':<{width}}  {100 * mean_iou(cm):6.1f}  (accuracy {100 * accuracy(cm):.1f}%)")
    if predicted_only:
        lines.append("* predicted but not in the ground truth: left out of the mIoU (over the classes that occur)")
    return "\n".join(lines)
