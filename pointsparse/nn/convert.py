"""Conv weights trained with MinkowskiEngine or TorchSparse, in pointsparse's
offset order.

All three store a sparse conv's weight as ``(K, C_in, C_out)``, one matrix
per kernel offset, but number the offsets differently. pointsparse (see
``Conv3d``) takes the offsets ``(i - (k - 1) // 2) * d`` along each axis and
numbers them ``(i_x * k_y + i_y) * k_z + i_z`` (z fastest).

* MinkowskiEngine (0.5) walks its kernel region with x fastest:
  ``(i_z * k_y + i_y) * k_x + i_x``. Along an axis of odd size its offsets
  are centred, as ours; along an axis of even size they run ``0 .. k - 1``,
  which are ours for ``k = 2`` only (``k = 4``: ``0..3`` against our
  ``-1..2``): such a kernel is refused. A kernel of volume 1 at stride 1
  is stored ``(C_in, C_out)`` (run as a matrix product). A conv of
  region_type ``HYPER_CROSS`` stores its cross's offsets only
  (``kernel_region="cross"``: put in a ``Conv3d(kernel_region="cross")``'s
  weight). Its bias is ``(1, C_out)`` (and a MinkowskiInstanceNorm's weight
  and bias ``(1, C)``): ``Conv3d`` and ``InstanceNorm`` load it as it is.
* TorchSparse (2.0, 2.1) takes the same offsets as ours along every axis,
  numbered with x fastest where the kernel's volume is odd and z fastest
  (ours) where it is even; a kernel of volume 1 is stored ``(C_in, C_out)``.

A weight converted here gives the conv the other library computed on the
same coordinates (the batch index first, then x, y, z); checked for convs
(stride 1 and 2) and for transposed convs (stride 2). A transposed conv's
weight is numbered as the strided conv's it mirrors in both libraries
(MinkowskiEngine's transposed kernel map is the strided one's with input and
output swapped; TorchSparse's is the strided conv's map from its cache), as
here: ``out[q + o] += in[q] @ W[o]``, so it converts the same way."""

from __future__ import annotations

import math

import torch

from ..tensor import as_triple

SOURCES = ("minkowski", "torchsparse")


def _cross_indices(k) -> list[int]:
    """Our offset index of each offset of MinkowskiEngine's HYPER_CROSS
    region of kernel ``k`` (odd sizes), in its weight's order: the centre,
    then along x, y and z in turn the offsets ``1..r``, then ``-r..-1``."""
    centre = [(n - 1) // 2 for n in k]
    indices = []
    for axis in (None, 0, 1, 2):
        r = 0 if axis is None else (k[axis] - 1) // 2
        for step in ([0] if axis is None else [*range(1, r + 1), *range(-r, 0)]):
            i = [c + (step if a == axis else 0) for a, c in enumerate(centre)]
            indices.append((i[0] * k[1] + i[1]) * k[2] + i[2])
    return indices


def _from_cross(weight: torch.Tensor, k, source: str, kernel_region) -> torch.Tensor:
    """:func:`weight_from` of a MinkowskiEngine HYPER_CROSS kernel."""
    if not (isinstance(kernel_region, str) and kernel_region == "cross"):
        raise ValueError(f"kernel_region must be None or 'cross' (MinkowskiEngine's HYPER_CROSS); got "
                         f"{kernel_region!r}")
    if source != "minkowski":
        raise ValueError(f"kernel_region='cross' converts MinkowskiEngine's HYPER_CROSS kernels "
                         f"(source='minkowski'); got source={source!r}")
    if any(n % 2 == 0 for n in k):
        raise ValueError(f"a HYPER_CROSS kernel has odd sizes; got kernel_size {k}")
    indices = _cross_indices(k)
    if weight.dim() == 2 and len(indices) == 1:
        weight = weight.unsqueeze(0)  # (a 1x1x1 kernel at stride 1: (C_in, C_out))
    if weight.dim() != 3:
        raise ValueError(f"weight must be (K, C_in, C_out); got shape {tuple(weight.shape)}")
    if weight.shape[0] != len(indices):
        raise ValueError(f"weight holds {weight.shape[0]} offsets but a HYPER_CROSS region of kernel_size {k} "
                         f"has {len(indices)}")
    out = weight.new_zeros(math.prod(k), *weight.shape[1:])
    # (as outside autocast, whose index_copy refuses a 16-bit dtype other than its own: "Unexpected floating
    # ScalarType in at::autocast::prioritize")
    with torch.autocast(weight.device.type, enabled=False):
        return out.index_copy(0, torch.tensor(indices, device=weight.device), weight)


def weight_from(weight: torch.Tensor, kernel_size=3, source: str = "minkowski", *,
                kernel_region=None) -> torch.Tensor:
    """``weight`` of a MinkowskiEngine (``source="minkowski"``) or TorchSparse
    (``"torchsparse"``) conv of kernel ``kernel_size`` (int or 3-tuple, x, y,
    z), its offsets put in pointsparse's order: a ``(K, C_in, C_out)``
    tensor for :class:`Conv3d`'s ``weight`` (a new tensor; ``weight``'s
    dtype, device and autograd history). See the module docstring for each
    library's numbering (a kernel of volume 1 may be given ``(C_in,
    C_out)``, as both libraries store it). A tensor that is no such weight,
    a kernel that does not match its ``K``, or one whose offsets the other
    library places elsewhere (MinkowskiEngine's even sizes above 2) is a
    ValueError / TypeError naming the argument.

    ``kernel_region="cross"``: ``weight`` is a MinkowskiEngine conv's of
    region_type ``HYPER_CROSS`` (one matrix per offset of the cross, ``1 +
    sum(k - 1)`` of them, in its order: the centre, then along x, y, z the
    offsets ``1..r`` then ``-r..-1``); each is put at its offset of a
    ``(K, C_in, C_out)`` weight, zeros elsewhere, for a
    ``Conv3d(kernel_region="cross")``."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (K, C_in, C_out); got {type(weight).__name__}")
    k = as_triple(kernel_size, "kernel_size")
    if kernel_region is not None:
        return _from_cross(weight, k, source, kernel_region)
    volume = math.prod(k)
    if weight.dim() == 2 and volume == 1:
        # (TorchSparse keeps a 1x1x1 kernel as (C_in, C_out), MinkowskiEngine one of stride 1)
        weight = weight.unsqueeze(0)
    if weight.dim() != 3:
        raise ValueError(f"weight must be (K, C_in, C_out); got shape {tuple(weight.shape)}")
    if weight.shape[0] != volume:
        raise ValueError(f"weight holds {weight.shape[0]} offsets but kernel_size {k} has {volume}")
    if source == "minkowski":
        wrong = [n for n in k if n % 2 == 0 and n != 2]
        if wrong:
            raise ValueError(f"kernel_size {k}: MinkowskiEngine places the offsets of an even size above 2 at "
                             f"0..k-1, pointsparse at -(k-2)/2..k/2 (size {wrong[0]}); no reordering maps one "
                             "onto the other")
        x_fastest = True
    else:
        x_fastest = volume % 2 == 1
    if not x_fastest:
        return weight.clone()
    # index (i_z, i_y, i_x) in the source -> (i_x, i_y, i_z) here
    kx, ky, kz = k
    grid = weight.reshape(kz, ky, kx, *weight.shape[1:])
    return grid.permute(2, 1, 0, 3, 4).clone(memory_format=torch.contiguous_format).reshape(volume, *weight.shape[1:])
