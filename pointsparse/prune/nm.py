"""N:M fine-grained structured sparsity along the reduction (input-channel)
axis: in every run of M consecutive input channels (for a fixed output
channel and kernel position) at most N weights survive, the N of largest
importance. With N=2, M=4 this is the layout sparse tensor cores execute
(the GEMM's reduction dimension is the input-channel axis of a Linear, of a
dense conv's im2col matrix, and of each offset matrix ``W[k]`` of a sparse
conv ``(K, C_in, C_out)``)."""

from __future__ import annotations

import torch

from ..tensor import as_int
from ._copyable import CopyableMethod
from .adapters import WeightLayout, check_layout, dense_layout, layout_of
from .structured import _used_kernel_positions, check_region, refuse_nan


def validate_nm(n, m) -> tuple[int, int]:
    """``(n, m)`` as Python ints (:func:`pointsparse.tensor.as_int`: numpy and
    0-d tensor integers too), ``1 <= n <= m``."""
    n, m = as_int(n, "n", 1), as_int(m, "m", 1)
    if not n <= m:
        raise ValueError(f"n:m sparsity needs 1 <= n <= m; got n={n}, m={m}")
    return n, m


class NMStructured(CopyableMethod):
    """Keep the ``n`` largest of every ``m`` consecutive input channels.

    Entries already pruned by an earlier mask count as the weakest (they are
    never revived), so a group that had fewer than ``n`` survivors keeps only
    those. The input-channel count must be a multiple of ``m``. ``region``:
    the kernel positions that are weights, a bool ``(K,)`` (None: all;
    :meth:`apply` reads a ``kernel_region`` conv's): the entries at the
    others keep the mask they had."""

    PRUNING_TYPE = "global"

    def __init__(self, n=2, m=4, layout: WeightLayout | None = None, region=None) -> None:
        self.n, self.m = validate_nm(n, m)
        check_layout(layout)
        check_region(region)
        self.layout = layout
        self.region = region

    def compute_mask(self, t, default_mask):
        layout = self.layout if self.layout is not None else dense_layout(t.dim())
        layout.check(t, "the tensor to prune")
        channels = t.shape[layout.in_axis]
        if channels % self.m:
            raise ValueError(
                f"{self.n}:{self.m} sparsity needs the input-channel count (axis {layout.in_axis}) "
                f"to be a multiple of m={self.m}; got {channels} (shape {tuple(t.shape)})"
            )
        live = default_mask != 0
        # Pruned entries score -1, below every |score| >= 0.
        scores = torch.where(live, t.detach().abs().to(torch.float64), torch.full_like(t, -1, dtype=torch.float64))
        oik = layout.to_oik(scores)
        out, inp, kernel = oik.shape
        region = getattr(self, "region", None)  # (methods pickled before it existed have none)
        if region is not None:
            check_region(region, kernel)
        refuse_nan(oik if region is None else oik[:, :, region.to(oik.device)])  # (the weights' scores)
        grouped = oik.reshape(out, inp // self.m, self.m, kernel)
        keep = torch.zeros_like(grouped, dtype=torch.bool)
        keep.scatter_(2, torch.topk(grouped, self.n, dim=2).indices, True)
        keep = keep.reshape(out, inp, kernel)
        if region is not None:
            keep = keep | ~region.to(keep.device)
        keep = layout.from_oik(keep, t.shape)
        return default_mask.clone(memory_format=torch.contiguous_format) * keep.to(default_mask.dtype)

    @classmethod
    def apply(cls, module, name, n=2, m=4, layout=None, importance_scores=None):  # type: ignore[override]
        layout = layout if layout is not None else layout_of(module, name)
        region = _used_kernel_positions(module, name, layout)
        return super().apply(module, name, n=n, m=m, layout=layout, region=region,
                             importance_scores=importance_scores)


def nm_structured(module, name, n=2, m=4, layout=None, importance_scores=None):
    """Apply ``n:m`` sparsity along the input channels of ``module.name``
    (see :class:`NMStructured`; a ``kernel_region`` conv's inside its
    region). Returns ``module``."""
    NMStructured.apply(module, name, n=n, m=m, layout=layout, importance_scores=importance_scores)
    return module


def is_nm_sparse(t: torch.Tensor, n: int, m: int, layout: WeightLayout | None = None) -> bool:
    """True when every run of ``m`` input channels of ``t`` has <= ``n`` nonzeros."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor (a weight); got {type(t).__name__}")
    check_layout(layout)
    n, m = validate_nm(n, m)
    layout = layout if layout is not None else dense_layout(t.dim())
    layout.check(t, "t")
    oik = layout.to_oik(t)
    out, inp, kernel = oik.shape
    if inp % m:
        return False
    counts = (oik.reshape(out, inp // m, m, kernel) != 0).sum(dim=2)
    return bool((counts <= n).all())
