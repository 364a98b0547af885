"""Points to voxels and back: ``voxelize`` (quantise, merge, reduce features)
and ``devoxelize`` (nearest by the inverse map, or trilinear over the 8
surrounding voxels), both differentiable in the features."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import _ext
from . import coords as _coords
from .tensor import SparseTensor, as_float, check_float_dtype

REDUCE_MODES = {"sum": 0, "mean": 1, "max": 2, "first": 3}
#: The feature dtypes the core reduces (others take the torch path).
FLOAT_DTYPES = _ext.FLOAT_DTYPES


def _voxel_size(voxel_size) -> tuple[float, float, float]:
    """A positive number (Python, numpy or a 0-d tensor) or 3 of them."""
    message = f"voxel_size must be a positive number or 3 numbers; got {voxel_size!r}"
    if voxel_size is None or isinstance(voxel_size, (str, bytes)):
        raise TypeError(message)
    scalar = not (isinstance(voxel_size, (list, tuple)) or getattr(voxel_size, "ndim", 0) == 1)
    try:
        vs = (as_float(voxel_size, "voxel_size"),) * 3 if scalar else tuple(
            as_float(v, "voxel_size") for v in voxel_size)
    except TypeError:
        raise TypeError(message) from None
    if len(vs) != 3:
        raise ValueError(f"voxel_size must be a number or 3 numbers; got {len(vs)}")
    if not all(v > 0 and math.isfinite(v) for v in vs):
        raise ValueError(f"voxel_size must be positive and finite; got {voxel_size!r}")
    return vs  # type: ignore[return-value]


def _check_points(points, name="points", values: bool = True) -> None:
    """Type and shape of ``points``; with ``values`` also that every
    coordinate is finite (a path whose core checks them itself passes
    False and calls :func:`_check_finite` where the core does not run)."""
    if not isinstance(points, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(points).__name__}")
    check_float_dtype(points, name, "(N, 3)")  # (float8 passed is_floating_point and failed inside torch)
    _coords.check_has_data(points, name)
    if points.dim() != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3) [x, y, z]; got shape {tuple(points.shape)}")
    if values:
        _check_finite(points, name)


def _check_finite(points, name="points") -> None:
    if torch.compiler.is_compiling():  # in a graph the core checks the values when it runs
        return
    if points.numel() and not bool(torch.isfinite(points).all()):
        row = int((~torch.isfinite(points)).any(1).nonzero()[0, 0])
        raise ValueError(f"{name} row {row} is not finite: {points[row].tolist()}")


def _check_extent(points, vs, batch, bounds=None) -> None:
    """Before anything is quantised (from the points' bounds alone): every
    ``floor(points / voxel_size)`` within int32, and the voxels' x, y, z
    spans with the batch count within a coordinate key; ValueError naming
    ``voxel_size``, the points' extent and the voxels' span otherwise. A
    non-finite row is refused here naming it. In a compiled graph the core
    checks the same when it runs. ``bounds``: ``(low, high)``, the points'
    x, y, z minima and maxima exactly, where the caller already knows them
    (then the points are not read again); None: read here."""
    if torch.compiler.is_compiling() or points.numel() == 0:
        return
    if bounds is None:
        # (column by column: twice as fast as dim=0; one trip to the host for the six, not six syncs on a GPU;
        # stacked as outside autocast, whose stack refuses a 16-bit dtype other than its own: "Unexpected
        # floating ScalarType in at::autocast::prioritize", fp16 points under bf16 autocast)
        with torch.autocast(points.device.type, enabled=False):
            bounds = torch.stack([torch.stack(torch.aminmax(points[:, a])) for a in range(3)]).tolist()
        low, high = [b[0] for b in bounds], [b[1] for b in bounds]
    else:
        low, high = [float(v) for v in bounds[0]], [float(v) for v in bounds[1]]
    if not all(map(math.isfinite, low + high)):
        _check_finite(points)
    # float64 division and floor, as both quantising paths take them: the bounds' voxels are the voxels' bounds
    first, last = [lo / v for lo, v in zip(low, vs)], [hi / v for hi, v in zip(high, vs)]
    extent = f"the points' extent (x, y, z from {_listed(low)} to {_listed(high)})"
    if not all(map(math.isfinite, first + last)):
        raise ValueError(f"voxel_size {_shown(vs)} is too small for {extent}: points / voxel_size leaves float64")
    first, last = [math.floor(q) for q in first], [math.floor(q) for q in last]
    if min(first) < _coords.COORD_MIN or max(last) > _coords.COORD_MAX:
        raise ValueError(f"voxel_size {_shown(vs)} puts {extent} in voxels {_listed(first)} to {_listed(last)}; "
                         f"voxel coordinates (floor(points / voxel_size)) must lie in the int32 range "
                         f"[{_coords.COORD_MIN}, {_coords.COORD_MAX}] (shift the cloud or use a larger voxel_size)")
    top = 0 if batch is None else int(batch.max())
    try:
        _coords.KeyLayout.fit([0, *first], [top, *last])
    except ValueError as exc:
        raise ValueError(f"voxel_size {_shown(vs)} spreads {extent} over voxels {_listed(first)} to "
                         f"{_listed(last)}: {exc} (or use a larger voxel_size)") from None


def _listed(values) -> str:
    """Numbers for a message: 10 significant digits each."""
    return "[" + ", ".join(f"{float(v):.10g}" for v in values) + "]"


def _shown(vs) -> str:
    """A voxel size as given to the user: one number where all three agree."""
    return repr(vs[0]) if vs[0] == vs[1] == vs[2] else repr(tuple(vs))


def _check_batch_on(tensor: SparseTensor, points: torch.Tensor, batch) -> torch.Tensor | None:
    """``batch`` checked against ``points`` (:func:`_check_batch`), and the
    points on ``tensor``'s device, a ValueError naming both devices
    otherwise: the trilinear devoxelisation's (devoxelize, trilinear_weights)."""
    batch = _check_batch(batch, points.shape[0], points.device)
    if points.device != tensor.device:
        raise ValueError(f"points are on {points.device} but the tensor on {tensor.device}")
    return batch


def _check_batch(batch, n: int, device) -> torch.Tensor | None:
    if batch is None:
        return None
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"batch must be a torch.Tensor of integer batch indices; got {type(batch).__name__}")
    _coords.check_has_data(batch, "batch")
    if batch.is_floating_point() or batch.is_complex() or batch.dtype == torch.bool:
        raise TypeError(f"batch must hold integer batch indices; got dtype {batch.dtype}")
    if batch.dim() != 1 or batch.shape[0] != n:
        raise ValueError(f"batch must be (N,) with N = {n} points; got shape {tuple(batch.shape)}")
    if batch.device != device:
        raise ValueError(f"batch is on {batch.device} but points on {device}")
    batch = batch.long()  # (torch has no min of uint16/32/64; a uint64 past int64 turns negative, refused)
    if n and not torch.compiler.is_compiling() and (int(batch.min()) < 0 or int(batch.max()) > _coords.BATCH_MAX):
        raise ValueError(f"batch indices must lie in [0, {_coords.BATCH_MAX}]")
    return batch


def _quantize_torch(points, vs, batch):
    q = torch.floor(points.double() / torch.tensor(vs, dtype=torch.float64, device=points.device))
    if q.numel() and (bool((q < _coords.COORD_MIN).any()) or bool((q > _coords.COORD_MAX).any())):
        row = int(((q < _coords.COORD_MIN) | (q > _coords.COORD_MAX)).any(1).nonzero()[0, 0])
        raise ValueError(
            f"points row {row} cannot be voxelised: points / voxel_size must lie in the int32 range "
            f"[{_coords.COORD_MIN}, {_coords.COORD_MAX}] (shift the cloud or use a larger voxel_size)")
    b = batch if batch is not None else torch.zeros(points.shape[0], dtype=torch.int64, device=points.device)
    coords = torch.cat([b[:, None], q.long()], 1).to(torch.int32)
    layout = _coords.KeyLayout.of(coords)
    return _coords.pack_torch(coords, layout), layout


def _points_np(points: torch.Tensor):
    """Points as the core takes them: float32 or float64 as they are, other
    float dtypes as float32."""
    return _ext.to_numpy(points) if points.dtype in FLOAT_DTYPES else _ext.to_numpy(points, torch.float32)


def group_points(points: torch.Tensor, voxel_size, batch=None):
    """``(coords (M, 4), inverse, perm, seg_ptr)`` of the voxels of ``points``
    (sorted by key; the points of voxel ``j`` at ``perm[seg_ptr[j]:seg_ptr[j +
    1]]``): one core call (``core.voxelize`` with no feature columns) where
    the core serves, else quantise, unique and unpack in torch ops."""
    _check_points(points)
    vs, batch = _voxel_size(voxel_size), _check_batch(batch, points.shape[0], points.device)
    _check_extent(points, vs, batch)
    return _group(points, vs, batch)


def _group(points, vs, batch):
    """:func:`group_points` of checked arguments."""
    if _ext.serves(points):
        b = None if batch is None else _ext.to_numpy(batch)
        no_feats = _ext.to_numpy(points.new_zeros((points.shape[0], 0), dtype=torch.float32))
        out = _ext.call(_ext.core.voxelize, _points_np(points), no_feats, list(vs), b, REDUCE_MODES["sum"])
        return tuple(_ext.to_tensor(a) for a in out[:4])
    keys, layout = _quantize_torch(points, vs, batch)
    uniq, inverse, perm, seg_ptr = _coords.unique_torch(keys)
    return _coords.unpack_torch(uniq, layout, trusted=True), inverse, perm, seg_ptr  # (keys packed here)


def quantize_keys(points: torch.Tensor, voxel_size, batch=None):
    """``(keys, layout)``: int64 keys of ``floor(points / voxel_size)`` (with
    batch) in the :class:`~pointsparse.coords.KeyLayout` fitted to them.
    ValueError when a voxel coordinate leaves int32 or the voxels' span does
    not fit a key."""
    _check_points(points)
    vs = _voxel_size(voxel_size)
    batch = _check_batch(batch, points.shape[0], points.device)
    _check_extent(points, vs, batch)
    if not _ext.serves(points):
        return _quantize_torch(points, vs, batch)
    b = None if batch is None else _ext.to_numpy(batch)
    keys, fields = _ext.call(_ext.core.quantize, _points_np(points), list(vs), b)
    return _ext.to_tensor(keys), _coords.KeyLayout(tuple(fields[:3]), tuple(fields[3:]))


def segment_reduce(feats, inverse, perm, seg_ptr, mode: int):
    """``(out (M, C), arg)``: rows ``perm[seg_ptr[j]:seg_ptr[j + 1]]`` of
    ``feats`` reduced into row ``j`` (``REDUCE_MODES``); ``arg`` the source
    rows of max (M, C) / first (M,), empty otherwise."""
    if _ext.serves(feats, dtypes=FLOAT_DTYPES):
        out, arg = _ext.call(_ext.core.segment_reduce, _ext.to_numpy(feats), _ext.to_numpy(perm),
                             _ext.to_numpy(seg_ptr), mode)
        return _ext.to_tensor(out), _ext.to_tensor(arg)
    return _segment_reduce_torch(feats, inverse, perm, seg_ptr, mode)


def check_segment_shapes(feats, inverse, perm, seg_ptr, mode: int) -> None:
    """The part of :func:`check_segments` that reads no value (no host read:
    the ``segment_reduce`` operator runs it on trusted segments too):
    ``mode``; ``feats`` 2-D; ``inverse``, ``perm`` and ``seg_ptr`` int64 or
    int32 tensors, ``inverse`` and ``perm`` 1-D with one entry per row of
    ``feats``, ``seg_ptr`` 1-D and non-empty. A TypeError (dtype) or
    ValueError naming the argument."""
    if not isinstance(mode, int) or not 0 <= mode <= 3:
        raise ValueError("mode must be 0 (sum), 1 (mean), 2 (max) or 3 (first)")
    if feats.dim() != 2:
        raise ValueError(f"feats must be 2-D (N, C); got shape {tuple(feats.shape)}")
    for name, t in (("inverse", inverse), ("perm", perm), ("seg_ptr", seg_ptr)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be an integer tensor (int64 or int32); got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    n = feats.shape[0]
    for name, t in (("perm", perm), ("inverse", inverse)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{name} must be 1-D of length {n}; got shape {tuple(t.shape)}")
    if seg_ptr.dim() != 1 or seg_ptr.shape[0] < 1:
        raise ValueError("seg_ptr must be 1-D, non-empty")


def check_segments(feats, inverse, perm, seg_ptr, mode: int) -> None:
    """What the core's ``segment_reduce`` checks (``mode``; ``perm`` 1-D,
    one row of ``feats`` each; ``seg_ptr`` tiling them, strictly
    increasing), and the ``inverse`` the torch path and the backward reduce
    by (1-D, one voxel in ``[0, M)`` each, the voxel whose segment of
    ``perm`` holds the point; ``perm`` a permutation): a ValueError naming
    the argument, as the core's. :func:`check_segment_shapes`, then two
    host reads for the values."""
    check_segment_shapes(feats, inverse, perm, seg_ptr, mode)
    n = feats.shape[0]
    m = seg_ptr.shape[0] - 1
    ends = (seg_ptr[0] != 0) | (seg_ptr[-1] != n)
    flags = torch.stack([ends, (seg_ptr[1:] <= seg_ptr[:-1]).any(), ((perm < 0) | (perm >= n)).any(),
                         ((inverse < 0) | (inverse >= m)).any()]).tolist()
    messages = ("seg_ptr must start at 0 and end at len(perm)", "seg_ptr must be strictly increasing",
                "perm holds a row outside [0, len(feats))",
                f"inverse holds a voxel outside [0, {m}) (the seg_ptr's {m} voxels)")
    for bad, message in zip(flags, messages):
        if bad:
            raise ValueError(message)
    # one voxel map: the core reduces by perm and seg_ptr, the torch path and every backward by inverse
    segment = torch.repeat_interleave(torch.arange(m, device=seg_ptr.device), seg_ptr.diff(), output_size=n)
    # (the ones in the count's dtype: int32 segments, which the dtype check takes, were a bare RuntimeError)
    ones = torch.ones_like(perm, dtype=torch.int64)
    once = torch.zeros(n, dtype=torch.int64, device=perm.device).index_add_(0, perm, ones) == 1
    flags = torch.stack([~once.all(), (inverse[perm] != segment.to(inverse.device)).any()]).tolist()
    if flags[0]:
        raise ValueError("perm must hold each row of feats once (a permutation of [0, len(feats)))")
    if flags[1]:
        raise ValueError("inverse disagrees with perm and seg_ptr: the points perm[seg_ptr[j]:seg_ptr[j + 1]] "
                         "must be those inverse maps into voxel j (voxelize's inverse, perm and seg_ptr are)")


def segment_reduce_backward(grad, inverse, seg_ptr, arg, mode: int, num_rows: int):
    """The gradient of :func:`segment_reduce` for its ``num_rows`` feats:
    each voxel's gradient routed to the points it came from."""
    if mode in (0, 1):
        g = grad[inverse]
        if mode == 1:
            # (the counts in float32 at least: float16 holds no count past 65504, bfloat16 rounds them past 256)
            counts = (seg_ptr[1:] - seg_ptr[:-1]).to(torch.promote_types(grad.dtype, torch.float32))
            g = (g / counts[inverse][:, None]).to(grad.dtype)
        return g
    g = grad.new_zeros((num_rows, grad.shape[1]))
    if mode == 3:
        g[arg] = grad
    else:
        g.scatter_(0, arg, grad)
    return g


class _SegmentReduce(torch.autograd.Function):
    """:func:`segment_reduce` with autograd: ``(out, arg)``, differentiable
    in ``out`` (``arg``, which the backward needs, is an output: the forward
    takes no ctx, so that torch.func transforms run it on plain tensors)."""

    @staticmethod
    def forward(feats, inverse, perm, seg_ptr, mode: int):
        return segment_reduce(feats, inverse, perm, seg_ptr, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        feats, inverse, _perm, seg_ptr, mode = inputs
        arg = output[1]
        ctx.mark_non_differentiable(arg)
        ctx.mode = mode
        ctx.n = feats.shape[0]
        ctx.save_for_backward(inverse, seg_ptr, arg)

    @staticmethod
    def backward(ctx, grad, _grad_arg):
        inverse, seg_ptr, arg = ctx.saved_tensors
        return segment_reduce_backward(grad, inverse, seg_ptr, arg, ctx.mode, ctx.n), None, None, None, None


def _voxelize_core(feats, points, voxel_size, batch, mode: int, with_arg: bool = True):
    """The core's one-call voxelisation: ``(reduced, coords, inverse,
    seg_ptr, arg)``; ``with_arg=False`` where no gradient will need ``arg``
    (then empty: a max's source rows were an int64 ``(M, C)``, twice the
    float32 output, made under ``no_grad`` too)."""
    b = None if batch is None else _ext.to_numpy(batch)
    out = _ext.call(_ext.core.voxelize, _points_np(points), _ext.to_numpy(feats), list(voxel_size), b, mode,
                    with_arg=with_arg)
    coords, inverse, _perm, seg_ptr, reduced, arg = (_ext.to_tensor(a) for a in out)
    return reduced, coords, inverse, seg_ptr, arg


class _VoxelizeCore(torch.autograd.Function):
    """The whole voxelisation in one core call (quantise, group, reduce):
    ``(reduced, coords, inverse, seg_ptr, arg)``, differentiable in ``feats``
    as :class:`_SegmentReduce` (``seg_ptr`` and ``arg``, which the backward
    needs, are outputs, as :class:`_SegmentReduce`'s ``arg``)."""

    @staticmethod
    def forward(feats, points, voxel_size, batch, mode: int):
        return _voxelize_core(feats, points, voxel_size, batch, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        feats, _points, _voxel_size, _batch, mode = inputs
        _reduced, coords, inverse, seg_ptr, arg = output
        ctx.mark_non_differentiable(coords, inverse, seg_ptr, arg)
        ctx.mode = mode
        ctx.n = feats.shape[0]
        ctx.save_for_backward(inverse, seg_ptr, arg)

    @staticmethod
    def backward(ctx, grad, _grad_coords, _grad_inverse, _grad_seg_ptr, _grad_arg):
        inverse, seg_ptr, arg = ctx.saved_tensors
        return segment_reduce_backward(grad, inverse, seg_ptr, arg, ctx.mode, ctx.n), None, None, None, None


def _segment_reduce_torch(feats, inverse, perm, seg_ptr, mode):
    m = seg_ptr.numel() - 1
    c = feats.shape[1]
    idx = inverse[:, None].expand(-1, c)
    if mode in (0, 1):
        # float16 and bfloat16 summed in float32 (float16 made 2000 points of 100 inf, and their mean too)
        wide = torch.promote_types(feats.dtype, torch.float32)
        # (out of place: under torch.func.vmap a batch of feats into an unbatched zeros cannot go in place)
        out = feats.new_zeros((m, c), dtype=wide).index_add(0, inverse, feats.to(wide))
        if mode == 1:
            out = out / (seg_ptr[1:] - seg_ptr[:-1]).to(wide)[:, None]
        return out.to(feats.dtype), feats.new_zeros(0, dtype=torch.int64)
    if mode == 3:
        first = perm[seg_ptr[:-1]]
        return feats[first], first
    out = feats.new_full((m, c), -float("inf")).scatter_reduce(0, idx, feats, "amax", include_self=True)
    # the first (lowest) row attaining each maximum, as the C++ kernel picks;
    # amax propagates NaN, and then the first NaN row is the one
    rows = torch.arange(feats.shape[0], device=feats.device)[:, None].expand(-1, c)
    best = out[inverse]
    attains = (feats == best) | (torch.isnan(feats) & torch.isnan(best))
    hit = torch.where(attains, rows, torch.full_like(rows, feats.shape[0]))
    arg = torch.full((m, c), feats.shape[0], dtype=torch.int64, device=feats.device)
    arg = arg.scatter_reduce(0, idx, hit, "amin", include_self=True)
    return out, arg


def _from_numpy(value, name: str):
    """A numpy array as a tensor of its values (``torch.from_numpy``: shared
    where it can be; a copy where the array is read-only, of the other byte
    order or of negative strides, which torch does not take); anything else
    as given. A TypeError names ``name`` where torch has no dtype for the
    array's (objects, strings), and for a masked array (its mask would be
    dropped)."""
    if not isinstance(value, np.ndarray):
        return value
    if isinstance(value, np.ma.MaskedArray):  # (from_numpy took its data and dropped its mask)
        raise TypeError(f"{name}: a numpy masked array; give the points to keep (array[~array.mask.any(1)], or "
                        ".filled())")
    if value.dtype.byteorder not in "=|":
        value = value.astype(value.dtype.newbyteorder("="))
    if not value.flags.writeable or any(step < 0 for step in value.strides):  # (from_numpy takes neither)
        value = value.copy()
    try:
        return torch.from_numpy(value)
    except TypeError:
        raise TypeError(f"{name}: a numpy array of dtype {value.dtype}, which torch holds no tensor of; give "
                        "numbers") from None


def voxelize(points: torch.Tensor, feats: torch.Tensor | None = None, voxel_size=1.0, batch=None,
             reduce: str = "mean"):
    """Quantise points to voxels of ``voxel_size`` and merge the points that
    share a voxel.

    Args:
        points: float ``(N, 3)`` positions (a tensor, or a numpy array as
            TorchSparse's and MinkowskiEngine's quantisers take: its values
            as ``torch.from_numpy`` gives them, copied only where the array
            is read-only, of negative strides or not in this machine's byte
            order; a masked array is refused).
        feats: float ``(N, C)`` per-point features (likewise); default: the
            positions.
        voxel_size: a positive number or 3 numbers (default 1.0: coords
            ``floor(points)``, MinkowskiEngine's default quantisation size;
            give it by name: the second argument is ``feats``).
        batch: optional ``(N,)`` integer batch index of each point (likewise).
        reduce: how features of one voxel merge: ``"mean"``, ``"max"``, ``"sum"``
            or ``"first"`` (the lowest point index). Non-finite features
            propagate the same way on every path: NaN or inf in a voxel's
            points gives NaN/inf in its mean and sum, and ``"max"`` propagates
            NaN (as ``torch.amax``; its gradient goes to the first NaN point).

    Returns:
        ``(SparseTensor, inverse)``: voxels sorted by (batch, x, y, z) with
        coords ``floor(points / voxel_size)``; ``inverse[i]`` is the row of the
        voxel holding point ``i``. Differentiable in ``feats``.

    A ``voxel_size`` too small for the points (``points / voxel_size``
    past float64 or int32, or the voxels' spans and the batch count past a
    coordinate key's 63 bits) is a ValueError naming it, the points' extent
    and the voxels' span, from the points' bounds before anything is
    quantised.
    """
    points, feats, batch = (_from_numpy(v, name) for v, name in ((points, "points"), (feats, "feats"),
                                                                  (batch, "batch")))
    _check_points(points, values=False)  # the core's pass rejects a non-finite row itself (naming it)
    vs = _voxel_size(voxel_size)
    if not isinstance(reduce, str) or reduce not in REDUCE_MODES:
        raise ValueError(f"reduce must be one of {sorted(REDUCE_MODES)}; got {reduce!r}")
    if feats is None:
        feats = points
    if _a_size(feats):  # (TorchSparse's / ME's order: a size second)
        raise TypeError(f"feats must be a torch.Tensor (N, C) or None; got {type(feats).__name__} {feats!r:.60}: "
                        f"voxel_size is voxelize's third argument (voxelize(points, voxel_size=...))")
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"feats must be a torch.Tensor; got {type(feats).__name__}")
    check_float_dtype(feats, "feats")  # (the SparseTensor's feats: float8 failed inside torch)
    _coords.check_has_data(feats, "feats")
    if feats.dim() != 2 or feats.shape[0] != points.shape[0]:
        raise ValueError(f"feats must be (N, C) with N = {points.shape[0]} points; got shape {tuple(feats.shape)}")
    if feats.device != points.device:
        raise ValueError(f"feats are on {feats.device} but points on {points.device}")
    return _voxelize(points, feats, vs, batch, reduce)


def _a_size(value) -> bool:
    """Whether ``value``, given as feats, reads as a voxel size
    (:func:`_voxel_size` takes it: a positive number, or 3 of them)."""
    if value is None or isinstance(value, torch.Tensor):
        return False
    try:
        _voxel_size(value)
    except (TypeError, ValueError):
        return False
    return True


def _voxelize(points, feats, vs, batch, reduce: str, bounds=None):
    """:func:`voxelize` of checked ``points``, ``feats``, ``vs`` (3 floats)
    and ``reduce`` (``batch`` still unchecked); ``bounds``: the points'
    ``(low, high)`` per axis where the caller already knows them exactly
    (the extent check then reads no points, see :func:`_check_extent`)."""
    if torch.compiler.is_compiling():  # a graph of torch.compile / torch.export: the core as operators
        coords, inverse, perm, seg_ptr = torch.ops.pointsparse.voxelize(points, list(vs), _check_batch(
            batch, points.shape[0], points.device))
        out_feats = torch.ops.pointsparse.segment_reduce(feats, inverse, perm, seg_ptr, REDUCE_MODES[reduce],
                                                         True)[0]  # (the voxelize operator's segments: trusted)
        return SparseTensor(out_feats, coords, 1, validate=False), inverse
    batch = _check_batch(batch, points.shape[0], points.device)
    _check_extent(points, vs, batch, bounds)  # (before the core or torch allocates the quantised coords)
    # forward mode (torch.func.jvp, forward_ad) or a torch.func.vmap batch of feats: the reduction in torch
    # ops, whose own rules carry them (the core's Functions have neither); the grouping is the same
    in_torch = _ext.carries_tangent(feats) or _ext.batched(feats)
    if not in_torch and _ext.serves(feats, dtypes=FLOAT_DTYPES) and _ext.serves(points):  # one trip into the core
        if torch.is_grad_enabled() and feats.requires_grad:
            out_feats, coords, inverse = _VoxelizeCore.apply(feats, points, vs, batch, REDUCE_MODES[reduce])[:3]
        else:  # (no gradient: no source rows of the max / first)
            out_feats, coords, inverse = _voxelize_core(feats, points, vs, batch, REDUCE_MODES[reduce], False)[:3]
        return SparseTensor(out_feats, coords, 1, validate=False), inverse
    _check_finite(points)
    coords, inverse, perm, seg_ptr = _group(points, vs, batch)
    reduce_with = _segment_reduce_torch if in_torch else _SegmentReduce.apply
    out_feats = reduce_with(feats, inverse, perm, seg_ptr, REDUCE_MODES[reduce])[0]
    return SparseTensor(out_feats, coords, 1, validate=False), inverse


def devoxelize(tensor: SparseTensor, inverse: torch.Tensor | None = None, *, points: torch.Tensor | None = None,
               voxel_size=None, batch=None, mode: str = "nearest") -> torch.Tensor:
    """Voxel features back to points, differentiable in ``tensor.feats``.

    ``mode="nearest"``: ``tensor.feats[inverse]`` with the inverse map from
    :func:`voxelize`, which indexes the stride-1 voxels: a tensor at another
    stride (after a strided conv or pooling) has other rows, which
    ``inverse`` then must index (as a map of the points into those voxels
    does); voxelize's would read other voxels' features wherever its rows
    fall below the tensor's count (past it, a ValueError says so).
    ``mode="trilinear"``: interpolate over the 8 voxels around
    each point (``points``, ``voxel_size`` of the stride-1 grid, ``batch``:
    each point's item, needed where the tensor holds any item but 0), with
    weights renormalised over the active voxels; a point with
    no active voxel around it gets zeros. Works for any tensor stride. An
    argument the mode does not read (``points``, ``voxel_size`` or ``batch``
    in nearest mode, ``inverse`` in trilinear) is a ValueError naming it.

    Trilinear mode is differentiable in ``points`` too, in eager mode: where
    grad is enabled and ``points`` require it (or carry a forward-mode
    tangent, torch.func.jvp's), the weights are made of torch
    operations on the points (the same indices and weights as the C++
    core's, which carry no history), on the CPU as on any other device
    (piecewise: the 8 corners change where a point crosses a voxel centre
    plane). In a graph of torch.compile or torch.export the points are
    constants of the weights (detached: no gradient reaches them) and
    ``tensor.feats`` alone gets one.

    After a :class:`~pointsparse.nn.VoxelPrune` at the tensor's stride (its
    rows are K of the N voxels ``inverse`` maps into) ``inverse`` goes
    through the kept rows: a point whose voxel was kept gets that voxel's
    row, a point whose voxel was dropped gets zeros (as trilinear mode gives
    a point with no active voxel), and an ``inverse`` outside ``[0, N)`` is
    a ValueError. Which voxels were kept is recorded in the coordinate cache
    (``CoordinateCache.kept``), so it holds for every tensor on the kept
    coords: after ``with_feats``, submanifold convs, batch norm, activations,
    ``add`` / ``cat``, a transposed conv back to that stride, and the
    output of a compiled model or of an exported program run by
    :class:`~pointsparse.export.ProgramModel`. A tensor
    rebuilt from bare feats and coords (``SparseTensor(y.feats, y.coords)``)
    has no record: its ``inverse`` indexes its own rows.
    """
    return _devoxelize(tensor, inverse, points, voxel_size, batch, mode)


def _devoxelize(tensor: SparseTensor, inverse, points, voxel_size, batch, mode: str,
                corners: list | None = None) -> torch.Tensor:
    """:func:`devoxelize`; ``corners``, a list one caller keeps through one
    forward (SPVCNN's), holds the trilinear corners and weights made for each
    coords tensor it was given, so tensors on the same coords (the same
    object, at one stride, read at the same points) reuse them rather than
    searching again: the stem's output and the last decoder stage's share
    the stride-1 coords."""
    if not isinstance(tensor, SparseTensor):
        raise TypeError(f"tensor must be a SparseTensor; got {type(tensor).__name__}")
    if mode == "nearest":
        unread = [name for name, value in (("points", points), ("voxel_size", voxel_size), ("batch", batch))
                  if value is not None]
        if unread:  # (mode left at its default with trilinear's arguments gave the nearest voxel's features)
            raise ValueError(f"devoxelize(mode='nearest') reads inverse alone; {', '.join(unread)} would be "
                             "ignored: pass mode='trilinear' to interpolate at the points, or drop "
                             f"{'it' if len(unread) == 1 else 'them'}")
        if (not isinstance(inverse, torch.Tensor) or inverse.is_floating_point() or inverse.is_complex()
                or inverse.dtype == torch.bool or inverse.dim() != 1):
            got = (f"{inverse.dtype} of shape {tuple(inverse.shape)}" if isinstance(inverse, torch.Tensor)
                   else type(inverse).__name__)
            raise TypeError("devoxelize(mode='nearest') needs inverse: the (N,) integer map returned by voxelize "
                            f"(a bool mask is no row map); got {got}")
        _coords.check_has_data(inverse, "inverse")
        inverse = inverse.long()  # (as batch in _check_batch: uint16/32/64 have no min)
        # the tensor's rows may be a selection (VoxelPrune) of the voxels inverse maps into
        kept = tensor.cache.kept.get(tensor.stride)
        if inverse.numel() and not torch.compiler.is_compiling():
            n = len(tensor) if kept is None else int(kept[1])
            if int(inverse.min()) < 0 or int(inverse.max()) >= n:
                selection = "" if kept is None else (
                    f" (the tensor holds the {len(tensor)} voxels a VoxelPrune kept of {n}; inverse must map "
                    f"the points into those {n}, as voxelize's inverse does)")
                fine = tensor.cache.get_coords((1, 1, 1))
                if kept is None and tensor.stride != (1, 1, 1) and fine is not None:
                    selection = (f" (the tensor is at stride {tensor.stride}: inverse indexes its {n} voxels at "
                                 f"that stride, where voxelize's inverse indexes the {len(fine)} stride-1 voxels: "
                                 "devoxelize a stride-1 tensor with that, after the decoder's transposed convs, or "
                                 "interpolate at any stride with mode='trilinear')")
                raise ValueError(f"inverse holds rows outside [0, {n}){selection}")
        inverse = inverse.to(tensor.device)
        if torch.compiler.is_compiling():  # a graph: the rows checked when it runs (no host read)
            n = tensor.coords.shape[0] if kept is None else kept[1]
            torch._assert_async(((inverse >= 0) & (inverse < n)).all(),
                                "inverse holds rows outside [0, N) of the tensor's N voxels (or of the N voxels "
                                "a VoxelPrune kept its rows of): it must map the points into them, as voxelize's "
                                "inverse does")
        if kept is not None:
            return _nearest_kept(tensor.feats, kept[0], kept[1], inverse)
        # index_select, not feats[inverse]: its backward (index_add_) sums
        # each voxel's gradients in a fixed order on the CPU, where the
        # backward of advanced indexing uses float atomics (run-to-run noise)
        return tensor.feats.index_select(0, inverse)
    if mode != "trilinear":
        raise ValueError(f"mode must be 'nearest' or 'trilinear'; got {mode!r}")
    if inverse is not None:
        raise ValueError("devoxelize(mode='trilinear') reads points, voxel_size and batch; inverse would be "
                         "ignored: drop it, or pass mode='nearest'")
    if points is None or voxel_size is None:
        raise ValueError("devoxelize(mode='trilinear') needs points and voxel_size")
    _check_points(points)
    vs = _voxel_size(voxel_size)
    if batch is None and not torch.compiler.is_compiling() and tensor.coords.shape[0] and \
            bool((tensor.coords[:, 0] != 0).any()):  # (every point was read from batch item 0: another's features)
        items = torch.unique(tensor.coords[:, 0]).tolist()
        raise ValueError(f"devoxelize(mode='trilinear'): the tensor holds batch items {items[:5]}"
                         f"{' ...' if len(items) > 5 else ''}, not item 0 alone; pass batch (each point's item, as "
                         "voxelize takes it)")
    given = (points, batch)  # (as the caller holds them: the checks and casts below may make new tensors)
    batch = _check_batch_on(tensor, points, batch)
    if _ext.guard_or_false(tensor.coords.shape[0] == 0):  # (in a graph the count is a symbol: known non-empty there)
        # nothing active anywhere: zeros, still attached to the graph
        return tensor.feats.new_zeros((points.shape[0], tensor.feats.shape[1])) + tensor.feats.sum(0)
    # weights in the wider precision of points and feats
    wide = torch.promote_types(points.dtype, tensor.dtype)
    idx, weight = _trilinear_kept(tensor, points.to(wide), vs, batch, corners, given)
    # float16 / bfloat16 feats interpolated in float32, the result rounded once (their weights and 8 products
    # rounded each: a constant field came back off by an ulp between voxels)
    compute = torch.promote_types(tensor.dtype, torch.float32)
    return _interpolate(tensor.feats, idx, weight.to(compute), compute).to(tensor.dtype)


def _interpolate(feats: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``sum_k weight[:, k] * feats[idx[:, k]]`` over the 8 corners in
    ``compute`` (``weight`` in it; an inactive corner, ``idx`` -1, has weight
    0 and reads row 0).

    On the CPU the core's CSR product runs it (``csr_spmm``: each point's
    row of 8 weights, its corners as the columns) in one pass, the same bits
    as the corners summed one by one (the torch path below) at any thread
    count; the feats' gradient is the transposed product (each voxel's row
    of the points around it, in point order: :class:`_CornerSum`). The torch
    path runs where the weights need a gradient, in a compiled graph or a
    torch.func transform, for feats or weights carrying a forward-mode tangent
    (torch.autograd.forward_ad: the core's product has no jvp rule and
    would drop it, a silent zero), and under a torch function mode (the pruning
    graph's tracer follows the channels through the step's torch
    operations; the core's has none): corner by corner into one (N, C) sum
    (the (N, 8, C) gather of all corners at once held 8 rows a point, 1 GB
    for 120k points at C = 256), index_select, not feats[idx] (its backward,
    index_add_, sums each voxel's gradients in a fixed order on the CPU,
    where the backward of advanced indexing uses float atomics)."""
    cols = idx.clamp_min(0)
    if not _ext.needs_grad(weight) and not _ext.carries_tangent(feats, weight) and not torch.compiler.is_compiling() \
            and not _ext.in_transform() and not torch._C._is_torch_function_mode_enabled() and _ext.serves(feats):
        if torch.is_grad_enabled() and feats.requires_grad:
            return _CornerSum.apply(feats, cols, weight.detach(), compute)
        return _corner_product(feats.to(compute), cols, weight)
    rows = cols.t()
    weight = weight.t().unsqueeze(2)  # (8, N, 1)
    out = feats.index_select(0, rows[0]).to(compute) * weight[0]
    for k in range(1, 8):
        out = out.addcmul_(feats.index_select(0, rows[k]).to(compute), weight[k])
    return out


def _corner_product(values: torch.Tensor, cols: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The core's CSR product of the (N, 8) corner rows ``cols`` weighted by
    ``weight`` with ``values`` (V, C), both in one dtype: (N, C)."""
    pointer = np.arange(0, 8 * cols.shape[0] + 1, 8, dtype=np.int64)
    return _ext.to_tensor(_ext.call(_ext.core.csr_spmm, pointer, _ext.to_numpy(cols).reshape(-1).view(np.uint64),
                                    _ext.to_numpy(weight.to(values.dtype)).reshape(-1), _ext.to_numpy(values),
                                    values.shape[0], None))


class _CornerSum(torch.autograd.Function):
    """:func:`_interpolate` on the core with the feats' gradient: forward
    the corner product, backward its transpose, each voxel's sum of its
    points' gradients times their weights (the pairs sorted stably by voxel:
    point order within one) as a second CSR product; deterministic for any
    thread count. Under ``create_graph`` the backward is torch's index_add
    of each corner (differentiable, for a second derivative), as it is
    under vmap (``is_grads_batched``, a vectorized jacobian)."""

    @staticmethod
    def forward(ctx, feats, cols, weight, compute):
        ctx.save_for_backward(cols, weight)
        ctx.voxels, ctx.dtype = feats.shape[0], feats.dtype
        return _corner_product(feats.to(compute), cols, weight)

    @staticmethod
    def backward(ctx, grad):
        cols, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        if torch.is_grad_enabled() or _ext.in_transform() or torch._C._functorch.is_legacy_batchedtensor(grad):
            # (create_graph: a graph of the gradient's own; torch's vmap, of is_grads_batched or a vectorized
            # jacobian: a batched gradient, which the core takes none of)
            out = grad.new_zeros((ctx.voxels, grad.shape[1]))
            for k in range(8):
                out = out.index_add(0, cols[:, k], grad * weight[:, k:k + 1])
            return out.to(ctx.dtype), None, None, None
        from .formats._storage import pointer_of_lines  # noqa: PLC0415 - the formats import the package

        flat = cols.reshape(-1)
        order = torch.sort(flat, stable=True)[1]
        pointer = pointer_of_lines(flat, ctx.voxels)  # (each voxel's row: its points' pairs, in point order)
        points = _ext.to_numpy(order // 8).view(np.uint64)
        out = _ext.call(_ext.core.csr_spmm, _ext.to_numpy(pointer), points, _ext.to_numpy(weight.reshape(-1)[order]),
                        _ext.to_numpy(grad), grad.shape[0], None)
        return _ext.to_tensor(out).to(ctx.dtype), None, None, None


def _nearest_kept(feats: torch.Tensor, rows: torch.Tensor, n, inverse: torch.Tensor) -> torch.Tensor:
    """Nearest devoxelisation of ``feats``, the voxels ``rows`` (sorted) of
    ``n``, by ``inverse`` into the ``n``: the kept row of each point's
    voxel, zeros where it was dropped."""
    rows = rows.to(feats.device)
    if _ext.guard_or_false(rows.shape[0] == 0):  # nothing kept: zeros, still attached to the graph
        return feats.new_zeros((inverse.shape[0], feats.shape[1])) + feats.sum(0)
    at = torch.full((n,), -1, dtype=torch.int64, device=feats.device)
    at = at.index_copy(0, rows, torch.arange(rows.shape[0], device=feats.device)).index_select(0, inverse)
    out = feats.index_select(0, at.clamp_min(0))  # (deterministic backward, as above)
    return torch.where((at >= 0).unsqueeze(1), out, out.new_zeros(()))


def trilinear_weights(tensor: SparseTensor, points: torch.Tensor, voxel_size, batch=None):
    """(idx (N, 8), weights (N, 8)) of the voxels of ``tensor`` around each
    point (``idx`` -1 and weight 0 at an inactive corner), as
    ``devoxelize(mode="trilinear")`` takes them; its arguments checked as
    devoxelize checks them (every point finite: in a compiled graph, when
    the ``trilinear_weights`` operator runs). The weights carry the points'
    gradient as devoxelize's do (eager mode, grad enabled, ``points``
    requiring it, or a forward-mode tangent of theirs)."""
    if not isinstance(tensor, SparseTensor):
        raise TypeError(f"tensor must be a SparseTensor; got {type(tensor).__name__}")
    vs = _voxel_size(voxel_size)
    _check_points(points)
    batch = _check_batch_on(tensor, points, batch)
    return _trilinear(tensor, points, vs, batch)


def _trilinear_kept(tensor: SparseTensor, points: torch.Tensor, vs, batch, corners: list | None, given):
    """:func:`_trilinear`, taken from ``corners`` where an entry was made for
    the same coords object at the same stride, with the same points and
    batch objects as the caller gave them (``given``), the same voxel size
    and the same dtype of ``points``, and added to it otherwise (``corners``
    None: made each time). Entries hold their tensors, so no other object
    takes one's identity while the list lives. The list is one forward's:
    nothing in it changes coords, points or batch in place (an inference
    tensor keeps no version counter to tell). Not under dynamo: its trace
    keeps tensors' identities its own way (an exported program, traced
    without dynamo, does reuse them)."""
    if corners is None or torch.compiler.is_dynamo_compiling():
        return _trilinear(tensor, points, vs, batch)
    held = (tensor.coords, given[0], given[1])
    stamp = (tensor.stride, tuple(vs), points.dtype)
    for entry, entry_stamp, made in corners:
        if all(a is b for a, b in zip(entry, held)) and entry_stamp == stamp:
            return made
    made = _trilinear(tensor, points, vs, batch)
    corners.append((held, stamp, made))
    return made


def _trilinear(tensor: SparseTensor, points: torch.Tensor, vs, batch):
    """:func:`trilinear_weights` of checked arguments (``vs``: 3 floats)."""
    if torch.compiler.is_compiling():
        # (the core's weights, constants of the points: the operator has no backward, and points that require
        # grad, made by a learnable step, failed the graph's build; eager mode gives them the torch twin's below)
        return torch.ops.pointsparse.trilinear_weights(tensor.coords, list(tensor.stride), points.detach(), list(vs),
                                                       batch)
    if _ext.needs_grad(points) or _ext.carries_tangent(points) or not _ext.serves(tensor.coords, points):
        # (the core's weights are numbers without a history: points that require grad or carry a forward-mode
        # tangent get the torch twin's, the same indices and weights made of torch operations on the points, so
        # a gradient reaches them on the CPU as on any other device)
        return _trilinear_torch(tensor, points, vs, batch)
    layout = _coords.KeyLayout.of(tensor.coords)
    sorted_keys, rows = _coords.sort(_coords.pack(tensor.coords, layout))
    b = None if batch is None else _ext.to_numpy(batch, torch.int64)
    idx, w = _ext.call(_ext.core.trilinear_neighbors, _points_np(points), b, list(vs), list(tensor.stride), layout.core(),
                       _ext.to_numpy(sorted_keys), _ext.to_numpy(rows), len(tensor))
    return _ext.to_tensor(idx), _ext.to_tensor(w)


def _trilinear_torch(tensor, points, vs, batch):
    """The torch twin of the core's ``trilinear_neighbors``: the same float64
    operations in the same order, so both give identical indices and weights."""
    dev = points.device
    st = torch.tensor(tensor.stride, dtype=torch.float64, device=dev)
    u = points.double() / (torch.tensor(vs, dtype=torch.float64, device=dev) * st) - 0.5
    base = torch.floor(u)
    frac = u - base
    layout = _coords.KeyLayout.of(tensor.coords)
    sorted_keys, rows = torch.sort(_coords.pack_torch(tensor.coords, layout))
    b = batch if batch is not None else torch.zeros(points.shape[0], dtype=torch.int64, device=dev)
    # Each corner is checked against the layout as float64 before any integer
    # cast; outside it (or in a batch it does not hold) no voxel is active.
    # The layout's fields may reach past int32 (a span of 6 voxels takes 3
    # bits): a corner there is no voxel, and its int32 cast wrapped. What
    # does not depend on the corner is made once, not in each of the 8
    # (the tensors: host-to-device copies on a GPU).
    bits_of = [((corner >> 2) & 1, (corner >> 1) & 1, corner & 1) for corner in range(8)]
    offsets = torch.tensor(bits_of, dtype=torch.float64, device=dev)
    origin = torch.tensor(layout.origin, dtype=torch.float64, device=dev)
    in_batches = b < (1 << layout.bits[0])
    bounds = [(max(lo, _coords.COORD_MIN), min(hi, _coords.COORD_MAX)) for lo, hi in map(layout.axis_range, range(3))]
    idx_cols, w_cols = [], []
    for corner, bits in enumerate(bits_of):
        qd = (base + offsets[corner]) * st
        ok = in_batches
        for a, (lo, hi) in enumerate(bounds):
            ok = ok & (qd[:, a] >= lo) & (qd[:, a] <= hi)
        q = torch.where(ok[:, None], qd, origin).long()
        w = None
        for a in range(3):
            f = frac[:, a] if bits[a] else 1 - frac[:, a]
            w = f if w is None else w * f
        key = _coords.pack_torch(torch.cat([torch.where(ok, b, 0)[:, None], q], 1).to(torch.int32), layout)
        pos = torch.searchsorted(sorted_keys, key).clamp_max(max(len(sorted_keys) - 1, 0))
        hit = ok & (sorted_keys[pos] == key) if len(sorted_keys) else torch.zeros_like(ok)
        idx_cols.append(torch.where(hit, rows[pos] if len(rows) else pos, torch.full_like(pos, -1)))
        w_cols.append(torch.where(hit, w, torch.zeros_like(w)))
    total = w_cols[0]
    for w in w_cols[1:]:  # in corner order, as the core sums them
        total = total + w
    idx = torch.stack(idx_cols, 1)
    w = torch.stack(w_cols, 1)
    w = torch.where(total[:, None] > 0, w / torch.where(total > 0, total, torch.ones_like(total))[:, None],
                    torch.zeros_like(w))
    out_dtype = points.dtype if points.dtype == torch.float64 else torch.float32
    return idx, w.to(out_dtype)
