"""Sparse weight formats and sparse-weight x dense-activation products.

Each format (``COO, CSR, CSC, BSR, NM, EIE, FKW``) has ``from_dense(tensor,
...)``, ``from_module(module, name="weight", ...)`` (the effective masked
weight of a pruned module), ``to_dense()``, ``nbytes()`` (exact storage, each
index array in its narrowest unsigned width, packed sub-byte fields rounded up
per array) and ``matmul(dense)`` = ``self @ dense``: the C++/OpenMP kernels on
CPU float32/float64, pure torch elsewhere.

``compress(module, format=...)`` turns a pruned ``torch.nn.Linear`` or
``pointsparse.nn.Conv3d`` (or every one inside a model) into an inference
module holding that format. ``LoadBalancedUnstructured`` /
``load_balanced_unstructured`` prune with equal nonzeros per processing
element (ESE); ``imbalance`` measures the spread."""

from __future__ import annotations

import copy

import torch

from .. import _ext
from ._base import SparseFormat, module_weight
from .balance import LoadBalancedUnstructured, imbalance, load_balanced_unstructured, pe_nnz
from .bsr import BSR
from .csr import COO, CSC, CSR
from .eie import EIE
from .fkw import FKW
from .modules import SparseConv3d, SparseLinear
from .nm import NM

FORMATS = {"coo": COO, "csr": CSR, "csc": CSC, "bsr": BSR, "nm": NM, "eie": EIE, "fkw": FKW}


def spmm_isa() -> str:
    """Instruction set of the SpMM kernels on this CPU: 'avx512', 'avx2' or 'generic' (the
    widest build that runs here; conv uses the same)."""
    return _ext.core.spmm_isa()


def _format_class(format):
    if isinstance(format, type) and issubclass(format, SparseFormat):
        return format
    if isinstance(format, str) and format.lower() in FORMATS:
        return FORMATS[format.lower()]
    raise ValueError(f"format must be one of {sorted(FORMATS)} (or a format class); got {format!r}")


def compress(module: torch.nn.Module, format="csr", **kwargs) -> torch.nn.Module:
    """An inference copy of ``module`` whose weights live in ``format``.

    * ``torch.nn.Linear`` -> :class:`SparseLinear` (weight (out, in)).
    * ``pointsparse.nn.Conv3d`` -> :class:`SparseConv3d`: per kernel offset
      ``W[o].T`` (C_out, C_in) in the format; FKW holds the whole
      (C_out, C_in, K) weight.
    * any other module: a deep copy with every Linear / Conv3d inside replaced.

    ``kwargs`` go to the format's ``from_dense`` (``blocksize`` for BSR, ``n,
    m, prune`` for NM, ``num_pe`` for EIE). The effective weight of a pruned
    module (``weight_orig * weight_mask``) is used; the module is not changed."""
    from ..nn import Conv3d

    cls = _format_class(format)
    if isinstance(module, torch.nn.Linear):
        weight = module_weight(module, "weight")
        return SparseLinear(cls.from_dense(weight, **kwargs), module.bias)
    if isinstance(module, Conv3d):
        if cls is FKW:
            offsets = FKW.from_module(module, **kwargs)
        else:
            weight = module_weight(module, "weight")  # (K, C_in, C_out)
            offsets = [cls.from_dense(weight[o].t(), **kwargs) for o in range(weight.shape[0])]
        return SparseConv3d(offsets, module.kernel_size, module.stride, module.dilation,
                            module.transposed, module.in_channels, module.out_channels,
                            module.bias)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    # Pruned weights are computed (non-leaf) tensors that deepcopy refuses:
    # copy them as detached tensors; the forward pre-hooks recompute them.
    memo = {}
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    result = copy.deepcopy(module, memo)
    _replace_children(result, cls, kwargs, Conv3d)
    return result


def _replace_children(parent, cls, kwargs, conv_cls):
    for name, child in parent.named_children():
        if isinstance(child, (torch.nn.Linear, conv_cls)):
            setattr(parent, name, compress(child, cls, **kwargs))
        else:
            _replace_children(child, cls, kwargs, conv_cls)


__all__ = [
    "BSR", "COO", "CSC", "CSR", "EIE", "FKW", "NM", "FORMATS", "SparseFormat",
    "SparseLinear", "SparseConv3d", "compress", "spmm_isa",
    "LoadBalancedUnstructured", "load_balanced_unstructured", "imbalance", "pe_nnz",
]
