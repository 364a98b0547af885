"""Penalties that push training toward sparsity. Each returns a scalar
tensor to add (times a coefficient) to the loss; each differentiates through
``name_orig * name_mask`` on a pruned tensor, so pruned entries add nothing.

* :func:`l1` ``sum |w|`` and :func:`l2` ``sum w^2`` (element sparsity);
* :func:`group_lasso` ``sum_g ||w_g||_2`` over channels, kernels, offsets or
  stripes (whole groups go to zero; ``scale_by_size`` weights each group by
  ``sqrt(|g|)`` as in Yuan & Lin);
* :func:`slimming` ``sum |gamma|`` over BatchNorm scales (network slimming);
* :func:`skeleton_l1` ``sum |s|`` over Filter Skeletons (SWP).

A float16 / bfloat16 model's penalty is computed and returned in float32
(``sum |w|`` of a float16 MinkUNet, ~165k, is past float16's largest value,
65504); gradients reach the parameters in their own dtype."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..tensor import as_bool
from .adapters import current_weight, used_entries
from .criteria import _parameters, _wide, bn_pairs, find_batchnorm, group_ids
from .stripe import used_skeletons


def _sum(terms, what):
    terms = list(terms)
    if not terms:
        raise ValueError(f"no {what} to regularize")
    return torch.stack(terms).sum()


def _used_weight(module, name) -> torch.Tensor:
    """``module.name`` with its entries that are no weights of the layer
    zeroed (a ``kernel_region`` conv's outside its region: never run); a
    layer without a region as it is (no mask built on every step)."""
    w = current_weight(module, name)
    return w if getattr(module, "kernel_region", None) is None else w * used_entries(module, name)


def l1(parameters) -> torch.Tensor:
    """``sum |w|`` over ``parameters`` (a model: its Linear/conv weights, or
    ``(module, name)`` pairs; a ``kernel_region`` conv's inside its region)."""
    return _sum((_wide(_used_weight(m, n)).abs().sum() for m, n in _parameters(parameters)), "weights")


def l2(parameters) -> torch.Tensor:
    """``sum w^2`` over ``parameters`` (weight decay as a loss term; a
    ``kernel_region`` conv's inside its region)."""
    return _sum((_wide(_used_weight(m, n)).pow(2).sum() for m, n in _parameters(parameters)), "weights")


def group_lasso(parameters, group: str = "out", scale_by_size: bool = False) -> torch.Tensor:
    """``sum_g ||w_g||_2`` with groups ``"out"``/``"in"`` (channels),
    ``"kernel"`` ((out, in) kernels), ``"offset"`` (kernel positions of the
    whole layer) or ``"stripe"`` ((filter, position) stripes). ``scale_by_size``
    (a bool) weights each group's norm by ``sqrt(|g|)``."""
    scale_by_size = as_bool(scale_by_size, "scale_by_size")
    terms = []
    for module, name in _parameters(parameters):
        weight = _used_weight(module, name)  # (a kernel_region conv's region: the conv never runs the rest)
        ids, count = group_ids(module, name, group)
        # In float32 at least: a float16 square of |w| < ~2e-4 is 0, and so is the 1e-30 floor below (a zero
        # group's sqrt backward then inf * 0: NaN).
        wide = _wide(weight)
        squares = torch.zeros(count, dtype=wide.dtype, device=weight.device)
        squares = squares.index_add(0, ids.flatten(), wide.pow(2).flatten())
        # sqrt has an infinite derivative at 0: zero groups get a zero gradient.
        norms = torch.where(squares > 0, squares.clamp_min(1e-30).sqrt(), torch.zeros_like(squares))
        if scale_by_size:
            used = used_entries(module, name)
            sizes = torch.bincount(ids.flatten(), weights=used.flatten().to(torch.float64), minlength=count)
            sizes = sizes.to(wide.dtype)
            norms = norms * sizes.sqrt()
        terms.append(norms.sum())
    return _sum(terms, "weights")


def slimming(model_or_norms) -> torch.Tensor:
    """``sum |gamma|`` over BatchNorms: a model (every BatchNorm following a
    prunable layer, see :func:`pointsparse.prune.criteria.bn_pairs`) or an
    iterable of BatchNorm modules (or modules wrapping one)."""
    if isinstance(model_or_norms, nn.Module):
        norms = [bn for _, bn in bn_pairs(model_or_norms)]
    elif isinstance(model_or_norms, (str, bytes)) or not isinstance(model_or_norms, Iterable):
        raise TypeError(f"model_or_norms must be a model or an iterable of BatchNorm modules (or modules wrapping "
                        f"one); got {type(model_or_norms).__name__}")
    else:
        norms = []
        for module in model_or_norms:
            bn = find_batchnorm(module)
            if bn is None:
                raise TypeError(f"{type(module).__name__} is not and does not wrap a BatchNorm")
            norms.append(bn)
    return _sum((_wide(current_weight(bn, "weight")).abs().sum() for bn in norms), "BatchNorm scales")


def skeleton_l1(model: nn.Module) -> torch.Tensor:
    """``sum |s|`` over every Filter Skeleton attached in ``model`` (a
    ``kernel_region`` conv's: the stripes of its region, which hold its
    weights; the scales outside multiply nothing the conv runs)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (its attached Filter Skeletons are summed); got "
                        f"{type(model).__name__}")
    return _sum((_wide(s).abs().sum() if used is None else _wide(s).abs()[used].sum()
                 for s, used in used_skeletons(model)),
                "filter skeletons")
