"""What the pruning procedures (schedules, lottery tickets, pruning at
initialisation, sensitivity scans, AMC, NetAdapt, RigL) share beyond the
layer adapters: magnitude pruning over many layers, calling a user's training
callable, and checking their arguments."""

from __future__ import annotations

import inspect
import math
import numbers
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..tensor import as_float, as_int
from . import _compat
from ._copyable import keep_copyable
from .adapters import current_weight, get_mask, prunable_layers, used_mask


def global_magnitude_prune(model: nn.Module, target: float, layers=None, scores: dict | None = None) -> None:
    """Prune the smallest-magnitude (or lowest-``scores``) weights over all
    ``layers`` together until a fraction ``target`` of their weights is
    pruned; existing masks are kept (masks never un-prune). A
    ``kernel_region`` conv's weights are its region's: the values outside it
    (never run) are neither counted nor pruned."""
    check_fraction(target, "target sparsity")
    if scores is not None and not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict {{layer name: score tensor}}; got {type(scores).__name__}")
    chosen = prunable_layers(model, layers)
    if scores is not None:
        missing = [n for n, _ in chosen if n not in scores]
        if missing:
            raise ValueError(f"scores has no entry for layer(s) {missing}")
        for n, m in chosen:  # (torch's global_unstructured: an IndexError, an AttributeError; NaN never pruned)
            s = scores[n]
            if not isinstance(s, torch.Tensor):
                raise TypeError(f"scores[{n!r}] must be a tensor of the layer's weight shape; got {type(s).__name__}")
            if s.shape != m.weight.shape:
                raise ValueError(f"scores[{n!r}] must have the layer's weight shape {tuple(m.weight.shape)}; got "
                                 f"{tuple(s.shape)}")
            if s.is_floating_point() and bool(torch.isnan(s.detach()).any()):
                raise ValueError(f"scores[{n!r}] hold NaN; every weight needs a number")
    used = {n: used_mask(m) for n, m in chosen}
    total = sum(int(used[n].sum()) for n, _ in chosen)
    pruned = sum(int((~get_mask(m) & used[n]).sum()) for n, m in chosen)
    extra = int(round(target * total)) - pruned
    if extra <= 0:
        return
    params = [(m, "weight") for _, m in chosen]
    # (the weights as they are now, not torch's default: module.weight, cached by the last forward, from before
    # the optimizer's last step)
    importance = {(m, "weight"): _only_used(scores[n] if scores is not None else current_weight(m).detach(), used[n])
                  for n, m in chosen}
    _compat.global_unstructured(params, pruning_method=torch.nn.utils.prune.L1Unstructured, amount=extra,
                                importance_scores=importance)
    for _, m in chosen:  # (torch's methods leave a product autograd made, which copy.deepcopy refuses)
        keep_copyable(m)


def _only_used(scores: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``scores`` with the entries that are no weights of the layer (outside
    a ``kernel_region``: :func:`.adapters.used_mask`) raised to inf, so that a
    magnitude pruning never picks them while a weight is left to prune."""
    return scores if bool(used.all()) else torch.where(used, scores.detach(), float("inf"))


def layer_magnitude_prune(model: nn.Module, target: float, layers=None) -> None:
    """Prune each layer to the same sparsity ``target`` by magnitude (over
    its weights: a ``kernel_region`` conv's region, as :func:`global_magnitude_prune`)."""
    check_fraction(target, "target sparsity")
    for _, m in prunable_layers(model, layers):
        magnitude_prune_layer(m, target)


def magnitude_prune_layer(module: nn.Module, target: float) -> None:
    """Prune ``module``'s smallest-magnitude weights until a fraction
    ``target`` of them is pruned; existing masks are kept."""
    used = used_mask(module)
    extra = int(round(target * int(used.sum()))) - int((~get_mask(module) & used).sum())
    if extra > 0:  # (by the weights now, not module.weight: cached by the last forward, before the last step)
        scores = _only_used(current_weight(module).detach(), used)
        _compat.l1_unstructured(module, "weight", amount=extra, importance_scores=scores)
        keep_copyable(module)


def accepts_lr(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "lr" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def call_train(train_fn: Callable, model: nn.Module, steps: int, lr: float | None = None) -> None:
    """``train_fn(model, steps, lr=lr)`` when it takes ``lr`` and one is set,
    else ``train_fn(model, steps)``."""
    if steps <= 0:
        return
    if lr is not None and accepts_lr(train_fn):
        train_fn(model, steps, lr=lr)
    else:
        train_fn(model, steps)


def metric_value(value, name: str = "eval_fn") -> float:
    """What the callable ``name`` returned, as a float: a real number
    (numpy's too) or a one-element tensor or numpy array. ``None``, a str, a
    bool or a tensor of several values is a TypeError naming ``name``
    (``float()`` took a str ``'0.5'`` and a bool, and said of the rest only
    what it could not convert). A NaN is returned as it is: each procedure
    says what it does with one."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    elif isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iuf":
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:60]
        raise TypeError(f"{name} must return a number (the model's metric: a float or a one-element tensor); "
                        f"got {what}")
    return float(value)


def check_int(value, name: str, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum`` (:func:`pointsparse.tensor.as_int`:
    numpy and 0-d tensor integers too); a bool, float or str is a TypeError
    and a smaller int a ValueError, each naming ``name``."""
    try:
        return as_int(value, name, minimum)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}; got {value!r}") from None


def check_real(value, name: str, what: str = "a finite number", ok=None) -> float:
    """``value`` as a finite float (:func:`pointsparse.tensor.as_float`) for
    which ``ok(value)`` holds (when given); else a TypeError (not a number) or
    ValueError saying ``name`` must be ``what``."""
    try:
        v = as_float(value, name)
    except TypeError:
        raise TypeError(f"{name} must be {what}; got {value!r}") from None
    if not math.isfinite(v) or (ok is not None and not ok(v)):
        raise ValueError(f"{name} must be {what}; got {value!r}")
    return v


def check_lr(lr, name: str = "lr") -> float | None:
    """``lr`` as a finite float > 0 (:func:`pointsparse.tensor.as_float`), or
    None (the train function's own)."""
    if lr is None:
        return None
    return check_real(lr, name, "a finite number > 0 or None", lambda v: v > 0)


def check_path(path, what: str, name: str = "path") -> Path:
    """``path`` (a str or ``os.PathLike``) as a Path; else a TypeError
    naming the argument ``name`` and ``what`` file it names (pathlib's own
    error names no argument)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or Path ({what}); got {type(path).__name__}")
    return Path(path)


def check_callable(fn, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable; got {type(fn).__name__}")


def check_fraction(value, name: str, low_open=False, high_open=True) -> float:
    if isinstance(value, torch.Tensor):  # (as_float takes 0-d tensors; a fraction is a plain number)
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    try:
        v = as_float(value, name)  # numpy numbers too (np.float32 is no float subclass)
    except TypeError:
        raise TypeError(f"{name} must be a number; got {type(value).__name__}") from None
    ok_low = v > 0 if low_open else v >= 0
    ok_high = v < 1 if high_open else v <= 1
    if not (ok_low and ok_high):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}; got {value}")
    return v
