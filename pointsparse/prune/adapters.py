"""One adapter per layer type: what the pruning toolkit needs to know about a
layer, looked up by type (most derived class first) and extensible by users.

An adapter says

* ``kind``: ``"layer"`` (input channels in, a new set of output channels out:
  convolutions, Linear) or ``"norm"`` (channel-wise: its output channels are
  its input channels, e.g. BatchNorm);
* ``axes(module)``: for each parameter or buffer, the axis of its output
  channels (``"out"``) and of its input channels (``"in"``);
* ``layout(module)``: the weight's :class:`~pointsparse.prune._layout.WeightLayout`
  (out, in and kernel axes) for the structured pruning methods;
* ``set_channels(module, role, n)``: updates the width attributes after a cut;
* ``per_site``: True when the layer is linear at each site (a Linear, a 1x1
  conv without padding): a constant input channel then adds a constant to
  every output, which can be folded into the bias.

The raw weight (``name_orig`` of a masked tensor) and the mask are read with
:func:`raw` and :func:`mask` for every type alike.

Register an adapter for a layer type of your own with :func:`register`::

    prune.adapters.register(MyConv, prune.adapters.LayerAdapter(
        axes=lambda m: {"weight": {"out": 0, "in": 1}, "bias": {"out": 0}}))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ._layout import SPARSE_CONV, WeightLayout, dense_layout

Axes = dict[str, dict[str, int]]


def _set_conv(module: nn.Module, role: str, n: int) -> None:
    setattr(module, "out_channels" if role == "out" else "in_channels", n)


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

    def __post_init__(self) -> None:
        if self.kind not in ("layer", "norm"):
            raise ValueError(f"kind must be 'layer' or 'norm'; got {self.kind!r}")

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
        if self.kind == "norm":
            return self.channels(module, "out")
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
    """The adapter of the most derived registered class of ``module``, or None."""
    for cls in type(module).__mro__:
        found = _REGISTRY.get(cls)
        if found is not None:
            return found
    return None


def raw(module: nn.Module, name: str) -> torch.Tensor | None:
    """The stored tensor ``name``: ``name_orig`` when a mask re-parametrises it."""
    if name + "_orig" in module._parameters:
        return module._parameters[name + "_orig"]
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def mask(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The mask of tensor ``name`` (ones = kept), or None when it has none."""
    value = getattr(module, name + "_mask", None)
    return value if isinstance(value, torch.Tensor) else None


def is_layer(module: nn.Module) -> bool:
    """A registered layer with its own output channels (conv, Linear, ...)."""
    a = adapter_for(module)
    return a is not None and a.kind == "layer" and raw(module, "weight") is not None


# ------------------------------------------------------------------ built-ins
def _torch_conv_axes(m) -> Axes:
    transposed = isinstance(m, nn.modules.conv._ConvTransposeNd)
    return {"weight": {"out": 1, "in": 0} if transposed else {"out": 0, "in": 1}, "bias": {"out": 0}}


def _torch_conv_supported(m) -> str | None:
    return None if m.groups == 1 else f"grouped convolution (groups={m.groups})"


def _torch_conv_per_site(m) -> bool:
    return (all(k == 1 for k in m.kernel_size) and all(p == 0 for p in m.padding)
            and not isinstance(m, nn.modules.conv._ConvTransposeNd))


def _linear_set(m, role, n) -> None:
    setattr(m, "out_features" if role == "out" else "in_features", n)


def _norm_set(m, role, n) -> None:
    m.num_features = n


_NORM_AXES = {"weight": {"out": 0}, "bias": {"out": 0}, "running_mean": {"out": 0}, "running_var": {"out": 0}}


def _sparse_conv_adapter() -> LayerAdapter:
    return LayerAdapter(
        axes=lambda m: {"weight": {"out": 2, "in": 1}, "bias": {"out": 0}},
        layout_fn=lambda m: SPARSE_CONV,
        per_site=lambda m: m.kernel_volume == 1 and not m.transposed,
    )


def _register_builtins() -> None:
    conv = LayerAdapter(axes=_torch_conv_axes, per_site=_torch_conv_per_site, supported=_torch_conv_supported,
                        layout_fn=lambda m: (WeightLayout(1, 0, tuple(range(2, raw(m, "weight").dim())))
                                             if isinstance(m, nn.modules.conv._ConvTransposeNd)
                                             else dense_layout(raw(m, "weight").dim())))
    register(nn.modules.conv._ConvNd, conv)
    register(nn.Linear, LayerAdapter(axes=lambda m: {"weight": {"out": 0, "in": 1}, "bias": {"out": 0}},
                                     set_channels=_linear_set, per_site=lambda m: True))
    register(nn.modules.batchnorm._BatchNorm, LayerAdapter(axes=lambda m: dict(_NORM_AXES), kind="norm",
                                                           set_channels=_norm_set))
    from ..nn import Conv3d
    register(Conv3d, _sparse_conv_adapter())


_register_builtins()
