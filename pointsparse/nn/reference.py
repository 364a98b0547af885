"""The conv sum written once, naively, in torch ops.

For every kernel offset ``o`` with pairs ``(in_idx, out_idx)`` of a kernel
map (API.md)::

    out[out_idx] += feats[in_idx] @ weight[o]

:func:`conv_sum` is that loop: the torch path of
:func:`pointsparse.nn.functional.conv3d` (devices and dtypes the engine does
not run), the reference the tests and benchmarks hold the engine to, and the
per-offset loop of the sparse-format convolutions. :func:`im2col` lays the
same pairs out as columns (``cols[out_idx, o] = feats[in_idx]``), so that the
conv is ``cols.reshape(M, K * C_in) @ weight.reshape(K * C_in, C_out)``."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, Union

import torch

from .. import kmap as _kmap

#: ``rows -> rows @ W[o]`` for one offset, or None where ``W[o]`` is all zero.
OffsetProduct = Union[Callable[[torch.Tensor], torch.Tensor], None]


def offset_pairs(kmap: _kmap.KernelMap) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """``(o, in_idx, out_idx)`` for every offset of ``kmap`` that has pairs,
    in offset order."""
    for o in range(kmap.kernel_volume):
        in_idx, out_idx = kmap.pairs(o)
        if in_idx.numel():
            yield o, in_idx, out_idx


def conv_sum(feats: torch.Tensor, weight: torch.Tensor | Sequence[OffsetProduct], kmap: _kmap.KernelMap,
             out_channels: int | None = None) -> torch.Tensor:
    """``out[out_idx] += feats[in_idx] @ weight[o]`` over the offsets in order,
    into a zero ``(kmap.num_out, C_out)`` tensor (any device and dtype;
    autograd through torch). ``weight``: a ``(K, C_in, C_out)`` tensor, or
    one product per offset (see :data:`OffsetProduct`; then ``out_channels``
    gives ``C_out``). bf16 / fp16 feats: the products (each a matmul's,
    rounded once) are summed in float32 and the sum rounded once, as the
    core's bf16 kernels and a single matmul sum (a sum kept in bf16, rounded
    at every offset, had twice the error on a k3 conv). Their input gradient
    alike: the offsets' rows are gathered from the feats widened (exactly)
    to float32, so that autograd sums the offsets' gradients
    (``grad[out_idx] @ W[o].T``, each rounded once by its matmul) in float32
    and rounds the sum once, where it summed them in bf16, rounding at every
    offset (four times the forward's error on a k3 conv)."""
    if not isinstance(weight, torch.Tensor) and out_channels is None:
        raise ValueError("out_channels is needed when weight is a sequence of per-offset products")
    low = feats.dtype in (torch.bfloat16, torch.float16)
    out = feats.new_zeros((kmap.num_out, weight.shape[2] if isinstance(weight, torch.Tensor) else out_channels),
                          dtype=torch.float32 if low else feats.dtype)
    # (only where a gradient flows to the feats: the same rows, one float32 copy of the feats more)
    wide = feats.float() if low and feats.requires_grad and torch.is_grad_enabled() else None
    for o, in_idx, out_idx in offset_pairs(kmap):
        rows = feats[in_idx] if wide is None else wide[in_idx].to(feats.dtype)
        if isinstance(weight, torch.Tensor):
            out.index_add_(0, out_idx, (rows @ weight[o]).to(out.dtype))
        elif weight[o] is not None:
            out.index_add_(0, out_idx, weight[o](rows).to(out.dtype))
    return out.to(feats.dtype) if low else _autocast_result(out)


def _autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """Under ``torch.autocast`` on ``t``'s device, its precision for a
    float32 ``t`` (autocast casts float32 only: float64 stays, as torch's
    float64 matmuls show); else None."""
    device = t.device.type
    if t.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)  # (bf16 or fp16: the dtypes autocast takes)
    return None


def autocast_input(input: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``input`` in ``dtype`` (a weight's or a format's) where torch.autocast
    is on for its device and it is another float dtype (an autocast layer's
    bf16 output), as torch's convs and Linears under autocast take it; else
    ``input`` (the caller's dtype check then judges it)."""
    if input.dtype != dtype and input.is_floating_point() and dtype.is_floating_point \
            and torch.is_autocast_enabled(input.device.type):
        return input.to(dtype)
    return input


def _autocast_result(out: torch.Tensor) -> torch.Tensor:
    """Under ``torch.autocast`` the products come in its low precision
    (bf16 / fp16) while the sum is kept in the feats' dtype (a float32 sum
    of bf16 products, as a matmul accumulates); the result is given in the
    low precision, as autocast's matmul gives it. Autocast casts float32
    only: a float64 sum stays float64, as torch's float64 matmuls do."""
    low = _autocast_dtype(out)
    return out if low is None else out.to(low)


#: The most bytes :func:`conv_gemm`'s columns may take; a larger conv runs
#: :func:`conv_sum`'s per-offset loop instead (the same sums).
GEMM_COLUMN_BYTES = 1 << 30


def gemm_fits(feats: torch.Tensor, kmap: _kmap.KernelMap) -> bool:
    """Whether :func:`conv_gemm`'s columns of ``feats`` on ``kmap`` take at
    most :data:`GEMM_COLUMN_BYTES`."""
    return _columns_fit(feats, kmap.num_out, kmap.kernel_volume)


def _columns_fit(feats: torch.Tensor, num_out: int, kernel_volume: int) -> bool:
    return num_out * kernel_volume * feats.shape[1] * feats.element_size() <= GEMM_COLUMN_BYTES


def _runs_gemm(feats: torch.Tensor, num_out: int, kernel_volume: int) -> bool:
    """Whether :func:`conv_torch` runs :func:`conv_gemm` (else :func:`conv_sum`)."""
    return feats.device.type != "cpu" and _columns_fit(feats, num_out, kernel_volume)


def torch_flops(feats: torch.Tensor, weight: torch.Tensor, pair_counts: torch.Tensor, num_out: int) -> int:
    """Multiply-adds x 2 that :func:`conv_torch` runs for ``feats`` (its
    input, ``(N, C_in)``) and ``weight`` ``(K, C_in, C_out)`` on a map with
    these per-offset pair counts and ``num_out`` output rows:
    :func:`conv_sum`'s ``pairs(k) * C_in * C_out`` for every offset (an
    all-zero one too), or :func:`conv_gemm`'s ``num_out * K * C_in * C_out``
    (its columns hold a zero for every absent neighbour, multiplied too)."""
    k, c_in, c_out = weight.shape
    if _runs_gemm(feats, num_out, k):
        return 2 * num_out * k * c_in * c_out
    return 2 * int(torch.as_tensor(pair_counts, dtype=torch.int64).sum()) * c_in * c_out


def conv_torch(feats: torch.Tensor, weight: torch.Tensor, kmap: _kmap.KernelMap) -> torch.Tensor:
    """The conv sum as the pure-torch path runs it, eager and in a graph's
    operators alike: on a device other than the CPU one matrix product
    (:func:`conv_gemm`: a few launches, not three per offset) where its
    columns fit, else :func:`conv_sum`'s per-offset loop."""
    if _runs_gemm(feats, kmap.num_out, kmap.kernel_volume):
        return conv_gemm(feats, weight, kmap)
    return conv_sum(feats, weight, kmap)


def conv_gemm(feats: torch.Tensor, weight: torch.Tensor, kmap: _kmap.KernelMap) -> torch.Tensor:
    """The conv sum as one matrix product: the map's columns
    (:func:`im2col` of every row: one gather and one index write), then
    ``cols.view(M, K * C_in) @
    weight.view(K * C_in, C_out)``: a few kernel launches per conv where
    :func:`conv_sum` takes three per offset (what bounds it on a GPU).
    The same sums in another order (equal to :func:`conv_sum` up to
    rounding); columns of ``M * K * C_in`` values (:func:`gemm_fits`),
    kept for the weight gradient. Any device and dtype; under
    ``torch.autocast`` the product in its precision."""
    low = _autocast_dtype(feats)
    if low is not None:  # the columns made in autocast's precision (the product's inputs; half the bytes)
        feats, weight = feats.to(low), weight.to(low)
    k, c_in, c_out = weight.shape
    return im2col(feats, kmap).view(kmap.num_out, k * c_in) @ weight.reshape(k * c_in, c_out)


def im2col(feats: torch.Tensor, kmap: _kmap.KernelMap, start: int = 0, stop: int | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """The columns of output rows ``start:stop``: ``cols[q - start, o] =
    feats[p]`` for each pair ``(p, q)`` of offset ``o``, zero where ``q`` has
    no neighbour at ``o``; ``(stop - start, K, C_in)``, written into ``out``
    (a zero tensor or view of that shape) when given. Every row: all pairs
    in one index write; a range of rows: offset by offset, relying on the
    map's pairs being sorted by output row within an offset."""
    stop = kmap.num_out if stop is None else stop
    if out is None:
        out = feats.new_zeros((stop - start, kmap.kernel_volume, feats.shape[1]))
    if start == 0 and stop == kmap.num_out:  # every pair of every offset in one index write
        in_idx, out_idx = kmap.indices()
        out[out_idx, kmap.offset_of_pairs(feats.device)] = feats[in_idx]
        return out
    for o, in_idx, out_idx in offset_pairs(kmap):
        lo, hi = int(torch.searchsorted(out_idx, start)), int(torch.searchsorted(out_idx, stop))
        if hi > lo:
            out[out_idx[lo:hi] - start, o] = feats[in_idx[lo:hi]]
    return out
