"""Naive references for the tests: dense torch convolutions on voxel grids and
brute-force loops over coordinates. Slow and obviously right."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as TF

from pointsparse import SparseTensor
from pointsparse.tensor import as_triple


def random_coords(n: int, extent: int = 8, batch: int = 2, stride: int = 1, seed: int = 0) -> torch.Tensor:
    """Unique int32 ``[b, x, y, z]`` rows on a grid of ``extent`` cells per
    axis (multiples of ``stride``), about ``n`` of them."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.cat([torch.randint(0, batch, (n, 1), generator=g),
                      torch.randint(0, extent, (n, 3), generator=g) * stride], 1).to(torch.int32)
    return torch.unique(rows, dim=0)


def _torch_weight(weight: torch.Tensor, k, transposed: bool = False) -> torch.Tensor:
    """``(K, C_in, C_out)`` -> torch's ``(C_out, C_in, kx, ky, kz)`` (conv3d) or
    ``(C_in, C_out, kx, ky, kz)`` (conv_transpose3d)."""
    w = weight.reshape(k[0], k[1], k[2], weight.shape[1], weight.shape[2])
    return w.permute(3, 4, 0, 1, 2) if transposed else w.permute(4, 3, 0, 1, 2)


def _read(dense: torch.Tensor, coords: torch.Tensor, stride) -> torch.Tensor:
    idx = coords[:, 1:].long() // torch.tensor(stride)
    return dense[coords[:, 0].long(), :, idx[:, 0], idx[:, 1], idx[:, 2]]


def dense_conv(x: SparseTensor, weight, out_coords, kernel_size=3, stride=1, dilation=1, bias=None):
    """API.md's sparse conv computed as ``F.conv3d`` on the dense grid of ``x``,
    read at ``out_coords`` (output stride ``x.stride * stride``)."""
    k, t, d = as_triple(kernel_size, "k"), as_triple(stride, "s"), as_triple(dilation, "d")
    dense = x.dense()
    left = [(k[a] - 1) // 2 * d[a] for a in range(3)]
    right = [(k[a] - 1) * d[a] + t[a] for a in range(3)]
    dense = TF.pad(dense, (left[2], right[2], left[1], right[1], left[0], right[0]))
    out = TF.conv3d(dense, _torch_weight(weight, k), bias, stride=t, dilation=d)
    return _read(out, out_coords, tuple(a * b for a, b in zip(x.stride, t)))


def dense_conv_transpose(y: SparseTensor, weight, fine_coords, kernel_size=2, stride=2, dilation=1, bias=None):
    """The transposed sparse conv as ``F.conv_transpose3d`` on the dense grid of
    ``y`` (stride ``S``), read at ``fine_coords`` (stride ``S / stride``)."""
    k, t, d = as_triple(kernel_size, "k"), as_triple(stride, "s"), as_triple(dilation, "d")
    dense = TF.pad(y.dense(), (0, 2, 0, 2, 0, 2))
    out = TF.conv_transpose3d(dense, _torch_weight(weight, k, transposed=True), bias, stride=t, dilation=d)
    left = [(k[a] - 1) // 2 * d[a] for a in range(3)]
    out = TF.pad(out, (-left[2], 0, -left[1], 0, -left[0], 0))
    return _read(out, fine_coords, tuple(a // b for a, b in zip(y.stride, t)))


def brute_pool(x: SparseTensor, out_coords, kernel_size, stride, reduce: str) -> torch.Tensor:
    """Max or mean of the active inputs in each output's window, by loops."""
    k, t = as_triple(kernel_size, "k"), as_triple(stride, "s")
    s = x.stride
    where = {tuple(r): i for i, r in enumerate(x.coords.tolist())}
    rows = []
    for b, *q in out_coords.tolist():
        found = []
        for i in itertools.product(*(range(k[a]) for a in range(3))):
            p = tuple(q[a] + (i[a] - (k[a] - 1) // 2) * s[a] for a in range(3))
            if (b, *p) in where:
                found.append(x.feats[where[(b, *p)]])
        if not found:  # a window without active inputs (kernel smaller than the stride)
            rows.append(x.feats.new_zeros(x.feats.shape[1]))
            continue
        stack = torch.stack(found)
        rows.append(stack.max(0).values if reduce == "max" else stack.mean(0))
    return torch.stack(rows) if rows else x.feats.new_zeros((0, x.feats.shape[1]))


def brute_global(x: SparseTensor, reduce: str) -> torch.Tensor:
    b = x.batch_size
    out = x.feats.new_zeros((b, x.feats.shape[1]))
    for i in range(b):
        sel = x.feats[x.coords[:, 0] == i]
        if len(sel):
            out[i] = sel.max(0).values if reduce == "max" else sel.mean(0)
    return out
