"""Shared pieces of the pruning tests: the sparse conv under test (the real
``pointsparse.nn.Conv3d`` when it exists, else a double with the same
attributes and a brute-force forward), naive references, and small inputs."""

from __future__ import annotations

import itertools

import torch
from torch import nn

import pointsparse
from pointsparse import SparseTensor


def kernel_offsets(kernel_size, dilation=1):
    """Offsets in API order: ``index = (i_x * k_y + i_y) * k_z + i_z``."""
    ranges = [[(i - (k - 1) // 2) * dilation for i in range(k)] for k in kernel_size]
    return list(itertools.product(*ranges))


def naive_pair_counts(coords: torch.Tensor, kernel_size=(3, 3, 3), dilation=1) -> torch.Tensor:
    """Per-offset (input, output) pair counts of a stride-1 (submanifold) map."""
    active = {tuple(row) for row in coords.tolist()}
    counts = []
    for offset in kernel_offsets(kernel_size, dilation):
        counts.append(sum((b, x + offset[0], y + offset[1], z + offset[2]) in active for b, x, y, z in active))
    return torch.tensor(counts, dtype=torch.int64)


def naive_sparse_conv(x: SparseTensor, weight: torch.Tensor, kernel_size=(3, 3, 3), dilation=1) -> torch.Tensor:
    """Stride-1 sparse conv by brute force: ``out[q] = sum_o in[q + o] @ W[o]``."""
    rows = {tuple(row): i for i, row in enumerate(x.coords.tolist())}
    out = torch.zeros(x.feats.shape[0], weight.shape[2], dtype=x.feats.dtype)
    for o, offset in enumerate(kernel_offsets(kernel_size, dilation)):
        for (b, cx, cy, cz), q in rows.items():
            p = rows.get((b, cx + offset[0], cy + offset[1], cz + offset[2]))
            if p is not None:
                out[q] = out[q] + x.feats[p] @ weight[o]
    return out


class SparseConvDouble(nn.Module):
    """Same attributes and weight layout as ``pointsparse.nn.Conv3d``; a
    brute-force stride-1 forward. Used only while the real class is absent."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, dilation=1, bias=False, transposed=False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)
        self.stride, self.dilation, self.transposed = stride, dilation, transposed
        volume = self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        self.weight = nn.Parameter(torch.randn(volume, in_channels, out_channels) / (volume * in_channels) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        out = naive_sparse_conv(x, self.weight, self.kernel_size, self.dilation)
        if self.bias is not None:
            out = out + self.bias
        return x.with_feats(out)


def sparse_conv_class():
    try:
        from pointsparse.nn import Conv3d  # noqa: PLC0415

        return Conv3d
    except ImportError:
        return SparseConvDouble


SparseConv = sparse_conv_class()
REAL_SPARSE_CONV = SparseConv is not SparseConvDouble


def sparse_input(n=12, channels=4, extent=3, seed=0, dtype=torch.float32) -> SparseTensor:
    """``n`` distinct sites in a ``extent^3`` box of batch 0 with random feats."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.randperm(extent**3, generator=g)[:n]
    xyz = torch.stack([cells // (extent * extent), (cells // extent) % extent, cells % extent], dim=1)
    coords = torch.cat([torch.zeros(n, 1, dtype=torch.int64), xyz], dim=1).to(torch.int32)
    return SparseTensor(torch.randn(n, channels, generator=g, dtype=dtype), coords)


def set_weight(module: nn.Module, values: torch.Tensor, name: str = "weight") -> None:
    with torch.no_grad():
        getattr(module, name).copy_(values)




class BatchNormDouble(nn.Module):
    """Shaped like ``pointsparse.nn.BatchNorm``: a ``BatchNorm1d`` over feats."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum)

    def forward(self, x: SparseTensor) -> SparseTensor:
        return x.with_feats(self.bn(x.feats))


def sparse_batchnorm_class():
    try:
        from pointsparse.nn import BatchNorm  # noqa: PLC0415

        return BatchNorm
    except ImportError:
        return BatchNormDouble


SparseBatchNorm = sparse_batchnorm_class()
