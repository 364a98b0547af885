"""``torch.nn`` modules over SparseTensor; all compose in ``torch.nn.Sequential``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from .. import _ext
from ..kmap import _device, check_kernel
from ..tensor import FEATS_DTYPES, SparseTensor, as_bool, as_float, as_triple, check_memory_for, positive_int
from . import functional as F
from ._hooks import SparseBackwardHooks


def _check_input(x) -> SparseTensor:
    if not isinstance(x, SparseTensor):
        raise TypeError(f"expected a SparseTensor; got {type(x).__name__}")
    return x


def _check_feats_for(module: nn.Module, x: SparseTensor, channels: int, what: str,
                     param: torch.Tensor | None) -> None:
    """The feats a module with ``channels`` input channels (its ``what``)
    and parameters like ``param`` takes: a ValueError / TypeError naming
    both, instead of torch's shape or dtype error from inside the op."""
    feats = x.feats
    if feats.dim() == 2 and feats.shape[1] == channels and (param is None or feats.dtype == param.dtype):
        return  # (the common case, first: this runs on every layer call)
    name = type(module).__name__
    got = x.feats.shape[1] if x.feats.dim() == 2 else None
    if got != channels:
        raise ValueError(f"{name}: the input's feats have {got} channels but {what} is {channels}")
    # The one mix torch takes: bf16 / fp16 feats on a batch norm's float32 parameters (statistics)
    mixed = (isinstance(module, nn.BatchNorm1d) and param is not None and param.dtype == torch.float32
             and x.feats.dtype in (torch.bfloat16, torch.float16))
    if param is not None and x.feats.dtype != param.dtype and not mixed \
            and not _autocast_mixes(module, x.feats.dtype, param.dtype, x.feats.device.type):
        raise TypeError(f"{name}: the input's feats are {x.feats.dtype} but its parameters {param.dtype} "
                        "(convert one of them: module.to(dtype) or the feats)")


def _autocast_mixes(module: nn.Module, feats: torch.dtype, param: torch.dtype, device: str) -> bool:
    """Whether torch.autocast (enabled on ``device``) reconciles feats and
    parameters of these other dtypes in ``module``: a conv casts its feats
    itself (``functional.conv3d``); a batch norm autocast leaves to its own
    dtype rule (the mix above); a Linear autocast casts, but never a float64
    tensor (float64 feats on float32 weights failed inside torch's matmul)."""
    if isinstance(module, nn.BatchNorm1d):
        return False
    if isinstance(module, Conv3d):
        return torch.is_autocast_enabled(device)
    return F._autocast_casts(feats, param, device)  # (autocast on, as for the conv, and no float64)


def _live_weight(module: nn.Module) -> torch.Tensor | None:
    """``module.weight`` as far as its shape and dtype go (None where it has
    no tensor weight): a pruned module's ``weight_orig`` (torch's pruning,
    whose hook recomputes ``weight`` only when ``module`` runs: after
    ``.to(dtype)`` the weight it last computed kept the old dtype)."""
    orig = module._parameters.get("weight_orig")
    weight = orig if orig is not None else getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _refuse_compressed_state(module: nn.Module, state_dict, prefix: str, key: str, marker: str,
                             compressed: str) -> None:
    """A ValueError naming ``module`` (at ``prefix``) where ``state_dict``
    holds, at ``prefix + key``, the extra state of a compressed layer (the
    dict ``formats.compress``'s ``compressed`` module saves, with its format
    under ``marker``) in place of the weight this layer takes: torch's bare
    "Missing key(s) ... Unexpected key(s)" said nothing of why, and
    ``strict=False`` left the weight as initialised without a word."""
    state = state_dict.get(prefix + key)
    if not isinstance(state, dict) or marker not in state:
        return
    held = state[marker]
    held = held[0] if isinstance(held, (list, tuple)) and held else held  # (a conv's formats: one per offset)
    # (the format's data, {'format': name, ...}, or a format object, as states saved before the data form hold)
    name = held.get("format") if isinstance(held, dict) else type(held).__name__
    where = f" '{prefix[:-1]}'" if prefix else ""
    raise ValueError(f"{type(module).__name__}{where}: the state_dict holds a compressed layer (formats.{compressed}, "
                     f"format {name}) in '{prefix}{key}', where this uncompressed layer takes its weight; compress "
                     f"the model the same way before it loads this state_dict (pointsparse.formats.compress(model, "
                     f"format={str(name).lower()!r}, ...)), or load the state_dict the model had before it was "
                     "compressed")


def _take_row_vectors(module: nn.Module, state_dict, prefix: str, *names: str) -> None:
    """Each ``state_dict[prefix + name]`` of ``names`` held as one row
    ``(1, C)`` where ``module``'s parameter is ``(C,)``, put in ``(C,)``:
    MinkowskiEngine keeps a conv's bias and an instance norm's weight and
    bias so (torch failed on it: "size mismatch ... [1, 8] ... [8]"). Torch
    hands ``_load_from_state_dict`` its own copy of the dict; other shapes
    are left for torch's size check."""
    for name in names:
        value, own = state_dict.get(prefix + name), getattr(module, name, None)
        if isinstance(value, torch.Tensor) and isinstance(own, torch.Tensor) and own.dim() == 1 and \
                tuple(value.shape) == (1, own.shape[0]):
            state_dict[prefix + name] = value.reshape(own.shape[0])


def _take_wrapped(state_dict, prefix: str, theirs: str, ours: str, names: tuple[str, ...]) -> None:
    """Each ``state_dict[prefix + theirs + name]`` of ``names`` moved to
    ``prefix + ours + name`` where that key is absent: MinkowskiEngine's
    MinkowskiBatchNorm keeps its torch BatchNorm1d under ``bn.`` and
    MinkowskiLinear its torch Linear under ``linear.``, where ours keep them
    at the top (``ours`` ``""``) and under ``fn.`` (torch failed with a bare
    "Missing key(s) ... Unexpected key(s)"). One name for one name, so
    nothing is guessed; a key given in both forms leaves theirs, which torch
    then calls unexpected. Torch hands ``_load_from_state_dict`` its own copy
    of the dict, which the children then read."""
    for name in names:
        key = prefix + theirs + name
        if key in state_dict and prefix + ours + name not in state_dict:
            state_dict[prefix + ours + name] = state_dict.pop(key)


def _factory_kwargs(device, dtype) -> dict:
    """``device`` and ``dtype`` as a module's constructor takes them (torch's
    factory kwargs: ``torch.nn.Linear(..., device=, dtype=)``, used by
    ``torch.nn.utils.skip_init`` and meta-device construction), checked,
    those given only (None: torch's default, so a positional one of
    torch's own order is not given twice): ``dtype`` one of
    :data:`pointsparse.tensor.FEATS_DTYPES`, the dtypes the layers run (an
    int64 weight failed in ``nn.Parameter`` saying only that it cannot
    require gradients); ``device`` read as the package reads devices
    (``kmap._device``), its error naming the argument as a constructor's."""
    if dtype is not None and dtype not in FEATS_DTYPES:
        raise TypeError(f"dtype must be None or a floating torch.dtype the layers run (torch.float32, torch.float64, "
                        f"torch.bfloat16 or torch.float16); got {dtype!r:.100}")
    given = {} if dtype is None else {"dtype": dtype}
    if device is not None:
        try:
            given["device"] = _device(device)
        except (TypeError, ValueError) as error:
            raise type(error)(f"device must be None, a torch.device or a device string ('cpu', 'cuda:0', 'meta', "
                              f"...); got {device!r:.100}") from error
    return given


#: The most values a conv weight may hold (checked before it is allocated):
#: 2^31, 8 GiB of float32, far beyond any point-cloud network.
MAX_WEIGHT_ELEMENTS = 2**31


_THREE_D = "pointsparse's layers are 3-D (coords [batch, x, y, z]): leave it out"
_NO_GENERATIVE = ("no generative transposed conv here: transposed=True goes back onto the finer coords the strided "
                  "conv it mirrors came from (the tensor's cache holds them)")
_ALGORITHM = "the engine picks its kernels and kernel-map algorithm itself: leave it out"
_CONV_HINTS = {
    "dimension": _THREE_D,
    "D": _THREE_D,
    "indice_key": ("convs share kernel maps by themselves (the tensor's CoordinateCache): a conv of the same kernel, "
                   "stride and dilation on the same coords reuses one, and a transposed conv the map of the strided "
                   "conv it mirrors"),
    "padding": ("a conv of stride 1 outputs on its input coords (submanifold: spconv's SubMConv3d, whose padding is "
                "ignored), a strided one on its inputs floored to the stride (a SparseConv3d of kernel_size == "
                "stride, padding 0): there is no padding to give"),
    "generative": _NO_GENERATIVE,
    "expand_coordinates": _NO_GENERATIVE,
    "kernel_generator": "a custom kernel region is kernel_region= ('cross', or a list of offset indices)",
    "region_type": "a custom kernel region is kernel_region= ('cross', or a list of offset indices)",
    "groups": "pointsparse convs are not grouped (every output channel reads every input channel)",
    "has_bias": "the bias flag is bias=",
    "algo": _ALGORITHM,
    "config": _ALGORITHM,
    "convolution_mode": _ALGORITHM,
}


class Conv3d(SparseBackwardHooks, nn.Module):
    """Sparse 3-D convolution; ``weight`` is ``(K, C_in, C_out)`` (API.md).

    ``stride=1`` is submanifold (outputs on the input coords), ``stride>1``
    downsamples, ``transposed=True`` upsamples back to the coords the matching
    downsampling came from.

    ``kernel_region``: a custom kernel region (MinkowskiEngine's idea):
    ``"cross"`` or a list of offset indices; only those offsets run. The
    weight keeps its ``(K, C_in, C_out)`` shape: the other offsets are zero
    at initialisation, ignored by the forward and get a zero gradient.
    Its shape does not tell the region, so a full kernel's ``state_dict``
    (a conv built without the region) loads as it is: its values outside
    the region are kept and never run, so the conv is the region's, not
    the full kernel's (build the conv without a region to run those).
    Pruned with ``pointsparse.prune`` (``weight_mask``), the masked entries
    get no gradient and the engine skips all-zero offsets and runs sparse
    enough weights through the vector-sparse kernels (a mask that itself
    requires grad, as in SNIP-style scoring, gets torch's gradient ``dense
    gradient * weight_orig`` on every entry). A ``(1, C_out)`` bias
    (MinkowskiEngine's) loads as the ``(C_out,)`` one.

    ``device`` and ``dtype`` (keyword-only): where and in which float dtype
    ``weight`` and ``bias`` are made (torch's factory kwargs, as
    ``torch.nn.Conv3d`` takes them; None: torch's defaults). ``device="meta"``
    (also ``torch.nn.utils.skip_init``, or ``with torch.device("meta")``)
    allocates nothing; ``to_empty(device=...)`` then ``reset_parameters()``
    gives the initialised conv. A weight of more than :data:`MAX_WEIGHT_ELEMENTS`
    values, or on the CPU of more bytes than the system has available, is a
    ValueError before anything is allocated."""

    @_ext.foreign_keywords(_CONV_HINTS)  # (MinkowskiEngine's, TorchSparse's and spconv's keywords)
    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, dilation=1,
                 bias: bool = False, transposed: bool = False, kernel_region=None, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        in_channels = positive_int(in_channels, "in_channels")
        out_channels = positive_int(out_channels, "out_channels")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = as_triple(kernel_size, "kernel_size")
        self.stride = as_triple(stride, "stride")
        self.dilation = as_triple(dilation, "dilation")
        # (flags, not truthiness: transposed="False" ran the transposed conv)
        self.transposed = as_bool(transposed, "transposed")
        bias = as_bool(bias, "bias")
        self.kernel_volume = self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        check_kernel(self.kernel_size, self.stride, self.dilation)  # (what no forward takes: before its weight)
        if self.kernel_volume * in_channels * out_channels > MAX_WEIGHT_ELEMENTS:
            raise ValueError(f"a Conv3d weight of kernel_size {self.kernel_size} x in_channels {in_channels} x "
                             f"out_channels {out_channels} = {self.kernel_volume * in_channels * out_channels:,} "
                             f"values is over the limit of {MAX_WEIGHT_ELEMENTS:,} (2^31)")
        factory = _factory_kwargs(device, dtype)  # (checked before anything is allocated)
        region = F.region_of(self.kernel_size, kernel_region)
        check_memory_for(self.kernel_volume * in_channels * out_channels * factory.get(
                             "dtype", torch.get_default_dtype()).itemsize, factory.get("device"),
                         f"a Conv3d weight of kernel_size {self.kernel_size} x in_channels {in_channels} x "
                         f"out_channels {out_channels}", "use fewer channels, or build it on the meta device")
        self.kernel_region = None if region is None else tuple(int(i) for i in region.nonzero().flatten())
        self.weight = nn.Parameter(torch.empty(self.kernel_volume, in_channels, out_channels, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        #: ReLU on the output (on the sum, when ``forward`` is given ``add``),
        #: fused into the kernel where no gradient is needed (set by
        #: :func:`pointsparse.nn.fuse_for_inference`).
        self.relu = False
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        _refuse_compressed_state(self, state_dict, prefix, "_extra_state", "offsets", "SparseConv3d")
        if prefix + "kernel" in state_dict and prefix + "weight" not in state_dict:
            # (torch's "missing weight, unexpected kernel" said nothing of the offsets; a warning, not an error:
            # torch hands no strict=False down to here, and there the keys are the caller's to read. One text
            # for every conv, so shown once, not once a layer)
            warnings.warn("a state_dict holds 'kernel' in place of a pointsparse Conv3d's 'weight': a "
                          "MinkowskiEngine or TorchSparse conv's, whose offsets are in another order; convert each: "
                          "state_dict[name + '.weight'] = pointsparse.nn.weight_from(state_dict.pop(name + "
                          "'.kernel'), kernel_size, 'minkowski' (or 'torchsparse'))", UserWarning, stacklevel=2)
        weight = state_dict.get(prefix + "weight")
        if isinstance(weight, torch.Tensor) and weight.dim() == 5:
            # (torch's size mismatch named two shapes, no layout; one text for every conv: shown once)
            warnings.warn("a state_dict holds a 5-d 'weight' for a pointsparse Conv3d: a spconv conv's (C_out, kx, "
                          "ky, kz, C_in) (1.x: (kx, ky, kz, C_in, C_out)), not our (K, C_in, C_out); convert "
                          "each: state_dict[name + '.weight'] = pointsparse.nn.weight_from(w, kernel_size, 'spconv', "
                          "conv='SubMConv3d' (or 'SparseConv3d' / 'SparseInverseConv3d' with its stride))",
                          UserWarning, stacklevel=2)
        _take_row_vectors(self, state_dict, prefix, "bias")  # (MinkowskiEngine's (1, C_out) bias)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def reset_parameters(self) -> None:
        volume = self.kernel_volume if self.kernel_region is None else len(self.kernel_region)
        fan = (self.out_channels if self.transposed else self.in_channels) * volume
        bound = 1.0 / math.sqrt(fan)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.kernel_region is not None:
            inside = set(self.kernel_region)
            outside = [i for i in range(self.kernel_volume) if i not in inside]
            # (the offsets outside as indices on the weight's device: a meta weight, as skip_init and
            # ``with torch.device("meta")`` build it, resets too, and a CUDA one reads no mask's nonzero)
            with torch.no_grad():
                self.weight.index_fill_(0, torch.tensor(outside, dtype=torch.int64, device=self.weight.device), 0)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def pruning_mask(self) -> torch.Tensor | None:
        """The mask ``weight`` is multiplied by when torch-style pruning is
        attached (``weight_orig`` parameter + ``weight_mask`` buffer), else None."""
        mask = getattr(self, "weight_mask", None)
        orig = getattr(self, "weight_orig", None)
        return mask if isinstance(orig, nn.Parameter) and isinstance(mask, torch.Tensor) else None

    def forward(self, input: SparseTensor, add: SparseTensor | None = None) -> SparseTensor:
        """The conv of ``input``; ``add`` (a SparseTensor on the output's
        coords, e.g. a residual block's shortcut) is added to it before
        :attr:`relu`: ``relu(conv(input) + add)``, in the kernel's store
        where no gradient is needed (see ``functional.conv3d``)."""
        input, weight = _check_input(input), self.weight
        if isinstance(weight, torch.Tensor) and weight.dim() == 3:  # (else the functional names the weight)
            _check_feats_for(self, input, weight.shape[1], "in_channels", weight)
        mask = self.pruning_mask()
        if mask is not None and mask.requires_grad:  # (SNIP-like scores of a pruned model: torch's gradient,
            mask = None  # dense * weight_orig, on the pruned entries too; the product's own rule zeroes orig's)
        if mask is not None and (mask.dtype != weight.dtype or mask.device != weight.device):
            mask = mask.to(weight.device, weight.dtype)
        return F.conv3d(input, weight, self.kernel_size, self.stride, self.dilation,
                        self.bias, self.transposed, self.relu, getattr(self, "kernel_region", None), mask, add=add)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"dilation={self.dilation}")
        if self.bias is not None:
            s += ", bias=True"
        if self.transposed:
            s += ", transposed=True"
        if self.relu:
            s += ", relu=True"
        if getattr(self, "kernel_region", None) is not None:  # modules pickled before it existed have none
            s += f", kernel_region={list(self.kernel_region)}"
        return s


def _magnitude(feats: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each row of ``feats`` (float32 for bf16 / fp16 feats:
    their own dtype rounds near norms to one, and ties keep the earlier).
    The squares of float32 feats past ~1.8e19 were inf and below ~1e-19
    zero or subnormal (wrong scores, tied ranks): the rows whose norm is inf
    or below :func:`_scaled_norm`'s safe range (zero rows too: their feats
    may be tiny) are taken again scaled by a power of two, those rows only
    (one host read). In a graph (an exported program, torch.compile) the
    plain norm: a graph cannot pick rows by a host read, and scaling every
    row there is four more passes over the feats on every call of a program
    whose feats never come near those ends."""
    wide = torch.float32 if feats.dtype in (torch.bfloat16, torch.float16) else None
    norm = torch.linalg.vector_norm(feats, dim=-1, dtype=wide)
    if feats.dim() != 2 or feats.shape[1] == 0:  # (no row maximum to scale by)
        return norm
    if torch.compiler.is_compiling():
        return norm
    # below 2^(e_min / 2 + mantissa bits) a norm may have lost squares that underflowed: squares below the
    # smallest normal number fall within the sum's rounding above it
    low = 2.0**-459 if norm.dtype == torch.float64 else 2.0**-40
    suspect = (norm < low) | torch.isinf(norm)
    if not bool(suspect.any()):
        return norm
    rows = suspect.nonzero().flatten()
    return norm.index_copy(0, rows, _scaled_norm(feats.index_select(0, rows), norm.dtype))


def _scaled_norm(feats: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The L2 norm in ``dtype`` of each row of the 2-D ``feats``, the row
    divided by 2^e before it is squared and multiplied after, its maximum in
    [2^(e-1), 2^e): exact, so the same as the plain norm where its squares
    fit (1 for a zero row; inf / NaN rows keep their inf / NaN norm; e in
    the dtype's normal range: subnormal rows are scaled part way). 2^e is
    made from its bits (torch.pow(2.0, e) is float32: inf past 2^127)."""
    work = feats.to(dtype)
    itype, bias, shift = (torch.int64, 1023, 52) if dtype == torch.float64 else (torch.int32, 127, 23)
    exponent = torch.frexp(work.abs().amax(dim=1)).exponent.to(itype).clamp(1 - bias, bias)
    scale = ((exponent + bias) << shift).view(dtype)
    return torch.linalg.vector_norm(work / scale.unsqueeze(1), dim=1) * scale


class VoxelPrune(SparseBackwardHooks, nn.Module):
    """Spatial (activation) pruning: keeps the most important voxels of a
    SparseTensor and drops the rest (SPS-Conv, Ada3D).

    ``score="magnitude"``: a voxel's importance is the L2 norm of its feats;
    ``score="learned"``: a per-voxel linear score ``Linear(in_channels, 1)``,
    and the kept feats are multiplied by ``sigmoid(score)`` so that the score
    learns. Per batch item the ``ceil(keep_ratio * n)`` highest scores are
    kept, or (``threshold`` given) every voxel scoring ``>= threshold``. The
    output keeps the input's row order and stride; its coordinate cache
    holds the kept coords at this stride and the input's coords at finer
    strides (see :func:`functional.select_voxels`), so the convs after it
    build their maps on the kept voxels and transposed convs come back to
    the coords the skip connections expect. The cache also records which
    voxels were kept: at stride 1 the output (and every tensor on its
    coords after it: submanifold convs, batch norm, activations, ``add``)
    holds K of the N voxels :func:`pointsparse.voxelize` made, and
    ``devoxelize(out, inverse)`` maps voxelize's inverse through the kept
    rows, zeros for the points of dropped voxels (see
    :func:`pointsparse.devoxelize`). ``device`` and ``dtype`` (keyword-only,
    torch's factory kwargs): where and in which float dtype a learned
    score's ``scorer`` is made (a magnitude score has no parameters: they
    are checked and unused)."""

    SCORES = ("magnitude", "learned")

    def __init__(self, keep_ratio: float = 0.5, score: str = "magnitude", in_channels: int | None = None,
                 threshold: float | None = None, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = _factory_kwargs(device, dtype)
        self.keep_ratio = keep_ratio
        _check_score(score)
        self.threshold = threshold
        self.scorer = None
        if score == "learned":
            try:
                in_channels = positive_int(in_channels, "in_channels")
            except (TypeError, ValueError) as error:  # (None or a float: TypeError; 0: ValueError)
                raise type(error)(f"score='learned' needs in_channels, a positive int; got {in_channels!r}") from None
            self.scorer = nn.Linear(in_channels, 1, **factory)
        elif in_channels is not None:  # unused by a magnitude score, but a count all the same
            positive_int(in_channels, "in_channels")

    @property
    def keep_ratio(self) -> float:
        """The fraction of each batch item's voxels kept, in (0, 1] (checked when set)."""
        return self._keep_ratio

    @keep_ratio.setter
    def keep_ratio(self, value) -> None:
        self._keep_ratio = F.keep_ratio_of(value)  # numpy and 0-d tensor numbers too, as Python numbers

    @property
    def threshold(self) -> float | None:
        """The score a voxel needs to be kept, or None (``keep_ratio`` rules); checked when set."""
        return self._threshold

    @threshold.setter
    def threshold(self, value) -> None:
        if value is not None:
            try:
                value = as_float(value, "threshold")
            except TypeError:
                raise TypeError(f"threshold must be a number or None; got {value!r}") from None
            if not math.isfinite(value):
                raise ValueError(f"threshold must be a finite number; got {value!r}")
        self._threshold = value

    @property
    def score(self) -> str:
        """``"learned"`` where the layer has a scorer, else ``"magnitude"``.
        Set only to what it is: a learned score is its scorer (made with
        ``in_channels`` and trained with the model), so another score is a
        ValueError (build a new VoxelPrune)."""
        return "magnitude" if self.scorer is None else "learned"

    @score.setter
    def score(self, value) -> None:
        _check_score(value)
        if value != self.score:  # (the scorer decided: a "learned" set afterwards ranked by magnitude, silently)
            raise ValueError(f"score cannot change from {self.score!r} to {value!r} after construction (a learned "
                             "score is its scorer, Linear(in_channels, 1), trained with the model): build "
                             f"VoxelPrune(keep_ratio, score={value!r}, in_channels=..., threshold=...) instead")

    def __setstate__(self, state: dict) -> None:
        # (pickled before the settings were properties: their values under the public names)
        for name in ("keep_ratio", "threshold"):
            if name in state:
                state["_" + name] = state.pop(name)
        state.pop("score", None)  # (the scorer says it)
        super().__setstate__(state)

    def scores(self, input: SparseTensor) -> torch.Tensor:
        """The importance of each voxel of ``input`` (1-D, a row each)."""
        input = _check_input(input)
        if self.scorer is None:
            return _magnitude(input.feats.detach())
        # (a compressed scorer, formats.SparseLinear, holds no weight tensor: its in_features; it checks the dtype)
        weight = _live_weight(self.scorer)
        channels = self.scorer.in_features if weight is None else weight.shape[1]
        _check_feats_for(self, input, channels, "in_channels", weight)
        # (reshape, not squeeze(1): where a torch.compile graph breaks at keep_rows (without fullgraph), AOTAutograd
        # replayed a squeeze view returned with its detach on the wrong base, a bare IndexError on the first call)
        return self.scorer(input.feats).reshape(-1)

    def select(self, input: SparseTensor) -> tuple[torch.Tensor, SparseTensor]:
        """``(rows, kept)``: the sorted int64 rows of ``input`` kept and the
        tensor of those voxels (what :meth:`forward` returns)."""
        x = _check_input(input)
        scores = self.scores(x)  # (checks the feats against a learned score)
        if _ext.guard_or_false(x.coords.shape[0] == 0):
            # nothing to choose (a graph traced for 0 rows cannot lower an index into them): the empty tensor,
            # a copy as index_select makes for any other input (a view of the input's feats failed an in-place
            # layer after it where those feats are a leaf that requires grad)
            rows = x.coords.new_zeros(0, dtype=torch.int64)
            feats = x.feats[:0].clone() if self.scorer is None else \
                x.feats[:0] * torch.sigmoid(scores[:0]).unsqueeze(1)
            return rows, F.select_voxels(x, rows, feats)
        rows = F.keep_per_batch(scores.detach(), x.coords[:, 0].to(scores.device), self.keep_ratio, self.threshold)
        feats = x.feats.index_select(0, rows)
        if self.scorer is not None:
            feats = feats * torch.sigmoid(scores.index_select(0, rows)).unsqueeze(1)
        return rows, F.select_voxels(x, rows, feats)

    def forward(self, input: SparseTensor) -> SparseTensor:
        return self.select(input)[1]

    def extra_repr(self) -> str:
        # (a threshold given wins: the keep_ratio it leaves unused is shown as such, not hidden)
        rule = f"threshold={self.threshold} (keep_ratio={self.keep_ratio} unused)" if self.threshold is not None \
            else f"keep_ratio={self.keep_ratio}"
        return f"{rule}, score={self.score!r}"


def _check_score(score) -> None:
    if score not in VoxelPrune.SCORES:
        raise ValueError(f"score must be one of {VoxelPrune.SCORES}; got {score!r}")


def inner_voxel_prune(module: nn.Module, prefix: str = "") -> str | None:
    """The name (after ``prefix``) of a VoxelPrune layer inside ``module``
    (``module`` itself: ``prefix``), the VoxelPrune of a VoxelSkip aside
    (that one's branch gives back every site it keeps), or None: what a
    VoxelSkip's branch may not hold."""
    own = {id(m.prune) for m in module.modules() if isinstance(m, VoxelSkip)}
    return next((name for name, m in module.named_modules(prefix=prefix)
                 if isinstance(m, VoxelPrune) and id(m) not in own), None)


def hooked_voxel_prune(module: nn.Module, prefix: str) -> str | None:
    """The name (after ``prefix``) of a module inside ``module`` whose input
    a VoxelPrune prunes by a forward pre-hook (``models.add_voxel_prune``'s,
    which holds it as ``prune``), or None."""
    return next((name for name, m in module.named_modules(prefix=prefix)
                 if any(isinstance(getattr(h, "prune", None), VoxelPrune) for h in m._forward_pre_hooks.values())),
                None)


class VoxelSkip(SparseBackwardHooks, nn.Module):
    """Spatial pruning that keeps every voxel: ``module`` (a submanifold
    branch, e.g. a residual block's convs) runs on the voxels a
    :class:`VoxelPrune` keeps and gives zero at the others, on the input's
    coords. In a residual block (``out = relu(branch(x) + shortcut(x))``) a
    skipped voxel keeps its shortcut, as SPS-Conv's submanifold form lets
    unimportant sites pass unconvolved: the convs cost what the kept voxels
    cost while no voxel leaves the network. ``keep_ratio``, ``score``,
    ``in_channels``, ``threshold`` (and the keyword-only ``device`` and
    ``dtype`` of a learned score's scorer) are :class:`VoxelPrune`'s (``prune``);
    ``module`` must return a SparseTensor on the coords it was given (one
    holding a VoxelPrune, which drops some, is a ValueError). With
    ``score="learned"`` the module's input is multiplied by
    ``sigmoid(score)`` (so that the score learns), so a VoxelSkip keeping
    every voxel is not ``module`` itself; with ``"magnitude"`` it is, bit
    for bit.

    Its state_dict holds ``module``'s tensors under ``module.`` (and a
    learned score's under ``prune.``); ``load_state_dict`` also takes the
    unwrapped module's keys (``main.0.weight`` for ``main.module.0.weight``:
    the trained model's weights, loaded into the model with its blocks
    wrapped). A key given in both forms loads the wrapped one and the other
    is unexpected. A learned score's scorer, which the unwrapped module
    never had, is missing as any absent tensor is: strict loading refuses
    it, ``strict=False`` lists it and leaves it as initialised.

    ``module`` is the caller's, built before this layer: ``device="meta"``
    (which ``torch.nn.utils.skip_init`` passes) is a ValueError where it
    holds a tensor that is not on meta, which skip_init's ``to_empty``
    would replace with uninitialised memory. A model built whole under
    ``with torch.device("meta")`` (``module`` on meta too) builds as any
    other; ``to_empty`` of a VoxelSkip built around a module with values
    in that context (no ``device`` given) clears them as it clears any
    module's."""

    def __init__(self, module: nn.Module, keep_ratio: float = 0.5, score: str = "magnitude",
                 in_channels: int | None = None, threshold: float | None = None, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        inner = inner_voxel_prune(module, "module")
        if inner is not None:  # (every forward failed: "module must return a SparseTensor on the N kept sites")
            raise ValueError(f"VoxelSkip: module holds a VoxelPrune ({inner!r}), which would leave the branch fewer "
                             "sites than the VoxelSkip keeps: give the VoxelSkip's keep_ratio or threshold instead")
        hooked = hooked_voxel_prune(module, "module")
        if hooked is not None:
            raise ValueError(f"VoxelSkip: module holds a VoxelPrune on the input of {hooked!r} (add_voxel_prune's), "
                             "which would leave the branch fewer sites than the VoxelSkip keeps: wrap modules in "
                             "VoxelSkip before adding VoxelPrune (models.add_voxel_skip, then add_voxel_prune)")
        self.prune = VoxelPrune(keep_ratio, score, in_channels, threshold, device=device, dtype=dtype)
        if device is not None and _device(device).type == "meta":  # (checked: VoxelPrune's above)
            # (skip_init passes device="meta", then to_empty gives every tensor of the layer fresh memory: the
            # caller's module, built before with its values, came back holding garbage, unsaid)
            held = next(((name, t) for name, t in (*module.named_parameters(), *module.named_buffers())
                         if t.device.type != "meta"), None)
            if held is not None:
                raise ValueError(f"VoxelSkip: device='meta' builds the layer without values, but module holds "
                                 f"{held[0]} on {held[1].device}: torch.nn.utils.skip_init (to_empty) would replace "
                                 "it with uninitialised memory; build module on the meta device too, or give "
                                 "VoxelSkip the device its module is on")
        self.module = module

    # keep_ratio, threshold and score are the VoxelPrune's, read and set (and checked) through this layer: set
    # on it, they were plain attributes nothing read.
    keep_ratio = property(lambda self: self.prune.keep_ratio, lambda self, v: setattr(self.prune, "keep_ratio", v),
                          doc="``prune.keep_ratio``")
    threshold = property(lambda self: self.prune.threshold, lambda self, v: setattr(self.prune, "threshold", v),
                         doc="``prune.threshold``")
    score = property(lambda self: self.prune.score, lambda self, v: setattr(self.prune, "score", v),
                     doc="``prune.score``")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # The unwrapped module's keys (prefix + "0.weight") moved to their wrapped names (prefix +
        # "module.0.weight") before torch sorts the keys: the children then load them, and what is left
        # is missing or unexpected as usual. A key is the module's where its first name is one of the
        # module's children or tensors (so "prune." and "module." keys stay this layer's own).
        names = (set(self.module._modules) | set(self.module._parameters) | set(self.module._buffers)) - {
            "prune", "module"}
        for key in [k for k in state_dict if k.startswith(prefix)]:
            wrapped = prefix + "module." + key[len(prefix):]
            if key[len(prefix):].split(".", 1)[0] in names and wrapped not in state_dict:
                state_dict[wrapped] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _branch(self, input: SparseTensor) -> tuple[torch.Tensor, SparseTensor]:
        """``(rows, y)``: the kept rows of ``input`` and ``module``'s output on them."""
        rows, kept = self.prune.select(input)  # checks that input is a SparseTensor
        y = self.module(kept)
        if not isinstance(y, SparseTensor):
            raise TypeError(f"VoxelSkip: module must return a SparseTensor; got {type(y).__name__}")
        compiling = torch.compiler.is_compiling()  # (row counts are symbols there: no len())
        rows_y, rows_kept = y.coords.shape[0], kept.coords.shape[0]
        if y.stride != kept.stride or (not compiling and rows_y != rows_kept):
            # (a VoxelPrune put in the module after this layer was built: the constructor refuses one)
            inner = inner_voxel_prune(self.module, "module")
            hooked = None if inner is not None else hooked_voxel_prune(self.module, "module")
            why = (f": the VoxelPrune {inner!r} inside it dropped them" if inner is not None else
                   f": the VoxelPrune on the input of {hooked!r} dropped them" if hooked is not None else "")
            raise ValueError(f"VoxelSkip: module must return a SparseTensor on the {rows_kept} kept sites at "
                             f"stride {kept.stride}; got {rows_y} sites at stride {y.stride}{why}")
        if not compiling and y.coords is not kept.coords and not torch.equal(y.coords, kept.coords.to(y.device)):
            # (its rows are scattered back by position: other coords, or another order, went to the wrong sites)
            raise ValueError("VoxelSkip: module must return a SparseTensor on the kept sites, in their order; "
                             "got other coords (or another row order)")
        if compiling:
            torch._check(rows_y == rows_kept, lambda: "VoxelSkip: module must return a SparseTensor on the kept sites")
        return rows.to(y.device), y

    def forward(self, input: SparseTensor) -> SparseTensor:
        rows, y = self._branch(input)
        # (the row count from the coords' shape: len() would fix a traced graph's count; the scatter, of one
        # dtype, as outside autocast, whose index_copy refuses a 16-bit dtype other than its own: "Unexpected
        # floating ScalarType in at::autocast::prioritize", a bf16 model's skips under fp16 autocast)
        with torch.autocast(y.feats.device.type, enabled=False):
            feats = y.feats.new_zeros((input.coords.shape[0], y.num_channels)).index_copy(0, rows, y.feats)
        return input.with_feats(feats)

    def add_to(self, input: SparseTensor, other: SparseTensor) -> SparseTensor:
        """``functional.add(self(input), other)`` in one pass: ``other``'s
        feats with the module's output added at the kept rows, instead of
        zero rows written, the output scattered into them and the sum taken
        (a residual block's ``main(x) + shortcut(x)``; the same values)."""
        F._same_sites([input, other], "VoxelSkip.add_to")  # before the branch's work
        rows, y = self._branch(input)
        if other.num_channels != y.num_channels:
            raise ValueError(f"VoxelSkip.add_to: other has {other.num_channels} channels; the module gives "
                             f"{y.num_channels}")
        dtype = torch.promote_types(other.feats.dtype, y.feats.dtype)  # as the sum's
        return other.with_feats(other.feats.to(dtype).index_add(0, rows, y.feats.to(dtype)))


class _Pool3d(SparseBackwardHooks, nn.Module):
    function = staticmethod(F.max_pool3d)

    @_ext.foreign_keywords({"dimension": _THREE_D, "D": _THREE_D})  # (MinkowskiEngine's pooling takes one)
    def __init__(self, kernel_size=2, stride=None, dilation=1) -> None:
        super().__init__()
        self.kernel_size = as_triple(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else as_triple(stride, "stride")
        self.dilation = as_triple(dilation, "dilation")
        check_kernel(self.kernel_size, self.stride, self.dilation)  # (what no forward takes)

    def forward(self, input: SparseTensor) -> SparseTensor:
        return self.function(_check_input(input), self.kernel_size, self.stride, self.dilation)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}"


class InstanceNorm(SparseBackwardHooks, nn.Module):
    """Instance normalisation over the feats of a SparseTensor: each batch
    item's sites normalised by the item's own mean and biased variance per
    channel (:func:`functional.instance_norm`; MinkowskiEngine's
    ``MinkowskiInstanceNorm``), then an affine ``weight`` (1) and ``bias`` (0)
    per channel (``affine=False``: none). No running statistics: training
    and eval compute the same. An item of one site gives ``bias``. A
    state_dict of MinkowskiInstanceNorm's ``(1, C)`` weight and bias loads
    as it is."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        self.eps = F._check_eps(eps)
        self.affine = as_bool(affine, "affine")
        factory = _factory_kwargs(device, dtype)  # (an int64 one failed in nn.Parameter, naming no argument)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(self.num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        _take_row_vectors(self, state_dict, prefix, "weight", "bias")  # (MinkowskiInstanceNorm's (1, C) rows)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = _check_input(input)
        _check_feats_for(self, x, self.num_features if self.weight is None else self.weight.shape[0],
                         "num_features", self.weight)
        return F.instance_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


class MaxPool3d(_Pool3d):
    """Sparse max pooling over the active sites of each window; output coords
    as a strided conv's (``stride`` defaults to ``kernel_size``)."""

    function = staticmethod(F.max_pool3d)


class AvgPool3d(_Pool3d):
    """Sparse average pooling: the mean of the active sites of each window."""

    function = staticmethod(F.avg_pool3d)


class GlobalAvgPool(SparseBackwardHooks, nn.Module):
    """Mean feats per batch item: a dense ``(B, C)`` tensor, a row for each batch
    item of the network's input (0 for one a ``VoxelPrune`` emptied)."""

    def forward(self, input: SparseTensor) -> torch.Tensor:
        return F.global_avg_pool(_check_input(input))


class GlobalMaxPool(SparseBackwardHooks, nn.Module):
    """Channel-wise max per batch item: a dense ``(B, C)`` tensor, a row for each batch
    item of the network's input (0 for one a ``VoxelPrune`` emptied)."""

    def forward(self, input: SparseTensor) -> torch.Tensor:
        return F.global_max_pool(_check_input(input))


class BatchStatisticsError(ValueError):
    """A :class:`BatchNorm` that normalises with the batch's statistics
    (training mode, or no running statistics) was given a single site: one
    value per channel has no variance. A ValueError; its own class so that
    a caller that knows how the batch was made (``pointsparse train``: the
    voxel size, the batch size) can say so."""


class BatchNorm(SparseBackwardHooks, nn.BatchNorm1d):
    """Batch normalisation over the feats of a SparseTensor (every active site
    is one sample). A ``torch.nn.BatchNorm1d`` itself, so ``weight`` (gamma),
    ``bias``, running statistics and pruning criteria on BatchNorm apply.
    Normalising with the batch's statistics (training mode, or no running
    statistics) a tensor of one site is a :class:`BatchStatisticsError`
    naming its stride (torch refuses it, saying only that it expected more
    than 1 value per channel). A state_dict of MinkowskiEngine's
    ``MinkowskiBatchNorm`` (its tensors under ``bn.``) loads as it is.
    ``device`` and ``dtype`` by name are checked as :class:`Conv3d`'s (and
    named in the signature, which ``torch.nn.utils.skip_init`` looks for);
    torch's positional ones pass as they are."""

    def __init__(self, num_features: int, *args, device=None, dtype=None, **kwargs) -> None:
        factory = _factory_kwargs(device, dtype)  # (those given: a positional one in args, torch's order, too)
        super().__init__(positive_int(num_features, "num_features"), *args, **factory, **kwargs)
        # torch keeps these as given: momentum="a" or eps=-1 failed in the first forward, affine="no" made weights
        eps = as_float(self.eps, "eps")
        if not (math.isfinite(eps) and eps >= 0):  # (0 is torch's too)
            raise ValueError(f"eps must be a finite number >= 0; got {self.eps!r}")
        self.eps = eps
        if self.momentum is not None:
            momentum = as_float(self.momentum, "momentum")
            if not 0 <= momentum <= 1:
                raise ValueError(f"momentum must be a number in [0, 1] or None; got {self.momentum!r}")
            self.momentum = momentum
        self.affine = _flag(self.affine, "affine")
        self.track_running_stats = _flag(self.track_running_stats, "track_running_stats")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        _take_wrapped(state_dict, prefix, "bn.", "", ("weight", "bias", "running_mean", "running_var",
                                                       "num_batches_tracked"))  # (MinkowskiBatchNorm's)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _stats(self) -> torch.Tensor | None:
        """A tensor of its channels (its length: a channel cut narrows them,
        maybe not num_features), or None (no affine, no running statistics)."""
        return self.weight if self.weight is not None else self.running_mean

    def _check_feats(self, x: SparseTensor) -> None:
        """The feats this batch norm takes (ValueError / TypeError naming
        the channels or dtypes, instead of torch's error or broadcast)."""
        stats = self._stats()  # none (no affine, no running statistics): num_features, as it was built
        _check_feats_for(self, x, self.num_features if stats is None else stats.shape[0], "num_features", stats)

    def forward(self, input: SparseTensor) -> SparseTensor:  # type: ignore[override]
        x = _check_input(input)
        self._check_feats(x)
        if self.training and torch.compiler.is_compiling():
            # batch norm's own check, stated for a row count the graph only knows symbolically
            torch._check(x.feats.shape[0] != 1, lambda: "BatchNorm in training needs more than 1 site")
        elif ((self.training or (self.running_mean is None and self.running_var is None))
              and not torch.compiler.is_compiling() and x.feats.shape[0] == 1):
            raise self._one_site_error(f"1 site at stride {x.stride}")
        return x.with_feats(super().forward(x.feats))

    def _one_site_error(self, got: str) -> BatchStatisticsError:
        """The error of normalising a batch of one site (``got`` says what
        came: the site's stride, or a row of a plain tensor) with its own
        statistics (also :class:`pointsparse.models.SyncBatchNorm`'s, on one
        site over all processes)."""
        channels = self.num_features if self._stats() is None else self._stats().shape[0]
        why, eval_hint = ("training mode", " (or run the model in eval mode)") if self.training else \
            ("it keeps no running statistics", "")
        return BatchStatisticsError(
            f"BatchNorm({channels}) normalises with the batch's statistics ({why}) but got {got}: one value per "
            "channel has no variance. The batch's voxels merge into one at this stride when its clouds are few or "
            f"small for the voxel size: batch more clouds or use a smaller voxel size{eval_hint}")


class _Pointwise(SparseBackwardHooks, nn.Module):
    """Applies a feats-only torch module to a SparseTensor."""

    module_class: type[nn.Module] = nn.Identity

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()
        self.fn = self.module_class(*args, **kwargs)
        _check_options(self.fn)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # (torch's Linear inside cannot say it: its compressed SparseLinear's state is refused here, before it loads)
        if isinstance(self.fn, nn.Linear):
            _refuse_compressed_state(self, state_dict, prefix, "fn._extra_state", "weight_format", "SparseLinear")
            _take_wrapped(state_dict, prefix, "linear.", "fn.", ("weight", "bias"))  # (MinkowskiLinear's)
            # (a plain torch Linear's at the same name: TorchSparse's heads, a ported ``nn.Linear`` on ``x.F``)
            _take_wrapped(state_dict, prefix, "", "fn.", ("weight", "bias"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: SparseTensor) -> SparseTensor:
        x = _check_input(input)
        if isinstance(self.fn, nn.Linear):  # (a pruned one's weight_orig: its own hook runs after this check)
            weight = _live_weight(self.fn)
            _check_feats_for(self, x, weight.shape[1], "in_features", weight)
        return x.with_feats(self.fn(x.feats))

    def extra_repr(self) -> str:
        return self.fn.extra_repr()


def _flag(value, name: str) -> bool:
    """A torch module's flag as a bool: a bool, or the ints 0 and 1 torch's
    own code passes for them; a TypeError naming ``name`` for anything else
    (``"no"``, a float, None), which torch took by truthiness."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and value in (0, 1):
        return bool(value)
    return as_bool(value, name)


def _check_options(fn: nn.Module) -> None:
    """The options of a wrapped torch module, which torch keeps as given
    (``inplace="yes"``, ``LeakyReLU("a")`` and ``GELU(approximate="foo")``
    failed in the first forward, if at all): a TypeError / ValueError
    naming the option."""
    if hasattr(fn, "inplace"):
        fn.inplace = _flag(fn.inplace, "inplace")
    for option in ("negative_slope", "alpha"):  # (LeakyReLU's, ELU's)
        if hasattr(fn, option):
            value = as_float(getattr(fn, option), option)
            if not math.isfinite(value):
                raise ValueError(f"{option} must be a finite number; got {getattr(fn, option)!r}")
            setattr(fn, option, value)
    if isinstance(fn, nn.GELU) and fn.approximate not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh'; got {fn.approximate!r}")


def _pointwise(cls: type[nn.Module], doc: str) -> type[_Pointwise]:
    return type(cls.__name__, (_Pointwise,), {"module_class": cls, "__doc__": doc, "__module__": __name__})


ReLU = _pointwise(nn.ReLU, "ReLU on the feats.")
LeakyReLU = _pointwise(nn.LeakyReLU, "LeakyReLU on the feats.")
GELU = _pointwise(nn.GELU, "GELU on the feats.")
SiLU = _pointwise(nn.SiLU, "SiLU on the feats.")
ELU = _pointwise(nn.ELU, "ELU on the feats.")
Sigmoid = _pointwise(nn.Sigmoid, "Sigmoid on the feats.")
Tanh = _pointwise(nn.Tanh, "Tanh on the feats.")
Dropout = _pointwise(nn.Dropout, "Dropout on the feats.")


class Linear(_Pointwise):
    """A per-site linear layer on the feats (a 1x1x1 convolution); its torch
    Linear is ``fn``. A state_dict of MinkowskiEngine's ``MinkowskiLinear``
    (its tensors under ``linear.``) or of a plain ``torch.nn.Linear`` at the
    same name (``weight``, ``bias``: TorchSparse's heads) loads as it is.
    ``device`` and ``dtype``
    by name: where and in which float dtype ``fn``'s weight and bias are
    made, checked as :class:`Conv3d`'s (named in the signature, which
    ``torch.nn.utils.skip_init`` looks for); torch's positional ones pass as
    they are."""

    module_class = nn.Linear

    def __init__(self, in_features: int, out_features: int, *args, device=None, dtype=None, **kwargs) -> None:
        in_features = positive_int(in_features, "in_features")
        out_features = positive_int(out_features, "out_features")
        if in_features * out_features > MAX_WEIGHT_ELEMENTS:
            raise ValueError(f"a Linear weight of in_features {in_features} x out_features {out_features} = "
                             f"{in_features * out_features:,} values is over the limit of "
                             f"{MAX_WEIGHT_ELEMENTS:,} (2^31)")
        factory = _factory_kwargs(device, dtype)  # (those given: a positional one in args, torch's order, too)
        if len(args) < 2:  # (no positional device / dtype of torch's order: those are torch's to read)
            check_memory_for(in_features * out_features * factory.get("dtype", torch.get_default_dtype()).itemsize,
                             factory.get("device"),
                             f"a Linear weight of in_features {in_features} x out_features {out_features}",
                             "use fewer features, or build it on the meta device")
        if args or "bias" in kwargs:  # (torch's test is truthiness: bias="no" made a bias)
            _flag(args[0] if args else kwargs["bias"], "bias")
        super().__init__(in_features, out_features, *args, **factory, **kwargs)

    # (torch's Linear's names, asked of the wrapper: torch's pruning functions, a user's layer.weight)
    _FN_NAMES = frozenset(("weight", "bias", "weight_orig", "weight_mask", "bias_orig", "bias_mask",
                           "in_features", "out_features"))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in Linear._FN_NAMES:
                raise
        raise AttributeError(
            f"'Linear' object has no attribute {name!r}: pointsparse.nn.Linear keeps its torch Linear at .fn: "
            f"use layer.fn.{name} (torch's pruning: prune.l1_unstructured(layer.fn, 'weight', amount); "
            "pointsparse.prune's functions of a model name it as the layer 'NAME.fn')")
