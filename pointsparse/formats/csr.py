"""Compressed sparse row and column formats, and the coordinate format."""

from __future__ import annotations

import torch

from .. import _ext
from ._base import (SparseFormat, check_ascending, check_below, check_matrix, check_pointer, check_shape,
                    index_array, value_array, without_beta_warning)
from ._storage import lines_of, narrow, pointer_of, pointer_of_lines, widen


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

    def __init__(self, row_ptr, col_idx, values, shape, *, _trusted: bool = False):
        self.shape = check_shape(shape)
        self.values = value_array(values, "values", 1)
        self.dtype = self.values.dtype
        self.row_ptr = narrow(index_array(row_ptr, "row_ptr"))
        self.col_idx = narrow(index_array(col_idx, "col_idx"))
        if not _trusted:  # from_dense builds valid arrays: its checks would only cost time
            self.validate()

    def _validate(self) -> None:
        M, K = check_shape(self.shape)
        values = self._stored("values", "values", 1)
        self._check_dtype(values)
        _check_compressed(self._stored("row_ptr", "index", 1), "row_ptr", (M, "M", "row"),
                          self._stored("col_idx", "index", 1), "col_idx", (K, "K"), values.numel())

    @classmethod
    def from_dense(cls, tensor) -> "CSR":
        dense = check_matrix(tensor)
        M, K = dense.shape
        rows, cols = dense.nonzero(as_tuple=True)
        return cls(pointer_of(torch.bincount(rows, minlength=M)), cols, dense[rows, cols], (M, K), _trusted=True)

    @classmethod
    def _from_sparse(cls, matrix: torch.Tensor) -> "CSR":
        t = without_beta_warning(matrix.to_sparse_csr)
        return cls(t.crow_indices(), t.col_indices(), t.values(), tuple(t.shape))

    def to_torch(self) -> torch.Tensor:
        return without_beta_warning(torch.sparse_csr_tensor, widen(self.row_ptr), widen(self.col_idx), self.values,
                                    tuple(self.shape), check_invariants=False)

    @property
    def T(self) -> "CSC":
        return CSC(self.row_ptr, self.col_idx, self.values, (self.shape[1], self.shape[0]), _trusted=True)

    def arrays(self) -> dict:
        return {"values": self.values, "col_idx": self.col_idx, "row_ptr": self.row_ptr}

    def _rows(self) -> torch.Tensor:
        return lines_of(self.row_ptr)

    def _triplets(self):
        return self._rows(), widen(self.col_idx), self.values

    def to_dense(self) -> torch.Tensor:
        out = self._zeros()
        out[self._rows(), widen(self.col_idx)] = self.values
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        return _csr_product(self.row_ptr, self.col_idx, self.values, dense_np, self.shape[1],
                            isa)


def _check_compressed(ptr, ptr_name: str, lines: tuple, idx, idx_name: str, within: tuple, nnz: int) -> None:
    """The arrays of a compressed format (CSR's rows, CSC's columns): ``ptr``
    over ``lines = (count, its name, a line's name)`` ends at ``nnz``, one
    ``idx`` entry per value, below ``within = (bound, its name)`` and
    strictly ascending in each line."""
    count, count_name, line = lines
    if idx.numel() != nnz:
        raise ValueError(f"{idx_name} must have one entry per value ({nnz}); got {idx.numel()}")
    check_pointer(ptr, ptr_name, count, count_name, nnz, "nnz (the number of values)")
    check_below(idx, idx_name, *within)
    check_ascending(lines_of(ptr), idx, idx_name, line)


class CSC(SparseFormat):
    """Compressed sparse columns of an (M, K) matrix.

    Arrays: ``values`` (nnz), ``row_idx`` (nnz, width of the largest row),
    ``col_ptr`` (K + 1, width of nnz).
    ``nbytes = nnz * itemsize + nnz * w(max row) + (K + 1) * w(nnz)``.
    The product reorders the entries by row on each call and runs the CSR
    kernel (nothing extra is stored)."""

    def __init__(self, col_ptr, row_idx, values, shape, *, _trusted: bool = False):
        self.shape = check_shape(shape)
        self.values = value_array(values, "values", 1)
        self.dtype = self.values.dtype
        self.col_ptr = narrow(index_array(col_ptr, "col_ptr"))
        self.row_idx = narrow(index_array(row_idx, "row_idx"))
        if not _trusted:  # from_dense builds valid arrays: its checks would only cost time
            self.validate()

    def _validate(self) -> None:
        M, K = check_shape(self.shape)
        values = self._stored("values", "values", 1)
        self._check_dtype(values)
        _check_compressed(self._stored("col_ptr", "index", 1), "col_ptr", (K, "K", "column"),
                          self._stored("row_idx", "index", 1), "row_idx", (M, "M"), values.numel())

    @classmethod
    def from_dense(cls, tensor) -> "CSC":
        dense = check_matrix(tensor)
        M, K = dense.shape
        cols, rows = dense.t().nonzero(as_tuple=True)
        return cls(pointer_of(torch.bincount(cols, minlength=K)), rows, dense[rows, cols], (M, K), _trusted=True)

    @classmethod
    def _from_sparse(cls, matrix: torch.Tensor) -> "CSC":
        t = without_beta_warning(matrix.to_sparse_csc)
        return cls(t.ccol_indices(), t.row_indices(), t.values(), tuple(t.shape))

    def to_torch(self) -> torch.Tensor:
        return without_beta_warning(torch.sparse_csc_tensor, widen(self.col_ptr), widen(self.row_idx), self.values,
                                    tuple(self.shape), check_invariants=False)

    @property
    def T(self) -> CSR:
        return CSR(self.col_ptr, self.row_idx, self.values, (self.shape[1], self.shape[0]), _trusted=True)

    def arrays(self) -> dict:
        return {"values": self.values, "row_idx": self.row_idx, "col_ptr": self.col_ptr}

    def _triplets(self):
        return widen(self.row_idx), lines_of(self.col_ptr), self.values

    def to_dense(self) -> torch.Tensor:
        rows, cols, values = self._triplets()
        out = self._zeros()
        out[rows, cols] = values
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        rows, cols, values = self._triplets()
        order = torch.argsort(rows * max(1, self.shape[1]) + cols)
        row_ptr = pointer_of_lines(rows, self.shape[0])  # (one M + 1 array: what matmul's check counts)
        return _csr_product(row_ptr, narrow(cols[order]), values[order], dense_np, self.shape[1],
                            isa)


class COO(SparseFormat):
    """Coordinate list of an (M, K) matrix, entries sorted row-major.

    Arrays: ``values`` (nnz), ``row_idx`` (nnz, width of the largest row),
    ``col_idx`` (nnz, width of the largest column).
    ``nbytes = nnz * itemsize + nnz * w(max row) + nnz * w(max col)``.
    The product derives row pointers from the sorted rows per call and runs
    the CSR kernel."""

    def __init__(self, row_idx, col_idx, values, shape, *, _trusted: bool = False):
        self.shape = check_shape(shape)
        rows, cols = index_array(row_idx, "row_idx"), index_array(col_idx, "col_idx")
        values = value_array(values, "values", 1)
        if not (rows.numel() == cols.numel() == values.numel()):
            raise ValueError(f"row_idx, col_idx and values must have the same length; got {rows.numel()}, "
                             f"{cols.numel()} and {values.numel()}")
        check_below(rows, "row_idx", self.shape[0], "M")
        check_below(cols, "col_idx", self.shape[1], "K")
        key = rows * max(1, self.shape[1]) + cols
        order = torch.argsort(key)
        twice = (key[order].diff() == 0).nonzero()
        if twice.numel():
            at = order[int(twice[0])]
            raise ValueError(f"row_idx, col_idx hold the entry ({int(rows[at])}, {int(cols[at])}) more than once "
                             "(one value per entry)")
        self.row_idx = narrow(rows[order])
        self.col_idx = narrow(cols[order])
        self.values = values[order].contiguous()
        self.dtype = self.values.dtype
        if not _trusted:  # from_dense builds valid arrays: its checks would only cost time
            self.validate()

    def _validate(self) -> None:
        M, K = check_shape(self.shape)
        values = self._stored("values", "values", 1)
        self._check_dtype(values)
        rows = self._stored("row_idx", "index", 1)
        cols = self._stored("col_idx", "index", 1)
        if not (rows.numel() == cols.numel() == values.numel()):
            raise ValueError(f"row_idx, col_idx and values must have the same length; got {rows.numel()}, "
                             f"{cols.numel()} and {values.numel()}")
        check_below(rows, "row_idx", M, "M")
        check_below(cols, "col_idx", K, "K")
        down = (rows.diff() < 0).nonzero()
        if down.numel():  # the product derives row pointers from the sorted rows
            raise ValueError(f"row_idx must be sorted (non-decreasing); decreases at {int(down[0]) + 1}")
        check_ascending(rows, cols, "col_idx", "row")

    @classmethod
    def from_dense(cls, tensor) -> "COO":
        dense = check_matrix(tensor)
        rows, cols = dense.nonzero(as_tuple=True)
        return cls(rows, cols, dense[rows, cols], dense.shape, _trusted=True)

    @classmethod
    def _from_sparse(cls, matrix: torch.Tensor) -> "COO":
        t = matrix.to_sparse_coo().coalesce()
        return cls(t.indices()[0], t.indices()[1], t.values(), tuple(t.shape))

    def arrays(self) -> dict:
        return {"values": self.values, "row_idx": self.row_idx, "col_idx": self.col_idx}

    def _triplets(self):
        return widen(self.row_idx), widen(self.col_idx), self.values

    def to_dense(self) -> torch.Tensor:
        out = self._zeros()
        out[widen(self.row_idx), widen(self.col_idx)] = self.values
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        row_ptr = pointer_of_lines(widen(self.row_idx), self.shape[0])  # (one M + 1 array: what matmul counts)
        return _csr_product(row_ptr, self.col_idx, self.values, dense_np, self.shape[1], isa)
