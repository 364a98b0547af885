"""Compressed sparse row and column formats, and the coordinate format."""

from __future__ import annotations

import torch

from .. import _ext
from ._base import SparseFormat, check_matrix
from ._storage import narrow, widen


def _csr_product(row_ptr, col_idx, values, dense_np, K: int, isa: str | None = None):
    return _ext.call(
        _ext.core.csr_spmm,
        _ext.to_numpy(widen(row_ptr)),
        col_idx.numpy(),
        _ext.to_numpy(values),
        dense_np,
        K,
        isa,
    )


class CSR(SparseFormat):
    """Compressed sparse rows of an (M, K) matrix with nnz nonzeros.

    Arrays: ``values`` (nnz, dtype), ``col_idx`` (nnz, in the width of the
    largest column used), ``row_ptr`` (M + 1, in the width of nnz).
    ``nbytes = nnz * itemsize + nnz * w(max col) + (M + 1) * w(nnz)``; e.g. the
    4 x 4 example with 6 float32 values: 24 + 6 + 5 = 35 bytes."""

    def __init__(self, row_ptr, col_idx, values, shape):
        self.shape = (int(shape[0]), int(shape[1]))
        self.row_ptr = narrow(row_ptr)
        self.col_idx = narrow(col_idx)
        self.values = values.detach().to("cpu").contiguous()
        self.dtype = self.values.dtype
        M, K = self.shape
        if self.row_ptr.numel() != M + 1:
            raise ValueError(f"row_ptr must have M + 1 = {M + 1} entries; got {self.row_ptr.numel()}")
        if self.col_idx.numel() != self.values.numel() or self.values.dim() != 1:
            raise ValueError("col_idx and values must be 1-D of the same length")

    @classmethod
    def from_dense(cls, tensor) -> "CSR":
        dense = check_matrix(tensor)
        M, K = dense.shape
        rows, cols = dense.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=M)
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(row_ptr, cols, dense[rows, cols], (M, K))

    def arrays(self) -> dict:
        return {"values": self.values, "col_idx": self.col_idx, "row_ptr": self.row_ptr}

    def _rows(self) -> torch.Tensor:
        counts = widen(self.row_ptr).diff()
        return torch.repeat_interleave(torch.arange(self.shape[0]), counts)

    def _triplets(self):
        return self._rows(), widen(self.col_idx), self.values

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.dtype)
        out[self._rows(), widen(self.col_idx)] = self.values
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        return _csr_product(self.row_ptr, self.col_idx, self.values, dense_np, self.shape[1],
                            isa)


class CSC(SparseFormat):
    """Compressed sparse columns of an (M, K) matrix.

    Arrays: ``values`` (nnz), ``row_idx`` (nnz, width of the largest row),
    ``col_ptr`` (K + 1, width of nnz).
    ``nbytes = nnz * itemsize + nnz * w(max row) + (K + 1) * w(nnz)``.
    The product reorders the entries by row on each call and runs the CSR
    kernel (nothing extra is stored)."""

    def __init__(self, col_ptr, row_idx, values, shape):
        self.shape = (int(shape[0]), int(shape[1]))
        self.col_ptr = narrow(col_ptr)
        self.row_idx = narrow(row_idx)
        self.values = values.detach().to("cpu").contiguous()
        self.dtype = self.values.dtype
        if self.col_ptr.numel() != self.shape[1] + 1:
            raise ValueError(f"col_ptr must have K + 1 = {self.shape[1] + 1} entries")
        if self.row_idx.numel() != self.values.numel() or self.values.dim() != 1:
            raise ValueError("row_idx and values must be 1-D of the same length")

    @classmethod
    def from_dense(cls, tensor) -> "CSC":
        dense = check_matrix(tensor)
        M, K = dense.shape
        cols, rows = dense.t().nonzero(as_tuple=True)
        counts = torch.bincount(cols, minlength=K)
        col_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return cls(col_ptr, rows, dense[rows, cols], (M, K))

    def arrays(self) -> dict:
        return {"values": self.values, "row_idx": self.row_idx, "col_ptr": self.col_ptr}

    def _triplets(self):
        cols = torch.repeat_interleave(torch.arange(self.shape[1]), widen(self.col_ptr).diff())
        return widen(self.row_idx), cols, self.values

    def to_dense(self) -> torch.Tensor:
        rows, cols, values = self._triplets()
        out = torch.zeros(self.shape, dtype=self.dtype)
        out[rows, cols] = values
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        rows, cols, values = self._triplets()
        order = torch.argsort(rows * max(1, self.shape[1]) + cols)
        counts = torch.bincount(rows, minlength=self.shape[0])
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return _csr_product(row_ptr, narrow(cols[order]), values[order], dense_np, self.shape[1],
                            isa)


class COO(SparseFormat):
    """Coordinate list of an (M, K) matrix, entries sorted row-major.

    Arrays: ``values`` (nnz), ``row_idx`` (nnz, width of the largest row),
    ``col_idx`` (nnz, width of the largest column).
    ``nbytes = nnz * itemsize + nnz * w(max row) + nnz * w(max col)``.
    The product derives row pointers from the sorted rows per call and runs
    the CSR kernel."""

    def __init__(self, row_idx, col_idx, values, shape):
        self.shape = (int(shape[0]), int(shape[1]))
        rows, cols = widen(narrow(row_idx)), widen(narrow(col_idx))
        values = values.detach().to("cpu").contiguous()
        if not (rows.numel() == cols.numel() == values.numel()) or values.dim() != 1:
            raise ValueError("row_idx, col_idx and values must be 1-D of the same length")
        if min(self.shape) < 0:
            raise ValueError(f"shape must be two sizes >= 0; got {self.shape}")
        for name, idx, size in (("row_idx", rows, self.shape[0]), ("col_idx", cols, self.shape[1])):
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise ValueError(f"{name} must lie in [0, {size}) for shape {self.shape}; got values in "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
        order = torch.argsort(rows * max(1, self.shape[1]) + cols)
        self.row_idx = narrow(rows[order])
        self.col_idx = narrow(cols[order])
        self.values = values[order].contiguous()
        self.dtype = self.values.dtype

    @classmethod
    def from_dense(cls, tensor) -> "COO":
        dense = check_matrix(tensor)
        rows, cols = dense.nonzero(as_tuple=True)
        return cls(rows, cols, dense[rows, cols], dense.shape)

    def arrays(self) -> dict:
        return {"values": self.values, "row_idx": self.row_idx, "col_idx": self.col_idx}

    def _triplets(self):
        return widen(self.row_idx), widen(self.col_idx), self.values

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=self.dtype)
        out[widen(self.row_idx), widen(self.col_idx)] = self.values
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        counts = torch.bincount(widen(self.row_idx), minlength=self.shape[0])
        row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return _csr_product(row_ptr, self.col_idx, self.values, dense_np, self.shape[1], isa)
