"""Channel surgery: physically remove output channels of a layer, with the
matching BatchNorm entries and input channels of the layers that consume them,
so that a pruned network is really smaller and faster.

Works on ``torch.nn.Linear`` / ``Conv1d/2d/3d`` (groups 1), torch BatchNorm,
``pointsparse.nn.Conv3d`` (weight ``(K, C_in, C_out)``: output channels on
axis 2, input channels on axis 1) and ``pointsparse.nn.BatchNorm``.

:func:`channel_groups` finds, in a chain (a ``Sequential``, possibly nested,
of layers, norms, activations, pooling and ``Flatten``), which BatchNorms and
which consumer follow each producer; :func:`prune_channels` cuts one group;
:func:`apply_channel_ratios` cuts many, ranking channels by the L1 norm of
their weights, optionally refitting each consumer by least squares so that it
reproduces the unpruned network's outputs on calibration data (AMC, He et al.
2018, after He et al. 2017).

Pruning already on the layers stays: a mask (``weight_orig`` +
``weight_mask``, of ``torch.nn.utils.prune`` or of this package's methods)
and a filter skeleton are narrowed along the cut axis, as
:meth:`~pointsparse.prune.graph.DependencyGraph.cut` narrows them, and a
refitted consumer keeps its mask: its least squares are solved over its
unmasked weights only (a filter skeleton on it is folded into its weight
first: the refit sets the weights the scales multiplied).

Given an ``example_input``, :func:`channel_groups` and
:func:`apply_channel_ratios` work on the coupled groups of the dependency
graph (:mod:`pointsparse.prune.graph`) instead: every layer of residual and
U-Net networks, not only the insides of their sequential chains.

Every cut replaces the sliced tensors with new ``Parameter`` objects: an
optimizer built before it (its momentum, a scheduler on it) still holds the
old ones and no longer trains the model, without an error; build the
optimizer after the cut."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..tensor import as_bool, as_int
from . import _compat, adapters
from .._modes import evaluating, run_model
from .adapters import in_channel_dim, is_layer, out_channel_dim, out_channels
from ._copyable import keep_copyable
from ._trace import feats_of
from .graph import CoupledGroup, _check_keep, _effective, _nearest, _slice, check_not_compressed, shared_tensors
from .procedure import check_fraction


@dataclass
class ChannelGroup:
    """A producer layer, the BatchNorms on its output, and the layer that
    consumes it. ``repeat`` is how many consumer inputs each producer channel
    feeds (a ``Flatten`` of ``C x H x W`` maps each channel to ``H*W``
    consecutive inputs); ``offset`` is where the producer's channels start in
    the consumer's input (after a concatenation)."""

    producer: str
    norms: list[str] = field(default_factory=list)
    consumer: str | None = None
    offset: int = 0
    repeat: int = 1


def _has_prunable(m: nn.Module) -> bool:
    return any(is_layer(d) for d in m.modules())


def _is_wrapper(m: nn.Module) -> bool:
    """A module that only wraps one prunable layer (``pointsparse.nn.Linear``).
    Not a learned ``VoxelPrune``: its one layer (the scorer) reads the feats
    aside and the feats go on unchanged, so it is a barrier."""
    from ..nn import VoxelPrune

    children = list(m.children())
    return (not is_layer(m) and not isinstance(m, VoxelPrune) and len(children) == 1 and is_layer(children[0])
            and not any(True for _ in m.parameters(recurse=False)))


#: Parameter-free torch modules that mix the channels (a softmax over them, a shuffle, a norm across them
#: without affine parameters: the cut of a channel changes the others) or hold their count (an Unflatten's
#: sizes): a chain stops there (a barrier).
_MIXES_CHANNELS = tuple(getattr(nn, n) for n in (
    "Softmax", "Softmin", "LogSoftmax", "Softmax2d", "ChannelShuffle", "GroupNorm", "LayerNorm", "RMSNorm",
    "LocalResponseNorm", "CrossMapLRN2d", "Unflatten") if hasattr(nn, n))


def _passes_through(m: nn.Module) -> bool:
    """Parameter-free and without prunable layers: activations, pooling,
    dropout, reshapes act on each channel alone (or keep channel blocks).
    Not a module with buffers (a compressed layer's weights, fixed per-channel
    statistics: tensors of the channels a cut would leave whole), nor the
    torch modules that mix channels (softmax, channel shuffle, a group /
    layer / local response norm without affine parameters) or hold their
    count (Unflatten)."""
    return (not any(True for _ in m.parameters()) and not any(True for _ in m.buffers()) and not _has_prunable(m)
            and not any(isinstance(d, _MIXES_CHANNELS) for d in m.modules()))


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _flatten_sequential(seq: nn.Sequential, prefix: str, chain: list, chains: list, seen: set) -> None:
    for name, child in seq._modules.items():  # (a module listed twice runs twice: named_children skips repeats)
        if child is None:
            continue
        full = _join(prefix, name)
        if is_layer(child):
            chain.append((full, child, "layer"))
        elif _is_wrapper(child):
            inner_name, inner = next(child.named_children())
            chain.append((_join(full, inner_name), inner, "layer"))
        elif adapters.is_norm(child):
            chain.append((full, child, "norm"))
        elif isinstance(child, nn.Sequential):
            _flatten_sequential(child, full, chain, chains, seen)
        elif _passes_through(child):
            chain.append((full, child, "pass"))
        else:  # a block with its own wiring (residual add, concatenation) or other parameters
            chain.append((full, child, "barrier"))
            _analyse(child, full, chains, seen)


def _analyse(module: nn.Module, prefix: str, chains: list, seen: set) -> None:
    if id(module) in seen:  # (a block used twice: its insides are one set of layers, its chains listed once)
        return
    seen.add(id(module))
    if isinstance(module, nn.Sequential):
        chain: list = []
        _flatten_sequential(module, prefix, chain, chains, seen)
        chains.append(chain)
        return
    for name, child in module.named_children():
        if is_layer(child) or _is_wrapper(child) or not _has_prunable(child):
            continue  # a lone layer outside any Sequential: its consumers are unknown
        _analyse(child, _join(prefix, name), chains, seen)


def chains(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """The sequential chains of ``model``: every ``nn.Sequential`` (nested
    ones flattened into their parent) as a list of ``(name, module, kind)``
    with kind ``layer`` (prunable), ``norm`` (BatchNorm), ``pass``
    (parameter-free) or ``barrier`` (a block with its own wiring, analysed on
    its own). Only inside a chain is it known who consumes a layer's output:
    a Sequential's intermediate outputs reach only its next element."""
    out: list = []
    _analyse(model, "", out, set())
    return out


def chain_followers(model: nn.Module) -> dict[str, list[nn.Module]]:
    """For each prunable layer in a chain, the norms and parameter-free
    modules after it up to the next layer, barrier or the chain's end."""
    out: dict[str, list[nn.Module]] = {}
    for chain in chains(model):
        current = None
        for name, m, kind in chain:
            if kind == "layer":
                current = name
                out[name] = []
            elif kind == "barrier":
                current = None
            elif current is not None:
                out[current].append(m)
    return out


def channel_groups(model: nn.Module, example_input=None) -> list:
    """With ``example_input``: every coupled channel group of ``model``, from
    the dependency graph traced on it (:class:`~pointsparse.prune.graph.
    CoupledGroup`: residual streams, concatenation slices, strided and
    transposed convs, classifiers' inputs all included), each of which
    :func:`prune_channels` cuts.

    Without it, the chain groups of ``model``: inside each sequential chain, a
    prunable layer with the BatchNorms after it and the next prunable layer
    that consumes it. A chain's last layer (the output of a Sequential, which
    may feed a residual add, a concatenation or the network's output) forms no
    group, nor does a layer followed by a block with its own wiring. So
    plain chains give every layer but the last, and residual U-Nets such as
    MinkUNet give the channels inside their blocks. Nor does a group with a
    layer or norm that the chains list twice (one module run at two places:
    its input is its own output), whose weight another module holds too
    (tied layers), that its adapter cannot cut (a grouped conv) or whose
    producer carries its channels on its last axis (a Linear) and feeds
    more inputs than it has channels (a Flatten of ``(T, C)``: each channel
    at every ``C``-th input, no run of ``repeat``): their channels are
    fixed, as the dependency graph fixes them. Raises
    ValueError when a consumer's input size does not fit its producer's
    channels."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if example_input is not None:
        from .graph import DependencyGraph
        return DependencyGraph(model, example_input).groups
    return [g for g, why in _chain_groups(model) if why is None]


def _chain_groups(model: nn.Module) -> list[tuple[ChannelGroup, str | None]]:
    """Every chain group of ``model`` with the reason its channels are fixed
    (None: it can be cut); a model compressed whole is a ValueError
    (:func:`~pointsparse.prune.graph.check_not_compressed`), as the graph
    refuses it, for every chain entry (groups, a cut, ratios)."""
    check_not_compressed(model)
    found = chains(model)
    places: dict[int, list[str]] = {}
    for chain in found:
        for name, m, kind in chain:
            if kind in ("layer", "norm"):
                places.setdefault(id(m), []).append(name)
    fixed = {}
    for names in places.values():
        if len(names) > 1:
            listed = ", ".join(map(repr, names[:-1])) + f" and {names[-1]!r}"
            why = (f"{listed} are one module, called {'twice' if len(names) == 2 else f'{len(names)} times'}: "
                   "a cut would shrink an input that another of its calls feeds at full width")
            fixed.update(dict.fromkeys(names, why))
    by_id = {id(model.get_submodule(n)): why for n, why in shared_tensors(model).items()}
    groups: list[tuple[ChannelGroup, str | None]] = []
    for chain in found:
        current: ChannelGroup | None = None
        current_module = None
        for name, m, kind in chain:
            if kind == "layer":
                # (a grouped conv: its weight holds C_in / groups; a parametrization the cut cannot assign to)
                unsupported = adapters.cut_refusal(m)
                if unsupported is not None:
                    fixed.setdefault(name, f"{name}: {unsupported}")
                if current is not None:
                    c_out = out_channels(current_module)
                    c_in = m.weight.shape[in_channel_dim(m)]
                    if c_in % c_out and unsupported is None:
                        raise ValueError(f"{name!r} takes {c_in} inputs, not a multiple of the {c_out} channels of "
                                         f"{current.producer!r}: not a chain this function can cut")
                    current.consumer = name
                    current.repeat = max(1, c_in // c_out)
                    members = [current.producer, *current.norms, current.consumer]
                    reasons = [fixed.get(n) or by_id.get(id(model.get_submodule(n))) for n in members]
                    if current.repeat > 1 and adapters.adapter_for(current_module).channels_last:
                        # (a Linear on (B, T, C) flattened: input t * C + c is channel c's, no run of T inputs)
                        reasons.append(
                            f"{current.producer}: a {type(current_module).__name__} carries its channels on its last "
                            f"axis, so the {c_in} inputs of {name!r} hold each of its {c_out} channels at every "
                            f"{c_out}th input (a Flatten of its other axes), not in a run of {current.repeat} as a "
                            "chain cuts them; give example_input (the dependency graph)")
                    groups.append((current, next((r for r in reasons if r is not None), None)))
                current, current_module = ChannelGroup(producer=name), m
            elif kind == "norm" and current is not None:
                current.norms.append(name)
                why = adapters.cut_refusal(m)  # (a parametrization the cut cannot assign to)
                if why is not None:
                    fixed.setdefault(name, f"{name}: {why}")
            elif kind == "barrier":
                current = current_module = None
    return groups


def _check_not_fixed(found: list[tuple[ChannelGroup, str | None]], names) -> None:
    """ValueError naming the first of the producers ``names`` whose chain
    group (in ``found``, :func:`_chain_groups`' answer) is fixed, and why."""
    fixed = {g.producer: why for g, why in found if why is not None}
    for name in names:
        if name in fixed:
            raise ValueError(f"{name!r} cannot be cut (its channels are fixed): {fixed[name]}")


def _unprune(module: nn.Module) -> None:
    """Make ``module``'s pruning permanent, an attached filter skeleton folded
    into the weight first (its hook reads ``weight_orig``, which ``remove``
    deletes: the next forward failed)."""
    from .stripe import FilterSkeleton, detach_filter_skeleton  # noqa: PLC0415 - stripe imports the package

    for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, FilterSkeleton)]:
        detach_filter_skeleton(module, hook.name, fold=True)
    for pname in ("weight", "bias"):
        if hasattr(module, pname + "_orig"):
            _compat.remove(module, pname)


def remove_output_channels(module: nn.Module, keep) -> None:
    """Keep only output channels ``keep`` of a Linear / torch conv /
    ``pointsparse.nn.Conv3d`` (weight and bias, their masks and filter
    skeleton too)."""
    if not is_layer(module):
        raise TypeError(f"expected a Linear, torch conv or pointsparse.nn.Conv3d; got {type(module).__name__}")
    if getattr(module, "groups", 1) != 1:
        raise ValueError("grouped convolutions are not supported")
    keep = _check_keep(keep, out_channels(module), type(module).__name__)
    _slice(module, "weight", out_channel_dim(module), keep)
    _slice(module, "bias", 0, keep)
    _set_channels(module, out=len(keep))


def remove_input_channels(module: nn.Module, keep, offset: int = 0, repeat: int = 1,
                          channels: int | None = None) -> None:
    """Keep only the inputs of ``module`` fed by producer channels ``keep``:
    producer channel ``c`` feeds inputs ``offset + c*repeat`` to
    ``offset + (c+1)*repeat - 1``; the producer has ``channels`` channels
    (default: all inputs from ``offset`` on); inputs outside its span stay.
    The weight's mask and filter skeleton are narrowed with it."""
    if not is_layer(module):
        raise TypeError(f"expected a Linear, torch conv or pointsparse.nn.Conv3d; got {type(module).__name__}")
    if getattr(module, "groups", 1) != 1:
        raise ValueError("grouped convolutions are not supported")
    offset, repeat = as_int(offset, "offset"), as_int(repeat, "repeat")
    dim = in_channel_dim(module)
    n_in = module.weight.shape[dim]
    if channels is None:
        channels = (n_in - offset) // repeat if repeat >= 1 else 0
    channels = as_int(channels, "channels")
    end = offset + channels * repeat
    if offset < 0 or repeat < 1 or channels < 1 or end > n_in:
        raise ValueError(f"producer span offset={offset}, repeat={repeat}, channels={channels} does not fit the "
                         f"{n_in} inputs of {type(module).__name__}")
    keep = _check_keep(keep, channels, f"the inputs of {type(module).__name__}")
    rows = (keep[:, None] * repeat + torch.arange(repeat)[None, :]).flatten() + offset
    index = torch.cat([torch.arange(0, offset), rows, torch.arange(end, n_in)]).long()
    _slice(module, "weight", dim, index)
    _set_channels(module, inp=len(index))


def remove_norm_channels(norm: nn.Module, keep) -> None:
    """Keep entries ``keep`` of a BatchNorm (affine parameters and running
    statistics, and the masks of pruned scales or shifts; any norm with a
    registered adapter)."""
    adapter = adapters.adapter_for(norm)
    if adapter is None or adapter.kind != "norm":
        raise TypeError(f"expected a BatchNorm; got {type(norm).__name__}")
    keep = _check_keep(keep, adapter.channels(norm, "out"), type(norm).__name__)
    for name, axes in adapter.axes(norm).items():
        if getattr(norm, name, None) is not None:
            _slice(norm, name, axes["out"], keep)
    adapter.set_channels(norm, "out", len(keep))


def _set_channels(module: nn.Module, out: int | None = None, inp: int | None = None) -> None:
    adapter = adapters.adapter_for(module)
    for role, n in (("out", out), ("in", inp)):
        if n is not None:
            adapter.set_channels(module, role, n)


def prune_channels(model: nn.Module, group: ChannelGroup | CoupledGroup | str, keep) -> None:
    """Remove every output channel of the group's producer not in ``keep``,
    with its BatchNorm entries and the consumer's matching inputs. A
    :class:`~pointsparse.prune.graph.CoupledGroup` (what
    :func:`channel_groups` gives with an ``example_input``) is cut by its
    dependency graph, every member at once, and the graph traced again: a
    group of the same call that this cut left as it was is still taken, a
    changed one is a ValueError (take the groups again). The cut layers
    hold new ``Parameter`` objects: build the optimizer after the cut."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(group, CoupledGroup):
        return _cut_coupled(model, group, keep)
    if not isinstance(group, (ChannelGroup, str)):
        raise TypeError(f"group must be a ChannelGroup, a CoupledGroup or a producer's name; got "
                        f"{type(group).__name__}")
    found = _chain_groups(model)
    _check_not_fixed(found, [group if isinstance(group, str) else group.producer])
    if isinstance(group, str):
        match = [g for g, why in found if why is None and g.producer == group]
        if not match:
            raise ValueError(f"{group!r} is not a producer layer with a consumer in this chain")
        group = match[0]
    _cut(model, group, keep, chained=group in [g for g, why in found if why is None])


def _cut_coupled(model: nn.Module, group: CoupledGroup, keep) -> None:
    """:func:`prune_channels` of a CoupledGroup: ``graph.cut`` of its graph's
    group as it is now, checked to be this one's."""
    graph = group.graph
    if graph is None:
        raise ValueError(f"group {group.name!r} has no dependency graph (a CoupledGroup made by hand): cut the groups "
                         "channel_groups(model, example_input) gives")
    if graph.model is not model:
        raise ValueError(f"group {group.name!r} is a group of another model: cut this model's groups, "
                         "channel_groups(model, example_input)")
    same = [g for g in graph.all_groups if g is group or (g.name, g.size, g.members, g.fixed)
            == (group.name, group.size, group.members, group.fixed)]
    if not same:
        raise ValueError(f"group {group.name!r} has changed since channel_groups gave it (a cut since traced the "
                         "graph again and this group's channels are no longer those): take the groups again, "
                         "channel_groups(model, example_input)")
    graph.cut({same[0]: keep})


def _member_layer(named: dict, name: str, role: str, side: str) -> nn.Module:
    """The group's ``role`` (producer / consumer) ``name`` of ``named``,
    checked to be an ungrouped layer with ``side`` channels to cut."""
    module = named[name]
    if not is_layer(module):
        raise ValueError(f"group {role} {name!r} is a {type(module).__name__}, not a layer with {side} channels "
                         "(a Linear, torch conv or pointsparse.nn.Conv3d)")
    if getattr(module, "groups", 1) != 1:
        raise ValueError(f"group {role} {name!r}: grouped convolutions are not supported")
    return module


def _check_group(model: nn.Module, group: ChannelGroup, keep,
                 chained: bool = False) -> tuple[dict[str, nn.Module], torch.Tensor]:
    """The modules of ``group`` by name and ``keep`` checked, every member
    before anything is cut (a group made by hand or for another model): a
    ValueError names the member that is no layer / norm of ``model``, whose
    width does not fit the producer's or, unless ``chained`` (a free group of
    :func:`_chain_groups`, which holds no tie), that shares a tensor."""
    if not isinstance(group.norms, (list, tuple)) or not all(isinstance(n, str) for n in group.norms):
        raise TypeError(f"group norms must be a list of module names; got {group.norms!r}")
    named = dict(model.named_modules())
    missing = [n for n in (group.producer, *group.norms, group.consumer) if n is not None and n not in named]
    if missing:
        raise ValueError(f"group names {missing}, not modules of this model")
    shared = {} if chained else shared_tensors(model)  # (a tied member's cut slices its own copy alone)
    for n in (group.producer, *group.norms, group.consumer):
        if n in shared:
            raise ValueError(f"{n!r} cannot be cut (its channels are fixed): {shared[n]}")
    producer = _member_layer(named, group.producer, "producer", "output")
    channels = out_channels(producer)
    for n in group.norms:
        norm = named[n]
        if not adapters.is_norm(norm):
            raise ValueError(f"group norm {n!r} is a {type(norm).__name__}, not a norm (a BatchNorm)")
        width = adapters.adapter_for(norm).channels(norm, "out")
        if width != channels:
            raise ValueError(f"group norm {n!r} has {width} channels; its producer {group.producer!r} has "
                             f"{channels}")
    if len(set(group.norms)) != len(group.norms):
        twice = next(n for n in group.norms if group.norms.count(n) > 1)
        raise ValueError(f"group names norm {twice!r} twice (it would be cut twice)")
    if group.consumer is not None:
        consumer = _member_layer(named, group.consumer, "consumer", "input")
        offset, repeat = as_int(group.offset, "group offset"), as_int(group.repeat, "group repeat")
        n_in = consumer.weight.shape[in_channel_dim(consumer)]
        if offset < 0 or repeat < 1 or offset + channels * repeat > n_in:
            raise ValueError(f"group consumer {group.consumer!r} has {n_in} inputs: the {channels} channels of "
                             f"{group.producer!r} at offset={offset}, repeat={repeat} do not fit them")
    return named, _check_keep(keep, channels, group.producer)


def _cut(model: nn.Module, group: ChannelGroup, keep, chained: bool = False) -> None:
    """:func:`prune_channels` of a group already checked not to be fixed;
    every member is checked before any is cut (``chained``: see
    :func:`_check_group`)."""
    named, keep = _check_group(model, group, keep, chained)
    producer = named[group.producer]
    channels = out_channels(producer)
    remove_output_channels(producer, keep)
    for n in group.norms:
        remove_norm_channels(named[n], keep)
    if group.consumer is not None:
        remove_input_channels(named[group.consumer], keep, group.offset, group.repeat, channels)


def channel_l1(module: nn.Module) -> torch.Tensor:
    """L1 norm of each output channel's weights (the ranking criterion; a
    ``kernel_region`` conv's inside its region: its adapter's ``used_weights``;
    a masked weight's ``weight_orig * weight_mask``, times a filter skeleton),
    in float32 at least: a float16 channel sum overflows past 65504 (every
    channel inf, a tie) and a bfloat16 one keeps 8 significant bits."""
    dim = out_channel_dim(module)  # (first: a TypeError naming a module without a weight)
    # (masked: weight_orig * mask now, never the product cached by the last forward)
    w = adapters.used_weights(module, _effective(module, "weight").detach())
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    return w.abs().transpose(0, dim).reshape(w.shape[dim], -1).sum(1)


def keep_by_l1(module: nn.Module, num_keep: int) -> torch.Tensor:
    """Indices of the ``num_keep`` output channels of largest L1 norm, sorted."""
    n = out_channels(module)
    try:
        num_keep = as_int(num_keep, "num_keep")
    except TypeError:
        raise TypeError(f"num_keep must be an int in [1, {n}]; got {num_keep!r}") from None
    if not 1 <= num_keep <= n:
        raise ValueError(f"num_keep must be an int in [1, {n}]; got {num_keep}")
    return torch.sort(torch.topk(channel_l1(module), num_keep).indices).values


def kept_count(channels: int, ratio: float) -> int:
    """Channels left after removing a fraction ``ratio`` (at least one),
    rounded as :func:`pointsparse.prune.graph.kept_count` rounds a coupled
    group's (a tie keeps the larger count), so that a chain and the coupled
    group of the same producer keep as many channels. ``channels`` an int
    >= 1, ``ratio`` in [0, 1] (a ValueError / TypeError naming it: -1 kept
    twice the channels, nan raised int()'s error)."""
    if isinstance(channels, bool):
        raise TypeError(f"channels must be an int >= 1; got {channels!r}")
    if as_int(channels, "channels") < 1:
        raise ValueError(f"channels must be an int >= 1; got {channels!r}")
    ratio = check_fraction(ratio, "ratio", high_open=False)
    # (Python's round, half to even, kept 2 of 5 channels at 0.5 where the coupled path keeps 3)
    return max(1, _nearest(int(channels) * (1.0 - ratio)))


# ----------------------------------------------------------------- least squares
def _refittable(module: nn.Module, name: str | None = None):
    """``module``'s adapter, with the least squares' ``columns`` and
    ``set_from_2d``; a TypeError naming its type when it has none, a
    ValueError naming ``name`` for a conv that runs a ReLU (and a residual
    sum) in its store (``nn.fuse_for_inference``): its output is no linear
    function of its weight, which the least squares fit."""
    adapter = adapters.adapter_for(module)
    if adapter is None or adapter.columns is None or adapter.set_from_2d is None:
        raise TypeError(f"least-squares reconstruction does not support {type(module).__name__}")
    if getattr(module, "relu", False) is True:
        raise ValueError(f"least-squares reconstruction: the consumer {name or type(module).__name__!r} runs its ReLU "
                         "(and a residual block's sum) in its store (nn.fuse_for_inference), so its output is no "
                         "linear function of its weight to fit; cut and reconstruct the model before fusing it")
    return adapter


def capture(model: nn.Module, modules: list[nn.Module], example) -> list[tuple]:
    """(input, output) of the first call of each of ``modules`` in one
    forward pass of ``model`` on ``example`` (a tuple: the forward's
    arguments) in eval mode (no BatchNorm statistics change); the mode is
    restored. ValueError naming a module the pass did not call."""
    store: dict[int, tuple] = {}

    def hook_for(i: int):
        def hook(module, inputs, output) -> None:  # None: the output stays as it is
            store.setdefault(i, (inputs[0], output))
        return hook

    handles = [m.register_forward_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        with evaluating(model), torch.no_grad():
            run_model(model, example)
    finally:
        for h in handles:
            h.remove()
    missing = [type(modules[i]).__name__ for i in range(len(modules)) if i not in store]
    if missing:
        raise ValueError(f"the forward pass on the example input did not call {missing}")
    return [store[i] for i in range(len(modules))]


def _fit_consumer(module, x, target, ridge: float = 1e-6) -> None:
    """Refit ``module``'s weight by (ridge) least squares so that it maps
    ``x`` to ``target``; a masked weight over its unmasked entries only (each
    output its own support; the mask stays, ``weight_orig`` takes the fit)."""
    from .stripe import _find as _skeleton_of, detach_filter_skeleton  # noqa: PLC0415 - stripe imports the package

    adapter = _refittable(module)
    rows, y = adapter.columns(module, x, target)  # (im2col rows, targets: rows @ W2d = y, W2d (fan_in, C_out))
    bias = getattr(module, "bias", None)
    if bias is not None:
        y = y - bias.detach()
    rows, y = rows.double(), y.double()
    gram, rhs = rows.t() @ rows, rows.t() @ y
    if _skeleton_of(module, "weight") is not None:  # (the refit sets the weights its scales multiplied)
        detach_filter_skeleton(module, "weight", fold=True)
    mask = adapters.mask(module, "weight")
    if mask is None:
        adapter.set_from_2d(module, _ridge_solve(gram, rhs, ridge).to(module.weight.dtype))
        return
    support = _mask_2d(module, mask, *rhs.shape)
    sol = torch.zeros_like(rhs)
    patterns, which = torch.unique(support.t(), dim=0, return_inverse=True)
    for p, pattern in enumerate(patterns):  # (outputs with one support solve together: structured masks)
        inputs, outputs = pattern.nonzero().flatten(), (which == p).nonzero().flatten()
        if len(inputs):
            sol[inputs[:, None], outputs] = _ridge_solve(gram[inputs][:, inputs], rhs[inputs][:, outputs], ridge)
    _set_masked_from_2d(module, sol)


def _ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    gram = gram + ridge * gram.diagonal().mean().clamp_min(1e-12) * eye
    return torch.linalg.solve(gram, rhs)


def _mask_2d(module: nn.Module, mask: torch.Tensor, fan_in: int, c_out: int) -> torch.Tensor:
    """``mask`` (of the weight) as a bool ``(fan_in, C_out)`` matrix in the
    order of the adapter's ``columns``: its ``set_from_2d`` places the
    numbers 1.. on a zero weight, and each entry reads the mask where its
    number lands (an entry placed nowhere stays False)."""
    saved = module.weight
    try:
        module.weight = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device)
        numbers = torch.arange(1, fan_in * c_out + 1, dtype=torch.float64, device=mask.device)
        adapters.adapter_for(module).set_from_2d(module, numbers.reshape(fan_in, c_out))
        placed = module.weight.detach()
    finally:
        module.weight = saved
    out = torch.zeros(fan_in * c_out, dtype=torch.bool, device=mask.device)
    hit = placed > 0
    out[placed[hit].long() - 1] = mask[hit].bool()
    return out.reshape(fan_in, c_out).cpu()


def _set_masked_from_2d(module: nn.Module, w2d: torch.Tensor) -> None:
    """The adapter's ``set_from_2d`` on a masked weight: written into
    ``weight_orig`` (entries it does not set keep their value), the mask kept."""
    orig = module._parameters["weight_orig"]
    module.weight = orig.detach().clone()
    adapters.adapter_for(module).set_from_2d(module, w2d.to(orig.dtype))
    with torch.no_grad():
        orig.copy_(module.weight)
    module.weight = (orig * module.weight_mask).detach()  # (as the pruning's pre-hook computes it, detached)
    keep_copyable(module)


def apply_channel_ratios(model: nn.Module, ratios: dict[str, float], reconstruct: bool = False,
                         calibration_input=None, example_input=None, multiple: int = 1,
                         scores: dict | None = None) -> dict[str, int]:
    """Remove a fraction ``ratios[producer]`` of each named producer's output
    channels (lowest L1 norm first), in place. With ``reconstruct=True`` each
    consumer is refitted by least squares on ``calibration_input`` so that it
    reproduces the outputs it had before any pruning (its inputs taken from
    the already-pruned network). Returns the channels kept per producer.

    With ``example_input`` the names are coupled groups of the dependency
    graph (:func:`channel_groups` with the same input), every member of a
    group is cut together, channels are ranked by the group's summed
    magnitude (or ``scores`` from :mod:`.criteria`) and kept counts are
    rounded to ``multiple``. The cut layers hold new ``Parameter`` objects:
    build the optimizer after the cut."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must be a dict {{producer or group: ratio}}; got {type(ratios).__name__}")
    ratios = {name: _check_ratio(r, name) for name, r in ratios.items()}
    reconstruct = as_bool(reconstruct, "reconstruct")
    if example_input is not None:
        return _apply_coupled_ratios(model, ratios, reconstruct, example_input, multiple, scores)
    if multiple != 1 or scores is not None:  # the chain groups rank by L1 and keep exact counts
        raise ValueError("multiple and scores work on coupled groups only (give example_input)")
    found = _chain_groups(model)  # (once: each cut below keeps every group's fixed reason as it is)
    _check_not_fixed(found, ratios)
    groups = {g.producer: g for g, why in found if why is None}
    for name in ratios:
        if name not in groups:
            raise ValueError(f"{name!r} is not a prunable producer; producers: {list(groups)}")
    if reconstruct and calibration_input is None:
        raise ValueError("reconstruct=True needs calibration_input")
    named = dict(model.named_modules())
    if reconstruct:  # (before any cut: refused halfway, the model was left cut and not refitted)
        for name in ratios:
            _refittable(named[groups[name].consumer], groups[name].consumer)
    targets = {}
    if reconstruct:
        names = list(ratios)
        captured = capture(model, [named[groups[n].consumer] for n in names], calibration_input)
        for n, pair in zip(names, captured):  # (the least squares would fill the consumer with NaN)
            if not all(bool(torch.isfinite(feats_of(t)).all()) for t in pair):
                raise ValueError(f"calibration_input gives non-finite values (NaN or inf) at the input or output of "
                                 f"{groups[n].consumer!r}, the layer refitted for {n!r}: give finite calibration data")
        targets = {n: y for n, (_, y) in zip(names, captured)}
    kept = {}
    for name, g in groups.items():  # in network order
        if name not in ratios:
            continue
        producer = named[name]
        n_keep = kept_count(out_channels(producer), float(ratios[name]))
        kept[name] = n_keep
        if n_keep == out_channels(producer):
            continue
        _cut(model, g, keep_by_l1(producer, n_keep), chained=True)
        if reconstruct:
            consumer = named[g.consumer]
            (x, _), = capture(model, [consumer], calibration_input)
            _fit_consumer(consumer, x, targets[name])
    return kept


def _check_ratio(r, name) -> float:
    """A fraction of channels to remove, in [0, 1): a real number or a 0-d tensor."""
    if isinstance(r, torch.Tensor) and r.dim() == 0 and not r.dtype.is_complex and r.dtype != torch.bool:
        r = r.item()
    return check_fraction(r, f"ratio for {name!r}")


def _apply_coupled_ratios(model, ratios, reconstruct, example_input, multiple, scores) -> dict[str, int]:
    from .graph import DependencyGraph, plan
    if reconstruct:
        raise ValueError("reconstruct=True works on chain groups only (call without example_input)")
    graph = DependencyGraph(model, example_input)
    for name in ratios:
        graph.group(name)
    keep = plan(graph, {n: 1.0 - r for n, r in ratios.items()}, scores, multiple=multiple)
    graph.cut(keep, retrace=False)
    return {n: len(k) for n, k in keep.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
