"""Conv weights trained with MinkowskiEngine, TorchSparse or spconv, in
pointsparse's offset order.

MinkowskiEngine and TorchSparse store a sparse conv's weight as ``(K, C_in,
C_out)``, one matrix per kernel offset, as we do, but number the offsets
differently; spconv keeps a 5-d tensor (below). pointsparse (see
``Conv3d``) takes the offsets ``(i - (k - 1) // 2) * d`` along each axis and
numbers them ``(i_x * k_y + i_y) * k_z + i_z`` (z fastest).

* MinkowskiEngine (0.5) walks its kernel region with x fastest:
  ``(i_z * k_y + i_y) * k_x + i_x``. Along an axis of odd size its offsets
  are centred, as ours; along an axis of even size they run ``0 .. k - 1``,
  which are ours for ``k = 2`` only (``k = 4``: ``0..3`` against our
  ``-1..2``): such a kernel is refused. A kernel of volume 1 at stride 1
  is stored ``(C_in, C_out)`` (run as a matrix product). A conv of
  region_type ``HYPER_CROSS`` stores its cross's offsets only
  (``kernel_region="cross"``: put in a ``Conv3d(kernel_region="cross")``'s
  weight). Its bias is ``(1, C_out)`` (and a MinkowskiInstanceNorm's weight
  and bias ``(1, C)``): ``Conv3d`` and ``InstanceNorm`` load it as it is.
* TorchSparse (1.4, 2.0, 2.1) takes the same offsets as ours along every
  axis, numbered with x fastest where the kernel's volume is odd and z
  fastest (ours) where it is even; a kernel of volume 1 is stored ``(C_in,
  C_out)``. (1.2 numbered a kernel_size given as an int so, but one given
  as a 3-tuple z fastest whatever its volume: such a weight is in our order
  already.) Its kernel maps leave out the conv's dilation (1.x to
  2.1): a TorchSparse ``Conv3d(dilation=2)`` computes the undilated conv,
  which is ``Conv3d(k)`` here. Its strided conv whose stride is 1 or its
  kernel size along each axis (MinkUNet's and SPVCNN's ``k2 s2``) outputs
  on the inputs floored to the stride, as ours (2.0 truncates toward 0:
  the same on non-negative coordinates); one of another stride (a
  ``k3 s2``) outputs elsewhere (1.4 / 2.0: every voxel of the stride that
  an offset reaches from an input; 2.1: where spconv's would, unless its
  conv config's ``downsample_mode`` is "minkowski", which floors, as we
  do), more voxels than ours: no pointsparse conv computes it, and this
  function, given no stride, cannot refuse it.
* spconv keeps ``(C_out, k0, k1, k2, C_in)`` ("KRSC": 2.2 on, every algo),
  ``(k0, k1, k2, C_out, C_in)`` ("RSKC": 2.0, and 2.1 under ConvAlgo.Native:
  its CPU build, or a kernel of over 32 offsets) or ``(k0, k1, k2, C_in, C_out)`` ("RSCK": 1.x), the kernel
  axes those of its indices' columns (``axes``: "xyz", or OpenPCDet's
  (batch, z, y, x): "zyx"), row-major. Its 1x1 path (a kernel of volume 1:
  a SubMConv3d, or a SparseConv3d of stride 1) multiplies by the weight's
  memory read as ``(C_in, C_out)`` whatever its shape says (C_in its last
  size; RSCK: its fourth), and so does the conversion. (spconv 2.0 / 2.1
  run with SPCONV_FILTER_HWIO=1 stored RSCK but read a 1x1 kernel's memory
  as ``(C_out, C_in)``: pass such a one as ``w.reshape(C_out,
  C_in).T.reshape(1, 1, 1, C_in, C_out)``.) Which convs map: a SubMConv3d
  (odd sizes; spconv centres its offsets, ``(i - k // 2) * dilation``, as
  we do; its stride and padding are ignored, as spconv ignores them); a
  SparseConv3d whose kernel_size equals its stride, 2 or 1 along each axis,
  padding 0, dilation 1 (MinkUNet's downsampling: input ``p`` reaches output
  ``p // 2`` through offset ``p % 2``, ours); and the SparseInverseConv3d
  that shares such a one's indice_key (outputs on that conv's inputs: our
  transposed conv). Any other SparseConv3d puts its outputs where its padded
  kernel reaches, ``(p + padding - i * dilation) / stride`` (a k3 s2 p1
  conv: about twice the voxels of ours), a SparseConvTranspose3d every voxel its kernel reaches: no
  pointsparse conv computes them, and they are refused.

A weight converted here gives the conv the other library computed on the
same coordinates (the batch index first, then x, y, z), where that conv
outputs where ours does (above); checked for convs
(stride 1 and 2) and for transposed convs (stride 2); spconv's against spconv
2.3.8 (bench/spconv_weights.py). A transposed conv's
weight is numbered as the strided conv's it mirrors in both libraries
(MinkowskiEngine's transposed kernel map is the strided one's with input and
output swapped; TorchSparse's is the strided conv's map from its cache), as
here: ``out[q + o] += in[q] @ W[o]``, so it converts the same way."""

from __future__ import annotations

import math

import torch

from ..tensor import as_triple

SOURCES = ("minkowski", "torchsparse", "spconv")
SPCONV_LAYOUTS = ("KRSC", "RSKC", "RSCK")
SPCONV_CONVS = ("SubMConv3d", "SparseConv3d", "SparseInverseConv3d")
_SPCONV_DEFAULTS = {"conv": None, "layout": None, "stride": 1, "padding": 0, "dilation": 1, "axes": "xyz"}


def _cross_indices(k) -> list[int]:
    """Our offset index of each offset of MinkowskiEngine's HYPER_CROSS
    region of kernel ``k`` (odd sizes), in its weight's order: the centre,
    then along x, y and z in turn the offsets ``1..r``, then ``-r..-1``."""
    centre = [(n - 1) // 2 for n in k]
    indices = []
    for axis in (None, 0, 1, 2):
        r = 0 if axis is None else (k[axis] - 1) // 2
        for step in ([0] if axis is None else [*range(1, r + 1), *range(-r, 0)]):
            i = [c + (step if a == axis else 0) for a, c in enumerate(centre)]
            indices.append((i[0] * k[1] + i[1]) * k[2] + i[2])
    return indices


def _from_cross(weight: torch.Tensor, k, source: str, kernel_region) -> torch.Tensor:
    """:func:`weight_from` of a MinkowskiEngine HYPER_CROSS kernel."""
    if not (isinstance(kernel_region, str) and kernel_region == "cross"):
        raise ValueError(f"kernel_region must be None or 'cross' (MinkowskiEngine's HYPER_CROSS); got "
                         f"{kernel_region!r}")
    if source != "minkowski":
        raise ValueError(f"kernel_region='cross' converts MinkowskiEngine's HYPER_CROSS kernels "
                         f"(source='minkowski'); got source={source!r}")
    if any(n % 2 == 0 for n in k):
        raise ValueError(f"a HYPER_CROSS kernel has odd sizes; got kernel_size {k}")
    indices = _cross_indices(k)
    if weight.dim() == 2 and len(indices) == 1:
        weight = weight.unsqueeze(0)  # (a 1x1x1 kernel at stride 1: (C_in, C_out))
    if weight.dim() != 3:
        raise ValueError(f"weight must be (K, C_in, C_out); got shape {tuple(weight.shape)}")
    if weight.shape[0] != len(indices):
        raise ValueError(f"weight holds {weight.shape[0]} offsets but a HYPER_CROSS region of kernel_size {k} "
                         f"has {len(indices)}")
    out = weight.new_zeros(math.prod(k), *weight.shape[1:])
    # (as outside autocast, whose index_copy refuses a 16-bit dtype other than its own: "Unexpected floating
    # ScalarType in at::autocast::prioritize")
    with torch.autocast(weight.device.type, enabled=False):
        return out.index_copy(0, torch.tensor(indices, device=weight.device), weight)


def _spconv_check_conv(conv, k, stride, padding, dilation) -> None:
    """Refuses a spconv conv whose outputs or offsets no pointsparse conv has."""
    if conv == "SparseConvTranspose3d":
        raise ValueError("spconv's SparseConvTranspose3d puts an output at every voxel its kernel reaches (all "
                         "the children of each voxel): a pointsparse transposed conv outputs the finer coords of "
                         "the downsampling it mirrors, as spconv's SparseInverseConv3d does (conv="
                         "'SparseInverseConv3d' converts the same offsets), so no pointsparse conv computes it")
    if conv not in SPCONV_CONVS:
        raise ValueError(f"conv must name the spconv module the weight is from: 'SubMConv3d', 'SparseConv3d' (with "
                         "its stride, padding and dilation) or 'SparseInverseConv3d' (with those of the "
                         f"SparseConv3d whose indice_key it shares); got {conv!r}")
    if conv == "SubMConv3d":
        if any(n % 2 == 0 for n in k):
            raise ValueError(f"spconv's SubMConv3d takes odd kernel sizes; got kernel_size {k}")
        return
    if math.prod(k) == 1 and stride == (1, 1, 1) and padding == (0, 0, 0):
        return  # (spconv's 1x1 path: a matrix product on the inputs)
    if all((n, s, p) in ((1, 1, 0), (2, 2, 0)) and (n == 1 or d == 1)
           for n, s, p, d in zip(k, stride, padding, dilation)):
        return
    raise ValueError(f"spconv's {conv}(kernel_size={k}, stride={stride}, padding={padding}, dilation={dilation})"
                     f"{' (those of its SparseConv3d)' if conv == 'SparseInverseConv3d' else ''} puts its outputs "
                     "at (p + padding - i * dilation) / stride for each input p and kernel index i: a set of "
                     "voxels other than a pointsparse strided conv's (the inputs floored to the stride, offsets "
                     "centred), so no pointsparse conv computes it; only kernel_size == stride, 2 or 1 along each "
                     "axis, with padding 0 and dilation 1 maps (and a SubMConv3d)")


def _spconv_layout(weight: torch.Tensor, k, layout):
    """The layout of a 5-d spconv weight of kernel ``k`` (spconv's frame):
    ``layout`` checked against its shape, or (None) found where only one fits."""
    shape = tuple(weight.shape)
    krsc, rs = shape[1:4] == k, shape[:3] == k
    if layout is not None:
        if krsc if layout == "KRSC" else rs:
            return layout
        other = (" (its shape is that of layout='RSKC' or 'RSCK', (kx, ky, kz, ...))" if rs else
                 " (its shape is that of layout='KRSC', (C_out, kx, ky, kz, C_in))" if krsc else "")
        raise ValueError(f"weight of shape {shape} is no layout={layout!r} weight of kernel_size {k}{other}")
    if krsc and rs:
        raise ValueError(f"weight of shape {shape} fits both (C_out, kx, ky, kz, C_in) and (kx, ky, kz, ...) for "
                         f"kernel_size {k}: pass layout='KRSC' (spconv 2.2 on), 'RSKC' (spconv 2.0, 2.1 under "
                         "ConvAlgo.Native) or 'RSCK' (spconv 1.x)")
    if rs:
        raise ValueError(f"weight of shape {shape} is (kx, ky, kz, ...): pass layout='RSCK' (spconv 1.x) or 'RSKC' "
                         "(spconv 2.0 / 2.1 under ConvAlgo.Native: (kx, ky, kz, C_out, C_in)); spconv 2.2 on keeps "
                         "(C_out, kx, ky, kz, C_in), 'KRSC'")
    if not krsc:
        raise ValueError(f"weight of shape {shape} is no spconv weight of kernel_size {k}: (C_out, kx, ky, kz, "
                         "C_in) (spconv 2.2 on), or (kx, ky, kz, C_out, C_in) / (kx, ky, kz, C_in, C_out) (spconv "
                         "2.0 / 2.1, 1.x)")
    return "KRSC"


def _from_spconv(weight: torch.Tensor, k, conv, layout, stride, padding, dilation, axes) -> torch.Tensor:
    """:func:`weight_from` of a spconv weight (``k`` and the conv's
    arguments in spconv's frame, its indices' columns)."""
    if not (isinstance(axes, str) and sorted(axes) == ["x", "y", "z"]):
        raise ValueError(f"axes must be 'xyz', 'zyx' or another order of x, y, z (our axes as the columns of the "
                         f"spconv net's indices after the batch); got {axes!r}")
    if layout is not None and not (isinstance(layout, str) and layout in SPCONV_LAYOUTS):
        raise ValueError(f"layout must be one of {SPCONV_LAYOUTS} or None (found from the shape); got {layout!r}")
    stride, padding = as_triple(stride, "stride"), as_triple(padding, "padding", minimum=0)
    dilation = as_triple(dilation, "dilation")
    _spconv_check_conv(conv, k, stride, padding, dilation)
    if weight.dim() != 5:
        raise ValueError(f"spconv keeps a conv's weight 5-d ((C_out, kx, ky, kz, C_in) from spconv 2.2 on); got "
                         f"shape {tuple(weight.shape)}")
    layout = _spconv_layout(weight, k, layout)
    if math.prod(k) == 1:
        # spconv's 1x1 path: torch.mm(features, weight.view(C_in, C_out)), the memory as (C_in, C_out)
        c_in = weight.shape[3] if layout == "RSCK" else weight.shape[4]
        return weight.reshape(1, c_in, weight.numel() // c_in).clone(memory_format=torch.contiguous_format)
    grid = {"KRSC": weight.permute(1, 2, 3, 4, 0), "RSKC": weight.permute(0, 1, 2, 4, 3), "RSCK": weight}[layout]
    # kernel axis j of spconv is our axis "xyz".index(axes[j]); ours in x, y, z order, z fastest
    grid = grid.permute(*[axes.index(a) for a in "xyz"], 3, 4)
    return grid.clone(memory_format=torch.contiguous_format).reshape(math.prod(k), *grid.shape[3:])


def weight_from(weight: torch.Tensor, kernel_size=3, source: str = "minkowski", *,
                kernel_region=None, conv=None, layout=None, stride=1, padding=0, dilation=1,
                axes="xyz") -> torch.Tensor:
    """``weight`` of a MinkowskiEngine (``source="minkowski"``) or TorchSparse
    (``"torchsparse"``) conv of kernel ``kernel_size`` (int or 3-tuple, x, y,
    z), its offsets put in pointsparse's order: a ``(K, C_in, C_out)``
    tensor for :class:`Conv3d`'s ``weight`` (a new tensor; ``weight``'s
    dtype, device and autograd history). See the module docstring for each
    library's numbering (a kernel of volume 1 may be given ``(C_in,
    C_out)``, as both libraries store it). A tensor that is no such weight,
    a kernel that does not match its ``K``, or one whose offsets the other
    library places elsewhere (MinkowskiEngine's even sizes above 2) is a
    ValueError / TypeError naming the argument.

    ``kernel_region="cross"``: ``weight`` is a MinkowskiEngine conv's of
    region_type ``HYPER_CROSS`` (one matrix per offset of the cross, ``1 +
    sum(k - 1)`` of them, in its order: the centre, then along x, y, z the
    offsets ``1..r`` then ``-r..-1``); each is put at its offset of a
    ``(K, C_in, C_out)`` weight, zeros elsewhere, for a
    ``Conv3d(kernel_region="cross")``.

    ``source="spconv"``: ``weight`` is a spconv conv's (5-d), ``conv`` the
    module it is from: ``"SubMConv3d"``, ``"SparseConv3d"`` with its
    ``stride``, ``padding`` and ``dilation``, or ``"SparseInverseConv3d"``
    with those of the SparseConv3d whose indice_key it shares (spconv's
    defaults 1, 0, 1). ``kernel_size`` and these are spconv's, in the order
    of its indices' columns; ``axes`` names our axes in that order ("xyz",
    or "zyx" for OpenPCDet's (batch, z, y, x)), and the weight returned is
    for a ``Conv3d`` of kernel_size (and stride, dilation) put in our x, y,
    z order. ``layout`` is "KRSC" (spconv 2.2 on; 2.1's implicit GEMM),
    "RSKC" (2.0; 2.1 under ConvAlgo.Native) or "RSCK" (1.x); None finds it from the shape where
    only KRSC fits, and refuses a shape that fits several. The convs that
    map are those the module docstring lists (a SubMConv3d as ``Conv3d(k,
    dilation=d)``, a SparseConv3d of kernel_size == stride 2 as
    ``Conv3d(2, stride=2)``, its SparseInverseConv3d as ``Conv3d(2,
    stride=2, transposed=True)``); any other (a SparseConv3d k3 s2 p1, a
    SparseConvTranspose3d) is a ValueError saying why."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}; got {source!r}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor (K, C_in, C_out); got {type(weight).__name__}")
    k = as_triple(kernel_size, "kernel_size")
    given = {"conv": conv, "layout": layout, "stride": stride, "padding": padding, "dilation": dilation,
             "axes": axes}
    if source != "spconv":
        for name, value in given.items():
            default = _SPCONV_DEFAULTS[name]
            if isinstance(default, int) and isinstance(value, (tuple, list)) and len(value) == 3 \
                    and all(type(v) is int and v == default for v in value):
                continue  # the default written per axis, as the other libraries write a stride of 1
            if not (value is default or (type(value) is type(default) and value == default)):
                raise ValueError(f"conv, layout, stride, padding, dilation and axes describe a spconv conv "
                                 f"(source='spconv'); got {name}={value!r} with source={source!r}")
    elif kernel_region is None:
        return _from_spconv(weight, k, **given)
    if kernel_region is not None:
        return _from_cross(weight, k, source, kernel_region)
    volume = math.prod(k)
    if weight.dim() == 2 and volume == 1:
        # (TorchSparse keeps a 1x1x1 kernel as (C_in, C_out), MinkowskiEngine one of stride 1)
        weight = weight.unsqueeze(0)
    if weight.dim() != 3:
        raise ValueError(f"weight must be (K, C_in, C_out); got shape {tuple(weight.shape)}")
    if weight.shape[0] != volume:
        raise ValueError(f"weight holds {weight.shape[0]} offsets but kernel_size {k} has {volume}")
    if source == "minkowski":
        wrong = [n for n in k if n % 2 == 0 and n != 2]
        if wrong:
            raise ValueError(f"kernel_size {k}: MinkowskiEngine places the offsets of an even size above 2 at "
                             f"0..k-1, pointsparse at -(k-2)/2..k/2 (size {wrong[0]}); no reordering maps one "
                             "onto the other")
        x_fastest = True
    else:
        x_fastest = volume % 2 == 1
    if not x_fastest:
        return weight.clone()
    # index (i_z, i_y, i_x) in the source -> (i_x, i_y, i_z) here
    kx, ky, kz = k
    grid = weight.reshape(kz, ky, kx, *weight.shape[1:])
    return grid.permute(2, 1, 0, 3, 4).clone(memory_format=torch.contiguous_format).reshape(volume, *weight.shape[1:])
