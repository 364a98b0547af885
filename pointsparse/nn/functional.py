"""Functional sparse convolution over SparseTensors (API.md semantics)."""

from __future__ import annotations

import contextlib
import functools
import math
import operator

import numpy as np
import torch

from .. import _ext
from .. import coords as _coords
from .. import kmap as _kmap
from .. import ops as _ops
from . import _engine
from . import reference as _reference
from ..coords import check_has_data, check_strided
from ..tensor import SparseTensor, as_bool, as_float, as_triple, items_of, nonnegative_int

__all__ = ["conv3d", "add", "cat", "union", "max_pool3d", "avg_pool3d", "global_avg_pool", "global_max_pool",
           "instance_norm", "select_voxels", "keep_per_batch", "region_of", "engine_cost"]


def _check_weight(input: SparseTensor, weight: torch.Tensor, k) -> int:
    volume = k[0] * k[1] * k[2]
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor; got {type(weight).__name__}")
    check_strided(weight, "weight")
    if weight.dim() != 3 or weight.shape[0] != volume or weight.shape[1] != input.num_channels:
        raise ValueError(
            f"weight must be (K, C_in, C_out) = ({volume}, {input.num_channels}, C_out) for kernel_size {k} and "
            f"{input.num_channels} input channels; got {tuple(weight.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from the input feats' {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but the input on {input.device}")
    return volume


def region_of(kernel_size, region) -> torch.Tensor | None:
    """The offsets a conv with a custom kernel region runs, as a bool ``(K,)``
    (None: every offset). ``region``: None, ``"cross"`` (the hyper-cross: the
    offsets with at most one axis away from the centre), or a sequence of
    offset indices (API.md's enumeration). A kernel past
    :data:`pointsparse.kmap.MAX_KERNEL_VOLUME` offsets is a ValueError, before
    anything is allocated."""
    return _region(as_triple(kernel_size, "kernel_size"), region)


def _region(k, region) -> torch.Tensor | None:
    """:func:`region_of` of a normalised kernel size."""
    volume = k[0] * k[1] * k[2]
    if region is None:
        return None
    # the kernel's size before its (K,) mask (and the cross's (K, 3) grid) is allocated: the kernel maps' refusal
    _kmap.check_kernel(k, (1, 1, 1), (1, 1, 1))
    if isinstance(region, str):
        if region != "cross":
            raise ValueError("kernel_region must be None, 'cross' (the hyper-cross: MinkowskiEngine's HYPER_CROSS) or "
                             f"a sequence of offset indices; got {region!r}")
        # (on the CPU, as every (K,) mask here: under ``with torch.device("meta")`` the default device's mask
        # had no values and a Conv3d's constructor failed reading it, in torch's nonzero)
        grid = torch.stack(torch.meshgrid(*[torch.arange(n, device="cpu") - (n - 1) // 2 for n in k],
                                          indexing="ij"), -1)
        return (grid.reshape(-1, 3) != 0).sum(1) <= 1
    try:
        items = list(region)  # (read once: a generator too)
    except TypeError:
        raise TypeError(f"kernel_region must be None, 'cross' or a sequence of offset indices; got {region!r}") from None
    # (a bool mask's items: a bool tensor's are 0-d bool tensors, which operator.index reads as 0 and 1)
    if any(isinstance(i, (bool, np.bool_)) or isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
        raise TypeError(f"kernel_region must list offset indices, not bools (for a mask of the offsets give "
                        f"mask.nonzero().flatten()); got {region!r}")
    try:
        indices = [operator.index(i) for i in items]  # ints (numpy, 0-d tensors too), never a truncated float
    except (TypeError, ValueError):
        raise TypeError(f"kernel_region must be None, 'cross' or a sequence of offset indices; got {region!r}") from None
    if any(not 0 <= i < volume for i in indices) or not indices:
        raise ValueError(f"kernel_region must list offset indices in [0, {volume}) for kernel_size {k}; got {region!r}")
    keep = torch.zeros(volume, dtype=torch.bool, device="cpu")
    keep[indices] = True
    return keep


def engine_cost(weight: torch.Tensor, pair_counts: torch.Tensor, kernel_size=3, kernel_region=None,
                num_out: int | None = None) -> tuple[int, str]:
    """``(executed FLOPs, execution)`` of the forward of a :func:`conv3d`
    call with ``weight`` ``(K, C_in, C_out)`` over a map with these
    per-offset pair counts, on the path that call takes now
    (:func:`_conv_path`: the weight's dtype and device, grad mode and
    ``weight.requires_grad``, ``torch.autocast`` and the backend policy in
    force, an input that wants no gradient). On the fused engine its
    choice (``"dense"``, ``"offsets"`` when all-zero offsets and offsets
    outside ``kernel_region`` are skipped, ``"vector"`` when only the
    nonzero vectors run; ``"tiles"``: the bf16 AMX form) and the
    multiply-adds (x2) it runs: a bfloat16 weight in inference on a CPU
    with AVX512-BF16 as the bf16 kernels run it
    (:func:`pointsparse.nn._engine.bf16_cost`); with a ``kernel_region``,
    elsewhere, wanting a gradient, or a float16 weight (the float32
    kernels on the values widened, "bf16 on float32": :func:`_eager_path`)
    as the float32 kernels run them; under ``torch.autocast`` a float32
    weight the core serves in autocast's precision. Where conv3d runs the
    pure-torch path instead (``backend("torch")``, a device other than the
    CPU), ``"torch"`` and what its sum runs
    (:func:`pointsparse.nn.reference.torch_flops`: every pair of every
    offset times the whole matrix; off the CPU, where its columns fit, one
    product over ``K`` columns per output site, which counts ``num_out``,
    the output sites: a ValueError without it there). (For the inference
    cost of a weight that wants a gradient, call it under
    ``torch.no_grad()`` or on ``weight.detach()``. A meta weight is a
    ValueError, as conv3d's.)"""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 3:
        raise TypeError(f"weight must be a (K, C_in, C_out) tensor; got "
                        f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    check_has_data(weight, "weight")
    region = region_of(kernel_size, kernel_region)
    volume = math.prod(as_triple(kernel_size, "kernel_size"))
    if volume != weight.shape[0]:
        raise ValueError(f"kernel_size {kernel_size} has {volume} offsets but the weight's K is {weight.shape[0]}")
    if not isinstance(pair_counts, torch.Tensor) or pair_counts.shape != (weight.shape[0],):
        raise ValueError(f"pair_counts must hold one count per kernel offset ({weight.shape[0]}, the weight's K); "
                         f"got {tuple(pair_counts.shape) if isinstance(pair_counts, torch.Tensor) else pair_counts!r}")
    if pair_counts.dtype.is_floating_point or pair_counts.dtype.is_complex or pair_counts.dtype == torch.bool:
        raise TypeError(f"pair_counts must hold integer counts; got dtype {pair_counts.dtype}")
    if len(pair_counts) and int(pair_counts.min()) < 0:
        raise ValueError(f"pair_counts must be >= 0; got {int(pair_counts.min())}")
    if num_out is not None:
        num_out = nonnegative_int(num_out, "num_out")
    feats = weight.detach().new_empty((0, weight.shape[1]))  # (the call's input: the weight's dtype and device)
    path = _conv_path(feats, weight, None, kernel_size, kernel_region)
    if path == "torch":
        if num_out is None and weight.device.type != "cpu":
            raise ValueError(f"num_out must be given for a weight on {weight.device}: conv3d runs it on the "
                             "pure-torch path, whose product over every output site's K columns counts them")
        return _reference.torch_flops(feats, weight, pair_counts, num_out or 0), "torch"
    low = _autocast_precision(feats, weight)
    weight = weight.detach() if low is None else weight.detach().to(low)  # (conv3d's weight rounded to it)
    if path == "bf16":
        return _engine.bf16_cost(weight, pair_counts)  # the AVX512-BF16 kernels' own vectors
    if weight.dtype not in _engine.ENGINE_DTYPES:
        weight = weight.float()
    run = _engine.choose_execution(weight, region)
    return _engine.executed_flops(weight, pair_counts, region, run), run.name


def panel_width(dtype: torch.dtype) -> int:
    """Columns of one vector of the engine's vector-sparse kernels (16
    float32 and bfloat16 / 8 float64): the output-channel panel a weight
    vector spans."""
    _check_dtype(dtype)
    return _engine.panel_width(dtype)


def _check_dtype(dtype) -> None:
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (torch.float32, ...); got {dtype!r:.100}")


def tile_panels(dtype: torch.dtype) -> int:
    """Adjacent panels a row of the vector-sparse forward's register tile
    spans on this CPU (2 for float32 / float64 with the AVX-512 kernels on a
    full-width CPU, else 1): the ``panels`` to give
    ``prune.panel_structured`` for the fastest vector-sparse forward here."""
    _check_dtype(dtype)
    return _engine.tile_panels(dtype)


def _autocast_precision(feats: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The precision :func:`conv3d` runs a float32 ``weight`` in under
    ``torch.autocast`` (bf16 / fp16; see there), or None where it runs the
    tensors' own dtype: outside autocast, in ``torch.export``, and where the
    core serves no eager call (the torch path's matmuls take autocast's
    precision themselves)."""
    low = _reference._autocast_dtype(weight)
    if low is not None and not torch.compiler.is_exporting() and (
            torch.compiler.is_compiling() or _engine.supported(feats, weight)):
        return low
    return None


def _eager_path(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, region, low) -> str:
    """Which eager path :func:`conv3d` runs these tensors on (``low``:
    :func:`_autocast_precision`, the tensors already in it): ``"bf16"``
    (bf16 inference on the AVX512-BF16 kernels), ``"bf16 on float32"``
    (the float32 kernels on the 16-bit values widened: bf16 inference
    with a kernel region or without those kernels, autocast's precision
    in training, a 16-bit conv in training), ``"engine"`` (the fused
    kernels), or ``"torch"`` (``reference.conv_torch``: other devices and
    dtypes, ``backend("torch")``)."""
    if _engine.bf16_inference(feats, weight, bias):  # (runs_bf16, asked once)
        return "bf16" if region is None and _engine.bf16_kernels() else "bf16 on float32"
    if low is not None or _engine.sixteen_bit_on_float32(feats, weight, bias):
        return "bf16 on float32"
    return "engine" if _engine.supported(feats, weight) else "torch"


def _conv_path(feats: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               kernel_size=3, kernel_region=None) -> str:
    """The eager path a :func:`conv3d` call on input feats ``feats`` with
    ``weight`` and ``bias`` takes now (grad mode, ``torch.autocast`` and
    the backend policy in force): ``"bf16"``, ``"bf16 on float32"``,
    ``"engine"`` or ``"torch"`` (see :func:`_eager_path`). The first three
    run the engine's kernels (:func:`engine_cost` gives their work); the
    last runs every pair of every offset in torch ops."""
    feats = _reference.autocast_input(feats, weight.dtype)
    low = _autocast_precision(feats, weight)
    if low is not None:
        feats, weight = feats.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
    return _eager_path(feats, weight, bias, region_of(kernel_size, kernel_region), low)


def conv3d(input: SparseTensor, weight: torch.Tensor, kernel_size=3, stride=1, dilation=1,
           bias: torch.Tensor | None = None, transposed: bool = False, relu: bool = False, kernel_region=None,
           weight_mask: torch.Tensor | None = None, add: SparseTensor | None = None) -> SparseTensor:
    """Sparse 3-D convolution (cross-correlation) of ``input`` with ``weight``
    ``(K, C_in, C_out)``; see API.md for the submanifold, strided and
    transposed semantics. The kernel map comes from ``input``'s coordinate
    cache (built once per structural key). ``relu``: ReLU on the output (in
    the fused kernel's store where no gradient is needed).

    ``kernel_region`` (see :func:`region_of`): only those offsets are
    summed (the others' weights are ignored and get a zero gradient).
    ``weight_mask``: the pruning mask ``weight`` is the product with, of the
    weight's shape, dtype and device (the entries it zeroes get a zero weight
    gradient, on the engine not computed). Offsets whose
    weight is all zero are skipped, and sparse enough weights run the
    vector-sparse kernels (see ``nn._engine.choose_execution``). bfloat16
    inference (no gradient wanted) on a CPU with AVX512-BF16 runs the bf16
    kernels, which skip all-zero offsets and run a weight sparse in bf16
    vectors in their own vector form (``nn._engine.bf16_forward``); a bf16
    conv with a ``kernel_region`` or without those kernels, a bf16 conv that
    wants a gradient, and an fp16 conv, run the float32 kernels on the widened
    values, rounded once (:func:`_eager_path`'s "bf16 on float32").

    ``add``: a SparseTensor on the output's coords (a residual block's
    shortcut) added to the output before the ReLU: ``relu(conv + add)``. On
    the engine without gradients the sum and the ReLU run in the kernel's
    store, block by block while the rows are in cache (no sum and no ReLU
    pass of their own); the values are those of ``functional.add`` and a
    ReLU after the conv."""
    if not isinstance(input, SparseTensor):
        raise TypeError(f"input must be a SparseTensor; got {type(input).__name__}")
    k = as_triple(kernel_size, "kernel_size")
    t = as_triple(stride, "stride")
    d = as_triple(dilation, "dilation")
    transposed, relu = as_bool(transposed, "transposed"), as_bool(relu, "relu")
    given = input
    if isinstance(weight, torch.Tensor):
        # Under torch.autocast a conv takes feats of another precision than its weight (a bf16
        # layer's output), as torch's convs do: the feats in the weight's dtype (the engine's sums
        # run in it; on the torch path autocast's matmuls take their own precision).
        feats = _reference.autocast_input(input.feats, weight.dtype)
        if feats is not input.feats:
            input = input.with_feats(feats)
    _check_weight(input, weight, k)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None; got {type(bias).__name__}")
        check_strided(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != weight.shape[2]:
            raise ValueError(f"bias must be (C_out,) = ({weight.shape[2]},); got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise TypeError(f"bias ({bias.dtype}, {bias.device}) must match the weight ({weight.dtype}, {weight.device})")
    if weight_mask is not None:  # checked here: every path takes it alike
        if not isinstance(weight_mask, torch.Tensor):
            raise TypeError(f"weight_mask must be a torch.Tensor or None; got {type(weight_mask).__name__}")
        check_strided(weight_mask, "weight_mask")
        if weight_mask.shape != weight.shape:
            raise ValueError(f"weight_mask must have the weight's shape {tuple(weight.shape)}; "
                             f"got {tuple(weight_mask.shape)}")
        if weight_mask.dtype != weight.dtype or weight_mask.device != weight.device:
            raise TypeError(f"weight_mask ({weight_mask.dtype}, {weight_mask.device}) must match the weight "
                            f"({weight.dtype}, {weight.device})")
        # Only which entries it zeroes counts: ``weight`` is already the product, so the entries it keeps get
        # the dense gradient (every path multiplies the gradient by the mask: one of 0.5 scaled them by 0.5).
        # Only a gradient reads it: an inference call (a masked module's every forward) makes no copy
        if weight.requires_grad and torch.is_grad_enabled():
            weight_mask = (weight_mask.detach() != 0).to(weight.dtype)
    region = _region(k, kernel_region)
    if add is not None:  # (its coords: below, from the map)
        if not isinstance(add, SparseTensor):
            raise TypeError(f"add must be a SparseTensor or None; got {type(add).__name__}")
        if add.device != input.device:
            raise ValueError(f"add is on {add.device} but the input on {input.device}")
        if add.num_channels != weight.shape[2]:
            raise ValueError(f"add must have the conv's {weight.shape[2]} output channels; got {add.num_channels}")
    low = _autocast_precision(input.feats, weight)
    if low is not None:
        # Under torch.autocast a float32 conv runs in autocast's precision and gives its output in it, as
        # torch's convs do: the feats, weight, bias (and mask) rounded to it, then bf16 inference on the
        # bf16 kernels, else the float32 kernels on the exactly widened values, rounded once ("bf16 on
        # float32", with autograd; fp16 too). The core ignored autocast: float32 where the torch path,
        # whose matmuls take autocast's precision themselves, gave bf16. A compiled graph's conv is given
        # the rounded values too, on every backend (the torch path's operator widens them: its sums in
        # float32, as eager's), and calls its operators with autocast off (ops.conv3d: their own autocast
        # rule, this one, cannot see a kernel region). torch.export takes no ambient autocast into a
        # program (torch's convs and Linears stay float32 in it): neither do these convs (bf16 convs fed a
        # program's float32 Linear, which refused them); run under autocast, the program's conv operators
        # take this rule then, as torch's convs take theirs (ops._autocast_conv).
        # (feats given in that precision, an autocast layer's output, are taken as given: not widened
        # above and rounded back)
        input = given if given.feats.dtype == low else input.with_feats(input.feats.to(low))
        weight, bias = weight.to(low), None if bias is None else bias.to(low)
        weight_mask = None if weight_mask is None else weight_mask.to(low)
    if torch.compiler.is_compiling():  # a graph of torch.compile / torch.export: the core as operators
        if weight_mask is not None and weight.requires_grad and torch.is_grad_enabled():
            # the same values; the gradient reaches only the entries the mask keeps (eager's)
            weight = torch.where(weight_mask.detach() != 0, weight, weight.detach())
        if region is not None:
            weight = weight * region.to(weight.device, weight.dtype).view(-1, 1, 1)
        # eager bf16 inference runs a region in the float32 kernels ("bf16 on float32", below): so does the
        # graph, where eager does (its own test: not where the core serves no call, backend "torch"); and a
        # conv in autocast's precision but bf16 inference without a region (training, fp16, backend "torch")
        bf16 = _engine.bf16_inference(input.feats, weight, bias)
        widen = (bf16 and region is not None) or (
            not bf16 and (low is not None or _engine.sixteen_bit_on_float32(input.feats, weight, bias)))
        return _ops.conv3d(input, weight, bias, k, t, d, transposed, add, relu, widen=widen)
    kmap = _kmap._get_kmap(input, k, t, d, transposed)
    residual = None
    if add is not None:
        out_stride = kmap.key.out_stride
        if add.stride != out_stride or len(add) != kmap.num_out or (
                add.coords is not kmap.out_coords and not torch.equal(add.coords, kmap.out_coords)):
            raise ValueError(f"add must be on the conv's output coords ({kmap.num_out} sites at stride "
                             f"{out_stride}, in their order); got {len(add)} sites at stride {add.stride}")
        residual = add.feats
    path = _eager_path(input.feats, weight, bias, region, low)
    # The residual goes into the engine's store where it can (its dtype and
    # device); elsewhere it is added after, as functional.add adds.
    fuse = residual is not None and path in ("engine", "bf16", "bf16 on float32") \
        and residual.dtype == input.feats.dtype \
        and residual.device == input.feats.device
    relu_inside = relu and path != "torch" and (residual is None or fuse)
    if path == "bf16":  # bf16 inference on AVX512-BF16
        feats = _engine.conv_bf16(input.feats, weight, bias, kmap, cache=input.cache, relu=relu_inside,
                                  add=residual if fuse else None)
    elif path == "bf16 on float32":  # the same sums in the float32 kernels
        feats = _engine.conv_bf16_on_float32(input.feats, weight, bias, kmap, cache=input.cache, relu=relu_inside,
                                             region=region, mask=weight_mask, add=residual if fuse else None)
    elif path == "engine":
        feats = _engine.conv(input.feats, weight, bias, kmap, cache=input.cache, relu=relu_inside, region=region,
                             mask=weight_mask, add=residual if fuse else None)
    else:  # other devices and dtypes: the same pairs in torch ops
        if weight_mask is not None and weight.requires_grad and torch.is_grad_enabled():
            # the engine's weight gradient: the dense one times the mask (an undefined gradient, None, which
            # autograd hands a hook where no output gradient reached it, passed on as it is)
            mask = weight_mask.detach()
            weight = weight.view_as(weight)
            weight.register_hook(lambda grad: None if grad is None else grad * mask)
        if region is not None:
            weight = weight * region.to(weight.device, weight.dtype).view(-1, 1, 1)
        # A 16-bit conv keeps its dtype under autocast (autocast takes float32 convs only, as above), so its
        # matmuls run with autocast off: a bf16 conv's products under fp16 autocast had their operands
        # rounded to fp16 (past 65504: inf), an fp16 one's under bf16 to bf16, while its output said its dtype.
        own = weight.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(weight.device.type)
        with torch.autocast(weight.device.type, enabled=False) if own else contextlib.nullcontext():
            feats = _reference.conv_torch(input.feats, weight, kmap)
        if not kmap.num_pairs:  # no product ran: linked to feats and weight by an empty one (zero gradients)
            feats = feats + (input.feats[:0] @ weight[0]).sum(0).to(feats.dtype)
        if bias is not None:
            feats = feats + bias.to(feats.dtype)  # (under autocast feats are in its precision)
    if residual is not None and not fuse:
        feats = feats + residual
    if relu and not relu_inside:
        feats = torch.relu(feats)
    return SparseTensor(feats, kmap.out_coords, kmap.key.out_stride, cache=input.cache, validate=False)


def _top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` highest of the finite 1-D ``scores`` (ties: the
    earlier rows), by selection (``np.partition`` on the CPU, ``kthvalue``
    elsewhere) instead of a sort."""
    m = scores.numel()
    if n >= m:
        return torch.ones(m, dtype=torch.bool, device=scores.device)
    if n <= 0:
        return torch.zeros(m, dtype=torch.bool, device=scores.device)
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        v = float(np.partition(_ext.to_numpy(scores), m - n)[m - n])  # the n-th highest (numpy's introselect)
    else:
        v = torch.kthvalue(scores, m - n + 1).values
    above = scores > v
    short = n - int(above.sum())
    tied = scores == v
    if int(tied.sum()) == short:
        return above | tied
    # Of the rows scoring v, the earliest `short` are kept.
    return above | (tied & (torch.cumsum(tied, 0) <= short))


def keep_ratio_of(value) -> float:
    """``keep_ratio`` as a Python float (ints, floats, numpy and 0-d tensor
    numbers): a number in (0, 1], else a ValueError; not a number (a bool, a
    string, None, a tensor of other than one element), a TypeError, as for
    ``threshold`` (it was a ValueError, a review found the two unalike)."""
    try:
        ratio = as_float(value, "keep_ratio")
    except TypeError:
        raise TypeError(f"keep_ratio must be a number in (0, 1]; got {value!r}") from None
    if not 0 < ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1]; got {value!r}")
    return ratio


def keep_per_batch(scores: torch.Tensor, batch: torch.Tensor, keep_ratio: float | None = None,
                   threshold: float | None = None) -> torch.Tensor:
    """Sorted int64 rows to keep: per batch item the ``ceil(keep_ratio * n)``
    highest ``scores`` (ties: the earlier row; NaN above every number), or
    every row whose score is ``>= threshold``."""
    if not isinstance(scores, torch.Tensor) or not isinstance(batch, torch.Tensor) or scores.dim() != 1 or \
            batch.shape != scores.shape:
        raise ValueError("scores and batch must be 1-D tensors of the same length; got "
                         f"{getattr(scores, 'shape', scores)!r} and {getattr(batch, 'shape', batch)!r}")
    if scores.dtype == torch.bool or scores.is_complex():  # (torch's kthvalue: 'not implemented for Bool')
        raise TypeError(f"scores must be a real-valued (float or int) tensor; got {scores.dtype}")
    if batch.dtype == torch.bool or batch.is_floating_point() or batch.is_complex():
        raise TypeError(f"batch must be an integer tensor of batch ids; got {batch.dtype}")
    if torch.compiler.is_compiling():  # a graph: the selection as one operator (its count depends on the
        # data), which checks keep_ratio and threshold as below when the graph runs
        return _ops.keep_rows(scores, batch, None if threshold is not None else keep_ratio, threshold)
    if threshold is not None:
        value = as_float(threshold, "threshold")  # a TypeError naming it for a str or a bool (True was 1)
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number; got {threshold!r}")
        # Compared exactly, without a float64 copy of the scores: the threshold rounded up to their dtype
        # (rounded to nearest, 0.2995 became bf16's 0.2988 and kept a score below it).
        bound = torch.tensor(value, dtype=torch.float64)
        if scores.is_floating_point() and scores.dtype != torch.float64:
            cast = bound.to(scores.dtype)
            bound = torch.where(cast.double() < bound, torch.nextafter(cast, cast.new_tensor(math.inf)), cast)
        return (scores >= bound.to(scores.device)).nonzero().flatten()
    keep_ratio = keep_ratio_of(keep_ratio)
    if scores.numel() == 0:
        return batch.new_zeros(0, dtype=torch.int64)
    # (0.3 * 10 is 3, not 4); at least 1 of a non-empty item, however small the ratio
    count = lambda k: max(1, math.ceil(round(keep_ratio * k, 9)))  # noqa: E731
    finite = bool(torch.isfinite(scores).all())
    first = batch[0]
    if finite and bool((batch == first).all()):  # one batch item: a selection, no sort
        return _top_mask(scores, count(scores.numel())).nonzero().flatten()
    # Each item's rows (increasing) found once for all, not by comparing every row with each item's id (B items
    # of N rows read B * N): a slice where the ids are sorted (a tensor's key-ordered coords), else a slice of
    # the rows in a stable sort by id.
    ordered = bool((batch[1:] >= batch[:-1]).all())
    order = None if ordered else torch.sort(batch, stable=True).indices
    sizes = torch.unique_consecutive(batch if ordered else batch[order], return_counts=True)[1].tolist()
    kept, start = [], 0
    for size in sizes:
        if ordered:
            rows = torch.arange(start, start + size, device=batch.device)
            item = scores[start:start + size]
        else:
            rows = order[start:start + size]
            item = scores[rows]
        start += size
        n = count(size)
        if finite:
            kept.append(rows[_top_mask(item, n)])
        else:  # torch's sort orders NaN above inf; a stable sort keeps ties in row order
            kept.append(rows[torch.sort(item, descending=True, stable=True).indices[:n]])
    kept = torch.cat(kept)
    # (sorted ids and masks of the rows: items in id order, each one's rows increasing; a sort otherwise)
    return kept if ordered and finite else torch.sort(kept).values


def select_voxels(input: SparseTensor, rows: torch.Tensor, feats: torch.Tensor | None = None) -> SparseTensor:
    """The sites ``rows`` of ``input`` (sorted int64), as a SparseTensor at the
    same stride with a coordinate cache of its own: its coords at this
    stride are the kept ones (later convs build their maps on them, coarser
    strides come from them), while the coords of every finer stride (and the
    maps among finer strides only) are the input cache's, so transposed
    convs upsample back to the coords the skip connections hold; the input
    cache's downsampling maps onto these sites are restricted to the kept
    ones when a conv asks for them (``KernelMap.restricted``). The cache
    records the selection (``CoordinateCache.kept``: these rows of the
    input's voxels, or of the voxels the input itself was selected from),
    so that ``devoxelize(mode="nearest")`` maps voxelize's inverse through
    the kept rows."""
    if not isinstance(input, SparseTensor):
        raise TypeError(f"input must be a SparseTensor; got {type(input).__name__}")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"rows must be a 1-D int64 (or int32) tensor of row indices; got "
                        f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
    if torch.compiler.is_compiling():  # a graph: the graph's own cache, the rows checked when it runs (no host reads)
        if feats is not None and (not isinstance(feats, torch.Tensor) or feats.dim() != 2):
            raise ValueError(f"feats must be (rows, C), a row for each kept site; got "
                             f"{tuple(getattr(feats, 'shape', ()))}")
        if feats is not None:
            torch._check(feats.shape[0] == rows.shape[0],
                         lambda: "feats must be (rows, C), a row for each kept site; got another row count")
        valid = ((rows >= 0) & (rows < input.coords.shape[0])).all() & (rows[1:] > rows[:-1]).all()
        torch._assert_async(valid, "rows must be increasing row indices in [0, len(input)) (each site once)")
        return _ops.select_voxels(input, rows, feats)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(input) or bool((rows[1:] <= rows[:-1]).any())):
        raise ValueError(f"rows must be increasing row indices in [0, {len(input)}) (each site once)")
    if feats is not None and (not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != len(rows)):
        raise ValueError(f"feats must be ({len(rows)}, C), a row for each kept site; got "
                         f"{tuple(getattr(feats, 'shape', ()))}")
    from ..tensor import CoordinateCache, Restriction, _check_feats

    if feats is not None:  # (the tensor below is made unchecked: feats it cannot hold, int or meta, went in)
        _check_feats(feats)
        if feats.device != input.device:
            raise ValueError(f"feats are on {feats.device} but the input on {input.device}")

    # the input's coords checked unchanged in place since its cache took them (its maps are restricted below),
    # the cache's own where they are an equal copy given with cache=
    source = input.cache.coords_for(input.stride, input.coords)
    cache = CoordinateCache()
    input.cache.copy_finer(input.stride, cache)
    rows = rows.to(input.coords.device, torch.int64)
    coords = source.index_select(0, rows)
    cache.set_coords(input.stride, coords)
    cache.note_kept(input.stride, rows, input.coords.shape[0], input.cache)
    cache.origin = input.cache.input_coords()  # (the batch items, should the kept rows drop one)
    # The input cache's downsampling maps onto these sites restricted to the kept ones when a conv asks for
    # them (the transposed conv back up): the maps a search onto the kept coords makes, without the search
    # (bench/RESULTS.md stop 51). Where the input is a selection too, the maps its cache has still to restrict
    # are restricted from their source through both selections' rows (a restriction of a restriction).
    for key, kmap, before in input.cache.maps_onto(input.stride, source):
        kept = rows if before is None else before.index_select(0, rows.to(before.device))
        cache.derived[key] = Restriction(kmap, kept, coords, _restricted_trusted)
    feats = input.feats.index_select(0, rows.to(input.device)) if feats is None else feats
    return SparseTensor(feats, coords, input.stride, cache=cache, validate=False)


def _same_sites(tensors, what: str) -> SparseTensor:
    if not tensors:
        raise ValueError(f"{what} needs at least one SparseTensor")
    first = tensors[0]
    compiling = torch.compiler.is_compiling()  # a graph: the counts and rows checked when it runs
    for i, t in enumerate(tensors):
        if not isinstance(t, SparseTensor):
            raise TypeError(f"{what} takes SparseTensors; item {i} is {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(f"{what}: item {i} is on {t.device} but item 0 on {first.device}")
        if t.stride != first.stride or not compiling and t.coords.shape[0] != first.coords.shape[0]:
            message = (f"{what}: item {i} (stride {t.stride}, {t.coords.shape[0]} sites) is not on the coords "
                       f"of item 0 (stride {first.stride}, {first.coords.shape[0]} sites)")
            # (the hint joined outside a graph only: dynamo cannot join a formatted string to another)
            raise ValueError(message if compiling else message + (
                _selection_hint(t, first, i) or (_union_hint(what) if t.stride == first.stride else "")))
        other = f"{what}: item {i} has other coords (or another row order) than item 0"
        if compiling:
            _ops.check_same_coords(t.coords, first.coords, other)
        elif t.coords is not first.coords and not torch.equal(t.coords, first.coords):
            raise ValueError(other + (_selection_hint(t, first, i) or _union_hint(what)))
    return first


def _union_hint(what: str) -> str:
    """For add: where the sum of tensors on other sites is meant."""
    return ("; nn.union([a, b]) sums tensors whose sites differ (MinkowskiEngine's MinkowskiUnion)"
            if what == "add" else "")


def _selection_hint(t: SparseTensor, first: SparseTensor, i: int) -> str:
    """Why item ``i`` and item 0 may lie on other sites: where one of them
    holds the voxels a VoxelPrune kept (its cache records a selection) and
    the other does not (another cache), that; else nothing."""
    if t.cache is first.cache:
        return ""
    pruned = [j for j, x in ((i, t), (0, first)) if getattr(x.cache, "kept", None)]
    if len(pruned) != 1:
        return ""
    return (f": item {pruned[0]}'s sites are a VoxelPrune's selection (or come from one) and the other item's are "
            "not, so they are not the same sites; join tensors that both come after the VoxelPrune (in a U-Net, "
            "prune after a stage's skip connection is taken, not on a strided conv's input; in a residual block, "
            "prune the block's input, not inside its branch, or use VoxelSkip)")


def cat(tensors, *more) -> SparseTensor:
    """Concatenate the channels of tensors on the same coords (U-Net skips),
    in the widest of their feats' dtypes (torch's type promotion). Under
    ``torch.autocast`` too, as torch's cat promotes there, where it refuses a
    16-bit dtype that is not autocast's ("Unexpected floating ScalarType in
    at::autocast::prioritize": a bf16 model's skips under fp16 autocast):
    autocast is off for the cat itself, the feats converted first."""
    if more:  # (MinkowskiEngine's ME.cat(a, b) form)
        raise TypeError(f"cat takes one list of SparseTensors (as torch.cat); got {1 + len(more)} arguments "
                        "(give cat([a, b, ...]))")
    if isinstance(tensors, SparseTensor):
        raise TypeError("cat takes a list of SparseTensors; got one SparseTensor (give [a, b, ...])")
    try:
        items = iter(tensors)
    except TypeError:  # (Python's own: "'int' object is not iterable")
        raise TypeError(f"cat takes a list of SparseTensors; got {type(tensors).__name__}") from None
    tensors = list(items)  # (a TypeError raised while iterating is the iterable's own)
    first = _same_sites(tensors, "cat")
    feats = [t.feats for t in tensors]
    device = first.feats.device.type
    if not torch.is_autocast_enabled(device):
        return first.with_feats(torch.cat(feats, 1))
    dtype = functools.reduce(torch.promote_types, (f.dtype for f in feats))
    with torch.autocast(device, enabled=False):
        return first.with_feats(torch.cat([f.to(dtype) for f in feats], 1))


def add(a: SparseTensor, b: SparseTensor) -> SparseTensor:
    """Sum of two tensors on the same coords (residual connections)."""
    first = _same_sites([a, b], "add")
    if a.feats.shape[1:] != b.feats.shape[1:]:
        raise ValueError(f"add: the feats have {tuple(a.feats.shape[1:])} and {tuple(b.feats.shape[1:])} channels; "
                         "a sum needs the same")
    return first.with_feats(a.feats + b.feats)


def union(tensors, *more) -> SparseTensor:
    """Sum of tensors at one stride on sites that may differ (MinkowskiEngine's
    ``MinkowskiUnion``): the output holds every site any item holds, item 0's
    rows first in their order, then each later item's sites that no earlier
    item holds, in its order; a row's feats are the sum, in item order, of
    the items holding its site (an item without the site adds nothing).
    Items need the same stride, device and channels; the feats' dtype is
    their widest (torch's type promotion). Where no later item adds a site,
    the output is on item 0's coords and coordinate cache (its kernel maps
    reused, as :func:`add`'s); otherwise on new coords with a new cache,
    whose kernel maps are built when a layer asks (a transposed conv from it
    has no finer coords to return to: a ValueError says so). Differentiable
    in every item's feats. Eager only: the output's row count depends on the
    coords' values (a graph break under ``torch.compile``, whose
    ``fullgraph=True`` and ``torch.export`` refuse it)."""
    if torch.compiler.is_exporting():  # (non-strict export traced into the core's calls: a bare .numpy() error)
        raise ValueError("nn.union cannot be exported: its output's row count depends on the coords' values; "
                         "export the model's parts before and after it")
    if torch.compiler.is_compiling():
        return _union_outside_graphs()(tensors, *more)
    return _union(tensors, *more)


#: ``torch.compiler.disable`` of :func:`_union`, made at the first union
#: traced by dynamo, not at import: making it imports torch's compiler (0.9 s
#: of CPU), which a command that never compiles should not pay.
_union_disabled = None


def _union_outside_graphs():
    global _union_disabled
    if _union_disabled is None:
        _union_disabled = torch.compiler.disable(
            _union, reason="nn.union: its output's row count depends on the coords' values; it runs eagerly")
    return _union_disabled


def _union(tensors, *more) -> SparseTensor:
    if more:
        raise TypeError(f"union takes one list of SparseTensors (as cat); got {1 + len(more)} arguments "
                        "(give union([a, b, ...]))")
    items = items_of(tensors, SparseTensor, "union", "a, b, ...")
    first = items[0]
    for i, t in enumerate(items):
        if t.device != first.device:
            raise ValueError(f"union: item {i} is on {t.device} but item 0 on {first.device}")
        if t.stride != first.stride:
            raise ValueError(f"union: item {i} has stride {t.stride} but item 0 {first.stride}; a union joins "
                             "sites of one stride")
        if t.feats.shape[1:] != first.feats.shape[1:]:
            raise ValueError(f"union: item {i}'s feats have {tuple(t.feats.shape[1:])} channels and item 0's "
                             f"{tuple(first.feats.shape[1:])}; a sum needs the same")
    dtype = functools.reduce(torch.promote_types, (t.feats.dtype for t in items))
    if len(items) == 1 or all(t.coords is first.coords for t in items):
        feats = first.feats.to(dtype)
        for t in items[1:]:
            feats = feats + t.feats.to(dtype)
        return first.with_feats(feats)
    coords = torch.cat([t.coords for t in items])
    layout = _coords.KeyLayout.of(*(t.coords for t in items))
    keys = _coords.pack_torch(coords, layout, trusted=True)
    # Each site's first row in item order: a stable sort puts it first among its equals.
    sorted_keys, order = torch.sort(keys, stable=True)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group = torch.cumsum(starts, 0) - 1
    first_rows = order[starts]  # one per site, sorted by key
    rows, rank = torch.sort(first_rows)  # the output's rows: the sites' first rows in item order
    out_of_group = torch.empty_like(rank)
    out_of_group[rank] = torch.arange(len(rank), device=rank.device)
    inverse = torch.empty_like(order)
    inverse[order] = out_of_group[group]
    feats = torch.cat([t.feats.to(dtype) for t in items])
    if len(rows) == len(first):  # (item 0 holds every site: its rows are the output's first, in order)
        return first.with_feats(first.feats.to(dtype).index_add(0, inverse[len(first):], feats[len(first):]))
    summed = feats.new_zeros((len(rows), *feats.shape[1:])).index_add(0, inverse, feats)
    return SparseTensor(summed, coords.index_select(0, rows), first.stride, validate=False)


def _restricted_trusted(kmap, rows: torch.Tensor, coords: torch.Tensor):
    """``kmap.restricted(rows, coords)`` of a selection, whose ``coords`` are
    the map's own of those rows by construction (their check skipped)."""
    return kmap.restricted(rows, coords, trusted=True)


def _pool_args(input: SparseTensor, kernel_size, stride, dilation, what: str):
    """A pooling's checked input and its kernel size, stride (the kernel
    size by default) and dilation as 3-tuples."""
    if not isinstance(input, SparseTensor):
        raise TypeError(f"{what}: input must be a SparseTensor; got {type(input).__name__}")
    k = as_triple(kernel_size, "kernel_size")
    t = k if stride is None else as_triple(stride, "stride")
    return k, t, as_triple(dilation, "dilation")


def _pool_map(input: SparseTensor, kernel_size, stride, dilation, what: str):
    kmap = _kmap._get_kmap(input, *_pool_args(input, kernel_size, stride, dilation, what), False)
    return kmap, kmap.key.out_stride


def _graph_pool(input: SparseTensor, kernel_size, stride, dilation, what: str, reduce: str) -> SparseTensor:
    """:func:`max_pool3d` / :func:`avg_pool3d` in a traced graph: the map from
    the graph's cache (the strided conv's), the same reductions as eager mode
    (no host read of the pair count)."""
    k, t, d = _pool_args(input, kernel_size, stride, dilation, what)
    cache = _ops.graph_cache(input)
    kmap = _ops.get_kmap(input, k, t, d, cache=cache)
    feats, rows = input.feats, kmap.out_coords.shape[0]
    gathered = feats.index_select(0, kmap.in_idx)
    if reduce == "amax":
        index = kmap.out_idx.unsqueeze(1).expand(-1, feats.shape[1])
        out = _copy_where_grad(
            feats.new_zeros((rows, feats.shape[1])).scatter_reduce(0, index, gathered, "amax", include_self=False))
    else:
        count = kmap.out_idx.new_zeros(rows).index_add_(0, kmap.out_idx, torch.ones_like(kmap.out_idx))
        out = _mean_of_rows(gathered, kmap.out_idx, count)
    return SparseTensor(out, kmap.out_coords, kmap.key.out_stride, cache=cache, validate=False)


def _mean_of_rows(rows: torch.Tensor, index: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(len(counts), C)``: the sum of ``rows`` by ``index`` over ``counts``
    (0 where a count is 0). fp16 / bf16 rows are summed and divided in
    float32 and the mean rounded once, as ``torch.mean`` gives it: a count
    in fp16 is inf past 65504 (the mean was 0), in bf16 rounded past 256."""
    low = rows.dtype in (torch.float16, torch.bfloat16)
    wide = rows.float() if low else rows
    total = wide.new_zeros((counts.shape[0], rows.shape[1])).index_add(0, index, wide)
    mean = total / counts.clamp_min(1).to(wide.dtype).unsqueeze(1)
    return mean.to(rows.dtype) if low else mean


def max_pool3d(input: SparseTensor, kernel_size=2, stride=None, dilation=1) -> SparseTensor:
    """Sparse max pooling: ``out[q] = max over offsets o of in[q + o]`` over the
    active inputs of the window; output coords as the strided conv's (``stride``
    defaults to ``kernel_size``; stride 1 keeps the coords). The window is the
    strided conv's kernel offsets, centred for an odd kernel, not the output's
    cell: an even ``kernel_size`` equal to the stride (2) covers each cell
    exactly, but ``kernel_size=3, stride=3`` takes q - 1 .. q + 1 for the cell
    q .. q + 2, so an input at q + 2 falls outside every window (as in
    MinkowskiEngine's and TorchSparse's pooling; torch's dense pooling takes
    the cell). A window with no active input gives 0."""
    if torch.compiler.is_compiling():
        return _graph_pool(input, kernel_size, stride, dilation, "max_pool3d", "amax")
    kmap, out_stride = _pool_map(input, kernel_size, stride, dilation, "max_pool3d")
    feats = input.feats
    in_idx, out_idx = kmap.indices()  # (a map cached under inference_mode: copies autograd can save)
    out = feats.new_zeros((kmap.num_out, feats.shape[1]))
    if kmap.num_pairs:
        index = out_idx.to(feats.device).unsqueeze(1).expand(-1, feats.shape[1])
        # index_select, not feats[in_idx]: its backward sums an input's gradients (it is in several
        # windows where they overlap) in a fixed order on the CPU; advanced indexing's used float atomics
        gathered = feats.index_select(0, in_idx.to(feats.device))
        out = _copy_where_grad(out.scatter_reduce(0, index, gathered, "amax", include_self=False))
    else:  # linked to feats all the same (a zero gradient), as the other ops' outputs are
        out = out + feats[:0].sum(0)
    return SparseTensor(out, kmap.out_coords, out_stride, cache=input.cache, validate=False)


def _copy_where_grad(out: torch.Tensor) -> torch.Tensor:
    """A max's output (``scatter_reduce`` "amax", whose backward reads the
    result it returned) as a copy where a gradient will flow: an in-place op
    on it (``ReLU(inplace=True)``, ``y.feats += b``) failed in backward with
    "modified by an inplace operation", where torch's max_pool3d takes it."""
    return out.clone() if out.requires_grad else out


def avg_pool3d(input: SparseTensor, kernel_size=2, stride=None, dilation=1) -> SparseTensor:
    """Sparse average pooling: the mean of the active inputs of each window
    (inactive sites are not counted; 0 for a window with none); output coords
    and windows as :func:`max_pool3d`'s (an odd kernel's window is centred, not
    the output's cell)."""
    if torch.compiler.is_compiling():
        return _graph_pool(input, kernel_size, stride, dilation, "avg_pool3d", "mean")
    kmap, out_stride = _pool_map(input, kernel_size, stride, dilation, "avg_pool3d")
    feats = input.feats
    in_idx, out_idx = kmap.indices()  # (a map cached under inference_mode: copies autograd can save)
    out_idx = out_idx.to(feats.device)
    gathered = feats.index_select(0, in_idx.to(feats.device))  # (a fixed-order backward: max_pool3d's comment)
    out = _mean_of_rows(gathered, out_idx, torch.bincount(out_idx, minlength=kmap.num_out))
    return SparseTensor(out, kmap.out_coords, out_stride, cache=input.cache, validate=False)


#: Largest dense ``(B, C)`` output (with its per-item counts) the global
#: poolings allocate (bytes), B the largest batch index of the network's input + 1; larger is a ValueError.
MAX_GLOBAL_POOL_BYTES = 1 << 32


def check_global_pool_size(b: int, channels: int, element_size: int, what: str, held: str = "the output") -> None:
    """ValueError where a global pooling's ``(b, channels)`` output and its
    per-item counts would pass :data:`MAX_GLOBAL_POOL_BYTES`; ``held``
    names that ``(b, channels)`` tensor in the message (an instance norm's
    are its per-item statistics: its output is a row a site)."""
    nbytes = b * (channels * element_size + 8)
    if nbytes > MAX_GLOBAL_POOL_BYTES:
        raise ValueError(f"{what}: {held} ({b}, {channels}) for batch indices up to {b - 1} needs "
                         f"{nbytes / 2**30:.1f} GiB, over the {MAX_GLOBAL_POOL_BYTES / 2**30:.0f} GiB limit "
                         "(number the batch items from 0)")


def _items_of(cache, coords: torch.Tensor) -> torch.Tensor:
    """``coords``, or where ``cache`` is a selection's the coords it was made
    from: a cache without a selection holds the same items at every stride,
    so ``coords`` count them (no second reduction over the finest coords)."""
    origin = getattr(cache, "origin", None)
    return coords if origin is None else origin


def _per_batch(input: SparseTensor, what: str, held: str = "the output"):
    """``(batch index of each row, sites of each batch item (B,))``, B the
    batch items of the network's input (a selection's cache: the coords it
    was made from, ``CoordinateCache.origin``), not of this tensor alone
    (where a selection had dropped every voxel of the last item, its row
    went too and the rows stopped lining up with the input's items; an item
    with no sites now counts 0). In a graph B comes from the
    ``batch_counts`` operator, whose length is a size the graph reads from
    the data; a graph reads only caches it made itself (an input's eager
    cache would be a constant of the graph): its input's coords number the
    items. ``held``: what the size check's message calls the ``(B, C)``
    tensor the caller makes (:func:`check_global_pool_size`)."""
    if not isinstance(input, SparseTensor):
        raise TypeError(f"{what}: input must be a SparseTensor; got {type(input).__name__}")
    batch = input.coords[:, 0].long().to(input.device)
    if torch.compiler.is_compiling():
        from .. import ops

        items = _items_of(input.cache if isinstance(input.cache, ops.GraphCache) else None, input.coords)
        counts = ops.batch_counts(items, input.feats.shape[1], input.feats.element_size()).to(input.device)
        if items is not input.coords:  # (the items' count; the sites are this tensor's)
            counts = torch.zeros_like(counts).index_add(0, batch, torch.ones_like(batch))
        return batch, counts
    b = input.batch_size  # (a selection's: the items of the input it was made from)
    check_global_pool_size(b, input.num_channels, input.feats.element_size(), what, held)
    return batch, torch.bincount(batch, minlength=b)


def global_avg_pool(input: SparseTensor) -> torch.Tensor:
    """Dense ``(B, C)``: the mean feats of each batch item (0 for an item with
    no sites, where ``torch.mean`` of nothing is NaN). ``B``: the batch items
    of the network's input, the largest batch index of the coords its
    coordinate cache began from + 1, so that a ``VoxelPrune`` (or
    ``select_voxels``) that drops every voxel of an item, the last one too,
    leaves that item its row (of 0) and the rows line up with the input's
    items. Runs in torch.compile / torch.export graphs too (``B`` read from
    the data there: ``pointsparse::batch_counts``; the items of the graph's
    input)."""
    batch, counts = _per_batch(input, "global_avg_pool")
    return _mean_of_rows(input.feats, batch, counts)


def _autocast_casts(feats: torch.dtype, param: torch.dtype, device: str) -> bool:
    """Whether feats and a parameter of these other dtypes may meet in an op
    that casts the parameter (instance_norm; nn.InstanceNorm and nn.Linear
    take the same rule): under torch.autocast enabled on ``device``, and
    neither of them float64 (autocast leaves float64 alone)."""
    return torch.is_autocast_enabled(device) and torch.float64 not in (feats, param)


def _check_eps(eps) -> float:
    """``eps`` as a float (:func:`as_float`: a TypeError for a str or a bool),
    a ValueError unless it is positive and finite (instance_norm's and
    InstanceNorm's)."""
    value = as_float(eps, "eps")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be a positive finite number; got {eps!r}")
    return value


def instance_norm(input: SparseTensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  eps: float = 1e-5) -> SparseTensor:
    """Each batch item's feats normalised by that item's own mean and biased
    variance per channel (``torch.nn.functional.instance_norm`` of the item's
    sites taken as its spatial positions; MinkowskiEngine's
    ``MinkowskiInstanceNorm``), then ``* weight + bias`` where given
    (``(C,)``, of the feats' dtype: a TypeError otherwise, as
    ``nn.InstanceNorm`` refuses, but for the mix :func:`_autocast_casts`
    takes under torch.autocast). An item of one site normalises to 0 (its
    variance 0, where torch's instance norm refuses one position). fp16 /
    bf16 feats are normalised in float32 and rounded once. Differentiable
    (torch's operators)."""
    eps = _check_eps(eps)
    batch, counts = _per_batch(input, "instance_norm", "its per-item statistics")
    feats = input.feats
    channels = feats.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.shape != (channels,)):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"instance_norm: {name} must be None or a ({channels},) tensor (the feats' channels); "
                             f"got {got}")
        if t is not None and not t.is_floating_point():  # (an int64 or bool one was cast to float unsaid)
            raise TypeError(f"instance_norm: {name} must be a floating-point tensor; got {t.dtype}")
        if t is not None and t.dtype != feats.dtype and not _autocast_casts(feats.dtype, t.dtype, feats.device.type):
            raise TypeError(f"instance_norm: {name} is {t.dtype} but the input's feats are {feats.dtype} (convert one "
                            "of them), as nn.InstanceNorm refuses")
    low = feats.dtype in (torch.float16, torch.bfloat16)
    x = feats.float() if low else feats
    mean = _mean_of_rows(x, batch, counts)
    centred = x - mean.index_select(0, batch)
    var = _mean_of_rows(centred * centred, batch, counts)
    out = centred * torch.rsqrt(var + eps).index_select(0, batch)
    if weight is not None:
        out = out * weight.to(out.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return input.with_feats(out.to(feats.dtype) if low else out)


def global_max_pool(input: SparseTensor) -> torch.Tensor:
    """Dense ``(B, C)``: the channel-wise max of each batch item (0 for an item
    with no sites, where ``torch.amax`` of nothing is an error), ``B`` the
    batch items of the network's input as :func:`global_avg_pool`'s. Runs in
    graphs as :func:`global_avg_pool`."""
    batch, counts = _per_batch(input, "global_max_pool")
    feats = input.feats
    out = feats.new_zeros((counts.shape[0], feats.shape[1]))
    if torch.compiler.is_compiling() or len(input):
        out = out.scatter_reduce(0, batch.unsqueeze(1).expand(-1, feats.shape[1]), feats, "amax", include_self=False)
    else:  # linked to feats all the same (a zero gradient), as the other ops' outputs are
        out = out + feats[:0].sum(0)
    return _copy_where_grad(out)
