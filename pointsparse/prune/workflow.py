"""Cut channels of a whole network in one call: score every channel by a
named criterion, keep a share of every coupled group (or of all channels
ranked together) and slice the model in place. ``pointsparse prune
channels`` (:mod:`pointsparse.app.channels`) runs it on a training
checkpoint."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from ..tensor import positive_int
from .procedure import check_fraction

CRITERIA = ("l1", "l2", "bn", "taylor")


def check_options(criterion: str | None = None, ratio: float | None = None) -> None:
    """ValueError naming ``criterion`` or ``ratio`` (each checked when given)."""
    if criterion is not None and criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}")
    if ratio is not None:
        check_fraction(ratio, "ratio (the kept fraction)", low_open=True, high_open=False)


def channel_scores(criterion: str, model: nn.Module, loss_fn: Callable | None = None, batches: Iterable = ()):
    """Importance scores of ``criterion``: ``l1``/``l2`` weight norms, ``bn``
    BatchNorm scales, ``taylor`` first-order (``loss_fn(model, batch)`` over
    ``batches``)."""
    from . import criteria
    check_options(criterion)
    if criterion in ("l1", "l2"):
        return criteria.magnitude(model, p=1 if criterion == "l1" else 2)
    if criterion == "bn":
        return criteria.bn_scaling(model)
    if loss_fn is None:
        raise ValueError("criterion 'taylor' needs loss_fn and batches")
    return criteria.taylor(model, loss_fn, batches)  # (its TypeError for batches that are no iterable)


def prune_channels(model: nn.Module, example_input, ratio: float = 0.5, scores=None, scope: str = "group",
                   multiple: int | None = None, ignore=()) -> nn.Module:
    """Keep ``ratio`` of every coupled channel group of ``model`` (traced on
    ``example_input``; ranked by ``scores``, default L1), counts rounded to
    ``multiple`` (default :data:`~pointsparse.prune.graph.DEFAULT_MULTIPLE`),
    and cut the rest in place; the layers of ``ignore`` (names or modules)
    keep their output channels (:func:`~pointsparse.prune.graph.plan`).
    Returns ``model``, whose cut layers hold new ``Parameter`` objects: an
    optimizer built before this call no longer trains it; build the one that
    fine-tunes it afterwards."""
    from .graph import DEFAULT_MULTIPLE, DependencyGraph, plan
    check_fraction(ratio, "ratio (the kept fraction)", low_open=True, high_open=False)  # None too
    if multiple is not None:
        multiple = positive_int(multiple, "multiple (--multiple)", "kept channel counts are rounded to it")
    graph = DependencyGraph(model, example_input)
    graph.cut(plan(graph, ratio, scores, scope, DEFAULT_MULTIPLE if multiple is None else multiple, ignore=ignore),
              retrace=False)
    return model
