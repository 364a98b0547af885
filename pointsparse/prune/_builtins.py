"""The built-in adapters (see :mod:`.adapters`): torch Linear, ConvNd,
ConvTransposeNd, BatchNorm and InstanceNorm, and ``pointsparse.nn.Conv3d``
and ``InstanceNorm``."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .adapters import SPARSE_CONV, LayerAdapter, WeightLayout, dense_layout, positions_flops, raw, register

_BIAS = {"bias": {"out": 0}}
_NORM_AXES = {"weight": {"out": 0}, "bias": {"out": 0}, "running_mean": {"out": 0}, "running_var": {"out": 0}}


# ------------------------------------------------------------------ torch layers
def _linear_set(m, role, n) -> None:
    setattr(m, "out_features" if role == "out" else "in_features", n)


def _linear_flops(m, weight, inputs, output, pair_counts):
    # rows: the input's leading dims ((..., in_features); numel // in_features divided by 0 for a Linear(0, out))
    return positions_flops(math.prod(inputs[0].shape[:-1]), weight)


def _linear_like(m, c_in, c_out) -> nn.Module:
    return nn.Linear(c_in, c_out, bias=m.bias is not None)


def _linear_columns(m, x, y):
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def _torch_set_from_2d(m, w2d) -> None:
    """torch weights are ``(C_out, C_in, *k)``; unfold orders fan_in as ``(C_in, *k)``."""
    with torch.no_grad():
        m.weight.copy_(w2d.t().reshape(m.weight.shape))


def _conv_supported(m) -> str | None:
    return None if m.groups == 1 else f"grouped convolution (groups={m.groups})"


def _conv_per_site(m) -> bool:
    return all(k == 1 for k in m.kernel_size) and all(p == 0 for p in m.padding)


def _conv_like(m, c_in, c_out) -> nn.Module:
    return type(m)(c_in, c_out, m.kernel_size, m.stride, m.padding, m.dilation, bias=m.bias is not None,
                   padding_mode=m.padding_mode)


def _conv2d_columns(m, x, y):
    cols = nn.functional.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def _conv1d_columns(m, x, y):
    cols = nn.functional.unfold(x.unsqueeze(-1), (m.kernel_size[0], 1), (m.dilation[0], 1), (m.padding[0], 0),
                                (m.stride[0], 1))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), y.permute(0, 2, 1).reshape(-1, y.shape[1])


def _transposed_flops(m, weight, inputs, output, pair_counts):
    spatial = inputs[0].shape[-(weight.dim() - 2):]
    batch = inputs[0].numel() // (weight.shape[0] * math.prod(spatial))
    return positions_flops(batch * math.prod(spatial), weight)


def _norm_set(m, role, n) -> None:
    m.num_features = n


def _norm_like(m, c_in, c_out) -> nn.Module:
    return type(m)(c_out, eps=m.eps, momentum=m.momentum, affine=m.affine)


def _instance_norm_like(m, c_in, c_out) -> nn.Module:
    return type(m)(c_out, eps=m.eps, momentum=m.momentum, affine=m.affine,
                   track_running_stats=m.track_running_stats)


def _sparse_instance_norm_like(m, c_in, c_out) -> nn.Module:
    return type(m)(c_out, eps=m.eps, affine=m.affine)


# ------------------------------------------------------------------ sparse conv
def _sparse_kernel_map(m, x):
    from ..kmap import get_kmap  # noqa: PLC0415 - the kmap layer sits above this package

    return get_kmap(x, m.kernel_size, m.stride, m.dilation, transposed=bool(getattr(m, "transposed", False)))


def _sparse_flops(m, weight, inputs, output, pair_counts):
    """``2 * sum_o pairs(o) * nnz(W[o])``, the dense count, and what the call
    executes: on the engine's kernels what they run
    (:func:`pointsparse.nn.functional.engine_cost`), on the pure-torch path
    (``backend("torch")``, another device) what
    its sum runs (``execution`` "torch": every pair of every offset, an
    all-zero one or one outside the region too; see
    :func:`pointsparse.nn.reference.torch_flops`), both as
    :func:`pointsparse.nn.functional.engine_cost` says for the call (the
    report's forward runs without gradients); without the call's input
    (``pairs`` alone) what an inference call on the CPU runs (the output
    sites that a product off the CPU counts are unknown). Offsets outside a
    ``kernel_region`` are no weights of the layer (the conv never runs them
    on the engine): they count in neither implied nor dense FLOPs, whatever
    values they hold."""
    from ..nn.functional import engine_cost, region_of  # noqa: PLC0415 - nn sits above this package

    region = getattr(m, "kernel_region", None)
    keep = region_of(m.kernel_size, region)
    counts = pair_counts if keep is None else pair_counts * keep.to(pair_counts.dtype)
    per_offset = (weight.detach() != 0).reshape(weight.shape[0], -1).sum(dim=1).cpu()
    flops, dense = 2 * int((counts * per_offset).sum()), 2 * int(counts.sum()) * weight[0].numel()
    if inputs is not None and output is not None:
        executed, execution = engine_cost(weight, pair_counts, m.kernel_size, region, num_out=len(output.feats))
    else:
        executed, execution = engine_cost(weight.detach().cpu(), pair_counts, m.kernel_size, region)
    return flops, dense, executed, execution


def _sparse_region(m) -> torch.Tensor | None:
    """The offsets the conv runs, a bool ``(K,)``: its ``kernel_region`` (None: all)."""
    from ..nn.functional import region_of  # noqa: PLC0415 - nn sits above this package

    return region_of(m.kernel_size, getattr(m, "kernel_region", None))


def _sparse_per_site(m) -> bool:
    """Linear per site: the conv runs one offset, the zero one, at stride 1
    (not transposed), so every output sits on its own input and nothing
    else (a k1 conv, a ``kernel_region`` of the centre offset). A strided k1
    conv is not: its outputs that sit on no input get no pair."""
    from ..kmap import kernel_offsets  # noqa: PLC0415 - the kmap layer sits above this package

    if m.transposed or any(s != 1 for s in m.stride):
        return False
    keep = _sparse_region(m)
    offsets = kernel_offsets(m.kernel_size)
    run = offsets if keep is None else offsets[keep]
    return run.shape[0] == 1 and not bool(run.any())


def _sparse_used_weights(m, weight):
    """The values of the offsets the conv runs: those of its
    ``kernel_region`` (every offset without one), ``(K_region, C_in, C_out)``."""
    keep = _sparse_region(m)
    return weight if keep is None else weight[keep.to(weight.device)]


def _sparse_like(m, c_in, c_out) -> nn.Module:
    """A fresh conv with every setting of ``m`` (its ``kernel_region`` and
    fused ReLU too) but the widths."""
    from ..nn import Conv3d  # noqa: PLC0415

    like = Conv3d(c_in, c_out, m.kernel_size, m.stride, m.dilation, m.bias is not None, m.transposed,
                  kernel_region=getattr(m, "kernel_region", None))
    like.relu = bool(getattr(m, "relu", False))
    return like


def _sparse_columns(m, x, y):
    """im2col rows ``(M, K * C_in)`` of the map the layer runs on ``x``, of
    the offsets it runs (``K`` those of its ``kernel_region``)."""
    from ..nn.reference import im2col  # noqa: PLC0415

    kmap = _sparse_kernel_map(m, x)
    cols, keep = im2col(x.feats, kmap), _sparse_region(m)
    if keep is not None:
        cols = cols[:, keep.to(cols.device)]
    return cols.reshape(kmap.num_out, -1), y.feats


def _sparse_set_from_2d(m, w2d) -> None:
    """The weight of the offsets the conv runs from ``(K * C_in, C_out)``
    (:func:`_sparse_columns`' order); the others are left as they are."""
    keep = _sparse_region(m)
    with torch.no_grad():
        if keep is None:
            m.weight.copy_(w2d.reshape(m.weight.shape))
        else:
            m.weight[keep.to(m.weight.device)] = w2d.reshape(-1, *m.weight.shape[1:]).to(m.weight.dtype)


def _register() -> None:
    conv = LayerAdapter(axes=lambda m: {"weight": {"out": 0, "in": 1}, **_BIAS}, per_site=_conv_per_site,
                        supported=_conv_supported, layout_fn=lambda m: dense_layout(raw(m, "weight").dim()))
    register(nn.modules.conv._ConvNd, conv)
    register(nn.Conv1d, dataclasses.replace(conv, like=_conv_like, columns=_conv1d_columns,
                                            set_from_2d=_torch_set_from_2d))
    register(nn.Conv2d, dataclasses.replace(conv, like=_conv_like, columns=_conv2d_columns,
                                            set_from_2d=_torch_set_from_2d))
    register(nn.Conv3d, dataclasses.replace(conv, like=_conv_like))
    register(nn.modules.conv._ConvTransposeNd, LayerAdapter(
        axes=lambda m: {"weight": {"out": 1, "in": 0}, **_BIAS}, supported=_conv_supported,
        layout_fn=lambda m: WeightLayout(1, 0, tuple(range(2, raw(m, "weight").dim()))), flops=_transposed_flops))
    register(nn.Linear, LayerAdapter(axes=lambda m: {"weight": {"out": 0, "in": 1}, **_BIAS}, set_channels=_linear_set,
                                     per_site=lambda m: True, flops=_linear_flops, like=_linear_like,
                                     columns=_linear_columns, set_from_2d=_torch_set_from_2d, channels_last=True))
    register(nn.modules.batchnorm._BatchNorm, LayerAdapter(axes=lambda m: dict(_NORM_AXES), kind="norm",
                                                           set_channels=_norm_set, like=_norm_like))
    # (channel-wise too: a zero channel normalises to its bias, a constant, as a BatchNorm's shift)
    register(nn.modules.instancenorm._InstanceNorm, LayerAdapter(axes=lambda m: dict(_NORM_AXES), kind="norm",
                                                                 set_channels=_norm_set, like=_instance_norm_like))
    from ..nn import Conv3d, InstanceNorm  # noqa: PLC0415

    register(InstanceNorm, LayerAdapter(axes=lambda m: {"weight": {"out": 0}, "bias": {"out": 0}}, kind="norm",
                                        set_channels=_norm_set, like=_sparse_instance_norm_like))

    register(Conv3d, LayerAdapter(
        axes=lambda m: {"weight": {"out": 2, "in": 1}, **_BIAS}, layout_fn=lambda m: SPARSE_CONV,
        per_site=_sparse_per_site, kernel_map=_sparse_kernel_map,
        flops=_sparse_flops, used_weights=_sparse_used_weights, like=_sparse_like, columns=_sparse_columns,
        set_from_2d=_sparse_set_from_2d, addends=("add",)))


_register()
