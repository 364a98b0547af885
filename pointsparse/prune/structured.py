"""Group-structured pruning: the tensor is split into groups (vectors,
kernels, kernel offsets, channels, blocks, stripes) and whole groups are
pruned, the weakest first by the Ln norm of their importance scores.

Every method here is a ``torch.nn.utils.prune.BasePruningMethod`` subclass, so
torch's ``apply`` does the reparametrisation (``name_orig``, ``name_mask``,
forward pre-hook), the composition through ``PruningContainer`` and the
rollback. The methods declare ``PRUNING_TYPE = "global"`` so that a container
hands them the whole tensor with the current mask; they then prune only among
the groups that are still alive (a group with any unmasked entry) and never
bring a pruned entry back:

* ``amount`` as a float is the fraction of the *alive* groups to prune
  (rounded), as an int the number of alive groups to prune;
* a group's score is ``||importance_scores * (mask != 0)||_n`` over its entries
  (already pruned entries count as zero);
* ties are broken by ``torch.topk``;
* every method counts a ``kernel_region`` conv's weights only: the
  offsets outside its region are neither scored, counted nor pruned.

Axis roles come from :mod:`pointsparse.prune.adapters`: the functional forms
read them from the module (``Linear``, ``ConvNd``, ``pointsparse.nn.Conv3d``);
the classes take a ``layout`` (default: a dense torch layout)."""

from __future__ import annotations

import torch

from ..tensor import as_bool, as_int, positive_int
from ._copyable import CopyableMethod, _check_scores
from .amount import count_to_prune, validate_amount, validate_norm
from .adapters import (WeightLayout, check_has_values, check_layout, check_maskable, dense_layout, is_layer, layout_of,
                       no_tensor, raw, stored, used_mask)


def _axis_grids(shape: torch.Size, device) -> list[torch.Tensor]:
    """Per-axis index tensors, each broadcastable to ``shape``."""
    grids = []
    for axis, size in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = size
        grids.append(torch.arange(size, device=device).view(view))
    return grids


def group_scores(scores: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, groups: int, n):
    """``(norms, alive)``: the Ln norm of ``scores * (mask != 0)`` and whether
    any entry is unmasked, for each of ``groups`` groups given by ``ids``.

    The norm is taken as ``m * (sum_g (|s| / m)^n)^(1/n)`` with ``m`` the
    group's largest ``|s|`` (float64): every ratio lies in [0, 1] and the
    largest is 1, so the sum lies in ``[1, |g|]`` whatever ``n``, where
    ``|s|^n`` itself underflows to 0 or overflows to inf for a large ``n``
    (``n=2000``: every group of ``|s| ~ 1e-3`` scored 0, a tie; torch's
    ``vector_norm`` does not scale either). NaN scores are a ValueError
    (``topk`` would rank them above every number: never pruned)."""
    live = mask != 0
    magnitudes = scores.detach().abs().to(torch.float64)
    values = torch.where(live, magnitudes, torch.zeros_like(magnitudes)).flatten()
    refuse_nan(values)
    flat_ids = ids.flatten()
    alive = torch.zeros(groups, dtype=torch.bool, device=scores.device)
    alive.index_fill_(0, flat_ids[live.flatten()], True)
    peak = torch.zeros(groups, dtype=torch.float64, device=scores.device)
    peak = peak.scatter_reduce(0, flat_ids, values, reduce="amax", include_self=True)
    if n == float("inf"):
        return peak, alive
    usable = (peak > 0) & torch.isfinite(peak)
    scale = torch.where(usable, peak, torch.ones_like(peak))
    powered = torch.zeros(groups, dtype=torch.float64, device=scores.device)
    powered.index_add_(0, flat_ids, (values / scale[flat_ids]).pow(n))
    norms = torch.where(usable, scale * powered.pow(1.0 / n), peak)  # (a group of zeros: 0; one holding inf: inf)
    return norms, alive


def refuse_nan(values: torch.Tensor) -> None:
    """A ValueError when the scores of the unpruned entries, ``values``
    (pruned ones left out, or 0), hold NaN: ``topk`` and ``argmax`` rank
    NaN above every number, so it would be kept."""
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        raise ValueError(f"the scores to prune by hold {int(torch.isnan(values).sum())} NaN value(s) "
                         "(importance_scores, or the weights themselves when none are given); every unpruned "
                         "entry needs a number")


def select_weakest(norms: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask over groups: the ``k`` alive groups of smallest norm
    (ranked among the alive ones only: a dead group ranked as inf tied with
    an alive group of norm inf, and could be picked in its place)."""
    chosen = torch.zeros_like(alive)
    if k > 0:
        candidates = alive.nonzero().flatten()
        chosen[candidates[torch.topk(norms[candidates], k, largest=False).indices]] = True
    return chosen


def check_region(region, kernel_volume: int | None = None) -> None:
    """A method's ``region`` argument: None or a 1-D bool tensor (the kernel
    positions that are weights), of ``kernel_volume`` entries when that is
    given; a TypeError / ValueError naming it."""
    if region is None:
        return
    if not (isinstance(region, torch.Tensor) and region.dtype == torch.bool and region.dim() == 1):
        raise TypeError(f"region must be a 1-D bool tensor (the kernel positions that are weights) or None; "
                        f"got {region!r}")
    if kernel_volume is not None and region.numel() != kernel_volume:
        raise ValueError(f"region has {region.numel()} kernel positions; the kernels have {kernel_volume}")


class GroupStructured(CopyableMethod):
    """Base of the group methods: a subclass defines :meth:`group_ids` (and a
    classmethod ``apply`` with its arguments); scoring, the choice of the
    weakest alive groups and the mask are shared.

    ``region``: the kernel positions that are weights, a bool ``(K,)`` over
    the layout's kernel positions (flattened), or None (all): a
    ``kernel_region`` conv's offsets, which each method's ``apply`` reads
    from the module. The entries outside are neither scored nor pruned
    (they keep the mask they had) and a group of none but them is no group
    (the amount counts the others)."""

    PRUNING_TYPE = "global"

    def __init__(self, amount, n=2, layout: WeightLayout | None = None, region=None) -> None:
        validate_amount(amount)
        validate_norm(n)
        check_layout(layout)
        check_region(region)
        self.amount = amount
        self.n = n
        self.layout = layout
        self.region = region

    def group_ids(self, shape: torch.Size, device) -> tuple[torch.Tensor, int]:
        """``(ids, groups)``: an int64 tensor of ``shape`` giving each entry's
        group in ``[0, groups)``."""
        raise NotImplementedError

    def used_entries(self, shape: torch.Size, device) -> torch.Tensor | None:
        """A bool tensor of ``shape``: the entries that are weights, those at
        the ``region``'s kernel positions (None: all)."""
        region = getattr(self, "region", None)  # (methods pickled before it existed have none)
        if region is None:
            return None

        def inside(o, i, k, O, I, K):
            if region.numel() != K:
                raise ValueError(f"region has {region.numel()} kernel positions; the tensor of shape "
                                 f"{tuple(shape)} has {K}")
            return region.to(device)[k], 2

        return self._oik_ids(shape, device, inside)[0]

    def scored_groups(self, scores: torch.Tensor, mask: torch.Tensor):
        """``(ids, used, norms, alive)`` for a tensor of ``scores``' shape:
        :meth:`group_ids`, :meth:`used_entries` and :func:`group_scores` of
        ``scores`` under ``mask``, over the entries that are weights."""
        ids, groups = self.group_ids(scores.shape, scores.device)
        used = self.used_entries(scores.shape, scores.device)
        live = mask if used is None else mask * used.to(mask.dtype)
        return (ids, used, *group_scores(scores, live, ids, groups, self.n))

    def compute_mask(self, t, default_mask):
        ids, used, norms, alive = self.scored_groups(t, default_mask)
        k = count_to_prune(self.amount, int(alive.sum()), f"{type(self).__name__} groups")
        chosen = select_weakest(norms, alive, k)
        mask = default_mask.clone(memory_format=torch.contiguous_format) * (~chosen)[ids].to(default_mask.dtype)
        return mask if used is None else torch.where(used, mask, default_mask)

    def _oik_ids(self, shape, device, fn) -> tuple[torch.Tensor, int]:
        """Group ids built in ``(out, in, kernel)`` space by ``fn(o, i, k, O,
        I, K) -> (ids, groups)`` and mapped back to ``shape``."""
        layout = self.layout if self.layout is not None else dense_layout(len(shape))
        if len(shape) != layout.ndim:
            raise ValueError(
                f"the tensor to prune must have {layout.ndim} dims for {layout}; got {tuple(shape)}"
            )
        sizes = (shape[layout.out_axis], shape[layout.in_axis])
        kernel = 1
        for axis in layout.kernel_axes:
            kernel *= shape[axis]
        o = torch.arange(sizes[0], device=device).view(-1, 1, 1)
        i = torch.arange(sizes[1], device=device).view(1, -1, 1)
        k = torch.arange(kernel, device=device).view(1, 1, -1)
        ids, groups = fn(o, i, k, sizes[0], sizes[1], kernel)
        ids = ids.expand(sizes[0], sizes[1], kernel)
        return layout.from_oik(ids, shape), groups


class VectorStructured(GroupStructured):
    """Prunes 1-D vectors along tensor axis ``axis``: the entries that share
    every index except the one along ``axis`` form a group. ``axis=-1`` on a
    Conv2d weight prunes kernel rows (vector-level sparsity); on a Linear
    weight ``axis=1`` prunes whole rows (neurons), ``axis=0`` whole columns.

    The vectors run along tensor axes whatever the layout; ``layout`` only
    places the ``region`` (see :class:`GroupStructured`), which :meth:`apply`
    reads from a ``kernel_region`` conv: a vector's entries outside it are
    neither scored nor pruned, a vector of none but them is no vector."""

    def __init__(self, amount, axis=-1, n=2, layout=None, region=None) -> None:
        super().__init__(amount, n, layout, region)
        self.axis = as_int(axis, "axis")

    def group_ids(self, shape, device):
        ndim = len(shape)
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"axis={self.axis} is out of range for a tensor of shape {tuple(shape)}")
        axis = self.axis % ndim
        ids = torch.zeros((), dtype=torch.int64, device=device)
        groups = 1
        for a, grid in enumerate(_axis_grids(shape, device)):
            if a != axis:
                ids = ids * shape[a] + grid
                groups *= shape[a]
        return ids.expand(shape), groups

    @classmethod
    def apply(cls, module, name, amount, axis=-1, n=2, importance_scores=None, layout=None):  # type: ignore[override]
        stored(module, name)  # (before is_layer reads the module; torch's AttributeError, or ones_like's TypeError
        # on a None bias)
        # (layout: the one given, as global_structured hands its kwargs on; else the layer's)
        if layout is None:
            layout = layout_of(module, name) if name == "weight" and is_layer(module) else None
        region = _used_kernel_positions(module, name, layout) if layout is not None else None
        return super().apply(module, name, amount=amount, axis=axis, n=n, region=region,
                             layout=layout if region is not None else None, importance_scores=importance_scores)


class KernelStructured(GroupStructured):
    """Kernel-level pruning.

    * ``scope="pair"``: a group is one (out, in) pair's whole kernel, all
      kernel positions: a dense conv's k x k (x k) kernel, a sparse conv's
      ``W[:, i, o]`` over all offsets.
    * ``scope="offset"``: a group is one kernel position for the whole layer,
      all (in, out) pairs: a sparse conv's whole offset ``W[k]`` (its gather
      and scatter disappear), a dense conv's ``W[:, :, ky, kx]``.

    On a Linear (no kernel axes) a "pair" group is a single weight. The
    offsets outside a ``kernel_region`` conv's region are no offset groups
    (see :class:`GroupStructured`'s ``region``)."""

    def __init__(self, amount, n=2, scope="pair", layout=None, region=None) -> None:
        super().__init__(amount, n, layout, region)
        if scope not in ("pair", "offset"):
            raise ValueError(f"scope must be 'pair' or 'offset'; got {scope!r}")
        self.scope = scope

    def group_ids(self, shape, device):
        layout = self.layout if self.layout is not None else dense_layout(len(shape))
        if self.scope == "offset" and not layout.kernel_axes:
            raise ValueError(f"offset pruning needs kernel axes; the tensor has shape {tuple(shape)}")
        if self.scope == "pair":
            return self._oik_ids(shape, device, lambda o, i, k, O, I, K: (o * I + i, O * I))
        return self._oik_ids(shape, device, lambda o, i, k, O, I, K: (k, K))

    @classmethod
    def apply(cls, module, name, amount, n=2, scope="pair", layout=None, importance_scores=None):  # type: ignore[override]
        layout = layout if layout is not None else layout_of(module, name)
        region = _used_kernel_positions(module, name, layout)
        return super().apply(module, name, amount=amount, n=n, scope=scope, layout=layout, region=region,
                             importance_scores=importance_scores)


def _used_kernel_positions(module, name: str, layout: WeightLayout) -> torch.Tensor | None:
    """The kernel positions of ``module.name`` (in ``layout``) that hold
    weights of the layer, a bool ``(K,)`` (:func:`.adapters.used_mask`: a
    ``kernel_region`` conv's offsets), or None when all do."""
    if name != "weight" or not is_layer(module) or not layout.kernel_axes:
        return None
    check_has_values(module, name)  # (before the region's host read, torch's error on meta)
    used = used_mask(module)
    if bool(used.all()):  # (a weight of no entries too: its positions hold none, and are no region's)
        return None
    positions = layout.to_oik(used).any(1).any(0)
    return None if bool(positions.all()) else positions.cpu()


class ChannelStructured(GroupStructured):
    """Prunes whole output channels (filters, ``axis="out"``) or input
    channels (``axis="in"``) wherever the layout puts them: axis 0/1 of a torch
    conv or Linear, axis 2/1 of a sparse conv ``(K, C_in, C_out)``."""

    def __init__(self, amount, n=2, axis="out", layout=None, region=None) -> None:
        super().__init__(amount, n, layout, region)
        if axis not in ("out", "in"):
            raise ValueError(f"axis must be 'out' or 'in'; got {axis!r}")
        self.axis = axis

    def group_ids(self, shape, device):
        if self.axis == "out":
            return self._oik_ids(shape, device, lambda o, i, k, O, I, K: (o, O))
        return self._oik_ids(shape, device, lambda o, i, k, O, I, K: (i, I))

    @classmethod
    def apply(cls, module, name, amount, n=2, axis="out", layout=None, importance_scores=None):  # type: ignore[override]
        layout = layout if layout is not None else layout_of(module, name)
        region = _used_kernel_positions(module, name, layout)
        return super().apply(module, name, amount=amount, n=n, axis=axis, layout=layout, region=region,
                             importance_scores=importance_scores)


def _block_size(block_size) -> tuple[int, int]:
    """An int or an (out, in) pair of ints (:func:`pointsparse.tensor.as_int`:
    numpy and 0-d tensor integers too) as a pair of Python ints >= 1."""
    try:
        bo = bi = as_int(block_size, "block_size")
    except TypeError:
        try:
            bo, bi = (as_int(b, "block_size") for b in block_size)
        except (TypeError, ValueError):
            raise TypeError(f"block_size must be an int or (out, in) pair of ints; got {block_size!r}") from None
    if bo < 1 or bi < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size!r}")
    return bo, bi


class BlockStructured(GroupStructured):
    """Block sparsity: for each kernel position the (out, in) matrix is cut
    into ``b_out x b_in`` blocks (the last row/column of blocks may be
    smaller) and whole blocks are pruned. On a sparse conv the blocks tile each
    offset's GEMM matrix ``W[k]``; on a Linear, the weight itself."""

    def __init__(self, amount, block_size=4, n=2, layout=None, region=None) -> None:
        super().__init__(amount, n, layout, region)
        self.block_size = _block_size(block_size)

    def group_ids(self, shape, device):
        bo, bi = self.block_size

        def ids(o, i, k, O, I, K):
            rows, cols = -(-O // bo), -(-I // bi)
            return ((o // bo) * cols + i // bi) * K + k, rows * cols * K

        return self._oik_ids(shape, device, ids)

    @classmethod
    def apply(cls, module, name, amount, block_size=4, n=2, layout=None, importance_scores=None):  # type: ignore[override]
        layout = layout if layout is not None else layout_of(module, name)
        region = _used_kernel_positions(module, name, layout)
        return super().apply(module, name, amount=amount, block_size=block_size, n=n, layout=layout, region=region,
                             importance_scores=importance_scores)


class StripeStructured(GroupStructured):
    """Stripe-wise pruning (SWP): a stripe is one filter's weights at one
    kernel position across all input channels, ``W[o, :, ky, kx]`` of a dense
    conv or ``W[k, :, o]`` of a sparse conv. Scoring by weight norm; for the
    learned Filter Skeleton criterion see :mod:`pointsparse.prune.stripe`."""

    def group_ids(self, shape, device):
        layout = self.layout if self.layout is not None else dense_layout(len(shape))
        if not layout.kernel_axes:
            raise ValueError(f"stripe pruning needs kernel axes; the tensor has shape {tuple(shape)}")
        return self._oik_ids(shape, device, lambda o, i, k, O, I, K: (o * K + k, O * K))

    @classmethod
    def apply(cls, module, name, amount, n=2, layout=None, importance_scores=None):  # type: ignore[override]
        layout = layout if layout is not None else layout_of(module, name)
        region = _used_kernel_positions(module, name, layout)
        return super().apply(module, name, amount=amount, n=n, layout=layout, region=region,
                             importance_scores=importance_scores)


def vector_structured(module, name, amount, axis=-1, n=2, importance_scores=None):
    """Prune ``amount`` of the alive 1-D vectors along ``axis`` of
    ``module.name`` (see :class:`VectorStructured`). Returns ``module``."""
    VectorStructured.apply(module, name, amount, axis=axis, n=n, importance_scores=importance_scores)
    return module


def kernel_structured(module, name, amount, n=2, scope="pair", layout=None, importance_scores=None):
    """Prune ``amount`` of the alive kernels (``scope="pair"``) or kernel
    offsets (``scope="offset"``) of ``module.name`` (see
    :class:`KernelStructured`). Returns ``module``."""
    KernelStructured.apply(module, name, amount, n=n, scope=scope, layout=layout, importance_scores=importance_scores)
    return module


def channel_structured(module, name, amount, n=2, axis="out", layout=None, importance_scores=None):
    """Prune ``amount`` of the alive output (``axis="out"``) or input
    (``axis="in"``) channels of ``module.name``. Returns ``module``."""
    ChannelStructured.apply(module, name, amount, n=n, axis=axis, layout=layout, importance_scores=importance_scores)
    return module


def block_structured(module, name, amount, block_size=4, n=2, layout=None, importance_scores=None):
    """Prune ``amount`` of the alive ``block_size`` blocks of ``module.name``
    (see :class:`BlockStructured`). Returns ``module``."""
    BlockStructured.apply(
        module, name, amount, block_size=block_size, n=n, layout=layout, importance_scores=importance_scores
    )
    return module


def panel_structured(module, name, amount, square=False, n=2, importance_scores=None, rows=None, panels=1):
    """The granularity the engine executes (vector sparsity): prune
    ``amount`` of the alive vectors of a sparse conv's ``(K, C_in, C_out)``
    weight, a vector being (offset, input channel, panel of output
    channels), a panel the fused kernels' register-tile width
    (``nn.functional.panel_width``: 16 float32 / 8 float64 columns). This is
    :func:`block_structured` with ``block_size=(width, 1)``; the forward then
    visits only the vectors left. The input gradient runs on ``W[o].T``,
    whose vectors are (output channel, panel of input channels): with
    ``square=True`` the blocks are ``width x width``, zero vectors in both
    directions, so forward, input and weight gradients all skip them
    (bench/RESULTS.md). ``rows``: input channels per block (default 1, or
    ``width`` with ``square``); ``rows=2`` prunes whole bf16 vectors
    (offset, channel pair, 16 columns), which the bf16 kernels skip (with
    ``rows=1`` they skip a pair only where both its channels are pruned).
    ``panels``: adjacent panels per block (default 1); ``panels=2`` prunes
    vectors of ``2 * width`` columns, the AVX-512 dense tile's width, which
    the float32 / float64 AVX-512 vector kernels run two vectors a tile row
    (``nn.functional.tile_panels``: the panels a block should span on this
    CPU); with ``square`` the blocks are then ``2 width`` square, twins in
    both directions. Returns ``module``."""
    from ..nn.functional import panel_width  # noqa: PLC0415 - nn sits above this package

    weight = stored(module, name)  # (the TypeError of every other granularity)
    square = as_bool(square, "square")
    panels = positive_int(panels, "panels", "adjacent panels per block")
    width = panel_width(weight.dtype) * panels
    if rows is None:
        rows = width if square else 1
    else:
        rows = positive_int(rows, "rows", "input channels per block")
    if square and rows != width:
        raise ValueError(f"square=True means rows = width = {width}; got rows={rows}")
    return block_structured(module, name, amount, block_size=(width, rows), n=n,
                            importance_scores=importance_scores)


def stripe_structured(module, name, amount, n=2, layout=None, importance_scores=None):
    """Prune ``amount`` of the alive stripes of ``module.name`` by norm (see
    :class:`StripeStructured`). Returns ``module``."""
    StripeStructured.apply(module, name, amount, n=n, layout=layout, importance_scores=importance_scores)
    return module


def global_structured(parameters, pruning_method, amount, importance_scores=None, **kwargs):
    """Prune ``amount`` of the alive groups of all ``parameters`` together.

    ``parameters`` is an iterable of ``(module, name)``; ``pruning_method`` a
    :class:`GroupStructured` subclass (e.g. ``ChannelStructured``) and
    ``kwargs`` its arguments other than ``amount`` (``n``, ``axis``, ...).
    Group scores of all tensors are ranked together, so they must be on a
    comparable scale: pass normalised ``importance_scores`` (a dict keyed by
    ``(module, name)``, as ``global_unstructured`` takes) when raw norms are
    not. Each tensor is then pruned by ``pruning_method.apply`` with the count
    that fell to it, so the result composes with earlier pruning as usual.
    A TypeError names an item that is no ``(module, name)`` pair, a name
    the module has no tensor for or a parametrized one
    (``torch.nn.utils.parametrize``), a ValueError one listed twice (before
    anything is pruned)."""
    if isinstance(parameters, (torch.nn.Module, str, bytes)) or not hasattr(parameters, "__iter__"):
        raise TypeError(f"parameters must be an iterable of (module, name) pairs; got {type(parameters).__name__}")
    parameters = list(parameters)
    for i, item in enumerate(parameters):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], torch.nn.Module)
                and isinstance(item[1], str)):
            got = type(item).__name__ if not isinstance(item, (tuple, list)) else \
                f"({', '.join(type(v).__name__ for v in item)})"
            raise TypeError(f"parameters[{i}] must be a (module, name) pair (a torch.nn.Module and a str); got {got}")
        if raw(*item) is None:
            raise TypeError(f"parameters[{i}]: {no_tensor(*item)}")
        try:
            check_maskable(*item)
        except TypeError as error:
            raise TypeError(f"parameters[{i}]: {error}") from None
        first = next(j for j, seen in enumerate(parameters) if seen[0] is item[0] and seen[1] == item[1])
        if first < i:  # (its groups would count twice and it would be pruned twice)
            raise ValueError(f"parameters[{i}] names the same tensor ({type(item[0]).__name__}, {item[1]!r}) as "
                             f"parameters[{first}]; list each (module, name) once")
    if not (isinstance(pruning_method, type) and issubclass(pruning_method, GroupStructured)):
        raise TypeError(f"pruning_method must be a GroupStructured subclass; got {pruning_method!r}")
    importance_scores = importance_scores if importance_scores is not None else {}
    if not isinstance(importance_scores, dict):
        raise TypeError("importance_scores must be a dict keyed by (module, name) or None")
    validate_amount(amount)
    if not parameters:
        raise ValueError("parameters must name at least one (module, name) pair")
    norms_list, alive_list = [], []
    for module, name in parameters:
        layout = kwargs.get("layout") or _layout_or_none(module, name)
        own = {"layout": layout} if layout else {}
        if layout and issubclass(pruning_method, (VectorStructured, KernelStructured, ChannelStructured,
                                                  BlockStructured, StripeStructured)):  # (as their apply reads it)
            own["region"] = _used_kernel_positions(module, name, layout)
        method = pruning_method(0, **{**kwargs, **own})
        weight = getattr(module, name + "_orig", None)
        weight = weight if weight is not None else getattr(module, name)
        scores = importance_scores.get((module, name), weight)
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"importance_scores for {name} must be a torch.Tensor; got {type(scores).__name__}")
        if scores.shape != weight.shape:
            raise ValueError(
                f"importance_scores for {name} must have shape {tuple(weight.shape)}; got {tuple(scores.shape)}"
            )
        if scores is not weight:  # (bool, complex: as apply refuses them, but before any layer is pruned)
            _check_scores(module, name, scores)
        mask = getattr(module, name + "_mask", torch.ones_like(weight))
        _, _, norms, alive = method.scored_groups(scores, mask)
        norms_list.append(norms)
        alive_list.append(alive)
    norms = torch.cat(norms_list)
    alive = torch.cat(alive_list)
    chosen = select_weakest(norms, alive, count_to_prune(amount, int(alive.sum()), "groups"))
    start = 0
    for (module, name), layer_norms in zip(parameters, norms_list):
        count = int(chosen[start : start + layer_norms.numel()].sum())
        start += layer_norms.numel()
        pruning_method.apply(module, name, count, importance_scores=importance_scores.get((module, name)), **kwargs)


def _layout_or_none(module, name):
    try:
        return layout_of(module, name)
    except TypeError:
        return None
