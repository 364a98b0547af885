"""What the procedures share: which layers carry prunable weights, along which
axis their channels lie, their masks and sparsity, and how a user's training
callable is called."""

from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch
from torch import nn

from . import _compat, adapters

def is_prunable(module: nn.Module) -> bool:
    """A layer with a registered adapter (:mod:`.adapters`): Linear, torch
    convolutions, ``pointsparse.nn.Conv3d``, or a user's."""
    return adapters.is_layer(module)


def prunable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every prunable layer of ``model`` in definition
    order, or of the named ``layers`` (ValueError naming an unknown or
    unprunable one)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    named = dict(model.named_modules())
    if layers is None:
        out = [(n, m) for n, m in named.items() if is_prunable(m)]
        if not out:
            raise ValueError("model has no prunable layer (Linear, Conv1d/2d/3d, pointsparse.nn.Conv3d)")
        return out
    out = []
    for n in layers:
        if n not in named:
            raise ValueError(f"layer {n!r} is not a submodule of the model; prunable layers: "
                             f"{[k for k, m in named.items() if is_prunable(m)]}")
        if not is_prunable(named[n]):
            raise ValueError(f"layer {n!r} is a {type(named[n]).__name__}, not a prunable layer")
        out.append((n, named[n]))
    if not out:
        raise ValueError("layers is empty")
    return out


def _weight_axes(module: nn.Module) -> dict[str, int]:
    a = adapters.adapter_for(module)
    return a.axes(module)["weight"] if a is not None and a.kind == "layer" else {"out": 0, "in": 1}


def out_channel_dim(module: nn.Module) -> int:
    """Axis of the weight that indexes output channels, from the layer's
    adapter (2 for ``pointsparse.nn.Conv3d``'s ``(K, C_in, C_out)``, 1 for
    torch transposed convolutions, 0 otherwise)."""
    return _weight_axes(module)["out"]


def in_channel_dim(module: nn.Module) -> int:
    return _weight_axes(module)["in"]


def out_channels(module: nn.Module) -> int:
    return module.weight.shape[out_channel_dim(module)]


def in_channels(module: nn.Module) -> int:
    return module.weight.shape[in_channel_dim(module)]


def kernel_volume(module: nn.Module) -> int:
    w = module.weight
    axes = _weight_axes(module)
    return w.numel() // (w.shape[axes["out"]] * w.shape[axes["in"]])


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The module's current mask (ones where it is not pruned)."""
    mask = getattr(module, name + "_mask", None)
    if mask is None:
        return torch.ones_like(getattr(module, name), dtype=torch.bool)
    return mask.detach().bool()


def original(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The underlying parameter (``name_orig`` when pruned)."""
    return getattr(module, name + "_orig", None) if hasattr(module, name + "_orig") else getattr(module, name)


def masks(model: nn.Module, layers=None) -> dict[str, torch.Tensor]:
    return {n: get_mask(m).clone() for n, m in prunable_layers(model, layers)}


def sparsity(model: nn.Module, layers=None) -> float:
    """Fraction of zero weights over the prunable layers (pruned or exactly 0)."""
    zeros = total = 0
    for _, m in prunable_layers(model, layers):
        w = m.weight.detach()
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def layer_sparsity(model: nn.Module, layers=None) -> dict[str, float]:
    return {n: float((m.weight.detach() == 0).float().mean()) for n, m in prunable_layers(model, layers)}


def apply_masks(model: nn.Module, mask_dict: dict[str, torch.Tensor]) -> None:
    """Prune each named layer's weight with the given mask through the core's
    ``custom_from_mask`` (composes with a mask it already has)."""
    named = dict(model.named_modules())
    for n, mask in mask_dict.items():
        if n not in named:
            raise ValueError(f"mask for unknown layer {n!r}")
        w = named[n].weight
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask for {n!r} must have the weight's shape {tuple(w.shape)}; got {tuple(mask.shape)}")
        _compat.custom_from_mask(named[n], "weight", mask.to(w.device))


def make_permanent(model: nn.Module) -> None:
    """``remove`` every pruning re-parametrisation (weights keep their zeros)."""
    for _, m in prunable_layers(model):
        if _compat.is_pruned(m) and hasattr(m, "weight_orig"):
            _compat.remove(m, "weight")


def global_magnitude_prune(model: nn.Module, target: float, layers=None, scores: dict | None = None) -> None:
    """Prune the smallest-magnitude (or lowest-``scores``) weights over all
    ``layers`` together until a fraction ``target`` of their weights is
    pruned; existing masks are kept (masks never un-prune)."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1); got {target}")
    chosen = prunable_layers(model, layers)
    total = sum(m.weight.numel() for _, m in chosen)
    pruned = sum(int((~get_mask(m)).sum()) for _, m in chosen)
    extra = int(round(target * total)) - pruned
    if extra <= 0:
        return
    params = [(m, "weight") for _, m in chosen]
    kwargs = {}
    if scores is not None:
        kwargs["importance_scores"] = {(m, "weight"): scores[n] for n, m in chosen}
    _compat.global_unstructured(params, pruning_method=torch.nn.utils.prune.L1Unstructured, amount=extra, **kwargs)


def layer_magnitude_prune(model: nn.Module, target: float, layers=None) -> None:
    """Prune each layer to the same sparsity ``target`` by magnitude."""
    if not 0.0 <= target < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1); got {target}")
    for _, m in prunable_layers(model, layers):
        n = m.weight.numel()
        extra = int(round(target * n)) - int((~get_mask(m)).sum())
        if extra > 0:
            _compat.l1_unstructured(m, "weight", amount=extra)


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


def check_callable(fn, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable; got {type(fn).__name__}")


def check_fraction(value, name: str, low_open=False, high_open=True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {type(value).__name__}")
    v = float(value)
    ok_low = v > 0 if low_open else v >= 0
    ok_high = v < 1 if high_open else v <= 1
    if not (ok_low and ok_high):
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}; got {value}")
    return v
