"""Naive reference implementations the tests hold the fast code against.

Each function is self-contained (plain Python/torch, no pointsparse code)."""

from __future__ import annotations

import itertools

import torch


def _triple(v):
    return (v, v, v) if isinstance(v, int) else tuple(v)


def kmap_reference(coords: torch.Tensor, kernel_size, stride=1, dilation=1, tensor_stride=1):
    """Brute-force kernel map (API.md semantics).

    Returns ``(out_coords, in_idx, out_idx, sizes)``: ``out_coords`` int32
    ``(M, 4)`` (the inputs for stride 1; else the unique
    ``floor(c / (s*t)) * (s*t)`` sorted by (batch, x, y, z)), pairs flat and
    grouped by offset in API.md order, sorted by ``out_idx`` within an
    offset, ``sizes`` int64 ``(K,)``.
    """
    k, t, d, s = (_triple(v) for v in (kernel_size, stride, dilation, tensor_stride))
    rows = [tuple(r) for r in coords.tolist()]
    if t == (1, 1, 1):
        out_rows = rows
    else:
        q = [s[a] * t[a] for a in range(3)]
        out_rows = sorted({(b, x // q[0] * q[0], y // q[1] * q[1], z // q[2] * q[2]) for b, x, y, z in rows})
    where = {r: i for i, r in enumerate(rows)}
    axes = [[(i - (k[a] - 1) // 2) * d[a] * s[a] for i in range(k[a])] for a in range(3)]
    in_idx, out_idx, sizes = [], [], []
    for dx, dy, dz in itertools.product(*axes):
        count = 0
        for j, (b, x, y, z) in enumerate(out_rows):
            i = where.get((b, x + dx, y + dy, z + dz))
            if i is not None:
                in_idx.append(i)
                out_idx.append(j)
                count += 1
        sizes.append(count)
    out_coords = torch.tensor(out_rows, dtype=torch.int32).reshape(-1, 4)
    return (out_coords, torch.tensor(in_idx, dtype=torch.int64), torch.tensor(out_idx, dtype=torch.int64),
            torch.tensor(sizes, dtype=torch.int64))
