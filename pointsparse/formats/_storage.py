"""Storage accounting shared by every format.

Index arrays are stored in the narrowest unsigned integer type that holds
their largest value (1, 2, 4 or 8 bytes), so ``tensor.numel() *
tensor.element_size()`` of each stored array *is* its analytical size. Sub-byte
fields (N:M positions, EIE relative row indices) are bit-packed LSB-first into
uint8 arrays of ``ceil(count * bits / 8)`` bytes."""

from __future__ import annotations

import math

import torch

_UNSIGNED = ((1, torch.uint8), (2, torch.uint16), (4, torch.uint32), (8, torch.uint64))


def index_width(max_value: int) -> int:
    """Bytes of the narrowest unsigned type holding ``max_value`` (>= 0)."""
    if max_value < 0:
        raise ValueError(f"index values must be >= 0; got max {max_value}")
    for width, _ in _UNSIGNED:
        if max_value < (1 << (8 * width)):
            return width
    raise ValueError(f"index value {max_value} does not fit in 64 bits")


def narrow(index: torch.Tensor) -> torch.Tensor:
    """``index`` (any integer dtype, values >= 0) as a contiguous CPU tensor of
    the narrowest unsigned dtype holding its largest value."""
    index = index.detach().to("cpu", torch.int64).contiguous()
    largest = int(index.max()) if index.numel() else 0
    if index.numel() and int(index.min()) < 0:
        raise ValueError("index arrays must be non-negative")
    width = index_width(largest)
    dtype = dict(_UNSIGNED)[width]
    return index.to(dtype)


def widen(index: torch.Tensor) -> torch.Tensor:
    """An index array as int64 (for indexing and for the kernels' pointers)."""
    return index.to(torch.int64)


def pointer_of(counts: torch.Tensor) -> torch.Tensor:
    """A compressed format's pointer from its per-line counts: ``(0,
    counts[0], counts[0] + counts[1], ...)``, ``len(counts) + 1`` entries."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def pointer_of_lines(lines: torch.Tensor, count: int) -> torch.Tensor:
    """:func:`pointer_of` the per-line counts of ``lines`` (int64, the line
    of every entry, each in ``[0, count)``), built in one int64 array of
    ``count + 1`` entries (bincount, cumsum and the pointer are three: a
    product's size check counts one)."""
    ptr = torch.zeros(count + 1, dtype=torch.int64)
    ptr.index_add_(0, lines + 1, torch.ones_like(lines))
    return ptr.cumsum_(0)


def lines_of(ptr: torch.Tensor) -> torch.Tensor:
    """The line of each entry of a pointer (any integer width): ``i``
    repeated ``ptr[i + 1] - ptr[i]`` times, int64."""
    ptr = widen(ptr)
    return torch.repeat_interleave(torch.arange(ptr.numel() - 1), ptr.diff())


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of ``count`` packed ``bits``-bit fields (rounded up to a byte)."""
    return (count * bits + 7) // 8


def bits_for(m: int) -> int:
    """ceil(log2 m): bits of a position inside a group of ``m`` (0 for m = 1)."""
    return 0 if m <= 1 else math.ceil(math.log2(m))


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers (< 2**bits) LSB-first into a uint8 tensor of
    ``packed_nbytes(len, bits)`` bytes."""
    fields = fields.detach().to("cpu", torch.int64).reshape(-1)
    nbytes = packed_nbytes(fields.numel(), bits)
    if bits == 0 or fields.numel() == 0:
        return torch.zeros(nbytes, dtype=torch.uint8)
    if int(fields.max()) >= (1 << bits) or int(fields.min()) < 0:
        raise ValueError(f"fields must lie in [0, {1 << bits}) to pack into {bits} bits")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((fields[:, None] >> shifts) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(nbytes * 8 - stream.numel())])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.int64)
    return (stream.reshape(nbytes, 8) * weights).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``count`` int64 fields."""
    if bits == 0 or count == 0:
        return torch.zeros(count, dtype=torch.int64)
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits)).sum(1)


def array_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
