"""The EIE layout (Han et al., 2016): rows interleaved over processing
elements, each PE holding its rows as compressed sparse columns with 4-bit
relative row indices."""

from __future__ import annotations

import torch

from .. import _ext
from .balance import check_pe
from ._base import SparseFormat, check_below, check_matrix, check_shape, index_array, value_array
from ._storage import narrow, pack_bits, pointer_of, widen

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

    def __init__(self, values, rel_idx, col_ptr, num_pe: int, shape, *, _trusted: bool = False):
        self.shape = check_shape(shape)
        self.num_pe = check_pe(num_pe)
        self.values = value_array(values, "values", 1)
        self.dtype = self.values.dtype
        rel_idx = index_array(rel_idx, "rel_idx")
        check_below(rel_idx, "rel_idx", 256, "values a byte holds")
        self.rel_idx = rel_idx.to(torch.uint8).contiguous()
        self.col_ptr = narrow(index_array(col_ptr, "col_ptr", dim=2))
        if not _trusted:  # from_dense builds valid arrays: its checks would only cost time
            self.validate()

    def _validate(self) -> None:
        M, K = check_shape(self.shape)
        P = check_pe(getattr(self, "num_pe", None))
        values = self._stored("values", "values", 1)
        self._check_dtype(values)
        rel_idx = self._stored("rel_idx", "bytes", 1)
        col_ptr = self._stored("col_ptr", "index", 2)
        if tuple(col_ptr.shape) != (P, K + 1):
            raise ValueError(f"col_ptr must be (num_pe, K + 1) = ({P}, {K + 1}); got {tuple(col_ptr.shape)}")
        start = col_ptr[:, 0].nonzero()
        if start.numel():
            raise ValueError(f"col_ptr[{int(start[0])}, 0] must be 0; got {int(col_ptr[int(start[0]), 0])}")
        down = (col_ptr.diff(dim=1) < 0).nonzero()
        if down.numel():
            raise ValueError(f"col_ptr[{int(down[0, 0])}] must be non-decreasing; decreases at {int(down[0, 1]) + 1}")
        counts = col_ptr[:, -1]
        if int(counts.sum()) != values.numel():
            raise ValueError(f"values must hold the {int(counts.sum())} entries col_ptr counts; got {values.numel()}")
        if int(((counts + 1) // 2).sum()) != rel_idx.numel():
            raise ValueError(f"rel_idx must hold the entries' 4-bit fields in {int(((counts + 1) // 2).sum())} "
                             f"bytes (each PE's rounded up); got {rel_idx.numel()}")
        rows, _ = self._decode()
        far = (rows >= M).nonzero()
        if far.numel():
            e = int(far[0])
            raise ValueError(f"rel_idx reaches row {int(rows[e])} >= M = {M} (PE {int(rows[e]) % P}, "
                             f"entry {e} of values)")

    @classmethod
    def from_dense(cls, tensor, num_pe: int = 4) -> "EIE":
        dense = check_matrix(tensor)
        M, K = dense.shape
        # More PEs than rows only adds empty ones: bounded, so a huge count is
        # an error at once, not a runaway loop and a huge index array.
        limit = max(M, _MIN_PE_LIMIT)
        count = check_pe(num_pe)  # (another type: TypeError; below 1: ValueError)
        if count > limit:
            raise ValueError(f"num_pe must be an int in [1, {limit}] (at most max(rows, {_MIN_PE_LIMIT}) for a "
                             f"{M}-row matrix); got {num_pe!r}")
        num_pe = count
        values, gaps, col_ptr = [], [], []
        for p in range(num_pe):
            local = dense[p::num_pe]  # (rows_p, K)
            cols, rows = local.t().nonzero(as_tuple=True)  # column-major order
            v, z, counts = _encode_pe(rows, cols, local[rows, cols], K, dense.dtype)
            values.append(v)
            gaps.append(pack_bits(z, 4))
            col_ptr.append(pointer_of(counts))
        with torch.autocast(dense.device.type, enabled=False):  # (autocast's cat refuses a 16-bit dtype not its own)
            values = torch.cat(values)
        return cls(values, torch.cat(gaps), torch.stack(col_ptr), num_pe, (M, K), _trusted=True)

    def arrays(self) -> dict:
        return {"values": self.values, "rel_idx": self.rel_idx, "col_ptr": self.col_ptr}

    @property
    def entries_per_pe(self) -> torch.Tensor:
        """E_p: entries (padding zeros included) each PE stores: its load."""
        return widen(self.col_ptr)[:, -1]

    def _decode(self):
        """Row and column of every stored entry (padding zeros included), in
        the order of ``values``."""
        P, K = self.num_pe, self.shape[1]
        col_ptr = widen(self.col_ptr)
        counts = col_ptr[:, -1]
        e = int(counts.sum())
        if e == 0:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        per_column = col_ptr.diff(dim=1).reshape(-1)  # (P * K,): entries of PE p, column k
        segment = torch.repeat_interleave(torch.arange(P * K), per_column)
        pe = segment // max(1, K)
        # each PE's 4-bit fields start on a whole byte: field f of PE p is nibble 2 * byte0[p] + f
        byte0 = torch.cat([counts.new_zeros(1), ((counts + 1) // 2).cumsum(0)[:-1]])
        entry0 = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        nibble = 2 * byte0[pe] + torch.arange(e) - entry0[pe]
        z = (widen(self.rel_idx)[nibble // 2] >> (4 * (nibble % 2))) & 15
        # local row = running sum of (z + 1) within each column, minus 1
        csum = (z + 1).cumsum(0)
        first = torch.cat([per_column.new_zeros(1), per_column.cumsum(0)[:-1]])
        before = torch.cat([csum.new_zeros(1), csum])[first]
        local = csum - before[segment] - 1
        return local * P + pe, segment % max(1, K)

    def _triplets(self):
        rows, cols = self._decode()
        keep = self.values != 0
        return rows[keep], cols[keep], self.values[keep]

    def to_dense(self) -> torch.Tensor:
        rows, cols, vals = self._triplets()
        out = self._zeros()
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
