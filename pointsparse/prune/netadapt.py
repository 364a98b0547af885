"""NetAdapt (Yang et al. 2018): adapt a pre-trained chain network to a latency
budget measured on this machine. A lookup table holds the latency of each
layer at candidate (input, output) channel counts, measured here on the
layer's input from a representative example (for sparse convolutions the
entry is keyed on the kernel-map sizes of that input, since their cost
follows the pairs, not dense FLOPs). Each iteration asks for a latency drop
that decays geometrically, proposes for every layer the largest channel count
reaching it (channels of lowest L1 norm removed physically), fine-tunes each
proposal briefly, and keeps the most accurate; a long fine-tune ends the run,
and the final network's latency is measured again."""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import adapters
from ._copyable import copy_model
from .._modes import evaluating, run_model
from .adapters import in_channels, out_channels
from .procedure import call_train, check_callable, check_int, check_lr, check_path, check_real, metric_value
from .surgery import capture, chain_followers, channel_groups, keep_by_l1, prune_channels


def _best_time(fn: Callable, repeats: int, warmup: int = 1) -> float:
    """The fastest of ``repeats`` timed calls: on a machine shared with other
    processes the minimum is the stable estimate of the uncontended cost."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure_latency(model: nn.Module, example_input, repeats: int = 7) -> float:
    """Seconds of ``model(example_input)`` (``model(*example_input)`` for a
    tuple) in eval mode without gradients (the fastest of ``repeats``, as
    the table's entries); ``repeats`` an int >= 1."""
    repeats = check_int(repeats, "repeats", 1)  # (0 raised min()'s 'arg is an empty sequence')
    with evaluating(model), torch.no_grad():
        return _best_time(lambda: run_model(model, example_input), repeats)


def _placed_like(fresh: nn.Module, module: nn.Module) -> nn.Module:
    """``fresh`` on ``module``'s device and in its floating dtype (those of
    its first floating parameter or buffer), as the table times it."""
    ref = next((t for t in itertools.chain(module.parameters(), module.buffers()) if t.is_floating_point()), None)
    return fresh if ref is None else fresh.to(ref.device, ref.dtype)


def _layer_like(module: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """A fresh layer of ``module``'s type and geometry with other channel
    counts (its adapter's ``like``), on its device and in its dtype."""
    adapter = adapters.adapter_for(module)
    if adapter is None or adapter.kind != "layer" or adapter.like is None:
        raise TypeError(f"NetAdapt's table does not support {type(module).__name__}")
    return _placed_like(adapter.like(module, c_in, c_out), module)


def _follower_like(module: nn.Module, c_out: int) -> nn.Module:
    """A fresh norm of ``c_out`` channels (its adapter's ``like``, on its
    device and in its dtype), else a copy."""
    adapter = adapters.adapter_for(module)
    if adapter is not None and adapter.kind == "norm" and adapter.like is not None:
        return _placed_like(adapter.like(module, c_out, c_out), module)
    return copy.deepcopy(module)


def _input_like(x, c_in: int, repeat: int, gen: torch.Generator):
    """Random inputs of ``c_in * repeat`` channels like ``x`` (its dtype and device)."""
    if hasattr(x, "with_feats"):  # SparseTensor: same coords and coordinate cache (kernel maps already built)
        return x.with_feats(torch.randn(len(x), c_in, generator=gen).to(x.feats.device, x.feats.dtype))
    shape = list(x.shape)
    shape[1] = c_in * repeat
    return torch.randn(shape, generator=gen).to(x.device, x.dtype)


def _structural_key(module, x) -> dict:
    if adapters.is_sparse_conv(module):
        kmap = adapters.adapter_for(module).kernel_map(module, x)
        return {"type": "pointsparse.nn.Conv3d", "kernel_size": list(module.kernel_size),
                "stride": list(module.stride), "num_in": kmap.num_in, "num_out": kmap.num_out,
                "kernel_map_sizes": [int(v) for v in kmap.sizes], "dilation": list(module.dilation),
                "transposed": bool(module.transposed), "relu": bool(getattr(module, "relu", False)),
                "kernel_region": (None if getattr(module, "kernel_region", None) is None
                                  else list(module.kernel_region))}
    return {"type": type(module).__name__, "input_shape": [int(v) for v in x.shape[2:]] if x.dim() > 2 else [],
            "batch": int(x.shape[0])}


@dataclass
class LatencyTable:
    """``entries[layer][(c_in, c_out)]`` = seconds; ``rest`` the latency of
    everything that is not a table layer (norms, activations, pooling)."""

    entries: dict[str, dict[tuple[int, int], float]]
    keys: dict[str, dict]
    candidates: dict[str, list[int]]  # output-channel counts per producer
    rest: float = 0.0
    repeats: int = 7
    layout: list = field(default_factory=list)  # (layer, feeding producer or None, is producer)

    def latency(self, channels: dict[str, int], model_layers: list | None = None) -> float:
        """Estimated network latency with ``channels[producer]`` output
        channels for each producer: ``rest`` plus each layer's entry."""
        total = self.rest
        for name, feeder, producer in (model_layers if model_layers is not None else self.layout):
            c_out = channels[name] if producer else None
            c_in = channels[feeder] if feeder else None
            row = self.entries.get(name)
            key = None if row is None else next(
                (k for k in row if (c_in is None or k[0] == c_in) and (c_out is None or k[1] == c_out)), None)
            if key is None:
                raise ValueError(f"the latency table has no entry for layer {name!r} at c_in={c_in}, c_out={c_out} "
                                 "(build the table for this model and its candidate channel counts)")
            total += row[key]
        return total

    def initial_latency(self) -> float:
        """The estimate at the widths the table was built at (each
        producer's first candidate): NetAdapt's initial latency."""
        return self.latency({name: counts[0] for name, counts in self.candidates.items()})

    def least_latency(self) -> float:
        """The least estimate any widths of the table can give: ``rest`` plus
        each layer's fastest entry (a lower bound: the fastest entries of two
        layers may need different widths of the producer between them). A
        budget below it cannot be met on this table."""
        return self.rest + sum(min(row.values()) for row in self.entries.values() if row)

    def save(self, path) -> Path:
        path = check_path(path, "the JSON file to write")
        path.write_text(json.dumps({
            "entries": {n: [[k[0], k[1], v] for k, v in row.items()] for n, row in self.entries.items()},
            "keys": self.keys, "candidates": self.candidates, "rest": self.rest, "repeats": self.repeats,
            "layout": [list(row) for row in self.layout]}, indent=1))
        return path

    @classmethod
    def load(cls, path) -> "LatencyTable":
        """The table :meth:`save` wrote to ``path``; a ValueError naming the
        file where it holds no such table (values of another kind than save
        writes included: a latency that is no finite number >= 0, channel
        counts that are no ints >= 1, a layout row that is no ``[layer,
        feeder or None, is producer]``) or is a folder or no regular file;
        ``FileNotFoundError`` where there is none."""
        from ..checkpoint import check_readable

        path = check_path(path, "a file LatencyTable.save wrote")
        check_readable(path, str(path), "the JSON file LatencyTable.save wrote", missing=FileNotFoundError)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return _checked_table(cls(
                {n: {(a, b): v for a, b, v in rows} for n, rows in d["entries"].items()}, dict(d["keys"]),
                dict(d["candidates"]), d["rest"], d["repeats"], [tuple(row) for row in d.get("layout", [])]))
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:  # (UnicodeDecodeError,
            # JSON's, a nesting deeper than json reads)
            raise ValueError(f"{path}: not a latency table saved by LatencyTable.save "
                             f"({type(error).__name__}: {str(error)[:200]})") from None


def _checked_table(table: LatencyTable) -> LatencyTable:
    """``table`` (read from a file) if its values are of the kinds
    :meth:`LatencyTable.save` writes, else a ValueError saying which is not."""
    def count(v) -> bool:
        return type(v) is int and v >= 1

    def seconds(v) -> bool:
        return type(v) in (int, float) and math.isfinite(v) and v >= 0

    for name, row in table.entries.items():
        for (c_in, c_out), latency in row.items():
            if not (count(c_in) and count(c_out) and seconds(latency)):
                raise ValueError(f"entry {name!r} {[c_in, c_out, latency]!r:.100} is not [c_in, c_out, seconds] "
                                 "(ints >= 1, a finite number >= 0)")
    for name, key in table.keys.items():
        if not isinstance(key, dict):
            raise ValueError(f"key {name!r} is no dict; got {key!r:.100}")
    for name, counts in table.candidates.items():
        if not (isinstance(counts, list) and counts and all(count(c) for c in counts)):
            raise ValueError(f"candidates {name!r} must be a non-empty list of ints >= 1; got {counts!r:.100}")
    if not seconds(table.rest):
        raise ValueError(f"rest must be a finite number >= 0 (seconds); got {table.rest!r:.100}")
    if not count(table.repeats):
        raise ValueError(f"repeats must be an int >= 1; got {table.repeats!r:.100}")
    for row in table.layout:
        if not (len(row) == 3 and isinstance(row[0], str) and (row[1] is None or isinstance(row[1], str))
                and type(row[2]) is bool):
            raise ValueError(f"layout row {list(row)!r:.100} is not [layer, feeding producer or None, is producer]")
    table.entries = {name: {key: float(v) for key, v in row.items()} for name, row in table.entries.items()}
    table.rest = float(table.rest)
    return table


def _channel_layout(model):
    """``[(layer, feeding producer or None, is producer)]`` for every layer
    whose channels change (producers and consumers of the channel groups), in
    network order, and the consumers' input repeat."""
    groups = channel_groups(model)
    producers = {g.producer for g in groups}
    feeds = {g.consumer: g.producer for g in groups}
    order = [n for n, m in model.named_modules()]
    names = sorted(producers | set(feeds), key=order.index)
    return [(n, feeds.get(n), n in producers) for n in names], {g.consumer: g.repeat for g in groups}


def candidate_counts(channels: int, num_candidates: int = 8) -> list[int]:
    """Output-channel counts tried for a layer: ``channels`` down to about
    ``channels / num_candidates`` in equal steps (descending)."""
    channels, num_candidates = check_int(channels, "channels", 1), check_int(num_candidates, "num_candidates", 1)
    step = max(1, channels // num_candidates)
    return list(range(channels, 0, -step))[:num_candidates]


def build_latency_table(model: nn.Module, example_input, num_candidates: int = 8, repeats: int = 7,
                        seed: int = 0) -> LatencyTable:
    """Measure every layer of the chain, as a block with the norms,
    activations and pooling that follow it, at every candidate (c_in, c_out)
    on its input from ``example_input``; what precedes the first layer is
    measured once as the full latency minus the blocks at full width."""
    num_candidates, repeats = check_int(num_candidates, "num_candidates", 1), check_int(repeats, "repeats", 1)
    seed = check_int(seed, "seed", 0)
    layout, repeats_in = _channel_layout(model)
    if not layout:
        raise ValueError("model has no chain of prunable layers")
    named = dict(model.named_modules())
    layer_names = [n for n, _, _ in layout]
    inputs = {n: x for n, (x, _) in zip(layer_names, capture(model, [named[n] for n in layer_names], example_input))}
    candidates = {n: candidate_counts(out_channels(named[n]), num_candidates) for n, _, p in layout if p}
    followers = chain_followers(model)
    gen = torch.Generator().manual_seed(seed)
    entries, keys = {}, {}
    for name, feeder, producer in layout:
        m = named[name]
        x = inputs[name]
        keys[name] = _structural_key(m, x)
        ins = candidates[feeder] if feeder else [in_channels(m) // repeats_in.get(name, 1)]
        outs = candidates[name] if producer else [out_channels(m)]
        row = {}
        for c_in in ins:
            rep = repeats_in.get(name, 1)
            xi = _input_like(x, c_in, rep, gen)
            for c_out in outs:
                block = nn.Sequential(_layer_like(m, c_in * rep, c_out),
                                      *[_follower_like(f, c_out) for f in followers[name]]).eval()
                with torch.no_grad():
                    row[(c_in, c_out)] = _best_time(lambda: block(xi), repeats)
        entries[name] = row
    table = LatencyTable(entries, keys, candidates, 0.0, repeats, layout)
    full = {n: out_channels(named[n]) for n, _, p in layout if p}
    table.rest = max(0.0, measure_latency(model, example_input, repeats) - table.latency(full, layout))
    return table


@dataclass
class NetAdaptResult:
    model: nn.Module
    channels: dict[str, int]
    budget: float
    initial_latency: float
    estimated_latency: float
    measured_latency: float
    history: list[dict] = field(default_factory=list)
    final_metric: float | None = None
    message: str = ""  # why the budget was not met ("" when it was)


def _record(history: list, log, it: int, name: str, channels: int, metric: float, latency: float, proposals: int,
            how: str) -> None:
    """One accepted iteration: a history row and a log line (``how`` the
    latency came: "estimate" or "measured")."""
    history.append({"iteration": it, "layer": name, "channels": channels, "metric": metric,
                    "estimated_latency": latency, "proposals": proposals})
    if log is not None:
        # (the layer by its quoted name: a Sequential's "6" read as a channel count, "6 -> 8 channels")
        log(f"iteration {it}: layer {name!r} cut to {channels} channels, metric {metric:.4f}, {how} "
            f"{latency * 1e3:.2f} ms")


def _finish(net, channels, target, l0, current, history, it, max_iterations, train_fn, eval_fn, long_steps, ft_lr,
            example_input, repeats, depth: int = 1) -> "NetAdaptResult":
    """The long fine-tuning, the final measurement and the result (``depth``:
    the calls from :func:`netadapt` to here, for the warning's line)."""
    message = _unmet(current, target, it, max_iterations, depth)
    call_train(train_fn, net, long_steps, ft_lr)
    measured = measure_latency(net, example_input, repeats)
    return NetAdaptResult(net, channels, target, l0, current, measured, history, metric_value(eval_fn(net)), message)


def netadapt(model: nn.Module, table: LatencyTable | None, train_fn: Callable, eval_fn: Callable, example_input,
             budget: float, initial_reduction: float = 0.1, decay: float = 0.96, short_steps: int = 50,
             long_steps: int = 300, lr: float | None = None, finetune_lr_factor: float = 0.1,
             max_iterations: int = 50, log: Callable[[str], None] | None = None,
             budget_seconds: float | None = None) -> NetAdaptResult:
    """Shrink a copy of ``model`` until the table's estimate is at most
    ``budget`` (a fraction in (0, 1] of the table's initial estimate L0;
    ``budget_seconds`` instead gives an absolute target). Each iteration asks for a drop of ``initial_reduction * L0 *
    decay^i``; proposals are fine-tuned ``short_steps``, the best kept; the
    result is fine-tuned ``long_steps`` and measured again.

    ``table=None`` adapts every coupled channel group of the dependency
    graph traced on ``example_input`` (residual and U-Net networks whole),
    each proposal's latency measured directly. When no proposal can lower
    the latency any further before the budget is met, the run stops with a
    ``RuntimeWarning`` that says so (also in ``NetAdaptResult.message``)."""
    if table is not None and not isinstance(table, LatencyTable):
        raise TypeError("table must be a LatencyTable (build_latency_table, or LatencyTable.load of a saved one) or "
                        f"None (latencies measured directly); got {type(table).__name__}")
    _check_netadapt(train_fn, eval_fn, budget, budget_seconds, initial_reduction, decay)
    short_steps, long_steps = check_int(short_steps, "short_steps", 0), check_int(long_steps, "long_steps", 0)
    max_iterations = check_int(max_iterations, "max_iterations", 1)
    check_lr(lr)
    check_real(finetune_lr_factor, "finetune_lr_factor", "a finite number > 0", lambda v: v > 0)
    if log is not None:  # (called after the first iteration's fine-tuning)
        check_callable(log, "log")
    ft_lr = None if lr is None else lr * finetune_lr_factor
    if table is None:
        return _netadapt_coupled(model, train_fn, eval_fn, example_input, budget, initial_reduction, decay,
                                 short_steps, long_steps, ft_lr, max_iterations, log, budget_seconds)
    net = copy_model(model)
    layout, _ = _channel_layout(net)
    named = dict(net.named_modules())
    channels = {n: out_channels(named[n]) for n, _, p in layout if p}
    for n, c in channels.items():
        if table.candidates.get(n, [None])[0] != c:
            raise ValueError(f"the table was not built for this model: layer {n!r} has {c} channels")
    l0 = current = table.latency(channels, layout)
    target = float(budget_seconds) if budget_seconds is not None else budget * l0
    history, it = [], 0
    while current > target and it < max_iterations:
        want = current - initial_reduction * l0 * decay**it
        proposals = _table_proposals(net, table, layout, channels, want, current,
                                     lambda cand: _short_tune(cand, train_fn, eval_fn, short_steps, ft_lr))
        if not proposals:
            break
        metric, name, choice, net = max(proposals, key=_by_metric)
        channels[name] = choice
        current = table.latency(channels, layout)
        _record(history, log, it, name, choice, metric, current, len(proposals), "estimate")
        it += 1
    return _finish(net, channels, target, l0, current, history, it, max_iterations, train_fn, eval_fn, long_steps,
                   ft_lr, example_input, table.repeats)


def _by_metric(proposal: tuple) -> tuple[bool, float]:
    """The rank of a proposal ``(metric, ...)``: by its metric, a NaN (a
    diverged short fine-tune) below every number (max() would keep a NaN
    that comes first: it compares false with everything)."""
    return not math.isnan(proposal[0]), proposal[0]


def _check_netadapt(train_fn, eval_fn, budget, budget_seconds, initial_reduction, decay) -> None:
    check_callable(train_fn, "train_fn")
    check_callable(eval_fn, "eval_fn")
    if budget_seconds is not None:
        check_real(budget_seconds, "budget_seconds")
    else:
        check_real(budget, "budget")
    check_real(initial_reduction, "initial_reduction")
    check_real(decay, "decay")
    if budget_seconds is not None:
        if not budget_seconds > 0:
            raise ValueError(f"budget_seconds must be > 0; got {budget_seconds}")
    elif not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction of the initial latency in (0, 1]; got {budget} "
                         "(use budget_seconds= for an absolute target)")
    if not 0 < initial_reduction < 1 or not 0 < decay <= 1:
        raise ValueError(f"initial_reduction must be in (0, 1) and decay in (0, 1]; got {initial_reduction}, {decay}")


def _short_tune(cand: nn.Module, train_fn, eval_fn, short_steps: int, ft_lr) -> float:
    """A proposal's short fine-tuning and its metric."""
    call_train(train_fn, cand, short_steps, ft_lr)
    return metric_value(eval_fn(cand))


def _table_proposals(net, table: LatencyTable, layout, channels: dict, want: float, current: float,
                     tune: Callable[[nn.Module], float]) -> list[tuple]:
    """``(metric, layer, count, candidate)`` per layer that can shrink: the
    largest count whose estimate meets ``want`` (else the count of the lowest
    estimate, the most the layer can give: on a measured table a narrower
    width need not estimate faster), if it lowers the estimate at all."""
    proposals = []
    for name in channels:
        below = [c for c in table.candidates[name] if c < channels[name]]
        if not below:
            continue
        estimate = {c: table.latency(dict(channels, **{name: c}), layout) for c in below}
        choice = next((c for c in below if estimate[c] <= want), min(below, key=estimate.get))
        if estimate[choice] >= current:
            continue
        cand = copy_model(net)
        prune_channels(cand, name, keep_by_l1(dict(cand.named_modules())[name], choice))
        proposals.append((tune(cand), name, choice, cand))
    return proposals


def _unmet(current: float, target: float, iterations: int, max_iterations: int, depth: int = 1) -> str:
    """The message (also a RuntimeWarning, at the line that called
    :func:`netadapt`, ``depth`` calls above :func:`_finish`) when the budget
    was missed."""
    if current <= target:
        return ""
    why = (f"max_iterations={max_iterations} reached" if iterations >= max_iterations
           else "no narrower width of any layer lowers the estimate further")
    message = (f"NetAdapt could not meet the latency budget: {current * 1e3:.3f} ms estimated against "
               f"{target * 1e3:.3f} ms; {why}")
    warnings.warn(message, RuntimeWarning, stacklevel=3 + depth)
    return message


def _shrunk(net: nn.Module, example_input, group: str, count: int) -> nn.Module:
    """A copy of ``net`` with group ``group`` cut to ``count`` channels (lowest magnitude removed)."""
    from .graph import DependencyGraph, plan
    cand = copy_model(net)
    graph = DependencyGraph(cand, example_input)
    graph.cut(plan(graph, {group: count / graph.group(group).size}, multiple=1), retrace=False)
    return cand


def _netadapt_coupled(model, train_fn, eval_fn, example_input, budget, initial_reduction, decay, short_steps,
                      long_steps, ft_lr, max_iterations, log, budget_seconds, repeats: int = 5) -> NetAdaptResult:
    from .graph import DependencyGraph
    net = copy_model(model)
    channels = {g.name: g.size for g in DependencyGraph(net, example_input).groups}
    if not channels:
        raise ValueError("model has no coupled channel group that can be cut")
    candidates = {n: candidate_counts(c) for n, c in channels.items()}
    l0 = current = measure_latency(net, example_input, repeats)
    target = float(budget_seconds) if budget_seconds is not None else budget * l0
    history, it = [], 0
    while current > target and it < max_iterations:
        want = current - initial_reduction * l0 * decay**it
        proposals = []
        for name in channels:
            for count in (c for c in candidates[name] if c < channels[name]):
                cand = _shrunk(net, example_input, name, count)
                latency = measure_latency(cand, example_input, repeats)
                if latency <= want:
                    break
            else:
                if not any(c < channels[name] for c in candidates[name]) or latency >= current:
                    continue
            proposals.append((_short_tune(cand, train_fn, eval_fn, short_steps, ft_lr), name, count, latency, cand))
        if not proposals:
            break
        metric, name, count, current, net = max(proposals, key=_by_metric)
        channels[name] = count
        _record(history, log, it, name, count, metric, current, len(proposals), "measured")
        it += 1
    return _finish(net, channels, target, l0, current, history, it, max_iterations, train_fn, eval_fn, long_steps,
                   ft_lr, example_input, repeats, depth=2)
