"""What every sparse weight format shares: input checks, the matmul plumbing
(C++ kernel on CPU float32/float64, a pure-torch path elsewhere with the same
result), construction from a pruned module, and storage accounting."""

from __future__ import annotations

import torch

from .. import _ext
from ._storage import array_nbytes

_KERNEL_DTYPES = _ext.FLOAT_DTYPES


def check_data(tensor, name: str) -> None:
    """A torch.Tensor with data the formats can read: strided (not a torch
    sparse layout), on a real device (not meta); any device otherwise (its
    data is copied to the CPU)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {tensor.layout} "
                        "(convert it with .to_dense())")
    if tensor.device.type == "meta":
        raise TypeError(f"{name} is a meta tensor (a shape without data); give a tensor with values")


def check_matrix(tensor, name: str = "tensor") -> torch.Tensor:
    """A 2-D floating tensor, detached, on the CPU, contiguous."""
    check_data(tensor, name)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, cols); got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor; got {tensor.dtype}")
    return tensor.detach().to("cpu").contiguous()


def module_weight(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The effective weight of a (possibly pruned) module: ``name_orig *
    name_mask`` when torch-style pruning is attached, else ``name``."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    orig = getattr(module, name + "_orig", None)
    mask = getattr(module, name + "_mask", None)
    if isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor):
        check_data(orig, f"{type(module).__name__}.{name}_orig")
        check_data(mask, f"{type(module).__name__}.{name}_mask")
        return (orig * mask).detach()
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{type(module).__name__} has no tensor attribute {name!r}")
    check_data(weight, f"{type(module).__name__}.{name}")
    return weight.detach()


def matrix_of_module(module: torch.nn.Module, name: str = "weight") -> torch.Tensor:
    """The (M, K) matrix a module multiplies with: a Linear's weight (out, in);
    other 2-D weights as they are. Sparse Conv3d weights (K_offsets, C_in,
    C_out) have one matrix per offset: use ``compress`` for those."""
    weight = module_weight(module, name)
    if weight.dim() != 2:
        raise ValueError(
            f"{type(module).__name__}.{name} has shape {tuple(weight.shape)}; from_module takes "
            "2-D weights (Linear: (out, in)); use pointsparse.formats.compress for convolutions"
        )
    return weight


def torch_spmm(rows, cols, values, dense, M: int) -> torch.Tensor:
    """Pure-torch ``S @ dense`` from coordinate triplets, on dense's device."""
    device = dense.device
    rows = rows.to(device)
    cols = cols.to(device)
    values = values.to(device, dense.dtype)
    out = torch.zeros(M, dense.shape[1], dtype=dense.dtype, device=device)
    # Chunks keep the (entries, N) temporary bounded.
    step = max(1, (1 << 22) // max(1, dense.shape[1]))
    for start in range(0, rows.numel(), step):
        sl = slice(start, start + step)
        out.index_add_(0, rows[sl], values[sl, None] * dense[cols[sl]])
    return out


class SparseFormat:
    """Base of every format. Subclasses set ``shape`` and ``dtype``, list their
    stored arrays in ``arrays()``, and implement ``from_dense``, ``to_dense``,
    ``_triplets`` (row, col, value of every stored entry, for the torch path)
    and ``_kernel`` (the C++ path)."""

    shape: tuple
    dtype: torch.dtype

    # -- construction ---------------------------------------------------
    @classmethod
    def from_dense(cls, tensor, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_module(cls, module: torch.nn.Module, name: str = "weight", **kwargs):
        """The format of a module's effective (masked) weight; a Linear gives
        its (out, in) matrix."""
        return cls.from_dense(matrix_of_module(module, name), **kwargs)

    # -- storage ----------------------------------------------------------
    def arrays(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def nbytes(self) -> int:
        """Exact storage: values plus every index array as stored (narrowest
        unsigned width; packed fields rounded up to whole bytes per array)."""
        return sum(array_nbytes(t) for t in self.arrays().values())

    def dense_nbytes(self) -> int:
        rows, cols = self.shape[0], self.shape[1]
        return rows * cols * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nnz(self) -> int:
        """Nonzero values held (explicit zeros stored as padding not counted)."""
        return int((self.to_dense() != 0).sum())

    # -- product ----------------------------------------------------------
    def matmul(self, dense: torch.Tensor) -> torch.Tensor:
        """``self @ dense`` for dense of shape (K, N) or (K,)."""
        if not isinstance(dense, torch.Tensor):
            raise TypeError(f"dense must be a torch.Tensor; got {type(dense).__name__}")
        M, K = self.shape
        vector = dense.dim() == 1
        if dense.dim() not in (1, 2) or dense.shape[0] != K:
            raise ValueError(
                f"dense must be ({K}, N) or ({K},) to multiply a {M} x {K} {type(self).__name__}; "
                f"got shape {tuple(dense.shape)}"
            )
        if dense.dtype != self.dtype:
            raise TypeError(f"dense must have dtype {self.dtype} like the weight; got {dense.dtype}")
        dense2 = dense[:, None] if vector else dense
        if _ext.serves(dense2, dtypes=_KERNEL_DTYPES):
            out = self._kernel(_ext.to_numpy(dense2.detach()))
            out = _ext.to_tensor(out)
        else:
            rows, cols, values = self._triplets()
            out = torch_spmm(rows, cols, values, dense2.detach(), M)
        return out[:, 0] if vector else out

    __matmul__ = matmul

    def _kernel(self, dense_np):  # pragma: no cover - abstract
        raise NotImplementedError

    def _triplets(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"nbytes={self.nbytes()}, dense_nbytes={self.dense_nbytes()})"
        )
