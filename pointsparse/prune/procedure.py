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
from .adapters import current_weight, get_mask, prunable_layers, prunable_modules, raw, used_mask


def global_magnitude_prune(model: nn.Module, target: float, layers=None, scores: dict | None = None) -> None:
    """Prune the smallest-magnitude (or lowest-``scores``) weights over all
    ``layers`` together until a fraction ``target`` of their weights is
    pruned; existing masks are kept (masks never un-prune). A
    ``kernel_region`` conv's weights are its region's: the values outside it
    (never run) are neither counted nor pruned.

    Tied weights (layers sharing one weight Parameter, ``b.weight =
    a.weight``) are ranked and counted once, so ``target`` is met over the
    distinct weights, and every layer sharing one gets the same mask (their
    ``weight_orig`` stays the one Parameter; ``remove`` keeps them tied). An
    entry one of them has pruned already counts as pruned and is pruned in
    all of them. Their ``scores`` must be equal (a ValueError naming the
    layers otherwise), and ``layers`` must name all of them or none: pruning
    a shared weight through one layer leaves the other running it whole
    until ``remove`` writes the mask into the shared tensor (a ValueError
    naming both)."""
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
    groups = tied_groups(model, chosen)
    if scores is not None:
        for group in groups:
            (first, _), *rest = group
            for n, _ in rest:
                reference = scores[first].detach()
                if not torch.equal(reference, scores[n].detach().to(reference.device)):
                    raise ValueError(f"layers {first!r} and {n!r} share one weight but scores[{first!r}] and "
                                     f"scores[{n!r}] differ; a shared weight is ranked once: give both the same "
                                     "scores")
    # per distinct weight: the entries that are weights of any layer sharing it, and those pruned in any of them
    used = [union_of(used_mask(m) for _, m in group) for group in groups]
    was_pruned = [union_of(~get_mask(m) for _, m in group) & u for group, u in zip(groups, used)]
    total = sum(int(u.sum()) for u in used)
    pruned = sum(int(p.sum()) for p in was_pruned)
    extra = int(round(target * total)) - pruned
    if extra <= 0:
        return
    for group in groups:
        _unify_masks(group)
    params = [(group[0][1], "weight") for group in groups]
    # (the weights as they are now, not torch's default: module.weight, cached by the last forward, from before
    # the optimizer's last step)
    importance = {}
    for (n, m), u in zip((group[0] for group in groups), used):
        importance[(m, "weight")] = _only_used(scores[n] if scores is not None else current_weight(m).detach(), u)
    _compat.global_unstructured(params, pruning_method=torch.nn.utils.prune.L1Unstructured, amount=extra,
                                importance_scores=importance)
    for group in groups:
        _share_first_mask(group)
    for _, m in chosen:  # (torch's methods leave a product autograd made, which copy.deepcopy refuses)
        keep_copyable(m)


def tied_groups(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> list[list[tuple[str, nn.Module]]]:
    """The ``chosen`` ``(name, module)`` layers grouped by the weight they
    keep (``raw``: ``weight_orig`` for a pruned one), in order: layers that
    share one weight Parameter (tied) form one group, every other layer its
    own. A ValueError names a prunable layer of ``model`` that shares a
    chosen layer's weight but is not chosen (pruning the weight through one
    of them leaves the other running it whole)."""
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for n, m in chosen:
        group = groups.setdefault(id(raw(m)), [])
        if all(other is not m for _, other in group):  # (one module named twice is one layer)
            group.append((n, m))
    picked = {id(m) for _, m in chosen}
    for other_name, other in prunable_modules(model):
        group = groups.get(id(raw(other)))
        if group is not None and id(other) not in picked:
            raise ValueError(f"layers {group[0][0]!r} and {other_name!r} share one weight, and layers names only "
                             f"{group[0][0]!r}: pruning a shared weight through one layer leaves the other running "
                             f"it whole; name both in layers, or neither")
    return list(groups.values())


def union_of(masks) -> torch.Tensor:
    """The entries True in any of the bool ``masks`` (one shape)."""
    out = None
    for m in masks:
        out = m.clone() if out is None else out | m.to(out.device)
    return out


def _only_used(scores: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``scores`` with the entries that are no weights of the layer (outside
    a ``kernel_region``: :func:`.adapters.used_mask`) raised to inf, so that a
    magnitude pruning never picks them while a weight is left to prune."""
    return scores if bool(used.all()) else torch.where(used, scores.detach(), float("inf"))


def layer_magnitude_prune(model: nn.Module, target: float, layers=None) -> None:
    """Prune each layer to the same sparsity ``target`` by magnitude (over
    its weights: a ``kernel_region`` conv's region, as :func:`global_magnitude_prune`).
    Layers sharing one weight (tied) prune it once and run it with one mask,
    the entries any of them had pruned pruned in all; ``layers`` names all
    of them or none (as :func:`global_magnitude_prune`)."""
    check_fraction(target, "target sparsity")
    for group in tied_groups(model, prunable_layers(model, layers)):
        _unify_masks(group)
        magnitude_prune_layer(group[0][1], target)
        _share_first_mask(group)
        for _, m in group[1:]:
            keep_copyable(m)


def _unify_masks(group: list[tuple[str, nn.Module]]) -> None:
    """One mask for the layers of a :func:`tied_groups` group (one weight):
    the entries any of them has pruned, pruned in all (masks never un-prune)."""
    if len(group) > 1:
        common = ~union_of(~get_mask(m) for _, m in group)
        for _, m in group:
            if not torch.equal(get_mask(m), common):
                _compat.custom_from_mask(m, "weight", common)


def _share_first_mask(group: list[tuple[str, nn.Module]]) -> None:
    """The group's first layer's mask (just pruned further) on the others
    that share its weight."""
    (_, first), *rest = group
    for _, m in rest:
        if not torch.equal(get_mask(m), get_mask(first)):
            _compat.custom_from_mask(m, "weight", first.weight_mask.detach().clone())


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
