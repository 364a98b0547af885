"""Exact 64-bit coordinate keys, in C++ for CPU tensors and in torch for any
device (both give the same keys).

Layout (``int64``, always >= 0): batch in bits 51..62 (0 .. 4095), then
``x + 2**16``, ``y + 2**16``, ``z + 2**16`` in 17 bits each (coordinates in
-65536 .. 65535). Sorting keys sorts rows by (batch, x, y, z)."""

from __future__ import annotations

import torch

from . import _ext

COORD_MIN = _ext.COORD_MIN
COORD_MAX = _ext.COORD_MAX
BATCH_MAX = _ext.BATCH_MAX
COORD_BITS = _ext.core.COORD_BITS
_BIAS = -COORD_MIN
SHIFT_Y = COORD_BITS
SHIFT_X = 2 * COORD_BITS
SHIFT_B = 3 * COORD_BITS


def check_coords(coords: torch.Tensor, name: str = "coords") -> None:
    """Shape, dtype and range checks with messages that name the argument."""
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(coords).__name__}")
    if coords.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 [batch, x, y, z]; got dtype {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"{name} must be (N, 4) int32 [batch, x, y, z]; got {tuple(coords.shape)}")


def check_stride_multiple(coords: torch.Tensor, stride, name: str = "coords") -> None:
    """ValueError unless x, y, z of every row are multiples of ``stride``
    (a 3-tuple): the coordinates of a tensor at that tensor stride."""
    if tuple(stride) == (1, 1, 1) or coords.shape[0] == 0:
        return
    st = torch.tensor(tuple(stride), dtype=coords.dtype, device=coords.device)
    bad = (torch.remainder(coords[:, 1:], st) != 0).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} of a tensor with stride {tuple(stride)} must be multiples of the stride; "
                         f"row {row} is {coords[row].tolist()}")


def pack(coords: torch.Tensor) -> torch.Tensor:
    """int64 keys of (N, 4) int32 coords; ValueError naming the first row out of range."""
    check_coords(coords)
    if _ext.use_core(coords):
        return _ext.to_tensor(_ext.call(_ext.core.pack_keys, _ext.to_numpy(coords)))
    return pack_torch(coords)


def pack_torch(coords: torch.Tensor) -> torch.Tensor:
    """Same keys as :func:`pack` from torch ops (any device)."""
    c = coords.long()
    bad = (c[:, 0] < 0) | (c[:, 0] > BATCH_MAX) | (c[:, 1:] < COORD_MIN).any(1) | (c[:, 1:] > COORD_MAX).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"coords row {row} = {c[row].tolist()} is outside the representable range: batch in "
            f"[0, {BATCH_MAX}], x, y, z in [{COORD_MIN}, {COORD_MAX}]"
        )
    return (c[:, 0] << SHIFT_B) | ((c[:, 1] + _BIAS) << SHIFT_X) | ((c[:, 2] + _BIAS) << SHIFT_Y) | (c[:, 3] + _BIAS)


def unpack(keys: torch.Tensor) -> torch.Tensor:
    """(N, 4) int32 coords of int64 keys."""
    if _ext.use_core(keys):
        return _ext.to_tensor(_ext.call(_ext.core.unpack_keys, _ext.to_numpy(keys, torch.int64)))
    return unpack_torch(keys)


def unpack_torch(keys: torch.Tensor) -> torch.Tensor:
    """Same as :func:`unpack` from torch ops (any device)."""
    keys = keys.long()
    mask = (1 << COORD_BITS) - 1
    out = torch.stack(
        [keys >> SHIFT_B, ((keys >> SHIFT_X) & mask) - _BIAS, ((keys >> SHIFT_Y) & mask) - _BIAS, (keys & mask) - _BIAS],
        dim=1,
    )
    return out.to(torch.int32)


def key_delta(dx: int, dy: int, dz: int) -> int:
    """What adding (dx, dy, dz) to in-range coordinates adds to their key."""
    return (dx << SHIFT_X) + (dy << SHIFT_Y) + dz


def unique(keys: torch.Tensor):
    """(unique_keys ascending, inverse, perm, seg_ptr) of int64 keys: rows
    ``perm[seg_ptr[j]:seg_ptr[j+1]]`` hold key ``j`` in their original order."""
    if _ext.use_core(keys):
        out = _ext.call(_ext.core.unique_keys, _ext.to_numpy(keys, torch.int64))
        return tuple(_ext.to_tensor(a) for a in out)
    return unique_torch(keys)


def unique_torch(keys: torch.Tensor):
    """Same as :func:`unique` from torch ops (any device)."""
    keys = keys.long()
    sorted_keys, perm = torch.sort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    seg_ptr = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=keys.device)
    seg_ptr[1:] = torch.cumsum(counts, 0)
    group = torch.repeat_interleave(torch.arange(uniq.numel(), device=keys.device), counts)
    inverse = torch.empty_like(keys)
    inverse[perm] = group
    return uniq, inverse, perm, seg_ptr


def sort(keys: torch.Tensor):
    """(sorted_keys, perm), stable."""
    if _ext.use_core(keys):
        s, p = _ext.call(_ext.core.sort_keys, _ext.to_numpy(keys, torch.int64))
        return _ext.to_tensor(s), _ext.to_tensor(p)
    return sort_torch(keys)


def sort_torch(keys: torch.Tensor):
    """Same as :func:`sort` from torch ops (any device)."""
    return torch.sort(keys.long(), stable=True)
