"""The EIE layout (Han et al., 2016): rows interleaved over processing
elements, each PE holding its rows as compressed sparse columns with 4-bit
relative row indices."""

from __future__ import annotations

import torch

from .. import _ext
from ._base import SparseFormat, check_matrix
from ._storage import narrow, pack_bits, unpack_bits, widen

MAX_GAP = 15  # a 4-bit relative index


_MIN_PE_LIMIT = 64


class EIE(SparseFormat):
    """Row r of an (M, K) matrix belongs to PE ``r % P`` as its local row
    ``r // P``. Each PE stores its local matrix column by column: for every
    entry the value and a 4-bit count z of zeros since the previous entry of
    the column (local row = previous + z + 1, previous = -1 at a column's
    start); when more than 15 zeros separate two nonzeros a padding zero with
    z = 15 is stored.

    Arrays, for PE p with E_p entries (padding zeros included):
    ``values`` (sum E_p, dtype); ``rel_idx``: 4-bit fields, each PE's array
    packed two per byte and rounded up to a byte, sum ceil(E_p / 2) bytes;
    ``col_ptr`` (P, K + 1) entry offsets local to each PE, in the width of
    max_p E_p.
    ``nbytes = sum E_p * itemsize + sum ceil(E_p / 2) + P * (K + 1) * w(max E_p)``."""

    def __init__(self, values, rel_idx, col_ptr, num_pe: int, shape):
        self.shape = (int(shape[0]), int(shape[1]))
        self.num_pe = int(num_pe)
        self.values = values.detach().to("cpu").contiguous()
        self.dtype = self.values.dtype
        self.rel_idx = rel_idx.detach().to("cpu", torch.uint8).contiguous()
        self.col_ptr = narrow(col_ptr)
        if tuple(self.col_ptr.shape) != (self.num_pe, self.shape[1] + 1):
            raise ValueError(f"col_ptr must be (num_pe, K + 1) = ({self.num_pe}, "
                             f"{self.shape[1] + 1}); got {tuple(self.col_ptr.shape)}")
        counts = widen(self.col_ptr)[:, -1]
        if int(counts.sum()) != self.values.numel() or \
                int(((counts + 1) // 2).sum()) != self.rel_idx.numel():
            raise ValueError("values and rel_idx must hold the entries col_ptr counts")

    @classmethod
    def from_dense(cls, tensor, num_pe: int = 4) -> "EIE":
        dense = check_matrix(tensor)
        M, K = dense.shape
        # More PEs than rows only adds empty ones: bounded, so a huge count is
        # an error at once, not a runaway loop and a huge index array.
        limit = max(M, _MIN_PE_LIMIT)
        if isinstance(num_pe, bool) or not isinstance(num_pe, int) or not 1 <= num_pe <= limit:
            raise ValueError(f"num_pe must be an int in [1, {limit}] (at most max(rows, {_MIN_PE_LIMIT}) for a "
                             f"{M}-row matrix); got {num_pe!r}")
        values, gaps, col_ptr = [], [], []
        for p in range(num_pe):
            local = dense[p::num_pe]  # (rows_p, K)
            cols, rows = local.t().nonzero(as_tuple=True)  # column-major order
            v, z, counts = _encode_pe(rows, cols, local[rows, cols], K, dense.dtype)
            values.append(v)
            gaps.append(pack_bits(z, 4))
            col_ptr.append(torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
        return cls(torch.cat(values), torch.cat(gaps), torch.stack(col_ptr), num_pe, (M, K))

    def arrays(self) -> dict:
        return {"values": self.values, "rel_idx": self.rel_idx, "col_ptr": self.col_ptr}

    @property
    def entries_per_pe(self) -> torch.Tensor:
        """E_p: entries (padding zeros included) each PE stores: its load."""
        return widen(self.col_ptr)[:, -1]

    def _triplets(self):
        P, K = self.num_pe, self.shape[1]
        col_ptr = widen(self.col_ptr)
        rows, cols, vals = [], [], []
        entry0, byte0 = 0, 0
        for p in range(P):
            e = int(col_ptr[p, -1])
            z = unpack_bits(self.rel_idx[byte0: byte0 + (e + 1) // 2], 4, e)
            col = torch.repeat_interleave(torch.arange(K), col_ptr[p].diff())
            # local row = running sum of (z + 1) within each column, minus 1
            step = z + 1
            csum = step.cumsum(0)
            start = torch.zeros_like(csum)
            if e:
                first = col_ptr[p, :-1][col_ptr[p].diff() > 0]
                base = torch.zeros(e, dtype=torch.int64)
                base[first] = torch.cat([csum.new_zeros(1), csum])[first]
                start = torch.cummax(base, 0).values
            local = csum - start - 1
            rows.append(local * P + p)
            cols.append(col)
            vals.append(self.values[entry0: entry0 + e])
            entry0 += e
            byte0 += (e + 1) // 2
        rows, cols, vals = torch.cat(rows), torch.cat(cols), torch.cat(vals)
        keep = vals != 0
        return rows[keep], cols[keep], vals[keep]

    def to_dense(self) -> torch.Tensor:
        rows, cols, vals = self._triplets()
        out = torch.zeros(self.shape, dtype=self.dtype)
        out[rows, cols] = vals
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        return _ext.call(
            _ext.core.eie_spmm,
            _ext.to_numpy(widen(self.col_ptr)),
            self.rel_idx.numpy(),
            _ext.to_numpy(self.values),
            dense_np,
            self.shape[0],
            isa,
        )


def _encode_pe(rows, cols, vals, K: int, dtype):
    """Values, 4-bit gaps and per-column entry counts of one PE, given its
    nonzeros in column-major order; a gap g becomes g // 16 padding zeros
    (z = 15 each, covering 16 rows) and a final z = g % 16."""
    n = rows.numel()
    first = torch.ones(n, dtype=torch.bool)
    if n:
        first[1:] = cols[1:] != cols[:-1]
    prev = torch.full((n,), -1, dtype=torch.int64)
    if n > 1:
        prev[1:] = torch.where(first[1:], prev.new_full((n - 1,), -1), rows[:-1])
    gap = rows - prev - 1
    pad = gap // (MAX_GAP + 1)
    size = pad + 1
    end = size.cumsum(0)
    total = int(end[-1]) if n else 0
    values = torch.zeros(total, dtype=dtype)
    gaps = torch.full((total,), MAX_GAP, dtype=torch.int64)
    at = end - 1
    values[at] = vals.to(dtype)
    gaps[at] = gap % (MAX_GAP + 1)
    counts = torch.zeros(K, dtype=torch.int64).index_add_(0, cols, size)
    return values, gaps, counts
