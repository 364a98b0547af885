"""Lottery tickets (Frankle & Carbin 2019) by iterative magnitude pruning with
rewinding (Frankle et al. 2020): train, prune a fraction of the remaining
weights, reset the survivors to their values at iteration ``k`` (``k = 0``:
the original initialisation), train again, repeat. Controls: the same mask
with a random re-initialisation, and a random mask of the same per-layer
sparsity with the rewound weights."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..tensor import as_int, nonnegative_int
from .adapters import apply_masks, get_mask, masks as _masks, prunable_layers, sparsity as _sparsity, used_mask
from .procedure import (call_train, check_callable, check_fraction, check_int, check_lr, global_magnitude_prune,
                        layer_magnitude_prune, metric_value)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` under its logical name (a
    pruned ``weight`` is stored from ``weight_orig``; the pruning's masks,
    ``weight_mask`` beside a ``weight_orig``, are not stored: a buffer of the
    model's own, as an ``attn_mask``, is)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    state = model.state_dict()
    pruned = {key[:-5] for key in state if key.endswith("_orig") and key[:-5] + "_mask" in state}
    out = {}
    for key, value in state.items():
        if key.endswith("_mask") and key[:-5] in pruned:
            continue
        if key.endswith("_orig") and key[:-5] in pruned:
            key = key[:-5]
        out[key] = value.detach().clone()
    return out


def rewind(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Reset every parameter and buffer to ``state`` (from :func:`snapshot`),
    keeping the masks: each pruned weight becomes exactly ``state * mask``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict {{name: tensor}} (what snapshot returns); got {type(state).__name__}")
    named = dict(model.named_modules(remove_duplicate=False))  # (a layer used twice: state_dict names it twice)
    for key, value in state.items():
        module_name, _, attr = key.rpartition(".")
        module = named.get(module_name)
        if module is None:
            raise ValueError(f"state entry {key!r} names no submodule of the model")
        target = getattr(module, attr + "_orig", None)
        if target is None:
            target = getattr(module, attr, None)
        if not isinstance(target, torch.Tensor) or target.shape != value.shape:
            raise ValueError(f"state entry {key!r} does not fit the model")
        with torch.no_grad():  # (the masked view refreshed now, as no computed tensor: deepcopy refuses those;
            target.copy_(value)  # the forward pre-hook recomputes it with gradients)
            if hasattr(module, attr + "_orig") and hasattr(module, attr + "_mask"):
                setattr(module, attr, getattr(module, attr + "_orig") * getattr(module, attr + "_mask"))


@dataclass
class LotteryResult:
    """Round 0 is the dense network; ``masks[r]`` the mask after round ``r``;
    ``state`` the rewind point."""

    rounds: list[dict] = field(default_factory=list)
    masks: list[dict[str, torch.Tensor]] = field(default_factory=list)
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    rewind_step: int = 0


def lottery_ticket(model: nn.Module, train_fn: Callable, eval_fn: Callable, train_steps: int, rounds: int = 5,
                   prune_fraction: float = 0.2, rewind_step: int = 0, scope: str = "global",
                   lr: float | None = None, layers=None) -> LotteryResult:
    """Iterative magnitude pruning with rewinding on a freshly initialised
    ``model``. Each round trains ``train_steps - rewind_step`` steps from the
    rewind point, then prunes ``prune_fraction`` of the surviving weights
    (globally or per layer). After the call ``model`` holds the last round's
    trained ticket."""
    check_callable(train_fn, "train_fn")
    check_callable(eval_fn, "eval_fn")
    check_fraction(prune_fraction, "prune_fraction", low_open=True)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer'; got {scope!r}")
    rounds = nonnegative_int(rounds, "rounds")
    train_steps = check_int(train_steps, "train_steps", 1)
    rewind_step = check_int(rewind_step, "rewind_step", 0)
    check_lr(lr)
    if not 0 <= rewind_step < train_steps:
        raise ValueError(f"rewind_step must be in [0, train_steps={train_steps}); got {rewind_step}")
    chosen = prunable_layers(model, layers)  # (checked before any training)
    for name, m in chosen:  # (its targets, 0.2, 0.36, ... of the dense weights, would lie under its sparsity)
        if not bool(get_mask(m).all()):
            raise ValueError(f"layer {name!r} is already pruned (sparsity {_sparsity(model, [name]):.3f}); a lottery "
                             "ticket is pruned from the dense network round by round: pass an unpruned model")
    layers = [n for n, _ in chosen]
    result = LotteryResult(rewind_step=rewind_step)
    call_train(train_fn, model, rewind_step, lr)
    result.state = snapshot(model)
    for r in range(rounds + 1):
        if r > 0:
            target = 1.0 - (1.0 - prune_fraction) ** r
            if scope == "global":
                global_magnitude_prune(model, target, layers)
            else:
                layer_magnitude_prune(model, target, layers)
            rewind(model, result.state)
        call_train(train_fn, model, train_steps - rewind_step, lr)
        result.masks.append(_masks(model, layers))
        result.rounds.append({"round": r, "sparsity": _sparsity(model, layers), "metric": metric_value(eval_fn(model))})
    return result


def random_masks_like(mask_dict: dict[str, torch.Tensor], seed: int = 0,
                      model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Random masks with the same number of kept weights in each layer.
    Given the ``model`` the masks are of, a layer's weights are those of
    :func:`.adapters.used_mask` (a ``kernel_region`` conv's region): the
    kept ones are drawn among them and the entries outside keep their mask."""
    if not isinstance(mask_dict, Mapping):
        raise TypeError(f"mask_dict must be a dict {{layer name: mask tensor}}; got {type(mask_dict).__name__}")
    for name, m in mask_dict.items():
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask_dict[{name!r}] must be a mask tensor; got {type(m).__name__}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):  # (0.5 counted as kept, silently)
            raise ValueError(f"mask_dict[{name!r}] must hold only 0 and 1 (or be a bool tensor), as apply_masks takes")
    used = {}
    if model is not None:
        for name, module in prunable_layers(model, list(mask_dict)):
            used[name] = used_mask(module).cpu()
            if mask_dict[name].shape != used[name].shape:
                raise ValueError(f"mask_dict[{name!r}] must have the layer's weight shape "
                                 f"{tuple(used[name].shape)}; got {tuple(mask_dict[name].shape)}")
    g = torch.Generator().manual_seed(check_int(seed, "seed", 0))
    out = {}
    for name, m in mask_dict.items():
        inside = used.get(name, torch.ones(m.shape, dtype=torch.bool)).flatten()
        flat = m.detach().flatten().cpu().bool() & ~inside
        keep = int((m.detach().flatten().cpu().bool() & inside).sum())
        candidates = inside.nonzero().flatten()
        flat[candidates[torch.randperm(candidates.numel(), generator=g)[:keep]]] = True
        out[name] = flat.reshape(m.shape)
    return out


def train_masked(model: nn.Module, mask_dict: dict[str, torch.Tensor], train_fn: Callable, eval_fn: Callable,
                 steps: int, state: dict | None = None, lr: float | None = None) -> float:
    """Set ``model`` to ``state`` (when given), prune it with ``mask_dict``,
    train ``steps`` steps and return ``eval_fn(model)``: how a ticket and its
    controls are trained."""
    if state is not None:
        rewind(model, state)
    for name, m in prunable_layers(model, list(mask_dict)):
        if not bool(get_mask(m).all()):
            raise ValueError(f"layer {name!r} is already pruned; pass an unpruned model")
    apply_masks(model, mask_dict)
    call_train(train_fn, model, steps, lr)
    return metric_value(eval_fn(model))


def controls(make_model: Callable[[int], nn.Module], result: LotteryResult, round_index: int, train_fn: Callable,
             eval_fn: Callable, train_steps: int, seed: int = 0, lr: float | None = None) -> dict[str, float]:
    """The two controls of round ``round_index``'s ticket: ``reinit`` (same
    mask, fresh random weights from ``make_model(seed + 1)``, trained
    ``train_steps``) and ``random_mask`` (random mask of the same per-layer
    sparsity on the rewound weights, trained ``train_steps - rewind_step``)."""
    check_callable(make_model, "make_model")
    check_callable(train_fn, "train_fn")
    check_callable(eval_fn, "eval_fn")
    train_steps = check_int(train_steps, "train_steps", 1)
    seed = check_int(seed, "seed", 0)
    if train_steps <= result.rewind_step:
        raise ValueError(f"train_steps must be > the result's rewind_step={result.rewind_step}; got {train_steps}")
    try:
        round_index = as_int(round_index, "round_index")
        if not -len(result.masks) <= round_index < len(result.masks):
            raise ValueError
    except (TypeError, ValueError) as error:  # (a wrong type a TypeError, one out of range a ValueError)
        raise type(error)(f"round_index must be an int naming one of the {len(result.masks)} rounds; "
                          f"got {round_index!r}") from None
    mask_dict = result.masks[round_index]
    reinit = train_masked(make_model(seed + 1), mask_dict, train_fn, eval_fn, train_steps, None, lr)
    base = make_model(seed)
    random_mask = train_masked(base, random_masks_like(mask_dict, seed, base), train_fn, eval_fn,
                               train_steps - result.rewind_step, copy.deepcopy(result.state), lr)
    return {"reinit": reinit, "random_mask": random_mask}
