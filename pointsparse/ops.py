"""The C++ core's entry points as torch custom operators (``torch.library``),
so that ``torch.compile`` (``fullgraph=True``) and ``torch.export`` see each
core call as one opaque node of a graph.

Operators (namespace ``pointsparse``; each has a fake implementation giving
output shapes, with unbacked symbolic sizes where a count depends on the data;
0 where the input it comes from is known to have no row, an empty cloud):

``downsample(coords, out_stride)``
    unique ``floor(c / out_stride) * out_stride`` rows, ``(M, 4)``, M unbacked.
``kmap_build(coords, out_coords?, key, trusted=False)``
    ``(in_idx, out_idx, sizes)`` of a map (P pairs, P unbacked; ``sizes (K,)``);
    ``trusted``: coords the graph made or already checked (see :class:`GraphCache`).
``kmap_parents(coords, key, trusted=False)``
    ``(out_coords, in_idx, out_idx, sizes)`` of a map whose kernel tiles its
    stride (k2 s2), its output coords made by the same pass.
``kmap_transpose(coarse_coords, fine_coords, in_idx, out_idx, sizes, key, trusted=False)``
    the pairs of the adjoint map, re-sorted by the new output row.
``kmap_restrict(in_coords, out_coords, in_idx, out_idx, sizes, key, rows, kept_coords)``
    ``(in_idx, out_idx, sizes)`` of a map restricted to the output rows
    ``rows`` (a selection's downsampling map, no search).
``conv(feats, weight, bias?, out_coords, in_idx, out_idx, sizes, key)``
    the fused gather-GEMM-scatter forward (bfloat16: the AVX512-BF16 kernels
    where they run), with a registered autograd formula that calls
    ``conv_input_grad`` and ``conv_weight_grad`` (differentiable in turn,
    each one's gradient the conv and the other: a gradient penalty's second
    derivative, ``create_graph=True``).
``conv_inference(feats, weight, bias?, out_coords, in_idx, out_idx, sizes, key, add?, relu)``
    the same forward with a residual and the ReLU in the kernel's store: a
    graph's conv where no gradient is needed (its autograd formula, conv's
    through the residual and the ReLU, serves an exported program's module
    run or compiled under grad mode).
    Both have an autocast rule on the CPU and CUDA, as aten's convs do:
    called under ``torch.autocast`` (an exported program run there) they
    run as an eager conv does under it (:func:`_autocast_conv`).
``voxelize(points, voxel_size, batch?)`` and ``segment_reduce(feats, inverse, perm, seg_ptr, mode, trusted=False)``
    the two halves of :func:`pointsparse.voxelize` (M voxels unbacked).
``trilinear_weights(coords, stride, points, voxel_size, batch?)``
    the 8 voxels around each point and their weights (trilinear devoxelize).
``voxel_rows(coords, stride, point_coords)``
    the voxel row holding each point (SPVCNN's point-to-voxel lookups).
``point_coords(coords, inverse, points, point_batch)``
    ``coords[inverse]`` once SPVCNN's point arguments are checked against
    the voxels (a program's own check of its inputs' values).
``keep_rows(scores, batch, keep_ratio?, threshold?)``
    the rows a :class:`~pointsparse.nn.VoxelPrune` keeps (R unbacked; a
    threshold that keeps none of a non-empty input raises ``ValueError``).

``key`` is a map's :class:`~pointsparse.kmap.KernelMapKey` as 13 ints
(:func:`key_to_list`). The operators' real implementations call the same
Python functions as the eager path (``kmap.build``, ``_engine``'s fused
kernels...), so both give identical results; the validation those functions do
runs when the graph runs, raising the same ``ValueError``.

While torch compiles or exports (``torch.compiler.is_compiling()``),
``Conv3d`` takes :func:`conv3d` here instead of the eager ``KernelMap`` /
``ConvPlan`` objects: maps are :class:`GraphMap` values of tensors, kept in a
:class:`GraphCache` that the graph's tensors share, so that every layer with
one structural key shares one map (and the backward reuses it).
``voxelize``, ``devoxelize``, SPVCNN and ``VoxelPrune`` / ``VoxelSkip``
(:func:`select_voxels`) call their operators the same way."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from . import _ext
from . import coords as _coords
from . import kmap as _kmap
from .voxelize import check_segment_shapes as _check_segment_shapes
from .voxelize import check_segments as _check_segments
from .voxelize import group_points as _group_points
from .voxelize import segment_reduce as _segment_reduce
from .voxelize import segment_reduce_backward as _segment_reduce_backward
from .voxelize import trilinear_weights as _trilinear_weights
from .tensor import CoordinateCache, Restriction, SparseTensor, Triple, check_float_dtype

_LIB = "pointsparse"


def key_to_list(key: _kmap.KernelMapKey) -> list[int]:
    """A map's structural key as 13 ints (an operator argument)."""
    return [*key.tensor_stride, *key.kernel_size, *key.stride, *key.dilation, int(key.transposed)]


def key_from_list(values) -> _kmap.KernelMapKey:
    v = [int(x) for x in values]
    if len(v) != 13:
        raise ValueError(f"key must hold 13 ints (tensor_stride, kernel_size, stride, dilation, transposed); got {v}")
    if min(v[:12]) < 1 or v[12] not in (0, 1):  # (an operator's key from a crafted program: dilation -1 built a map)
        raise ValueError(f"key's tensor_stride, kernel_size, stride and dilation must be >= 1 and transposed 0 or 1; "
                         f"got {v}")
    return _kmap.KernelMapKey(tuple(v[0:3]), tuple(v[3:6]), tuple(v[6:9]), tuple(v[9:12]), bool(v[12]))


def _down_key(key: list[int], op: str) -> _kmap.KernelMapKey:
    """The key of a map an operator builds down from its coords: a key
    marked transposed (that down map's adjoint, :func:`kmap_transpose`'s)
    is a ValueError naming it."""
    k = key_from_list(key)
    if k.transposed:
        raise ValueError(f"{op} builds the map down from its coords; got a key marked transposed ({list(key)}): "
                         "its 13th int must be 0 (kmap_transpose makes the adjoint's pairs)")
    return k


def _kernel_volume(key: list[int]) -> int:
    return key[3] * key[4] * key[5]


def _as_kmap(out_coords: Tensor, in_idx: Tensor, out_idx: Tensor, sizes: Tensor, key: list[int],
             num_in: int) -> _kmap.KernelMap:
    """The eager :class:`~pointsparse.kmap.KernelMap` of an operator's tensors."""
    k = key_from_list(key)
    offsets = _kmap._offsets(k.kernel_size, k.dilation, k.tensor_stride)
    return _kmap.KernelMap(out_coords, in_idx, out_idx, sizes.cpu(), offsets, num_in, out_coords.shape[0], k)


def _loop_kmap(out_coords: Tensor, in_idx: Tensor, out_idx: Tensor, sizes: Tensor, key: list[int],
               num_in: int) -> _kmap.KernelMap:
    """:func:`_as_kmap` for the conv operators' torch loop, the pairs checked
    first on the CPU (:func:`_check_pairs`: the fused engine's plan checks
    its own, while torch's indexing took rows past either side as a bare
    IndexError and negative ones as rows from the end, a silent wrong sum);
    on another device not (a host read each call)."""
    if in_idx.device.type == "cpu":
        _check_pairs(in_idx, out_idx, sizes, key, num_in, out_coords.shape[0])
    return _as_kmap(out_coords, in_idx, out_idx, sizes, key, num_in)


def _rows_at_least_one(tensor: Tensor) -> int:
    """1 when ``tensor`` is known to have rows (at least one output row per
    non-empty input: torch.compile specialises 0 rows away, and batch norm
    needs to know a count is not 0), else 0."""
    return 1 if torch.fx.experimental.symbolic_shapes.statically_known_true(tensor.shape[0] >= 1) else 0


try:  # (new_dynamic_size's own, past its check: private, so a torch without it falls back to new_dynamic_size)
    from torch._library.fake_impl import allocate_size as _allocate_size
except ImportError:
    _allocate_size = None


def _dynamic_size(min: int = 0) -> torch.SymInt:
    """A fake implementation's data-dependent count: an unbacked symbolic
    size, ``>= min``. Also under ``torch.compile`` without ``fullgraph``,
    where torch's ``new_dynamic_size`` refuses one (unless
    ``capture_dynamic_output_shape_ops``) and dynamo broke the graph at
    every map: each layer's forward then became a frame of its own, compiled
    again for each layer's widths and strides past dynamo's recompile limit
    (a MinkUNet ran its layers eagerly). The counts are traced as under
    ``fullgraph=True`` instead, the network one graph either way. Without
    a shape environment (a plain ``FakeTensorMode``) torch's refusal stands."""
    ctx = torch.library.get_ctx()
    shape_env = getattr(ctx, "_shape_env", None)
    if _allocate_size is not None and shape_env is not None and not shape_env.allow_dynamic_output_shape_ops:
        return _allocate_size(shape_env, min)
    return ctx.new_dynamic_size(min=min)


def _no_rows(*tensors: Optional[Tensor]) -> bool:
    """Whether one of ``tensors`` (None aside) is known, while tracing, to
    have no row (torch.compile gives 0 rows a static size of its own)."""
    return any(t is not None and torch.fx.experimental.symbolic_shapes.statically_known_true(t.shape[0] == 0)
               for t in tensors)


def _rows_of(tensor: Tensor):
    """A fake implementation's count of rows made from ``tensor``'s: 0 where
    it has none (a data-dependent count there failed the trace of an empty
    cloud, batch norm guarding on it), else :func:`_dynamic_size` (at least
    one where ``tensor`` is known to have rows)."""
    return 0 if _no_rows(tensor) else _dynamic_size(min=_rows_at_least_one(tensor))


def _new_pairs(coords: Tensor, *others: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """The pairs of a map on ``coords`` (and ``others``, the map's other
    sides): none where one of them has no row, else a data-dependent count."""
    pairs = 0 if _no_rows(coords, *others) else _dynamic_size()
    return coords.new_empty((pairs,), dtype=torch.int64), coords.new_empty((pairs,), dtype=torch.int64)


# --- coordinates and kernel maps ------------------------------------------------------------------------

@torch.library.custom_op(f"{_LIB}::downsample", mutates_args=())
def downsample(coords: Tensor, out_stride: list[int]) -> Tensor:
    """Unique ``floor(c / out_stride) * out_stride`` rows, sorted by key."""
    # (downsample_coords checks the coords: a program's input coords, whose dtype torch.export does not check)
    return _kmap.downsample_coords(coords, tuple(out_stride))


@downsample.register_fake
def _(coords, out_stride):
    return coords.new_empty((_rows_of(coords), 4))


@torch.library.custom_op(f"{_LIB}::kmap_build", mutates_args=())
def kmap_build(coords: Tensor, out_coords: Optional[Tensor], key: list[int],
               trusted: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``(in_idx, out_idx, sizes)`` of ``kmap.build`` (out_coords None: the
    submanifold map, or the downsampled coords). ``trusted``: the coords
    (and out_coords) are unique multiples of their strides, made or checked
    earlier in the same graph (see :class:`GraphCache`): the checks are
    skipped and the maps that need no search (1x1x1) take their shortcut,
    as an eager cache's maps do (the dtype and shape check of the coords,
    no host read, runs either way)."""
    _coords.check_coords(coords, "coords")
    k = _down_key(key, "kmap_build")
    m = _kmap._build(coords, k.kernel_size, k.stride, k.dilation, k.tensor_stride, None, out_coords,
                     trusted=trusted)
    return m.in_idx, m.out_idx, m.sizes.to(coords.device)


@kmap_build.register_fake
def _(coords, out_coords, key, trusted=False):
    _no_meta_beside_real("kmap_build", coords=coords, out_coords=out_coords)
    in_idx, out_idx = _new_pairs(coords, out_coords)
    return in_idx, out_idx, coords.new_empty((_kernel_volume(key),), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::kmap_parents", mutates_args=())
def kmap_parents(coords: Tensor, key: list[int], trusted: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(out_coords, in_idx, out_idx, sizes)`` of a map whose kernel tiles
    its stride (kernel == stride, 1 or 2 per axis, dilation 1: the U-Net's
    k2 s2), its output coords made with it: each row paired with its parent
    from the downsampling's own sort, in one pass (the graph's
    :func:`downsample` then :func:`kmap_build` make two). ``trusted``: as
    :func:`kmap_build`'s."""
    _coords.check_coords(coords, "coords")
    k = _down_key(key, "kmap_parents")
    if k.stride == (1, 1, 1):  # (its outputs were its input coords: torch refused the alias from inside)
        raise ValueError(f"kmap_parents needs a key with a stride > 1 (a stride-1 map's outputs are its inputs, "
                         f"no parents: use kmap_build); got key {list(key)}")
    m = _kmap._build(coords, k.kernel_size, k.stride, k.dilation, k.tensor_stride, None, None, trusted=trusted)
    return m.out_coords, m.in_idx, m.out_idx, m.sizes.to(coords.device)


@kmap_parents.register_fake
def _(coords, key, trusted=False):
    rows = _rows_of(coords)
    in_idx, out_idx = _new_pairs(coords)
    return coords.new_empty((rows, 4)), in_idx, out_idx, coords.new_empty((_kernel_volume(key),), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::kmap_restrict", mutates_args=())
def kmap_restrict(in_coords: Tensor, out_coords: Tensor, in_idx: Tensor, out_idx: Tensor, sizes: Tensor,
                  key: list[int], rows: Tensor, kept_coords: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(in_idx, out_idx, sizes)`` of the map ``in_coords -> out_coords``
    restricted to the output rows ``rows`` (sorted, distinct; their coords
    ``kept_coords``): ``KernelMap.restricted``, a selection's downsampling
    map without a search (:func:`select_voxels`). The three coords and
    the pairs' dtypes and shapes are checked (:func:`_check_pair_shapes`,
    no host read), each error naming the operator's argument."""
    _coords.check_coords(in_coords, "in_coords")
    _coords.check_coords(out_coords, "out_coords")
    _check_pair_shapes(in_idx, out_idx, sizes, key)
    # (trusted: kept_coords label no output of the operator, which returns the pairs only)
    m = _as_kmap(out_coords, in_idx, out_idx, sizes, key, in_coords.shape[0])._restricted(rows, kept_coords, True,
                                                                                           "kept_coords")
    return m.in_idx, m.out_idx, m.sizes.to(out_coords.device)


@kmap_restrict.register_fake
def _(in_coords, out_coords, in_idx, out_idx, sizes, key, rows, kept_coords):
    _no_meta_beside_real("kmap_restrict", in_coords=in_coords, out_coords=out_coords, in_idx=in_idx, out_idx=out_idx,
                         sizes=sizes, rows=rows, kept_coords=kept_coords)
    in_new, out_new = _new_pairs(in_coords, out_coords, in_idx, rows)
    # (int64 counts whatever the given sizes' dtype, as the real one gives: int32 ones were traced as int32)
    return in_new, out_new, sizes.new_empty(sizes.shape, dtype=torch.int64)


def _no_meta_beside_real(op: str, **tensors: Optional[Tensor]) -> None:
    """ValueError naming ``op`` and the argument where some of its tensors
    (None aside) are on the meta device and others are not: torch runs the
    fake implementation (the Meta kernel) for such a call, whose outputs,
    made on a real tensor's device, held uninitialised memory, returned as
    the operator's result. Real devices apart from each other are the real
    implementation's to check (a map's ``sizes`` may stay on the CPU);
    :func:`_one_device` is the stricter check of the point-voxel operators."""
    meta = [name for name, t in tensors.items() if t is not None and t.is_meta]
    real = [(name, t.device) for name, t in tensors.items() if t is not None and not t.is_meta]
    if meta and real:
        raise ValueError(f"{op}: {meta[0]} is on meta but {real[0][0]} on {real[0][1]}: give its tensors on one "
                         "device")


def _check_pair_shapes(in_idx: Tensor, out_idx: Tensor, sizes: Tensor, key: list[int]) -> None:
    """The dtypes and shapes of a map's tensors as an operator is given them
    (a program's arguments): ``in_idx`` and ``out_idx`` 1-D int64 (or
    int32) tensors of one length, ``sizes`` 1-D int64 (or int32), one count
    per offset of ``key``; a TypeError (dtype) or ValueError naming the
    argument. No host read: the operators run it on trusted maps too.
    (Narrower integers are refused: torch indexes by int64 / int32 only,
    the torch loop took int16 as a bare IndexError and uint8 as a mask.)"""
    for name, t in (("in_idx", in_idx), ("out_idx", out_idx), ("sizes", sizes)):
        if t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an int64 (or int32) tensor; got {t.dtype}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D; got shape {tuple(t.shape)}")
    pairs, volume = in_idx.shape[0], _kernel_volume(key)
    if out_idx.shape[0] != pairs:
        raise ValueError(f"out_idx holds {out_idx.shape[0]} rows but in_idx {pairs}: one of each per pair")
    if sizes.shape[0] != volume:
        raise ValueError(f"sizes must hold one count per offset of the key's kernel ({volume}); got {sizes.shape[0]}")


def _check_pairs(in_idx: Tensor, out_idx: Tensor, sizes: Tensor, key: list[int], num_in: int, num_out: int) -> None:
    """A map's tensors as an operator is given them (a program's arguments):
    :func:`_check_pair_shapes`, then ``sizes`` counts summing to the pairs,
    and every pair's rows in ``[0, num_in)`` and ``[0, num_out)``; a
    ValueError (TypeError for a dtype) naming the argument. One host read
    for the values."""
    _check_pair_shapes(in_idx, out_idx, sizes, key)
    pairs = in_idx.shape[0]
    flags = [(sizes < 0).any(), sizes.sum() != pairs]
    if pairs:
        flags += [(in_idx.min() < 0) | (in_idx.max() >= num_in), (out_idx.min() < 0) | (out_idx.max() >= num_out)]
    flags = torch.stack(flags).tolist()
    if flags[0] or flags[1]:
        raise ValueError(f"sizes must be counts >= 0 summing to the {pairs} pairs; got {sizes.tolist()}")
    if pairs and flags[2]:
        raise ValueError(f"in_idx holds rows outside [0, {num_in}) (the map's {num_in} input rows)")
    if pairs and flags[3]:
        raise ValueError(f"out_idx holds rows outside [0, {num_out}) (the map's {num_out} output rows)")


@torch.library.custom_op(f"{_LIB}::kmap_transpose", mutates_args=())
def kmap_transpose(coarse_coords: Tensor, fine_coords: Tensor, in_idx: Tensor, out_idx: Tensor, sizes: Tensor,
                   key: list[int], trusted: bool = False) -> tuple[Tensor, Tensor]:
    """Pairs of the adjoint of the map ``fine -> coarse`` (``KernelMap.transpose``);
    the map checked against both coords first (:func:`_check_pairs`, then
    every pair's fine coords at its coarse coords plus its offset) unless
    ``trusted`` (a map the graph's own operators made: the check is a pass
    over the pairs and a host read, on a GPU a sync, each call of a
    program). The dtypes and shapes of both coords and of the pairs
    (:func:`_check_pair_shapes`) are checked either way (no host read)."""
    _coords.check_coords(coarse_coords, "coarse_coords")
    _coords.check_coords(fine_coords, "fine_coords")
    if trusted:
        _check_pair_shapes(in_idx, out_idx, sizes, key)
    else:
        _check_pairs(in_idx, out_idx, sizes, key, fine_coords.shape[0], coarse_coords.shape[0])
    down = _as_kmap(coarse_coords, in_idx, out_idx, sizes, key, fine_coords.shape[0])
    up = down._transpose(fine_coords, trusted, "fine_coords")  # (its errors name the operator's argument)
    # outputs may not alias inputs: copy when the transpose needed no sort
    up_in, up_out = (t.clone() if t is in_idx or t is out_idx else t for t in (up.in_idx, up.out_idx))
    # Its plan is the transposed plan of the map it transposes (_plan).
    _GRAPH_TRANSPOSES[up_in] = (up_out, (coarse_coords, in_idx, out_idx, sizes, list(key), fine_coords.shape[0]))
    return up_in, up_out


@kmap_transpose.register_fake
def _(coarse_coords, fine_coords, in_idx, out_idx, sizes, key, trusted=False):
    _no_meta_beside_real("kmap_transpose", coarse_coords=coarse_coords, fine_coords=fine_coords, in_idx=in_idx,
                         out_idx=out_idx, sizes=sizes)
    return torch.empty_like(out_idx), torch.empty_like(in_idx)


# --- convolution ----------------------------------------------------------------------------------------

# Fused plans of the maps a graph runs, keyed by the in_idx tensor (each map's
# pairs are fresh tensors made by kmap_build / kmap_transpose, shared by every
# layer of the map and by the backward): built once per map and graph run.
_GRAPH_PLANS = WeakIdKeyDictionary()
# The maps kmap_transpose made, keyed by their in_idx: (their out_idx, the
# arguments of _plan for the map they transpose), so that their plan is
# that map's plan transposed (no pass over the pairs), as eager caches do.
_GRAPH_TRANSPOSES = WeakIdKeyDictionary()


def _version(t: Tensor) -> int:
    """``t._version``, or -1 for an inference tensor (made under
    ``torch.inference_mode``), which keeps no version counter: a program run
    there makes its maps' pair tensors afresh in every run, so a plan is
    only found again by the layers of the same run that share the map."""
    return -1 if t.is_inference() else t._version


def _plan(out_coords, in_idx, out_idx, sizes, key, num_in):
    from .nn import _engine

    stamp = (out_idx, sizes, _version(in_idx), _version(out_idx), _version(sizes), in_idx.data_ptr(), num_in,
             out_coords.shape[0], tuple(key))
    hit = _GRAPH_PLANS.get(in_idx)
    if hit is not None and hit[0][0] is out_idx and hit[0][1] is sizes and hit[0][2:] == stamp[2:]:
        return hit[1]
    up = _GRAPH_TRANSPOSES.get(in_idx)
    down = up[1] if up is not None and up[0] is out_idx else None  # _plan's arguments for the map transposed
    if down is not None and down[5] == out_coords.shape[0] and down[0].shape[0] == num_in:  # rows swapped
        plan = _engine.transposed_plan(_plan(*down))
    else:
        plan = _engine.make_fused_plan(_as_kmap(out_coords, in_idx, out_idx, sizes, key, num_in))
    _GRAPH_PLANS[in_idx] = (stamp, plan)
    return plan


def _engine_runs(*tensors: Tensor) -> bool:
    from .nn import _engine

    return _ext.serves(*tensors, dtypes=_engine.ENGINE_DTYPES)


def _bf16_served(feats: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """CPU bfloat16 feats, weight (and bias) that the core serves."""
    return all(t is None or t.dtype == torch.bfloat16 for t in (feats, weight, bias)) and _ext.serves(feats, weight)


def _bf16_runs(feats: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """:func:`_bf16_served` on a CPU whose bf16 kernels run."""
    from .nn import _engine

    return _bf16_served(feats, weight, bias) and _engine.bf16_kernels()


def _as_given(t: Tensor):
    """Autocast off on ``t``'s device for an operator's torch loop: an
    operator's implementation computes in the dtypes it is given, as its
    fake implementation says and the core does (autocast's casts are the
    caller's, or the conv operators' autocast rule's, which calls them with
    autocast off on the CPU and CUDA; under autocast on another device the
    loop's matmuls gave bf16 products)."""
    return torch.autocast(t.device.type, enabled=False)


def _check_float_2d(t: Tensor, name: str, shape: str, rows: Optional[int] = None,
                    columns: Optional[int] = None) -> None:
    """``t`` of a feats dtype (TypeError) and 2-D ``shape``, of ``rows``
    rows and ``columns`` columns where given (ValueError), naming ``name``."""
    check_float_dtype(t, name, shape)
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or (columns is not None and t.shape[1] != columns):
        raise ValueError(f"{name} must be {shape}; got shape {tuple(t.shape)}")


def _check_weight(weight: Tensor, key: list[int], dtype: torch.dtype, like: str, c_in: Optional[int] = None,
                  c_out: Optional[int] = None) -> None:
    """A conv operator's ``weight``: ``(K, C_in, C_out)`` of ``dtype`` (the
    dtype of the operator's ``like`` argument), K the key's kernel volume."""
    volume = _kernel_volume(key)
    shape = f"(K, C_in, C_out) with K = {volume} (the key's kernel)"
    check_float_dtype(weight, "weight", shape)
    if weight.dim() != 3 or weight.shape[0] != volume or (c_in is not None and weight.shape[1] != c_in) or \
            (c_out is not None and weight.shape[2] != c_out):
        want = f"({volume}, {'C_in' if c_in is None else c_in}, {'C_out' if c_out is None else c_out})"
        raise ValueError(f"weight must be (K, C_in, C_out) = {want}; got shape {tuple(weight.shape)}")
    if weight.dtype != dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from {like}'s {dtype}")


def _check_map(out_coords: Tensor, in_idx: Tensor, out_idx: Tensor, sizes: Tensor, key: list[int]) -> None:
    """A conv operator's map tensors: ``out_coords`` int32 ``(M, 4)`` and
    :func:`_check_pair_shapes` (no host read; the values: the engine's
    plan, or :func:`_loop_kmap`)."""
    _coords.check_coords(out_coords, "out_coords")
    _check_pair_shapes(in_idx, out_idx, sizes, key)


def _check_conv(feats: Tensor, weight: Tensor, bias: Optional[Tensor], out_coords: Tensor, in_idx: Tensor,
                out_idx: Tensor, sizes: Tensor, key: list[int], add: Optional[Tensor] = None) -> None:
    """:func:`conv` / :func:`conv_inference`'s tensors, their dtypes and
    shapes (as eager's conv3d checks them): a TypeError (dtype) or
    ValueError naming the argument, on every path (the torch loop's were
    bare errors from inside torch)."""
    _check_float_2d(feats, "feats", "(N, C_in)")
    _check_weight(weight, key, feats.dtype, "feats", c_in=feats.shape[1])
    if bias is not None:
        check_float_dtype(bias, "bias", "(C_out,)")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} differs from the weight's {weight.dtype}")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[2]:
            raise ValueError(f"bias must be (C_out,) = ({weight.shape[2]},); got shape {tuple(bias.shape)}")
    _check_map(out_coords, in_idx, out_idx, sizes, key)
    if add is not None:  # (of another float dtype: added after the conv, promoted)
        _check_float_2d(add, "add", f"(M, C_out) = ({out_coords.shape[0]}, {weight.shape[2]}) (the conv's output)",
                        out_coords.shape[0], weight.shape[2])


def _forward(feats: Tensor, weight: Tensor, bias: Optional[Tensor], out_coords: Tensor, in_idx: Tensor,
             out_idx: Tensor, sizes: Tensor, key: list[int], add: Optional[Tensor] = None,
             relu: bool = False) -> Tensor:
    """``relu(bias + sum_o feats[in_idx] @ weight[o] + add)``, the body of
    :func:`conv` and :func:`conv_inference`: the fused engine on CPU
    float32/float64, its bf16 kernels on CPU bfloat16 where the CPU has
    AVX512-BF16 (the sums in float32, rounded once), with the residual and
    the ReLU in their store where the residual has the feats' dtype; CPU
    bfloat16 on a CPU without AVX512-BF16 in the float32 kernels on the
    widened values, a residual of the feats' dtype widened into their
    store, rounded once (eager inference's "bf16 on float32"); the torch
    loop elsewhere, the residual and the ReLU after."""
    from .nn import _engine

    store = add is None or add.dtype == feats.dtype  # the kernels' store takes it
    if _bf16_served(feats, weight, bias) and not _engine.bf16_kernels():
        plan = _plan(out_coords, in_idx, out_idx, sizes, key, feats.shape[0])
        fused_add, fused_relu = (None if add is None else add.float(), relu) if store else (None, False)
        out = _engine.conv_forward(feats.float().contiguous(), weight.float().contiguous(),
                                   None if bias is None else bias.float(), plan, relu=fused_relu,
                                   add=fused_add).to(torch.bfloat16)
        if store:
            return out
    elif _engine_runs(feats, weight) or _bf16_runs(feats, weight, bias):
        plan = _plan(out_coords, in_idx, out_idx, sizes, key, feats.shape[0])
        fused_add, fused_relu = (add, relu) if store else (None, False)
        if feats.dtype == torch.bfloat16:
            out = _engine.bf16_forward(feats, weight, bias, plan, fused_relu, fused_add)
        else:
            out = _engine.conv_forward(feats.contiguous(), weight.contiguous(), bias, plan, relu=fused_relu,
                                       add=fused_add)
        if store:
            return out
    else:
        from .nn.reference import conv_torch  # pointsparse.nn loads lazily (import pointsparse does not load it)

        with _as_given(feats):
            out = conv_torch(feats, weight, _loop_kmap(out_coords, in_idx, out_idx, sizes, key, feats.shape[0]))
        out = out if bias is None else out + bias
    if add is not None:
        out = out + add
    return torch.relu(out) if relu else out


@torch.library.custom_op(f"{_LIB}::conv", mutates_args=())
def conv(feats: Tensor, weight: Tensor, bias: Optional[Tensor], out_coords: Tensor, in_idx: Tensor,
         out_idx: Tensor, sizes: Tensor, key: list[int]) -> Tensor:
    """``out = bias + sum_o feats[in_idx] @ weight[o]`` added at ``out_idx``
    (:func:`_forward`: the fused engine, its bf16 kernels, or the torch
    loop; a graph traced without gradients, as an export is, takes
    :func:`conv_inference` instead). The tensors'
    dtypes and shapes are checked first (:func:`_check_conv`)."""
    _check_conv(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key)
    return _forward(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key)


@conv.register_fake
def _(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key):
    _no_meta_beside_real("conv", feats=feats, weight=weight, bias=bias, out_coords=out_coords, in_idx=in_idx,
                         out_idx=out_idx, sizes=sizes)
    return feats.new_empty((out_coords.shape[0], weight.shape[2]))


@torch.library.custom_op(f"{_LIB}::conv_inference", mutates_args=())
def conv_inference(feats: Tensor, weight: Tensor, bias: Optional[Tensor], out_coords: Tensor, in_idx: Tensor,
                   out_idx: Tensor, sizes: Tensor, key: list[int], add: Optional[Tensor], relu: bool) -> Tensor:
    """``relu(conv(...) + add)`` for a graph that needs no gradient (an
    exported inference program; differentiable all the same, its program's
    module run under grad mode: :func:`_conv_inference_backward`): the residual ``add`` (or
    None) and the ReLU run in the kernel's store, block by block, as in
    eager inference (the same bits); see :func:`_forward`. The tensors'
    dtypes and shapes are checked first (:func:`_check_conv`)."""
    _check_conv(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key, add)
    return _forward(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key, add, relu)


@conv_inference.register_fake
def _(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key, add, relu):
    _no_meta_beside_real("conv_inference", feats=feats, weight=weight, bias=bias, out_coords=out_coords,
                         in_idx=in_idx, out_idx=out_idx, sizes=sizes, add=add)
    # (a residual of another dtype is added after the conv, promoted as torch promotes)
    dtype = feats.dtype if add is None else torch.promote_types(feats.dtype, add.dtype)
    return feats.new_empty((out_coords.shape[0], weight.shape[2]), dtype=dtype)


@torch.library.custom_op(f"{_LIB}::conv_input_grad", mutates_args=())
def conv_input_grad(grad: Tensor, weight: Tensor, out_coords: Tensor, in_idx: Tensor, out_idx: Tensor,
                    sizes: Tensor, key: list[int], num_in: int) -> Tensor:
    """``sum_o grad[out_idx] @ weight[o].T`` added at ``in_idx``: ``(num_in, C_in)``
    (bf16 / fp16: each offset's product rounded once by its matmul, summed
    in float32 and the sum rounded once, as eager's torch path sums them;
    a sum kept in the low precision rounded at every offset). The tensors'
    dtypes and shapes and ``num_in`` are checked first."""
    _check_float_2d(grad, "grad", f"(M, C_out) with M = {out_coords.shape[0]} (out_coords' rows)",
                    out_coords.shape[0])
    _check_weight(weight, key, grad.dtype, "grad", c_out=grad.shape[1])
    _check_map(out_coords, in_idx, out_idx, sizes, key)
    if num_in < 0:
        raise ValueError(f"num_in must be >= 0 (the input's rows); got {num_in}")
    if _engine_runs(grad, weight):
        from .nn import _engine

        plan = _plan(out_coords, in_idx, out_idx, sizes, key, num_in)
        return _engine.conv_backward(None, weight.contiguous(), grad.contiguous(), plan, True, False)[0]
    from .nn.reference import offset_pairs

    low = grad.dtype in (torch.bfloat16, torch.float16)
    out = grad.new_zeros((num_in, weight.shape[1]), dtype=torch.float32 if low else grad.dtype)
    with _as_given(grad):
        for o, i, j in offset_pairs(_loop_kmap(out_coords, in_idx, out_idx, sizes, key, num_in)):
            out.index_add_(0, i, (grad[j] @ weight[o].t()).to(out.dtype))
    return out.to(grad.dtype)


@conv_input_grad.register_fake
def _(grad, weight, out_coords, in_idx, out_idx, sizes, key, num_in):
    _no_meta_beside_real("conv_input_grad", grad=grad, weight=weight, out_coords=out_coords, in_idx=in_idx,
                         out_idx=out_idx, sizes=sizes)
    return grad.new_empty((num_in, weight.shape[1]))


@torch.library.custom_op(f"{_LIB}::conv_weight_grad", mutates_args=())
def conv_weight_grad(feats: Tensor, grad: Tensor, out_coords: Tensor, in_idx: Tensor, out_idx: Tensor,
                     sizes: Tensor, key: list[int]) -> Tensor:
    """``grad_weight[o] = feats[in_idx].T @ grad[out_idx]``: ``(K, C_in, C_out)``.
    The tensors' dtypes and shapes are checked first."""
    _check_float_2d(feats, "feats", "(N, C_in)")
    _check_float_2d(grad, "grad", f"(M, C_out) with M = {out_coords.shape[0]} (out_coords' rows)",
                    out_coords.shape[0])
    if grad.dtype != feats.dtype:
        raise TypeError(f"grad dtype {grad.dtype} differs from feats' {feats.dtype}")
    _check_map(out_coords, in_idx, out_idx, sizes, key)
    shape = (_kernel_volume(key), feats.shape[1], grad.shape[1])
    if _engine_runs(feats, grad):
        from .nn import _engine

        plan = _plan(out_coords, in_idx, out_idx, sizes, key, feats.shape[0])
        return _engine.conv_backward(feats.contiguous(), feats.new_empty(shape), grad.contiguous(), plan,
                                     False, True)[1]
    from .nn.reference import offset_pairs

    out = feats.new_zeros(shape)
    with _as_given(feats):
        for o, i, j in offset_pairs(_loop_kmap(out_coords, in_idx, out_idx, sizes, key, feats.shape[0])):
            out[o] = feats[i].t() @ grad[j]
    return out


@conv_weight_grad.register_fake
def _(feats, grad, out_coords, in_idx, out_idx, sizes, key):
    _no_meta_beside_real("conv_weight_grad", feats=feats, grad=grad, out_coords=out_coords, in_idx=in_idx,
                         out_idx=out_idx, sizes=sizes)
    return feats.new_empty((_kernel_volume(key), feats.shape[1], grad.shape[1]))


def _conv_setup(ctx, inputs, output):
    feats, weight, bias, out_coords, in_idx, out_idx, sizes, key = inputs
    ctx.save_for_backward(feats, weight, out_coords, in_idx, out_idx, sizes)
    ctx.key = key
    ctx.has_bias = bias is not None


def _conv_grads(ctx, grad, feats, weight, out_coords, in_idx, out_idx, sizes) -> tuple:
    """The gradients of a conv's feats, weight and bias (None for those
    ``ctx.needs_input_grad`` does not ask) for its output's ``grad``."""
    need_feats, need_weight, need_bias = ctx.needs_input_grad[:3]
    grad_feats = grad_weight = grad_bias = None
    if need_feats:
        grad_feats = conv_input_grad(grad, weight, out_coords, in_idx, out_idx, sizes, ctx.key, feats.shape[0])
    if need_weight:
        grad_weight = conv_weight_grad(feats, grad, out_coords, in_idx, out_idx, sizes, ctx.key)
    if ctx.has_bias and need_bias:
        grad_bias = grad.sum(0)
    return grad_feats, grad_weight, grad_bias


def _conv_backward(ctx, grad):
    feats, weight, out_coords, in_idx, out_idx, sizes = ctx.saved_tensors
    return (*_conv_grads(ctx, grad, feats, weight, out_coords, in_idx, out_idx, sizes), None, None, None, None, None)


conv.register_autograd(_conv_backward, setup_context=_conv_setup)


# The gradient operators' own gradients, so that a conv's gradient can be differentiated again (a gradient
# penalty, create_graph=True, through a compiled or exported model's operators): each is linear in both its
# tensors, its adjoints the conv and the other gradient operator (the engine's _InputGrad / _WeightGrad).
# A backward without create_graph runs with grad mode off: nothing is recorded, the fast path unchanged.

def _input_grad_setup(ctx, inputs, output):
    grad, weight, out_coords, in_idx, out_idx, sizes, key, _num_in = inputs
    ctx.save_for_backward(grad, weight, out_coords, in_idx, out_idx, sizes)
    ctx.key = key


def _input_grad_backward(ctx, h):
    """``conv_input_grad``'s gradients for ``h``, the cotangent of the input
    gradient: ``grad``'s is the conv of ``h``, ``weight``'s the weight
    gradient of ``h`` against ``grad``."""
    grad, weight, out_coords, in_idx, out_idx, sizes = ctx.saved_tensors
    need_grad, need_weight = ctx.needs_input_grad[:2]
    h = h.to(grad.dtype)
    d_grad = conv(h, weight, None, out_coords, in_idx, out_idx, sizes, ctx.key) if need_grad else None
    d_weight = conv_weight_grad(h, grad, out_coords, in_idx, out_idx, sizes, ctx.key) if need_weight else None
    return d_grad, d_weight, None, None, None, None, None, None


conv_input_grad.register_autograd(_input_grad_backward, setup_context=_input_grad_setup)


def _weight_grad_setup(ctx, inputs, output):
    feats, grad, out_coords, in_idx, out_idx, sizes, key = inputs
    ctx.save_for_backward(feats, grad, out_coords, in_idx, out_idx, sizes)
    ctx.key = key


def _weight_grad_backward(ctx, v):
    """``conv_weight_grad``'s gradients for ``v``, the cotangent of the
    weight gradient: ``feats``' is the input gradient of ``grad`` through
    ``v``, ``grad``'s the conv of ``feats`` with ``v``."""
    feats, grad, out_coords, in_idx, out_idx, sizes = ctx.saved_tensors
    need_feats, need_grad = ctx.needs_input_grad[:2]
    v = v.to(feats.dtype)
    d_feats = (conv_input_grad(grad, v, out_coords, in_idx, out_idx, sizes, ctx.key, feats.shape[0]) if need_feats
               else None)
    d_grad = conv(feats, v, None, out_coords, in_idx, out_idx, sizes, ctx.key) if need_grad else None
    return d_feats, d_grad, None, None, None, None, None


conv_weight_grad.register_autograd(_weight_grad_backward, setup_context=_weight_grad_setup)


def _conv_inference_setup(ctx, inputs, output):
    feats, weight, bias, out_coords, in_idx, out_idx, sizes, key, add, relu = inputs
    # (the output only where the ReLU's mask is read from it)
    ctx.save_for_backward(feats, weight, out_coords, in_idx, out_idx, sizes, output if relu else None)
    ctx.key, ctx.has_bias, ctx.relu = key, bias is not None, relu
    ctx.add_dtype = None if add is None else add.dtype


def _conv_inference_backward(ctx, grad):
    """:func:`conv_inference`'s gradients, those of ``relu(conv(...) + add)``
    (:func:`_conv_backward`'s through the ReLU and the residual; a residual
    of another dtype than the feats' gets its gradient in its own dtype, the
    conv its own in the feats', as torch's promotion does). Not a path a
    graph takes where gradients are needed (:func:`conv3d` calls :func:`conv`
    there): an exported inference program's module run under grad mode, or
    compiled there (AOT autograd traces the backward while compiling)."""
    feats, weight, out_coords, in_idx, out_idx, sizes, out = ctx.saved_tensors
    if ctx.relu:
        grad = grad.masked_fill(out <= 0, 0)  # (torch.relu's: no gradient where the output is 0)
    grad_add = grad.to(ctx.add_dtype) if ctx.add_dtype is not None and ctx.needs_input_grad[8] else None
    grads = _conv_grads(ctx, grad.to(feats.dtype), feats, weight, out_coords, in_idx, out_idx, sizes)
    return (*grads, None, None, None, None, None, grad_add, None)


conv_inference.register_autograd(_conv_inference_backward, setup_context=_conv_inference_setup)


def _widened(feats: Tensor, weight: Tensor, bias: Optional[Tensor], graph_args: tuple, add: Optional[Tensor],
             relu: bool, differentiated: bool, dtype: torch.dtype) -> Tensor:
    """``relu(conv + add)`` on ``feats``, ``weight`` and ``bias`` widened to
    float32, rounded once to ``dtype``: eager's "bf16 on float32". A
    residual of ``dtype`` is widened too and summed before the ReLU and the
    rounding (as eager's store sums it); one of another dtype is added
    after, with the ReLU, as torch adds (promoted). :func:`conv` where a
    gradient is needed (the rounding's backward rounds the gradients to the
    inputs' dtypes), else :func:`conv_inference`. ``graph_args``: the
    operators' ``(out_coords, in_idx, out_idx, sizes, key)``."""
    wide = (feats.float(), weight.float(), None if bias is None else bias.float())
    inside = add is None or add.dtype == dtype  # (the residual summed in float32, before the rounding)
    wide_add = None if add is None or not inside else add.float()
    if differentiated:
        out = conv(*wide, *graph_args)
        out = out if wide_add is None else out + wide_add
        out = torch.relu(out) if relu and inside else out
    else:
        out = conv_inference(*wide, *graph_args, wide_add, relu and inside)
    out = out.to(dtype)
    if not inside:
        out = out + add
        out = torch.relu(out) if relu else out
    return out


def _autocast_conv(device: str, feats: Tensor, weight: Tensor, bias: Optional[Tensor], graph_args: tuple,
                   add: Optional[Tensor], relu: bool, differentiable: bool) -> Tensor:
    """:func:`conv` (``differentiable``) or :func:`conv_inference` called
    under ``torch.autocast`` on ``device`` (an exported program's module run
    there, torch.compile's "eager" backend, a direct call), as aten's convs
    have an autocast rule: eager's (``nn.functional.conv3d``). Feats of
    another float dtype than the weight's in its dtype; a float32 weight
    (autocast casts float32 only: float64 stays) with the feats and bias
    rounded to autocast's precision, then bf16 inference on the bf16 kernels
    where they run, anything else (a gradient needed, fp16, no AVX512-BF16,
    the torch path) widened, rounded once (:func:`_widened`); the residual
    ``add`` as it comes (promoted as torch adds). The operator then runs
    with autocast off on ``device``. (A graph's conv3d applies the rule
    itself, calling the operators with autocast off; a kernel region, which
    a program keeps only as zeros in the weight, takes the bf16 kernels
    here where eager widens it: other roundings of the same sums.)"""
    from .nn import _engine
    from .nn.reference import _autocast_dtype, autocast_input

    feats = autocast_input(feats, weight.dtype)
    low = _autocast_dtype(weight)
    with torch.autocast(device, enabled=False):
        if low is not None:
            feats, weight = feats.to(low), weight.to(low)
            bias = None if bias is None else bias.to(low)
            if not _engine.runs_bf16(feats, weight, bias):
                differentiated = differentiable and torch.is_grad_enabled() and any(
                    t is not None and t.requires_grad for t in (feats, weight, bias))
                return _widened(feats, weight, bias, graph_args, add, relu, differentiated, low)
        if differentiable:
            return conv(feats, weight, bias, *graph_args)
        return conv_inference(feats, weight, bias, *graph_args, add, relu)


def _register_autocast(lib: torch.library.Library, device: str, dispatch_key: str) -> None:
    """:func:`_autocast_conv` as the conv operators' kernels for
    ``dispatch_key``, the autocast dispatch key of ``device``."""

    def conv_kernel(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key):
        return _autocast_conv(device, feats, weight, bias, (out_coords, in_idx, out_idx, sizes, key), None, False,
                              True)

    def conv_inference_kernel(feats, weight, bias, out_coords, in_idx, out_idx, sizes, key, add, relu):
        return _autocast_conv(device, feats, weight, bias, (out_coords, in_idx, out_idx, sizes, key), add, relu,
                              False)

    lib.impl("conv", conv_kernel, dispatch_key)
    lib.impl("conv_inference", conv_inference_kernel, dispatch_key)


# The conv operators' autocast rule, eager's (torch.library.register_autocast casts every float input to one
# fixed dtype: fp16 autocast would run in it, the residual would be rounded, the bf16 kernels' choice lost).
_AUTOCAST = torch.library.Library(_LIB, "IMPL")
_register_autocast(_AUTOCAST, "cpu", "AutocastCPU")
_register_autocast(_AUTOCAST, "cuda", "AutocastCUDA")


# --- points and voxels ----------------------------------------------------------------------------------

def _one_device(op: str, **tensors: Optional[Tensor]) -> None:
    """ValueError naming ``op`` and the argument where its tensors (None
    aside) are on more than one device. A fake implementation's check:
    torch runs it (the Meta kernel) for a call with a meta tensor beside
    real ones, and its outputs, made on a real one's device, held
    uninitialised memory, returned as the operator's result."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    real = [(name, d) for name, d in devices.items() if d.type != "meta"]
    first_name, first = real[0] if real else next(iter(devices.items()), (None, None))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{op}: {name} is on {device} but {first_name} on {first}: give its tensors on one "
                             "device")


@torch.library.custom_op(f"{_LIB}::voxelize", mutates_args=())
def voxelize(points: Tensor, voxel_size: list[float], batch: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor,
                                                                                       Tensor]:
    """``(coords (M, 4), inverse (N,), perm (N,), seg_ptr (M + 1,))`` of
    :func:`pointsparse.voxelize`: voxels sorted by key, the voxel of each
    point, and the points of voxel ``j`` at ``perm[seg_ptr[j]:seg_ptr[j + 1]]``."""
    return _group_points(points, voxel_size, batch)


@voxelize.register_fake
def _(points, voxel_size, batch):
    voxels = _rows_of(points)
    n = points.shape[0]
    long = dict(dtype=torch.int64)
    return (points.new_empty((voxels, 4), dtype=torch.int32), points.new_empty((n,), **long),
            points.new_empty((n,), **long), points.new_empty((voxels + 1,), **long))


@torch.library.custom_op(f"{_LIB}::segment_reduce", mutates_args=())
def segment_reduce(feats: Tensor, inverse: Tensor, perm: Tensor, seg_ptr: Tensor, mode: int,
                   trusted: bool = False) -> tuple[Tensor, Tensor]:
    """``(out (M, C), arg)`` of :func:`pointsparse.voxelize.segment_reduce`
    (``mode``: ``voxelize.REDUCE_MODES``), differentiable in ``feats``.
    The arguments are checked (as the core checks them, and ``inverse``
    against ``perm`` and ``seg_ptr``: the core reduces by those, the torch
    path and the backward by ``inverse``), unless ``trusted`` (segments the
    graph's own :func:`voxelize` made: a host read on a GPU, each call of a
    program; their dtypes and shapes are checked either way). ``feats``
    of another dtype than
    float16, bfloat16, float32 or float64 is a TypeError, as voxelize's."""
    check_float_dtype(feats, "feats")  # (integers were summed in float32, max a bare torch error)
    if not trusted:  # (both paths: the core reduces by perm and seg_ptr, its backward by inverse)
        _check_segments(feats, inverse, perm, seg_ptr, mode)
    else:  # (the dtypes and shapes read no value: checked trusted too)
        _check_segment_shapes(feats, inverse, perm, seg_ptr, mode)
    out, arg = _segment_reduce(feats, inverse, perm, seg_ptr, mode)
    return out, (arg.clone() if arg is inverse or arg is perm else arg)


@segment_reduce.register_fake
def _(feats, inverse, perm, seg_ptr, mode, trusted=False):
    _one_device("segment_reduce", feats=feats, inverse=inverse, perm=perm, seg_ptr=seg_ptr)
    voxels, c = seg_ptr.shape[0] - 1, feats.shape[1]
    arg_shape = {2: (voxels, c), 3: (voxels,)}.get(mode, (0,))
    return feats.new_empty((voxels, c)), feats.new_empty(arg_shape, dtype=torch.int64)


def _segment_setup(ctx, inputs, output):
    feats, inverse, perm, seg_ptr, mode, _trusted = inputs
    ctx.save_for_backward(inverse, seg_ptr, output[1])
    ctx.mode, ctx.num_rows = mode, feats.shape[0]


def _segment_backward(ctx, grad, grad_arg):
    inverse, seg_ptr, arg = ctx.saved_tensors
    return _segment_reduce_backward(grad, inverse, seg_ptr, arg, ctx.mode, ctx.num_rows), None, None, None, None, None


segment_reduce.register_autograd(_segment_backward, setup_context=_segment_setup)


@torch.library.custom_op(f"{_LIB}::trilinear_weights", mutates_args=())
def trilinear_weights(coords: Tensor, stride: list[int], points: Tensor, voxel_size: list[float],
                      batch: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """``(idx (N, 8), weights (N, 8))`` of :func:`pointsparse.voxelize.trilinear_weights`
    for voxels ``coords`` at tensor ``stride``."""
    tensor = SparseTensor(coords.new_empty((coords.shape[0], 0), dtype=torch.float32), coords, stride,
                          validate=False)
    return _trilinear_weights(tensor, points, voxel_size, batch)


@trilinear_weights.register_fake
def _(coords, stride, points, voxel_size, batch):
    _one_device("trilinear_weights", coords=coords, points=points, batch=batch)
    n = points.shape[0]
    wide = torch.float64 if points.dtype == torch.float64 else torch.float32
    return points.new_empty((n, 8), dtype=torch.int64), points.new_empty((n, 8), dtype=wide)


@torch.library.custom_op(f"{_LIB}::voxel_rows", mutates_args=())
def voxel_rows(coords: Tensor, stride: list[int], point_coords: Tensor) -> Tensor:
    """:func:`pointsparse.models.spvcnn.point_rows`: the row of the voxels
    ``coords`` (at tensor ``stride``) holding each point's stride-1 voxel.
    ``point_coords`` must be int32 ``(N, 4)`` as ``coords`` are (TypeError /
    ValueError naming it, from point_rows; a program's argument may be anything)."""
    from .models.spvcnn import point_rows

    tensor = SparseTensor(coords.new_empty((coords.shape[0], 0), dtype=torch.float32), coords, stride,
                          validate=False)
    return point_rows(tensor, point_coords)


@voxel_rows.register_fake
def _(coords, stride, point_coords):
    _one_device("voxel_rows", coords=coords, point_coords=point_coords)
    return point_coords.new_empty((point_coords.shape[0],), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::point_coords", mutates_args=())
def point_coords(coords: Tensor, inverse: Tensor, points: Tensor, point_batch: Tensor) -> Tensor:
    """:func:`pointsparse.models.spvcnn.checked_point_coords`: ``coords[inverse]``,
    the voxel coords of each point, once the points' values are checked
    against the voxels (``inverse``'s rows, each point in its voxel, its
    batch): a ValueError naming the first point that fails."""
    from .models.spvcnn import checked_point_coords

    return checked_point_coords(coords, inverse, points, point_batch)


@point_coords.register_fake
def _(coords, inverse, points, point_batch):
    _one_device("point_coords", coords=coords, inverse=inverse, points=points, point_batch=point_batch)
    return coords.new_empty((inverse.shape[0], coords.shape[1]))


@torch.library.custom_op(f"{_LIB}::keep_rows", mutates_args=())
def keep_rows(scores: Tensor, batch: Tensor, keep_ratio: Optional[float], threshold: Optional[float]) -> Tensor:
    """:func:`pointsparse.nn.functional.keep_per_batch`: the sorted int64
    rows a :class:`~pointsparse.nn.VoxelPrune` keeps (per batch item the
    ``ceil(keep_ratio * n)`` highest ``scores``, or every score ``>=
    threshold`` where that is given)."""
    from .nn.functional import keep_per_batch

    rows = keep_per_batch(scores, batch, keep_ratio, threshold)
    if threshold is not None and scores.numel() and not rows.numel():
        # eager mode carries on with no voxel; a graph was traced for at least one (batch norm, the maps)
        raise ValueError(f"VoxelPrune(threshold={threshold}) kept no voxel of the {scores.numel()} it scored: a "
                         "compiled or exported graph needs at least one (lower the threshold, or use keep_ratio)")
    return rows


@keep_rows.register_fake
def _(scores, batch, keep_ratio, threshold):
    # a keep ratio keeps at least one voxel of every batch item, a threshold at least one in all (checked)
    return scores.new_empty((_rows_of(scores),), dtype=torch.int64)


@torch.library.custom_op(f"{_LIB}::batch_counts", mutates_args=())
def batch_counts(coords: Tensor, channels: int, element_size: int) -> Tensor:
    """int64 ``(B,)``: the sites of each batch item, ``B`` the largest batch
    index of ``coords`` + 1 (0 without rows): the rows of a global pooling's
    dense output, a size a graph reads only from this operator (checked
    against :data:`pointsparse.nn.functional.MAX_GLOBAL_POOL_BYTES` for
    ``channels`` values of ``element_size`` bytes a row, as eager mode).
    ``coords`` int32 ``(N, 4)`` with batch indices >= 0 (a TypeError /
    ValueError naming them; the smallest index read with the largest)."""
    from .nn.functional import check_global_pool_size

    _coords.check_coords(coords, "coords")
    if channels < 0:  # (the size limit's factors: a negative one let any batch index through it)
        raise ValueError(f"channels must be >= 0 (the pooled feats' channels); got {channels}")
    if element_size < 1:
        raise ValueError(f"element_size must be >= 1 (bytes of one value); got {element_size}")
    batch = coords[:, 0].long()
    b = 0
    if batch.numel():
        lo, hi = torch.stack(torch.aminmax(batch)).tolist()  # (one host read, as the largest alone took)
        if lo < 0:
            raise ValueError(f"coords hold a negative batch index ({lo}); batch indices must be >= 0")
        b = hi + 1
    check_global_pool_size(b, channels, element_size, "a global pooling")
    return torch.bincount(batch, minlength=b)


@batch_counts.register_fake
def _(coords, channels, element_size):
    items = _rows_of(coords)
    return coords.new_empty((items,), dtype=torch.int64)


# --- maps inside a traced graph -------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class GraphMap:
    """A kernel map as the tensors of a traced graph (the eager
    :class:`~pointsparse.kmap.KernelMap` reads sizes on the host)."""

    out_coords: Tensor
    in_idx: Tensor
    out_idx: Tensor
    sizes: Tensor
    key: _kmap.KernelMapKey


class GraphCache(CoordinateCache):
    """The coordinate cache of the tensors a traced graph makes. A layer that
    meets a tensor with an eager cache (the graph's input) starts a new one
    seeded with that tensor's coords, so a graph never reads or writes its
    inputs' caches (no guards on their contents, no side effects, no
    recompilation for a tensor whose cache already holds eager maps).
    ``valid``: the tensor strides whose coords are known, at trace time, to
    be unique multiples of their stride when the graph runs: made by the
    graph's own downsampling, or checked by an earlier map built on them as
    its input side; maps on them are built ``trusted`` (no check, no search
    for a 1x1x1 map). The graph's input coords are checked by the first map
    built on them."""

    def __init__(self) -> None:
        super().__init__()
        self.valid: set = set()


def graph_cache(tensor: SparseTensor) -> GraphCache:
    """``tensor``'s cache if it was made in this graph, else a fresh one."""
    if isinstance(tensor.cache, GraphCache):
        return tensor.cache
    cache = GraphCache()
    cache.set_coords(tensor.stride, tensor.coords)
    kept = tensor.cache.kept.get(tensor.stride)  # (a selection made before the graph: devoxelize needs it)
    if kept is not None:
        cache.kept[tensor.stride] = kept
    return cache


def _graph_key(key: _kmap.KernelMapKey) -> tuple:
    return tuple(key_to_list(key))


def get_kmap(tensor: SparseTensor, k: Triple, t: Triple, d: Triple, transposed: bool = False,
             cache: GraphCache | None = None) -> GraphMap:
    """:func:`pointsparse.kmap.get_kmap` for traced graphs (kernel size,
    stride and dilation normalised 3-tuples): the same maps, built by the
    operators above and cached in ``cache`` (default :func:`graph_cache` of
    ``tensor``)."""
    cache = graph_cache(tensor) if cache is None else cache
    if not transposed:
        return _down_map(cache, tensor.coords, tensor.stride, k, t, d)
    if any(a % b for a, b in zip(tensor.stride, t)):
        raise ValueError(f"a transposed conv with stride {t} needs a tensor stride divisible by it; got {tensor.stride}")
    fine_stride: Triple = tuple(a // b for a, b in zip(tensor.stride, t))  # type: ignore[assignment]
    fine = cache.get_coords(fine_stride)
    if fine is None:
        raise ValueError(
            f"transposed conv: no coords at stride {fine_stride} in this tensor's coordinate cache; a transposed "
            f"conv upsamples back to coords that a strided conv of the same graph came down from")
    up_key = _kmap.KernelMapKey(fine_stride, k, t, d, True)

    def make_up():
        down = _down_map(cache, fine, fine_stride, k, t, d, None if t == (1, 1, 1) else tensor.coords)
        in_idx, out_idx = kmap_transpose(down.out_coords, fine, down.in_idx, down.out_idx, down.sizes,
                                         key_to_list(down.key), True)  # (the graph's own map: trusted)
        return GraphMap(fine, in_idx, out_idx, down.sizes, up_key)

    return cache.get_kmap(_graph_key(up_key), make_up)


def _down_map(cache, coords, tensor_stride, k, t, d, out_coords=None) -> GraphMap:
    key = _kmap.KernelMapKey(tensor_stride, k, t, d, False)
    out_stride = key.out_stride

    def make():
        known = out_coords
        trusted = tensor_stride in cache.valid
        if known is None and t != (1, 1, 1):
            known = cache.get_coords(out_stride)
            if known is None and _kmap._tiles_its_stride(k, t, d):  # the output coords and the map in one pass
                parents, in_idx, out_idx, sizes = kmap_parents(coords, key_to_list(key), trusted)
                cache.valid.update((tensor_stride, out_stride))
                return GraphMap(parents, in_idx, out_idx, sizes, key)
            if known is None:
                known = downsample(coords, list(out_stride))  # unique multiples of out_stride by construction
                cache.valid.add(out_stride)
        if known is not None:
            trusted = trusted and out_stride in cache.valid
        in_idx, out_idx, sizes = kmap_build(coords, known, key_to_list(key), trusted)
        cache.valid.add(tensor_stride)  # the build checked its input coords when they were not trusted
        return GraphMap(coords if known is None else known, in_idx, out_idx, sizes, key)

    kmap = cache.get_kmap(_graph_key(key), make)
    cache.set_coords(out_stride, kmap.out_coords)
    return kmap


def select_voxels(input: SparseTensor, rows: Tensor, feats: Tensor | None) -> SparseTensor:
    """:func:`pointsparse.nn.functional.select_voxels` in a traced graph:
    the kept sites with a :class:`GraphCache` of their own that holds the
    kept coords at ``input``'s stride and, from ``input``'s graph cache, the
    coords of every finer stride and the maps among finer strides only (so
    later convs map the kept voxels and transposed convs come back to the
    skip connections' coords), and its downsampling maps onto these sites
    restricted to the kept ones when a conv asks for them
    (:func:`kmap_restrict`). Kept coords are a subset of ``input``'s, so
    they are trusted where those were."""
    source = graph_cache(input)
    here = input.stride
    cache = GraphCache()
    source.copy_finer(here, cache)
    cache.valid = {s for s in list(source.valid) if s in cache.coords or s == here}  # (a snapshot: eager's)
    coords = input.coords.index_select(0, rows)
    cache.set_coords(here, coords)
    cache.note_kept(here, rows, input.coords.shape[0], source)
    cache.origin = source.input_coords()  # (eager's select_voxels: the batch items, should the kept rows drop one)
    # The graph's downsampling maps onto these sites restricted to the kept ones when a transposed conv asks
    # for them (eager's select_voxels: the same maps, no search; of a selection, through both selections' rows)
    for graph_key, m, before in source.maps_onto(here, input.coords):
        fine = source.get_coords(m.key.tensor_stride)
        if fine is not None:
            kept = rows if before is None else before.index_select(0, rows)
            cache.derived[graph_key] = Restriction(m, kept, coords, functools.partial(_restricted, fine=fine))
    feats = input.feats.index_select(0, rows) if feats is None else feats
    return SparseTensor(feats, coords, here, cache=cache, validate=False)


def _restricted(m: GraphMap, rows: Tensor, coords: Tensor, fine: Tensor) -> GraphMap:
    in_idx, out_idx, sizes = kmap_restrict(fine, m.out_coords, m.in_idx, m.out_idx, m.sizes, key_to_list(m.key), rows,
                                           coords)
    return GraphMap(coords, in_idx, out_idx, sizes, m.key)


def check_same_coords(coords: Tensor, like: Tensor, message: str) -> None:
    """In a traced graph: ``coords`` are ``like`` row for row, else
    ``message``. The same tensor (checked while tracing) adds nothing to the
    graph; another one a check of its count and a run-time assertion that
    the rows are equal (eager compares the values with ``torch.equal``, a
    data-dependent graph break here)."""
    if coords is like:
        return
    # (equal counts first, as the row-wise compare needs; both may be known only when the graph runs)
    torch._check(coords.shape[0] == like.shape[0], lambda: message)
    torch._assert_async((coords == like.to(coords.dtype)).all(), message)


def conv3d(input: SparseTensor, weight: Tensor, bias: Tensor | None, kernel_size: Triple, stride: Triple,
           dilation: Triple, transposed: bool, add: SparseTensor | None = None, relu: bool = False,
           widen: bool = False) -> SparseTensor:
    """:func:`pointsparse.nn.functional.conv3d` in a traced graph (arguments
    already checked): the map from the graph's cache, the :func:`conv`
    operator, then the residual ``add`` (a SparseTensor or None) and the
    ReLU; where no gradient is needed, :func:`conv_inference` (both in the
    kernel's store).

    ``add`` must lie on the output's stride (static: a ValueError while
    tracing, as eager's) and coords: the same coords tensor (the graph's
    cache hands every map of one stride the same one, checked while
    tracing, nothing in the graph), else a run-time assertion in the graph
    that they are equal row for row (eager compares the values; here
    without a data-dependent guard, so no graph break).

    ``widen`` (bf16 inference of a conv with a kernel region, and a conv
    in autocast's precision that is no bf16 inference without a region:
    what eager runs as "bf16 on float32"): :func:`conv_inference` (or, where
    a gradient is needed, :func:`conv`) on the feats, weight and bias
    widened to float32 (a residual of the feats' dtype too, summed before
    the ReLU), rounded once to the feats' dtype, as eager does (the bf16
    kernels would sum in another
    order: other bits; a bf16 operator's gradients would run the torch
    loop in bf16)."""
    cache = graph_cache(input)
    kmap = get_kmap(input, kernel_size, stride, dilation, transposed, cache)
    if add is not None:
        out_stride = kmap.key.out_stride
        if add.stride != out_stride:
            raise ValueError(f"add must be on the conv's output coords (stride {out_stride}, in their order); "
                             f"got stride {add.stride}")
        check_same_coords(add.coords, kmap.out_coords, "add must be on the conv's output coords (in their order); "
                          "got other coords")
        add = add.feats
    args = (input.feats, weight, bias, kmap.out_coords, kmap.in_idx, kmap.out_idx, kmap.sizes, key_to_list(kmap.key))
    differentiated = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                     for t in (input.feats, weight, bias, add))
    # conv3d applied autocast's rule to its arguments (eager's: a kernel region widened, which the operators
    # cannot see): the operators' own rule must not apply it again (a torch.export program records no
    # ambient autocast: its operators take the rule when it runs)
    device = input.feats.device.type
    as_given = torch.is_autocast_enabled(device) and not torch.compiler.is_exporting()
    with torch.autocast(device, enabled=False) if as_given else contextlib.nullcontext():
        if widen:
            feats = _widened(*args[:3], args[3:], add, relu, differentiated, input.feats.dtype)
        elif not differentiated:
            feats = conv_inference(*args, add, relu)
        else:
            feats = conv(*args)
            if add is not None:
                feats = feats + add
            if relu:
                feats = torch.relu(feats)
    return SparseTensor(feats, kmap.out_coords, kmap.key.out_stride, cache=cache, validate=False)
