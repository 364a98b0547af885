"""Functional sparse convolution over SparseTensors (API.md semantics)."""

from __future__ import annotations

import torch

from .. import kmap as _kmap
from ..tensor import SparseTensor, as_triple


def _check_weight(input: SparseTensor, weight: torch.Tensor, k) -> int:
    volume = k[0] * k[1] * k[2]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor; got {type(weight).__name__}")
    if weight.dim() != 3 or weight.shape[0] != volume or weight.shape[1] != input.num_channels:
        raise ValueError(
            f"weight must be (K, C_in, C_out) = ({volume}, {input.num_channels}, C_out) for kernel_size {k} and "
            f"{input.num_channels} input channels; got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from the input feats' {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but the input on {input.device}")
    return volume


def conv_with_map(feats: torch.Tensor, weight: torch.Tensor, kmap: _kmap.KernelMap) -> torch.Tensor:
    """``out[out_idx] += feats[in_idx] @ weight[o]`` over every offset, in
    torch ops (any device; autograd through torch)."""
    out = feats.new_zeros((kmap.num_out, weight.shape[2]))
    for o in range(kmap.kernel_volume):
        in_idx, out_idx = kmap.pairs(o)
        if in_idx.numel():
            out.index_add_(0, out_idx, feats[in_idx] @ weight[o])
    return out


def conv3d(input: SparseTensor, weight: torch.Tensor, kernel_size=3, stride=1, dilation=1,
           bias: torch.Tensor | None = None, transposed: bool = False) -> SparseTensor:
    """Sparse 3-D convolution (cross-correlation) of ``input`` with ``weight``
    ``(K, C_in, C_out)``; see API.md for the submanifold, strided and
    transposed semantics. The kernel map comes from ``input``'s coordinate
    cache (built once per structural key)."""
    if not isinstance(input, SparseTensor):
        raise TypeError(f"input must be a SparseTensor; got {type(input).__name__}")
    k = as_triple(kernel_size, "kernel_size")
    t = as_triple(stride, "stride")
    d = as_triple(dilation, "dilation")
    _check_weight(input, weight, k)
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[2]):
        raise ValueError(f"bias must be (C_out,) = ({weight.shape[2]},); got {tuple(bias.shape)}")
    kmap = _kmap.get_kmap(input, k, t, d, transposed)
    feats = conv_with_map(input.feats, weight, kmap)
    if bias is not None:
        feats = feats + bias
    if transposed:
        out_stride = tuple(a // b for a, b in zip(input.stride, t))
    else:
        out_stride = tuple(a * b for a, b in zip(input.stride, t))
    return SparseTensor(feats, kmap.out_coords, out_stride, cache=input.cache, validate=False)


def _same_sites(tensors, what: str) -> SparseTensor:
    if not tensors:
        raise ValueError(f"{what} needs at least one SparseTensor")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, SparseTensor):
            raise TypeError(f"{what} takes SparseTensors; item {i} is {type(t).__name__}")
        if t.stride != first.stride or len(t) != len(first):
            raise ValueError(f"{what}: item {i} (stride {t.stride}, {len(t)} sites) is not on the coords of "
                             f"item 0 (stride {first.stride}, {len(first)} sites)")
        if t.coords is not first.coords and not torch.equal(t.coords, first.coords):
            raise ValueError(f"{what}: item {i} has other coords (or another row order) than item 0")
    return first


def cat(tensors) -> SparseTensor:
    """Concatenate the channels of tensors on the same coords (U-Net skips)."""
    tensors = list(tensors)
    first = _same_sites(tensors, "cat")
    return first.with_feats(torch.cat([t.feats for t in tensors], 1))


def add(a: SparseTensor, b: SparseTensor) -> SparseTensor:
    """Sum of two tensors on the same coords (residual connections)."""
    first = _same_sites([a, b], "add")
    return first.with_feats(a.feats + b.feats)
