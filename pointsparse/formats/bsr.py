"""Block compressed sparse rows."""

from __future__ import annotations

import torch

from .. import _ext
from ..tensor import as_int
from ._base import (SparseFormat, check_ascending, check_below, check_matrix, check_pointer, check_shape, index_array,
                    value_array)
from ._storage import lines_of, narrow, widen

_LAYOUTS = ("csr", "ell")


def _check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'csr' or 'ell'; got {layout!r}")
    return layout


def _check_blocksize(blocksize) -> tuple:
    """An int or a pair of ints (as :func:`pointsparse.tensor.as_int` takes
    them: numpy and 0-d tensor integers too; not bool, not float) as a pair
    of positive ints."""
    try:
        pair = (as_int(blocksize, "blocksize"),) * 2
    except TypeError:
        try:
            pair = tuple(as_int(b, "blocksize") for b in blocksize)
        except TypeError:
            raise TypeError(f"blocksize must be an int or a pair of ints; got {blocksize!r}") from None
    if len(pair) != 2 or any(b < 1 for b in pair):
        raise ValueError(f"blocksize must be two positive ints; got {blocksize!r}")
    if pair[0] * pair[1] > MAX_BLOCK_VALUES:
        raise ValueError(f"blocksize {pair} holds {pair[0] * pair[1]:,} values a block, over the limit of "
                         f"{MAX_BLOCK_VALUES:,} (checked before the blocks are allocated)")
    return pair


#: The most values one block may hold (2^20: a 1024 x 1024 block).
MAX_BLOCK_VALUES = 1 << 20


class BSR(SparseFormat):
    """Fixed ``block_rows x block_cols`` blocks of an (M, K) matrix; a block is
    stored when any of its entries is nonzero. Edge blocks of a matrix whose
    sides are not multiples of the block are stored whole (zero padded).

    Arrays: ``values`` (nb, br, bc), ``block_col`` (nb, width of the largest
    block column; in layout csr strictly increasing within each block row,
    as torch's BSR has them), ``block_ptr`` (ceil(M / br) + 1, width of nb).
    ``nbytes = nb * br * bc * itemsize + nb * w(max block col) +
    (ceil(M / br) + 1) * w(nb)``.

    ``layout="ell"`` (Block-ELL, as cuSPARSE): every block row stores the
    same number E of blocks (the most any block row has), short rows padded
    with zero blocks at block column 0; no ``block_ptr`` (it is i * E):
    ``nbytes = MB * E * br * bc * itemsize + MB * E * w(max block col)``."""

    def __init__(self, block_ptr, block_col, values, shape, layout: str = "csr", *, _trusted: bool = False):
        self.layout = _check_layout(layout)
        self.shape = check_shape(shape)
        self.values = value_array(values, "values", 3)
        self.blocksize = (int(self.values.shape[1]), int(self.values.shape[2]))
        self.block_ptr = narrow(index_array(block_ptr, "block_ptr"))
        self.block_col = narrow(index_array(block_col, "block_col"))
        self.dtype = self.values.dtype
        if not _trusted:  # from_dense builds valid arrays: its checks would only cost time
            self.validate()

    def _validate(self) -> None:
        _check_layout(getattr(self, "layout", None))
        M, K = check_shape(self.shape)
        values = self._stored("values", "values", 3)
        self._check_dtype(values)
        nb, br, bc = values.shape
        if br < 1 or bc < 1:
            raise ValueError(f"values must be (num_blocks, br, bc) with blocks of at least 1 x 1; got "
                             f"{tuple(values.shape)}")
        if tuple(getattr(self, "blocksize", ())) != (br, bc):
            raise ValueError(f"BSR.blocksize must be the values' block ({br}, {bc}); got "
                             f"{getattr(self, 'blocksize', None)!r}")
        block_ptr = self._stored("block_ptr", "index", 1)
        block_col = self._stored("block_col", "index", 1)
        mb, kb = -(-M // br), -(-K // bc)
        if block_col.numel() != nb:
            raise ValueError(f"block_col must have one entry per block ({nb}); got {block_col.numel()}")
        check_pointer(block_ptr, "block_ptr", mb, "ceil(M / br)", nb, "the number of blocks")
        check_below(block_col, "block_col", kb, "ceil(K / bc)")
        if self.layout == "csr":  # (as CSR's columns and torch's BSR: a repeat was summed, an order unchecked)
            check_ascending(lines_of(block_ptr), block_col, "block_col", "block row")
        if self.layout == "ell" and mb and bool((block_ptr != torch.arange(mb + 1) * (nb // mb)).any()):
            raise ValueError(f"a Block-ELL block_ptr must be i * E (every block row holds E = {nb // mb} "
                             f"blocks); got {block_ptr.tolist()[:8]}...")

    @classmethod
    def from_dense(cls, tensor, blocksize=(4, 4), layout: str = "csr") -> "BSR":
        dense = check_matrix(tensor)
        br, bc = _check_blocksize(blocksize)
        _check_layout(layout)
        M, K = dense.shape
        mb, kb = -(-M // br), -(-K // bc)
        padded = dense.new_zeros(mb * br, kb * bc)
        padded[:M, :K] = dense
        blocks = padded.reshape(mb, br, kb, bc).permute(0, 2, 1, 3)  # (mb, kb, br, bc)
        present = (blocks != 0).flatten(2).any(2)
        brow, bcol = present.nonzero(as_tuple=True)
        counts = torch.bincount(brow, minlength=mb)
        block_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        values = blocks[brow, bcol].reshape(-1, br, bc)
        if layout == "ell":
            width = int(counts.max()) if counts.numel() else 0
            slot = torch.arange(brow.numel()) - block_ptr[brow]
            ell_values = values.new_zeros(mb, width, br, bc)
            ell_col = torch.zeros(mb, width, dtype=torch.int64)
            ell_values[brow, slot] = values
            ell_col[brow, slot] = bcol
            return cls(torch.arange(mb + 1) * width, ell_col.reshape(-1),
                       ell_values.reshape(-1, br, bc), (M, K), layout="ell", _trusted=True)
        return cls(block_ptr, bcol, values, (M, K), _trusted=True)

    def arrays(self) -> dict:
        if self.layout == "ell":  # block_ptr is implied by the fixed row width
            return {"values": self.values, "block_col": self.block_col}
        return {"values": self.values, "block_col": self.block_col, "block_ptr": self.block_ptr}

    def to_dense(self) -> torch.Tensor:
        M, K = self.shape
        br, bc = self.blocksize
        mb, kb = -(-M // br), -(-K // bc)
        blocks = self._zeros(mb, kb, br, bc)
        brow = lines_of(self.block_ptr)
        # index_put with accumulate: Block-ELL padding blocks (zeros at block
        # column 0) must not overwrite a stored block there
        blocks.index_put_((brow, widen(self.block_col)), self.values, accumulate=True)
        return blocks.permute(0, 2, 1, 3).reshape(mb * br, kb * bc)[:M, :K].contiguous()

    def _triplets(self):
        br, bc = self.blocksize
        brow = lines_of(self.block_ptr)
        r = (brow[:, None, None] * br + torch.arange(br)[None, :, None]).expand_as(self.values)
        c = (widen(self.block_col)[:, None, None] * bc + torch.arange(bc)[None, None, :])
        c = c.expand_as(self.values)
        keep = (self.values != 0) & (r < self.shape[0]) & (c < self.shape[1])
        return r[keep], c[keep], self.values[keep]

    def _kernel(self, dense_np, isa: str | None = None):
        return _ext.call(
            _ext.core.bsr_spmm,
            _ext.to_numpy(widen(self.block_ptr)),
            self.block_col.numpy(),
            _ext.to_numpy(self.values),
            dense_np,
            self.shape[0],
            self.shape[1],
            isa,
        )
