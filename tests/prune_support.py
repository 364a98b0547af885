"""Shared pieces of the pruning tests: the sparse layers under test
(``pointsparse.nn.Conv3d`` and ``BatchNorm``), naive references (a
brute-force sparse conv and kernel-map pair counts), and small inputs."""

from __future__ import annotations

import itertools

import torch
from torch import nn


from pointsparse import SparseTensor
from pointsparse.nn import BatchNorm, Conv3d


def kernel_offsets(kernel_size, dilation=1):
    """Offsets in API order: ``index = (i_x * k_y + i_y) * k_z + i_z``."""
    dilation = (dilation,) * 3 if isinstance(dilation, int) else tuple(dilation)
    ranges = [[(i - (k - 1) // 2) * d for i in range(k)] for k, d in zip(kernel_size, dilation)]
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


SparseConv = Conv3d  # the sparse conv under test: weight (K, C_in, C_out)
SparseBatchNorm = BatchNorm


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



