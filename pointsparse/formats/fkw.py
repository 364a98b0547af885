"""The filter-kernel-weight (FKW) format of PatDNN (Niu et al., 2020) for
pattern-pruned convolution weights."""

from __future__ import annotations

import torch

from ._base import SparseFormat, check_data, module_weight
from ._storage import narrow, pack_bits, unpack_bits, widen
from .csr import _csr_product

MAX_KERNEL_VOLUME = 62  # a pattern is an int64 bit mask over the kernel offsets


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

    ``matmul`` multiplies the (C_out, C_in * V) matrix view (column c * V + v)."""

    def __init__(self, weight, index, offset, reorder, stride, patterns, weight_shape):
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.volume = 1
        for s in self.weight_shape[2:]:
            self.volume *= s
        self.shape = (self.weight_shape[0], self.weight_shape[1] * self.volume)
        self.weight = weight.detach().to("cpu").contiguous()
        self.dtype = self.weight.dtype
        self.index = narrow(index)
        self.offset = narrow(offset)
        self.reorder = narrow(reorder)
        self.stride = narrow(stride)
        self.patterns = patterns.detach().to("cpu", torch.uint8).contiguous()
        self.num_patterns = self.stride.shape[1] - 1 if self.stride.dim() == 2 else 0
        if self.offset.numel() != self.shape[0] + 1 or self.reorder.numel() != self.shape[0]:
            raise ValueError("offset must have C_out + 1 entries and reorder C_out")
        self._csr_cache = None

    @classmethod
    def from_dense(cls, tensor) -> "FKW":
        check_data(tensor, "tensor")
        if tensor.dim() < 2 or not tensor.is_floating_point():
            raise ValueError("tensor must be a floating weight of shape (C_out, C_in, *kernel); "
                             f"got {tuple(tensor.shape)} {tensor.dtype}")
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
        present = codes != 0
        patterns, inverse = torch.unique(codes[present], return_inverse=True)
        n_p = patterns.numel()
        pid = torch.full((c_out, c_in), -1, dtype=torch.int64)
        pid[present] = inverse
        hist = torch.zeros(c_out, n_p, dtype=torch.int64)
        f_idx, c_idx = present.nonzero(as_tuple=True)
        hist.index_put_((f_idx, pid[f_idx, c_idx]), torch.ones_like(f_idx), accumulate=True)
        kernels = hist.sum(1)
        hist_l, kernels_l = hist.tolist(), kernels.tolist()
        order = sorted(range(c_out), key=lambda f: (-kernels_l[f], [-h for h in hist_l[f]], f))
        order = torch.tensor(order, dtype=torch.int64)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(c_out)
        key = (rank[f_idx] * max(1, n_p) + pid[f_idx, c_idx]) * max(1, c_in) + c_idx
        sort = torch.argsort(key)
        f_sorted, c_sorted = f_idx[sort], c_idx[sort]
        weight = w[f_sorted, c_sorted][nonzero[f_sorted, c_sorted]]
        offset = torch.cat([kernels.new_zeros(1), kernels[order].cumsum(0)])
        stride = torch.cat([hist.new_zeros(c_out, 1), hist[order].cumsum(1)], 1)
        bits = ((patterns[:, None] >> torch.arange(volume)) & 1).reshape(-1)
        return cls(weight, c_sorted, offset, order, stride, pack_bits(bits, 1), dense.shape)

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

    def _stored_csr(self):
        """(row_ptr, col, values) of the matrix view with rows in stored
        filter order: decoded once from the pattern table."""
        if self._csr_cache is None:
            c_out, volume = self.shape[0], self.volume
            n_p = self.num_patterns
            table = unpack_bits(self.patterns, 1, n_p * volume).reshape(n_p, volume).bool()
            counts = widen(self.stride).diff(dim=1) if n_p else torch.zeros(c_out, 0, dtype=torch.int64)
            pid = torch.repeat_interleave(torch.arange(n_p).repeat(c_out), counts.reshape(-1))
            kernel_filter = torch.repeat_interleave(torch.arange(c_out), widen(self.offset).diff())
            kernel_of, tap = table[pid].nonzero(as_tuple=True)
            cols = widen(self.index)[kernel_of] * volume + tap
            rows = kernel_filter[kernel_of]
            row_ptr = torch.cat([rows.new_zeros(1), torch.bincount(rows, minlength=c_out).cumsum(0)])
            self._csr_cache = (row_ptr, narrow(cols), rows)
        return self._csr_cache

    def _triplets(self):
        row_ptr, cols, rows = self._stored_csr()
        return widen(self.reorder)[rows], widen(cols), self.weight

    def to_dense(self) -> torch.Tensor:
        rows, cols, values = self._triplets()
        out = torch.zeros(self.shape, dtype=self.dtype)
        out[rows, cols] = values
        return out.reshape(self.weight_shape)

    def _kernel(self, dense_np, isa: str | None = None):
        row_ptr, cols, _ = self._stored_csr()
        stored = _csr_product(row_ptr, cols, self.weight, dense_np, self.shape[1], isa)
        out = torch.empty(stored.shape, dtype=self.dtype).numpy()
        out[widen(self.reorder).numpy()] = stored
        return out
