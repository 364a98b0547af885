"""Importance criteria. Each returns a dict ``{(module, name): scores}`` with
``scores`` of the parameter's shape, larger = more important, ready for any
method's ``importance_scores`` (per layer: ``scores[(m, "weight")]``) or for
``global_unstructured`` / ``global_structured`` (the whole dict).

Data-driven criteria take ``loss_fn(model, batch) -> scalar loss`` and an
iterable of ``batches`` (anything ``loss_fn`` understands). On a pruned
tensor they differentiate through ``name_orig * name_mask``, so pruned
entries score 0. Their scores are computed from the model's gradients in
float32 at least (float32 for a float16 / bfloat16 model: a float16
``(g * w)^2`` below ~6e-8 is 0), as ``magnitude``'s.

================  ==========================================================
criterion         score of weight ``w`` (B batches, ``g_b = dL_b/dw``)
================  ==========================================================
``magnitude``     ``|w|^p`` (or a group's Lp norm, on each of its entries)
``random``        uniform [0, 1)
``snip``          ``|mean_b(g_b) * w|`` (connection sensitivity, SNIP)
``taylor``        ``mean_b (g_b * w)^2`` (first-order Taylor, Molchanov 2019;
                  per group ``mean_b (sum_g g_b * w)^2``)
``obd``           ``1/2 * H_ii * w^2`` (Optimal Brain Damage), ``H_ii``
                  from Hutchinson probes or the empirical Fisher
``bn_scaling``    ``|gamma_c|`` of the BatchNorm after the layer, on every
                  weight of output channel ``c`` (network slimming)
================  ==========================================================
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn

from ..tensor import as_int
from . import adapters
from .adapters import current_weight, is_layer, layout_of, prunable_modules
from .structured import ChannelStructured, KernelStructured, StripeStructured, group_scores

Scores = dict  # {(module, name): tensor}


def _parameters(model_or_pairs) -> list[tuple[nn.Module, str]]:
    if isinstance(model_or_pairs, nn.Module):
        pairs = [(module, "weight") for _, module in prunable_modules(model_or_pairs)]
    elif isinstance(model_or_pairs, (str, bytes)) or not isinstance(model_or_pairs, Iterable):
        raise TypeError(f"parameters must be a model or an iterable of (module, name) pairs; got "
                        f"{type(model_or_pairs).__name__}")
    else:
        pairs = list(model_or_pairs)
    if not pairs:
        raise ValueError("no (module, name) pairs to score")
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], nn.Module) and isinstance(pair[1], str)):
            raise TypeError(f"parameters must be (module, name) pairs; got {pair!r}")
    return pairs


def _leaf(module: nn.Module, name: str) -> torch.Tensor:
    """The trainable tensor behind ``module.name`` (``name_orig`` if pruned)."""
    leaf = module._parameters.get(name + "_orig")
    if leaf is None:
        leaf = module._parameters.get(name)
    if leaf is None:
        raise TypeError(f"{type(module).__name__}.{name} is not a parameter")
    return leaf


_GROUPS = {
    "out": lambda layout: ChannelStructured(0, n=1, axis="out", layout=layout),
    "in": lambda layout: ChannelStructured(0, n=1, axis="in", layout=layout),
    "kernel": lambda layout: KernelStructured(0, n=1, scope="pair", layout=layout),
    "offset": lambda layout: KernelStructured(0, n=1, scope="offset", layout=layout),
    "stripe": lambda layout: StripeStructured(0, n=1, layout=layout),
}


def group_ids(module: nn.Module, name: str, group: str) -> tuple[torch.Tensor, int]:
    """Group index of each entry of ``module.name`` for ``group`` in
    ``"out", "in", "kernel", "offset", "stripe"``."""
    if group not in _GROUPS:
        raise ValueError(f"group must be one of {sorted(_GROUPS)}; got {group!r}")
    weight = _leaf(module, name)
    return _GROUPS[group](layout_of(module, name)).group_ids(weight.shape, weight.device)


def magnitude(parameters, p: float = 1, group: str | None = None) -> Scores:
    """``|w|^p`` per entry; with ``group`` the group's Lp norm (of the
    unpruned entries) broadcast to each of its entries, computed scaled by
    the group's largest ``|w|`` so that any ``p`` ranks groups as the exact
    norms do (see :func:`pointsparse.prune.structured.group_scores`).

    Scores are in the weight's dtype or float32 where that is narrower. Per
    entry ``|w|^p`` is the score itself: where it underflows to 0 for a
    nonzero ``|w|`` or overflows to inf (``p=2000`` on weights ``~1e-3`` or
    ``~1e3``) the scores no longer order the weights, and that is a
    ValueError naming ``p`` (``p=1`` orders the entries as any ``p`` does; a
    group norm is computed stably)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not p > 0:
        raise ValueError(f"p must be a positive number; got {p!r}")
    if group is None and p == float("inf"):  # |w|^inf is 0 for every |w| < 1: the ranking is lost
        raise ValueError("p=inf is a group norm (the largest |w| of a group): pass group=..., or a finite p for "
                         "per-entry scores |w|^p")
    out = {}
    for module, name in _parameters(parameters):
        weight = current_weight(module, name).detach()
        if group is None:
            # In float32 at least: float16 / bfloat16 squares of weights below ~2e-4 / ~1e-19 vanish.
            size = weight.abs().to(torch.promote_types(weight.dtype, torch.float32))
            scores = size.pow(p)
            lost = ((scores == 0) & (size != 0)) | (torch.isinf(scores) & torch.isfinite(size))
            if bool(lost.any()):
                raise ValueError(
                    f"p={p!r}: |w|^p of {int(lost.sum())} weight(s) of {type(module).__name__}.{name} "
                    f"({str(weight.dtype).replace('torch.', '')}, |w| in [{float(size[size > 0].min()):.3g}, "
                    f"{float(size.max()):.3g}]) underflows to 0 or overflows to inf, so the scores no longer "
                    "order the weights; use p=1 (the same order of entries) or a group norm (group=...)")
            out[(module, name)] = scores
        else:
            ids, count = group_ids(module, name, group)  # (a kernel_region conv's groups: of its region's entries)
            norms, _ = group_scores(weight, adapters.used_entries(module, name), ids, count, p)
            # (float32 at least, as per entry: float16 norms 100.0156 and 100.0 were both 100.0, a tie)
            out[(module, name)] = norms.to(torch.promote_types(weight.dtype, torch.float32))[ids]
    return out


def random(parameters, generator: torch.Generator | None = None) -> Scores:
    """Uniform [0, 1) scores (the random-pruning baseline)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    return {
        (module, name): torch.rand(_leaf(module, name).shape, generator=generator).to(_leaf(module, name).device)
        for module, name in _parameters(parameters)
    }


def check_loss_fn(loss_fn, batches) -> None:
    """``loss_fn`` callable and ``batches`` iterable (a TypeError naming
    each), checked before any batch runs."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (loss_fn(model, batch) -> scalar loss tensor); got "
                        f"{type(loss_fn).__name__}")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches (a list, a DataLoader); got {type(batches).__name__}")


def check_loss(loss, what: str = "loss_fn(model, batch)") -> torch.Tensor:
    """``loss`` if it is a scalar tensor that autograd can differentiate; else
    a TypeError (not a 0-d tensor) or ValueError (no gradient, NaN or inf) saying that
    ``what`` (the call that gave it) must return one: a batch of losses, a
    float or a detached value fail here, not inside ``torch.autograd.grad``."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"{what} must return a scalar loss tensor; got {type(loss).__name__}")
    if loss.dim() != 0:  # (a TypeError, as it always was)
        raise TypeError(f"{what} must return a scalar loss tensor (0-d: reduce it, e.g. .mean()); got a tensor "
                         f"of shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"{what} returned a loss without gradient (no grad_fn): compute it from the model's "
                         "output with gradients enabled (not under torch.no_grad(), not .detach() or .item())")
    if not bool(torch.isfinite(loss.detach())):  # its gradients, every score, would be NaN
        raise ValueError(f"{what} returned the loss {float(loss.detach())}; scores need a finite loss (a batch "
                         "without labels, a diverged model?)")
    return loss


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (scores of float16 / bfloat16 weights)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _gradients(model, loss_fn, batches, pairs, create_graph=False):
    """Yield, per batch, the list of ``dL/d leaf`` for ``pairs``."""
    check_loss_fn(loss_fn, batches)
    leaves = [_leaf(module, name) for module, name in pairs]
    for (module, name), leaf in zip(pairs, leaves):  # (autograd.grad's RuntimeError from inside, else)
        if not leaf.requires_grad:
            where = next((f"layer {n!r} ({type(module).__name__}.{name})" for n, m in model.named_modules()
                          if m is module), f"{type(module).__name__}.{name}")
            raise ValueError(f"{where} is frozen (requires_grad=False): a data-driven criterion needs its "
                             "gradient; unfreeze it or pass parameters without it")
    seen = 0
    for batch in batches:
        loss = check_loss(loss_fn(model, batch))
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
        seen += 1
        yield [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)], leaves
    if seen == 0:
        raise ValueError("batches is empty: the criterion needs at least one batch")


def snip(model: nn.Module, loss_fn: Callable, batches: Iterable, parameters=None) -> Scores:
    """SNIP connection sensitivity ``|mean_b(dL_b/dw) * w|``."""
    pairs = _parameters(parameters if parameters is not None else model)
    total = None
    count = 0
    for grads, _ in _gradients(model, loss_fn, batches, pairs):
        grads = [_wide(g) for g in grads]
        total = grads if total is None else [t + g for t, g in zip(total, grads)]
        count += 1
    return {
        pair: (g / count * _wide(current_weight(*pair).detach())).abs() for pair, g in zip(pairs, total)
    }


def taylor(model: nn.Module, loss_fn: Callable, batches: Iterable, parameters=None, group: str | None = None) -> Scores:
    """First-order Taylor importance ``mean_b (dL_b/dw * w)^2`` (the squared
    loss change from removing ``w``, accumulated over batches). With
    ``group`` (``"out"``, ``"in"``, ``"kernel"``, ``"offset"``, ``"stripe"``)
    the group's ``mean_b (sum_{s in g} dL_b/dw_s * w_s)^2`` (removing the
    whole group, Molchanov et al. 2019), broadcast to each of its entries."""
    pairs = _parameters(parameters if parameters is not None else model)
    weights = [_wide(current_weight(*pair).detach()) for pair in pairs]
    groups = [group_ids(*pair, group) if group is not None else None for pair in pairs]
    total = [torch.zeros_like(w) for w in weights]
    count = 0
    for grads, _ in _gradients(model, loss_fn, batches, pairs):
        for index, (g, w, spec) in enumerate(zip(grads, weights, groups)):
            contribution = _wide(g.detach()) * w
            if spec is not None:
                ids, size = spec
                sums = torch.zeros(size, dtype=w.dtype, device=w.device).index_add_(
                    0, ids.flatten(), contribution.flatten()
                )
                contribution = sums[ids]
            total[index] = total[index] + contribution.pow(2)
        count += 1
    return {pair: t / count for pair, t in zip(pairs, total)}


def hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    parameters=None,
    estimator: str = "hutchinson",
    samples: int = 16,
    generator: torch.Generator | None = None,
) -> Scores:
    """Diagonal of the Hessian of the mean batch loss w.r.t. each tensor.

    * ``estimator="hutchinson"``: ``mean(v * Hv)`` over ``samples`` Rademacher
      probes ``v`` per batch (unbiased; variance per entry
      ``sum_{j != i} H_ij^2 / probes``); ``Hv`` by double backprop.
    * ``estimator="fisher"``: the empirical Fisher ``mean_b (dL_b/dw)^2``
      (each batch one sample: pass single examples as batches for the textbook
      empirical Fisher; it matches the Hessian for a likelihood loss near a
      minimum, not in general)."""
    if estimator not in ("hutchinson", "fisher"):
        raise ValueError(f"estimator must be 'hutchinson' or 'fisher'; got {estimator!r}")
    samples = as_int(samples, "samples", 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None; got {type(generator).__name__}")
    pairs = _parameters(parameters if parameters is not None else model)
    total = None
    count = 0
    for grads, leaves in _gradients(model, loss_fn, batches, pairs, create_graph=estimator == "hutchinson"):
        if estimator == "fisher":
            estimate = [_wide(g.detach()).pow(2) for g in grads]
            count += 1
        else:
            estimate = [_wide(torch.zeros_like(leaf)) for leaf in leaves]
            usable = [g.requires_grad for g in grads]
            for sample in range(samples):
                probes = [
                    (torch.randint(0, 2, leaf.shape, generator=generator).to(leaf) * 2 - 1) for leaf in leaves
                ]
                dot = sum((g * v).sum() for g, v, ok in zip(grads, probes, usable) if ok)
                if isinstance(dot, torch.Tensor) and dot.requires_grad:
                    hv = torch.autograd.grad(dot, leaves, retain_graph=sample + 1 < samples, allow_unused=True)
                else:
                    hv = [None] * len(leaves)
                estimate = [
                    e + (_wide(v * h.detach()) if h is not None else 0) for e, v, h in zip(estimate, probes, hv)
                ]
            estimate = [e / samples for e in estimate]
            count += 1
        total = estimate if total is None else [t + e for t, e in zip(total, estimate)]
    return {pair: t / count for pair, t in zip(pairs, total)}


def obd(
    model: nn.Module,
    loss_fn: Callable,
    batches: Iterable,
    parameters=None,
    estimator: str = "hutchinson",
    samples: int = 16,
    generator: torch.Generator | None = None,
) -> Scores:
    """Optimal Brain Damage saliency ``1/2 * H_ii * w^2`` with ``H_ii`` from
    :func:`hessian_diagonal` (``estimator`` ``"hutchinson"`` or
    ``"fisher"``). Hutchinson estimates can be slightly negative where the
    curvature is near zero; they are returned as estimated."""
    check_loss_fn(loss_fn, batches)
    batches = list(batches)
    diagonal = hessian_diagonal(model, loss_fn, batches, parameters, estimator, samples, generator)
    return {pair: 0.5 * h * _wide(current_weight(*pair).detach()).pow(2) for pair, h in diagonal.items()}


def find_batchnorm(module: nn.Module) -> nn.Module | None:
    """The norm (a module whose adapter is a ``"norm"``: BatchNorm, or a
    user's) that ``module`` is or wraps (e.g. ``pointsparse.nn.BatchNorm``
    around a ``BatchNorm1d``), else None. A container holding prunable layers
    (a block, a network) is not a BatchNorm wrapper."""
    if adapters.is_norm(module):
        return module
    if any(is_layer(m) for m in module.modules()):
        return None
    for child in module.children():
        if adapters.is_norm(child):
            return child
    return None


def bn_pairs(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(layer, batchnorm)`` for each prunable layer followed (in module
    registration order) by a BatchNorm, or a module wrapping one, with as many
    features as the layer has output channels."""
    pairs = []
    last = None
    inner_seen: set[int] = set()
    for module in model.modules():
        if id(module) in inner_seen:
            continue
        bn = find_batchnorm(module)
        if bn is not None:
            inner_seen.add(id(bn))
            if last is not None and adapters.adapter_for(bn).channels(bn, "out") == adapters.out_channels(last):
                pairs.append((last, bn))
            last = None
        elif is_layer(module):
            last = module
    return pairs


def bn_scaling(model_or_pairs) -> Scores:
    """Network-slimming channel scores: every weight of output channel ``c``
    of a layer scores ``|gamma_c|`` of the BatchNorm right after it.
    ``model_or_pairs``: a model (pairs found by :func:`bn_pairs`) or
    ``(layer, batchnorm)`` pairs; the BatchNorm may be any module with a 1-D
    ``weight`` of the layer's output-channel count or a module wrapping a
    ``_BatchNorm``.

    Every entry of a channel carries the same score, so a group method with
    ``n=float("inf")`` (e.g. ``global_structured(..., ChannelStructured,
    n=float("inf"), importance_scores=scores)``) ranks channels by
    ``|gamma|`` exactly, across layers of any size. The scores of a 16-bit
    BatchNorm are float32 (as every criterion's: :func:`normalize` then
    divides them without rounding distinct gammas to one score)."""
    if isinstance(model_or_pairs, nn.Module):
        pairs = bn_pairs(model_or_pairs)
    elif isinstance(model_or_pairs, (str, bytes)) or not isinstance(model_or_pairs, Iterable):
        raise TypeError(f"model_or_pairs must be a model or (layer, batchnorm) pairs; got "
                        f"{type(model_or_pairs).__name__}")
    else:
        pairs = list(model_or_pairs)
        for i, pair in enumerate(pairs):  # (an unpacking error from the loop below, naming nothing)
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(m, nn.Module) for m in pair)):
                raise TypeError(f"model_or_pairs[{i}] must be a (layer, batchnorm) pair of modules; got "
                                f"{type(pair).__name__}")
    if not pairs:
        raise ValueError("no (layer, batchnorm) pairs found")
    out = {}
    for layer, norm in pairs:
        gamma = _gamma(norm)
        weight = _leaf(layer, "weight")
        layout = layout_of(layer, "weight")
        channels = weight.shape[layout.out_axis]
        if gamma.shape != (channels,):
            raise ValueError(
                f"the BatchNorm after {type(layer).__name__} has {tuple(gamma.shape)} scales; "
                f"expected ({channels},) (one per output channel)"
            )
        view = [1] * weight.dim()
        view[layout.out_axis] = channels
        out[(layer, "weight")] = _wide(gamma.detach().abs()).view(view).expand_as(weight).clone()
    return out


def _gamma(norm: nn.Module) -> torch.Tensor:
    bn = find_batchnorm(norm)
    source = bn if bn is not None else norm
    gamma = current_weight(source, "weight") if hasattr(source, "weight") else None
    if not isinstance(gamma, torch.Tensor) or gamma.dim() != 1:
        raise TypeError(f"{type(norm).__name__} has no 1-D affine weight (gamma)")
    return gamma


def _l2(values: torch.Tensor) -> torch.Tensor:
    """The L2 norm of ``values`` (>= 0) scaled by their largest: torch's
    ``vector_norm`` squares them as they are, so scores ``~1e30`` in float32
    had the norm inf (every normalised score 0) and ``~1e-30`` the norm 0
    (left unnormalised)."""
    peak = values.amax() if values.numel() else values.new_zeros(())
    if not (peak > 0 and torch.isfinite(peak)):
        return peak
    return peak * torch.linalg.vector_norm(values / peak)


def normalize(scores: Scores, how: str = "l2") -> Scores:
    """Each tensor's scores divided by their L2 norm (``how="l2"``), their
    maximum (``"max"``) or their mean (``"mean"``), so that layers compare
    fairly in a global ranking; float16 / bfloat16 scores in float32, as the
    criteria give them."""
    reducers = {"l2": _l2, "max": torch.amax, "mean": torch.mean}
    if how not in reducers:
        raise ValueError(f"how must be one of {sorted(reducers)}; got {how!r}")
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict {{(module, name): tensor}} (what a criterion returns); "
                        f"got {type(scores).__name__}")
    out = {}
    for key, value in scores.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"scores[{key!r}] must be a tensor; got {type(value).__name__}")
        value = _wide(value)  # (16-bit scores divided in their dtype: distinct scores became one)
        if value.numel() == 0:  # (a layer without weights: nothing to scale; torch's amax refuses it)
            out[key] = value.clone()
            continue
        scale = reducers[how](value.abs())
        out[key] = value / scale if scale > 0 else value.clone()
    return out
