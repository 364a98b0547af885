"""One adapter per layer type: what the pruning toolkit knows about a layer,
looked up by type (most derived class first) and extensible by users. Every
module of the toolkit (the dependency graph, surgery, the structured methods,
criteria, the report, NetAdapt, RigL, the sparse formats) asks here.

An adapter says

* ``kind``: ``"layer"`` (input channels in, a new set of output channels out:
  convolutions, Linear) or ``"norm"`` (channel-wise: its output channels are
  its input channels, e.g. BatchNorm);
* ``axes(module)``: for each parameter or buffer, the axis of its output
  channels (``"out"``) and of its input channels (``"in"``);
* ``layout(module)``: the weight's :class:`WeightLayout` (out, in and kernel
  axes) for the structured pruning methods;
* ``set_channels(module, role, n)``: updates the width attributes after a cut;
* ``per_site``: True when the layer is linear at each site (a Linear, a 1x1
  conv without padding, a sparse conv that runs only its zero offset at
  stride 1): a constant input channel then adds a constant to every
  output, which can be folded into the bias;
* ``supported(module)``: a reason the layer cannot be cut, or None;
* ``kernel_map(module, input)``: for sparse convolutions, the kernel map the
  layer runs on ``input`` (its per-offset pair counts give the FLOPs);
* ``flops(module, weight, inputs, output, pair_counts)``: ``(flops,
  dense_flops, executed_flops, execution)`` of one call (see
  :mod:`.report`); by default ``2 * positions * nnz(W)`` with ``positions``
  the output elements per output channel;
* ``used_weights(module, weight)``: the entries of ``weight`` (or of a
  tensor of its shape: scores) that are weights of the layer, on the same
  axes (what the report counts as its parameters, nonzeros and sparsity,
  and what channel rankings sum): by default all of them; a
  ``pointsparse.nn.Conv3d``'s offsets inside its ``kernel_region`` (the conv
  never runs the others);
* ``like(module, c_in, c_out)``: a fresh layer of the same type and geometry
  with other widths (NetAdapt's latency table);
* ``columns(module, x, y)`` and ``set_from_2d(module, w2d)``: the layer as a
  matrix product ``rows @ W2d = y`` (surgery's least-squares refit);
* ``channels_last``: its inputs and outputs carry channels on their last
  axis (Linear), not on axis 1 (``(N, C)`` feats, ``(B, C, ...)`` tensors);
* ``addends``: the names of forward arguments the layer adds element-wise to
  its output (``pointsparse.nn.Conv3d``'s ``add``, a residual summed in the
  conv's store): the dependency graph couples their channels with the
  output's, as it couples the operands of a sum. Any other argument than the
  first (the input) that carries channels fixes them (never cut).

The raw weight (``name_orig`` of a masked tensor) and the mask are read with
:func:`raw` and :func:`mask` for every type alike.

Register an adapter for a layer type of your own with :func:`register`::

    prune.adapters.register(MyConv, prune.adapters.LayerAdapter(
        axes=lambda m: {"weight": {"out": 0, "in": 1}, "bias": {"out": 0}}))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from torch.nn.utils.prune import custom_from_mask

from ..tensor import as_int
from ._copyable import keep_copyable

Axes = dict[str, dict[str, int]]


# ------------------------------------------------------------------ layouts
@dataclass(frozen=True)
class WeightLayout:
    """Axis roles of a weight tensor: ``out_axis`` (output channels),
    ``in_axis`` (input channels), ``kernel_axes`` (kernel positions; empty
    for Linear). ``(O, I)`` Linear and ``(O, I, *k)`` ConvNd: 0, 1, (2, ...);
    ``(I, O, *k)`` ConvTransposeNd: 1, 0, (2, ...); ``(K, I, O)``
    ``pointsparse.nn.Conv3d``: 2, 1, (0,). A frozen value: methods carrying
    one pickle and compare cleanly."""

    out_axis: int
    in_axis: int
    kernel_axes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Python ints, each axis of a ``2 + len(kernel_axes)``-dim weight
        named once (a TypeError / ValueError here, not inside a permute)."""
        # (as_int: a bool, float or str is a TypeError, a negative int a ValueError, each naming the field)
        out_axis, in_axis = as_int(self.out_axis, "out_axis", 0), as_int(self.in_axis, "in_axis", 0)
        if isinstance(self.kernel_axes, (str, bytes, torch.Tensor)) or not isinstance(self.kernel_axes, Iterable):
            raise TypeError(f"kernel_axes must be a tuple of ints; got {self.kernel_axes!r}")
        kernel_axes = tuple(as_int(a, "kernel_axes", 0) for a in self.kernel_axes)
        axes = (out_axis, in_axis, *kernel_axes)
        if sorted(axes) != list(range(len(axes))):
            raise ValueError(f"out_axis, in_axis and kernel_axes must name each axis of a {len(axes)}-dim weight once "
                             f"(0 to {len(axes) - 1}); got out_axis={self.out_axis!r}, in_axis={self.in_axis!r}, "
                             f"kernel_axes={kernel_axes!r}")
        object.__setattr__(self, "out_axis", out_axis)  # (frozen)
        object.__setattr__(self, "in_axis", in_axis)
        object.__setattr__(self, "kernel_axes", kernel_axes)

    @property
    def ndim(self) -> int:
        return 2 + len(self.kernel_axes)

    def check(self, t: torch.Tensor, name: str = "tensor") -> None:
        if t.dim() != self.ndim:
            raise ValueError(f"{name} must have {self.ndim} dims for layout {self}; got shape {tuple(t.shape)}")

    def to_oik(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` viewed as ``(out, in, kernel)`` (kernel positions flattened,
        1 for Linear). A permuted copy when the axes are not already in order."""
        self.check(t)
        out = t.permute((self.out_axis, self.in_axis, *self.kernel_axes))
        # (the kernel count spelled out: reshape's -1 is ambiguous for a tensor of no entries)
        return out.reshape(out.shape[0], out.shape[1], math.prod(out.shape[2:]))

    def from_oik(self, oik: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`to_oik` for a tensor of the original ``shape``."""
        perm = (self.out_axis, self.in_axis, *self.kernel_axes)
        inverse = [0] * len(perm)
        for position, axis in enumerate(perm):
            inverse[axis] = position
        return oik.reshape([shape[a] for a in perm]).permute(inverse).contiguous()


def check_layout(layout) -> None:
    """A method's ``layout`` argument: a :class:`WeightLayout` or None (a
    TypeError naming it otherwise)."""
    if layout is not None and not isinstance(layout, WeightLayout):
        raise TypeError(f"layout must be a WeightLayout or None; got {type(layout).__name__}")


def dense_layout(ndim: int) -> WeightLayout:
    """Layout of a torch Linear (``ndim == 2``) or ConvNd weight."""
    if ndim < 2:
        raise ValueError(f"a weight to prune structurally needs >= 2 dims; got {ndim}")
    return WeightLayout(0, 1, tuple(range(2, ndim)))


SPARSE_CONV = WeightLayout(2, 1, (0,))


# ------------------------------------------------------------------ adapters
def _set_conv(module: nn.Module, role: str, n: int) -> None:
    setattr(module, "out_channels" if role == "out" else "in_channels", n)


def positions_flops(positions: int, weight: torch.Tensor) -> tuple[int, int, int, str]:
    """A dense layer's counts: each weight entry meets ``positions`` inputs."""
    dense = 2 * positions * weight.numel()
    return 2 * positions * int((weight.detach() != 0).sum()), dense, dense, "dense"


def _output_positions_flops(module, weight, inputs, output, pair_counts):
    return positions_flops(output.numel() // weight.shape[layout_of(module).out_axis], weight)


@dataclass(frozen=True)
class LayerAdapter:
    """See the module docstring. ``layout`` defaults to out/in axes of
    ``weight`` with every other axis a kernel axis."""

    axes: Callable[[nn.Module], Axes]
    kind: str = "layer"
    set_channels: Callable[[nn.Module, str, int], None] = _set_conv
    layout_fn: Callable[[nn.Module], WeightLayout] | None = None
    per_site: Callable[[nn.Module], bool] = lambda m: False
    supported: Callable[[nn.Module], str | None] = lambda m: None  # a reason it cannot be cut, else None
    kernel_map: Callable | None = None
    flops: Callable = _output_positions_flops
    used_weights: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda m, w: w
    like: Callable[[nn.Module, int, int], nn.Module] | None = None
    columns: Callable | None = None
    set_from_2d: Callable[[nn.Module, torch.Tensor], None] | None = None
    channels_last: bool = False
    addends: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "norm"):
            raise ValueError(f"kind must be 'layer' or 'norm'; got {self.kind!r}")
        if not isinstance(self.addends, tuple) or not all(isinstance(a, str) for a in self.addends):
            raise TypeError(f"addends must be a tuple of argument names (str); got {self.addends!r}")

    def layout(self, module: nn.Module) -> WeightLayout:
        if self.layout_fn is not None:
            return self.layout_fn(module)
        ax = self.axes(module)["weight"]
        ndim = raw(module, "weight").dim()
        rest = tuple(a for a in range(ndim) if a not in (ax["out"], ax.get("in", ax["out"])))
        return WeightLayout(ax["out"], ax["in"], rest)

    def channels(self, module: nn.Module, role: str) -> int:
        """Width of ``module`` on ``role`` (``"in"`` or ``"out"``)."""
        for name, roles in self.axes(module).items():
            t = raw(module, name)
            if t is not None and role in roles:
                return int(t.shape[roles[role]])
        if self.kind == "norm" and role == "in":
            return self.channels(module, "out")
        if self.kind == "norm" and isinstance(getattr(module, "num_features", None), int):
            return module.num_features  # no affine weights, no running statistics: nothing sliced
        raise ValueError(f"{type(module).__name__} has no {role!r} channel axis")


_REGISTRY: dict[type, LayerAdapter] = {}


def register(layer_type: type, adapter: LayerAdapter) -> None:
    """Use ``adapter`` for ``layer_type`` and its subclasses (unless one of them
    has its own)."""
    if not isinstance(layer_type, type) or not issubclass(layer_type, nn.Module):
        raise TypeError(f"layer_type must be a torch.nn.Module subclass; got {layer_type!r}")
    if not isinstance(adapter, LayerAdapter):
        raise TypeError(f"adapter must be a LayerAdapter; got {type(adapter).__name__}")
    _REGISTRY[layer_type] = adapter


def unregister(layer_type: type) -> None:
    _REGISTRY.pop(layer_type, None)


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of the most derived registered class of ``module``; for an
    unregistered module shaped like a sparse conv (a 3-D ``weight`` ``(K,
    in_channels, out_channels)``, a 3-tuple ``kernel_size`` of volume K) the
    sparse conv's; else None."""
    for cls in type(module).__mro__:
        found = _REGISTRY.get(cls)
        if found is not None:
            return found
    if _shaped_like_sparse_conv(module):
        from ..nn import Conv3d  # noqa: PLC0415 - nn sits above this package

        return _REGISTRY.get(Conv3d)
    return None


def _shaped_like_sparse_conv(module: nn.Module) -> bool:
    weight = raw(module, "weight")
    kernel = getattr(module, "kernel_size", None)
    if weight is None or weight.dim() != 3 or not isinstance(kernel, tuple) or len(kernel) != 3:
        return False
    volume = kernel[0] * kernel[1] * kernel[2]
    return tuple(weight.shape) == (volume, getattr(module, "in_channels", -1), getattr(module, "out_channels", -1))


# ------------------------------------------------------------------ one layer
def cut_refusal(module: nn.Module) -> str | None:
    """Why a channel cut cannot slice ``module`` (a layer or a norm with an
    adapter), or None: its adapter's ``supported`` reason (a grouped conv),
    or a tensor with channel axes under a torch parametrization that cannot
    take the sliced value: one without ``right_inverse`` (torch refuses the
    assignment), or one holding tensors of its own, sized by the old width
    (``spectral_norm``'s power-iteration vectors). torch's error came from
    inside the cut, the members before it already cut. ``weight_norm``,
    whose ``right_inverse`` recomputes its two tensors, is cut with its
    layer. The chain groups and the dependency graph fix the groups of such
    a module with this reason."""
    adapter = adapter_for(module)
    reason = None if adapter is None else adapter.supported(module)
    if reason is not None or adapter is None:
        return reason
    for tensor in adapter.axes(module):
        if not parametrize.is_parametrized(module, tensor):
            continue
        for p in module.parametrizations[tensor]:
            own = [n for n, _ in (*p.named_parameters(), *p.named_buffers())]
            if own or not hasattr(p, "right_inverse"):
                why = (f"which keeps tensors of its own sized by the width ({', '.join(own)})" if own
                       else "which has no right_inverse to take the cut value")
                return (f"its {tensor!r} is parametrized by {type(p).__name__} (torch.nn.utils.parametrize), {why}; "
                        f"remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations(module, "
                        f"{tensor!r}))")
    return None


def check_target(module, name) -> None:
    """The pruning functions' first check of their ``(module, name)``: a
    TypeError naming the argument where ``module`` is no torch.nn.Module or
    ``name`` no str, or where ``module`` holds no tensor ``name`` while a
    child of it does (``pointsparse.nn.Linear``, whose torch Linear is
    ``fn``). (torch's errors were an AttributeError on the tensor, a
    TypeError adding an int to '_orig', or no word of ``fn``.)"""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module (the layer holding the tensor to prune); got "
                        f"{type(module).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, the name of a tensor of the {type(module).__name__} (e.g. 'weight'); "
                        f"got {type(name).__name__}")
    if raw(module, name) is None and _child_holding(module, name) is not None:
        raise TypeError(no_tensor(module, name))


def check_maskable(module, name) -> None:
    """:func:`check_target`, then a TypeError where ``module.name`` is under
    ``torch.nn.utils.parametrize`` (``register_parametrization``,
    ``weight_norm``, ``spectral_norm``): computed from its originals on every
    access, it is no tensor a mask can be put on (torch's error, from
    inside the pruning method, named a ``weight_orig`` parameter and no
    parametrization). The entry points that put a mask on a tensor call it
    before they change anything."""
    check_target(module, name)
    if parametrize.is_parametrized(module, name):
        raise TypeError(f"{type(module).__name__}.{name} is parametrized (torch.nn.utils.parametrize: "
                        "register_parametrization, weight_norm or spectral_norm), computed from its originals on "
                        f"every access: no pruning mask can be put on it; remove the parametrization first, keeping "
                        f"its value (torch.nn.utils.parametrize.remove_parametrizations(module, {name!r})), then prune")


def check_has_values(module, name) -> None:
    """A ValueError where ``module.name`` (its stored tensor) is a meta tensor:
    shape only, nothing for a pruning method to rank (torch's
    ``Tensor.item() cannot be called on meta tensors`` from deep inside)."""
    weight = raw(module, name)
    if isinstance(weight, torch.Tensor) and weight.device.type == "meta":
        raise ValueError(f"{type(module).__name__}.{name} is a meta tensor (shape only, no data): pruning ranks its "
                         "values; initialise or load real weights first (module.to_empty(device='cpu') and an init, "
                         "or load_state_dict)")


def stored(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """:func:`check_target`, then the stored tensor ``name`` (:func:`raw`);
    the TypeError of :func:`no_tensor` where ``module`` holds none (a ReLU,
    a None bias, a compressed layer's weight in its format's buffers)."""
    check_target(module, name)
    weight = raw(module, name)
    if weight is None:
        raise TypeError(no_tensor(module, name))
    return weight


def no_tensor(module: nn.Module, name: str) -> str:
    """"``module`` has no tensor named ``name``", saying which child has one."""
    from ..formats.modules import SparseConv3d, SparseLinear, no_weight_hint  # noqa: PLC0415 - formats sit above

    if isinstance(module, (SparseConv3d, SparseLinear)) and name in ("weight", "bias"):
        return f"{type(module).__name__} has no tensor named {name!r}: {no_weight_hint(module)}"
    child = _child_holding(module, name)
    where = "" if child is None else f" (its child {child!r} has one: prune module.{child})"
    return f"{type(module).__name__} has no tensor named {name!r}{where}"


def _child_holding(module: nn.Module, name: str) -> str | None:
    return next((n for n, c in module.named_children() if raw(c, name) is not None), None)


def raw(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The stored tensor ``name``: ``name_orig`` when a mask re-parametrises it."""
    if name + "_orig" in module._parameters:
        return module._parameters[name + "_orig"]
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The mask of tensor ``name`` (ones = kept), or None when it has none."""
    value = getattr(module, name + "_mask", None)
    return value if isinstance(value, torch.Tensor) else None


def get_mask(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The module's current mask as bool, all True when it has none."""
    found = mask(module, name)
    return torch.ones_like(getattr(module, name), dtype=torch.bool) if found is None else found.detach().bool()


def current_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The parameter as pruned now, differentiable w.r.t. it: ``name_orig *
    name_mask`` for a pruned tensor (never the value cached by the last
    forward), else the parameter itself. An attached Filter Skeleton's scale
    is not in it (a penalty or a gradient taken w.r.t. the parameter reads
    this); the weight the layer runs is :func:`weight_now`."""
    check_target(module, name)
    if name + "_orig" in module._parameters:
        return module._parameters[name + "_orig"] * getattr(module, name + "_mask")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(no_tensor(module, name))
    return weight


def weight_now(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor the layer computes ``name`` with now, differentiable:
    :func:`current_weight` times an attached Filter Skeleton's
    ``name_skeleton`` (``prune.attach_filter_skeleton``; after
    ``prune.remove`` it stays until the next forward folds it). What every
    count of the toolkit reads: sparsity, the report, channel norms, the
    dependency graph's live channels, a re-pruned tensor's ranking."""
    weight = current_weight(module, name)
    skeleton = getattr(module, name + "_skeleton", None)
    return weight * skeleton if isinstance(skeleton, torch.Tensor) else weight


def is_layer(module: nn.Module) -> bool:
    """A layer with its own output channels and an adapter: Linear, torch
    convolutions, ``pointsparse.nn.Conv3d`` (or anything shaped like it), a
    user's."""
    a = adapter_for(module)
    return a is not None and a.kind == "layer" and raw(module, "weight") is not None



def is_norm(module: nn.Module) -> bool:
    """A channel-wise module with an adapter (BatchNorm, a user's norm)."""
    a = adapter_for(module)
    return a is not None and a.kind == "norm"


def is_sparse_conv(module: nn.Module) -> bool:
    """A layer that runs on a kernel map: ``pointsparse.nn.Conv3d``, anything
    shaped like it, or a user's type whose adapter has a ``kernel_map``."""
    a = adapter_for(module)
    return a is not None and a.kernel_map is not None


def layout_of(module: nn.Module, name: str = "weight") -> WeightLayout:
    """The layout of ``module``'s tensor ``name``; ``TypeError`` for modules
    whose weight has no channel structure an adapter describes."""
    weight = stored(module, name)
    if name == "weight" and is_layer(module):
        return adapter_for(module).layout(module)
    if weight.dim() < 2:  # (no layout fits: the advice below would lead to "must have 2 dims")
        raise TypeError(f"cannot tell the channel layout of {type(module).__name__}.{name} (shape "
                        f"{tuple(weight.shape)}): a structured method needs >= 2 dims (out, in, kernel...); prune a "
                        "1-D tensor (a bias, a norm's scale) with l1_unstructured or random_unstructured")
    raise TypeError(
        f"cannot tell the channel layout of {type(module).__name__}.{name} (shape "
        f"{tuple(weight.shape)}); pass layout=WeightLayout(out_axis, in_axis, kernel_axes)"
    )


def out_channel_dim(module: nn.Module) -> int:
    """Axis of the weight that indexes output channels (2 for
    ``pointsparse.nn.Conv3d``'s ``(K, C_in, C_out)``, 1 for torch transposed
    convolutions, 0 otherwise)."""
    return layout_of(module).out_axis


def in_channel_dim(module: nn.Module) -> int:
    return layout_of(module).in_axis


def out_channels(module: nn.Module) -> int:
    dim = out_channel_dim(module)  # (first: a TypeError naming a module without a weight)
    return raw(module).shape[dim]


def in_channels(module: nn.Module) -> int:
    return raw(module).shape[in_channel_dim(module)]


def kernel_volume(module: nn.Module) -> int:
    """The kernel positions the layer's weights hold (1 for Linear): those of
    its ``used_weights``, a ``kernel_region`` conv's region's offsets."""
    w, layout = raw(module), layout_of(module)
    return used_weights(module, w.detach()).numel() // (w.shape[layout.out_axis] * w.shape[layout.in_axis])


def kernel_extents(module: nn.Module) -> tuple[int, ...]:
    """How many kernel positions along each kernel axis the layer's weights
    span (() for Linear): its kernel's shape (a sparse conv's 3-D
    ``kernel_size``), a ``kernel_region`` conv's the box its region spans."""
    layout = layout_of(module)
    used = layout.to_oik(used_mask(module)).any(dim=0).any(dim=0)  # (positions,) flattened
    kernel = getattr(module, "kernel_size", None)
    if layout.kernel_axes == (0,) and isinstance(kernel, tuple):
        shape = kernel
    else:
        shape = tuple(raw(module).shape[a] for a in layout.kernel_axes)
    used = used.reshape(shape)
    spans = []
    for axis in range(used.dim()):
        hit = used.movedim(axis, 0).reshape(used.shape[axis], -1).any(dim=1).nonzero().flatten()
        spans.append(int(hit[-1] - hit[0]) + 1 if len(hit) else 0)
    return tuple(spans)


def used_weights(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """The entries of ``t`` (the weight, or a tensor of its shape) that are
    weights of ``module``: its adapter's ``used_weights`` (a ``kernel_region``
    conv's region's offsets); every entry for a module without an adapter."""
    adapter = adapter_for(module)
    return t if adapter is None else adapter.used_weights(module, t)


def used_entries(module: nn.Module, name: str) -> torch.Tensor:
    """:func:`used_mask` of ``module``'s ``name`` (``"weight"``; every entry
    of another tensor, such as a bias)."""
    return used_mask(module) if name == "weight" else torch.ones_like(raw(module, name), dtype=torch.bool)


def used_mask(module: nn.Module) -> torch.Tensor:
    """A bool tensor of the weight's shape, True at the entries
    :func:`used_weights` keeps (every entry by default; a ``kernel_region``
    conv's inside its region): the weights a procedure's target sparsity
    counts and prunes among."""
    w = raw(module, "weight")
    index = torch.arange(w.numel(), device=w.device).reshape(w.shape)
    used = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
    used[used_weights(module, index).flatten()] = True
    return used.reshape(w.shape)


# ------------------------------------------------------------------ a model's layers
def prunable_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(qualified_name, module)`` for every prunable layer of ``model``."""
    for qualified, module in model.named_modules():
        if is_layer(module):
            yield qualified, module


def _voxel_scorers(model: nn.Module) -> set[int]:
    """The ids of the learned VoxelPrunes' scorers in ``model`` (VoxelSkip's
    own VoxelPrune's too)."""
    from ..nn.modules import VoxelPrune
    return {id(m.scorer) for m in model.modules() if isinstance(m, VoxelPrune) and m.scorer is not None}


def prunable_layers(model: nn.Module, layers: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every prunable layer of ``model`` in definition
    order, or of the named ``layers`` (ValueError naming an unknown or
    unprunable one). A learned VoxelPrune's scorer (the Linear that ranks
    the voxels: the spatial pruning's, not the network's) is one only where
    named."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    named = dict(model.named_modules())
    if layers is None:
        scorers = _voxel_scorers(model)
        out = [(n, m) for n, m in named.items() if is_layer(m) and id(m) not in scorers]
        if not out:
            raise ValueError("model has no prunable layer (Linear, Conv1d/2d/3d, pointsparse.nn.Conv3d)")
        return out
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):  # (a str: one name per character)
        raise TypeError(f"layers must be a list of layer names (['0', 'fc']); got {type(layers).__name__} "
                        f"{layers!r}")
    layers = list(layers)
    wrong = [n for n in layers if not isinstance(n, str)]
    if wrong:
        raise TypeError(f"layers must be a list of layer names (str); got {wrong[0]!r} in it")
    out = []
    for n in layers:
        if n not in named:
            raise ValueError(f"layer {n!r} is not a submodule of the model; prunable layers: "
                             f"{[k for k, m in named.items() if is_layer(m)]}")
        if not is_layer(named[n]):
            raise ValueError(_not_a_layer(n, named[n]))
        out.append((n, named[n]))
    if not out:
        raise ValueError("layers is empty")
    return out


def _not_a_layer(name: str, module: nn.Module) -> str:
    """Why ``layers`` may not name ``module``; a block (a ``Sequential``, a
    ``pointsparse.nn.Linear``, whose torch Linear is its ``fn``) is named
    with the prunable layers inside it, the names to give instead."""
    inside = [f"{name}.{sub}" if name else sub for sub, m in module.named_modules() if sub and is_layer(m)]
    what = type(module).__name__
    if not inside:
        return f"layer {name!r} is a {what}, not a prunable layer"
    where = type(module).__module__
    public = "pointsparse.nn" if where.startswith("pointsparse.nn") else "torch.nn" if where.startswith(
        "torch.nn") else where  # (the name it is built by, not the file it is defined in)
    return (f"layer {name!r} is a {what} ({public}.{what}), not a prunable layer itself; name the prunable "
            f"layer{'s' if len(inside) > 1 else ''} inside it: {inside}")


def masks(model: nn.Module, layers=None) -> dict[str, torch.Tensor]:
    return {n: get_mask(m).clone() for n, m in prunable_layers(model, layers)}


def sparsity(model: nn.Module, layers=None) -> float:
    """Fraction of zero weights over the prunable layers (pruned or exactly 0;
    a ``kernel_region`` conv's inside its region; of the weight the layer
    runs, :func:`weight_now`) and the compressed ones (``formats.compress``:
    the weight their format holds): the weights ``sparsity_report``'s total
    counts, each distinct weight tensor once (layers sharing one, tied
    weights, count it once: an entry is zero when every layer sharing it
    runs it as zero)."""
    from .report import counted_layers, distinct_weight_counts  # noqa: PLC0415 - the report imports this module

    entries, nonzeros = distinct_weight_counts(counted_layers(model, layers))
    return (entries - nonzeros) / max(entries, 1)


def layer_sparsity(model: nn.Module, layers=None) -> dict[str, float]:
    """:func:`sparsity` of each layer, by name (a layer without weights: 0.0,
    as its report row)."""
    return {n: int((w == 0).sum()) / max(w.numel(), 1) for n, w in _counted(model, layers).items()}


def _counted(model: nn.Module, layers) -> dict[str, torch.Tensor]:
    """``{name: the weight entries sparsity_report's row counts}`` of the
    layers it has rows for, or of the named ``layers``."""
    from .report import counted_layers, counted_weights  # noqa: PLC0415 - the report imports this module

    return {n: counted_weights(m) for n, m in counted_layers(model, layers)}


def apply_masks(model: nn.Module, mask_dict: dict[str, torch.Tensor]) -> None:
    """Prune each named layer's weight with the given mask through
    ``custom_from_mask`` (composes with a mask it already has). Each mask is
    a tensor of the weight's shape holding only 0 and 1 (bool or numbers);
    every name and mask is checked before any layer is pruned."""
    if not isinstance(mask_dict, Mapping):
        raise TypeError(f"mask_dict must be a dict {{layer name: mask}}; got {type(mask_dict).__name__}")
    if not mask_dict:
        return
    named = dict(prunable_layers(model, list(mask_dict)))  # (a ValueError naming an unknown or unprunable layer)
    for n, m in mask_dict.items():
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"mask for {n!r} must be a tensor of the weight's shape (True / 1 = kept); got "
                            f"{type(m).__name__}")
        w = raw(named[n])
        if tuple(m.shape) != tuple(w.shape):
            raise ValueError(f"mask for {n!r} must have the weight's shape {tuple(w.shape)}; got {tuple(m.shape)}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):  # (else it scales the weights)
            raise ValueError(f"mask for {n!r} must hold only 0 and 1 (or be a bool tensor)")
    for n, m in mask_dict.items():
        custom_from_mask(named[n], "weight", m.to(raw(named[n]).device))
        keep_copyable(named[n])  # (deep-copyable after a forward, as the toolkit's own methods leave layers)


from . import _builtins  # noqa: E402,F401  (registers the built-in adapters)
