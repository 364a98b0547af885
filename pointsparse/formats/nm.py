"""N:M structured sparsity: at most n nonzeros in every group of m
consecutive columns of a row (2:4 is the Ampere pattern)."""

from __future__ import annotations

import torch

from .. import _ext
from ..tensor import as_int
from ._base import SparseFormat, check_below, check_matrix, check_shape, index_array, value_array
from ._storage import bits_for, pack_bits, unpack_bits


def kept_per_row(K: int, n: int, m: int) -> int:
    """Values stored per row: n per full group, min(n, rest) for a last
    partial group."""
    return (K // m) * n + min(n, K % m)


class NM(SparseFormat):
    """An (M, K) matrix with at most n nonzeros per group of m columns
    (1 <= n <= m <= 16). Every group stores exactly n values (explicit zeros
    where a group has fewer nonzeros) and their positions inside the group,
    ascending; a last partial group of r < m columns stores min(n, r).

    Arrays: ``values`` (M, L), L = (K // m) * n + min(n, K % m);
    ``positions``: M * L fields of ceil(log2 m) bits (2 for 2:4), packed.
    ``nbytes = M * L * itemsize + ceil(M * L * ceil(log2 m) / 8)``;
    2:4 in float32: 2 values + 2 x 2 bits = 8.5 bytes per group of 4 (dense:
    16)."""

    def __init__(self, values, positions, n: int, m: int, shape, *, _trusted: bool = False):
        self.shape = check_shape(shape)
        self.n, self.m = _check_nm(n, m)
        self.bits = bits_for(self.m)
        self.values = value_array(values, "values", 2)
        self.dtype = self.values.dtype
        positions = index_array(positions, "positions")
        check_below(positions, "positions", 256, "values a byte holds")
        self.positions = positions.to(torch.uint8).contiguous()
        if not _trusted:  # from_dense builds valid arrays: its checks would only cost time
            self.validate()

    def _validate(self) -> None:
        M, K = check_shape(self.shape)
        n, m = _check_nm(getattr(self, "n", None), getattr(self, "m", None))
        if getattr(self, "bits", None) != bits_for(m):
            raise ValueError(f"NM.bits must be ceil(log2 m) = {bits_for(m)}; got {getattr(self, 'bits', None)!r}")
        values = self._stored("values", "values", 2)
        self._check_dtype(values)
        positions = self._stored("positions", "bytes", 1)
        L = kept_per_row(K, n, m)
        if tuple(values.shape) != (M, L):
            raise ValueError(f"values must be (M, L) = ({M}, {L}); got {tuple(values.shape)}")
        if positions.numel() != (values.numel() * self.bits + 7) // 8:
            raise ValueError(f"positions must hold the M * L = {values.numel()} packed {self.bits}-bit fields in "
                             f"{(values.numel() * self.bits + 7) // 8} bytes; got {positions.numel()}")
        if not values.numel():
            return
        pos = unpack_bits(positions, self.bits, M * L).reshape(M, L)
        cols = (torch.arange(L) // n * m)[None, :] + pos
        bad = ((pos >= m) | (cols >= K)).nonzero()
        if bad.numel():
            row, q = bad[0].tolist()
            raise ValueError(f"positions entry ({row}, {q}) = {int(pos[row, q])} points outside its group "
                             f"(m = {m}, K = {K})")
        same = (torch.arange(1, L) // n) == (torch.arange(L - 1) // n)
        down = ((pos.diff(dim=1) <= 0) & same).nonzero()
        if down.numel():
            row, q = down[0].tolist()
            raise ValueError(f"positions must be strictly increasing inside each group (no repeats); row {row}, "
                             f"entry {q + 1} ({int(pos[row, q + 1])}) follows {int(pos[row, q])}")

    @classmethod
    def from_dense(cls, tensor, n: int = 2, m: int = 4, prune: bool = False) -> "NM":
        """``prune=False``: the matrix must already be n:m sparse (ValueError
        otherwise). ``prune=True``: keep the n largest magnitudes per group."""
        n, m = _check_nm(n, m)
        if not isinstance(prune, bool):
            raise TypeError(f"prune must be a bool; got {prune!r}")
        dense = check_matrix(tensor)
        M, K = dense.shape
        groups = -(-K // m)
        padded = dense.new_zeros(M, groups * m)
        padded[:, :K] = dense
        padded = padded.reshape(M, groups, m)
        nonzero = (padded != 0).sum(2)
        if not prune and bool((nonzero > n).any()):
            row, group = (nonzero > n).nonzero()[0].tolist()
            raise ValueError(
                f"tensor is not {n}:{m} sparse: row {row}, columns {group * m}..{group * m + m - 1} "
                f"hold {int(nonzero[row, group])} nonzeros; prune it first (prune.nm_structured), or pass prune=True, "
                "which keeps the n largest magnitudes per group: the weight, and so the outputs, change")
        score = padded.abs().to(torch.float64)
        score[padded != 0] += 1.0  # nonzeros first, even the tiny ones (and NaN-free order)
        score = score.nan_to_num(nan=float("inf"))
        if K % m:
            score[:, -1, K % m:] = -1.0  # padding columns are never chosen
        keep = min(n, m)
        pos = score.topk(keep, dim=2).indices.sort(dim=2).values  # (M, groups, n)
        values = padded.gather(2, pos)
        if K % m and K % m < n:  # last partial group keeps min(n, r) values
            r = K % m
            full = groups - 1
            values = torch.cat([values[:, :full].reshape(M, full * n), values[:, full, :r]], 1)
            pos = torch.cat([pos[:, :full].reshape(M, full * n), pos[:, full, :r]], 1)
        L = kept_per_row(K, n, m)
        values = values.reshape(M, L)
        pos = pos.reshape(M, L)
        return cls(values, pack_bits(pos, bits_for(m)), n, m, (M, K), _trusted=True)

    def arrays(self) -> dict:
        return {"values": self.values, "positions": self.positions}

    def _columns(self) -> torch.Tensor:
        M, K = self.shape
        L = self.values.shape[1]
        pos = unpack_bits(self.positions, self.bits, M * L).reshape(M, L)
        return (torch.arange(L) // self.n * self.m)[None, :] + pos

    def _triplets(self):
        M, L = self.values.shape
        rows = torch.arange(M)[:, None].expand(M, L).reshape(-1)
        return rows, self._columns().reshape(-1), self.values.reshape(-1)

    def to_dense(self) -> torch.Tensor:
        out = self._zeros()
        if self.values.numel():
            out.scatter_(1, self._columns(), self.values)
        return out

    def _kernel(self, dense_np, isa: str | None = None):
        return _ext.call(
            _ext.core.nm_spmm,
            self.positions.numpy(),
            _ext.to_numpy(self.values),
            self.bits,
            self.n,
            self.m,
            dense_np,
            self.shape[1],
            isa,
        )


def _check_nm(n, m):
    """``n, m`` as ints (:func:`pointsparse.tensor.as_int`: numpy and 0-d
    tensor integers too; not bool or float) with 1 <= n <= m <= 16."""
    n, m = as_int(n, "n", 1), as_int(m, "m", 1)
    if not n <= m <= 16:
        raise ValueError(f"n:m must satisfy 1 <= n <= m <= 16; got {n}:{m}")
    return n, m
