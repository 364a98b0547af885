"""Pattern-based pruning (PatDNN): every kernel (one (out, in) pair's kernel
positions) keeps exactly one pattern, a fixed subset of its positions, chosen
from a small set shared by the layer. For a sparse conv a kernel is
``W[:, i, o]`` over the K offsets, so a pattern is a subset of offsets.

The set is given, or learned as PatDNN does: each kernel's ``pattern_size``
largest-magnitude positions form its preferred pattern, and the
``num_patterns`` most frequent preferred patterns form the set. Each kernel
then takes the pattern that keeps the largest sum of squared importance (over
its still-unpruned entries). Removing whole kernels (PatDNN's connectivity
pruning) is :func:`pointsparse.prune.kernel_structured` with
``scope="pair"``.

A ``kernel_region`` conv's kernel positions are its region's: patterns are
learned and chosen among them, and the values outside (never run) are
neither scored nor pruned (they keep their mask)."""

from __future__ import annotations

import torch

from ..tensor import as_int, positive_int
from ._copyable import CopyableMethod, _check_scores
from .adapters import WeightLayout, check_layout, dense_layout, layout_of
from .structured import _used_kernel_positions, check_region, refuse_nan


def _is_sequence(value) -> bool:
    """Iterable and not a string (a list, tuple, tensor, numpy array...)."""
    if isinstance(value, (str, bytes)) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return False
    try:
        iter(value)
    except TypeError:
        return False
    return True


def as_patterns(patterns, kernel_volume: int) -> torch.Tensor:
    """``patterns`` as a bool tensor ``(P, kernel_volume)``: a bool/0-1 tensor
    of that shape, or a list of lists of kept kernel-position indices
    (anything else: a TypeError naming ``patterns``)."""
    if isinstance(patterns, torch.Tensor):
        out = patterns
        if out.dim() != 2 or out.shape[1] != kernel_volume:
            raise ValueError(
                f"patterns must be (P, {kernel_volume}) (one row per pattern); got {tuple(out.shape)}"
            )
        if out.dtype != torch.bool:
            if not bool(((out == 0) | (out == 1)).all()):
                raise ValueError("patterns as a numeric tensor must hold only 0 and 1")
            out = out != 0
    else:
        if not _is_sequence(patterns):
            raise TypeError(f"patterns must be a bool tensor (P, {kernel_volume}) or a list of lists of kept "
                            "kernel-position indices (None: learned, see num_patterns and pattern_size); got "
                            f"{patterns!r} ({type(patterns).__name__})")
        rows = []
        for i, pattern in enumerate(patterns):
            if not _is_sequence(pattern):
                raise TypeError(f"patterns[{i}] must be a list of kept kernel-position indices; got {pattern!r} "
                                f"({type(pattern).__name__})")
            row = torch.zeros(kernel_volume, dtype=torch.bool)
            for position in pattern:
                position = as_int(position, "pattern positions")
                if not 0 <= position < kernel_volume:
                    raise ValueError(f"pattern position {position} is outside [0, {kernel_volume})")
                row[position] = True
            rows.append(row)
        if not rows:
            raise ValueError("patterns must hold at least one pattern")
        out = torch.stack(rows)
    if out.shape[0] == 0:
        raise ValueError("patterns must hold at least one pattern")
    return out.clone()


def learn_patterns(t: torch.Tensor, num_patterns: int = 8, pattern_size: int = 4, layout=None, mask=None,
                   region=None):
    """The ``num_patterns`` most frequent top-``pattern_size`` position sets
    over the kernels of ``t`` (ties: the lexicographically larger 0/1 row
    first), as a bool tensor ``(P, K)``, P <= ``num_patterns``. Kernels that
    ``mask`` prunes entirely do not vote. ``region``: a bool ``(K,)``, the
    kernel positions that are weights (a ``kernel_region`` conv's offsets;
    None: all); patterns keep positions inside it only, and a kernel votes
    when an entry inside it is unpruned."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"t must be a torch.Tensor (the weight or its importance scores); got {type(t).__name__}")
    check_layout(layout)
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a tensor of t's shape {tuple(t.shape)} or None; got {type(mask).__name__}")
    if mask is not None and mask.shape != t.shape:
        raise ValueError(f"mask must have t's shape {tuple(t.shape)}; got {tuple(mask.shape)}")
    layout = layout if layout is not None else dense_layout(t.dim())
    num_patterns, pattern_size = positive_int(num_patterns, "num_patterns"), positive_int(pattern_size, "pattern_size")
    scores = t.detach().abs()
    if mask is not None:  # (where, not a product: a pruned NaN or inf times 0 is NaN, which topk ranks first)
        scores = torch.where(mask != 0, scores, 0)
    oik = layout.to_oik(scores)
    kernel = oik.shape[2]
    check_region(region, kernel)
    inside = kernel if region is None else int(region.sum())
    if pattern_size > inside:
        raise ValueError(f"pattern_size={pattern_size} exceeds the {inside} kernel positions"
                         + ("" if region is None else " of the region"))
    kernels = oik.reshape(-1, kernel)
    alive = None if mask is None else layout.to_oik(mask).reshape(-1, kernel).ne(0)
    if region is not None:
        region = region.to(kernels.device)
        kernels = torch.where(region, kernels, torch.full_like(kernels, -1))  # (below every |score|: never kept)
        alive = region.expand_as(kernels) if alive is None else alive & region
    if alive is not None:
        kernels = kernels[alive.any(dim=1)]
    if kernels.shape[0] == 0:
        raise ValueError("no unpruned kernel to learn patterns from")
    preferred = torch.zeros_like(kernels, dtype=torch.bool)
    preferred.scatter_(1, torch.topk(kernels, pattern_size, dim=1).indices, True)
    unique, counts = torch.unique(preferred.to(torch.uint8), dim=0, return_counts=True)
    # unique rows are sorted ascending; reverse so equal counts favour larger rows, then stable sort.
    unique, counts = unique.flip(0), counts.flip(0)
    order = torch.sort(counts, descending=True, stable=True).indices
    return unique[order[:num_patterns]].bool()


class PatternStructured(CopyableMethod):
    """Each kernel keeps the one pattern of ``patterns`` (bool ``(P, K)``)
    that retains the most squared importance among its alive entries;
    entries outside the chosen pattern are pruned. ``region``: a bool
    ``(K,)``, the kernel positions that are weights (None: all), which
    :meth:`apply` reads from a ``kernel_region`` conv: the entries outside
    are neither scored nor pruned (they keep the mask they had)."""

    PRUNING_TYPE = "global"

    def __init__(self, patterns, layout: WeightLayout | None = None, region=None) -> None:
        if not isinstance(patterns, torch.Tensor) or patterns.dtype != torch.bool or patterns.dim() != 2:
            raise TypeError("patterns must be a bool tensor (P, K); build one with as_patterns()")
        check_layout(layout)
        check_region(region)
        self.patterns = patterns
        self.layout = layout
        self.region = region

    def compute_mask(self, t, default_mask):
        layout = self.layout if self.layout is not None else dense_layout(t.dim())
        layout.check(t, "the tensor to prune")
        # (where, not a product: a pruned NaN or inf times 0 is NaN, and one NaN made every pattern's energy NaN)
        energy = layout.to_oik(torch.where(default_mask != 0, t.detach().to(torch.float64), 0).pow(2))
        if energy.shape[2] != self.patterns.shape[1]:
            raise ValueError(
                f"patterns have {self.patterns.shape[1]} positions but the kernels of a tensor "
                f"of shape {tuple(t.shape)} have {energy.shape[2]}"
            )
        patterns = self.patterns.to(device=t.device)
        region = getattr(self, "region", None)  # (methods pickled before it existed have none)
        check_region(region, energy.shape[2])
        if region is not None:
            energy = torch.where(region.to(t.device), energy, 0)
        refuse_nan(energy)
        kept = energy @ patterns.to(torch.float64).T  # (O, I, P)
        chosen = patterns[kept.argmax(dim=2)]  # (O, I, K)
        if region is not None:
            chosen = chosen | ~region.to(t.device)  # (the entries outside keep their mask)
        keep = layout.from_oik(chosen, t.shape)
        return default_mask.clone(memory_format=torch.contiguous_format) * keep.to(default_mask.dtype)

    @classmethod
    def apply(  # type: ignore[override]
        cls, module, name, patterns=None, num_patterns=8, pattern_size=4, layout=None, importance_scores=None
    ):
        if importance_scores is not None:  # (before learn_patterns reads them)
            _check_scores(module, name, importance_scores)
        check_layout(layout)
        layout = layout if layout is not None else layout_of(module, name)
        weight = module._parameters.get(name + "_orig")
        weight = weight if weight is not None else getattr(module, name)
        kernel_volume = layout.to_oik(weight.detach()).shape[2]
        region = _used_kernel_positions(module, name, layout)
        if patterns is None:
            source = importance_scores if importance_scores is not None else weight
            patterns = learn_patterns(
                source, num_patterns, pattern_size, layout, mask=getattr(module, name + "_mask", None), region=region
            )
        else:
            patterns = as_patterns(patterns, kernel_volume)
            _check_inside(patterns, region)
        return super().apply(module, name, patterns=patterns, layout=layout, region=region,
                             importance_scores=importance_scores)


def _check_inside(patterns: torch.Tensor, region) -> None:
    """A given pattern keeps kernel positions inside ``region`` only (the
    others are no weights): a ValueError naming the first that does not."""
    if region is None:
        return
    for p, row in enumerate(patterns):
        outside = (row & ~region.to(row.device)).nonzero().flatten().tolist()
        if outside:
            raise ValueError(f"patterns[{p}] keeps kernel positions {outside} outside the conv's kernel_region "
                             f"{region.nonzero().flatten().tolist()} (never run); a pattern keeps positions "
                             "inside it")


def pattern_structured(
    module, name, patterns=None, num_patterns=8, pattern_size=4, layout=None, importance_scores=None
):
    """Pattern-prune ``module.name``: with ``patterns`` given (bool ``(P, K)``
    or lists of kept positions) each kernel takes its best pattern; without,
    the set is learned first (:func:`learn_patterns`). Returns ``module``."""
    PatternStructured.apply(
        module, name, patterns=patterns, num_patterns=num_patterns, pattern_size=pattern_size,
        layout=layout, importance_scores=importance_scores,
    )
    return module


__all__ = ["PatternStructured", "as_patterns", "learn_patterns", "pattern_structured"]
