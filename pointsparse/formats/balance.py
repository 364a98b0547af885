"""Load-balance-aware pruning (ESE, Han et al., 2017).

Rows of a weight matrix are interleaved over P processing elements as in EIE
(row r -> PE r % P). Plain magnitude pruning leaves PEs with unequal nonzero
counts, and the slowest PE sets the layer's time. ``LoadBalancedUnstructured``
prunes by magnitude *within each PE* so that every PE keeps the same count.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.nn.utils import prune as torch_prune

from ..prune.adapters import check_maskable
from ..prune.amount import count_to_prune, validate_amount
from ..tensor import as_int, positive_int
from ._base import check_data


def _rows_view(t: torch.Tensor, row_dim: int, name: str) -> torch.Tensor:
    """``t`` (named ``name``: a strided tensor with values) as a (rows, cols)
    matrix whose rows run along ``row_dim``."""
    check_data(t, name)  # (a meta or sparse-layout tensor was torch's bare error deep inside)
    if t.dim() == 0:
        raise ValueError("load-balanced pruning needs a tensor with at least one dimension")
    row_dim = as_int(row_dim, "row_dim")  # (a float or a bool was torch's bare movedim error)
    if not -t.dim() <= row_dim < t.dim():
        raise ValueError(f"row_dim {row_dim} is out of range for a {t.dim()}-D tensor")
    rows = t.movedim(row_dim, 0)
    return rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))  # (-1 is ambiguous without rows)


def check_pe(num_pe) -> int:
    """``num_pe`` as a positive int (numpy integers too; not bool or float)."""
    return positive_int(num_pe, "num_pe")


def pe_nnz(mask_or_weight: torch.Tensor, num_pe: int, row_dim: int = 0) -> torch.Tensor:
    """Nonzeros held by each PE (int64 ``(num_pe,)``)."""
    num_pe = check_pe(num_pe)
    rows = (_rows_view(mask_or_weight, row_dim, "mask_or_weight") != 0).sum(1).to(torch.int64).cpu()
    pe = torch.arange(rows.numel()) % num_pe
    return torch.zeros(num_pe, dtype=torch.int64).index_add_(0, pe, rows)


def imbalance(mask_or_weight: torch.Tensor, num_pe: int, row_dim: int = 0) -> float:
    """max PE nonzeros / mean PE nonzeros (1.0 = perfectly balanced; 1.0 for
    an all-zero tensor). A module's time on P PEs is proportional to the max,
    its work to the mean: the ratio is the slowdown due to imbalance."""
    counts = pe_nnz(mask_or_weight, num_pe, row_dim).to(torch.float64)
    mean = float(counts.mean())
    return 1.0 if mean == 0 else float(counts.max()) / mean


class LoadBalancedUnstructured(torch_prune.BasePruningMethod):
    """Magnitude pruning with equal nonzero counts per PE.

    ``amount``: a fraction in [0, 1] or an absolute count of parameters to
    prune (as ``l1_unstructured``). With ``keep = numel - round(amount *
    numel)`` (counted over the whole tensor), every PE keeps ``keep //
    num_pe`` of its largest-magnitude unmasked entries (never more than the
    fewest any PE has available), so up to num_pe - 1 more entries than asked
    may be pruned. Masks never un-prune.

    ``PRUNING_TYPE`` is "global", not "unstructured": for unstructured methods
    torch's ``PruningContainer`` passes only the flattened surviving entries to
    ``compute_mask``, which would lose the row -> PE assignment. As "global"
    the method sees the whole tensor and its current mask; ``amount`` then
    counts over the whole tensor (already pruned entries included) when
    pruning is repeated."""

    PRUNING_TYPE = "global"

    def __init__(self, amount, num_pe: int, row_dim: int = 0) -> None:
        validate_amount(amount)
        self.amount = amount
        self.num_pe = check_pe(num_pe)
        self.row_dim = as_int(row_dim, "row_dim")  # (the PE row dimension)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        to_prune = count_to_prune(self.amount, t.nelement(), "entries")
        keep_total = t.nelement() - to_prune
        rows_t = _rows_view(t, self.row_dim, "the tensor to prune")
        rows_m = _rows_view(default_mask, self.row_dim, "the tensor's mask")
        if self.num_pe > max(1, rows_t.shape[0]):
            raise ValueError(f"num_pe must be at most the {rows_t.shape[0]} rows along row_dim {self.row_dim} "
                             f"(a PE holds whole rows); got {self.num_pe}")
        score = rows_t.detach().abs().to(torch.float64).nan_to_num(nan=float("inf"))
        score = torch.where(rows_m != 0, score, torch.full_like(score, -1.0))
        pe_of_row = torch.arange(rows_t.shape[0], device=t.device) % self.num_pe
        available = []
        for p in range(self.num_pe):
            available.append(int((rows_m[pe_of_row == p] != 0).sum()))
        keep_pe = min([keep_total // self.num_pe] + available)
        new = torch.zeros_like(rows_m)
        for p in range(self.num_pe):
            rows = (pe_of_row == p).nonzero(as_tuple=True)[0]
            if keep_pe == 0 or rows.numel() == 0:
                continue
            flat = score[rows].reshape(-1)
            top = torch.topk(flat, keep_pe).indices
            block = torch.zeros_like(flat, dtype=new.dtype)
            block[top] = 1
            new[rows] = block.reshape(rows.numel(), -1)
        shape = list(t.shape)
        moved = [shape[self.row_dim % t.dim()]] + [s for i, s in enumerate(shape)
                                                    if i != self.row_dim % t.dim()]
        mask = new.reshape(moved).movedim(0, self.row_dim)
        return (mask * default_mask).to(default_mask.dtype)

    @classmethod
    def apply(cls, module, name, amount, num_pe, row_dim=0, importance_scores=None):
        return super().apply(module, name, amount=amount, num_pe=num_pe, row_dim=row_dim,
                             importance_scores=importance_scores)


def default_row_dim(module: torch.nn.Module) -> int:
    """The PE row dimension of a module's weight: its output channels, from
    the layer's adapter (:mod:`pointsparse.prune.adapters`: Linear and torch
    convs dim 0, a pointsparse Conv3d weight (K, C_in, C_out) dim 2, a
    registered type its own); 0 for a module without an adapter."""
    from ..prune import adapters  # noqa: PLC0415 - prune and formats are siblings

    return adapters.out_channel_dim(module) if adapters.is_layer(module) else 0


def load_balanced_unstructured(module: torch.nn.Module, name: str, amount, num_pe: int,
                               row_dim: int | None = None, importance_scores=None):
    """Prune ``module.name`` so that each of ``num_pe`` row-interleaved PEs
    keeps the same number of nonzeros (function form of
    :class:`LoadBalancedUnstructured`); returns the module."""
    if not isinstance(amount, numbers.Real) or isinstance(amount, bool):
        raise TypeError(f"amount must be a float fraction or an int count; got {amount!r}")
    check_maskable(module, name)
    if not isinstance(getattr(module, name, None), torch.Tensor):
        raise ValueError(f"name must name a tensor of the {type(module).__name__}; got {name!r}")
    check_data(getattr(module, name), f"{type(module).__name__}.{name}")
    if row_dim is None:
        row_dim = default_row_dim(module)
    LoadBalancedUnstructured.apply(module, name, amount, num_pe, row_dim,
                                   importance_scores=importance_scores)
    return module
