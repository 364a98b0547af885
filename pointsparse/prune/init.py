"""Pruning at initialisation, before any training: SNIP (Lee et al. 2019,
connection sensitivity ``|g * w|``), GraSP (Wang et al. 2020, keep the weights
whose removal least reduces the gradient flow: score ``-w * Hg``, the highest
removed) and SynFlow (Tanaka et al. 2020, data-free: iterative synaptic-flow
scores ``|w * dR/dw|`` of ``R = 1' f_|w|(1)`` with an exponential schedule).

``batches`` is an iterable of ``(inputs, targets)``; ``loss_fn(model(inputs),
targets)`` a scalar (``model(*inputs)`` for a tuple of inputs: an SPVCNN's). Scores come back per layer name; :func:`prune_at_init`
turns them into global masks through the core's ``global_unstructured``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Callable

import torch
from torch import nn

from ..tensor import positive_int
from . import _compat
from ._copyable import copy_model
from .adapters import apply_masks, get_mask, prunable_layers, raw, used_mask
from .criteria import check_loss
from .procedure import check_callable, check_fraction, check_real, global_magnitude_prune, tied_groups, union_of
from .._modes import kept, run_model

METHODS = ("snip", "grasp", "synflow")
_LOSS = "loss_fn(model(inputs), targets)"  # how the errors name the user's loss


def _is_sparse(x) -> bool:
    from ..tensor import SparseTensor
    return isinstance(x, SparseTensor)


def _scale_output(out, factor: float):
    return out.with_feats(out.feats * factor) if _is_sparse(out) else out * factor


def _batches(batches) -> list:
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of (inputs, targets) pairs; got {type(batches).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one (inputs, targets) pair")
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise ValueError(f"batches[{i}] must be an (inputs, targets) pair")
    return batches


def _trainable(chosen, method: str) -> None:
    """A ValueError naming the first frozen layer of ``chosen`` (SNIP and
    GraSP score by the loss gradient, which a frozen weight has not)."""
    for name, m in chosen:
        if not raw(m).requires_grad:
            raise ValueError(f"layer {name!r} is frozen (requires_grad=False): {method} scores weights by their "
                             "gradient; unfreeze it or leave it out of layers")


def snip_scores(model: nn.Module, batches: Iterable, loss_fn: Callable, layers=None) -> dict[str, torch.Tensor]:
    """SNIP: ``|mean_b dL_b/dw * w|`` over ``batches`` (the core's
    :func:`pointsparse.prune.criteria.snip`), keyed by layer name. The
    model is scored in its own modes; afterwards its buffers (BatchNorm
    statistics) and modes are as they were."""
    check_callable(loss_fn, "loss_fn")
    chosen = prunable_layers(model, layers)
    _trainable(chosen, "SNIP")

    def loss(net, batch):
        return check_loss(loss_fn(run_model(net, batch[0]), batch[1]), _LOSS)

    with kept(model):  # (the scoring forwards move BatchNorm statistics in train mode)
        scores = _compat.snip_criterion(model, loss, _batches(batches), [(m, "weight") for _, m in chosen])
    return {n: scores[(m, "weight")] for n, m in chosen}


def grasp_scores(model: nn.Module, batches: Iterable, loss_fn: Callable, layers=None,
                 temperature: float = 200.0) -> dict[str, torch.Tensor]:
    """GraSP: ``-w * (H g)`` with ``g`` the loss gradient over ``batches``
    (outputs divided by ``temperature``) and ``H`` the Hessian; the weights
    with the HIGHEST scores are the ones to remove. A float16 / bfloat16
    model is scored on a float32 copy (its floating inputs cast too): ``H g``
    is ~1e-8, which float16 rounds to 0."""
    check_callable(loss_fn, "loss_fn")
    check_real(temperature, "temperature", "a finite number > 0", lambda v: v > 0)
    chosen = prunable_layers(model, layers)
    _trainable(chosen, "GraSP")
    batches = _batches(batches)
    if any(raw(m).dtype in (torch.float16, torch.bfloat16) for _, m in chosen):
        model = copy_model(model).float()
        named = dict(model.named_modules())
        chosen = [(n, named[n]) for n, _ in chosen]
        batches = [(_float32(x), y) for x, y in batches]
    params = [raw(m) for _, m in chosen]

    def scaled_loss(x, y):
        return check_loss(loss_fn(_scale_output(run_model(model, x), 1.0 / temperature), y), _LOSS)

    with kept(model):  # (as SNIP's)
        g_total = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            g = torch.autograd.grad(scaled_loss(x, y), params, allow_unused=True)
            for acc, gi in zip(g_total, g):
                if gi is not None:
                    acc += gi
        hg = [torch.zeros_like(p) for p in params]
        for x, y in batches:
            g = torch.autograd.grad(scaled_loss(x, y), params, create_graph=True, allow_unused=True)
            z = sum((gi * gt).sum() for gi, gt in zip(g, g_total) if gi is not None)
            h = torch.autograd.grad(z, params, allow_unused=True)
            for acc, hi in zip(hg, h):
                if hi is not None:
                    acc += hi
    return {n: -(m.weight.detach() * h) for (n, m), h in zip(chosen, hg)}


def _float32(x):
    """A floating tensor or SparseTensor ``x`` in float32, each element of a
    tuple (a model of several arguments: SPVCNN's ``(voxels, inverse,
    points, point_batch)``) alike; anything else as it is."""
    if isinstance(x, tuple):
        return tuple(_float32(v) for v in x)
    if _is_sparse(x) or (isinstance(x, torch.Tensor) and x.is_floating_point()):
        return x.float()
    return x


def _ones_like_input(example_input):
    """SynFlow's input: ``example_input`` with its features all ones, in
    float64; a tuple (a model of several arguments, ``model(*inputs)``:
    SPVCNN's ``(voxels, inverse, points, point_batch)``) with its first
    element's features all ones and the others as they are (their floating
    tensors, positions, widened to float64 with the network)."""
    if isinstance(example_input, tuple) and example_input:
        rest = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                     for t in example_input[1:])
        return (_ones_like_input(example_input[0]), *rest)
    if _is_sparse(example_input):
        x = example_input.double()
        return x.with_feats(torch.ones_like(x.feats))
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a torch.Tensor or SparseTensor (or a tuple of the model's arguments, "
                        f"the first one such); got {type(example_input).__name__}")
    return torch.ones_like(example_input, dtype=torch.float64)


def synflow_scores(model: nn.Module, example_input, sparsity: float = 0.0, iterations: int = 100,
                   layers=None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SynFlow without data. On a float64 copy with every parameter and buffer
    replaced by its absolute value (BatchNorm in eval mode), input all ones:
    for ``k = 1..iterations`` score ``|w * dR/dw|`` with ``R`` the sum of the
    outputs, and mask to density ``(1 - sparsity)^(k/iterations)`` of the
    layers' weights (a ``kernel_region`` conv's region's: the values outside
    it, never run, keep a True mask). Returns ``(scores, masks)``; with
    ``sparsity = 0`` a single scoring pass."""
    check_fraction(sparsity, "sparsity")
    iterations = positive_int(iterations, "iterations")
    # (layers sharing one weight, tied, are one group: their weight ranked and counted once, one mask)
    groups = [[n for n, _ in group] for group in tied_groups(model, prunable_layers(model, layers))]
    net = copy_model(model).double().eval()
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point():
                t.abs_()
    named = dict(net.named_modules())
    params = [raw(named[group[0]]) for group in groups]
    base = [p.detach().clone() for p in params]
    mask = [torch.ones_like(p, dtype=torch.bool) for p in params]
    # (a kernel_region conv's region: the values outside are not ranked; a tied weight's, any of its layers')
    used = [union_of(used_mask(named[n]) for n in group) for group in groups]
    x = _ones_like_input(example_input)
    total = sum(int(u.sum()) for u in used)
    scores = None
    steps = iterations if sparsity > 0 else 1
    for k in range(1, steps + 1):
        with torch.no_grad():
            for p, b, mk in zip(params, base, mask):
                p.copy_(b * mk)
        out = run_model(net, x)
        r = (out.feats if _is_sparse(out) else out).sum()
        grads = torch.autograd.grad(r, params, allow_unused=True)
        scores = [(g if g is not None else torch.zeros_like(p)) * p.detach() for g, p in zip(grads, params)]
        scores = [s.abs() for s in scores]
        if sparsity > 0:
            keep = int(round(total * (1.0 - sparsity) ** (k / steps)))
            flat = torch.cat([s.masked_fill(~u, -1.0).flatten() for s, u in zip(scores, used)])
            threshold_idx = torch.topk(flat, keep).indices
            keep_flat = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            keep_flat[threshold_idx] = True
            pos = 0
            for i, p in enumerate(params):
                mask[i] = keep_flat[pos:pos + p.numel()].reshape(p.shape) | ~used[i]
                pos += p.numel()
    score_dict = {n: s.float() for group, s in zip(groups, scores) for n in group}
    mask_dict = {n: mk | ~used_mask(named[n]) for group, mk in zip(groups, mask) for n in group}
    return score_dict, mask_dict


def prune_at_init(model: nn.Module, method: str, sparsity: float, batches: Iterable | None = None,
                  loss_fn: Callable | None = None, example_input=None, iterations: int = 100,
                  layers=None) -> dict[str, torch.Tensor]:
    """Prune an untrained ``model`` to global ``sparsity`` with SNIP, GraSP
    (both need ``batches`` and ``loss_fn``) or SynFlow (needs only
    ``example_input``, for its shape/coords). Returns the masks applied."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    check_fraction(sparsity, "sparsity")
    chosen = prunable_layers(model, layers)
    names = [n for n, _ in chosen]
    if method in ("snip", "grasp"):
        if batches is None or loss_fn is None:
            raise ValueError(f"{method} needs batches and loss_fn")
        if method == "snip":
            scores = snip_scores(model, batches, loss_fn, names)
        else:
            raw = grasp_scores(model, batches, loss_fn, names)
            top = max(float(s.max()) for s in raw.values())
            scores = {n: top - s + 1e-12 for n, s in raw.items()}  # remove the highest GraSP scores
        model.zero_grad(set_to_none=True)
        global_magnitude_prune(model, sparsity, names, scores=scores)
    else:
        if example_input is None:
            raise ValueError("synflow needs example_input (an input of the right shape; its values are not used)")
        scores, mask_dict = synflow_scores(model, example_input, sparsity, iterations, names)
        apply_masks(model, mask_dict)
    return {n: get_mask(m).clone() for n, m in chosen}
