"""Channel tracing for :mod:`pointsparse.prune.graph`: one forward pass under a
``TorchFunctionMode`` that tags every tensor carrying channels with where its
channels come from.

A *space* is the output channels of one layer (a conv, a Linear): a numbered
set of channels. A tensor's tag says, for its channel axis, which stretch of
positions holds which channels of which space (``Segment``); untagged
positions hold channels no layer of the model can change (the network input).
Ops that keep channels apart (activations, dropout, row gathers, pooling,
scatter over rows, devoxelisation) pass tags on; ``cat`` along channels
concatenates them; ops that combine two tagged tensors element-wise (``+``,
``nn.add``) couple their spaces channel by channel; a norm over channels
of order >= 0 (a zero channel adds nothing to it: a magnitude VoxelPrune's
scores) gives a tensor of no channels and leaves them cuttable; ops that
mix channels with weights the graph does not know (``matmul``, ``softmax``
over channels, an unregistered layer with parameters), other reductions
over channels, writes into some channel positions (``z[:, 1] = 0``), values
handed out of torch (``numpy()``: the C++ core's arrays, where a conv of a
weight no registered layer runs or a compressed layer uses them) and the
network output *fix* the spaces they touch: those channels are never cut.

A tensor's width can also come from a number: ``torch.ones(y.shape)``,
``y.new_zeros(n, y.size(1))``. Reading the shape of a tagged tensor hands out
its channel count as a :class:`Width` (an ``int`` that names its channels), in
the ``torch.Size`` too; a factory, ``expand`` or ``repeat`` sized by one has
those channels on that axis, a ``view`` or ``reshape`` couples them with the
ones it keeps there, a slice of channels bounded by one where it is
(``cat([y, z], 1)[:, y.shape[1]:]``) couples them with those before the bound,
and any other use (a number computed from it, ``y / y.shape[1]``,
``torch.arange(c)``) fixes them. A width turned into a plain ``int``
(``int(c)``) is followed by its value: a plain int equal to it fixes it.
``range(c)``, ``operator.index(c)``, ``[0] * c`` and numpy read an int
subclass's value without calling it (CPython never calls ``__index__`` on
one): those widths go untracked, a known gap. Any
other slice bound (a literal ``6``) stays where it is while the cut moves the
channels before it: they are fixed. A float computed from a width (``c / 2``,
``2 / c``, ``c ** -0.5``, ``c * 0.5``, ``float(c)``, ``math.sqrt(c)``) names
no channels: they are fixed where it is made. ``1.0 / c`` (a float on the
left) calls nothing of the width: a float equal to the reciprocal of a width
handed out fixes its channels, as an int equal to ``int(c)`` does.

Spaces that must lose the same channels are merged in a union-find whose
links carry an offset (a space may be a stretch of a larger one, as the
halves of a concatenation that a residual add joins)."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from . import adapters


@dataclass(frozen=True)
class Segment:
    """Positions ``pos .. pos + length * repeat`` of a channel axis hold
    channels ``offset .. offset + length`` of ``space``, each repeated
    ``repeat`` times in a row (a ``Flatten`` of ``C x H x W``)."""

    pos: int
    length: int
    space: int
    offset: int
    repeat: int = 1

    @property
    def end(self) -> int:
        return self.pos + self.length * self.repeat


@dataclass(frozen=True)
class Tag:
    axis: int
    segments: tuple[Segment, ...]


NEUTRAL = Tag(-1, ())  # a fresh constant (zeros, ones): fits any channel layout


class _Token:
    """One trace: the widths it handed out carry it (a width kept from another
    trace, in a module's attribute, is a plain number there), and it keeps
    the widths turned into plain ints, and the reciprocals of those it
    handed out, by value. ``tracer``: the trace's, while it runs."""

    def __init__(self, tracer: Tracer) -> None:
        self.escaped: dict[int, tuple[Segment, ...]] = {}
        self.reciprocals: dict[float, tuple[Segment, ...]] = {}
        self.tracer: Tracer | None = tracer

    def fix(self, segments: tuple[Segment, ...], reason: str) -> None:
        """Fix channels now (a width kept past its trace, in a module's
        attribute, fixes nothing of the graph it built)."""
        if self.tracer is not None:
            self.tracer.fix(Tag(0, segments), reason)

    def escape(self, value: int, segments: tuple[Segment, ...]) -> None:
        """A width turned into a plain int: any int of its value may be it."""
        self.escaped[value] = self.escaped.get(value, ()) + segments

    def handed_out(self, value: int, segments: tuple[Segment, ...]) -> None:
        """A width read off channels: ``1.0 / c`` (a float on the left) is
        divided in float's own code, which reads the int's digits and calls
        nothing of the width; the reciprocal, the common form, is followed by
        its value as ``int(c)`` is (1.0, of a width of 1, is every float's
        factor of one: not followed; a channel is never cut alone)."""
        if value > 1:
            self.reciprocals[1.0 / value] = self.reciprocals.get(1.0 / value, ()) + segments


class Width(int):
    """The size of a tagged tensor's channel axis, as ``y.shape[1]`` or
    ``y.size(-1)`` hand it out while tracing: an ``int`` that knows its
    channels (``segments``). ``exact``: the width itself; one computed from
    it (``2 * c``, ``c // 2``, ``y.numel()``) follows no axis the graph can
    name, only the channels it must fix."""

    segments: tuple[Segment, ...]
    exact: bool
    token: _Token

    def __new__(cls, value: int, segments: tuple[Segment, ...], exact: bool, token: _Token) -> Width:
        w = super().__new__(cls, value)
        w.segments, w.exact, w.token = segments, exact, token
        return w

    def __int__(self) -> int:  # (int(c): the value goes on where nothing names its channels)
        value = int.__int__(self)
        self.token.escape(value, self.segments)
        return value

    def __float__(self) -> float:  # (float(c), math.sqrt(c), math.exp(c): a float, which names no channels)
        self.token.fix(self.segments, "a float computed from its width")
        return int.__float__(self)

    def __reduce__(self):  # (copied or pickled with a module that kept it: a plain int)
        return int, (int.__int__(self),)


def _derived(op: str):
    def compute(self, *others):
        value = getattr(int, op)(self, *others)
        if isinstance(value, bool):
            return value
        segments = self.segments + tuple(s for o in others if isinstance(o, Width) and o.token is self.token
                                         for s in o.segments)
        if isinstance(value, int):
            return Width(value, segments, False, self.token)
        if isinstance(value, tuple):  # (divmod)
            return tuple(Width(v, segments, False, self.token) for v in value)
        # a float (c / 2, 2 / c, c ** -0.5), or a number the other operand's own code computes (c * 0.5, c + 1.5):
        # it names no channels, and the cut changes it (a tensor is no such operand: its op sees the width)
        if value is not NotImplemented or not any(isinstance(o, torch.Tensor) for o in others):
            self.token.fix(segments, "a float computed from its width")
        return value
    compute.__name__ = op
    return compute


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "divmod", "pow", "lshift", "rshift", "and", "or",
            "xor"):
    setattr(Width, f"__{_op}__", _derived(f"__{_op}__"))
    setattr(Width, f"__r{_op}__", _derived(f"__r{_op}__"))
for _op in ("neg", "pos", "abs", "invert", "round", "trunc", "floor", "ceil"):
    setattr(Width, f"__{_op}__", _derived(f"__{_op}__"))


class Spaces:
    """Union-find over channel spaces with offsets: ``find(s) = (root, shift)``
    means channel ``i`` of ``s`` is channel ``i + shift`` of ``root``."""

    def __init__(self) -> None:
        self.size: list[int] = []
        self.parent: list[int] = []
        self.shift: list[int] = []
        self.fixed: list[str | None] = []

    def new(self, size: int) -> int:
        self.size.append(size)
        self.parent.append(len(self.parent))
        self.shift.append(0)
        self.fixed.append(None)
        return len(self.size) - 1

    def find(self, s: int) -> tuple[int, int]:
        shift = 0
        while self.parent[s] != s:
            shift += self.shift[s]
            s = self.parent[s]
        return s, shift

    def fix(self, s: int, reason: str) -> None:
        root, _ = self.find(s)
        if self.fixed[root] is None:
            self.fixed[root] = reason

    def _attach(self, child: int, root: int, shift: int) -> None:
        self.parent[child], self.shift[child] = root, shift
        if self.fixed[child] is not None and self.fixed[root] is None:
            self.fixed[root] = self.fixed[child]

    def union(self, a: int, off_a: int, b: int, off_b: int) -> None:
        """Channel ``off_a + i`` of ``a`` is channel ``off_b + i`` of ``b``."""
        ra, sa = self.find(a)
        rb, sb = self.find(b)
        pa, pb = off_a + sa, off_b + sb
        if ra == rb:
            if pa != pb:
                self.fix(ra, "channels coupled to themselves with a shift")
            return
        d = pa - pb  # channel k of rb is channel k + d of ra
        if 0 <= d and d + self.size[rb] <= self.size[ra]:
            self._attach(rb, ra, d)
        elif d <= 0 and self.size[ra] - d <= self.size[rb]:
            self._attach(ra, rb, -d)
        else:  # partial overlap: a new root spanning both
            low = min(0, d)
            top = self.new(max(self.size[ra], d + self.size[rb]) - low)
            self._attach(ra, top, -low)
            self._attach(rb, top, d - low)


def _name(func) -> str:
    n = getattr(func, "__name__", "") or ""
    if n == "__get__":  # a property (y.T, y.mT): its getter, named by the property
        n = getattr(getattr(func, "__self__", None), "__name__", n)
    if n.startswith("__") and n.endswith("__"):
        n = n[2:-2]
        if n.startswith(("r", "i")) and n[1:] in ("add", "sub", "mul", "truediv", "floordiv", "pow", "matmul",
                                                  "and", "or", "xor", "mod", "div"):
            n = n[1:]
    return n[:-1] if n.endswith("_") and not n.endswith("__") else n


_FACTORIES = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"}
# a fresh constant shaped like its input, as wide as it after the cut too: it has its channels (taken for a
# constant of any layout, the half of cat([y, zeros_like(y)], 1) it fills was left whole in the next layer)
_LIKE = {"zeros_like", "ones_like", "empty_like", "full_like"}
_MIX = {"matmul", "mm", "bmm", "einsum", "linear", "bilinear", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
        "conv_transpose2d", "conv_transpose3d", "tensordot", "addmm", "baddbmm", "addmv", "mv", "outer", "inner",
        "dot", "kron", "layer_norm", "group_norm", "instance_norm", "batch_norm", "embedding", "cross",
        # (normalised over, shuffled across, compared over or placed by their position)
        "rms_norm", "local_response_norm", "channel_shuffle", "native_channel_shuffle", "pixel_shuffle",
        "pixel_unshuffle", "cdist", "take", "put", "diag", "diag_embed", "diagflat", "diagonal", "trace", "as_strided",
        "masked_scatter"}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "logsumexp", "nansum",
           "nanmean", "median", "all", "any", "argmax", "argmin", "count_nonzero", "std_mean", "var_mean", "nanmedian",
           "special_logsumexp"}
_ALONG = {"softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "normalize", "sort",
          "argsort", "topk", "index_select", "index_add", "index_copy", "index_fill", "index_reduce", "scatter",
          "scatter_add", "scatter_reduce", "gather", "narrow", "roll", "flip", "split", "chunk", "unbind", "select",
          "take_along_dim", "kthvalue", "mode", "renorm", "diff", "tensor_split", "softmin", "special_softmax",
          "special_log_softmax", "fft_fftshift", "fft_ifftshift", "rot90"}
# torch.fft's transforms, along a dim that comes third (fft(x, n, dim, norm), fft2(x, s, dim, norm), ...); unknown
# by name, they passed the channels on as an activation does, and an fft over channels left them cuttable
_FFT = {f"fft_{kind}{rank}": default for kind in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")
        for rank, default in (("", -1), ("2", (-2, -1)), ("n", None))}
_ALONG |= set(_FFT)
_SHAPE = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "expand",
          "expand_as", "broadcast_to"}
_PERMUTE = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "mT", "T", "adjoint", "H",
            "mH"}
_CAT = {"cat", "concat", "concatenate"}
# ops whose sizes are a list of numbers, one for each axis of their result: a width there sizes that axis. Where
# their result is fresh along it (a factory; expand, repeat or tile of an axis of 1) it has the width's channels;
# otherwise (view, reshape, sum_to_size) the channels the op keeps on that axis must be cut with the width's
_MADE = {"ones", "zeros", "empty", "full", "rand", "randn", "new_ones", "new_zeros", "new_empty", "new_full"}
_SIZED = _MADE | {"expand", "broadcast_to", "repeat", "tile", "view", "reshape", "sum_to_size"}
# reads of a shape: the channel axis's size comes out as a Width; numel (nelement runs it), as a number computed
# from it; len(), as a plain int (Python makes one of what __len__ returns): followed by its value
_READS = {"shape", "size", "len", "numel"}
# p-norms (p >= 0) over channels: a zero (masked) channel adds nothing to them, so the cut of masked channels
# leaves the result as it was and the result holds no channels (a magnitude VoxelPrune's voxel scores)
_NORMS = {"norm", "linalg_vector_norm", "linalg_norm"}  # (linalg.norm's matrix norms too: a zero column adds nothing)
# a tensor's values handed out of torch (the C++ core takes numpy views: the engine's conv of a weight no registered
# layer runs, a compressed layer's format): what is done with its channels there, the graph does not see
_LEAVE = {"numpy", "array", "tolist"}


def _numbered_axis(name, args, kwargs, out, axis: int) -> bool:
    """Whether a ``view`` / ``reshape`` / ``expand`` / ``broadcast_to`` /
    ``unflatten`` gives axis ``axis`` of its result ``out`` a size written as a
    plain number (``nn.Unflatten(1, (c, 1, 1))``, ``view(b, self.c, 1, 1)``),
    not read off a tensor (a :class:`Width`) nor inferred (-1): it stays that
    number after a cut, and the op then fails."""
    if name == "unflatten":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        sizes = kwargs.get("sizes", args[2] if len(args) > 2 else None)
        if not isinstance(dim, int) or not isinstance(sizes, (tuple, list)):
            return False
        dim = dim % (out.dim() - len(sizes) + 1)
        if not dim <= axis < dim + len(sizes):
            return False
        size = sizes[axis - dim]
    elif name in ("view", "reshape", "expand", "broadcast_to"):
        sizes = _size_arg(args, kwargs)
        if len(sizes) != out.dim():
            return False
        size = sizes[axis]
    else:
        return False
    return isinstance(size, (int, np.integer)) and not isinstance(size, (bool, Width)) and int(size) != -1


def _size_arg(args, kwargs) -> list:
    """The sizes an op of :data:`_SIZED` is given: a ``size`` (``shape``,
    ``dims``) keyword, its first argument after the tensor it works on where
    that is a list (``torch.full(size, value)``), else its numbers
    (``torch.ones(2, c)``, ``y.expand(2, n, c)``)."""
    for key in ("size", "shape", "sizes", "dims"):
        if key in kwargs:
            return list(kwargs[key]) if isinstance(kwargs[key], (tuple, list)) else [kwargs[key]]
    rest = list(args[1:] if args and isinstance(args[0], torch.Tensor) else args)
    if rest and isinstance(rest[0], (tuple, list)):
        return list(rest[0])
    numbers = []
    for n in rest:
        if not isinstance(n, int) or isinstance(n, bool):
            break
        numbers.append(n)
    return numbers


def _dims(value, ndim: int):
    if value is None:
        return None
    vals = value if isinstance(value, (tuple, list)) else (value,)
    try:
        return {int(v) % ndim for v in vals} if ndim else set()
    except (TypeError, ValueError):
        return None


# ops along a dim whose dim comes third, after one other argument (split(x, size, dim), topk(x, k, dim),
# roll(x, shifts, dims), normalize(x, p, dim), ...), with the dim they take where none is given (None: the
# flattened tensor, every axis); reading their second argument as the dim took topk(x, 2, 1) along axis 0
_DIM_THIRD = {"split": 0, "chunk": 0, "tensor_split": 0, "topk": -1, "kthvalue": -1, "diff": -1, "normalize": 1,
              "roll": None, "take_along_dim": None, "rot90": (0, 1), **_FFT}
# ops on axes that their name implies, with no dim argument (triu's second argument is its diagonal); taken for
# element-wise ops, fliplr(y) or triu(y) on (N, C) feats left the channels they move or zero by position cuttable
_IMPLIED = {"fliplr": 1, "flipud": 0, "msort": 0, "triu": (-2, -1), "tril": (-2, -1)}
# pooling and interpolation act on an input's trailing (spatial) axes: this many (None: all but the first two);
# avg_pool1d on (N, C) feats pools along the channels
_SPATIAL = {**{f"{pool}{k}d{tail}": k for k in (1, 2, 3) for tail in ("", "_with_indices")
               for pool in ("avg_pool", "max_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool",
                            "fractional_max_pool", "max_unpool")},
            "interpolate": None, "upsample": None, "upsample_nearest": None, "upsample_bilinear": None}
# pad(x, pad): (left, right) of the last axis, then of the one before...; a pad of (1, -1) on the channels shifts
# them at the same width
_PAD = {"pad", "constant_pad_nd"}


# reductions whose keepdim comes fourth, after ``unbiased`` (std(x, dim, unbiased, keepdim)); reading their third
# argument as keepdim took std(x, 0, True) for a result that keeps the reduced axis, and lost the channels
_KEEPDIM_FOURTH = {"std", "var", "std_mean", "var_mean"}


def _along(name: str, args, kwargs, ndim: int):
    """The axes an op of :data:`_ALONG`, :data:`_IMPLIED`, :data:`_SPATIAL` or :data:`_PAD` works along (None:
    unknown)."""
    if name in _SPATIAL:
        return set(range(2 if _SPATIAL[name] is None else max(ndim - _SPATIAL[name], 0), ndim))
    if name in _PAD:
        pad = list(kwargs.get("pad", args[1] if len(args) > 1 else ()))
        return {ndim - 1 - i for i in range(len(pad) // 2) if pad[2 * i] or pad[2 * i + 1]}
    return _dims(_IMPLIED[name] if name in _IMPLIED else _dim_arg(args, kwargs, name), ndim)


def _dim_arg(args, kwargs, name: str | None = None):
    if "dim" in kwargs:
        return kwargs["dim"]
    if "dims" in kwargs:
        return kwargs["dims"]
    at = 2 if name in _DIM_THIRD else 1
    if len(args) > at and isinstance(args[at], (int, tuple, list)) and not isinstance(args[at], bool):
        return args[at]
    return _DIM_THIRD.get(name)


def _norm_args(x, args, kwargs):
    """``(order, dims, keepdim)`` of ``norm(x, p, dim, keepdim)`` or
    ``linalg.vector_norm(x, ord, dim, keepdim)`` (``dims``: every axis
    where no dim is given; None where it cannot be read)."""
    order = kwargs.get("p", kwargs.get("ord", args[1] if len(args) > 1 else 2))
    dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    return order, set(range(x.dim())) if dim is None else _dims(dim, x.dim()), bool(keepdim)


def _zero_blind(order) -> bool:
    """A norm of this order is one that a zero entry adds nothing to (order >= 0, or ``"fro"``)."""
    return order == "fro" or (isinstance(order, (int, float)) and not isinstance(order, bool) and order >= 0)


def _numbers(values) -> list:
    """``values`` flattened, a slice's bounds and step among them (a pytree
    leaf of its own: a width there was seen by no rule)."""
    return [v for n in tree_flatten(values)[0] for v in ((n.start, n.stop, n.step) if isinstance(n, slice) else (n,))]


def shift_segments(segs, delta: int) -> tuple[Segment, ...]:
    return tuple(replace(s, pos=s.pos + delta) for s in segs)


def slice_segments(segs, start: int, stop: int) -> tuple[Segment, ...] | None:
    """Segments of positions ``start .. stop`` (renumbered from 0); None when
    the cut splits a repeated channel."""
    out = []
    for s in segs:
        lo, hi = max(s.pos, start), min(s.end, stop)
        if lo >= hi:
            continue
        if (lo - s.pos) % s.repeat or (hi - s.pos) % s.repeat:
            return None
        first = (lo - s.pos) // s.repeat
        out.append(Segment(lo - start, (hi - lo) // s.repeat, s.space, s.offset + first, s.repeat))
    return tuple(out)


class Tracer(TorchFunctionMode):
    """Records tags while active; see the module docstring. ``on_layer`` is
    called for the outermost call of each registered or opaque module."""

    def __init__(self, spaces: Spaces) -> None:
        super().__init__()
        self.spaces = spaces
        self.tags: dict[int, tuple[torch.Tensor, Tag]] = {}
        self.depth = 0
        self.token = _Token(self)
        self.taken: list[Width] = []  # widths the rule of the op being traced has followed (no more to fix)
        # a layer's tensors (id -> (tensor, layer, name)), and the layers whose tensors an op outside any layer
        # computed a tensor from (a reading of their shape or dtype is none): {layer: why}
        self.watched: dict[int, tuple[torch.Tensor, str, str]] = {}
        self.read_outside: dict[str, str] = {}
        # norms over cuttable channels, which a zero (masked) channel adds nothing to: (op, its input, its tag)
        self.zero_reads: list[tuple[str, torch.Tensor, Tag]] = []

    def __exit__(self, *exc):
        self.token.tracer = None
        return super().__exit__(*exc)

    # ---------------------------------------------------------------- tags
    def tag_of(self, t) -> Tag | None:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.tags.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def set_tag(self, t: torch.Tensor, tag: Tag | None) -> None:
        if tag is None:
            self.tags.pop(id(t), None)
        else:
            self.tags[id(t)] = (t, tag)

    def fix(self, tag: Tag | None, reason: str) -> None:
        if tag is not None:
            for s in tag.segments:
                self.spaces.fix(s.space, reason)

    def widths(self, values) -> list[Width]:
        """The widths of this trace among ``values`` (flattened: a
        ``torch.Size``'s entries too)."""
        return [w for w in _numbers(values) if isinstance(w, Width) and w.token is self.token]

    def fix_escaped(self, values, name: str) -> None:
        """Plain numbers among ``values`` (flattened) of the value of a width
        turned into an int, or of the reciprocal of one handed out: they may
        be it, and the cut changes it."""
        for n in _numbers(values) if self.token.escaped or self.token.reciprocals else ():
            if type(n) is int and n in self.token.escaped:
                self.fix(Tag(0, self.token.escaped[n]), f"{name}: takes an int that its channels may have given")
            elif type(n) is float and n in self.token.reciprocals:
                self.fix(Tag(0, self.token.reciprocals[n]), f"{name}: takes a float that its channels may have given")

    def fix_widths(self, widths, reason: str) -> None:
        for w in widths:
            self.fix(Tag(0, w.segments), reason)

    def unite(self, a: Tag, b: Tag, what: str) -> None:
        """Couple two tags position by position; a stretch tagged on one side
        only meets channels the model cannot change, so it is fixed."""
        cuts = sorted({0, *[x for s in a.segments + b.segments for x in (s.pos, s.end)]})
        for lo, hi in zip(cuts, cuts[1:]):
            sa, sb = slice_segments(a.segments, lo, hi), slice_segments(b.segments, lo, hi)
            if sa is None or sb is None or len(sa) > 1 or len(sb) > 1:
                self.fix(a, what)
                self.fix(b, what)
                return
            if sa and sb and sa[0].repeat == sb[0].repeat and sa[0].length == sb[0].length:
                self.spaces.union(sa[0].space, sa[0].offset, sb[0].space, sb[0].offset)
            elif sa or sb:
                self.fix(Tag(0, sa or ()), what)
                self.fix(Tag(0, sb or ()), what)

    # ------------------------------------------------------------ dispatch
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0:
            name = _name(func)
            self.taken = []
            if self.watched and any(isinstance(o, torch.Tensor) for o in tree_flatten(out)[0]):
                for t in tree_flatten((args, kwargs))[0]:
                    hit = self.watched.get(id(t)) if isinstance(t, torch.Tensor) else None
                    if hit is not None and hit[0] is t:
                        self.read_outside.setdefault(hit[1], f"{hit[1]}: its {hit[2]!r} is read outside it, by {name}")
            try:
                self._propagate(func, args, kwargs, out)
                self._sizes(name, args, kwargs, out)
                out = self._read(name, args, kwargs, out)
            except Exception as e:  # a rule that does not fit: the channels it touched are fixed
                for t in tree_flatten((args, kwargs))[0]:
                    self.fix(self.tag_of(t), f"{name}: {e}")
                self.fix_widths(self.widths((args, kwargs)), f"{name}: {e}")
        return out

    def _propagate(self, func, args, kwargs, out) -> None:
        name = _name(func)
        if name in ("setitem", "index_put") and len(args) > 1:  # (a write returns nothing: seen here or never)
            value = args[2] if len(args) > 2 else kwargs.get("values")
            tag = self._write(args[0], tuple(args[1]) if name == "index_put" else args[1], value)
            if name == "index_put" and isinstance(out, torch.Tensor):
                self.set_tag(out, tag)
            return
        if name in _LEAVE:
            for t in tree_flatten((args, kwargs))[0]:
                self.fix(self.tag_of(t), f"{name}: its values leave torch (the core's numpy arrays), where the graph "
                                         "does not follow its channels")
            return
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        if not outs:
            return
        if name in _FACTORIES or name in _LIKE:
            source = (args[0] if args else kwargs.get("input")) if name in _LIKE else None  # (input= by keyword too)
            like = self.tag_of(source) if isinstance(source, torch.Tensor) else None
            for o in outs:
                self.set_tag(o, like if like is not None and like.segments else NEUTRAL)
            return
        # an out= buffer is written over, not read: no operand (norm(y, dim=c, out=buf) with buf of y's channels
        # was a second tagged tensor, which no norm rule took: its channels fixed as a reduction's). Where it is
        # the only tagged tensor (torch.ones(size, out=buf)), what is written there follows nothing the graph
        # sees, so its channels are fixed: the result kept them, and their cut left the columns it has uncut
        written = [t for t in tree_flatten(kwargs.get("out"))[0] if isinstance(t, torch.Tensor)]
        flat = tree_flatten((args, {k: v for k, v in kwargs.items() if k != "out"}))[0]
        tagged = [(t, self.tag_of(t)) for t in flat if self.tag_of(t) not in (None, NEUTRAL)]
        if not tagged:
            for t in written:
                self.fix(self.tag_of(t), f"{name}: written over by its out=")
            for o in outs:
                if all(o is not t for t in flat):
                    self.set_tag(o, None)
            return
        rule = self._rule(func, name, args, kwargs, tagged, outs)
        for o, tag in zip(outs, rule):
            self.set_tag(o, tag)

    def _rule(self, func, name, args, kwargs, tagged, outs):
        x, tag = tagged[0]
        none = [None] * len(outs)
        if name in _MIX:
            return self._fix_all(tagged, name, none)
        if name in _CAT:
            return [self._cat(args, kwargs, outs[0])]
        if name == "getitem":
            return [self._getitem(x, tag, args[1], outs[0])] if len(tagged) == 1 else self._fix_all(tagged, name, none)
        if name in _SHAPE and len(tagged) == 1 and x is args[0]:
            out = self._reshape(x, tag, outs[0])
            if out is not None and _numbered_axis(name, args, kwargs, outs[0], out.axis):
                self.fix(out, f"{name}: sizes its channels' axis by a number no cut changes")
            return [out]
        if name in _PERMUTE and len(tagged) == 1 and x is args[0]:
            return [self._permute(func, x, tag, args, kwargs, outs[0])]
        if name in _NORMS and len(tagged) == 1 and x is args[0]:
            order, dims, keepdim = _norm_args(x, args, kwargs)  # (p comes before dim: not _dim_arg's)
            if dims is not None and tag.axis not in dims:
                return [self._reduce(x, tag, (x, tuple(dims), keepdim), {}, o) for o in outs]
            if dims is not None and _zero_blind(order):
                self.zero_reads.append((name, x, tag))
                return none
            return self._fix_all(tagged, "a reduction over channels", none)
        if name in _REDUCE and x is args[0] and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
            return [self._reduce(x, tag, args, kwargs, o, name) for o in outs]
        if name == "renorm":  # (each slice at an index of its dim renormed: over the channels but where dim is theirs)
            return self._fix_all(tagged, name, none)
        if name in _ALONG or name in _SHAPE or name in _PERMUTE or name in _IMPLIED or name in _SPATIAL or name in _PAD:
            dims = _along(name, args, kwargs, x.dim())
            if dims is None or tag.axis in dims:
                return self._fix_all(tagged, name, none)
            # (select, unbind, kthvalue... drop the axes they work along: the channels move back by those before)
            at = tag.axis - sum(1 for d in dims if d < tag.axis)
            return [self._elementwise(name, tagged, args, kwargs, o,
                                      at if len(tagged) == 1 and o.dim() == x.dim() - len(dims) else None)
                    for o in outs]
        return [self._elementwise(name, tagged, args, kwargs, o) for o in outs]

    def _read(self, name, args, kwargs, out):
        """A shape read off a tagged tensor, with its channel axis's size a
        :class:`Width` (``numel``: a number computed from it)."""
        if name not in _READS:
            return out
        x = args[0] if args else None
        tag = self.tag_of(x)
        if tag is None or not tag.segments:
            return out
        if name == "numel":
            self.token.handed_out(out, tag.segments)
            return Width(out, tag.segments, False, self.token)
        if name == "len":
            if tag.axis == 0:  # (len() itself turns what it reads into a plain int)
                self.token.escape(out, tag.segments)
            return out
        if isinstance(out, int):  # size(dim)
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            if int(dim) % x.dim() != tag.axis:
                return out
            self.token.handed_out(out, tag.segments)
            return Width(out, tag.segments, True, self.token)
        if isinstance(out, torch.Size) and 0 <= tag.axis < len(out):
            self.token.handed_out(out[tag.axis], tag.segments)
            return torch.Size([Width(n, tag.segments, True, self.token) if i == tag.axis else n
                               for i, n in enumerate(out)])
        return out

    def _sizes(self, name, args, kwargs, out) -> None:
        """Widths handed to an op: each one that sizes an axis of the result
        of an op of :data:`_SIZED` gives it its channels there (or couples
        them with those it has there); any other fixes its channels, as do
        plain ints equal to a width turned into one (``int(c)``)."""
        self.fix_escaped((args, kwargs), name)
        widths = [w for w in self.widths((args, kwargs)) if all(w is not t for t in self.taken)]
        if not widths:
            return
        size = _size_arg(args, kwargs) if name in _SIZED and isinstance(out, torch.Tensor) else []
        shift = out.dim() - len(size) if size else 0
        if shift < 0 or (shift and name not in ("repeat", "tile")):  # (repeat, tile: numbers for the last axes)
            size = []
        for k, w in enumerate(size):
            if not isinstance(w, Width) or w.token is not self.token or not w.exact:
                continue
            widths.remove(next(v for v in widths if v is w))  # (this use of it is taken: it is fixed no more)
            if not self._sized(name, args, kwargs, out, k + shift, w):
                self.fix_widths([w], f"{name}: sized by channels it cannot follow")
        self.fix_widths(widths, f"{name}: takes a number its channels gave")

    def _sized(self, name, args, kwargs, o, i, w) -> bool:
        """Axis ``i`` of ``o`` is ``w`` long: where ``o`` holds channels on
        it, they are cut with ``w``'s; where ``o`` is fresh along it (made
        there, or an axis of 1 expanded), it holds ``w``'s. False where
        neither (its length then could not follow a cut)."""
        if o.shape[i] != w:
            return False
        tag = self.tag_of(o)
        if tag is not None and tag.segments and tag.axis == i:
            self.unite(tag, Tag(i, w.segments), f"{name}: sized by other channels than it has")
            return True
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input")
        at = i - (o.dim() - x.dim()) if isinstance(x, torch.Tensor) else -1
        fresh = name in _MADE or (name in ("expand", "broadcast_to", "repeat", "tile") and (at < 0 or x.shape[at] == 1))
        if not fresh or (tag is not None and tag.segments):  # (channels on another axis: a tag holds one axis)
            return False
        self.set_tag(o, Tag(i, w.segments))
        return True

    def _fix_all(self, tagged, name, result):
        for _, tag in tagged:
            self.fix(tag, f"mixed by {name}")
        return result

    # -------------------------------------------------------------- rules
    def _elementwise(self, name, tagged, args, kwargs, o, at=None) -> Tag | None:
        """Channels where broadcasting puts them (``at``: where an op along
        other axes that drops some leaves them); an op of unknown name that
        drops an axis is no element-wise one (quantile over the channels of
        a square tensor left its rows for channels): fixed."""
        if at is None and any(t.dim() > o.dim() for t, _ in tagged):
            return self._fix_all(tagged, name, None)
        axes = {at} if at is not None else {tag.axis + o.dim() - t.dim() for t, tag in tagged}
        axis = axes.pop() if len(axes) == 1 else None
        size = tagged[0][0].shape[tagged[0][1].axis]
        ok = axis is not None and 0 <= axis < o.dim() and o.shape[axis] == size
        ok = ok and all(t.shape[tag.axis] == size for t, tag in tagged)
        for u in tree_flatten((args, kwargs))[0]:
            if not ok:
                break
            if isinstance(u, torch.Tensor) and self.tag_of(u) is None:
                ua = axis - (o.dim() - u.dim())
                if 0 <= ua < u.dim() and u.shape[ua] == size and size > 1:
                    # an operand with channels the graph does not know (a parameter, an input, a mask or integers:
                    # where(mask, y, 0), y * arange(c)); but the index of an op along another dim is none where it
                    # is one of its dim's (index_add's) or the same for every channel (scatter_add(0, index
                    # expanded over the channels, y))
                    index = name in _ALONG and not (u.is_floating_point() or u.is_complex() or u.dtype == torch.bool)
                    ok = index and (u.dim() < o.dim() or not bool((u != u.narrow(ua, 0, 1)).any()))
        if not ok:
            return self._fix_all(tagged, name, None)
        first = tagged[0][1]
        for _, tag in tagged[1:]:
            self.unite(first, tag, f"{name} with a tensor of fixed channels")
        return Tag(axis, first.segments)

    def _cat(self, args, kwargs, o) -> Tag | None:
        tensors = list(args[0]) if args else list(kwargs.get("tensors", ()))
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        tagged = [(t, self.tag_of(t)) for t in tensors if self.tag_of(t) not in (None, NEUTRAL)]
        axes = {tag.axis + o.dim() - t.dim() for t, tag in tagged}
        if len(axes) != 1:
            return self._fix_all(tagged, "cat", None)
        axis = axes.pop()
        if dim % o.dim() != axis:  # rows stacked: channels must agree, and be known in every part
            return self._elementwise("cat", tagged, tuple(tensors), {}, o)
        segs, pos = [], 0
        for t in tensors:
            tag = self.tag_of(t)
            if tag not in (None, NEUTRAL):
                segs.extend(shift_segments(tag.segments, pos))
            pos += t.shape[axis]
        return Tag(axis, tuple(segs))

    def _getitem(self, x, tag, index, o) -> Tag | None:
        index = index if isinstance(index, tuple) else (index,)
        real = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded = []
        for i in index:
            expanded.extend([slice(None)] * (x.dim() - real) if i is Ellipsis else [i])
        advanced = [i for i in expanded if isinstance(i, (torch.Tensor, list))]
        if len(advanced) > 1 or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 1
                                    for i in advanced):
            return self._fix_all([(x, tag)], "indexing", None)
        d_in = d_out = 0
        axis, segs = None, tag.segments
        for i in expanded:
            if i is None:
                d_out += 1
                continue
            if d_in == tag.axis:
                if not isinstance(i, slice):
                    return self._fix_all([(x, tag)], "indexing a channel", None)
                r = range(x.shape[tag.axis])[i]
                segs = slice_segments(segs, r.start, r.stop) if r.step == 1 and len(r) else None
                if segs is None:
                    return self._fix_all([(x, tag)], "a strided channel slice", None)
                # some channels of a layer: its bounds stay while the cut removes channels before or inside them
                self.fix(Tag(tag.axis, tuple(s for s in tag.segments if s.pos < r.stop and s.end > r.start
                                             and not r.start <= s.pos < s.end <= r.stop)),
                         "a slice of some of its channels (the cut moves others into it)")
                self._bounds(tag, x.shape[tag.axis], i, r)
                axis = d_out
            d_in += 1
            d_out += torch.as_tensor(i).dim() if isinstance(i, (torch.Tensor, list)) else (0 if isinstance(i, int) else 1)
        if axis is None:
            axis = d_out + tag.axis - d_in
        return Tag(axis, segs) if 0 <= axis < o.dim() else self._fix_all([(x, tag)], "indexing", None)

    def _bounds(self, tag, width, i, r) -> None:
        """The bounds of a slice ``i`` (positions ``r``) of the channels,
        which stay at their positions while the cut moves the channels
        around them. A width read off channels, where it is (``y.shape[1]``
        at y's end in ``cat([y, z])``), is coupled with the channels before
        it, which it then follows; any other number (a literal ``6``, which a
        boundary of the segments made look like one that follows them) fixes
        the channels before it, or, counted from the end (``-6``), those
        after it. A bound past the end stays past it: the cut only narrows."""
        for bound, at in ((i.start, r.start), (i.stop, r.stop)):
            if bound is None:
                continue
            if isinstance(bound, Width) and bound.token is self.token:
                before = slice_segments(tag.segments, 0, at)
                if bound.exact and int.__int__(bound) == at and before is not None:
                    self.unite(Tag(0, bound.segments), Tag(0, before), "a slice bounded by other channels' width")
                    self.taken.append(bound)
                    continue
            value = operator.index(bound)
            if value >= width or -value >= width:  # (past the end; or before the start, which it stays before)
                continue
            moved = tuple(s for s in tag.segments if (s.pos < value if value >= 0 else s.end > width + value))
            self.fix(Tag(0, moved), "a slice at a fixed position (the cut moves the channels " +
                     ("before it)" if value >= 0 else "after it, from the end)"))

    def _write(self, target, index, value) -> Tag | None:
        """``target[index] = value`` (``index_put``): a write into some channel
        positions only (which the cut moves) fixes them; the value's channels
        are coupled with those they land on, and fixed where the graph does
        not follow the target's. Returns the target's tag after the write."""
        tag, vtag = self.tag_of(target), self.tag_of(value)
        vtag = None if vtag in (None, NEUTRAL) else vtag
        if tag in (None, NEUTRAL):
            self.fix(vtag, "written into a tensor whose channels the graph does not follow")
            return tag
        values = [(value, vtag)] if vtag is not None else []
        if isinstance(index, torch.Tensor) and index.shape == target.shape:  # a mask of the target's own shape
            itag = self.tag_of(index)
            if itag in (None, NEUTRAL):
                return self._elementwise("a write", [(target, tag)] + values, (index, value), {}, target)
            return self._elementwise("a write", [(target, tag), (index, itag)] + values, (value,), {}, target)
        view = target[index]
        seen = self._getitem(target, tag, index, view)
        if seen is None or seen.segments != tag.segments:
            return self._fix_all([(target, tag)] + values, "a write into some channel positions", None)
        return tag if self._elementwise("a write", [(view, seen)] + values, (value,), {}, view) else None

    def _reshape(self, x, tag, o) -> Tag | None:
        before, c = math.prod(x.shape[:tag.axis]), x.shape[tag.axis]
        after = math.prod(x.shape[tag.axis + 1:])
        for j in range(o.dim()):
            if math.prod(o.shape[:j]) != before:
                continue
            if o.shape[j] == c and math.prod(o.shape[j + 1:]) == after:
                return Tag(j, tag.segments)
            if o.shape[j] == c * after and math.prod(o.shape[j + 1:]) == 1:
                return Tag(j, tuple(Segment(s.pos * after, s.length, s.space, s.offset, s.repeat * after)
                                    for s in tag.segments))
        return self._fix_all([(x, tag)], "a reshape across channels", None)

    def _permute(self, func, x, tag, args, kwargs, o) -> Tag | None:
        probe = torch.empty([d + 2 for d in range(x.dim())], device="meta")
        moved = func(probe, *args[1:], **kwargs)
        return Tag(list(moved.shape).index(tag.axis + 2), tag.segments)

    def _reduce(self, x, tag, args, kwargs, o, name=None) -> Tag | None:
        dims = _dims(_dim_arg(args, kwargs), x.dim())
        at = 3 if name in _KEEPDIM_FOURTH else 2
        keep = bool(kwargs.get("keepdim", args[at] if len(args) > at and isinstance(args[at], bool) else False))
        if dims is None or tag.axis in dims:
            return self._fix_all([(x, tag)], "a reduction over channels", None)
        axis = tag.axis if keep else tag.axis - sum(1 for d in dims if d < tag.axis)
        if o.dim() > axis and o.shape[axis] == x.shape[tag.axis]:
            return Tag(axis, tag.segments)
        return self._fix_all([(x, tag)], "a reduction read otherwise than it ran", None)  # (never dropped)


def feats_of(value) -> torch.Tensor | None:
    """The channel-carrying tensor of a layer's input or output: a tensor, or a
    SparseTensor's feats."""
    if isinstance(value, torch.Tensor):
        return value
    feats = getattr(value, "feats", None)
    return feats if isinstance(feats, torch.Tensor) else None


def feature_axis(module, t: torch.Tensor) -> int:
    """Channel axis of a layer's input or output tensor: the last where the
    layer's adapter says ``channels_last`` (Linear), axis 1 otherwise
    (``(N, C)`` feats, ``(B, C, ...)`` dense tensors)."""
    adapter = adapters.adapter_for(module)
    return t.dim() - 1 if adapter is not None and adapter.channels_last else min(1, t.dim() - 1)


def registered(module) -> bool:
    return adapters.adapter_for(module) is not None
