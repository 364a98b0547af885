"""The CPU convolution engine.

For every kernel offset ``o`` with pairs ``(in_idx, out_idx)``::

    out[out_idx] += feats[in_idx] @ weight[o]

One C++ kernel per direction (``cpp/conv/fused_kernels.h``), run over a
:class:`FusedPlan` (the map's pairs laid out once, ``cpp/conv/plan.h``).
Output rows are cut into blocks of 512; a thread owns a block and runs every
offset over it: register tiles (8 pairs x 32 columns with AVX-512, 6 x 16
with AVX2 or generic; the widest build the CPU runs, ``_core.conv_isa()``)
read their input rows straight from the feature matrix (no gathered buffer),
multiply by the offset's packed weight panel and add into their output rows
(no scatter, no atomics, no race: the block's rows are the thread's own). The
block's rows stay in cache across the offsets. The identity offset of a
submanifold map is a plain blocked matmul over contiguous rows, no indices
read. Results are bit-identical for any thread count on any CPU.

Backward (``ConvFunction``): the input gradient is the same kernel over the
pairs sorted by input row with ``weight[o].T``; the weight gradient sums
``feats[in_idx].T @ grad[out_idx]`` per offset over fixed units of row blocks
(their partial sums added in unit order).

Skipped work skips its products: an offset the plan leaves out (all zero,
or outside a region) and a zero vector the vector-sparse kernels do not
visit multiply nothing, so a NaN or inf in the feats reaches an output
only through the weights executed (``0 * nan`` is nan on the dense path,
nothing on a sparse one). Finite feats give the same sums either way.

The engine's former second method (C++ gather, torch ``mm``/``bmm`` over
groups of offsets, C++ scatter-add) was slower on every benchmarked layer
(bench/RESULTS.md, "Plan cost and the grouped method"); a pure-torch form of
it lives on in ``bench/_grouped.py`` for that comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .. import _ext
from .. import kmap as _kmap

if TYPE_CHECKING:
    from ..tensor import CoordinateCache

ENGINE_DTYPES = _ext.FLOAT_DTYPES
#: Largest fraction of listed vectors (see :func:`vector_blocks`) at which the
#: fused engine runs the vector-sparse kernels instead of the dense ones
#: (``VECTOR_DENSITY``), and the masked weight gradient instead of the dense
#: one (``MASKED_WGRAD_DENSITY``, given a pruning mask); measured on KITTI at
#: C=64/128 on AMD Zen 3 (bench/RESULTS.md: the vector forward ran 1.02x the
#: dense kernel at density 0.9, 1.2x at 0.75; the masked weight gradient
#: 0.88x at 0.9, 1.0x at 0.75): ``VECTOR_DENSITY_SPLIT``.
VECTOR_DENSITY_SPLIT = 0.85
#: Whether this CPU's AVX-512 FMAs run at full width, as the core answers
#: (``POINTSPARSE_AVX512_FULL_WIDTH`` or ``_core.set_avx512_full_width``
#: set its answer): the choices below that follow it are set from it by
#: :func:`_follow_width`, at import and again whenever that answer changes.
_FULL_WIDTH: bool | None = None
#: The same on a CPU whose AVX-512 FMAs run at full width
#: (``_core.avx512_full_width()``: Intel, AMD Zen 5): its dense AVX-512
#: kernels ran 1.4-1.5x the AVX2 ones on an Intel Xeon, 1.7x on an AMD EPYC
#: Zen 5 (about 1x on the Zen 4), and the vector forward
#: broke even with them near density 0.6 at C = 32 to 128, lost 0.70-0.94x
#: at 0.7-0.9 (``python bench/vector_threshold.py --channels 16 24 32 48 64
#: 128 --listed``, KITTI sweep, one thread, Intel Xeon, two runs;
#: bench/RESULTS.md stop 34; on the Zen 5 0.97-1.10x at 0.6, 0.88-0.99x at
#: 0.7, stop 50).
VECTOR_DENSITY_WIDE = 0.6
VECTOR_DENSITY: float  # (the one of the two this CPU's width takes: _follow_width)
MASKED_WGRAD_DENSITY = 0.7
#: Rows per panel (C_in of the forward, C_out of the input gradient) from
#: which :data:`VECTOR_DENSITY` holds whole; below, the vector kernels need a
#: sparser weight: threshold ``VECTOR_DENSITY * min(1, (rows + 4) /
#: (VECTOR_FULL_ROWS + 4))`` (0.28 at 8 rows, 0.47 at 16, 0.66 at 24).
#: Measured once the dense kernels ran a tile across all its panels
#: (``python bench/vector_threshold.py``, KITTI sweep, one thread, AMD EPYC
#: Zen 3 [avx2], three runs; bench/RESULTS.md "Dense kernels a fifth
#: faster"): the vector forward broke even with the dense one near density
#: 0.3 at C = 8, 0.6-0.7 at 16 and 24, 0.8-0.9 at 32 and 48, above 0.9 at 64.
VECTOR_FULL_ROWS_SPLIT = 32
#: The same where the AVX-512 FMAs run at full width (the AVX-512 vector
#: kernels from one panel): measured (``python bench/vector_threshold.py
#: --channels 8 12 16 24 32 48 --densities 0.2 0.3 0.4 0.5 0.6 0.7 0.8``, KITTI
#: sweep, one thread, AMD EPYC Zen 5, bench/RESULTS.md stop 50) the vector
#: forward broke even near density 0.4 at C = 8, 0.45 at 12, 0.6-0.7 at 16,
#: 0.8 at 24, 0.53 at 32, 0.63 at 48 (the Xeon's stop-34 page: 0.7 at 16):
#: 16 rows (thresholds 0.36 at 8 rows, 0.48 at 12, 0.6 from 16).
VECTOR_FULL_ROWS_WIDE = 16
VECTOR_FULL_ROWS: int  # (the one of the two this CPU's width takes: _follow_width)


#: The same for vectors in twin panels (two adjacent whole panels listing
#: the same input channels, ``prune.panel_structured(..., panels=2)``), which
#: the AVX-512 vector kernels run two vectors a tile row where
#: :func:`tile_panels` is 2 (None elsewhere: the threshold is not moved; on
#: other AVX-512 CPUs the kernels take twins in two-vector tiles too where
#: the AVX-512 vector kernel runs, from 128 columns, unmeasured there, the
#: sums bit for bit the same). Weights pruned in
#: vectors of two panels broke even with the dense forward near density 0.8
#: at C = 32, 48, 64 and 128 (1.06-1.19x at 0.7, 0.92-0.96x at 0.9; ``python
#: bench/vector_threshold.py --channels 32 48 64 128 --panels 2``, KITTI
#: sweep, one thread, Intel Xeon, bench/RESULTS.md stop 36). A weight's
#: threshold moves from :data:`VECTOR_DENSITY` toward this one by the share
#: of its listed vectors in twins (``_core.conv_execution``).
VECTOR_DENSITY_TWIN_WIDE = 0.75
VECTOR_DENSITY_TWIN: float | None  # (VECTOR_DENSITY_TWIN_WIDE at full width, else None: _follow_width)


def vector_threshold(rows: int) -> float:
    """The largest density of listed vectors at which a product with
    ``rows`` rows per panel runs the vector-sparse kernels."""
    _follow_width()
    return VECTOR_DENSITY * min(1.0, (rows + 4) / (VECTOR_FULL_ROWS + 4))


def twin_threshold(rows: int, dtype: torch.dtype = torch.float32) -> float | None:
    """:func:`vector_threshold` for a weight whose listed vectors all sit in
    twin panels (``VECTOR_DENSITY_TWIN`` scaled alike), or None where this
    CPU runs no twin tiles for ``dtype`` (:func:`tile_panels` 1)."""
    _follow_width()
    if VECTOR_DENSITY_TWIN is None or tile_panels(dtype) < 2:
        return None
    return VECTOR_DENSITY_TWIN * min(1.0, (rows + 4) / (VECTOR_FULL_ROWS + 4))


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


def get_plan(kmap: _kmap.KernelMap, cache: "CoordinateCache | None" = None) -> FusedPlan:
    """The plan of ``kmap``. With the coordinate ``cache`` that holds the
    map, the plan is built once and kept there beside it, and a transposed
    map's plan comes from its downsampling map's plan (built there once for
    both); without one it is built anew."""
    if cache is None:
        return make_fused_plan(kmap)
    return cache.get_plan(kmap, lambda: _fused_plan_in(cache, kmap))


def _fused_plan_in(cache: "CoordinateCache", kmap: _kmap.KernelMap) -> FusedPlan:
    """A cached map's fused plan: a transposed map whose downsampling map the
    cache holds takes that map's plan, transposed."""
    key = kmap.key
    if key.transposed:
        down = cache.kmaps.get(_kmap.KernelMapKey(key.tensor_stride, key.kernel_size, key.stride, key.dilation))
        if down is not None and (down.num_in, down.num_out, down.num_pairs) == (kmap.num_out, kmap.num_in,
                                                                                kmap.num_pairs):
            return transposed_plan(cache.get_plan(down, lambda: make_fused_plan(down)))
    return make_fused_plan(kmap)


def _np(t: torch.Tensor):
    if _ext.in_transform():  # (a torch.func transform's tensor: its values, see _ext.to_numpy)
        return _ext.to_numpy(t)
    if torch._C._functorch.is_legacy_batchedtensor(t):  # (torch's 'Batching rule not implemented for detach')
        raise TypeError("the engine's conv cannot take a batch of torch's legacy vmap (torch.autograd.grad(..., "
                        "is_grads_batched=True), gradcheck's batched checks): use torch.func.vmap (over "
                        "torch.func.vjp), which the conv runs sample by sample, or loop over the samples")
    return t.detach().numpy()


def conv_forward(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: FusedPlan,
                 relu: bool = False, region: torch.Tensor | None = None,
                 add: torch.Tensor | None = None) -> torch.Tensor:
    """The engine's forward on contiguous CPU float32/float64 tensors
    (``relu``: max(out, 0), in the kernel's epilogue; the offsets and
    vectors :func:`choose_execution` allows are skipped; ``region``: only
    those offsets; ``add``: a residual ``(num_out, C_out)`` of the feats'
    dtype added before the ReLU, in the same epilogue)."""
    out = _ext.new_output((plan.num_out, weight.shape[2]), feats.dtype)
    b = None if bias is None else _np(bias.contiguous())
    run = choose_execution(weight, region)
    plan.core.forward(_np(feats), _np(weight), b, _np(out), _ext.num_threads(), None, relu, active=run.active,
                      vector=run.vector, add=None if add is None else _np(add.contiguous()))
    return out


def conv_backward(feats: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, plan: FusedPlan,
                  need_feats: bool, need_weight: bool, region: torch.Tensor | None = None,
                  mask: torch.Tensor | None = None):
    """Gradients of :func:`conv_forward` for feats and weight (None where not
    needed). The weight gradient is zero outside ``region`` and, given the
    pruning ``mask`` the weight was multiplied by, equals ``dense gradient *
    mask`` (the masked vectors are not computed)."""
    grad_feats = grad_weight = None
    nt = _ext.num_threads()
    if need_feats:
        grad_feats = _ext.new_output((plan.num_in, weight.shape[1]), grad.dtype)
        run = choose_execution(weight, region, transpose=True)
        plan.core.backward_input(_np(grad), _np(weight), _np(grad_feats), nt, active=run.active, vector=run.vector)
    if need_weight:
        grad_weight = torch.empty_like(weight)
        active, vectors = weight_execution(mask, region)
        plan.core.backward_weight(_np(feats), _np(grad), _np(grad_weight), nt, active=active,
                                  mask=None if vectors is None else _np(vectors.contiguous()))
        if mask is not None:
            grad_weight.mul_(mask)
    return grad_feats, grad_weight


def panel_width(dtype: torch.dtype) -> int:
    """Columns of one vector-sparse panel (``sparse_panel<T>()`` in
    cpp/conv/sparse.h: the 32-byte builds' register tile, 64 bytes) on every
    CPU, whichever build runs the dense kernels: 16 float32, 8 float64. A
    16-bit weight (bfloat16, float16) runs as float32 panels: the bf16
    kernels' vectors span 16 columns (``kBf16Panel``), and elsewhere its
    values run widened through the float32 kernels."""
    size = torch.empty((), dtype=dtype).element_size()
    return 64 // max(size, 4)


def tile_panels(dtype: torch.dtype) -> int:
    """Adjacent panels (:func:`panel_width` columns each) that one row of
    the vector-sparse forward's register tile spans on this CPU where they
    list the same input channels: 2 for float32 and float64 where the
    AVX-512 vector kernels run from one panel (``_core.avx512_full_width()``:
    Intel, AMD Zen 5; cpp/conv/sparse_avx512.cpp's two-vector tiles), else 1. A weight
    pruned in blocks of that many panels (``prune.panel_structured(...,
    panels=tile_panels(dtype))``) runs as the dense tiles do per FMA."""
    _follow_width()
    return 2 if _TWIN_TILES and dtype in (torch.float32, torch.float64) else 1


#: Whether this CPU runs the AVX-512 vector kernels' twin tiles: at full
#: width, which implies the avx512 build runs (:func:`_follow_width`).
_TWIN_TILES: bool


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


def _flags(keep):
    """The kernels' offset flags of a bool ``(K,)`` numpy array or tensor:
    None when every offset runs, else uint8 numpy."""
    import numpy as np

    keep = _ext.to_numpy(keep.cpu()) if isinstance(keep, torch.Tensor) else keep
    return None if bool(keep.all()) else np.ascontiguousarray(keep.astype(np.uint8))


def vector_counts(weight: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """int64 ``(K, panels)``: ``vector_blocks(weight, transpose).sum(1)``,
    counted in one C++ pass for CPU float32/float64, in torch ops otherwise."""
    if _ext.serves(weight, dtypes=ENGINE_DTYPES):
        counts = _ext.core.conv_weight_vectors(_np(weight.contiguous()), transpose)
        return torch.from_numpy(counts).to(torch.int64)
    return vector_blocks(weight, transpose).sum(1)


def choose_execution(weight: torch.Tensor, region: torch.Tensor | None = None,
                     transpose: bool = False) -> Execution:
    """The forward (or, ``transpose``, input-gradient) execution of ``weight``:
    offsets whose ``(C_in, C_out)`` slab is all zero (or outside ``region``,
    a bool ``(K,)``) are skipped; the vector-sparse kernels run when at most
    :func:`vector_threshold` of the remaining vectors hold a nonzero. CPU
    float32/float64 weights are counted and decided in one C++ call
    (``_core.conv_execution``, a few microseconds: it runs on every conv
    call), the threshold moved toward :func:`twin_threshold` by the share of
    vectors in twin panels; others through the torch count and
    :func:`_execution`."""
    rows = weight.shape[2] if transpose else weight.shape[1]
    return _decide(weight, transpose, region, vector_threshold(rows), twin_threshold(rows, weight.dtype))


def _decide(weight: torch.Tensor, transpose: bool, region: torch.Tensor | None, threshold: float,
            twin: float | None = None) -> Execution:
    """The execution of ``weight`` (or ``weight[k].T``) at this vector
    ``threshold`` (``twin``: the threshold of vectors in twin panels, where
    the kernels run them in twin tiles): the core's one call for CPU
    float32/float64, else :func:`_execution` on the torch count (no twin
    tiles there). Every per-call choice (forward, input gradient, masked
    weight gradient) goes through here."""
    if not _ext.serves(weight, dtypes=ENGINE_DTYPES):
        return _execution(_ext.to_numpy(vector_blocks(weight, transpose).sum(1).cpu()),
                          weight.shape[2] if transpose else weight.shape[1], region, threshold)
    flags = None if region is None else _ext.to_numpy(region.cpu())
    active, vector, density = _ext.core.conv_execution(_np(weight.contiguous()), transpose, flags, threshold, twin)
    return Execution(active, vector, density)


def _execution(counts, rows: int, region, threshold: float) -> Execution:
    """The same choice from numpy ``(K, panels)`` counts (:func:`vector_counts`)
    of ``rows`` rows per panel, where the core does not serve the weight (a
    CUDA weight, other dtypes: no twin tiles there)."""
    per_offset = counts.sum(1)
    keep = per_offset > 0
    if region is not None:
        keep &= _ext.to_numpy(region.cpu())
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


def executed_flops(weight: torch.Tensor, pair_counts: torch.Tensor, region: torch.Tensor | None = None,
                   execution: Execution | None = None) -> int:
    """Multiply-adds x 2 that the fused engine's forward executes for
    ``weight`` on a map with per-offset ``pair_counts`` (the identity's
    included): ``pairs(k) * C_in * C_out`` per offset run, or with the
    vector-sparse kernels ``pairs(k) * (columns of the vectors listed)``.
    The choice is the engine's own (``execution``, or :func:`choose_execution`;
    for a weight the core does not serve, such as a CUDA one,
    :func:`_execution` on its counts)."""
    counts = vector_counts(weight).cpu()  # a CUDA weight's counts too
    if execution is None and _ext.serves(weight, dtypes=ENGINE_DTYPES):
        execution = choose_execution(weight, region)
    elif execution is None:
        execution = _execution(_ext.to_numpy(counts), weight.shape[1], region, vector_threshold(weight.shape[1]))
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
    execution = _decide(mask, False, region, MASKED_WGRAD_DENSITY)
    return execution.active, (mask if execution.vector and execution.density > 0 else None)


def _product_rule(function, a, b, t_a, t_b, rest: tuple, mask=None) -> list:
    """The terms of the jvp of ``function(a, b, *rest)``, linear in ``a`` and
    in ``b`` (the engine's three Functions): ``function(t_a, b)`` and
    ``function(a, t_b * mask)`` (``mask``: a pruning mask, which scales a
    weight tangent as it scales the weight's gradients), each where its
    tangent is given."""
    parts = []
    if t_a is not None:
        parts.append(function.apply(t_a, b, *rest))
    if t_b is not None:
        parts.append(function.apply(a, t_b if mask is None else t_b * mask, *rest))
    return parts


def _sum_of(parts: list, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """The sum of a jvp rule's terms (zeros of ``shape`` where every tangent
    it was given was None)."""
    if not parts:
        return like.new_zeros(shape)
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _vmap_by_sample(function, info, in_dims: tuple, args: tuple):
    """The vmap rule of the engine's Functions: ``function`` applied to each
    sample of the batch (the batched arguments taken at that index, the
    others as given), the results stacked on dim 0. The core runs plain 2-D
    rows, so a batch costs its samples' products, as a loop over them
    would; the samples' kernel maps and plans are the one map's (only feats,
    weights and gradients are batched, never coords)."""
    def sample(i):  # (a non-tensor argument's in_dims entry may be a tuple of Nones: the weight's shape)
        return (a.select(d, i) if isinstance(a, torch.Tensor) and isinstance(d, int) else a
                for a, d in zip(args, in_dims))

    outs = [function.apply(*sample(i)) for i in range(info.batch_size)]
    return torch.stack(outs), 0


class ConvFunction(torch.autograd.Function):
    """Autograd of the engine: ``ConvFunction.apply(feats, weight, bias, plan,
    region, mask)`` (``region``, ``mask``: see :func:`conv_backward`).

    Differentiable to any order: the input gradient and the weight gradient
    are themselves autograd functions (:class:`_InputGrad`, :class:`_WeightGrad`)
    whose gradients are the conv and each other, so a gradient penalty
    (``create_graph=True``) is exact; ``mask`` scales every gradient of the
    weight, of any order (it reaches the weight through ``_InputGrad`` too).
    Without ``create_graph`` backward makes
    one combined pass (and computes only the weight-gradient vectors ``mask``
    keeps).

    The forward takes no ``ctx`` (``setup_context`` fills it), so torch.func
    transforms (``grad``, ``vjp``, ``jacrev``) run it on plain tensors, as
    the core needs. Forward mode (``torch.func.jvp``, ``jacfwd``,
    ``torch.autograd.forward_ad``) takes the product rule (:meth:`jvp`: the
    conv is linear in the feats and in the weight), and ``torch.func.vmap``
    (per-sample gradients, a batched ``jacrev``) runs the batch one sample
    at a time (:func:`_vmap_by_sample`): the core takes plain rows."""

    @staticmethod
    def forward(feats, weight, bias, plan, region, mask):
        return conv_forward(feats.contiguous(), weight.contiguous(), bias, plan, region=region)

    @staticmethod
    def setup_context(ctx, inputs, output):
        feats, weight, bias, plan, region, mask = inputs
        ctx.plan, ctx.region, ctx.mask = plan, region, mask
        # the inputs themselves, not contiguous copies: a copy made in the
        # forward is no part of the graph, and second-order gradients would miss it
        ctx.save_for_backward(feats, weight)
        ctx.save_for_forward(feats, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def jvp(ctx, t_feats, t_weight, t_bias, *_):
        # d(conv(f, W) + b) = conv(df, W) + conv(f, dW * mask) + db: the mask, as in the gradients (the
        # adjoint of a weight gradient that the mask multiplies), keeps a pruned entry's tangent out
        feats, weight = ctx.saved_tensors
        shape = (ctx.plan.num_out, weight.shape[2])
        parts = _product_rule(ConvFunction, feats, weight, t_feats, t_weight, (None, ctx.plan, ctx.region, ctx.mask),
                              ctx.mask)
        if t_bias is not None:
            parts.append(t_bias.expand(shape))
        return _sum_of(parts, shape, feats)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_sample(ConvFunction, info, in_dims, args)

    @staticmethod
    def backward(ctx, grad):
        feats, weight = ctx.saved_tensors
        need_feats, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_bias = grad.sum(0) if (ctx.has_bias and need_bias) else None
        if torch.is_grad_enabled():  # create_graph: gradients that can be differentiated again
            region = ctx.region
            grad_feats = _InputGrad.apply(grad, weight, ctx.plan, region, ctx.mask) if need_feats else None
            grad_weight = (_WeightGrad.apply(feats, grad, ctx.plan, tuple(weight.shape), region) if need_weight
                           else None)
            if grad_weight is not None and ctx.mask is not None:  # as the one-pass gradient: dense * mask
                grad_weight = grad_weight * ctx.mask
            return grad_feats, grad_weight, grad_bias, None, None, None
        grad_feats, grad_weight = conv_backward(feats.contiguous(), weight.contiguous(), grad.contiguous(), ctx.plan,
                                                need_feats, need_weight, ctx.region, ctx.mask)
        return grad_feats, grad_weight, grad_bias, None, None, None


class _InputGrad(torch.autograd.Function):
    """``grad_feats[in] += grad[out] @ weight[o].T``: linear in ``grad`` (its
    adjoint is the conv) and in ``weight`` (the weight gradient's form).
    ``mask``: the conv's pruning mask (or None), which scales every gradient
    of ``weight`` here too, as the conv's own weight gradient (a penalty on
    the input gradient reached the pruned entries)."""

    @staticmethod
    def forward(grad, weight, plan, region, mask):
        grad_c, weight_c = grad.contiguous(), weight.contiguous()
        shape_only = grad_c.new_empty((plan.num_in, weight_c.shape[1]))
        return conv_backward(shape_only, weight_c, grad_c, plan, True, False, region)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, weight, plan, region, mask = inputs
        ctx.plan, ctx.region, ctx.mask = plan, region, mask
        ctx.save_for_backward(grad, weight)  # (the inputs, as ConvFunction's)
        ctx.save_for_forward(grad, weight)

    @staticmethod
    def jvp(ctx, t_grad, t_weight, *_):
        grad, weight = ctx.saved_tensors
        parts = _product_rule(_InputGrad, grad, weight, t_grad, t_weight, (ctx.plan, ctx.region, ctx.mask), ctx.mask)
        return _sum_of(parts, (ctx.plan.num_in, weight.shape[1]), grad)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_sample(_InputGrad, info, in_dims, args)

    @staticmethod
    def backward(ctx, h):
        grad, weight = ctx.saved_tensors
        need_grad, need_weight = ctx.needs_input_grad[:2]
        d_grad = ConvFunction.apply(h, weight, None, ctx.plan, ctx.region, ctx.mask) if need_grad else None
        d_weight = _WeightGrad.apply(h, grad, ctx.plan, tuple(weight.shape), ctx.region) if need_weight else None
        if d_weight is not None and ctx.mask is not None:
            d_weight = d_weight * ctx.mask
        return d_grad, d_weight, None, None, None


class _WeightGrad(torch.autograd.Function):
    """``grad_weight[o] = feats[in].T @ grad[out]``: linear in ``feats`` (its
    adjoint is the input gradient) and in ``grad`` (its adjoint is the conv)."""

    @staticmethod
    def forward(feats, grad, plan, weight_shape, region):
        feats_c, grad_c = feats.contiguous(), grad.contiguous()
        shape_only = feats_c.new_empty(weight_shape)
        return conv_backward(feats_c, shape_only, grad_c, plan, False, True, region)[1]

    @staticmethod
    def setup_context(ctx, inputs, output):
        feats, grad, plan, _weight_shape, region = inputs
        ctx.plan, ctx.region, ctx.weight_shape = plan, region, _weight_shape
        ctx.save_for_backward(feats, grad)  # (the inputs, as ConvFunction's)
        ctx.save_for_forward(feats, grad)

    @staticmethod
    def jvp(ctx, t_feats, t_grad, *_):
        feats, grad = ctx.saved_tensors
        parts = _product_rule(_WeightGrad, feats, grad, t_feats, t_grad, (ctx.plan, ctx.weight_shape, ctx.region))
        return _sum_of(parts, ctx.weight_shape, feats)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_sample(_WeightGrad, info, in_dims, args)

    @staticmethod
    def backward(ctx, v):
        feats, grad = ctx.saved_tensors
        need_feats, need_grad = ctx.needs_input_grad[:2]
        d_feats = _InputGrad.apply(grad, v, ctx.plan, ctx.region, None) if need_feats else None
        d_grad = ConvFunction.apply(feats, v, None, ctx.plan, ctx.region, None) if need_grad else None
        return d_feats, d_grad, None, None, None


def bf16_inference(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether these tensors are bf16 inference the engine serves: CPU
    bfloat16 feats and weight, no gradient needed and no forward-mode
    tangent carried (:func:`_differentiated`; the bf16 kernels dropped it)."""
    if feats.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return False
    if _differentiated(feats, weight, bias):
        return False
    return _ext.serves(feats, weight)


def sixteen_bit_on_float32(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a bfloat16 conv in training (a gradient wanted), or a
    float16 conv in training or inference, runs in the float32 kernels on
    its values widened (:func:`conv_bf16_on_float32`), as a conv in
    autocast's precision does: feats, weight and bias of one 16-bit dtype
    that the core serves, none carrying a forward-mode tangent (the engine
    has no jvp; the torch path has). Its sums are float32's, rounded once,
    as bf16 inference's; the torch path rounded each offset's product to
    the 16-bit dtype and summed there, so a model's training forward and
    its inference differed by those roundings (and a float16 model's
    inference ran every pair in torch ops: a Conv3d(64, 64, 3) 44.6 ms
    against 2.4 ms with a gradient wanted, AMD EPYC Zen 5)."""
    dtype = feats.dtype
    if dtype not in (torch.bfloat16, torch.float16) or weight.dtype != dtype:
        return False
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != dtype):
        return False
    if _ext.carries_tangent(feats, weight, bias) or (
            dtype == torch.bfloat16 and not _ext.needs_grad(feats, weight, bias)):  # (bf16 inference: its own)
        return False
    return _ext.serves(feats, weight)


def runs_bf16(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether :func:`conv_bf16` runs these tensors: :func:`bf16_inference`
    on a CPU with AVX512-BF16."""
    return bf16_inference(feats, weight, bias) and bf16_kernels()  # the core asked only if it serves


def bf16_kernels() -> bool:
    """Whether the core's AVX512-BF16 kernels run on this CPU (ask only once
    :func:`bf16_inference` holds: the torch backend must not reach the core)."""
    return _ext.core.conv_bf16()


def conv_bf16_on_float32(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         kmap: _kmap.KernelMap, cache: "CoordinateCache | None" = None, relu: bool = False,
                         region: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         add: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 inference through the float32 kernels (a CPU without
    AVX512-BF16, or a kernel region): the bf16 inputs widen to float32
    exactly, so the products are exact and summed in float32 as
    ``vdpbf16ps`` sums them; the result is rounded once to the feats' dtype.
    So does a conv in autocast's precision (bf16 or fp16, whose products
    float32 holds exactly too) with autograd: the gradients in float32,
    rounded to the inputs' dtype by the widening's own backward
    (``mask``: :func:`conv`'s, widened alike). ``add``: a residual of the
    feats' dtype, widened too and summed in the float32 store before the
    ReLU and the one rounding, as the AVX512-BF16 kernels sum it (added
    after the rounding, it was rounded twice where it cancelled the sum)."""
    wide_bias = None if bias is None else bias.float()
    wide_mask = None if mask is None else mask.float()
    if add is not None and (not isinstance(add, torch.Tensor) or add.dtype != feats.dtype):
        raise TypeError(f"add must be a tensor of the feats' dtype ({feats.dtype}) or None; got "
                        f"{add.dtype if isinstance(add, torch.Tensor) else type(add).__name__}")
    if add is not None and add.shape != (kmap.num_out, weight.shape[2]):  # (before the widening: named as given)
        raise ValueError(f"add must be ({kmap.num_out}, {weight.shape[2]}) {feats.dtype} (the output's shape); got "
                         f"{tuple(add.shape)} {add.dtype}")
    wide_add = None if add is None else add.float()
    return conv(feats.float(), weight.float(), wide_bias, kmap, cache, relu, region, wide_mask,
                wide_add).to(feats.dtype)


#: Largest density of listed bf16 vectors (offset, channel pair, 16 output
#: columns; see ``ConvPlan.forward_bf16``) at which the bf16 forward runs
#: its vector-sparse form; :func:`bf16_vector_threshold` raises it to 1 where
#: the dense form's 32-column tiles would leave half a tile empty. Measured
#: (``python bench/bf16_vectors.py --rounds 7 --channels 8 16 24 32 64 128``,
#: KITTI sweep, one thread, AMD EPYC Zen 4 [avx512 bf16], bench/RESULTS.md):
#: against the dense form the vector form ran 0.83-0.96x at density 1.0 and
#: 1.05-1.09x at 0.59-0.75 (C = 24 to 128: crossings near 0.73-0.83), 1.2-1.8x
#: at 0.4-0.5; at C = 8 and 16 1.08x and 1.25x at density 1.0:
#: ``BF16_VECTOR_DENSITY_SPLIT``.
BF16_VECTOR_DENSITY_SPLIT = 0.75
#: The same where the AVX-512 FMAs run at full width
#: (``_core.avx512_full_width()``), which speeds the dense form more than the
#: vector one: measured (``python bench/bf16_vectors.py --rounds 9 --channels
#: 24 32 64 128 --pair-amounts 0.2 0.25 0.3 0.35 0.4 0.45 0.5``, KITTI sweep,
#: one thread, AMD EPYC Zen 5, bench/RESULTS.md stop 50) the vector form
#: crossed the dense one near density 0.57 at C = 24 and 32, 0.66 at 64, 0.70
#: at 128 (0.87-0.93x at 0.75, 0.94-1.16x at 0.6); at C = 8 and 16 it still
#: won at density 0.9-1.0 (1.03-1.10x), at 48 from 0.8.
BF16_VECTOR_DENSITY_WIDE = 0.6
BF16_VECTOR_DENSITY: float  # (the one of the two this CPU's width takes: _follow_width)


def _follow_width() -> None:
    """Sets the choices that follow the width of the CPU's AVX-512 FMAs
    (``VECTOR_DENSITY``, ``VECTOR_FULL_ROWS``, ``VECTOR_DENSITY_TWIN``,
    ``BF16_VECTOR_DENSITY``, ``_TWIN_TILES``) from the core's answer where it
    changed since they were set: read once at import, they stayed the old
    width's after ``_core.set_avx512_full_width`` while the core's own
    choices (streamed outputs) followed the new one. Each function that
    reads them calls this first (the core's answer: about 20 ns); a value a
    test or benchmark set on the module stands until the width changes."""
    global _FULL_WIDTH, VECTOR_DENSITY, VECTOR_FULL_ROWS, VECTOR_DENSITY_TWIN, BF16_VECTOR_DENSITY, _TWIN_TILES
    wide = _ext.core.avx512_full_width()
    if wide == _FULL_WIDTH:
        return
    VECTOR_DENSITY = VECTOR_DENSITY_WIDE if wide else VECTOR_DENSITY_SPLIT
    VECTOR_FULL_ROWS = VECTOR_FULL_ROWS_WIDE if wide else VECTOR_FULL_ROWS_SPLIT
    VECTOR_DENSITY_TWIN = VECTOR_DENSITY_TWIN_WIDE if wide else None
    BF16_VECTOR_DENSITY = BF16_VECTOR_DENSITY_WIDE if wide else BF16_VECTOR_DENSITY_SPLIT
    _TWIN_TILES = wide
    # Last: a thread that finds the new width here finds its choices set (one that came between the core's
    # answer and these read the old width's, with this one's check passed: a conv chose by the old width).
    _FULL_WIDTH = wide


_follow_width()


def bf16_vector_threshold(cols: int) -> float:
    """The bf16 forward's vector threshold for ``cols`` output columns: 1.0
    (always the vector form) where the last 32-column tile of the dense form
    would hold 16 columns or fewer (C_out = 8, 16, 48, ...), else
    :data:`BF16_VECTOR_DENSITY`."""
    _follow_width()
    return 1.0 if 0 < cols % 32 <= 16 else BF16_VECTOR_DENSITY


#: Whether the bf16 forward may run on the AMX tiles where the CPU has them
#: (:func:`bf16_tiles`); turned off (tests/test_bf16.py, bench/north_star.py)
#: to reach the ``vdpbf16ps`` forms on such a CPU.
BF16_TILES = True

#: The smallest listed width (the density of listed bf16 vectors, as for
#: :func:`bf16_vector_threshold`, x sqrt(C_in x C_out)) at which a conv runs
#: on the AMX tiles (``forward_bf16(tiles_width=...)``: every kept offset
#: dense, 16 pairs x 16 columns a tile) rather than in a ``vdpbf16ps`` form.
#: Measured (``python bench/bf16_vectors.py --channels 8 16 24 32 64``, KITTI
#: sweep, one thread, Intel Xeon with AMX, bench/RESULTS.md): the tiles ran
#: 1.4-2.9x the best ``vdpbf16ps`` form unpruned at C = 24 to 64, even at
#: C = 16, 0.45-0.72x at C = 8; pruned, they won from a listed width of about
#: 14 (C = 24, 32) to 22 (C = 64) and lost below.
BF16_TILES_WIDTH = 20.0


def bf16_tiles() -> bool:
    """Whether the bf16 forward may run its AMX form here: :data:`BF16_TILES`
    on a CPU with AMX-BF16 whose OS lets this process use the tiles (Intel
    Xeon from Sapphire Rapids on); a conv then runs on the tiles where its
    listed width is at least :data:`BF16_TILES_WIDTH`."""
    return BF16_TILES and _ext.core.conv_amx()


def bf16_tiles_width() -> float:
    """The ``tiles_width`` the engine passes to ``forward_bf16``:
    :data:`BF16_TILES_WIDTH` where :func:`bf16_tiles`, else infinite (never)."""
    return BF16_TILES_WIDTH if bf16_tiles() else math.inf


def bf16_vectors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(listed, keep, density)`` of a ``(K, C_in, C_out)`` weight as the
    bf16 kernels list it (``forward_bf16``): ``listed`` bool ``(K, pairs,
    panels)``, whether channel pair ``q`` holds a nonzero in the 16 columns
    of panel ``p`` of offset ``k``; ``keep`` the offsets holding a nonzero;
    ``density`` the kept offsets' listed vectors over their capacity (0
    with none kept)."""
    k, c_in, c_out = weight.shape
    nonzero = torch.nn.functional.pad(weight.detach().cpu() != 0, (0, -c_out % 16, 0, c_in % 2))
    listed = nonzero.view(k, (c_in + 1) // 2, 2, -(-c_out // 16), 16).any(2).any(-1)
    keep = listed.flatten(1).any(1)
    capacity = int(keep.sum()) * listed.shape[1] * listed.shape[2]
    return listed, keep, (int(listed[keep].sum()) / capacity if capacity else 0.0)


def bf16_cost(weight: torch.Tensor, pair_counts) -> tuple[int, str]:
    """``(executed FLOPs, execution)`` of the bf16 kernels for a bfloat16
    ``(K, C_in, C_out)`` weight on a map with these per-offset pair counts,
    as ``forward_bf16`` decides (:func:`bf16_vectors`): offsets without a
    nonzero skipped; the vector form (where the density is at most
    :func:`bf16_vector_threshold`) runs ``pairs(k) x channels x columns``
    of each listed vector (a listed pair counts both its channels), the
    dense form ``pairs(k) x C_in x C_out`` per kept offset; so does the AMX
    form (``tiles``, where the listed width reaches :func:`bf16_tiles_width`;
    the products counted, not the zero padding its tiles also multiply)."""
    _, c_in, c_out = weight.shape
    listed, keep, density = bf16_vectors(weight)
    pairs = torch.as_tensor(pair_counts, dtype=torch.int64)
    if bool(keep.any()) and density * math.sqrt(c_in * c_out) >= bf16_tiles_width():
        return 2 * int(pairs[keep].sum()) * c_in * c_out, "tiles"
    if density <= bf16_vector_threshold(c_out):
        channels = torch.full((listed.shape[1],), 2, dtype=torch.int64)
        if channels.numel():
            channels[-1] = 2 - c_in % 2
        columns = _panel_columns(c_out, torch.float32)
        per_offset = (listed.long() * channels[:, None] * columns[None, :]).sum((1, 2))
        return 2 * int((pairs * per_offset)[keep].sum()), "vector"
    flops = 2 * int(pairs[keep].sum()) * c_in * c_out
    return flops, ("offsets" if not bool(keep.all()) else "dense")


def conv_bf16(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kmap: _kmap.KernelMap,
              cache: "CoordinateCache | None" = None, relu: bool = False,
              add: torch.Tensor | None = None) -> torch.Tensor:
    """The bf16 inference forward (see :func:`runs_bf16`) on ``kmap``'s plan:
    :func:`bf16_forward`."""
    return bf16_forward(feats, weight, bias, get_plan(kmap, cache), relu, add)


def bf16_forward(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: FusedPlan,
                 relu: bool = False, add: torch.Tensor | None = None) -> torch.Tensor:
    """Products of the bf16 feats and weight summed in float32 by
    ``vdpbf16ps`` (or the AMX tiles: :func:`bf16_tiles`), bias (and ReLU)
    added in float32, the result rounded once to bfloat16 (AVX512-BF16 CPUs:
    :func:`bf16_kernels`). Offsets whose weight is all zero are skipped, and
    a vector-sparse weight (see :func:`bf16_vector_threshold`) runs only its
    listed vectors (not on the tiles, which run every kept offset: see
    :data:`BF16_TILES_WIDTH`). ``add``: a
    bfloat16 residual ``(num_out, C_out)`` added in float32 before the ReLU
    (one rounding for the conv, the sum and the ReLU)."""
    cols = weight.shape[2]
    rounded = _ext.new_output((plan.num_out, cols), torch.bfloat16)
    b = None if bias is None else _np(bias.detach().float().contiguous())
    # No float32 output: the sums stay in a block of each thread's, rounded
    # into ``rounded`` block by block.
    plan.core.forward_bf16(_np(feats.contiguous().view(torch.int16)), _np(weight.contiguous().view(torch.int16)),
                           b, None, _ext.num_threads(), relu, out_bf16=_np(rounded.view(torch.int16)),
                           vector_density=bf16_vector_threshold(cols),
                           add=None if add is None else _np(add.contiguous().view(torch.int16)),
                           tiles_width=bf16_tiles_width())
    return rounded


def supported(feats: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the C++ engine serves these tensors (CPU float32/float64 of
    one dtype) under the backend policy (``_ext.serves``)."""
    return weight.dtype == feats.dtype and _ext.serves(feats, weight, dtypes=ENGINE_DTYPES)


def check_arguments(feats, weight, bias, kmap: _kmap.KernelMap) -> None:
    """The checks the engine makes before touching memory (ValueError or
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


def _differentiated(*tensors: torch.Tensor | None) -> bool:
    """Whether a result of these tensors goes through :class:`ConvFunction`:
    one of them needs a gradient, carries a forward-mode tangent
    (``torch.func.jvp``, ``torch.autograd.forward_ad``: the Function's jvp
    rule carries it, where the inference path would drop it, a silent zero)
    or is a ``torch.func.vmap`` batch (the Function's vmap rule runs it
    sample by sample; the core cannot read a batch)."""
    return _ext.needs_grad(*tensors) or _ext.carries_tangent(*tensors) or _ext.batched(*tensors)


def conv(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kmap: _kmap.KernelMap,
         cache: "CoordinateCache | None" = None, relu: bool = False, region: torch.Tensor | None = None,
         mask: torch.Tensor | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """``out[out_idx] += feats[in_idx] @ weight[o]`` (+ bias) with autograd,
    over the offsets of ``region`` (bool ``(K,)``, None: all); the plan is
    kept in ``cache`` (the coordinate cache holding ``kmap``). ``mask``: the
    pruning mask ``weight`` was multiplied by (its zeros get no gradient).
    ``add``: a residual ``(num_out, C_out)`` added to the output (before the
    ReLU). ``relu``: max(out, 0). Where no gradient is needed (inference) the
    residual and the ReLU run in the kernel's store, no pass of their own."""
    check_arguments(feats, weight, bias, kmap)
    if add is not None:
        if not isinstance(add, torch.Tensor):
            raise TypeError(f"add must be a torch.Tensor or None; got {type(add).__name__}")
        if add.shape != (kmap.num_out, weight.shape[2]) or add.dtype != feats.dtype or add.device != feats.device:
            raise ValueError(f"add must be ({kmap.num_out}, {weight.shape[2]}) {feats.dtype} on {feats.device} "
                             f"(the output's shape); got {tuple(add.shape)} {add.dtype} on {add.device}")
    plan = get_plan(kmap, cache)
    if mask is not None and (mask.shape != weight.shape or mask.dtype != weight.dtype):
        raise ValueError(f"mask must match the weight {tuple(weight.shape)} {weight.dtype}; got "
                         f"{tuple(mask.shape)} {mask.dtype}")
    mask = None if mask is None else mask.detach().contiguous()
    if not _differentiated(feats, weight, bias, add):
        if not torch.is_grad_enabled():  # (inference: no context to enter on every call)
            return conv_forward(feats.contiguous(), weight.contiguous(), bias, plan, relu, region, add)
        with torch.no_grad():
            return conv_forward(feats.contiguous(), weight.contiguous(), bias, plan, relu, region, add)
    out = ConvFunction.apply(feats, weight, bias, plan, region, mask)
    if add is not None:
        out = out + add
    return torch.relu(out) if relu else out
