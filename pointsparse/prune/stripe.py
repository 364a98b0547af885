"""Stripe-wise pruning with a Filter Skeleton (SWP, "Pruning Filter in
Filter", Meng et al. 2020).

A stripe is one filter's weights at one kernel position across all input
channels (``W[o, :, ky, kx]`` of a Conv2d, ``W[o, :, kd, ky, kx]`` of a
Conv3d, ``W[k, :, o]`` of a sparse conv). The Filter Skeleton is a learnable
scale per stripe, stored as parameter ``{name}_skeleton`` with the weight's
shape except a 1 on the input-channel axis, and multiplied into the weight on
every forward. Train with :func:`pointsparse.prune.regularizers.skeleton_l1`
added to the loss; then :func:`prune_stripes` folds the skeleton into the
weight and prunes the stripes whose ``|scale| < threshold``.

Mechanics: attaching first applies ``identity`` pruning if the tensor is not
pruned yet (``name_orig`` + ``name_mask``), then registers a forward pre-hook
that sets ``module.name = name_orig * name_mask * skeleton``. Apply other
pruning to the tensor before attaching or after :func:`prune_stripes`: a
pruning method applied while a skeleton is attached would run after it and
drop the scale, so the hook raises a ``RuntimeError`` if it sees one.

``prune.remove(module, name)`` (torch's own function, which knows only the
mask) makes the skeleton permanent too: it leaves ``name`` the plain
Parameter ``name_orig * name_mask`` (the same object as ``name_orig``), and
at the module's next forward the skeleton is folded into it and removed, so
the layer computes what it did. Until then ``name_skeleton`` and the hook
stay (in ``state_dict`` too); :func:`detach_filter_skeleton` before or after
``remove`` folds it at once.

A ``kernel_region`` conv's stripes are its region's: the scales at the
offsets outside (which only the L1 penalty moves, to 0) are neither folded,
pruned nor counted, and the values there keep their mask."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from torch.nn.utils import prune as _torch_prune

from ..tensor import as_bool
from ._copyable import CopyableMethod, keep_copyable
from .adapters import WeightLayout, check_maskable, check_target, is_layer, layout_of, used_mask


def _fold_skeleton_left_by_remove(module, name: str) -> None:
    """Folds the skeleton ``prune.remove`` left on ``module.name`` into the
    weight, eagerly (it writes the weight: a graph of torch.compile breaks
    here; with ``fullgraph=True`` call ``prune.detach_filter_skeleton``
    before compiling)."""
    detach_filter_skeleton(module, name, fold=True)


_FOLD_REASON = ("a filter skeleton left by prune.remove folds into the weight (a write) at the next forward: call "
                "prune.detach_filter_skeleton(module), or run one forward, before torch.compile(fullgraph=True)")
#: ``torch.compiler.disable`` of :func:`_fold_skeleton_left_by_remove`, made
#: with the process's first FilterSkeleton (made or unpickled: every one is
#: made through ``__init__`` or ``__setstate__``), not at import: making it
#: imports torch's compiler, 0.9 s of CPU that every ``pointsparse prune``
#: paid (AMD EPYC Zen 5), where only a skeleton's maker needs it.
_fold_outside_graphs = None


def _folder():
    global _fold_outside_graphs
    if _fold_outside_graphs is None:
        _fold_outside_graphs = torch.compiler.disable(_fold_skeleton_left_by_remove, reason=_FOLD_REASON)
    return _fold_outside_graphs


class FilterSkeleton:
    """The forward pre-hook applying a skeleton to ``module.name``."""

    def __init__(self, name: str, layout: WeightLayout) -> None:
        _folder()
        self.name = name
        self.layout = layout
        self.hook_id: int | None = None

    def __setstate__(self, state) -> None:  # (unpickled, deep-copied: the fold made outside graphs first)
        self.__dict__.update(state)
        _folder()

    def __call__(self, module, inputs):
        if self.name + "_orig" not in module._parameters:  # prune.remove made the mask permanent under it
            _folder()(module, self.name)
            return
        hooks = list(module._forward_pre_hooks.items())
        position = next(i for i, (key, _) in enumerate(hooks) if key == self.hook_id)
        for _, hook in hooks[position + 1 :]:
            if isinstance(hook, _torch_prune.BasePruningMethod) and hook._tensor_name == self.name:
                raise RuntimeError(
                    f"{self.name} was pruned again while its filter skeleton is attached; call "
                    f"prune_stripes() (or detach_filter_skeleton()) before further pruning"
                )
        setattr(module, self.name, self.effective_weight(module))

    def effective_weight(self, module) -> torch.Tensor:
        return (
            getattr(module, self.name + "_orig")
            * getattr(module, self.name + "_mask")
            * getattr(module, self.name + "_skeleton")
        )


def _find(module, name) -> tuple[int, FilterSkeleton] | None:
    for key, hook in module._forward_pre_hooks.items():
        if isinstance(hook, FilterSkeleton) and hook.name == name:
            return key, hook
    return None


def skeleton_shape(shape: torch.Size, layout: WeightLayout) -> tuple[int, ...]:
    out = list(shape)
    out[layout.in_axis] = 1
    return tuple(out)


def attach_filter_skeleton(module: nn.Module, name: str = "weight", init: float = 1.0, layout=None):
    """Add a learnable Filter Skeleton to ``module.name`` (a dense ConvNd or a
    sparse conv) and return the new parameter (add it to the optimizer; it is
    also in ``module.parameters()``)."""
    check_maskable(module, name)
    layout = layout if layout is not None else layout_of(module, name)
    if not layout.kernel_axes:
        raise ValueError(f"a filter skeleton needs kernel axes; {type(module).__name__}.{name} has none")
    if _find(module, name) is not None:
        raise ValueError(f"{type(module).__name__}.{name} already has a filter skeleton")
    if not isinstance(init, numbers.Real) or isinstance(init, bool):
        raise TypeError(f"init must be a number; got {init!r}")
    if not math.isfinite(init):
        raise ValueError(f"init must be a finite number (the skeleton's starting scale); got {init!r}")
    if name + "_orig" not in module._parameters:
        _torch_prune.identity(module, name)
    weight = module._parameters[name + "_orig"]
    skeleton = nn.Parameter(
        torch.full(skeleton_shape(weight.shape, layout), float(init), dtype=weight.dtype, device=weight.device)
    )
    module.register_parameter(name + "_skeleton", skeleton)
    hook = FilterSkeleton(name, layout)
    hook.hook_id = module.register_forward_pre_hook(hook).id
    setattr(module, name, hook.effective_weight(module))
    keep_copyable(module)  # (the product autograd made, now and after each forward: deepcopy refuses it)
    return skeleton


def detach_filter_skeleton(module: nn.Module, name: str = "weight", fold: bool = True) -> torch.Tensor:
    """Remove the skeleton of ``module.name``; with ``fold`` multiply it into
    ``name_orig`` first (so the layer computes the same), or into the plain
    ``name`` where ``prune.remove`` made the mask permanent. Returns the
    skeleton's last value (detached)."""
    check_target(module, name)
    fold = as_bool(fold, "fold")
    found = _find(module, name)
    if found is None:
        raise ValueError(f"{type(module).__name__}.{name} has no filter skeleton")
    key, hook = found
    skeleton = module._parameters[name + "_skeleton"].detach().clone()
    masked = name + "_orig" in module._parameters  # (else prune.remove left name a plain Parameter)
    if fold:
        used = _used_stripes(module, name, hook.layout)
        with torch.no_grad():
            module._parameters[name + "_orig" if masked else name].mul_(
                skeleton if used is None else torch.where(used, skeleton, torch.ones_like(skeleton)))
    del module._forward_pre_hooks[key]
    del module._parameters[name + "_skeleton"]
    if masked:  # (no computed tensor: deepcopy refuses those; the pruning's pre-hook recomputes it)
        with torch.no_grad():
            setattr(module, name, getattr(module, name + "_orig") * getattr(module, name + "_mask"))
    return skeleton


def _used_stripes(module: nn.Module, name: str, layout: WeightLayout) -> torch.Tensor | None:
    """The stripes of ``module.name`` that hold weights of the layer, a bool
    of the skeleton's shape (:func:`.adapters.used_mask`: a ``kernel_region``
    conv's offsets inside its region), or None when all do."""
    if name != "weight" or not is_layer(module):
        return None
    used = used_mask(module)
    return None if bool(used.all()) else used.any(dim=layout.in_axis, keepdim=True)


def _check_threshold(threshold) -> None:
    """A finite number >= 0 (NaN would compare false with every scale: every
    stripe pruned)."""
    from .procedure import check_real  # noqa: PLC0415 - procedure's imports load the package, which loads this

    check_real(threshold, "threshold", "a finite number >= 0", lambda v: v >= 0)


class StripeFromSkeleton(CopyableMethod):
    """Prunes the stripes whose skeleton scale has ``|scale| < threshold``
    (``skeleton`` broadcastable to the weight). ``used``: a bool tensor
    broadcastable to the weight, the entries that are weights (None: all);
    the others keep the mask they had."""

    PRUNING_TYPE = "global"

    def __init__(self, skeleton: torch.Tensor, threshold: float, used: torch.Tensor | None = None) -> None:
        _check_threshold(threshold)
        if used is not None and not (isinstance(used, torch.Tensor) and used.dtype == torch.bool):
            raise TypeError(f"used must be a bool tensor (the entries that are weights) or None; got {used!r}")
        self.skeleton = skeleton
        self.threshold = float(threshold)
        self.used = used

    def compute_mask(self, t, default_mask):
        keep = (self.skeleton.abs() >= self.threshold).to(device=t.device)
        used = getattr(self, "used", None)  # (methods pickled before it existed have none)
        if used is not None:
            keep = keep | ~used.to(t.device)
        return default_mask.clone(memory_format=torch.contiguous_format) * keep.expand_as(t).to(default_mask.dtype)


def prune_stripes(module: nn.Module, name: str = "weight", threshold: float = 0.05) -> int:
    """Fold the skeleton of ``module.name`` into the weight, remove it, and
    prune the stripes whose scale has ``|scale| < threshold``. Returns the
    number of stripes pruned (newly or before); a ``kernel_region`` conv's
    are its region's."""
    check_target(module, name)
    _check_threshold(threshold)
    found = _find(module, name)
    used = None if found is None else _used_stripes(module, name, found[1].layout)
    skeleton = detach_filter_skeleton(module, name, fold=True)
    StripeFromSkeleton.apply(module, name, skeleton=skeleton, threshold=threshold, used=used)
    weak = skeleton.abs() < threshold
    return int((weak if used is None else weak & used).sum())


def used_skeletons(model: nn.Module):
    """``(skeleton, used)`` for every attached skeleton in ``model``: the
    parameter and a bool of its shape, True at the stripes that hold weights
    of the layer (a ``kernel_region`` conv's region's), or None when all do."""
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, FilterSkeleton):
                yield module._parameters[hook.name + "_skeleton"], _used_stripes(module, hook.name, hook.layout)
