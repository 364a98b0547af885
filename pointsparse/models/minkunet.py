"""MinkUNet: the sparse residual U-Net used for LiDAR and indoor semantic
segmentation (stem, four stride-2 encoder stages, four transposed decoder
stages with skip concatenation, a per-voxel classifier)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import nn as spnn
from ..nn._hooks import SparseBackwardHooks
from ..nn.fuse import has_hooks, has_output_hooks
from ..tensor import SparseTensor, as_float, check_memory_for, positive_int

# Output widths of the stem, the four encoder and the four decoder stages.
BASE_WIDTHS = (32, 32, 64, 128, 256, 256, 128, 96, 96)


class ConvBlock(SparseBackwardHooks, nn.Sequential):
    """conv - batch norm - ReLU (``transposed=True`` for the upsampling)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, transposed: bool = False):
        super().__init__(
            spnn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, transposed=transposed),
            spnn.BatchNorm(out_channels),
            spnn.ReLU(inplace=True),
        )


class ResidualBlock(SparseBackwardHooks, nn.Module):
    """conv3-bn-relu-conv3-bn plus the identity (a 1x1 conv + bn when the
    channel count changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3):
        super().__init__()
        self.main = nn.Sequential(
            spnn.Conv3d(in_channels, out_channels, kernel_size),
            spnn.BatchNorm(out_channels),
            spnn.ReLU(inplace=True),
            spnn.Conv3d(out_channels, out_channels, kernel_size),
            spnn.BatchNorm(out_channels),
        )
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(spnn.Conv3d(in_channels, out_channels, 1), spnn.BatchNorm(out_channels))
        self.relu = spnn.ReLU(inplace=True)
        #: Index in ``main`` of the conv whose store takes the sum and the
        #: ReLU (set by :meth:`fuse_residual`), or None.
        self.sum_in_conv: int | None = None

    def fuse_residual(self) -> bool:
        """For inference, once ``main``'s last BatchNorm is folded into its
        last conv (``nn.fuse_for_inference`` calls this): that conv takes
        the shortcut and the block's ReLU into its store
        (``relu(conv(h) + shortcut(x))``, one pass instead of a sum and a
        ReLU of their own over the output). True where it did: ``main`` a
        ``Sequential`` ending in a :class:`~pointsparse.nn.Conv3d` without a
        ReLU of its own (then only ``nn.Identity``) and the block's ReLU a
        :class:`~pointsparse.nn.ReLU` without forward hooks (a VoxelPrune
        on the sum, ``models.add_voxel_prune``, runs before it; a caller's
        hook on its output), and that conv without forward hooks on its
        output (they would see the sum's ReLU, not the conv's output)."""
        if self.sum_in_conv is not None or not isinstance(self.main, nn.Sequential) \
                or not isinstance(self.relu, spnn.ReLU) or has_hooks(self.relu):
            return False
        layers = list(self.main)
        last = max((i for i, m in enumerate(layers) if not isinstance(m, nn.Identity)), default=None)
        if last is None or type(layers[last]) is not spnn.Conv3d or layers[last].relu or \
                has_output_hooks(layers[last]):
            return False
        layers[last].relu = True
        self.relu = nn.Identity()
        self.sum_in_conv = last
        return True

    def forward(self, x: SparseTensor) -> SparseTensor:
        fused = getattr(self, "sum_in_conv", None)  # (blocks pickled before it existed have none)
        if fused is not None:
            # (a Conv3d, or what formats.compress made of it: a conv with its ReLU in its store, taking add=)
            if not (isinstance(self.main, nn.Sequential) and fused < len(self.main)
                    and getattr(self.main[fused], "relu", None) is True):
                raise ValueError("ResidualBlock: fuse_for_inference moved this block's sum and ReLU into main's "
                                 f"conv {fused}, which main no longer holds; change main (e.g. wrap it in "
                                 "VoxelSkip) before fusing")
            y = x
            for i, layer in enumerate(self.main):
                y = layer(y, add=self.shortcut(x)) if i == fused else layer(y)
            return y
        if isinstance(self.main, spnn.VoxelSkip):  # its zero rows need not be written and summed
            return self.relu(self.main.add_to(x, self.shortcut(x)))
        return self.relu(spnn.add(self.main(x), self.shortcut(x)))


#: Residual blocks a stage at most (MinkUNet18-style layouts use 2; a
#: checkpoint's config asking for millions would build for ever).
MAX_BLOCKS = 64

#: The most parameter values a MinkUNet / SPVCNN may hold in all (checked
#: before any layer is built): 2^31, 8 GiB of float32.
MAX_PARAMETERS = 2**31


def check_arguments(in_channels, num_classes, cr, blocks) -> tuple[int, int, float, int, tuple[int, ...]]:
    """MinkUNet's (and SPVCNN's) arguments checked: ``(in_channels,
    num_classes, cr, blocks, widths)``, or a ValueError naming the argument
    (a TypeError for a count that is no int: a float, a bool)."""
    in_channels, num_classes, blocks = (positive_int(v, name) for name, v in (
        ("in_channels", in_channels), ("num_classes", num_classes), ("blocks", blocks)))
    if blocks > MAX_BLOCKS:
        raise ValueError(f"blocks must be at most {MAX_BLOCKS} residual blocks a stage; got {blocks}")
    try:
        value = as_float(cr, "cr")
    except TypeError:
        value = None
    if value is None or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"cr must be a positive number; got {cr!r}")
    widths = [c * value for c in BASE_WIDTHS]
    if not all(math.isfinite(w) and w <= MAX_PARAMETERS for w in widths):  # (even one such width is far over)
        raise ValueError(f"cr={value} is too large: stage widths of {max(widths):.3g} channels would put the model "
                         f"far over {MAX_PARAMETERS:,} (2^31) parameter values")
    return in_channels, num_classes, value, blocks, tuple(max(1, int(round(w))) for w in widths)


def _conv_bn(cin: int, cout: int, volume: int) -> int:
    return volume * cin * cout + 2 * cout  # a bias-free Conv3d + BatchNorm (weight, bias)


def _residual(cin: int, cout: int) -> int:
    n = _conv_bn(cin, cout, 27) + _conv_bn(cout, cout, 27)
    return n + (_conv_bn(cin, cout, 1) if cin != cout else 0)


def unet_parameters(in_channels: int, widths: tuple[int, ...], blocks: int) -> int:
    """The parameter values of a MinkUNet of these widths without its
    classifier, counted from the widths (as :class:`MinkUNet` builds it)."""
    w = widths
    n = _conv_bn(in_channels, w[0], 27) + _conv_bn(w[0], w[0], 27)
    for i in range(1, 5):
        n += _conv_bn(w[i - 1], w[i - 1], 8) + _residual(w[i - 1], w[i]) + (blocks - 1) * _residual(w[i], w[i])
    prev = w[4]
    for j, i in enumerate(range(5, 9)):
        n += _conv_bn(prev, w[i], 8) + _residual(w[i] + w[3 - j], w[i]) + (blocks - 1) * _residual(w[i], w[i])
        prev = w[i]
    return n


def check_parameters(model: str, total: int, in_channels: int, num_classes: int, cr: float, blocks: int) -> None:
    """ValueError naming the arguments where ``total`` parameter values are
    over :data:`MAX_PARAMETERS`."""
    if total > MAX_PARAMETERS:
        raise ValueError(f"{model}(in_channels={in_channels}, num_classes={num_classes}, cr={cr}, blocks={blocks}) "
                         f"would have {total:,} parameter values; at most {MAX_PARAMETERS:,} (2^31) in all "
                         "(use a smaller cr, blocks or channel count)")
    check_memory_for(total * torch.get_default_dtype().itemsize, None,
                     f"{model}(in_channels={in_channels}, num_classes={num_classes}, cr={cr}, blocks={blocks}) with "
                     f"{total:,} parameter values", "use a smaller cr, blocks or channel count")


def _blocks(stage: nn.Module) -> tuple[nn.Module, ...]:
    """The modules to call in turn for ``stage``: a plain ``nn.Sequential``
    (no hooks of its own) block by block, so that the forward that calls
    them lets each block's input die once the next block has it (called
    whole, the call held the joined decoder input, the stage's widest
    tensor, through every block: in inference on 8 KITTI sweeps, about a
    fifth of MinkUNet's peak memory); any other stage whole."""
    return tuple(stage) if type(stage) is nn.Sequential and not has_hooks(stage) else (stage,)


class MinkUNet(SparseBackwardHooks, nn.Module):
    """Sparse residual U-Net for per-voxel classification.

    Args:
        in_channels: input feature channels per voxel.
        num_classes: output logits per voxel.
        cr: width multiplier applied to every stage width
            (32, 32-64-128-256 down, 256-128-96-96 up).
        blocks: residual blocks per stage (2 as in the usual MinkUNet18-style
            layout; at most :data:`MAX_BLOCKS`).

    A ValueError names the arguments where the model would hold more than
    :data:`MAX_PARAMETERS` parameter values (checked before any layer is
    built).

    ``forward(x)`` takes a stride-1 SparseTensor and returns a SparseTensor on
    the same coords with ``num_classes`` channels.

    ``widths``: the nine stage widths the model was built with (stem, four
    down, four up stages). A channel cut narrows layers, not this record;
    ``prune.graph.widths(model)`` gives each layer's widths as they are.
    """

    def __init__(self, in_channels: int, num_classes: int, cr: float = 1.0, blocks: int = 2):
        super().__init__()
        in_channels, num_classes, cr, blocks, w = check_arguments(in_channels, num_classes, cr, blocks)
        check_parameters(type(self).__name__, unet_parameters(in_channels, w, blocks) + (w[8] + 1) * num_classes,
                         in_channels, num_classes, cr, blocks)
        self.in_channels, self.num_classes, self.cr = in_channels, num_classes, cr
        self.widths = w
        self.stem = nn.Sequential(ConvBlock(in_channels, w[0]), ConvBlock(w[0], w[0]))
        self.down = nn.ModuleList()
        for i in range(1, 5):
            layers = [ConvBlock(w[i - 1], w[i - 1], kernel_size=2, stride=2), ResidualBlock(w[i - 1], w[i])]
            layers += [ResidualBlock(w[i], w[i]) for _ in range(blocks - 1)]
            self.down.append(nn.Sequential(*layers))
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        prev = w[4]
        for j, i in enumerate(range(5, 9)):
            skip = w[3 - j]
            self.up.append(ConvBlock(prev, w[i], kernel_size=2, stride=2, transposed=True))
            layers = [ResidualBlock(w[i] + skip, w[i])] + [ResidualBlock(w[i], w[i]) for _ in range(blocks - 1)]
            self.fuse.append(nn.Sequential(*layers))
            prev = w[i]
        self.classifier = spnn.Linear(w[8], num_classes)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if not isinstance(x, SparseTensor):
            raise TypeError(f"MinkUNet takes a SparseTensor; got {type(x).__name__}")
        if x.num_channels != self.in_channels:
            raise ValueError(f"MinkUNet was built for {self.in_channels} input channels; got {x.num_channels}")
        if x.stride != (1, 1, 1):
            raise ValueError(f"MinkUNet needs a stride-1 input tensor; got stride {x.stride}")
        skips = [self.stem(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        y = skips.pop()
        for up, fuse in zip(self.up, self.fuse):
            y = up(y)  # (the stage's input dies before the cat allocates)
            y = spnn.cat([y, skips.pop()])
            for block in _blocks(fuse):  # (here, not in a function's frame, which would hold the stage's input)
                y = block(y)
        return self.classifier(y)
