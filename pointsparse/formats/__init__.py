"""Sparse weight formats and sparse-weight x dense-activation products.

Each format (``COO, CSR, CSC, BSR, NM, EIE, FKW``) has ``from_dense(tensor,
...)``, ``from_module(module, name="weight", ...)`` (the effective masked
weight of a pruned module), ``to_dense()``, ``nbytes()`` (exact storage, each
index array in its narrowest unsigned width, packed sub-byte fields rounded up
per array) and ``matmul(dense)`` = ``self @ dense``: the C++/OpenMP kernels on
CPU float32/float64, pure torch elsewhere. The constructors take the stored
arrays and check them (``validate()``: integer index arrays inside the shape,
pointers from 0 that never decrease and end at the entry count, permutations,
pattern and block sizes that agree), with a ValueError or TypeError naming the
array.

``compress(module, format=...)`` turns a pruned ``torch.nn.Linear`` or
``pointsparse.nn.Conv3d`` (or every one inside a model) into an inference
module holding that format. ``LoadBalancedUnstructured`` /
``load_balanced_unstructured`` prune with equal nonzeros per processing
element (ESE); ``imbalance`` measures the spread."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .. import _ext
from .._modes import evaluating, run_model
from ._base import SparseFormat, module_weight
from .balance import LoadBalancedUnstructured, imbalance, load_balanced_unstructured, pe_nnz
from .bsr import BSR
from .csr import COO, CSC, CSR
from .eie import EIE
from .fkw import FKW
from .modules import SparseConv3d, SparseLinear, dense_weight
from .nm import NM

FORMATS = {"coo": COO, "csr": CSR, "csc": CSC, "bsr": BSR, "nm": NM, "eie": EIE, "fkw": FKW}


def spmm_isa() -> str:
    """Instruction set of the SpMM kernels on this CPU: 'avx512', 'avx2' or 'generic' (the
    widest build that runs here; conv uses the same)."""
    return _ext.core.spmm_isa()


def _format_class(format):
    if isinstance(format, type) and issubclass(format, SparseFormat) and format is not SparseFormat:
        return format  # (the abstract base has no from_dense: its NotImplementedError said nothing)
    if isinstance(format, str) and format.lower() in FORMATS:
        return FORMATS[format.lower()]
    raise ValueError(f"format must be one of {sorted(FORMATS)} (or a format class); got {format!r}")


def compress(module: torch.nn.Module, format="csr", example_input=None, *, execution: str | None = None,
             **kwargs) -> torch.nn.Module:
    """An inference copy of ``module`` whose weights live in ``format``
    (a model with a BatchNorm or dropout in training mode is a ValueError:
    call ``model.eval()`` first, as for :mod:`pointsparse.export`).

    * ``torch.nn.Linear`` -> :class:`SparseLinear` (weight (out, in)). It
      runs either torch's dense linear on the weight the format holds (the
      Linear's own computation) or the format's product; with
      ``example_input`` both are timed and the faster kept (the format where
      it is clearly faster: :func:`_choose`), else the dense
      one (every format's product measured slower than torch's Linear on
      this kind of CPU, even at 50% sparsity: bench/RESULTS.md).
    * ``pointsparse.nn.Conv3d`` -> :class:`SparseConv3d`: per kernel offset
      ``W[o].T`` (C_out, C_in) in the format; FKW holds the whole
      (C_out, C_in, K) weight. It runs either through the format's product
      or through the fused engine on the weight the format holds (which
      skips all-zero offsets and runs the vector-sparse kernels when the
      weight allows: never slower than the dense module); with
      ``example_input`` (the layer's input, or for a model the model's
      input) both are timed on it and the faster kept (the format where it
      is clearly faster: :func:`_choose`), else the engine (every
      format measured slower than the engine on this kind of CPU:
      bench/RESULTS.md). ``chosen`` on the result records the choice and
      the times.
    * a layer compressed before (:class:`SparseLinear`, :class:`SparseConv3d`):
      the same, from the weight it holds (re-encoded in ``format``, its
      execution chosen again).
    * any other module: a deep copy with every Linear / Conv3d inside
      replaced (and every compressed layer re-encoded), but the Linears a
      torch module computes with by reading their ``weight`` itself, which
      a compressed layer does not hold: a ``MultiheadAttention``'s
      ``out_proj``, a ``batch_first`` ``TransformerEncoderLayer``'s
      ``linear1`` and ``linear2`` (its inference fast path, which only a
      batch_first layer takes). Those stay dense, their ``chosen`` saying
      so.

    ``execution`` pins how every compressed layer runs, measuring nothing:
    ``"dense"`` (or ``"engine"``: the same) the layer's own computation on
    the weight the format holds (a Linear's torch linear, a conv's engine:
    input gradients available whatever the timings), ``"format"`` the
    format's product; None (the default) chooses as above.

    ``kwargs`` go to the format's ``from_dense`` (``blocksize`` for BSR, ``n,
    m, prune`` for NM, ``num_pe`` for EIE). The effective weight of a pruned
    module (``weight_orig * weight_mask``, zero outside a ``kernel_region``)
    is used, and a conv's ``kernel_region`` kept (the compressed conv runs
    and reports those offsets only, as the source does); the module is not
    changed; its other forward pre-hooks (a VoxelPrune on its input), its
    forward hooks on the output and its backward hooks (full or not, and
    pre-hooks: a compressed conv's engine gives input gradients) run on the
    compressed layer too. Compressed modules save their
    formats in ``state_dict`` (a pointsparse layer of the uncompressed model
    refuses that state, and a compressed one an uncompressed state, with a
    ValueError naming the layer), follow ``.to(dtype)``, ``.double()``,
    ``.half()``, ... as a dense layer does (each format's values converted,
    its index arrays kept) and refuse inputs that need a gradient they cannot
    give, with a clear error."""
    from ..nn import Conv3d

    cls = _format_class(format)
    if execution is not None and execution not in ("dense", "engine", "format"):
        raise ValueError(f"execution must be 'dense' (or 'engine'), 'format' or None (chosen by timing); got "
                         f"{execution!r}")
    _check_on_cpu(module)
    _check_own_forward(module, Conv3d)
    layers = (torch.nn.Linear, Conv3d, SparseLinear, SparseConv3d)
    if isinstance(module, (torch.nn.Linear, SparseLinear, Conv3d, SparseConv3d)):
        layer = _compress_layer(module, cls, example_input, kwargs, execution)
        _warn_larger_than_dense([("the layer", layer)], cls)
        return layer
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    if isinstance(module, torch.nn.modules.conv._ConvNd):  # (it returned the conv's copy unchanged, silently)
        raise TypeError(f"module is a torch.nn.{type(module).__name__}, a dense conv that compress does not convert: "
                        f"it converts torch.nn.Linear and pointsparse.nn.Conv3d (a sparse network's conv), and "
                        f"models holding them (FKW.from_module gives a dense conv's weight in a format, to "
                        f"inspect)")
    _check_inference_mode(module)
    kept = _read_by_parent(module)
    for name, sub in module.named_modules():  # (before the copy and the example's run, which a refusal wastes)
        if sub not in kept:
            try:
                _check_own_forward(sub, Conv3d)
            except TypeError as error:
                raise TypeError(f"{name}: {error}") from error
    inputs = {} if example_input is None or execution is not None else _layer_inputs(module, example_input, layers)
    from ..prune._copyable import copy_model  # noqa: PLC0415 - the formats do not load the pruning package

    originals = dict(module.named_modules())
    # (pruned weights are computed, non-leaf tensors that deepcopy refuses: copied detached, the hooks recompute them)
    result = copy_model(module)
    done = {}  # id(layer) -> its compressed module: a layer shared by two parents stays shared
    converted = []  # (name, compressed layer) of the layers converted here
    for layer, why in _read_by_parent(result).items():
        layer.chosen = f"dense (kept: {why})"
        done[id(layer)] = layer
    dense_convs = [name for name, sub in result.named_modules() if isinstance(sub, torch.nn.modules.conv._ConvNd)]
    for name, sub in list(result.named_modules()):
        for child_name, child in list(sub._modules.items()):  # every name: named_children skips repeats
            if isinstance(child, layers):
                if id(child) not in done:
                    qualified = f"{name}.{child_name}" if name else child_name
                    example = inputs.get(originals[qualified]) if qualified in originals else None
                    try:
                        done[id(child)] = _compress_layer(child, cls, example, kwargs, execution)
                    except (ValueError, TypeError) as error:  # (which of the model's layers)
                        raise type(error)(f"{qualified}: {error}") from error
                    done[id(child)]._compressed_from = qualified  # (named in errors torch gives no path for)
                    converted.append((qualified, done[id(child)]))
                setattr(sub, child_name, done[id(child)])
    _warn_left_dense(module, dense_convs, converted=bool(done))
    _warn_larger_than_dense(converted, cls)
    return result


def _compress_layer(module, cls, example_input, kwargs: dict, execution: str | None):
    """One Linear / Conv3d (or a compressed one, re-encoded) in ``cls``,
    its execution chosen (:func:`compress`'s first two cases)."""
    if isinstance(module, (torch.nn.Linear, SparseLinear)):
        weight = module.weight_format.to_dense() if isinstance(module, SparseLinear) else module_weight(module, "weight")
        sparse = SparseLinear(cls.from_dense(weight, **kwargs), _effective_bias(module), execution="dense")
        return _with_hooks(module, _choose(sparse, example_input, ("dense", "format"), execution))
    return _with_hooks(module, _compress_conv(module, cls, example_input, kwargs, execution))


def _format_bytes(layer) -> tuple[int, int]:
    """(bytes of the weight in its format, bytes of the same weight dense
    in its dtype) of a compressed layer."""
    dense = layer.dense_weight if isinstance(layer, SparseLinear) else layer.engine_weight
    return layer.weight_nbytes(), dense.numel() * dense.element_size()


def _warn_larger_than_dense(layers: list, cls) -> None:
    """A UserWarning naming the compressed layers whose weight takes more
    bytes in the format than dense (``weight_nbytes()`` against the dense
    weight's bytes): too dense for the format, which then saves nothing (a user
    compressing to save memory or file size met no sign of it)."""
    import warnings

    bigger = []
    for name, layer in layers:
        stored, dense = _format_bytes(layer)
        if stored > dense:
            bigger.append(f"{name} ({stored} bytes against {dense})")
    if bigger:
        shown = ", ".join(bigger[:3]) + (f", and {len(bigger) - 3} more" if len(bigger) > 3 else "")
        warnings.warn(f"in {cls.__name__} the weight takes more bytes than dense in {shown}: it is too dense for "
                      "the format to save memory (prune it further, or keep it dense)", UserWarning, stacklevel=3)


def _warn_left_dense(module, dense_convs: list, converted: bool) -> None:
    """A UserWarning where compress left torch's dense convs of the model as
    they were (named), or converted no layer at all: it returned the
    model's copy, still pruned, and said nothing."""
    import warnings

    if dense_convs:
        shown = ", ".join(dense_convs[:3]) + (", ..." if len(dense_convs) > 3 else "")
        warnings.warn(f"compress left {len(dense_convs)} torch conv layer{'s' if len(dense_convs) > 1 else ''} of the "
                      f"model dense ({shown}): it converts torch.nn.Linear and pointsparse.nn.Conv3d only",
                      UserWarning, stacklevel=3)
    elif not converted:
        warnings.warn(f"compress found no torch.nn.Linear or pointsparse.nn.Conv3d in the {type(module).__name__}: "
                      "the copy it returns is the model's, uncompressed", UserWarning, stacklevel=3)


#: torch modules that compute with a child Linear's ``weight`` themselves, never calling the child: a
#: MultiheadAttention (F.multi_head_attention_forward reads out_proj.weight), a TransformerEncoderLayer on
#: its inference fast path (and a TransformerEncoder's, through its first layer), which torch takes only for
#: a layer whose self_attn is batch_first (the others call linear1 and linear2 as modules, which a compressed
#: layer serves). A compressed layer holds no ``weight``: the model failed with an AttributeError when called.
_READ_BY_PARENT = ((torch.nn.MultiheadAttention, ("out_proj",), lambda parent: True),
                   (torch.nn.TransformerEncoderLayer, ("linear1", "linear2"),
                    lambda parent: bool(getattr(parent.self_attn, "batch_first", True))))


def _read_by_parent(model: torch.nn.Module) -> dict:
    """``{layer: why}``: the Linears of ``model`` whose weight a parent
    reads itself (:data:`_READ_BY_PARENT`), which compress keeps dense."""
    found = {}
    for parent in model.modules():
        for parent_type, names, reads in _READ_BY_PARENT:
            if isinstance(parent, parent_type) and reads(parent):
                for name in names:
                    child = parent._modules.get(name)
                    if isinstance(child, torch.nn.Linear):
                        found.setdefault(child, f"torch's {parent_type.__name__} reads {name}.weight itself")
    return found


def _check_on_cpu(module) -> None:
    """The formats hold CPU tensors (the C++ core's SpMM and engine run
    them): a module with a parameter or buffer elsewhere is a ValueError
    naming it (compress silently gave a CPU module that then refused the
    device's inputs)."""
    off = _ext.off_cpu(module) if isinstance(module, torch.nn.Module) else None  # (else compress's TypeError)
    if off is not None:
        kind, name, device = off
        raise ValueError(f"compress runs on the CPU (the formats hold CPU tensors); {kind} {name} is on {device}: "
                         "compress module.cpu()")


def _check_inference_mode(module: torch.nn.Module) -> None:
    """A ValueError naming the first submodule of ``module`` whose forward
    depends on its mode and is in training mode: a norm with running
    statistics (BatchNorm) or a dropout. The copy compress makes keeps each
    module's mode: such a module in it normalised by each input's own
    statistics (moving its running ones) or dropped values, where
    ``pointsparse.export`` refuses the model. A layer's forward has no mode:
    a fresh Linear or Conv3d (in training mode) is compressed."""
    for name, sub in module.named_modules():
        moded = (isinstance(sub, torch.nn.modules.batchnorm._NormBase) and sub.running_mean is not None) or \
            isinstance(sub, torch.nn.modules.dropout._DropoutNd)
        if moded and sub.training:
            where = f"submodule {name}" if name else "module"
            raise ValueError(f"compress makes an inference copy: the model's {where} ({type(sub).__name__}) is in "
                             "training mode (a batch norm would normalise by each input's own statistics, a dropout "
                             "drop values); call model.eval() (it sets every submodule) before compressing")


def _check_own_forward(module, conv_type) -> None:
    """A TypeError where ``module`` subclasses torch.nn.Linear or Conv3d
    (``conv_type``) with a forward of its own: the compressed layer runs the
    base's computation and would silently drop what that forward adds. A
    subclass keeping the base's forward (torch's parametrized Linear) passes."""
    for base in (torch.nn.Linear, conv_type):
        if isinstance(module, base) and type(module).forward is not base.forward:
            raise TypeError(f"module is a {type(module).__name__}, a subclass of {base.__module__}.{base.__name__} "
                            f"that overrides forward: its compressed layer would run {base.__name__}'s computation "
                            f"without it; give the model a plain {base.__name__} there to compress it")


def _with_hooks(module: torch.nn.Module, compressed: torch.nn.Module) -> torch.nn.Module:
    """``compressed`` given ``module``'s forward pre-hooks (say a VoxelPrune
    ``models.add_voxel_prune`` put on its input), in their order, but its
    pruning's (a mask, a filter skeleton: the weight they compute is the
    one the format holds), and its forward hooks on the output, in their
    order, but the pruning's bookkeeping (``_detach_masked``: the format
    holds no masked weight), and its backward hooks (torch's, or the full
    ones of a module of SparseTensors, whose two forward hooks that run them
    ``compressed`` registers anew, in their places among the others: a hook
    before them changes what the backward hooks see, as on ``module``);
    returned."""
    from torch.nn.utils.prune import BasePruningMethod

    from ..nn._hooks import RUNNERS, copy_backward_hooks, place_runners  # noqa: PLC0415
    from ..prune._copyable import _detach_masked  # noqa: PLC0415 - the formats do not load the pruning package
    from ..prune.stripe import FilterSkeleton  # noqa: PLC0415

    pre_order, post_order = [], []  # (the new ids, the runners where they stood: place_runners)
    for key, hook in module._forward_pre_hooks.items():
        if hook is RUNNERS[0]:
            pre_order.append(hook)
        elif not isinstance(hook, (BasePruningMethod, FilterSkeleton)):
            pre_order.append(compressed.register_forward_pre_hook(
                hook, with_kwargs=key in module._forward_pre_hooks_with_kwargs).id)
    for key, hook in module._forward_hooks.items():  # (dropped before: a hook clamping the output, silently gone)
        if hook is RUNNERS[1]:
            post_order.append(hook)
        elif hook is not _detach_masked:
            post_order.append(compressed.register_forward_hook(
                hook, with_kwargs=key in module._forward_hooks_with_kwargs,
                always_call=key in module._forward_hooks_always_called).id)
    copy_backward_hooks(module, compressed)
    place_runners(compressed, pre_order, post_order)
    return compressed


def _effective_bias(module) -> torch.Tensor | None:
    """The bias as the layer's forward uses it: ``bias_orig * bias_mask``
    where it is pruned (the attribute ``bias`` is what the hook computed at
    the last forward, stale after a step on ``bias_orig``), else ``bias``."""
    if getattr(module, "bias", None) is None and getattr(module, "bias_orig", None) is None:
        return None
    return module_weight(module, "bias")


def _effective_conv_weight(module) -> torch.Tensor:
    """``(K, C_in, C_out)``: the masked weight, zero outside the kernel region."""
    from ..nn.functional import region_of

    if isinstance(module, SparseConv3d):  # (compressed before: the weight it holds, zero outside its region)
        return dense_weight(module.offsets)
    weight = module_weight(module, "weight")
    region = region_of(module.kernel_size, getattr(module, "kernel_region", None))
    # (the mask on the weight's device: region_of gives it on the CPU)
    return weight if region is None else weight * region.to(weight.device, weight.dtype).view(-1, 1, 1)


def _compress_conv(module, cls, example_input, kwargs, execution: str | None = None) -> SparseConv3d:
    weight = _effective_conv_weight(module)
    if cls is FKW:
        offsets = FKW.from_dense(weight.permute(2, 1, 0), **kwargs)
    else:
        offsets = []
        for o in range(weight.shape[0]):
            try:
                offsets.append(cls.from_dense(weight[o].t(), **kwargs))
            except ValueError as error:  # (rows: output channels, columns: input channels of that offset)
                raise ValueError(f"kernel offset {o} (its W[{o}].T, C_out x C_in): {error}") from error
    sparse = SparseConv3d(offsets, module.kernel_size, module.stride, module.dilation, module.transposed,
                          module.in_channels, module.out_channels, _effective_bias(module), execution="engine",
                          relu=getattr(module, "relu", False),  # (convs pickled before these existed have none)
                          kernel_region=getattr(module, "kernel_region", None))
    return _choose(sparse, example_input, ("engine", "format"), execution)


#: The clock of :func:`_interleaved_times`.
_clock = time.perf_counter

#: Interleaved timed calls of each execution in :func:`_choose` (after a warm-up call each).
CHOICE_ROUNDS = 7

#: The time another execution must beat the dense module's computation by (its median at most this share of
#: the dense median) to be chosen: a layer near parity keeps the dense computation, which a noisy machine
#: could otherwise rank below a slower format (3 calls each, one after the other, once kept a CSR product
#: 0.82x as fast as torch's Linear).
CHOICE_MARGIN = 0.95


def _choose(sparse, example_input, executions, given: str | None = None):
    """``sparse`` (a SparseConv3d / SparseLinear) set to ``given`` where one
    is (``"dense"`` / ``"engine"``: the first of ``executions``; nothing
    measured), else to the faster of its
    ``executions`` on ``example_input`` (``chosen`` records the times), or
    to the first, the dense module's own computation, without one. Timed in
    :data:`CHOICE_ROUNDS` interleaved rounds (a machine's slow phase falls
    on every execution alike), medians compared; the first is kept unless
    another's median is at most :data:`CHOICE_MARGIN` of its own."""
    if given is not None:
        sparse.execution = "format" if given == "format" else executions[0]
        sparse.chosen = f"{sparse.execution} (given)"
        return sparse
    if example_input is None:
        sparse.execution = executions[0]
        sparse.chosen = f"{executions[0]} (not measured)"
        return sparse
    with _example_named(f"the layer ({type(sparse).__name__})"):
        times = _interleaved_times(sparse, example_input, executions)
    first = executions[0]
    best = min(times, key=times.get)
    sparse.execution = best if times[best] <= CHOICE_MARGIN * times[first] else first
    sparse.chosen = f"{sparse.execution} (" + ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in times.items()) + ")"
    return sparse


def _interleaved_times(module, example_input, executions, rounds: int | None = None) -> dict:
    """Median wall time of ``module(example_input)`` without gradients under
    each of ``executions`` (``module.execution`` set to each in turn, one
    call per round, ``rounds`` rounds, default :data:`CHOICE_ROUNDS`),
    after one warm-up call of each (which builds the kernel map)."""
    rounds = CHOICE_ROUNDS if rounds is None else rounds
    times = {execution: [] for execution in executions}
    with torch.no_grad():
        for execution in executions:
            module.execution = execution
            module(example_input)
        for _ in range(rounds):
            for execution in executions:
                module.execution = execution
                start = _clock()
                module(example_input)
                times[execution].append(_clock() - start)
    return {execution: statistics.median(t) for execution, t in times.items()}


@contextlib.contextmanager
def _example_named(what: str):
    """A TypeError / ValueError raised inside, of the same type, saying that
    ``example_input`` does not fit ``what`` (the layer's or model's words
    kept: they said nothing of compress's argument)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        raise type(error)(f"example_input does not fit {what}: {error}") from error


def _layer_inputs(model, example_input, layer_types) -> dict:
    """The input each layer of ``layer_types`` in ``model`` sees on
    ``example_input`` (one run without gradients, in eval mode; the first
    call of a module shared by several places): its first positional
    argument, or its ``input=`` keyword where the model passes it so."""
    seen, handles = {}, []

    def record(module, args, kwargs, out) -> None:  # (a forward hook that returns a value replaces the output)
        if args:
            seen.setdefault(module, args[0])
        elif "input" in kwargs:  # (every layer type's forward names it input: conv(input=x), linear(input=x))
            seen.setdefault(module, kwargs["input"])

    for sub in model.modules():
        if isinstance(sub, layer_types):
            handles.append(sub.register_forward_hook(record, with_kwargs=True))
    try:
        with evaluating(model), torch.no_grad(), _example_named(f"the model ({type(model).__name__})"):
            run_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return seen


__all__ = [
    "BSR", "COO", "CSC", "CSR", "EIE", "FKW", "NM", "FORMATS", "SparseFormat",
    "SparseLinear", "SparseConv3d", "compress", "spmm_isa",
    "LoadBalancedUnstructured", "load_balanced_unstructured", "imbalance", "pe_nnz",
]
