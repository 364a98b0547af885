"""The dependency graph of a network's channels, from one traced forward pass,
and the cut of coupled channel groups.

``DependencyGraph(model, example_input)`` runs ``model`` once (eval mode, no
gradients) while :mod:`._trace` follows every tensor's channels: through the
layers that have an adapter (:mod:`.adapters`: sparse and torch convolutions,
Linear, BatchNorm, your own), channel-wise ops (activations, dropout,
pooling, row gathers, devoxelisation), concatenations (each input's slice)
and element-wise sums (residual additions couple their operands). The result
is a list of :class:`CoupledGroup`: each is a set of channels that every
member (a ``(module, role, slice)``: the output or input channels of a layer,
the entries of a norm) must lose together. A layer whose weight another
module holds too (tied layers) or that code outside the layer computes with
(``y @ layer.weight.t()``) has its channels fixed: its cut would slice its
own copy alone. No rule is written for any model:
MinkUNet, SPVCNN, residual encoders and torch CNNs go through the same code.

Cutting (:meth:`DependencyGraph.cut`) slices every member's parameters,
buffers and masks at once; masking (:meth:`DependencyGraph.mask`) zeroes the
same channels with ``custom_from_mask`` on the producers, their norms'
affine parameters *and* the consumers' weights at those inputs, so a masked
channel is exactly 0 after its BatchNorm in train and eval mode alike, reaches
no layer whatever an op between makes of a zero (a sigmoid, ``x + 1``), and
the cut of masked channels is exact. A cut gives the sliced layers and norms
new ``Parameter`` objects: an optimizer (and its state, a scheduler on it)
built before the cut still holds the old, uncut ones and no longer trains
the model, without a word; build the optimizer after the cut.
:meth:`DependencyGraph.remove_masked` turns a model masked otherwise (e.g. by
``ChannelStructured`` on the convolutions only) into a smaller one: the
constant that a BatchNorm shift sends through a masked channel is folded into
the bias of a consumer that is linear per site (Linear, 1x1 conv); a sparse
conv with a kernel larger than one site sees that constant at a varying number
of active neighbours, so its output is no constant and it is refused.

The graph is what one forward pass did: Python control flow that reads a
width (``if f.shape[1] == 16``, an assert on a channel count) is not seen,
so a cut model may take another branch than the traced one, without a
word. Compare a cut model's output with the masked model's on an input
(the masked model computes what the cut one must) where the forward
branches on shapes."""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass

import torch
from torch import nn

from . import _compat, adapters
from ._copyable import copy_model, keep_copyable
from .._modes import evaluating, run_model
from ._trace import Segment, Spaces, Tag, Tracer, feats_of, feature_axis
from ..tensor import as_bool, as_int, positive_int
from .procedure import check_fraction


@dataclass(frozen=True)
class Member:
    """Positions ``start .. stop`` of ``module``'s ``role`` axis (``"out"``,
    ``"in"``) hold channels ``offset ..`` of the group, each ``repeat`` times."""

    module: str
    role: str
    start: int
    stop: int
    offset: int
    repeat: int = 1

    @property
    def length(self) -> int:
        return (self.stop - self.start) // self.repeat

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """Positions on the module's axis of group ``channels`` (those this member covers)."""
        inside = channels[(channels >= self.offset) & (channels < self.offset + self.length)]
        base = self.start + (inside - self.offset) * self.repeat
        return (base[:, None] + torch.arange(self.repeat)[None, :]).flatten()


@dataclass(eq=False)
class CoupledGroup:
    """Channels ``0 .. size`` that every member loses together; ``name`` is the
    first layer producing them; ``fixed`` says why the group cannot be cut.
    Hashable by identity (a key of a ``keep`` dict): a group is its graph's,
    of the trace that made it (``graph``: that :class:`DependencyGraph`,
    which ``surgery.prune_channels`` cuts it with; None for one made by
    hand)."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    fixed: str | None = None
    graph: DependencyGraph | None = field(default=None, repr=False)

    def modules(self, role: str | None = None) -> list[str]:
        return list(dict.fromkeys(m.module for m in self.members if role is None or m.role == role))


class DependencyGraph:
    """See the module docstring. ``groups``: the groups that can be cut, in
    network order; ``fixed_groups``: the others (input channels, the
    network's outputs, channels mixed by ops the graph does not know)."""

    #: Whether ``_zero_reads`` keeps the values the norms read (a masked copy's graph: :class:`_ValuesGraph`).
    _keep_values = False

    def __init__(self, model: nn.Module, example_input) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        check_not_compressed(model)
        self.model = model
        self.example_input = example_input
        self.spaces = Spaces()
        self._members: list[tuple[str, str, Segment]] = []
        self._layer_in: dict[str, Tag] = {}
        self._layer_out: dict[str, int] = {}
        self._roots: dict[int, CoupledGroup] = {}
        self._zero_reads: list[tuple[str, torch.Tensor | None, Tag]] = []
        self._ran: set[str] = set()  # (the layers and norms the traced forward called)
        self._trace()
        self.all_groups = self._collect()
        self.groups = [g for g in self.all_groups if g.fixed is None]
        self.fixed_groups = [g for g in self.all_groups if g.fixed is not None]
        # (each member's width as traced: a cut made since, by cut(retrace=False), another graph or surgery,
        # leaves this graph's slices of the old widths; cutting by them kept other channels, or none)
        self._traced_widths = {(m.module, m.role): self._width(m.module, m.role)
                               for g in self.all_groups for m in g.members}

    def _width(self, name: str, role: str) -> int:
        module = self.module(name)
        return adapters.adapter_for(module).channels(module, role)

    def _check_fresh(self) -> None:
        """ValueError when a member's width is no longer the traced one."""
        for (name, role), traced in self._traced_widths.items():
            now = self._width(name, role)
            if now != traced:
                raise ValueError(
                    f"the graph is stale: {name!r} has {now} {role}put channels, it was traced with {traced} (the "
                    "model was cut since: by cut(retrace=False), another graph or surgery); trace it again "
                    "(DependencyGraph(model, example_input)) before cutting or masking")

    # ------------------------------------------------------------ tracing
    def _trace(self) -> None:
        tracer = Tracer(self.spaces)
        shared = shared_tensors(self.model)
        handles = []
        for name, m in self.model.named_modules():
            # (the model itself is no layer: its forward is what is traced, its own parameters operands there as
            # any tensor the trace does not know; taken for an opaque layer, it hid every layer and group)
            opaque = name != "" and adapters.adapter_for(m) is None and any(True for _ in m.parameters(recurse=False))
            if adapters.adapter_for(m) is not None:
                _watch(tracer, name, m)
            if adapters.adapter_for(m) is not None or opaque:
                # (first of its pre-hooks: a pruning mask's, a skeleton's, which compute its weight, run inside it)
                handles.append(m.register_forward_pre_hook(lambda *_: setattr(tracer, "depth", tracer.depth + 1),
                                                           prepend=True))
                handles.append(m.register_forward_hook(
                    lambda mod, inputs, kwargs, output, name=name: self._on_module(tracer, name, mod, inputs, output,
                                                                                   kwargs),
                    with_kwargs=True))
        try:
            with evaluating(self.model), torch.no_grad(), tracer:
                output = run_model(self.model, self.example_input)
            for t in _tensors_in(output):
                tracer.fix(tracer.tag_of(t), "network output")
        finally:
            for h in handles:
                h.remove()
        # (the values kept only by the graph of _check_zero_reads' masked copy)
        self._zero_reads = [(name, x if self._keep_values else None, tag) for name, x, tag in tracer.zero_reads]
        # a layer's weight that another module holds too (tied layers) or that code outside the layer computes
        # with: a cut would slice the layer's copy alone (the tie silently gone; the other reader of another width)
        for name, reason in {**tracer.read_outside, **shared}.items():
            for member, _, s in self._members:
                if member == name:
                    self.spaces.fix(s.space, reason)

    def _on_module(self, tracer: Tracer, name: str, module, inputs, output, kwargs=None) -> None:
        _watch(tracer, name, module)  # (a masked weight: the tensor its pre-hook made for this call)
        self._ran.add(name)
        tracer.depth -= 1
        if tracer.depth:
            return
        # (a number a tagged tensor's channels gave, handed to a layer: what it makes of it, inside, the graph does
        # not see; the channels are fixed, the number with them)
        tracer.fix_widths(tracer.widths((inputs, kwargs)), f"{name}: takes a number its channels gave")
        tracer.fix_escaped((inputs, kwargs), name)
        extra = _other_arguments(module, inputs, kwargs or {})
        x = feats_of(inputs[0]) if inputs else None
        tag = tracer.tag_of(x)
        tag = None if tag is not None and not tag.segments else tag
        y = feats_of(output)
        adapter = adapters.adapter_for(module)
        addends = {} if adapter is None else {k: extra.pop(k) for k in adapter.addends if k in extra}
        unknown = None  # channels handed over some other way than the input: what the layer does with them and
        for key, value in extra.items():  # its own channels is unknown, so all of them are fixed
            for t in _tensors_in(value):
                other = tracer.tag_of(t)
                if other is not None and other.segments:
                    unknown = f"channels passed as its argument {key!r}, which the graph does not follow"
                    tracer.fix(other, f"{name}: {unknown}")
        if adapter is not None and adapter.kind == "norm":  # (a norm's tensor a cut cannot slice: its channels too)
            why = unknown or adapters.cut_refusal(module)
            if why is not None:
                tracer.fix(tag, f"{name}: {why}")
                tag = None
        if adapter is None or (tag is not None and tag.axis != feature_axis(module, x)):
            tracer.fix(tag, f"{name}: a {type(module).__name__} with parameters and no adapter" if adapter is None
                       else f"{name}: channels reach it on another axis than its features")
            tag = None
        if adapter is None:
            return
        if adapter.kind == "norm":
            if tag is not None:
                for s in tag.segments:
                    self._members.append((name, "out", s))
                tracer.set_tag(y, Tag(feature_axis(module, y), tag.segments))
            return
        reason = adapters.cut_refusal(module) or unknown
        if tag is not None:
            if reason is not None or x.shape[tag.axis] != adapter.channels(module, "in"):
                tracer.fix(tag, f"{name}: {reason or 'input channels do not match'}")
            elif name in self._layer_in:
                tracer.unite(self._layer_in[name], tag, f"{name} called on other channels")
            else:
                self._layer_in[name] = tag
                self._members.extend((name, "in", s) for s in tag.segments)
        if y is None:
            return
        if name not in self._layer_out:
            c = adapter.channels(module, "out")
            space = self.spaces.new(c)
            self._layer_out[name] = space
            self._members.append((name, "out", Segment(0, c, space, 0)))
            if reason is not None:
                self.spaces.fix(space, f"{name}: {reason}")
        space = self._layer_out[name]
        out_tag = Tag(feature_axis(module, y), (Segment(0, self.spaces.size[space], space, 0),))
        tracer.set_tag(y, out_tag)
        for key, value in addends.items():  # summed into the output: the same channels, as a residual sum's
            self._couple_addend(tracer, name, key, feats_of(value), out_tag)

    def _couple_addend(self, tracer: Tracer, name: str, key: str, t, out_tag: Tag) -> None:
        if t is None:
            return
        tag = tracer.tag_of(t)
        what = f"{name}: its argument {key!r} (added to its output)"
        if tag is None or not tag.segments:  # channels the model cannot change (the input), or a constant
            if tag is None and t.dim() and t.shape[min(1, t.dim() - 1)] > 1:
                self.spaces.fix(out_tag.segments[0].space, f"{what} has channels no layer produces")
            return
        tracer.unite(out_tag, tag, f"{what} has other channels")

    def _collect(self) -> list[CoupledGroup]:
        groups: dict[int, CoupledGroup] = {}
        for module, role, s in self._members:
            root, shift = self.spaces.find(s.space)
            g = groups.get(root)
            if g is None:
                g = groups[root] = CoupledGroup("", self.spaces.size[root], fixed=self.spaces.fixed[root], graph=self)
            member = Member(module, role, s.pos, s.end, s.offset + shift, s.repeat)
            if member not in g.members:
                g.members.append(member)
        out = []
        for root, g in groups.items():
            producers = g.modules("out")
            layers = [n for n in producers if adapters.is_layer(self.module(n))]
            if not layers:
                continue
            g.name = layers[0]
            out.append(g)
            self._roots[root] = g
        return out

    def _dropped_at(self, tag: Tag, dropped: dict) -> list[tuple[str, torch.Tensor]]:
        """``(group name, positions on tag's axis)`` of the ``dropped``
        channels (``{group name: channel indices}``) that ``tag`` holds."""
        out = []
        for s in tag.segments:
            root, shift = self.spaces.find(s.space)
            g = self._roots.get(root)
            if g is None or g.name not in dropped:
                continue
            local = dropped[g.name] - (s.offset + shift)
            local = local[(local >= 0) & (local < s.length)]
            if len(local):
                pos = (s.pos + local * s.repeat)[:, None] + torch.arange(s.repeat)[None, :]
                out.append((g.name, pos.flatten()))
        return out

    def _check_zero_reads(self, dropped: dict) -> None:
        """ValueError where a norm over channels (a magnitude voxel score)
        would read a channel ``dropped`` (:meth:`_removed`'s) holds as nonzero
        once masked (an op between makes something else than 0 of a zero):
        the cut model, without the channel, would compute another norm.
        Checked on a masked copy, only where such a norm reads a group being
        masked."""
        if not any(self._dropped_at(tag, dropped) for _, _, tag in self._zero_reads):
            return
        twin = copy_model(self.model)  # (masked values of a forward with gradients: copied detached)
        DependencyGraph(twin, self.example_input)._mask(dropped)  # (the copy's groups: the same names)
        check = _ValuesGraph(twin, self.example_input)
        for name, x, tag in check._zero_reads:
            for gname, pos in check._dropped_at(tag, dropped):
                if bool((x.detach().index_select(tag.axis, pos.to(x.device)) != 0).any()):
                    raise ValueError(
                        f"masked channels of group {gname!r} reach {name} over the channels (outside any layer) "
                        "as nonzero values: an op between makes something else than 0 of a zero (a sigmoid, exp, "
                        "x + 1, a BatchNorm without affine parameters), so the cut model, without them, would "
                        f"compute another {name}; mask refuses (nothing was masked): keep those channels")

    # --------------------------------------------------------------- views
    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def group(self, name_or_index) -> CoupledGroup:
        """A cuttable group by index or by name (its first producer, or any of its layers)."""
        if isinstance(name_or_index, CoupledGroup):
            if any(g is name_or_index for g in self.groups):
                return name_or_index
            if any(g is name_or_index for g in self.fixed_groups):
                raise ValueError(f"group {name_or_index.name!r} cannot be cut (its channels are fixed: "
                                 f"{name_or_index.fixed})")
            raise ValueError(f"group {name_or_index.name!r} is not one of this graph's groups (a group of another "
                             "graph, or of this one before a cut traced it again): name it by its name or index")
        try:  # numpy integers too (not bool)
            index = None if isinstance(name_or_index, str) else as_int(name_or_index, "name_or_index")
        except TypeError:
            index = None
        if index is not None:
            if not -len(self.groups) <= index < len(self.groups):
                raise IndexError(f"name_or_index {index} is out of range: the graph has {len(self.groups)} cuttable "
                                 f"groups (indices 0..{len(self.groups) - 1}, or negative from the end)")
            return self.groups[index]
        for g in self.groups:
            if g.name == name_or_index:
                return g
        for g in self.groups:
            if name_or_index in g.modules("out"):
                return g
        fixed = [g for g in self.fixed_groups if name_or_index in g.modules("out")]
        why = f" (its channels are fixed: {fixed[0].fixed})" if fixed else ""
        raise ValueError(f"{name_or_index!r} names no cuttable channel group{why}; groups: {[g.name for g in self.groups]}")

    def layers(self) -> list[str]:
        """Every registered layer the trace ran through, in call order."""
        return list(dict.fromkeys(list(self._layer_in) + list(self._layer_out)))

    # ---------------------------------------------------------- the cuts
    def _removed(self, keep: dict) -> dict[str, torch.Tensor]:
        """``{group name: the channel indices it loses}`` of a checked ``keep``."""
        if not isinstance(keep, Mapping):
            raise TypeError(f"keep must be a dict {{group: channel indices to keep}}; got {type(keep).__name__}")
        self._check_fresh()
        removed: dict[str, torch.Tensor] = {}
        named: dict[int, object] = {}
        for key, kept in keep.items():
            g = self.group(key)
            if id(g) in named:  # two keep lists for one group: their removals would add up to more than either
                raise ValueError(f"keep names group {g.name!r} twice (as {named[id(g)]!r} and {key!r})")
            named[id(g)] = key
            kept = _check_keep(kept, g.size, f"group {g.name!r}")
            removed[g.name] = torch.tensor(sorted(set(range(g.size)) - set(kept.tolist())), dtype=torch.long)
        return removed

    def _drops(self, removed: dict) -> dict[tuple[str, str], torch.Tensor]:
        """``{(member module, role): its positions}`` of :meth:`_removed`'s channels."""
        drops: dict[tuple[str, str], list[torch.Tensor]] = {}
        for gname, channels in removed.items():
            for m in self.group(gname).members:
                drops.setdefault((m.module, m.role), []).append(m.positions(channels))
        return {k: torch.cat(v) for k, v in drops.items()}

    def cut(self, keep: dict, retrace: bool = True) -> None:
        """Keep only channels ``keep[group]`` (indices into the group; a group
        is named by index, name or object) of each listed group: every
        member's parameters, buffers and masks are sliced at once. The graph
        is traced again afterwards (``retrace=False``: not, and it is stale).
        The sliced tensors are new ``Parameter`` objects: build the optimizer
        that trains the cut model after the cut (one built before steps the
        old tensors only)."""
        retrace = as_bool(retrace, "retrace")
        drops = self._drops(self._removed(keep))
        unrun = [n for n, m in self.model.named_modules() if n and n not in self._ran and adapters.adapter_for(m)
                 is not None and any(True for _ in (*m.parameters(recurse=False), *m.buffers(recurse=False)))]
        if drops and unrun:  # (a head run in training mode only: its inputs left at full width, it failed there)
            warnings.warn(f"DependencyGraph.cut: {unrun} did not run in the traced forward (eval mode, on the "
                          "example input), so the cut follows no channels into them and leaves their widths as they "
                          "are; if they run otherwise (a head run in training mode only, another input), the cut "
                          "model fails there: trace a forward that runs them", UserWarning, stacklevel=2)
        for (name, role), dropped in drops.items():
            module = self.module(name)
            adapter = adapters.adapter_for(module)
            n = adapter.channels(module, role)
            kept = torch.tensor(sorted(set(range(n)) - set(dropped.tolist())), dtype=torch.long)
            for tensor, roles in adapter.axes(module).items():
                if role in roles:
                    _slice(module, tensor, roles[role], kept)
            adapter.set_channels(module, role, len(kept))
        if retrace:
            self.__init__(self.model, self.example_input)

    def mask(self, keep: dict) -> None:
        """Zero every channel not in ``keep[group]`` without changing shapes:
        masks on the producers' weights and biases, on the norms' weight and
        bias, and on the consumers' weights at those input channels
        (``custom_from_mask``, composing with masks they have), so a masked
        channel is exactly 0 after its norm and reaches no layer, and
        :meth:`cut` of it does not change the output even where an op
        between makes something else than 0 of a zero (a sigmoid, ``exp``,
        ``x + 1``, a BatchNorm without affine parameters, whose running-mean
        shift a masked channel carries in eval mode). Where such a channel
        would reach a norm over the channels outside any layer (a magnitude
        voxel score) as nonzero, no mask makes the cut exact: a ValueError,
        with nothing masked."""
        removed = self._removed(keep)
        self._check_zero_reads(removed)
        self._mask(removed)

    def _mask(self, removed: dict) -> None:
        """:meth:`mask`'s masks of :meth:`_removed`'s channels, unchecked."""
        for (name, role), dropped in self._drops(removed).items():
            module = self.module(name)
            for tensor, roles in adapters.adapter_for(module).axes(module).items():
                t = adapters.raw(module, tensor)
                if role in roles and isinstance(t, nn.Parameter):  # raw: name_orig when already masked
                    m = torch.ones_like(t, dtype=torch.bool)
                    m.index_fill_(roles[role], dropped.to(t.device), False)
                    _compat.custom_from_mask(module, tensor, m)
            keep_copyable(module)

    def masked_channels(self) -> dict[str, torch.Tensor]:
        """For each group, the channels whose every producer has an all-zero
        weight (and bias) slice: masked or pruned to 0 (a weight's entries
        that are weights of the layer: a ``kernel_region`` conv's region's,
        its adapter's ``used_weights``)."""
        out = {}
        for g in self.groups:
            alive = torch.zeros(g.size, dtype=torch.bool)
            for m in g.members:
                module = self.module(m.module)
                if m.role != "out" or not adapters.is_layer(module):
                    continue
                for tensor, roles in adapters.adapter_for(module).axes(module).items():
                    t = _effective(module, tensor)
                    if t is None or "out" not in roles:
                        continue
                    if tensor == "weight":  # (the values outside a kernel_region are never run)
                        t = adapters.used_weights(module, t)
                    rows = t.detach().movedim(roles["out"], 0).reshape(t.shape[roles["out"]], -1)
                    nz = (rows[m.start:m.stop] != 0).any(1).reshape(-1, m.repeat).any(1)
                    alive[m.offset:m.offset + m.length] |= nz.cpu()
            dead = (~alive).nonzero().flatten()
            if len(dead):
                out[g.name] = dead
        return out

    def remove_masked(self) -> dict[str, int]:
        """Cut every channel that :meth:`masked_channels` finds, so that the
        smaller model computes what the masked one computes in eval mode. The
        constant a masked channel carries after its norm (the BatchNorm
        shift) is measured on the example input and folded into the bias of
        each consumer that is linear per site (one whose weights there are
        0, as :meth:`mask` leaves them, reads nothing of it); a ValueError
        names the channel and the consumer where it cannot be folded
        exactly. Returns
        the channels removed per group."""
        self._check_fresh()
        dead = self.masked_channels()
        if not dead:
            return {}
        folds = self._constants(dead)
        for (name, pos), value in folds.items():
            _fold_into_bias(self.module(name), pos, value)
        keep = {}
        for gname, channels in dead.items():
            g = self.group(gname)
            if len(channels) == g.size:
                raise ValueError(f"every channel of group {gname!r} is masked; keep at least one")
            keep[gname] = torch.tensor(sorted(set(range(g.size)) - set(channels.tolist())), dtype=torch.long)
        self.cut(keep)
        return {k: len(v) for k, v in dead.items()}

    def _constants(self, dead: dict) -> dict[tuple[str, int], float]:
        """``(consumer, input position) -> constant`` for the dead channels that
        reach a consumer as a nonzero constant (ValueError where unfoldable)."""
        wanted = {}
        for gname, channels in dead.items():
            for m in self.group(gname).members:
                if m.role == "in":
                    wanted.setdefault(m.module, []).append((gname, m.positions(channels)))
        from .surgery import capture  # noqa: PLC0415 - surgery builds on this module

        names = list(wanted)
        seen = {n: feats_of(x) for n, (x, _) in zip(names, capture(self.model, [self.module(n) for n in names],
                                                                   self.example_input))}
        folds = {}
        for name, items in wanted.items():
            x = seen[name]
            axis = feature_axis(self.module(name), x)
            cols = x.detach().movedim(axis, -1).reshape(-1, x.shape[axis])
            read = None  # (worked out for a consumer only where a masked channel reaches it nonzero)
            for gname, positions in items:
                for p in positions.tolist():
                    col = cols[:, p]
                    lo, hi = (float(col.min()), float(col.max())) if col.numel() else (0.0, 0.0)
                    if lo == hi == 0.0:
                        continue
                    read = _inputs_read(self.module(name)) if read is None else read
                    if not read[p]:  # (its weights there are 0, masked as DependencyGraph.mask masks consumers)
                        continue
                    adapter = adapters.adapter_for(self.module(name))
                    scale = max(abs(lo), abs(hi))
                    if hi - lo > 1e-6 * scale or not adapter.per_site(self.module(name)):
                        kind = "varies across sites" if hi - lo > 1e-6 * scale else f"is the constant {lo:.4g}"
                        raise ValueError(
                            f"masked channel of group {gname!r} reaches input {p} of {name!r} where it {kind} "
                            "(a BatchNorm's shift or an op that makes something else than 0 of a zero (a sigmoid, "
                            f"exp, x + 1) after the mask); {type(self.module(name)).__name__} "
                            "is not linear per site (a sparse conv sums a constant over a varying number of "
                            "active neighbours), so it cannot be folded exactly: mask with DependencyGraph.mask, "
                            "which masks the norms and the consumers too, or zero those BatchNorm entries first")
                    folds[(name, p)] = (lo + hi) / 2
        return folds


class _ValuesGraph(DependencyGraph):
    """The graph :meth:`DependencyGraph._check_zero_reads` traces a masked
    copy with: it keeps the values its norms over channels read."""

    _keep_values = True


# ------------------------------------------------------------------ helpers
def check_not_compressed(model: nn.Module) -> None:
    """ValueError when every layer of ``model`` is a compressed layer
    (:func:`pointsparse.formats.compress`): such a layer holds its weight
    in a format's buffers, no parameter a cut could slice, so the graph
    found no group and a cut did nothing, without a word. A model with
    some layers left uncompressed passes (the compressed layers' channels
    are fixed there)."""
    from ..formats.modules import SparseConv3d, SparseLinear  # noqa: PLC0415 - the formats sit beside the package

    packed = [name for name, m in model.named_modules() if isinstance(m, (SparseConv3d, SparseLinear))]
    if not packed or any(adapters.is_layer(m) for m in model.modules()):
        return
    if packed == [""]:
        what = f"the model is a compressed layer ({type(model).__name__}, formats.compress)"
    else:
        shown = ", ".join(repr(n) for n in packed[:4]) + (f" and {len(packed) - 4} more" if len(packed) > 4 else "")
        what = f"the model's layers {shown} are all compressed (formats.compress)"
    raise ValueError(f"{what}, whose weights are no parameters a channel cut can slice: cut the channels before "
                     "compressing the model (compress the cut model)")


def shared_tensors(model: nn.Module) -> dict[str, str]:
    """``{layer: why}`` for the registered layers one of whose tensors
    (its parameters and buffers with channel axes) another module holds too."""
    # id(tensor) -> [(the module holding it, qualified name)]; a module registered under two names (an
    # alias, self.head = self.layers[-1]) is one module: its cut slices it once, no tie to keep
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    for prefix, holder in model.named_modules(remove_duplicate=False):
        for key, t in [*holder.named_parameters(recurse=False), *holder.named_buffers(recurse=False)]:
            owners.setdefault(id(t), []).append((holder, f"{prefix}.{key}" if prefix else key))
    out = {}
    for name, m in model.named_modules():
        adapter = adapters.adapter_for(m)
        if adapter is None:
            continue
        for tensor in adapter.axes(m):
            t = adapters.raw(m, tensor)
            others = [q for holder, q in owners.get(id(t), ()) if holder is not m] if t is not None else []
            if others:
                out.setdefault(name, f"{name}: its {tensor!r} is shared with {', '.join(others)}")
    return out


def _tensors_in(value) -> list[torch.Tensor]:
    """Every tensor ``value`` holds (a SparseTensor's feats): a network's
    output, a layer's other arguments. Inside torch's pytree containers and
    inside what pytree takes for a leaf, a dataclass, a dict subclass (a
    ``ModelOutput``), any object's attributes: a classifier's logits there
    were no output (its classes were cut), the channels a layer's argument
    object held were followed into no layer (cut apart from those it sums
    them with)."""
    found, seen, todo = [], set(), [value]
    while todo:
        value = todo.pop()
        if id(value) in seen or value is None or isinstance(value, (str, bytes, int, float, complex, type)):
            continue
        seen.add(id(value))
        feats = feats_of(value)
        if feats is not None:
            found.append(feats)
        elif isinstance(value, Mapping):
            todo.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            todo.extend(value)
        elif is_dataclass(value):
            todo.extend(getattr(value, f.name, None) for f in fields(value))
        elif not isinstance(value, nn.Module) and not callable(value):
            todo.extend(getattr(value, "__dict__", {}).values())
    return found


def _watch(tracer: Tracer, name: str, module: nn.Module) -> None:
    """Have ``tracer`` note any use outside ``module`` of its tensors with
    channel axes (raw, and as its forward reads them: a masked weight)."""
    adapter = adapters.adapter_for(module)
    for tensor in adapter.axes(module) if adapter is not None else ():  # (an opaque layer: its channels are fixed)
        for t in (adapters.raw(module, tensor), getattr(module, tensor, None)):
            if isinstance(t, torch.Tensor):
                tracer.watched[id(t)] = (t, name, tensor)


def _other_arguments(module: nn.Module, inputs: tuple, kwargs: dict) -> dict:
    """The arguments of a call of ``module`` other than its first (the
    input), by parameter name (by position where the forward's signature does
    not bind them)."""
    try:
        bound = inspect.signature(module.forward).bind(*inputs, **kwargs)
    except (TypeError, ValueError):
        return {**{i: v for i, v in enumerate(inputs[1:], 1)}, **kwargs}
    named = dict(bound.arguments)
    if inputs:
        named.pop(next(iter(named)), None)
    return {k: v for k, v in named.items() if v is not None}


def _check_keep(keep, n: int, what: str) -> torch.Tensor:
    """``keep`` as sorted int64 channel indices of ``n``; errors name
    ``what`` (a group, a layer's outputs or inputs: surgery's cuts use it too)."""
    keep = _as_indices(keep, f"keep for {what}")
    if keep.numel() == 0:
        raise ValueError(f"keep must name at least one channel of {what}")
    if int(keep.min()) < 0 or int(keep.max()) >= n:
        raise ValueError(f"keep indices must be in [0, {n}) for {what}; got range [{int(keep.min())}, "
                         f"{int(keep.max())}]")
    if torch.unique(keep).numel() != keep.numel():
        raise ValueError(f"keep has repeated channels for {what}")
    return torch.sort(keep).values


def _as_indices(keep, what: str) -> torch.Tensor:
    """``keep`` as a flat int64 tensor; TypeError for anything but integers
    (a float index would be truncated to another channel, a bool one is a mask)."""
    try:
        t = torch.as_tensor(keep)
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"{what} must be channel indices (ints); got {type(keep).__name__}") from error
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{what} must be channel indices (ints); got a {t.dtype} sequence")
    if t.dim() > 1:  # (flattened, a list of lists meant for several groups cut one to their union)
        raise ValueError(f"{what} must be a flat sequence of channel indices; got shape {tuple(t.shape)}")
    return t.to(torch.long).flatten()


def _effective(module: nn.Module, name: str) -> torch.Tensor | None:
    """:func:`.adapters.weight_now` of tensor ``name`` (what the module
    computes with: masked, times a filter skeleton), None where the module
    has no such tensor (a layer without a bias)."""
    return None if adapters.raw(module, name) is None else adapters.weight_now(module, name)


def _slice(module: nn.Module, name: str, axis: int, kept: torch.Tensor) -> None:
    """Keep ``kept`` along ``axis`` of tensor ``name`` (its ``_orig`` and
    ``_mask`` when masked, and a filter skeleton's ``_skeleton`` on the
    axes it has, one left by ``prune.remove`` too; the masked value is
    recomputed, detached)."""
    masked = name + "_orig" in module._parameters
    base = module._parameters[name + "_orig"] if masked else getattr(module, name, None)
    size = base.shape[axis] if isinstance(base, torch.Tensor) else None
    for key in ((name + "_orig", name + "_mask", name + "_skeleton") if masked else (name, name + "_skeleton")):
        t = getattr(module, key, None)
        if t is None or (key == name + "_skeleton" and t.shape[axis] != size):  # (its input axis: one entry)
            continue
        new = t.detach().index_select(axis, kept.to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            module._parameters[key] = nn.Parameter(new, requires_grad=t.requires_grad)
        elif key in module._buffers:
            module._buffers[key] = new
        else:
            setattr(module, key, new)
    if masked:
        setattr(module, name, adapters.weight_now(module, name).detach())
        keep_copyable(module)


def _inputs_read(module: nn.Module) -> torch.Tensor:
    """For each input channel of a layer, whether any tensor with an input
    axis that it computes with (masked; of the weight, the entries its
    adapter's ``used_weights`` keeps) reads it: :meth:`DependencyGraph.mask`
    masks each of them at a dropped input."""
    adapter = adapters.adapter_for(module)
    read = torch.zeros(adapter.channels(module, "in"), dtype=torch.bool)
    for tensor, roles in adapter.axes(module).items():
        t = _effective(module, tensor) if "in" in roles else None
        if t is None:
            continue
        t = adapters.used_weights(module, t.detach()) if tensor == "weight" else t.detach()
        read |= (t.movedim(roles["in"], 0).reshape(t.shape[roles["in"]], -1) != 0).any(1).cpu()
    return read


def _fold_into_bias(module: nn.Module, position: int, value: float) -> None:
    """``bias += value * (the weight's slice at input position)`` summed over
    every axis but the output one (a per-site layer: kernel volume 1), of
    the weights the layer runs (a ``kernel_region`` conv's region's: the
    values outside are never run)."""
    adapter = adapters.adapter_for(module)
    axes = adapter.axes(module)["weight"]
    w = adapters.used_weights(module, _effective(module, "weight").detach())
    contribution = value * w.select(axes["in"], position)
    out_axis = axes["out"] - (1 if axes["out"] > axes["in"] else 0)
    contribution = contribution.movedim(out_axis, 0).reshape(contribution.shape[out_axis], -1).sum(1)
    bias = adapters.raw(module, "bias")
    if bias is None:
        module.bias = nn.Parameter(contribution.clone())
    else:
        with torch.no_grad():
            bias.add_(contribution.to(bias.dtype))


def group_scores(graph: DependencyGraph, group, scores: dict | None = None, reduce: str = "sum") -> torch.Tensor:
    """One score per channel of ``group``: ``scores`` (``{(module, tensor):
    per-element scores}`` as :mod:`.criteria` returns them; default: the
    absolute weights) summed over each member's slice of every scored tensor
    (over repeats and every other axis; of a weight, over the entries its
    adapter's ``used_weights`` keeps: a ``kernel_region`` conv's region),
    then reduced over the members (``"sum"``, ``"mean"`` or ``"max"``)."""
    if reduce not in ("sum", "mean", "max"):
        raise ValueError(f"reduce must be 'sum', 'mean' or 'max'; got {reduce!r}")
    if scores is not None and not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict {{(module, tensor name): scores}}; got {type(scores).__name__}")
    g = graph.group(group)
    rows = []
    for m in g.members:
        module = graph.module(m.module)
        for tensor, roles in adapters.adapter_for(module).axes(module).items():
            if m.role not in roles:
                continue
            s = scores.get((module, tensor)) if scores is not None else _effective(module, tensor)
            if s is None or (scores is None and tensor != "weight"):
                continue
            shape = tuple(adapters.raw(module, tensor).shape)
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"scores for {tensor!r} of {m.module!r} must be a tensor of its shape {shape}; "
                                 f"got {got}")
            if bool(torch.isnan(s.detach()).any()):  # (topk would rank a NaN channel above every other: kept)
                raise ValueError(f"scores for {tensor!r} of {m.module!r} hold NaN; every channel needs a number")
            s = s.detach()
            if tensor == "weight":
                s = adapters.used_weights(module, s)
            s = s.abs().float().movedim(roles[m.role], 0)
            per = s.reshape(s.shape[0], -1).sum(1)[m.start:m.stop].reshape(-1, m.repeat).sum(1)
            row = torch.zeros(g.size)
            row[m.offset:m.offset + m.length] = per.cpu()
            rows.append(row)
    if not rows:
        own = {id(module) for module in graph.model.modules()} if scores else set()
        foreign = scores and not any(isinstance(key, tuple) and key and id(key[0]) in own for key in scores)
        raise ValueError(f"no scores cover group {g.name!r}" + (
            ": scores are keyed by (module, tensor name) of the model the graph was traced on, and none of "
            "the scores' modules is one of its (scores of a copy of the model, or of another model?)"
            if foreign else ""))
    stacked = torch.stack(rows)
    return {"sum": stacked.sum(0), "mean": stacked.mean(0), "max": stacked.amax(0)}[reduce]


# Kept channel counts are rounded to this multiple by default: on the fused
# engine (6 x 16 register tiles) MinkUNet cr=1.0 at keep 0.35 ran 5.6x faster
# than dense with counts rounded to 8, 5.3x with 16 and 4.4x unrounded
# (bench/prune_speed.py, results/prune_speed.md).
DEFAULT_MULTIPLE = 8


def _nearest(count: float, unit: int = 1) -> int:
    """``count`` (a channel count times a ratio) rounded to the nearest
    multiple of ``unit``, a tie to the larger, after dropping its float's
    last bits (9 decimals): 360 x 0.7 is 251.99999999999997 in floats, and
    a tie between two counts (31.5 multiples of 8) fell to the smaller one."""
    return math.floor(round(count, 9) / unit + 0.5) * unit


def kept_count(size: int, keep_ratio: float, multiple: int = 1) -> int:
    """``size * keep_ratio`` rounded to the nearest multiple of ``multiple``
    (at least one multiple, or 1; at most ``size``), in one rounding, a tie
    keeping the larger count (channels, or multiples of them)."""
    keep_ratio = check_fraction(keep_ratio, "keep ratio", low_open=True, high_open=False)
    multiple = positive_int(multiple, "multiple")
    exact = size * float(keep_ratio)
    n = max(1, _nearest(exact))
    if n >= size:  # nothing to prune: rounding to the multiple must not cut a group kept whole
        return size
    if multiple > 1 and size > multiple:
        # (from the exact count: rounding it to a channel first, then to the multiple, rounded twice)
        n = max(multiple, _nearest(exact, multiple))
    return min(n, size)


def _relative(scores: torch.Tensor) -> torch.Tensor:
    """A group's channel scores over their mean (all zeros: left as they
    are). The mean was clamped to 1e-12, so a group of small scores (a
    Taylor or OBD criterion, ~1e-15) was not normalised at all and lost
    nearly every channel to the others in a global plan."""
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Each entry's place (0: the best) when ``scores`` are sorted from the
    best, ties in index order, as float64."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return torch.empty(len(scores), dtype=torch.float64).scatter_(
        0, order, torch.arange(len(scores), dtype=torch.float64))


def _ignored_groups(graph: DependencyGraph, ignore) -> set[str]:
    """The names of the groups whose channels a layer of ``ignore`` (names
    of the graph's model's layers, or the modules) produces; a block (a
    module holding layers) stands for every layer inside it, as in
    Torch-Pruning's ``ignored_layers``."""
    if isinstance(ignore, (str, bytes, nn.Module)) or not isinstance(ignore, Iterable):
        raise TypeError(f"ignore must be an iterable of layer names or modules; got {type(ignore).__name__}")
    named = dict(graph.model.named_modules())
    names = {id(m): n for n, m in named.items()}
    layers = set()
    for item in ignore:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"ignore: {item!r} is no layer of the graph's model")
            name = names[id(item)]
        elif isinstance(item, str):
            if item not in named:
                raise ValueError(f"ignore: {item!r} is no layer of the graph's model")
            name = item
        else:
            raise TypeError(f"ignore must be layer names or modules; got {type(item).__name__}")
        # (the block's own layers: the groups hold layers, and a block's name alone matched none of them)
        layers.update(f"{name}.{sub}" if name and sub else name or sub for sub, _ in named[name].named_modules())
    return {g.name for g in graph.groups if layers.intersection(g.modules("out"))}


def plan(graph: DependencyGraph, keep_ratio, scores: dict | None = None, scope: str = "group",
         multiple: int = DEFAULT_MULTIPLE, reduce: str = "sum", ignore=()) -> dict[str, torch.Tensor]:
    """The channels to keep in each group, ranked by :func:`group_scores`.
    ``keep_ratio``: one ratio for every group, or ``{group name: ratio}``
    (groups not named keep everything). ``scope="global"`` ranks every
    channel of every group together (scores divided by their group's mean)
    and keeps the best ``keep_ratio * channels`` of all (rounded as
    :func:`kept_count` rounds; a tie of scores shared
    among the groups in proportion to their sizes); counts are then rounded
    to ``multiple`` per group. ``ignore`` (Torch-Pruning's
    ``ignored_layers``): layers, by name or as modules, that keep every
    output channel: the groups they produce are left out (a global plan
    ranks the others), their input channels follow their producers."""
    if scope not in ("group", "global"):
        raise ValueError(f"scope must be 'group' or 'global'; got {scope!r}")
    if scores is not None and not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict {{(module, tensor name): scores}} as pointsparse.prune.criteria "
                        f"returns; got {type(scores).__name__}")
    if isinstance(keep_ratio, Mapping):
        ratios = {name: check_fraction(r, f"keep_ratio[{name!r}]", low_open=True, high_open=False) for name, r in keep_ratio.items()}
    else:
        keep_ratio = check_fraction(keep_ratio, "keep_ratio", low_open=True, high_open=False)
        ratios = {g.name: keep_ratio for g in graph.groups}
    ignored = _ignored_groups(graph, ignore)
    if isinstance(keep_ratio, Mapping):
        for name in ratios:
            if graph.group(name).name in ignored:
                raise ValueError(f"keep_ratio names group {name!r}, whose output channels ignore keeps whole (a layer "
                                 "of ignore produces them): leave the group out of keep_ratio, or its layer out of "
                                 "ignore")
    ratios = {name: r for name, r in ratios.items() if graph.group(name).name not in ignored}
    all_scores = {name: group_scores(graph, name, scores, reduce) for name in ratios}
    if not all_scores:
        return {}
    if scope == "global":
        if isinstance(keep_ratio, Mapping):
            raise ValueError("scope='global' takes one keep_ratio")
        relative = {n: _relative(s) for n, s in all_scores.items()}
        norm = torch.cat(list(relative.values()))
        k = max(1, _nearest(len(norm) * float(keep_ratio)))  # (a tie keeps more: kept_count's rounding)
        # Exactly the k best: every channel at least the k-th best's score kept all of a tie (BatchNorm scales
        # as initialised: every channel, whatever keep_ratio). Ties go by each channel's rank in its own group
        # over the group's size, so a tie is shared among the groups in proportion to their sizes.
        owner = torch.cat([torch.full((len(r),), i) for i, r in enumerate(relative.values())])
        place = torch.cat([_ranks(r) / len(r) for r in relative.values()])
        by_place = torch.sort(place, stable=True).indices
        best = by_place[torch.sort(norm[by_place], descending=True, stable=True).indices[:k]]
        chosen = torch.bincount(owner[best], minlength=len(relative))
        counts = {n: int(c) for n, c in zip(relative, chosen)}
    else:
        counts = None
    out = {}
    for name, s in all_scores.items():
        size = graph.group(name).size
        # (a group's own ratio rounded once to the multiple; a global plan's chosen count rounded to it)
        n = kept_count(size, ratios[name] if counts is None else max(counts[name], 1) / size, multiple)
        out[name] = torch.sort(torch.topk(s, n).indices).values
    return out


def prune_model(model: nn.Module, example_input, keep_ratio, scores: dict | None = None, scope: str = "group",
                multiple: int = DEFAULT_MULTIPLE, ignore=()) -> dict[str, int]:
    """Trace, plan and cut in one call; returns the kept width of each group
    (``ignore``: as :func:`plan`'s). The cut layers get new ``Parameter``
    objects (:meth:`DependencyGraph.cut`): build the optimizer that
    fine-tunes the model after this call."""
    graph = DependencyGraph(model, example_input)
    keep = plan(graph, keep_ratio, scores, scope, multiple, ignore=ignore)
    graph.cut(keep)
    return {k: len(v) for k, v in keep.items()}


def widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """``{module: {"in": c, "out": c}}`` of every registered layer and norm:
    what a checkpoint records to rebuild a pruned model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    out = {}
    for name, m in model.named_modules():
        a = adapters.adapter_for(m)
        # (a norm without affine parameters too: its running statistics, or its num_features, have its width)
        if a is None or (a.kind != "norm" and adapters.raw(m, "weight") is None):
            continue
        out[name] = {"out": a.channels(m, "out")} if a.kind == "norm" else {
            "in": a.channels(m, "in"), "out": a.channels(m, "out")}
    return out


def resize(model: nn.Module, recorded: dict[str, dict[str, int]]) -> None:
    """Give every layer the widths ``recorded`` by :func:`widths` (fresh
    tensors of the new shapes, to be filled by ``load_state_dict``). Every
    entry is checked before any layer changes: a bad one leaves the model
    as it was."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(recorded, Mapping):
        raise TypeError(f"recorded widths must be a dict {{module: {{'in': c, 'out': c}}}}; got "
                        f"{type(recorded).__name__}")
    named = dict(model.named_modules())
    changes = []
    for name, roles in recorded.items():
        if name not in named:
            raise ValueError(f"recorded widths name {name!r}, which the model does not have")
        if not isinstance(roles, Mapping):
            raise TypeError(f"recorded widths of {name!r} must be a dict {{'in': c, 'out': c}}; got "
                            f"{type(roles).__name__}")
        roles = {role: positive_int(n, f"recorded width of {name!r} ({role})") for role, n in roles.items()}
        m = named[name]
        a = adapters.adapter_for(m)
        if a is None:
            raise ValueError(f"{name!r} is a {type(m).__name__}, which has no pruning adapter")
        for role, n in roles.items():
            cur = a.channels(m, role)
            if n > cur:
                raise ValueError(f"recorded width {n} of {name!r} ({role}) exceeds the model's {cur}")
            if n != cur and not any(role in axes for axes in a.axes(m).values()):  # (a norm's 'in': its 'out')
                raise ValueError(f"recorded width {n} of {name!r} ({role}): a {type(m).__name__} has no {role!r} "
                                 "channels of its own (its width is its 'out')")
            if n != cur:
                changes.append((m, a, role, n))
    for m, a, role, n in changes:
        kept = torch.arange(n)
        for tensor, axes in a.axes(m).items():
            if role in axes:
                _slice(m, tensor, axes[role], kept)
        a.set_channels(m, role, n)


__all__ = ["DEFAULT_MULTIPLE", "CoupledGroup", "DependencyGraph", "Member", "group_scores", "kept_count", "plan", "prune_model",
           "resize", "widths"]

