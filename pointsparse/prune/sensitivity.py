"""Per-layer sensitivity analysis (Han et al. 2015; Li et al. 2017): prune one
layer at a time at ratios 0, 0.1, ..., 0.9 with the chosen granularity,
measure the user's metric on a validation set, then give every layer the
largest ratio whose drop stays under a threshold."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import _compat
from ._copyable import copy_model
from ..tensor import as_bool
from .adapters import prunable_layers, used_mask
from .procedure import check_callable, check_fraction, check_path, magnitude_prune_layer, metric_value
from .._modes import kept

GRANULARITIES = ("unstructured", "channel", "group")
DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(10))


@dataclass
class SensitivityResult:
    """``curves[layer]`` is the metric at each of ``ratios``; ``baseline`` the
    unpruned metric."""

    ratios: list[float]
    curves: dict[str, list[float]]
    baseline: float
    granularity: str
    metric: str = "metric"
    sizes: dict[str, int] = field(default_factory=dict)

    def drops(self, layer: str) -> list[float]:
        return [self.baseline - v for v in self.curves[layer]]


def _prune_one(module: nn.Module, ratio: float, granularity: str) -> None:
    if granularity == "unstructured":  # (of the layer's weights: a kernel_region conv's region's)
        magnitude_prune_layer(module, ratio)
    else:
        _compat.channel_structured(module, "weight", amount=ratio, n=1, axis="out")


def _layer_state(module: nn.Module) -> tuple:
    """What pruning ``module`` and ``remove`` change in it beside the
    weight's values: the order of its parameters (``remove`` registers the
    weight again, after the bias), its forward hooks and whether it carries
    the flag of :func:`._copyable.keep_copyable` (which adds a hook)."""
    return list(module._parameters), set(module._forward_hooks), "_pointsparse_copyable" in vars(module)


def _restore_layer(module: nn.Module, state: tuple) -> None:
    """Put back what :func:`_layer_state` took: a model saved, scripted or
    given an optimizer's state after the scan sees the layer as before (an
    optimizer state saved before it maps its entries by parameter order)."""
    order, hooks, flagged = state
    for key in order:
        if key in module._parameters:
            module._parameters[key] = module._parameters.pop(key)
    for key in [k for k in module._forward_hooks if k not in hooks]:
        del module._forward_hooks[key]
        module._forward_hooks_with_kwargs.pop(key, None)
        module._forward_hooks_always_called.pop(key, None)
    if not flagged:
        vars(module).pop("_pointsparse_copyable", None)


def _baseline(model: nn.Module, eval_fn, metric: str) -> float:
    """``eval_fn(model)`` on the unpruned model, which every drop is measured
    from: a NaN or infinite baseline makes every drop meaningless."""
    baseline = metric_value(eval_fn(model))
    if not math.isfinite(baseline):
        raise ValueError(
            f"eval_fn ({getattr(eval_fn, '__name__', type(eval_fn).__name__)}, metric {metric!r}) returned "
            f"{baseline} on the unpruned model; the baseline metric must be finite"
        )
    return baseline


def sensitivity_scan(model: nn.Module, eval_fn: Callable[[nn.Module], float], ratios=DEFAULT_RATIOS,
                     granularity: str = "unstructured", layers=None, metric: str = "metric",
                     example_input=None) -> SensitivityResult:
    """For each prunable layer and each ratio, prune only that layer (by L1
    magnitude: single weights, or whole output channels for ``"channel"``),
    call ``eval_fn(model)``, and restore the layer exactly. A ratio of single
    weights is of the layer's weights, which ``sizes`` counts (a
    ``kernel_region`` conv's region's: the values outside it, never run, are
    not pruned). The model is left as it was: its weights, the order of its
    parameters, its hooks, and (whatever ``eval_fn`` does with them) its
    buffers and every module's train / eval mode. ``"group"`` scans every
    coupled channel group of the dependency graph traced on
    ``example_input`` instead (each cut on a copy of the model: the fraction
    of the group's channels of lowest summed magnitude removed from every
    member); ``layers`` then names the groups to scan (a group's name or any
    layer producing its channels).

    Without ``layers`` every prunable layer is scanned, the model's output
    layer too: with ``"channel"`` its output channels are the classes, so
    name the others in ``layers`` (as ``pointsparse prune sensitivity
    --granularity channel`` does; Torch-Pruning's ``ignored_layers``).

    The unpruned model's metric (the baseline) must be finite, else a
    ValueError naming ``eval_fn``; a pruned model's NaN or infinite metric is
    recorded as it is (and :func:`choose_ratios` never chooses that ratio)."""
    check_callable(eval_fn, "eval_fn")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise TypeError(f"ratios must be a list of numbers in [0, 1); got {type(ratios).__name__}")
    ratios = list(ratios)
    if any(isinstance(r, bool) or not isinstance(r, numbers.Real) for r in ratios):
        raise TypeError(f"ratios must be a list of numbers in [0, 1); got {ratios!r}")
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
        raise ValueError(f"ratios must be a non-empty list of values in [0, 1); got {ratios}")
    if not isinstance(model, nn.Module):  # (before kept walks its modules)
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if granularity == "group":
        with kept(model):
            return _group_scan(model, eval_fn, ratios, metric, example_input, layers)
    with kept(model):
        return _layer_scan(model, eval_fn, ratios, granularity, layers, metric)


def _layer_scan(model, eval_fn, ratios, granularity, layers, metric) -> SensitivityResult:
    """The scan by single weights or output channels, one layer at a time."""
    chosen = prunable_layers(model, layers)
    for name, m in chosen:
        if _compat.is_pruned(m):
            raise ValueError(f"layer {name!r} is already pruned; scan an unpruned model (or call remove first)")
    baseline = _baseline(model, eval_fn, metric)
    curves: dict[str, list[float]] = {}
    for name, m in chosen:
        saved = m.weight.detach().clone()
        values = []
        for r in ratios:
            if r == 0.0:
                values.append(baseline)
                continue
            state = _layer_state(m)
            try:
                _prune_one(m, r, granularity)
                values.append(metric_value(eval_fn(model)))
            finally:
                if _compat.is_pruned(m):  # (a ratio that rounds to no weight prunes nothing)
                    _compat.remove(m, "weight")
                with torch.no_grad():
                    m.weight.copy_(saved)
                _restore_layer(m, state)
        curves[name] = values
    return SensitivityResult(ratios, curves, baseline, granularity, metric,
                             {n: int(used_mask(m).sum()) for n, m in chosen})


def _group_scan(model, eval_fn, ratios, metric, example_input, layers=None) -> SensitivityResult:
    from .graph import DependencyGraph
    from .surgery import apply_channel_ratios
    if example_input is None:
        raise ValueError("granularity='group' needs example_input (to trace the dependency graph)")
    graph = DependencyGraph(model, example_input)
    groups = graph.groups
    if not groups:  # (the unstructured scan of a model without prunable layers: a ValueError too)
        raise ValueError("model has no coupled channel group that can be cut (scan it with granularity "
                         "'unstructured' or 'channel')")
    if layers is not None:  # the groups the names pick (a group's name or any layer producing its channels)
        if isinstance(layers, str) or not isinstance(layers, Iterable):
            raise TypeError(f"layers must be a list of group or layer names; got {type(layers).__name__}")
        picked = {id(g): g for g in (graph.group(name) for name in layers)}
        if not picked:
            raise ValueError("layers is empty")
        groups = [g for g in groups if id(g) in picked]
    baseline = _baseline(model, eval_fn, metric)
    curves = {}
    for g in groups:
        values = []
        for r in ratios:
            cut = copy_model(model)
            if r > 0:
                apply_channel_ratios(cut, {g.name: r}, example_input=example_input)
            values.append(baseline if r == 0 else metric_value(eval_fn(cut)))
        curves[g.name] = values
    return SensitivityResult(ratios, curves, baseline, "group", metric, {g.name: g.size for g in groups})


def choose_ratios(result: SensitivityResult, threshold: float, relative: bool = False) -> dict[str, float]:
    """Per layer the largest ratio at which the metric drop (baseline - value,
    or that over the baseline when ``relative``) is <= ``threshold``, and at
    all smaller ratios too (a curve that recovers after a dip does not count).

    ``threshold`` must be a number (TypeError otherwise), finite and >= 0,
    and ``result.baseline`` finite (ValueError otherwise). A NaN or infinite metric at a ratio counts
    as an unacceptable drop: neither that ratio nor any larger one is chosen."""
    if not isinstance(result, SensitivityResult):
        raise TypeError(f"result must be a SensitivityResult (sensitivity_scan's); got {type(result).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number; got {type(threshold).__name__}")
    relative = as_bool(relative, "relative")
    if not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0; got {threshold}")
    if not math.isfinite(result.baseline):
        raise ValueError(
            f"the baseline {result.metric} of the scan is {result.baseline}; choosing ratios needs a finite baseline"
        )
    out = {}
    for name, values in result.curves.items():
        best = 0.0
        for r, v in sorted(zip(result.ratios, values)):
            drop = result.baseline - v
            if relative:
                drop = drop / max(abs(result.baseline), 1e-12)
            if not math.isfinite(v) or drop > threshold:  # NaN > threshold is False: test it explicitly
                break
            best = r
        out[name] = best
    return out


def apply_ratios(model: nn.Module, ratios: dict[str, float], granularity: str = "unstructured",
                 example_input=None) -> None:
    """Prune each named layer at its ratio (what :func:`choose_ratios` returns);
    ``"group"``: cut each named coupled group (needs ``example_input``).
    Every ratio must be a number in [0, 1) (a NaN is a ValueError, not
    "prune nothing"); all are checked before anything is pruned."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must be a dict {{layer name: ratio}}; got {type(ratios).__name__}")
    ratios = {name: check_fraction(r, f"ratios[{name!r}]") for name, r in ratios.items()}
    if granularity == "group":
        if example_input is None:
            raise ValueError("granularity='group' needs example_input (to trace the dependency graph)")
        from .surgery import apply_channel_ratios
        apply_channel_ratios(model, {n: r for n, r in ratios.items() if r > 0}, example_input=example_input)
        return
    named = dict(prunable_layers(model, list(ratios)))
    for name, r in ratios.items():
        if r > 0:
            _prune_one(named[name], float(r), granularity)


def plot_sensitivity(result: SensitivityResult, path, threshold: float | None = None) -> Path:
    """Write the curves (metric against ratio, one line per layer) to a PNG
    (``threshold``: a finite number, drawn as ``baseline - threshold``)."""
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number or None; got {threshold!r}")
    path = check_path(path, "the PNG file to write")  # (before the drawing)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, values in result.curves.items():
        ax.plot(result.ratios, values, marker="o", ms=3, label=f"{name} ({result.sizes.get(name, 0)} w)")
    if threshold is not None:
        ax.axhline(result.baseline - threshold, color="k", ls="--", lw=0.8, label=f"baseline - {threshold}")
    ax.set_xlabel(f"pruning ratio ({result.granularity})")
    ax.set_ylabel(result.metric)
    ax.set_title("per-layer sensitivity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
