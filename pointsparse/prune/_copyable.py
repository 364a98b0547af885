"""Masked modules that ``copy.deepcopy`` accepts in any state.

torch's mask re-parametrisation leaves ``weight = weight_orig * weight_mask``
on the module after pruning and after every forward: a non-leaf tensor, which
``copy.deepcopy`` refuses. Here that product stays what torch leaves, attached
to autograd (a loss that reads ``module.weight``, a hand-written L1 term,
reaches ``weight_orig`` as it does with torch's pruning), but as a
:class:`_Product`, which deepcopy and pickling take as its values, detached
(the copy's forward pre-hook recomputes it from ``weight_orig`` before use).
Inside a torch.compile trace it is detached, as before."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune as _torch_prune


class _Product(torch.Tensor):
    """A masked tensor's product ``name_orig * name_mask`` as torch's hook
    left it on the module, attached to autograd, that ``copy.deepcopy``,
    ``pickle`` and ``torch.save`` take: copied or saved, it is a plain
    detached tensor of its values (torch refuses a non-leaf tensor). Ops on
    it give plain tensors (torch function handling off: no subclass spreads
    into the layers that read it)."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __deepcopy__(self, memo):
        out = self.detach().clone()
        memo[id(self)] = out
        return out

    def __reduce_ex__(self, protocol):
        return self.detach().clone().__reduce_ex__(protocol)


def _detach_masked(module: nn.Module, inputs=None, output=None) -> None:
    """Makes ``module``'s masked products copyable (a forward hook, and after
    pruning): each a :class:`_Product` on the same graph, detached inside a
    torch.compile trace (a tensor subclass made there is no graph value)."""
    for key in list(module._parameters):
        if key.endswith("_orig"):
            value = module.__dict__.get(key[:-5])
            # (requires_grad, not grad_fn: torch.compile traces no grad_fn, and a fullgraph compile of a
            # pruned layer in grad mode failed on it; the product is no leaf, the hook makes it each forward)
            if not isinstance(value, torch.Tensor) or not value.requires_grad or isinstance(value, _Product):
                continue
            if torch.compiler.is_compiling() or value.is_leaf:
                setattr(module, key[:-5], value.detach())
            else:
                setattr(module, key[:-5], value.as_subclass(_Product))


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` that also copies modules pruned by torch's own
    methods (``l1_unstructured``, ``ln_structured``, ``custom_from_mask``,
    ``global_unstructured``, ...: torch's objects, whose product deepcopy
    refuses after pruning or a forward in grad mode): a computed (non-leaf)
    tensor, as a masked ``weight``, is copied detached (the copy's forward
    pre-hook recomputes it from ``weight_orig``). A TypeError names anything
    but a module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    memo = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def keep_copyable(module: nn.Module) -> None:
    """Detach ``module``'s masked values now and after each of its forwards."""
    _detach_masked(module)
    if not getattr(module, "_pointsparse_copyable", False):
        module.register_forward_hook(_detach_masked)
        module._pointsparse_copyable = True


class CopyableMethod(_torch_prune.BasePruningMethod):
    """A pruning method whose pruned modules stay deep-copyable. Without
    ``importance_scores`` a tensor pruned before is ranked by its weights
    now, ``name_orig * name_mask`` (torch's methods rank ``module.name``, the
    product cached at the last forward)."""

    @classmethod
    def apply(cls, module, name, *args, importance_scores=None, **kwargs):
        # (adapters imports this module)
        from .adapters import check_has_values, check_maskable, weight_now  # noqa: PLC0415

        check_maskable(module, name)
        check_has_values(module, name)
        if importance_scores is not None:
            _check_scores(module, name, importance_scores)
        elif isinstance(module._parameters.get(name + "_orig"), torch.Tensor):
            # torch's default is module.name, the product cached at the last forward (or pruning): an
            # optimizer step since has changed name_orig, so rank the weights as they are now.
            with torch.no_grad():  # (the product's graph would be made and dropped)
                importance_scores = weight_now(module, name)
        # torch's apply takes the tensor's earlier hook off the module (or adds
        # the new method to its container) before the new mask is computed,
        # and puts neither back when that fails: a refused method left the
        # mask no longer applied, silently. (It undoes the rest itself.)
        hooks = dict(module._forward_pre_hooks)
        methods = {k: h._pruning_methods for k, h in hooks.items() if isinstance(h, _torch_prune.PruningContainer)}
        try:
            method = super().apply(module, name, *args, importance_scores=importance_scores, **kwargs)
        except BaseException:
            module._forward_pre_hooks.clear()  # (in their order: the hooks run in it)
            module._forward_pre_hooks.update(hooks)
            for k, m in methods.items():
                hooks[k]._pruning_methods = m
            raise
        keep_copyable(module)
        return method


def _check_scores(module: nn.Module, name: str, scores) -> None:
    """``importance_scores`` must be a tensor of the pruned tensor's shape,
    of real numbers and no NaN: a ``TypeError`` / ``ValueError`` naming it
    (torch's own check is an ``assert``, gone under ``python -O``)."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"importance_scores must be a tensor; got {type(scores).__name__}")
    target = getattr(module, name + "_orig", None)
    if target is None:
        target = getattr(module, name, None)
    if isinstance(target, torch.Tensor) and scores.shape != target.shape:
        raise ValueError(f"importance_scores must have the shape of {type(module).__name__}.{name}, "
                         f"{tuple(target.shape)}; got {tuple(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"importance_scores must be real numbers; got {scores.dtype}")
    if scores.is_floating_point() and bool(torch.isnan(scores.detach()).any()):  # topk ranks NaN above all
        raise ValueError(f"importance_scores for {type(module).__name__}.{name} hold "
                         f"{int(torch.isnan(scores.detach()).sum())} NaN value(s); every entry needs a number")
