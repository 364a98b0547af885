"""How a weight tensor splits into output channels, input channels and kernel
positions, for ``torch.nn.Linear``, ``torch.nn.Conv1d/2d/3d`` (and their
transposed forms) and the sparse ``pointsparse.nn.Conv3d``.

Every structured pruning method in this package works on the same three roles:

* ``out_axis``: the output-channel (filter) axis;
* ``in_axis``: the input-channel (reduction) axis;
* ``kernel_axes``: the spatial axes (empty for ``Linear``).

=======================  ===================  ========  =======  ===========
module                   weight shape         out_axis  in_axis  kernel_axes
=======================  ===================  ========  =======  ===========
``nn.Linear``            ``(O, I)``           0         1        ()
``nn.ConvNd``            ``(O, I/g, *k)``     0         1        (2, ...)
``nn.ConvTransposeNd``   ``(I, O/g, *k)``     1         0        (2, ...)
``pointsparse.nn.Conv3d`` ``(K, I, O)``        2         1        (0,)
=======================  ===================  ========  =======  ===========

A layout is a small frozen value, so pruning methods that carry one pickle and
compare cleanly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class WeightLayout:
    """Axis roles of a weight tensor (see the module docstring)."""

    out_axis: int
    in_axis: int
    kernel_axes: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        return 2 + len(self.kernel_axes)

    def check(self, t: torch.Tensor, name: str = "tensor") -> None:
        if t.dim() != self.ndim:
            raise ValueError(
                f"{name} must have {self.ndim} dims for layout {self}; got shape {tuple(t.shape)}"
            )

    def to_oik(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` viewed as ``(out, in, kernel)`` (kernel positions flattened,
        1 for Linear). A permuted copy when the axes are not already in order."""
        self.check(t)
        perm = (self.out_axis, self.in_axis, *self.kernel_axes)
        out = t.permute(perm)
        return out.reshape(out.shape[0], out.shape[1], -1)

    def from_oik(self, oik: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`to_oik` for a tensor of the original ``shape``."""
        perm = (self.out_axis, self.in_axis, *self.kernel_axes)
        permuted_shape = [shape[a] for a in perm]
        inverse = [0] * len(perm)
        for position, axis in enumerate(perm):
            inverse[axis] = position
        return oik.reshape(permuted_shape).permute(inverse).contiguous()


def dense_layout(ndim: int) -> WeightLayout:
    """Layout of a torch Linear (``ndim == 2``) or ConvNd weight."""
    if ndim < 2:
        raise ValueError(f"a weight to prune structurally needs >= 2 dims; got {ndim}")
    return WeightLayout(0, 1, tuple(range(2, ndim)))


SPARSE_CONV = WeightLayout(2, 1, (0,))


def is_sparse_conv(module: nn.Module) -> bool:
    """True for ``pointsparse.nn.Conv3d`` and anything shaped like it: a 3-D
    ``weight`` of shape ``(K, in_channels, out_channels)`` with a 3-tuple
    ``kernel_size`` whose product is K."""
    weight = _raw_weight(module, "weight")
    kernel = getattr(module, "kernel_size", None)
    if weight is None or weight.dim() != 3 or not isinstance(kernel, tuple) or len(kernel) != 3:
        return False
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    volume = kernel[0] * kernel[1] * kernel[2]
    return tuple(weight.shape) == (
        volume,
        getattr(module, "in_channels", -1),
        getattr(module, "out_channels", -1),
    )


def _raw_weight(module: nn.Module, name: str) -> torch.Tensor | None:
    if name + "_orig" in module._parameters:
        return module._parameters[name + "_orig"]
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def layout_of(module: nn.Module, name: str = "weight") -> WeightLayout:
    """The layout of ``module``'s tensor ``name``; ``TypeError`` for modules
    whose weight has no channel structure this package knows."""
    from . import adapters  # the registry builds on the layouts defined here

    weight = _raw_weight(module, name)
    if weight is None:
        raise TypeError(f"{type(module).__name__} has no tensor named {name!r}")
    if name == "weight":
        if adapters.is_layer(module):
            return adapters.adapter_for(module).layout(module)
        if is_sparse_conv(module):
            return SPARSE_CONV
    raise TypeError(
        f"cannot tell the channel layout of {type(module).__name__}.{name} (shape "
        f"{tuple(weight.shape)}); pass layout=WeightLayout(out_axis, in_axis, kernel_axes)"
    )


def current_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor the module computes with now, differentiable w.r.t. its
    parameter: ``name_orig * name_mask`` for a pruned tensor (never the value
    cached by the last forward), else the parameter itself."""
    if name + "_orig" in module._parameters:
        return module._parameters[name + "_orig"] * getattr(module, name + "_mask")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no tensor named {name!r}")
    return weight


def is_prunable(module: nn.Module) -> bool:
    """A layer with a registered adapter (Linear, torch ConvNd, sparse conv,
    yours: :mod:`.adapters`) or anything shaped like a sparse conv."""
    from . import adapters

    return adapters.is_layer(module) or is_sparse_conv(module)


def prunable_modules(model: nn.Module):
    """``(qualified_name, module)`` for every Linear, ConvNd and sparse conv in
    ``model`` (the layers the toolkit prunes and reports)."""
    for qualified, module in model.named_modules():
        if is_prunable(module):
            yield qualified, module
