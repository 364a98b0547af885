"""The CPU convolution engine.

For every kernel offset ``o`` with pairs ``(in_idx, out_idx)``::

    out[out_idx] += feats[in_idx] @ weight[o]

Two methods. "fused" is bit-identical for any thread count on any CPU;
"grouped" is deterministic for a fixed thread count, and equal to float
rounding across thread counts (its GEMMs are torch's, whose blocking depends
on the thread count on some CPUs):

``"fused"`` (the default; :class:`FusedPlan`): one C++ kernel per direction
(``cpp/conv/fused_kernels.h``). Output rows are cut into blocks of 256; a
thread owns a block and runs every offset over it: register tiles (8 pairs
x 32 columns with AVX-512, 6 x 16 with AVX2 or generic; the widest build the
CPU runs, ``_core.conv_isa()``) read their input rows straight from the
feature matrix (no gathered buffer), multiply by the offset's packed weight
panel and add into their output rows (no scatter, no atomics, no race: the block's rows are the
thread's own). The block's rows stay in cache across the offsets. The
identity offset of a submanifold map is a plain blocked matmul over
contiguous rows, no indices read. The input gradient is the same kernel over
the pairs sorted by input row with ``weight[o].T``; the weight gradient sums
``feats[in_idx].T @ grad[out_idx]`` per offset over fixed units of row
blocks (their partial sums added in unit order).

``"grouped"`` (:class:`Plan`): gather (C++) -> GEMM (torch) -> scatter-add
(C++). The pairs of a map are cut into *steps* (built once per map).
The output rows are split into tiles (``tile_rows``, grown on sparse maps);
the pieces of all offsets within one tile run one after the other, so the
tile's output rows and the input rows near them stay in cache. A step is
either a piece of one offset (a plain ``torch.mm``) or a group of pieces of
similar size (one ``torch.bmm`` over rows padded to the group's largest piece;
the padding is bounded by ``epsilon``, TorchSparse's idea). A step holds at
most ``chunk_rows`` rows, so the gathered rows and the GEMM result stay in
cache between the gather, the GEMM and the scatter. The centre offset of a
submanifold map (identity pairs) is one ``torch.mm`` on the whole input,
written straight into the output: no gather, no scatter.

Determinism: a step's scatter adds each output row at most once per offset
(coords are unique), so its parallel loop is race-free, and steps run in a
fixed order; results are bit-identical for a fixed thread count (torch's GEMM
may round differently at another).

Backward (``ConvFunction``): the input gradient runs the same pairs the other
way (gather output gradients at ``out_idx``, multiply by ``weight[o].T``,
scatter-add at ``in_idx``, unique within an offset too); the weight gradient
of offset ``o`` is ``feats[in_idx].T @ grad[out_idx]``, accumulated over the
offset's steps with ``addmm``/``baddbmm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import _ext
from .. import kmap as _kmap

if TYPE_CHECKING:
    from ..tensor import CoordinateCache

# Defaults measured with `bench/conv.py --tune` (street scene of 100k voxels,
# C=64, submanifold k=3 and strided k=2 s=2; see bench/results/conv.md).
#: Rows of one step (a chunk of one offset, or a padded group of offsets).
DEFAULT_CHUNK_ROWS = 8192
#: Largest fraction of padded (wasted) rows a batched group may hold.
DEFAULT_EPSILON = 0.25
#: Output rows per tile: the steps of a tile run together so its output rows
#: (and the nearby input rows) stay in cache across the offsets. A sparse map
#: gets larger tiles, so that an offset's piece of a tile averages at least
#: MIN_PIECE_ROWS rows (small GEMMs and per-call costs would dominate).
DEFAULT_TILE_ROWS = 8192
MIN_PIECE_ROWS = 2048

ENGINE_DTYPES = _ext.FLOAT_DTYPES
#: Largest fraction of listed vectors (see :func:`vector_blocks`) at which the
#: fused engine runs the vector-sparse kernels instead of the dense ones
#: (``VECTOR_DENSITY``), and the masked weight gradient instead of the dense
#: one (``MASKED_WGRAD_DENSITY``, given a pruning mask); measured on KITTI at
#: C=64/128 (bench/RESULTS.md: the vector forward ran 1.02x the dense kernel
#: at density 0.9, 1.2x at 0.75; the masked weight gradient 0.88x at 0.9,
#: 1.0x at 0.75).
VECTOR_DENSITY = 0.85
MASKED_WGRAD_DENSITY = 0.7
#: The method :func:`conv` uses when none is given ("fused" or "grouped");
#: see bench/results/conv.md for the measurements behind it.
DEFAULT_METHOD = "fused"
METHODS = ("fused", "grouped")


@dataclass(frozen=True, eq=False)
class FusedPlan:
    """A map checked and laid out once for the fused kernels (``core`` is a
    ``_core.ConvPlan``: int32 pairs sorted by output row and by input row,
    block cuts)."""

    core: object
    identity: int | None
    num_in: int
    num_out: int


def identity_offset(kmap: _kmap.KernelMap) -> int | None:
    """The offset whose pairs are the identity ``(i, i)``: the zero offset of a
    map between one set of coords (submanifold: stride 1, as many outputs as
    inputs, every input paired), found from the map's sizes and offsets alone
    (O(kernel volume)); the plan's C++ checks the pairs once."""
    n = kmap.num_in
    if kmap.num_out != n or any(s != 1 for s in kmap.key.stride):
        return None
    zero = (kmap.offsets == 0).all(1).nonzero().flatten().tolist()
    return zero[0] if len(zero) == 1 and int(kmap.sizes[zero[0]]) == n else None


def make_fused_plan(kmap: _kmap.KernelMap) -> FusedPlan:
    """The fused kernels' plan of a CPU map (one pass over its pairs in C++)."""
    import numpy as np

    identity = identity_offset(kmap)
    args = (_ext.to_numpy(kmap.in_idx), _ext.to_numpy(kmap.out_idx), np.asarray(kmap.ptr, dtype=np.int64),
            kmap.num_in, kmap.num_out)
    try:
        core = _ext.core.ConvPlan(*args, -1 if identity is None else identity, _ext.num_threads())
    except ValueError as exc:  # stride-1 map onto other given out_coords: a zero offset, not the identity
        if identity is None or "not the identity" not in str(exc):
            raise
        identity, core = None, _ext.core.ConvPlan(*args, -1, _ext.num_threads())
    return FusedPlan(core, identity, kmap.num_in, kmap.num_out)


def transposed_plan(plan: FusedPlan) -> FusedPlan:
    """The plan of the transposed map from the plan of the map it transposes
    (the pairs by input row are its pairs by output row): no pass over the pairs."""
    return FusedPlan(plan.core.transposed(), plan.identity, plan.num_out, plan.num_in)


@dataclass(frozen=True)
class Step:
    """Rows ``in_idx[start[g]:start[g]+length[g]]`` of offsets ``offsets[g]``,
    each padded to ``rows`` (one segment: ``rows == length[0]``)."""

    offsets: tuple[int, ...]
    offsets_tensor: torch.Tensor  # int64 (G,)
    start: object  # numpy int64 (G,)
    length: object  # numpy int64 (G,)
    rows: int

    @property
    def num_rows(self) -> int:
        return len(self.offsets) * self.rows


@dataclass(frozen=True)
class Plan:
    identity: int | None  # the offset whose pairs are the identity, computed as one mm
    steps: tuple[Step, ...]
    in_idx: object  # numpy views of the map's indices
    out_idx: object
    max_rows: int
    num_in: int
    num_out: int


def _pieces(kmap: _kmap.KernelMap, skip: int | None, chunk_rows: int, tile_rows: int) -> list[list[tuple]]:
    """Pairs of every offset but ``skip`` as ``(length, offset, start)``
    pieces of at most ``chunk_rows``, in lists per output tile of
    ``tile_rows`` rows (one list when ``tile_rows`` is 0)."""
    sizes = kmap.sizes.tolist()
    num_tiles = 1 if tile_rows <= 0 else max(1, -(-kmap.num_out // tile_rows))
    tiles: list[list[tuple]] = [[] for _ in range(num_tiles)]
    bounds = torch.arange(1, num_tiles, dtype=torch.int64) * max(tile_rows, 1)
    for o, n in enumerate(sizes):
        if n == 0 or o == skip:
            continue
        lo = kmap.ptr[o]
        cuts = [0] + torch.searchsorted(kmap.out_idx[lo:lo + n], bounds).tolist() + [n]
        for t in range(num_tiles):
            a, b = cuts[t], cuts[t + 1]
            if b == a:
                continue
            count = -(-(b - a) // chunk_rows)
            base, extra = divmod(b - a, count)
            start = lo + a
            for i in range(count):
                length = base + (1 if i < extra else 0)
                tiles[t].append((length, o, start))
                start += length
    return tiles


def _group(pieces: list[tuple], chunk_rows: int, epsilon: float) -> list[list[tuple]]:
    """Largest first, greedily: a piece joins the open group while the group
    stays within ``chunk_rows`` padded rows and its padding within ``epsilon``."""
    pieces = sorted(pieces, key=lambda p: (-p[0], p[1], p[2]))
    groups = []
    i = 0
    while i < len(pieces):
        rows, total = pieces[i][0], pieces[i][0]
        j = i + 1
        while j < len(pieces):
            g = j - i + 1
            if g * rows > chunk_rows or g * rows - (total + pieces[j][0]) > epsilon * g * rows:
                break
            total += pieces[j][0]
            j += 1
        groups.append(pieces[i:j])
        i = j
    return groups


def make_plan(kmap: _kmap.KernelMap, chunk_rows: int = DEFAULT_CHUNK_ROWS, epsilon: float = DEFAULT_EPSILON,
              tile_rows: int = DEFAULT_TILE_ROWS, min_piece_rows: int = MIN_PIECE_ROWS) -> Plan:
    """Cut a (CPU) map into steps: with ``tile_rows`` > 0 the pairs of each
    block of ``tile_rows`` output rows are processed together (output-tile
    order, so the output rows stay in cache); pieces longer than
    ``chunk_rows`` are cut into near-equal parts; pieces of similar size
    become batched groups (largest first) while the padding stays within
    ``epsilon`` of the group and the group within ``chunk_rows`` rows. Tiles
    grow until an offset's piece of a tile averages ``min_piece_rows``."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1); got {epsilon}")
    if tile_rows < 0:
        raise ValueError(f"tile_rows must be >= 0; got {tile_rows}")
    import numpy as np

    identity = identity_offset(kmap)
    if tile_rows and min_piece_rows:
        busy = [n for o, n in enumerate(kmap.sizes.tolist()) if n and o != identity]
        if busy:  # mean rows of one offset per output row
            density = sum(busy) / len(busy) / max(kmap.num_out, 1)
            tile_rows = max(tile_rows, int(min_piece_rows / density))
    steps = []
    for tile in _pieces(kmap, identity, chunk_rows, tile_rows):
        for group in _group(tile, chunk_rows, epsilon):
            offsets = tuple(p[1] for p in group)
            steps.append(Step(offsets, torch.tensor(offsets, dtype=torch.int64),
                              np.array([p[2] for p in group], dtype=np.int64),
                              np.array([p[0] for p in group], dtype=np.int64), group[0][0]))
    max_rows = max((s.num_rows for s in steps), default=0)
    return Plan(identity, tuple(steps), _ext.to_numpy(kmap.in_idx), _ext.to_numpy(kmap.out_idx), max_rows,
                kmap.num_in, kmap.num_out)


def get_plan(kmap: _kmap.KernelMap, chunk_rows: int = DEFAULT_CHUNK_ROWS, epsilon: float = DEFAULT_EPSILON,
             tile_rows: int = DEFAULT_TILE_ROWS, method: str | None = None,
             cache: "CoordinateCache | None" = None) -> "Plan | FusedPlan":
    """The plan of ``kmap`` for ``method`` (default :data:`DEFAULT_METHOD`;
    the tuning arguments apply to "grouped"). With the coordinate ``cache``
    that holds the map, the plan is built once and kept there beside it, and
    a transposed map's fused plan comes from its downsampling map's plan
    (built there once for both); without one it is built anew."""
    method = DEFAULT_METHOD if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method == "fused":
        if cache is None:
            return make_fused_plan(kmap)
        return cache.get_plan(kmap, "fused", lambda: _fused_plan_in(cache, kmap))
    if cache is None:
        return make_plan(kmap, chunk_rows, epsilon, tile_rows)
    return cache.get_plan(kmap, ("grouped", chunk_rows, epsilon, tile_rows),
                          lambda: make_plan(kmap, chunk_rows, epsilon, tile_rows))


def _fused_plan_in(cache: "CoordinateCache", kmap: _kmap.KernelMap) -> FusedPlan:
    """A cached map's fused plan: a transposed map whose downsampling map the
    cache holds takes that map's plan, transposed."""
    key = kmap.key
    if key.transposed:
        down = cache.kmaps.get(_kmap.KernelMapKey(key.tensor_stride, key.kernel_size, key.stride, key.dilation))
        if down is not None and (down.num_in, down.num_out, down.num_pairs) == (kmap.num_out, kmap.num_in,
                                                                                kmap.num_pairs):
            return transposed_plan(cache.get_plan(down, "fused", lambda: make_fused_plan(down)))
    return make_fused_plan(kmap)


def _np(t: torch.Tensor):
    return t.detach().numpy()


def _step_weight(weight: torch.Tensor, step: Step, transpose: bool) -> torch.Tensor:
    if len(step.offsets) == 1:
        w = weight[step.offsets[0]]
        return w.t() if transpose else w
    w = weight.index_select(0, step.offsets_tensor)
    return w.transpose(1, 2) if transpose else w


def _apply(src: torch.Tensor, weight: torch.Tensor, plan: Plan, dst: torch.Tensor, gather_idx, scatter_idx,
           transpose: bool) -> None:
    """``dst[scatter_idx] += src[gather_idx] @ W`` over every step, ``W`` the
    step's ``weight[o]`` (``weight[o].T`` when ``transpose``)."""
    if not plan.steps:
        return
    nt = _ext.num_threads()
    c_in, c_out = src.shape[1], dst.shape[1]
    gathered = src.new_empty((plan.max_rows, c_in))
    product = src.new_empty((plan.max_rows, c_out))
    src_np, dst_np = _np(src), _np(dst)
    core = _ext.core
    for step in plan.steps:
        g, r = len(step.offsets), step.rows
        buf, res = gathered[:g * r], product[:g * r]
        core.conv_gather(src_np, gather_idx, step.start, step.length, r, _np(buf), nt)
        w = _step_weight(weight, step, transpose)
        if g == 1:
            torch.mm(buf, w, out=res)
        else:
            torch.bmm(buf.view(g, r, c_in), w, out=res.view(g, r, c_out))
        core.conv_scatter_add(_np(res), scatter_idx, step.start, step.length, r, dst_np, nt)


def _backward_steps(feats: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, plan: Plan,
                    grad_feats: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    """One pass over the steps for both gradients, sharing the gathered output
    gradients: ``grad_feats[in_idx] += grad[out_idx] @ weight[o].T`` and
    ``grad_weight[o] += feats[in_idx].T @ grad[out_idx]``."""
    if not plan.steps:
        return
    nt = _ext.num_threads()
    c_in, c_out = feats.shape[1], grad.shape[1]
    gbuf = grad.new_empty((plan.max_rows, c_out))
    fbuf = feats.new_empty((plan.max_rows, c_in))  # gathered feats, then the input-gradient product
    feats_np, grad_np = _np(feats), _np(grad)
    grad_feats_np = None if grad_feats is None else _np(grad_feats)
    core = _ext.core
    for step in plan.steps:
        g, r = len(step.offsets), step.rows
        gb, fb = gbuf[:g * r], fbuf[:g * r]
        core.conv_gather(grad_np, plan.out_idx, step.start, step.length, r, _np(gb), nt)
        if grad_weight is not None:
            core.conv_gather(feats_np, plan.in_idx, step.start, step.length, r, _np(fb), nt)
            if g == 1:
                grad_weight[step.offsets[0]].addmm_(fb.t(), gb)
            else:
                part = torch.bmm(fb.view(g, r, c_in).transpose(1, 2), gb.view(g, r, c_out))
                grad_weight.index_add_(0, step.offsets_tensor, part)
        if grad_feats is not None:
            w = _step_weight(weight, step, transpose=True)
            if g == 1:
                torch.mm(gb, w, out=fb)
            else:
                torch.bmm(gb.view(g, r, c_out), w, out=fb.view(g, r, c_in))
            core.conv_scatter_add(_np(fb), plan.in_idx, step.start, step.length, r, grad_feats_np, nt)


def conv_forward(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan,
                 relu: bool = False, region: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's forward on contiguous CPU float32/float64 tensors
    (``relu``: max(out, 0), in the fused kernel's epilogue; the fused plan
    skips what :func:`choose_execution` allows; ``region``: only those
    offsets, fused plans only)."""
    out = feats.new_empty((plan.num_out, weight.shape[2]))
    if isinstance(plan, FusedPlan):
        b = None if bias is None else _np(bias.contiguous())
        run = choose_execution(weight, region)
        plan.core.forward(_np(feats), _np(weight), b, _np(out), _ext.num_threads(), None, relu, active=run.active,
                          vector=run.vector)
        return out
    if relu:
        return torch.relu_(conv_forward(feats, weight, bias, plan))
    if plan.identity is not None:
        if bias is None:
            torch.mm(feats, weight[plan.identity], out=out)
        else:
            torch.addmm(bias, feats, weight[plan.identity], out=out)
    elif bias is None:
        out.zero_()
    else:
        out.copy_(bias.expand_as(out))
    _apply(feats, weight, plan, out, plan.in_idx, plan.out_idx, transpose=False)
    return out


def conv_backward(feats: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, plan: Plan, need_feats: bool,
                  need_weight: bool, region: torch.Tensor | None = None, mask: torch.Tensor | None = None):
    """Gradients of :func:`conv_forward` for feats and weight (None where not
    needed). Fused plans: the weight gradient is zero outside ``region`` and,
    given the pruning ``mask`` the weight was multiplied by, equals
    ``dense gradient * mask`` (the masked vectors are not computed)."""
    grad_feats = grad_weight = None
    if isinstance(plan, FusedPlan):
        nt = _ext.num_threads()
        if need_feats:
            grad_feats = grad.new_empty((plan.num_in, weight.shape[1]))
            run = choose_execution(weight, region, transpose=True)
            plan.core.backward_input(_np(grad), _np(weight), _np(grad_feats), nt, active=run.active,
                                     vector=run.vector)
        if need_weight:
            grad_weight = torch.empty_like(weight)
            active, vectors = weight_execution(mask, region)
            plan.core.backward_weight(_np(feats), _np(grad), _np(grad_weight), nt, active=active,
                                      mask=None if vectors is None else _np(vectors.contiguous()))
            if mask is not None:
                grad_weight.mul_(mask)
        return grad_feats, grad_weight
    centre = None if plan.identity is None else weight[plan.identity]
    if need_feats:
        grad_feats = grad.new_empty((plan.num_in, weight.shape[1]))
        if centre is not None:
            torch.mm(grad, centre.t(), out=grad_feats)
        else:
            grad_feats.zero_()
    if need_weight:
        grad_weight = torch.zeros_like(weight)
        if centre is not None:
            torch.mm(feats.t(), grad, out=grad_weight[plan.identity])
    if need_feats or need_weight:
        _backward_steps(feats, weight, grad, plan, grad_feats, grad_weight)
    return grad_feats, grad_weight


def panel_width(dtype: torch.dtype) -> int:
    """Columns of one vector-sparse panel (``sparse_panel<T>()`` in
    cpp/conv/sparse.h: the 32-byte builds' register tile, 64 bytes) on every
    CPU, whichever build runs the dense kernels."""
    return 64 // torch.empty((), dtype=dtype).element_size()


def vector_blocks(weight: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``(K, rows, panels)`` bool: whether row ``c`` of offset ``k``'s matrix
    (``weight[k]``, or ``weight[k].T`` when ``transpose``) holds a nonzero in
    the columns of panel ``p`` (:func:`panel_width` columns each). The
    vector-sparse kernels visit exactly these (offset, row, panel) vectors."""
    w = weight.detach()
    if transpose:
        w = w.transpose(1, 2)
    width = panel_width(weight.dtype)
    nonzero = torch.nn.functional.pad(w, (0, -w.shape[2] % width)) != 0
    return nonzero.view(w.shape[0], w.shape[1], -(-w.shape[2] // width), width).any(-1)


@dataclass(frozen=True, eq=False)
class Execution:
    """How the fused engine runs one product on given weights: ``active``
    the offsets it runs (uint8 ``(K,)`` numpy flags, None: all), ``vector``
    whether through the vector-sparse kernels; ``density`` the fraction of
    the active offsets' vectors that hold a nonzero."""

    active: object
    vector: bool
    density: float

    @property
    def name(self) -> str:
        return "vector" if self.vector else ("offsets" if self.active is not None else "dense")


def _flags(keep: torch.Tensor):
    import numpy as np

    return None if bool(keep.all()) else np.ascontiguousarray(keep.numpy().astype(np.uint8))


def vector_counts(weight: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """int64 ``(K, panels)``: ``vector_blocks(weight, transpose).sum(1)``,
    counted in one C++ pass for CPU float32/float64 (the per-call cost of
    the engine's choice), in torch ops otherwise."""
    if _ext.serves(weight, dtypes=ENGINE_DTYPES):
        w = weight.detach().contiguous()
        return torch.from_numpy(_ext.core.conv_weight_vectors(_np(w), transpose)).to(torch.int64)
    return vector_blocks(weight, transpose).sum(1)


def choose_execution(weight: torch.Tensor, region: torch.Tensor | None = None,
                     transpose: bool = False) -> Execution:
    """The forward (or, ``transpose``, input-gradient) execution of ``weight``:
    offsets whose ``(C_in, C_out)`` slab is all zero (or outside ``region``,
    a bool ``(K,)``) are skipped; the vector-sparse kernels run when at most
    :data:`VECTOR_DENSITY` of the remaining vectors hold a nonzero."""
    counts = vector_counts(weight, transpose)
    return _execution(counts, weight.shape[2] if transpose else weight.shape[1], region, VECTOR_DENSITY)


def _execution(counts: torch.Tensor, rows: int, region, threshold: float) -> Execution:
    per_offset = counts.sum(1)
    keep = per_offset > 0
    if region is not None:
        keep &= region
    capacity = int(keep.sum()) * rows * counts.shape[1]
    density = int(per_offset[keep].sum()) / capacity if capacity else 0.0
    return Execution(_flags(keep), density <= threshold, density)


def _panel_columns(cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns of each panel of ``cols`` columns (the last one may be narrower)."""
    width = panel_width(dtype)
    columns = torch.full((-(-cols // width),), width, dtype=torch.int64)
    if columns.numel():
        columns[-1] = cols - width * (columns.numel() - 1)
    return columns


def executed_flops(weight: torch.Tensor, pair_counts: torch.Tensor, region: torch.Tensor | None = None) -> int:
    """Multiply-adds x 2 that the fused engine's forward executes for
    ``weight`` on a map with per-offset ``pair_counts`` (the identity's
    included): ``pairs(k) * C_in * C_out`` per offset run, or with the
    vector-sparse kernels ``pairs(k) * (columns of the vectors listed)``."""
    counts = vector_counts(weight)
    execution = _execution(counts, weight.shape[1], region, VECTOR_DENSITY)
    pairs = torch.as_tensor(pair_counts, dtype=torch.int64)
    keep = torch.ones(weight.shape[0], dtype=torch.bool) if execution.active is None else \
        torch.from_numpy(execution.active).bool()
    if not execution.vector:
        return 2 * int(pairs[keep].sum()) * weight.shape[1] * weight.shape[2]
    per_offset = (counts * _panel_columns(weight.shape[2], weight.dtype)).sum(1)
    return 2 * int((pairs * per_offset)[keep].sum())


def weight_execution(mask: torch.Tensor | None, region: torch.Tensor | None):
    """``(active, mask)`` for the weight gradient: an offset is skipped only
    where ``region`` excludes it or ``mask`` (a pruning mask, whose product
    zeroes its gradient) is all zero on it; ``mask`` goes to the kernels when
    at most :data:`MASKED_WGRAD_DENSITY` of the kept offsets' vectors are
    unmasked (either way the result times the mask is the same, bit for bit)."""
    if mask is None:
        return (None if region is None else _flags(region)), None
    execution = _execution(vector_counts(mask), mask.shape[1], region, MASKED_WGRAD_DENSITY)
    return execution.active, (mask if execution.vector and execution.density > 0 else None)


class ConvFunction(torch.autograd.Function):
    """Autograd of the engine: ``ConvFunction.apply(feats, weight, bias, plan,
    region, mask)`` (``region``, ``mask``: see :func:`conv_backward`).

    Differentiable to any order: the input gradient and the weight gradient
    are themselves autograd functions (:class:`_InputGrad`, :class:`_WeightGrad`)
    whose gradients are the conv and each other, so a gradient penalty
    (``create_graph=True``) is exact. Without ``create_graph`` backward makes
    one combined pass (and computes only the weight-gradient vectors ``mask``
    keeps)."""

    @staticmethod
    def forward(ctx, feats, weight, bias, plan, region=None, mask=None):
        feats_c, weight_c = feats.contiguous(), weight.contiguous()
        ctx.plan, ctx.region, ctx.mask = plan, region, mask
        ctx.save_for_backward(feats_c, weight_c)
        ctx.has_bias = bias is not None
        return conv_forward(feats_c, weight_c, bias, plan, region=region)

    @staticmethod
    def backward(ctx, grad):
        feats, weight = ctx.saved_tensors
        need_feats, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_bias = grad.sum(0) if (ctx.has_bias and need_bias) else None
        if torch.is_grad_enabled():  # create_graph: gradients that can be differentiated again
            region = ctx.region
            grad_feats = _InputGrad.apply(grad, weight, ctx.plan, region) if need_feats else None
            grad_weight = (_WeightGrad.apply(feats, grad, ctx.plan, tuple(weight.shape), region) if need_weight
                           else None)
            return grad_feats, grad_weight, grad_bias, None, None, None
        grad_feats, grad_weight = conv_backward(feats, weight, grad.contiguous(), ctx.plan, need_feats, need_weight,
                                                ctx.region, ctx.mask)
        return grad_feats, grad_weight, grad_bias, None, None, None


class _InputGrad(torch.autograd.Function):
    """``grad_feats[in] += grad[out] @ weight[o].T``: linear in ``grad`` (its
    adjoint is the conv) and in ``weight`` (the weight gradient's form)."""

    @staticmethod
    def forward(ctx, grad, weight, plan, region=None):
        grad_c, weight_c = grad.contiguous(), weight.contiguous()
        ctx.plan, ctx.region = plan, region
        ctx.save_for_backward(grad_c, weight_c)
        shape_only = grad_c.new_empty((plan.num_in, weight_c.shape[1]))
        return conv_backward(shape_only, weight_c, grad_c, plan, True, False, region)[0]

    @staticmethod
    def backward(ctx, h):
        grad, weight = ctx.saved_tensors
        need_grad, need_weight = ctx.needs_input_grad[:2]
        d_grad = ConvFunction.apply(h, weight, None, ctx.plan, ctx.region) if need_grad else None
        d_weight = _WeightGrad.apply(h, grad, ctx.plan, tuple(weight.shape), ctx.region) if need_weight else None
        return d_grad, d_weight, None, None


class _WeightGrad(torch.autograd.Function):
    """``grad_weight[o] = feats[in].T @ grad[out]``: linear in ``feats`` (its
    adjoint is the input gradient) and in ``grad`` (its adjoint is the conv)."""

    @staticmethod
    def forward(ctx, feats, grad, plan, weight_shape, region=None):
        feats_c, grad_c = feats.contiguous(), grad.contiguous()
        ctx.plan, ctx.region = plan, region
        ctx.save_for_backward(feats_c, grad_c)
        shape_only = feats_c.new_empty(weight_shape)
        return conv_backward(feats_c, shape_only, grad_c, plan, False, True, region)[1]

    @staticmethod
    def backward(ctx, v):
        feats, grad = ctx.saved_tensors
        need_feats, need_grad = ctx.needs_input_grad[:2]
        d_feats = _InputGrad.apply(grad, v, ctx.plan, ctx.region) if need_feats else None
        d_grad = ConvFunction.apply(feats, v, None, ctx.plan, ctx.region) if need_grad else None
        return d_feats, d_grad, None, None, None


def runs_bf16(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`conv_bf16` runs these tensors: CPU bfloat16 feats and
    weight, no gradient needed (inference), a CPU with AVX512-BF16."""
    if feats.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not _ext.core.conv_bf16():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feats, weight, bias)):
        return False
    return _ext.serves(feats, weight)


def conv_bf16(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kmap: _kmap.KernelMap,
              cache: "CoordinateCache | None" = None, relu: bool = False) -> torch.Tensor:
    """The bf16 inference forward (see :func:`runs_bf16`): products of the
    bf16 feats and weight summed in float32 by ``vdpbf16ps``, bias (and
    ReLU) added in float32, the result rounded once to bfloat16."""
    plan = get_plan(kmap, method="fused", cache=cache)
    out = torch.empty((plan.num_out, weight.shape[2]), dtype=torch.float32)
    b = None if bias is None else _np(bias.detach().float().contiguous())
    plan.core.forward_bf16(_np(feats.contiguous().view(torch.int16)), _np(weight.contiguous().view(torch.int16)),
                           b, _np(out), _ext.num_threads(), relu)
    return out.to(torch.bfloat16)


def supported(feats: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ engine serves these tensors (CPU float32/float64 of
    one dtype) under the backend policy (``_ext.serves``)."""
    return weight.dtype == feats.dtype and _ext.serves(feats, weight, dtypes=ENGINE_DTYPES)


def check_arguments(feats, weight, bias, kmap: _kmap.KernelMap) -> None:
    """The checks every method makes before touching memory (ValueError or
    TypeError naming the argument)."""
    for name, t in (("feats", feats), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if weight.dtype != feats.dtype or not _ext.takes(feats, weight, dtypes=ENGINE_DTYPES):
        raise TypeError(f"the engine takes CPU float32/float64 feats and weight of one dtype; got feats "
                        f"{feats.dtype} on {feats.device}, weight {weight.dtype} on {weight.device}")
    if feats.dim() != 2 or feats.shape[0] != kmap.num_in:
        raise ValueError(f"feats must be (N, C_in) with N = {kmap.num_in} (the map's input rows); "
                         f"got {tuple(feats.shape)}")
    if weight.dim() != 3 or weight.shape[0] != kmap.kernel_volume or weight.shape[1] != feats.shape[1]:
        raise ValueError(f"weight must be (K, C_in, C_out) = ({kmap.kernel_volume}, {feats.shape[1]}, C_out); "
                         f"got {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias must be a tensor of the weight's dtype {weight.dtype} on {weight.device}")
        if bias.shape != (weight.shape[2],):
            raise ValueError(f"bias must be (C_out,) = ({weight.shape[2]},); got {tuple(bias.shape)}")


def conv(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kmap: _kmap.KernelMap,
         chunk_rows: int = DEFAULT_CHUNK_ROWS, epsilon: float = DEFAULT_EPSILON,
         tile_rows: int = DEFAULT_TILE_ROWS, method: str | None = None,
         cache: "CoordinateCache | None" = None, relu: bool = False, region: torch.Tensor | None = None,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """``out[out_idx] += feats[in_idx] @ weight[o]`` (+ bias) with autograd,
    over the offsets of ``region`` (bool ``(K,)``, None: all); the plan is
    kept in ``cache`` (the coordinate cache holding ``kmap``). ``mask``: the
    pruning mask ``weight`` was multiplied by (its zeros get no gradient).
    ``relu``: max(out, 0); where no gradient is needed (inference) it runs in
    the fused kernel's store, no pass of its own."""
    check_arguments(feats, weight, bias, kmap)
    plan = get_plan(kmap, chunk_rows, epsilon, tile_rows, method, cache)
    if region is not None and not isinstance(plan, FusedPlan):
        weight = weight * region.to(weight.dtype).view(-1, 1, 1)
    if mask is not None and (mask.shape != weight.shape or mask.dtype != weight.dtype):
        raise ValueError(f"mask must match the weight {tuple(weight.shape)} {weight.dtype}; got "
                         f"{tuple(mask.shape)} {mask.dtype}")
    mask = None if mask is None else mask.detach().contiguous()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (feats, weight, bias))
    if not grad:
        with torch.no_grad():
            return conv_forward(feats.contiguous(), weight.contiguous(), bias, plan, relu, region)
    out = ConvFunction.apply(feats, weight, bias, plan, region, mask)
    return torch.relu(out) if relu else out
