"""The filter-kernel-weight (FKW) format of PatDNN (Niu et al., 2020) for
pattern-pruned convolution weights."""

from __future__ import annotations

import numpy as np
import torch

from ._base import (SparseFormat, check_below, check_data, check_dense_bytes, check_dense_size, check_pointer,
                    check_shape, check_value_dtype, index_array, module_weight, value_array)
from ._storage import lines_of, narrow, pack_bits, pointer_of, unpack_bits, widen
from .csr import _csr_product

MAX_KERNEL_VOLUME = 62  # a pattern is an int64 bit mask over the kernel offsets


def _stride_table(tensor: torch.Tensor, c_out: int, n_p: int) -> torch.Tensor:
    """The zeroed int64 (C_out, n_p + 1) table ``from_dense`` fills with
    cumulative kernel counts, its size checked against
    :data:`pointsparse.tensor.MAX_DENSE_BYTES` first: a weight that is not
    pattern pruned has about as many patterns as kernels, and the table
    grows as C_out x kernels."""
    nbytes = c_out * (n_p + 1) * 8
    what = (f"tensor of shape {tuple(tensor.shape)} has {n_p:,} distinct kernel patterns: FKW's stride table "
            f"(C_out x (patterns + 1) = {c_out} x {n_p + 1})")
    advice = ("FKW stores pattern-pruned weights (a few patterns: prune.pattern_structured); "
              "store this weight in another format (CSR, BSR)")
    check_dense_bytes(nbytes, what, after=f"; {advice}")
    what += f" needs {nbytes:,} bytes"
    try:
        return torch.zeros(c_out, n_p + 1, dtype=torch.int64)
    except RuntimeError as exc:  # the allocator refused
        raise ValueError(f"{what}, which could not be allocated ({exc}); {advice}") from None


def _filter_order(kernels: list, pair_f: list, pair_p: list, counts: list) -> torch.Tensor:
    """The stored filter order: most kernels first, then by kernel counts per
    pattern compared in pattern order (more kernels of the lower pattern
    first), then by filter. Each filter's key lists its (pattern, -count)
    pairs present, in pattern order: between filters of equal kernel counts
    neither list is a prefix of the other, so comparing them as tuples
    orders the filters as comparing their dense count rows did."""
    present = [[] for _ in kernels]
    for f, p, c in zip(pair_f, pair_p, counts):
        present[f].append((p, -c))
    order = sorted(range(len(kernels)), key=lambda f: (-kernels[f], present[f], f))
    return torch.tensor(order, dtype=torch.int64)


class FKW(SparseFormat):
    """A weight of shape (C_out, C_in, *kernel) (a 2-D (C_out, C_in) matrix is
    a kernel of volume 1). A *filter* is one output channel; its *kernels* are
    the (C_in) slices of ``kernel`` volume V; a kernel is stored when any of
    its entries is nonzero, and its *pattern* is the set of its nonzero
    offsets. Filters are reordered so that filters with the same number of
    kernels and the same pattern mix sit together (equal work for
    neighbouring filters); inside a filter, kernels are grouped by pattern.

    Arrays (n_k stored kernels, n_p distinct patterns, nnz nonzeros):
    ``weight`` (nnz, dtype): each stored kernel's nonzeros in offset order;
    ``index`` (n_k, width of the largest input channel): input channel of each
    stored kernel; ``offset`` (C_out + 1, width of n_k): first kernel of each
    stored filter; ``reorder`` (C_out, width of C_out - 1): original output
    channel of each stored filter; ``stride`` (C_out, n_p + 1, width of its
    largest count): per stored filter, cumulative kernel counts by pattern
    (kernels of pattern p are ``offset[f] + stride[f, p] .. stride[f, p+1]``);
    ``patterns``: n_p x V bits, packed, the pattern table.
    ``nbytes = nnz * itemsize + n_k * w(max channel) + (C_out + 1) * w(n_k) +
    C_out * w(C_out - 1) + C_out * (n_p + 1) * w(max stride) + ceil(n_p * V / 8)``.

    ``matmul`` multiplies the (C_out, C_in * V) matrix view (column c * V + v),
    and ``shape`` is that view's, as every format's is its matrix's; only
    ``to_dense()`` gives the weight in its own ``weight_shape`` (the other
    formats give their matrix): ``to_dense().reshape(shape)`` is the
    matrix ``matmul`` multiplies."""

    _values_name = "weight"

    def __init__(self, weight, index, offset, reorder, stride, patterns, weight_shape, *,
                 _trusted: bool = False):
        self.weight_shape = check_shape(weight_shape, "weight_shape", dims=None)
        self.volume = 1
        for s in self.weight_shape[2:]:
            self.volume *= s
        self.shape = (self.weight_shape[0], self.weight_shape[1] * self.volume)
        self.weight = value_array(weight, "weight", 1)
        self.dtype = self.weight.dtype
        self.index = narrow(index_array(index, "index"))
        self.offset = narrow(index_array(offset, "offset"))
        self.reorder = narrow(index_array(reorder, "reorder"))
        self.stride = narrow(index_array(stride, "stride", dim=2))
        patterns = index_array(patterns, "patterns")
        check_below(patterns, "patterns", 256, "values a byte holds")
        self.patterns = patterns.to(torch.uint8).contiguous()
        self.num_patterns = self.stride.shape[1] - 1
        self._csr_cache = None
        if not _trusted:  # from_dense builds valid arrays: its checks would only cost time
            self.validate()

    def _validate(self) -> None:
        self._csr_cache = None  # decoded again from the checked arrays
        c_out, c_in, *kernel = check_shape(self.weight_shape, "weight_shape", dims=None)
        volume = 1
        for s in kernel:
            volume *= s
        if getattr(self, "volume", None) != volume or tuple(getattr(self, "shape", ())) != (c_out, c_in * volume):
            raise ValueError(f"FKW.volume and FKW.shape must follow weight_shape {self.weight_shape}: {volume} and "
                             f"{(c_out, c_in * volume)}; got {getattr(self, 'volume', None)!r} and "
                             f"{getattr(self, 'shape', None)!r}")
        weight = self._stored("weight", "values", 1)
        self._check_dtype(weight)
        index = self._stored("index", "index", 1)
        offset = self._stored("offset", "index", 1)
        reorder = self._stored("reorder", "index", 1)
        stride = self._stored("stride", "index", 2)
        patterns = self._stored("patterns", "bytes", 1)
        n_k = index.numel()
        check_below(index, "index", c_in, "C_in")
        check_pointer(offset, "offset", c_out, "C_out", n_k, "the number of stored kernels (index entries)")
        if reorder.numel() != c_out:
            raise ValueError(f"reorder must have C_out = {c_out} entries; got {reorder.numel()}")
        check_below(reorder, "reorder", c_out, "C_out")
        if bool((torch.bincount(reorder, minlength=c_out) != 1).any()):
            raise ValueError(f"reorder must be a permutation of 0..{c_out - 1} (each output channel once); "
                             f"got {reorder.tolist()[:16]}")
        n_p = stride.shape[1] - 1
        if stride.shape[0] != c_out or n_p < 0:
            raise ValueError(f"stride must be (C_out, n_patterns + 1) = ({c_out}, n_patterns + 1); got "
                             f"{tuple(stride.shape)}")
        if getattr(self, "num_patterns", None) != n_p:
            raise ValueError(f"FKW.num_patterns must be stride's columns - 1 = {n_p}; got "
                             f"{getattr(self, 'num_patterns', None)!r}")
        if c_out:
            start = stride[:, 0].nonzero()
            if start.numel():
                raise ValueError(f"stride[{int(start[0])}, 0] must be 0")
            down = (stride.diff(dim=1) < 0).nonzero()
            if down.numel():
                raise ValueError(f"stride[{int(down[0, 0])}] must be non-decreasing")
            wrong = (stride[:, -1] != offset.diff()).nonzero()
            if wrong.numel():
                f = int(wrong[0])
                raise ValueError(f"stride[{f}, -1] must equal the kernels of stored filter {f} "
                                 f"(offset[{f} + 1] - offset[{f}] = {int(offset.diff()[f])}); got {int(stride[f, -1])}")
        if patterns.numel() != (n_p * volume + 7) // 8:
            raise ValueError(f"patterns must hold n_patterns x V = {n_p} x {volume} bits in "
                             f"{(n_p * volume + 7) // 8} bytes; got {patterns.numel()}")
        kernel_filter = torch.repeat_interleave(torch.arange(c_out), offset.diff())
        key = torch.sort(kernel_filter * max(1, c_in) + index).values
        twice = (key.diff() == 0).nonzero()
        if twice.numel():
            k = int(key[int(twice[0])])
            raise ValueError(f"index holds input channel {k % max(1, c_in)} twice in stored filter "
                             f"{k // max(1, c_in)} (one kernel per channel)")
        table = unpack_bits(patterns, 1, n_p * volume).reshape(n_p, volume).bool()
        taps = int(table.sum(1)[torch.repeat_interleave(torch.arange(n_p).repeat(c_out),
                                                         stride.diff(dim=1).reshape(-1))].sum()) if n_p else 0
        if taps != weight.numel():
            raise ValueError(f"weight must hold one value per pattern offset of every stored kernel ({taps}); "
                             f"got {weight.numel()}")

    @classmethod
    def from_dense(cls, tensor) -> "FKW":
        check_data(tensor, "tensor")
        check_value_dtype(tensor, "tensor")
        if tensor.dim() < 2:
            raise ValueError("tensor must be a floating weight of shape (C_out, C_in, *kernel); "
                             f"got {tuple(tensor.shape)} {tensor.dtype}")
        check_dense_size(tensor, "tensor")
        dense = tensor.detach().to("cpu").contiguous()
        c_out, c_in = dense.shape[0], dense.shape[1]
        volume = 1
        for s in dense.shape[2:]:
            volume *= s
        if volume > MAX_KERNEL_VOLUME:
            raise ValueError(f"FKW patterns cover kernels of at most {MAX_KERNEL_VOLUME} offsets; "
                             f"got {volume}")
        w = dense.reshape(c_out, c_in, volume)
        nonzero = w != 0
        codes = (nonzero.to(torch.int64) << torch.arange(volume)).sum(2)  # (C_out, C_in)
        f_idx, c_idx = (codes != 0).nonzero(as_tuple=True)  # the stored kernels, filter-major
        patterns, pid = torch.unique(codes[f_idx, c_idx], return_inverse=True)
        n_p = patterns.numel()
        stride = _stride_table(tensor, c_out, n_p)
        # (filter, pattern) pairs present and their kernel counts, by filter then pattern
        pairs, counts = torch.unique(f_idx * max(1, n_p) + pid, return_counts=True)
        pair_f, pair_p = pairs // max(1, n_p), pairs % max(1, n_p)
        kernels = torch.bincount(f_idx, minlength=c_out)
        order = _filter_order(kernels.tolist(), pair_f.tolist(), pair_p.tolist(), counts.tolist())
        rank = torch.empty_like(order)
        rank[order] = torch.arange(c_out)
        key = (rank[f_idx] * max(1, n_p) + pid) * max(1, c_in) + c_idx
        sort = torch.argsort(key)
        f_sorted, c_sorted = f_idx[sort], c_idx[sort]
        weight = w[f_sorted, c_sorted][nonzero[f_sorted, c_sorted]]
        offset = torch.cat([kernels.new_zeros(1), kernels[order].cumsum(0)])
        stride[rank[pair_f], pair_p + 1] = counts
        stride = stride.cumsum_(1)
        bits = ((patterns[:, None] >> torch.arange(volume)) & 1).reshape(-1)
        return cls(weight, c_sorted, offset, order, stride, pack_bits(bits, 1), dense.shape, _trusted=True)

    @classmethod
    def from_module(cls, module: torch.nn.Module, name: str = "weight", **kwargs) -> "FKW":
        """A torch conv weight (C_out, C_in, *kernel), a Linear weight, or a
        pointsparse Conv3d weight (K_offsets, C_in, C_out), taken as
        (C_out, C_in, K_offsets): any layer's weight with its axes put in
        (out, in, *kernel) order by its adapter
        (:mod:`pointsparse.prune.adapters`); ``kwargs`` go to :meth:`from_dense`."""
        from ..prune import adapters  # noqa: PLC0415 - prune and formats are siblings

        weight = module_weight(module, name)
        if name == "weight" and adapters.is_layer(module):
            layout = adapters.layout_of(module)
            weight = weight.permute(layout.out_axis, layout.in_axis, *layout.kernel_axes)
        return cls.from_dense(weight, **kwargs)

    def arrays(self) -> dict:
        return {"weight": self.weight, "index": self.index, "offset": self.offset,
                "reorder": self.reorder, "stride": self.stride, "patterns": self.patterns}

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_csr_cache"] = None  # derived (and holding a narrowed index array): decoded again when needed
        return state

    def _stored_csr(self):
        """(row_ptr, col, values) of the matrix view with rows in stored
        filter order: decoded once from the pattern table."""
        if self._csr_cache is None:
            c_out, volume = self.shape[0], self.volume
            n_p = self.num_patterns
            table = unpack_bits(self.patterns, 1, n_p * volume).reshape(n_p, volume).bool()
            counts = widen(self.stride).diff(dim=1) if n_p else torch.zeros(c_out, 0, dtype=torch.int64)
            pid = torch.repeat_interleave(torch.arange(n_p).repeat(c_out), counts.reshape(-1))
            kernel_filter = lines_of(self.offset)
            kernel_of, tap = table[pid].nonzero(as_tuple=True)
            cols = widen(self.index)[kernel_of] * volume + tap
            rows = kernel_filter[kernel_of]
            row_ptr = pointer_of(torch.bincount(rows, minlength=c_out))
            self._csr_cache = (row_ptr, narrow(cols), rows)
        return self._csr_cache

    def _triplets(self):
        row_ptr, cols, rows = self._stored_csr()
        return widen(self.reorder)[rows], widen(cols), self.weight

    def to_dense(self) -> torch.Tensor:
        rows, cols, values = self._triplets()
        out = self._zeros()
        out[rows, cols] = values
        return out.reshape(self.weight_shape)

    def _kernel(self, dense_np, isa: str | None = None):
        row_ptr, cols, _ = self._stored_csr()
        stored = _csr_product(row_ptr, cols, self.weight, dense_np, self.shape[1], isa)
        out = np.empty_like(stored)  # (numpy's MemoryError where it cannot: matmul's ValueError)
        out[widen(self.reorder).numpy()] = stored
        return out
