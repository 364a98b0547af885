"""Inference fusion: BatchNorm folded into the convolution before it, ReLU
run in the convolution kernel's store."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .modules import BatchNorm, Conv3d, ReLU


def fold_batchnorm(conv: Conv3d, bn: nn.BatchNorm1d) -> None:
    """In place: ``conv`` then ``bn`` (eval mode: running statistics) become
    one ``conv`` with ``weight[:, :, c] * s[c]`` and bias ``(bias - mean) * s +
    beta``, ``s = gamma / sqrt(var + eps)``. A pruned gamma or beta
    (``weight_orig`` and a mask) is read as ``orig * mask``, what ``bn``
    computes with now. The folded weight keeps the weight's
    ``requires_grad``, the bias the conv's bias's (the weight's where the
    conv had none): a frozen conv stays frozen."""
    if not isinstance(conv, Conv3d):
        raise TypeError(f"fold_batchnorm: conv must be a pointsparse.nn.Conv3d; got {type(conv).__name__}")
    if not isinstance(bn, nn.BatchNorm1d):
        raise TypeError(f"fold_batchnorm: bn must be a pointsparse.nn.BatchNorm (a torch.nn.BatchNorm1d); "
                        f"got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_batchnorm needs a BatchNorm with running statistics (track_running_stats=True)")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn has {bn.num_features} features but conv {conv.out_channels} output channels")
    _check_variance(bn, "fold_batchnorm")
    if conv.relu:  # relu(conv) then bn: no weight and bias give that
        raise ValueError("fold_batchnorm: conv runs a ReLU on its output (relu=True); a BatchNorm after the "
                         "ReLU cannot be folded into its weight and bias")
    if parametrize.is_parametrized(conv):  # its weight / bias are computed: a Parameter cannot replace them
        raise ValueError(f"fold_batchnorm: conv has a torch parametrization on "
                         f"{', '.join(conv.parametrizations)}; make it permanent first "
                         "(torch.nn.utils.parametrize.remove_parametrizations)")
    if hasattr(conv, "bias_orig"):  # the forward recomputes bias_orig * mask: a folded bias would be lost
        raise ValueError("fold_batchnorm: conv's bias is pruned (bias_orig and a mask); make its pruning "
                         "permanent first (prune.remove(conv, 'bias'))")
    # A pruned weight (weight_orig * weight_mask, recomputed by the pruning hook before every forward):
    # the fold goes into weight_orig (a per-output-channel scale keeps the mask's zeros), else the
    # hook would overwrite it with the unfolded product at the next call.
    mask = conv.pruning_mask()
    with torch.no_grad():
        scale, new_bias = _batchnorm_scale_bias(bn, conv.bias)
        trains = _bias_trains(conv.bias, conv.weight_orig if mask is not None else conv.weight)
        # New tensors, not written in place: a weight tied to another conv's
        # (one Parameter held by both) would take this BatchNorm's fold too.
        if mask is None:
            w = conv.weight
            conv.weight = nn.Parameter((w.double() * scale).to(w.dtype), w.requires_grad)
        else:
            orig = conv.weight_orig
            conv.weight_orig = nn.Parameter((orig.double() * scale).to(orig.dtype), orig.requires_grad)
            conv.weight = conv.weight_orig * mask.to(orig.dtype)  # what the pruning hook computes from them
        conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), trains)


def fold_linear_batchnorm(linear: nn.Linear, bn: nn.BatchNorm1d) -> None:
    """In place: ``linear`` then ``bn`` (eval mode: running statistics) on
    ``(N, C)`` rows become one ``linear`` with ``weight[c] * s[c]`` and bias
    ``(bias - mean) * s + beta``, ``s = gamma / sqrt(var + eps)`` (a pruned
    gamma or beta read as ``orig * mask``; ``requires_grad`` kept as
    :func:`fold_batchnorm` keeps it). Only for a pair that sees 2-D
    input: on ``(N, L, C)`` a BatchNorm1d normalises dim 1, not the
    Linear's output features (SPVCNN's point MLPs take ``(N, C)``)."""
    refusal = _linear_batchnorm_refusal(linear, bn)
    if refusal is not None:
        raise refusal
    if bn.num_features != linear.out_features:
        raise ValueError(f"bn has {bn.num_features} features but linear {linear.out_features} outputs")
    _check_variance(bn, "fold_linear_batchnorm")
    with torch.no_grad():
        scale, new_bias = _batchnorm_scale_bias(bn, linear.bias)
        w = linear.weight  # (new tensors: a weight tied elsewhere keeps its values)
        trains = _bias_trains(linear.bias, w)
        linear.weight = nn.Parameter((w.double() * scale[:, None]).to(w.dtype), w.requires_grad)
        linear.bias = nn.Parameter(new_bias.to(w.dtype), trains)


def _check_variance(bn: nn.BatchNorm1d, fold: str) -> None:
    """A ValueError where ``bn.running_var`` holds a value below zero (a
    damaged state): its fold wrote NaN weights, silently."""
    if bool((bn.running_var.detach() < 0).any()):
        raise ValueError(f"{fold}: bn.running_var holds negative values, but a running variance is >= 0 (a damaged "
                         "state)")


def _bias_trains(bias: torch.Tensor | None, weight: torch.Tensor) -> bool:
    """The ``requires_grad`` of the bias a fold gives a layer: its own
    bias's, or (none) its weight's, as the folded weight keeps the weight's:
    a frozen layer stays frozen (the new bias trained, a frozen one too)."""
    return bool((bias if bias is not None else weight).requires_grad)


def _linear_batchnorm_refusal(linear: nn.Module, bn: nn.Module) -> TypeError | ValueError | None:
    """The error :func:`fold_linear_batchnorm` raises for a pair it will not
    fold (not a plain ``nn.Linear`` and a torch ``BatchNorm1d``, no running
    statistics, or a computed weight or bias: pruned or parametrized), or
    None. The one list of those rules: ``SPVCNN.fuse_point_mlps`` skips a
    point MLP it names. (A feature-count mismatch is not in it: that pair
    is an error, not one to skip.)"""
    # (a parametrized Linear's class is one torch derived from its own, ParametrizedLinear)
    own_type = type(linear).__bases__[0] if parametrize.is_parametrized(linear) else type(linear)
    if own_type is not nn.Linear or not isinstance(bn, nn.BatchNorm1d) or isinstance(bn, BatchNorm):
        return TypeError(f"fold_linear_batchnorm takes a torch.nn.Linear and a torch.nn.BatchNorm1d; got "
                         f"{type(linear).__name__} and {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        return ValueError("fold_linear_batchnorm needs a BatchNorm with running statistics "
                          "(track_running_stats=True)")
    if parametrize.is_parametrized(linear) or hasattr(linear, "weight_orig") or hasattr(linear, "bias_orig"):
        return ValueError("fold_linear_batchnorm: linear's weight or bias is computed (pruned or parametrized); "
                          "make it permanent first")
    return None


def _batchnorm_scale_bias(bn: nn.BatchNorm1d, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What folding ``bn`` (eval mode: running statistics) into the layer
    before it gives, per output channel, in float64: the scale ``s = gamma /
    sqrt(var + eps)`` (``1 / sqrt(var + eps)`` without affine parameters)
    and the new bias ``(bias - mean) * s + beta`` (``bias`` None: zero).
    A pruned gamma or beta is read as ``bn`` computes it now
    (:func:`_computed`)."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * _computed(bn, "weight").double()
    bias = bias.double() if bias is not None else torch.zeros_like(scale)
    new_bias = (bias - bn.running_mean.double()) * scale + (_computed(bn, "bias").double() if bn.affine else 0)
    return scale, new_bias


def _computed(module: nn.Module, name: str) -> torch.Tensor:
    """``module.name`` as its forward computes it now: ``name_orig *
    name_mask`` where torch-style pruning is attached (``module.name`` is
    the product its hook cached at the last forward, stale once
    ``name_orig`` changed: a checkpoint loaded, an optimizer step)."""
    orig, mask = module._parameters.get(name + "_orig"), getattr(module, name + "_mask", None)
    if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):
        return orig * mask.to(orig.dtype)
    return getattr(module, name)


def has_pre_hooks(module: nn.Module) -> bool:
    """Whether ``module`` runs forward pre-hooks (say the VoxelPrune
    ``models.add_voxel_prune`` put on its input): fusion keeps such a
    module, which folded away would take its hooks with it."""
    return bool(module._forward_pre_hooks)


def has_output_hooks(module: nn.Module) -> bool:
    """Whether ``module`` runs forward hooks on its output (a caller's
    own, which may read or replace it: say a VoxelPrune run on it),
    other than the pruning package's bookkeeping (``keep_copyable``'s,
    which only detaches a masked weight). Fusion folds nothing into such a
    module's output (its hooks would see and change the folded output)
    and keeps such a BatchNorm or ReLU (folded away, its hooks would go)."""
    from ..prune._copyable import _detach_masked  # noqa: PLC0415 - the pruning package sits below nn

    return any(hook is not _detach_masked for hook in module._forward_hooks.values())


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` runs forward pre-hooks or output hooks
    (:func:`has_pre_hooks`, :func:`has_output_hooks`): a module fusion
    must keep, as it is, to run them."""
    return has_pre_hooks(module) or has_output_hooks(module)


def _unpruned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose pruning reparametrisations are made
    permanent (``prune.remove``: ``weight = weight_orig * mask``, the hook
    gone). A pruned tensor (``weight``, or a user's layer's ``gain``) is
    not a leaf where it was computed with gradients, which deepcopy refuses:
    the copy starts from its detached value, which ``remove`` then
    recomputes (a tensor not named weight or bias stays pruned). A filter skeleton
    (``prune.attach_filter_skeleton``) is folded into ``weight_orig``
    first: ``remove`` knows only the mask. A ``weight_orig`` tied to
    another module's parameter is copied first (``remove`` writes the
    masked values into it in place). Torch parametrizations (``weight_norm``,
    ...) are made permanent too."""
    from ..prune._copyable import copy_model  # noqa: PLC0415 - the pruning package sits below nn
    from ..prune.surgery import _unprune  # noqa: PLC0415

    copied = copy_model(model)  # (any pruned tensor's computed value: a user's layer's own names too)
    # torch's remove writes orig * mask into weight_orig in place: a weight_orig tied to another module's
    # parameter (b.weight = a.weight, then a pruned) would carry the mask into it; such a one is copied first.
    uses: dict[int, int] = {}
    for _, p in copied.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for module in copied.modules():
        for name in ("weight", "bias"):
            orig = module._parameters.get(name + "_orig")
            if orig is not None and uses.get(id(orig), 0) > 1:
                module._parameters[name + "_orig"] = nn.Parameter(orig.detach().clone(), orig.requires_grad)
    for module in copied.modules():
        _unprune(module)  # (a filter skeleton folded in first)
        if parametrize.is_parametrized(module):
            # (by hand: torch's remove_parametrizations deletes the tensor's property from the
            # Parametrized class, which the copy shares with the model: the model's would go too)
            values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            module.__class__ = module.__class__.__bases__[0]
            del module._modules["parametrizations"]
            for name, value in values.items():
                module.register_parameter(name, nn.Parameter(value))
    return copied


def _untie_convs(model: nn.Module) -> None:
    """In place: every place after the first that holds a :class:`Conv3d`
    held elsewhere too gets its own copy. Fusion changes a conv for what
    follows it in one place (the BatchNorm folded into its weight, the ReLU
    and the residual in its store); a conv shared by two places would take
    both places' folds and flags, and compute neither."""
    seen = set()
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, Conv3d):
                if id(child) in seen:
                    module._modules[name] = copy.deepcopy(child)
                else:
                    seen.add(id(child))


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference (eval mode): in every
    ``nn.Sequential``, each :class:`Conv3d` directly followed by a
    :class:`BatchNorm` has it folded into its weight and bias, and a
    :class:`ReLU` right after them runs in the convolution's store (the folded
    modules become ``nn.Identity``). Then every module with a
    ``fuse_residual()`` method (MinkUNet's and SPVCNN's ``ResidualBlock``) is
    asked to run its residual sum and ReLU in its last conv's store, and
    every module with a ``fuse_point_mlps()`` method (SPVCNN) to fold the
    BatchNorm1d of its point MLPs into their Linear
    (:func:`fold_linear_batchnorm`). A
    BatchNorm or ReLU with forward pre-hooks (a VoxelPrune on its input,
    ``models.add_voxel_prune``) or forward hooks on its output is left in
    place, unfolded, and nothing is folded into the output of a conv with
    forward hooks on it (they see and may change the conv's own output). A
    pruned module (``torch.nn.utils.prune`` / ``pointsparse.prune``:
    ``weight_orig`` and a mask) has its pruning made permanent in the copy
    first, so the fold lands in the weight the forward uses. A conv held
    in more than one place is copied for each place in the copy, so that
    each is fused with what follows it there. The output
    equals ``model.eval()``'s up to float rounding; the copy is for
    inference (``model`` is unchanged, masks included). Set to ``train()``
    it still computes ``model.eval()``'s function, not ``model``'s
    training-mode forward: the folded BatchNorms are gone, so none
    normalises by its batch's statistics or updates running ones, and
    gradients are those of that function (a network without the folded
    BatchNorms; train ``model`` and fuse it again to fine-tune with them),
    and its pruned weights, no longer masked, grow back in training (their
    zeros, which the engine skips, are gone after a step).
    Modules left unfolded (a BatchNorm after no conv, or one with forward
    pre-hooks or output hooks; a dropout) take their own training behaviour."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    fused = _unpruned_copy(model).eval()
    _untie_convs(fused)
    for seq in [m for m in fused.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for i, name in enumerate(names):
            conv = seq._modules[name]
            # (a conv whose output hooks read or change its output: nothing folded into that output)
            if not isinstance(conv, Conv3d) or conv.relu or has_output_hooks(conv):
                continue
            j = i + 1
            # (a module with hooks stays: e.g. a VoxelPrune on its input, which must run before it, or a
            # forward hook of the caller's own on its output)
            if j < len(names) and isinstance(seq._modules[names[j]], BatchNorm) and \
                    seq._modules[names[j]].running_mean is not None and not has_hooks(seq._modules[names[j]]):
                fold_batchnorm(conv, seq._modules[names[j]])
                seq._modules[names[j]] = nn.Identity()
                j += 1
            if j < len(names) and isinstance(seq._modules[names[j]], ReLU) and \
                    not has_hooks(seq._modules[names[j]]):
                conv.relu = True
                seq._modules[names[j]] = nn.Identity()
    for module in list(fused.modules()):
        fuse_residual = getattr(module, "fuse_residual", None)
        if callable(fuse_residual):
            fuse_residual()
        fuse_point_mlps = getattr(module, "fuse_point_mlps", None)
        if callable(fuse_point_mlps):
            fuse_point_mlps()
    return fused
