"""Inference modules that store a pruned weight in a sparse format and run
the SpMM kernels; built by :func:`pointsparse.formats.compress`."""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch
from torch import nn

from .. import _ext
from .. import kmap as _kmap
from ..nn._hooks import SparseBackwardHooks
from ..nn.reference import _autocast_dtype, autocast_input, conv_sum, im2col, offset_pairs
from ..tensor import SparseTensor, as_bool, as_triple, positive_int
from ._base import VALUE_DTYPES, SparseFormat, check_data, outside_transforms
from ._storage import widen
from .csr import CSR
from .fkw import FKW


def _bias_copy(bias, channels: int, what: str, dtype: torch.dtype):
    """A copy of ``bias``, None or a ``(channels,)`` tensor (``what``: the
    layer's name for them) of the format's ``dtype``, else a TypeError /
    ValueError."""
    if bias is None:
        return None
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None; got {type(bias).__name__}")
    if bias.shape != (channels,):  # (the format's product broadcast a (1,) bias over every channel)
        raise ValueError(f"bias must be ({what},) = ({channels},); got {tuple(bias.shape)}")
    if bias.dtype != dtype:  # (the engine refused it at the first forward, the format's product cast it)
        raise TypeError(f"bias must have the format's dtype {dtype}; got {bias.dtype} (convert it: "
                        f"bias.to({dtype}))")
    return bias.detach().clone()


def refuse_uncompressed_state(module: nn.Module, state_dict, prefix: str) -> None:
    """A ValueError naming ``module`` (at ``prefix``) where ``state_dict``
    holds an uncompressed layer's weight (``weight``, or a pruned one's
    ``weight_orig``) and no ``_extra_state`` for this compressed layer's
    format (torch's bare "Missing key(s) ... Unexpected key(s)" said nothing
    of why; ``strict=False`` kept the format it had without a word)."""
    if prefix + "_extra_state" in state_dict:
        return
    key = next((prefix + k for k in ("weight", "weight_orig") if prefix + k in state_dict), None)
    if key is not None:
        where = f" '{prefix[:-1]}'" if prefix else ""
        raise ValueError(f"{type(module).__name__}{where}: the state_dict holds an uncompressed layer ('{key}'), "
                         f"where this compressed layer takes its format ('{prefix}_extra_state'); load it into the "
                         "uncompressed model and compress that (pointsparse.formats.compress), or load the "
                         "state_dict of a model compressed the same way")


@contextlib.contextmanager
def extra_state_checked_first(module: nn.Module, state_dict, prefix: str, local_metadata):
    """The context of a compressed layer's ``_load_from_state_dict``: its
    ``_extra_state`` in ``state_dict`` checked (``module._checked_state``)
    before torch's load copies the bias, so that a state it refuses raises
    with the layer as it was (the refused state's bias was copied in first:
    the layer ran its own weight with another layer's bias); its
    ``set_extra_state`` then takes the checked values (:func:`checked_extra_state`)
    and, under ``assign=True``, puts the weight it derives from the format
    where the state's tensors go (:func:`assigned_device`)."""
    key = prefix + "_extra_state"
    if key not in state_dict:
        yield
        return
    assign = local_metadata.get("assign_to_params_buffers", False)
    device = assigned_device(state_dict, prefix) if assign else None
    try:
        checked = module._checked_state(state_dict[key])
    except (TypeError, ValueError) as error:  # (which of the model's layers refused it, as torch's own errors say)
        head, text = f"{type(module).__name__}:", str(error)
        if not prefix or not text.startswith(head):
            raise
        raise type(error)(f"{type(module).__name__} '{prefix[:-1]}':{text[len(head):]}") from None
    module._checked_extra_state = (state_dict[key], checked, device)
    try:
        yield
    finally:
        del module._checked_extra_state


def assigned_device(state_dict, prefix: str) -> torch.device:
    """Where ``load_state_dict(assign=True)`` puts a compressed layer's
    tensors: the device of the state's bias, else the CPU, where the formats
    it loads live. (The derived weight stayed where it was: after
    ``.to("meta")`` a meta weight beside the real bias, which torch's linear
    ran as garbage.)"""
    bias = state_dict.get(prefix + "bias")
    return bias.device if isinstance(bias, torch.Tensor) else torch.device("cpu")


def checked_extra_state(module: nn.Module, state, derived: torch.Tensor) -> tuple:
    """``(module._checked_state(state), device)``, ``device`` where the weight
    the layer derives from its format goes (``derived``'s device, or
    the assigned one in a load under ``assign=True``): what
    :func:`extra_state_checked_first` checked of this very ``state`` (not
    checked twice)."""
    pending = module.__dict__.get("_checked_extra_state")
    if pending is not None and pending[0] is state:
        return pending[1], pending[2] if pending[2] is not None else derived.device
    return module._checked_state(state), derived.device


def refuse_gradient(module: nn.Module, input: torch.Tensor, what: str) -> None:
    """A clear error where autograd would need a gradient the module cannot
    give, or the input carries a forward-mode tangent (``torch.func.jvp``,
    ``torch.autograd.forward_ad``: the product would drop it, a silent zero)."""
    if _ext.needs_grad(input):
        raise RuntimeError(
            f"{type(module).__name__} ({what}) is inference-only and cannot give a gradient for its input, and "
            "its input requires grad (the model's input does, or parameters of layers before it, such as a "
            "BatchNorm's); run it under torch.no_grad() or torch.inference_mode() (or detach the input), or "
            "train the uncompressed module")
    if _ext.carries_tangent(input):
        raise RuntimeError(
            f"{type(module).__name__} ({what}) is inference-only and cannot carry a forward-mode tangent "
            "(torch.func.jvp, torch.autograd.forward_ad) of its input; give it a plain input, or differentiate "
            "the uncompressed module")


def outside_graphs(name: str) -> str:
    """Why ``torch.compile`` runs a layer's format product outside its graphs
    (``torch.compiler.disable``'s reason: dynamo's refusal under fullgraph=True
    and strict torch.export; :func:`refuse_export`'s under non-strict export)."""
    execution = "set its execution to 'engine' (the fused engine on the weight it holds), or " \
        if name == "SparseConv3d" else "set its execution to 'dense' (torch's linear on the weight it holds), or "
    return (f"formats.{name} runs its format's product on the C++ core, outside torch's operators: plain "
            "torch.compile runs it between graphs, but torch.compile(fullgraph=True) and torch.export cannot "
            f"take it into a graph; {execution}compile or export the model before formats.compress")


_made_outside_graphs: set = set()  # (class, method) pairs wrapped so far
_outside_graphs_lock = threading.Lock()


def run_outside_graphs(cls: type, method: str) -> None:
    """``cls.method`` (a format product) wrapped once in ``torch.compiler.disable``
    (reason :func:`outside_graphs`), when the process makes (or unpickles,
    or copies) its first layer of ``cls``: torch's compiler, which that
    imports, cost ``import pointsparse.formats`` (and so the first
    ``prune.sparsity_report``) a second. Every graph meets the wrapped method:
    a layer exists before any graph calls it."""
    with _outside_graphs_lock:
        if (cls, method) not in _made_outside_graphs:
            setattr(cls, method, torch.compiler.disable(cls.__dict__[method], reason=outside_graphs(cls.__name__)))
            _made_outside_graphs.add((cls, method))


def refuse_export(name: str) -> None:
    """A RuntimeError (:func:`outside_graphs`) where torch.export traces a
    layer's format product: its non-strict tracing (torch's default) runs
    the product on tensors it wraps, and failed inside it with torch's
    ".numpy() is not supported for tensor subclasses"."""
    if torch.compiler.is_exporting():
        raise RuntimeError(outside_graphs(name))


#: How a SparseLinear runs: torch's dense linear on the weight its format
#: holds (``dense_weight``, derived, not saved: what the Linear it replaces
#: runs, input gradients available), or the format's own product (inference
#: only).
LINEAR_EXECUTIONS = ("dense", "format")


class _HoldsNoWeight:
    """A compressed layer's missing ``weight`` (``weight_orig``,
    ``weight_mask``): an AttributeError saying why (torch's pruning of it
    raised a bare one), still an AttributeError (``hasattr`` False)."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in _WEIGHT_NAMES:
                raise
        raise _missing_weight(self, name)


class SparseLinear(_HoldsNoWeight, nn.Module):
    """``y = x @ W.T + b`` with W (out, in) held in a sparse format.

    ``execution="format"``: computes ``(W @ x.T).T`` with the format's
    product (the activations become the dense operand (K, N) with one column
    per sample). Inference only (no gradients); ``torch.compile`` runs the
    product between graphs (``fullgraph=True`` and ``torch.export`` refuse
    it). Under ``torch.autocast`` the output in its precision, as torch's
    Linear gives it (the product in the format's float32, rounded once).
    ``execution="dense"``: torch's ``linear`` on the dense weight the format
    holds (``dense_weight``, derived, not saved), as the Linear it replaces
    runs (compiles, exports, gives input gradients, autocasts as it does).
    :func:`pointsparse.formats.compress` picks the faster (the dense one
    without an example input: every format's product measured slower than
    torch's Linear on this kind of CPU); ``chosen`` says what it measured.
    The format, the execution and the choice are saved in ``state_dict``
    (extra state; a state saved before the execution was kept runs the
    format, as it did then). The format is the weight as a value: assign
    another (``layer.weight_format = CSR.from_dense(w)``, checked) to change
    it; an edit of its arrays in place reaches the format's product only."""

    def __init__(self, weight: SparseFormat, bias: torch.Tensor | None = None, execution: str = "format") -> None:
        super().__init__()
        if execution not in LINEAR_EXECUTIONS:
            raise ValueError(f"execution must be one of {LINEAR_EXECUTIONS}; got {execution!r}")
        run_outside_graphs(SparseLinear, "_product")
        self.weight_format = checked_format(weight, f"{type(self).__name__}: weight")
        self.out_features, self.in_features = weight.shape
        self.execution = execution
        self.chosen = execution  # compress() records what it measured here
        self.register_buffer("bias", _bias_copy(bias, self.out_features, "out_features", self.weight_format.dtype))
        self.register_buffer("dense_weight", self.weight_format.to_dense(), persistent=False)

    def __setattr__(self, name: str, value) -> None:
        """``weight_format`` assigned (a format edited and put back, another
        format of the weight): checked as the layer's weight (its shape and
        dtype) and its dense weight made anew from it, so that both
        executions run it (the dense one ran the weight the layer was made
        with, and a state_dict round trip then changed the outputs)."""
        if name == "weight_format" and "dense_weight" in self._buffers:
            fmt = self._checked_weight(value, f"{type(self).__name__}: weight_format")
            dense = self.dense_weight
            self.__dict__["weight_format"] = fmt
            self.dense_weight = fmt.to_dense().to(dense.device, dense.dtype)
            return
        super().__setattr__(name, value)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor) or input.dim() < 1 or \
                input.shape[-1] != self.in_features:
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"input must be (..., {self.in_features}); got {shape}")
        check_data(input, f"{type(self).__name__}: input")  # (torch's bare errors deep inside before)
        input = autocast_input(input, self.weight_format.dtype)
        check_dtype(self, f"the input is {input.dtype}", input.dtype, type(self.weight_format).__name__,
                    self.weight_format.dtype)
        if self.execution not in LINEAR_EXECUTIONS:  # (set on the layer after it was made)
            raise ValueError(f"execution must be one of {LINEAR_EXECUTIONS}; got {self.execution!r}")
        if self.execution == "dense":
            if input.device != self.dense_weight.device:  # (torch's bare "Tensor on device meta is not on ...")
                raise ValueError(f"{layer_name(self)}: its weight is on {self.dense_weight.device} but the input on "
                                 f"{input.device}")
            return nn.functional.linear(input, self.dense_weight, self.bias)
        return self._product(input)

    def _product(self, input: torch.Tensor) -> torch.Tensor:  # (outside graphs: run_outside_graphs)
        refuse_export(type(self).__name__)
        refuse_gradient(self, input, type(self.weight_format).__name__)
        with outside_transforms(input, f"{type(self).__name__} ({type(self.weight_format).__name__})",
                                "give it a tensor made outside the transform, or transform the uncompressed module"):
            lead = input.shape[:-1]
            # (-1 is ambiguous for in_features 0; the input's own width, not the number in_features, so that
            # a dependency graph tracing through here sees the channels reach the format, not a plain size)
            x = input.detach().reshape(lead.numel(), input.shape[-1])
            low = _autocast_dtype(x)  # (under torch.autocast the Linear's precision, rounded once)
            with torch.autocast(x.device.type, enabled=False):
                y = self.weight_format.matmul(x.t().contiguous()).t()
                if self.bias is not None:
                    y = y + self.bias.to(y.device, y.dtype)
            y = y if low is None else y.to(low)
            return y.reshape(*lead, self.out_features)

    def weight_nbytes(self) -> int:
        """The weight's storage in its format alone."""
        return self.weight_format.nbytes()

    def nbytes(self) -> int:
        """Weight format storage plus the bias."""
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight_nbytes() + extra

    def get_extra_state(self):
        return {"weight_format": format_data(self.weight_format), "execution": self.execution,
                "chosen": self.chosen}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        refuse_uncompressed_state(self, state_dict, prefix)
        with extra_state_checked_first(self, state_dict, prefix, local_metadata):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def set_extra_state(self, state) -> None:
        """Loads the format ``get_extra_state`` gave, checked first (its arrays,
        its shape (out_features, in_features), its dtype): a bad state is a
        ValueError or TypeError and leaves the module as it was (in
        ``load_state_dict`` its bias too: checked before torch copies it)."""
        (fmt, execution, chosen), device = checked_extra_state(self, state, self.dense_weight)
        self.__dict__["weight_format"] = fmt  # (its dense weight set below: not __setattr__'s)
        self.execution, self.chosen = execution, chosen
        self.dense_weight = fmt.to_dense().to(device, self.dense_weight.dtype)

    def _checked_state(self, state) -> tuple:
        """``(format, execution, chosen)`` of the ``_extra_state`` ``state``,
        or the ValueError / TypeError :meth:`set_extra_state` raises."""
        name = type(self).__name__
        if not isinstance(state, dict) or "weight_format" not in state:
            raise ValueError(f"{name}: _extra_state must be the dict get_extra_state gives (weight_format); got "
                             f"{type(state).__name__}")
        what = f"{name}: _extra_state's weight_format"
        fmt = self._checked_weight(format_of_data(state["weight_format"], what), what)
        # (a state saved before the execution was kept ran the format)
        execution, chosen = state.get("execution", "format"), state.get("chosen", "format")
        if execution not in LINEAR_EXECUTIONS:
            raise ValueError(f"{name}: _extra_state's execution must be one of {LINEAR_EXECUTIONS}; got "
                             f"{execution!r}")
        if not isinstance(chosen, str):
            raise TypeError(f"{name}: _extra_state's chosen must be a str; got {type(chosen).__name__}")
        return fmt, execution, chosen

    def _checked_weight(self, fmt, what: str) -> SparseFormat:
        """``fmt`` where it is a format of this layer's weight (its shape
        (out_features, in_features), its dtype), else the ValueError /
        TypeError starting with ``what``."""
        fmt = checked_format(fmt, what)
        if tuple(fmt.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{what} has shape {tuple(fmt.shape)}; this layer's weight is (out_features, "
                             f"in_features) = ({self.out_features}, {self.in_features})")
        if fmt.dtype != self.weight_format.dtype:
            raise TypeError(f"{what} has dtype {fmt.dtype}; this layer's is {self.weight_format.dtype} (convert "
                            f"the layer first: .to({fmt.dtype}))")
        return fmt

    def __setstate__(self, state) -> None:
        run_outside_graphs(SparseLinear, "_product")
        super().__setstate__(state)
        if "execution" not in self.__dict__:  # (pickled before the execution was kept: it ran the format)
            self.execution = self.chosen = "format"
            self.register_buffer("dense_weight", self.weight_format.to_dense(), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        dtype = converted_dtype(fn, self.weight_format.dtype, layer_name(self))
        result = super()._apply(fn, *args, **kwargs)
        self.__dict__["weight_format"] = self.weight_format._with_dtype(dtype)  # (dense_weight converted above)
        return result

    def train(self, mode: bool = True):
        warn_training(self, mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, weight={self.weight_format!r}, "
                f"execution={self.execution!r}, chosen={self.chosen!r}")


def format_data(fmt: SparseFormat) -> dict:
    """``fmt`` as plain data (its class's name, and its attributes: tensors,
    ints, tuples, dtypes), what a compressed layer's ``_extra_state`` holds:
    ``torch.load(weights_only=True)`` (torch's default) and
    :func:`pointsparse.checkpoint.load` read a state_dict of it back, where a
    pickled format object is refused. :func:`format_of_data` rebuilds it."""
    return {"format": type(fmt).__name__, "attributes": fmt.__getstate__()}


def format_of_data(data, what: str):
    """The format :func:`format_data` gave (a format object itself, from a
    state saved before the data form, passes as it is; :func:`checked_format`
    checks either), else a TypeError / ValueError starting with ``what``."""
    if isinstance(data, SparseFormat):
        return data
    from . import FORMATS  # noqa: PLC0415 - (the package's table, complete once it is imported)

    classes = {cls.__name__: cls for cls in FORMATS.values()}
    if not (isinstance(data, dict) and set(data) == {"format", "attributes"} and isinstance(data["format"], str)
            and isinstance(data["attributes"], dict)):
        raise TypeError(f"{what} must be a sparse format (pointsparse.formats.CSR, BSR, ...) or the data of one "
                        f"({{'format': name, 'attributes': dict}}); got {type(data).__name__}")
    cls = classes.get(data["format"])
    if cls is None:
        raise ValueError(f"{what} names format {data['format']!r}; the formats are {sorted(classes)}")
    fmt = cls.__new__(cls)
    try:  # (its _pickled_unsigned: the dtypes of widened index arrays, restored here)
        fmt.__setstate__(data["attributes"])
    except (AttributeError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"{what} is not a valid {cls.__name__}: its attributes do not restore one "
                         f"({type(error).__name__}: {error})") from error
    return fmt


def checked_format(fmt, what: str) -> SparseFormat:
    """``fmt`` if it is a sparse format whose arrays pass its checks (a
    loaded format was unpickled without its constructor's checks), else a
    TypeError / ValueError starting with ``what``."""
    if not isinstance(fmt, SparseFormat):
        raise TypeError(f"{what} must be a sparse format (pointsparse.formats.CSR, BSR, ...); got "
                        f"{type(fmt).__name__}")
    try:
        return fmt.validate()
    except AttributeError as error:  # (data whose attributes miss one the format holds)
        raise ValueError(f"{what} is not a valid {type(fmt).__name__}: it lacks {error.name!r}") from error
    except (TypeError, ValueError) as error:
        raise type(error)(f"{what} is not a valid {type(fmt).__name__}: {error}") from error


def check_dtype(module: nn.Module, got: str, dtype: torch.dtype, format_name: str, weight_dtype: torch.dtype) -> None:
    """A TypeError naming ``module``, the input (``got``) and its weight's
    format where the input's ``dtype`` is not the weight's (the format's
    product named its own argument, the engine its own weight)."""
    if dtype != weight_dtype:
        layer = f" or the layer (.to({dtype}))" if dtype.is_floating_point else ""
        raise TypeError(f"{type(module).__name__}: {got} but its weight (format {format_name}) is {weight_dtype}; "
                        f"convert the input{layer}")


def warn_training(module: nn.Module, mode) -> None:
    """The warning of ``module.train()`` on a compressed layer: its weight
    lives in its format, no parameter, so an optimizer over the model's
    parameters trains the layers around it and leaves it as it is (its
    input gradient is given: a frozen compressed backbone under a trained
    head is a use). Once a process (one text, torch's train() its place)."""
    if mode:
        warnings.warn("a compressed layer (pointsparse.formats.compress) is an inference copy: its weight is no "
                      "parameter and stays as it is while the layers around it train (train the uncompressed "
                      "model, then compress it)", UserWarning, stacklevel=3)


#: The names torch's pruning and a user's code ask of a layer's weight, which a compressed layer does not hold.
_WEIGHT_NAMES = frozenset(("weight", "weight_orig", "weight_mask"))


def no_weight_hint(module: nn.Module) -> str:
    """Why the compressed layer ``module`` holds no ``weight``, and what to do
    (torch's pruning of it raised a bare AttributeError)."""
    derived = "dense_weight" if isinstance(module, SparseLinear) else "engine_weight"
    return (f"{layer_name(module)} is compressed (pointsparse.formats.compress): its weight is held in its sparse "
            f"format, no parameter (.{derived} is the dense tensor it runs, derived); prune the model before "
            "compressing it")


def _missing_weight(module: nn.Module, name: str) -> AttributeError:
    return AttributeError(f"'{type(module).__name__}' object has no attribute {name!r}: {no_weight_hint(module)}")


def layer_name(module: nn.Module) -> str:
    """The class of the compressed layer ``module`` and, where
    :func:`pointsparse.formats.compress` made it inside a model, the name the
    layer it replaced had there (errors that torch raises without the
    module's path, such as a conversion's, name it so)."""
    path = getattr(module, "_compressed_from", None)
    return type(module).__name__ + (f" (compressed from '{path}')" if path else "")


def converted_dtype(fn, dtype: torch.dtype, what: str) -> torch.dtype:
    """The dtype ``module._apply(fn)`` gives a floating tensor of ``dtype``
    (``.to(dtype)``, ``.double()``, ``.half()``, ...), which a compressed
    layer's formats follow as its bias does (they refused it once, after
    torch's ``_apply`` had converted the layers before: a half-converted
    model). A dtype a format cannot hold (complex, an integer through
    ``.type``, a float8 type: not one of :data:`VALUE_DTYPES`, which its
    checks and products take) is a TypeError naming ``what``. (The layers
    before it are converted by then: torch's ``_apply`` converts the
    children in order, and no layer sees the conversion first.) A device
    move keeps the formats on the CPU: they compute on any device."""
    probe = fn(torch.zeros((), dtype=dtype))
    if probe.dtype not in VALUE_DTYPES:  # (float8 is floating: formats of it failed their own checks)
        raise TypeError(f"{what} holds its weight in a sparse format of float16, bfloat16, float32 or float64 values "
                        f"({dtype}) and cannot follow a conversion to {probe.dtype} (torch converts a model's layers "
                        f"in order: those before this one are converted by now; convert them back or reload the "
                        f"model's state_dict)")
    return probe.dtype


def _format_product(fmt: SparseFormat):
    """``rows -> rows @ W[o]`` for a format holding ``W[o].T`` ``(C_out, C_in)``."""
    return lambda rows: fmt.matmul(rows.t().contiguous()).t()


def _csr_conv_accumulate(fmt: CSR, feats, in_idx, out_idx, out) -> None:
    """The fused C++ offset product: gathers feats[in_idx] straight into the
    kernel's transposed panels and adds rows into out[out_idx] (in place)."""
    _ext.call(
        _ext.core.csr_conv_accumulate,
        _ext.to_numpy(widen(fmt.row_ptr)),
        fmt.col_idx.numpy(),
        _ext.to_numpy(fmt.values),
        _ext.to_numpy(feats),
        _ext.to_numpy(in_idx.to(torch.int64)),
        _ext.to_numpy(out_idx.to(torch.int64)),
        out.numpy(),
        None,
    )


def dense_weight(offsets) -> torch.Tensor:
    """The ``(K, C_in, C_out)`` weight held by per-offset formats (``W[o].T``
    each) or by one FKW ``(C_out, C_in, K)``."""
    if isinstance(offsets, FKW):
        return offsets.to_dense().permute(2, 1, 0).contiguous()
    dense = [f.to_dense().t() for f in offsets]
    # (stacked as outside autocast, whose stack refuses a 16-bit dtype other than its own: "Unexpected floating
    # ScalarType in at::autocast::prioritize", a bf16 model compressed under fp16 autocast)
    with torch.autocast(dense[0].device.type if dense else "cpu", enabled=False):
        return torch.stack(dense).contiguous()


#: How a SparseConv3d runs: through the fused engine on the weight its
#: format holds (which itself skips zero offsets and runs the vector-sparse
#: kernels when the weight allows; input gradients available), or through the
#: format's own product (inference only).
EXECUTIONS = ("engine", "format")


class SparseConv3d(SparseBackwardHooks, _HoldsNoWeight, nn.Module):
    """A pointsparse ``Conv3d`` whose weight (K, C_in, C_out) is held in a
    sparse format: one ``W[o].T`` (C_out, C_in) per kernel offset, or for FKW
    one filter-kernel-weight array over the (C_out, C_in, K) weight.

    ``execution="format"``: per offset o with pairs (in_idx, out_idx) from the
    input's cached kernel map, ``out[out_idx] += (W[o].T @ feats[in_idx].T).T``;
    for CSR on the CPU one fused C++ call per offset (gather, product and
    scatter). FKW multiplies the (C_out, C_in * K) matrix with gathered
    columns of output sites in chunks. Inference only (an input that needs a
    gradient is refused); ``torch.compile`` runs it between graphs
    (``fullgraph=True`` refuses it: :func:`outside_graphs`). ``execution="engine"``: the fused engine on the
    weight the format holds (``engine_weight``, derived, not saved).
    :func:`pointsparse.formats.compress` picks the faster; ``chosen`` says
    what it measured. Outputs equal the masked dense module's; under
    ``torch.autocast`` in its precision, as that module gives them (the
    format's product in float32, rounded once; an input in another float
    dtype, an autocast layer's output, taken as the Conv3d takes it).

    ``kernel_region``: the compressed ``Conv3d``'s (None, ``"cross"`` or
    offset indices; kept as the sorted indices): the offsets outside it
    must hold no nonzero value, are skipped by both executions, and are no
    weights of the layer in ``prune.sparsity_report`` (its FLOPs and the
    engine's cost count the region only, as the source conv's do). The
    formats, the choice and the region are saved in ``state_dict`` (extra
    state); ``.to(dtype)`` converts the formats' values as it does the bias.
    Full backward hooks see its feats' gradients, as a ``Conv3d``'s do.
    The formats are the weight as a value: assign others (``conv.offsets =
    [...]``, checked) to change it; an edit of their arrays in place
    reaches the formats' product only, not the engine's weight."""

    def __init__(self, offsets, kernel_size, stride, dilation, transposed, in_channels,
                 out_channels, bias=None, execution: str = "format", relu: bool = False,
                 kernel_region=None) -> None:
        super().__init__()
        run_outside_graphs(SparseConv3d, "_format_forward")
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}; got {execution!r}")
        self.execution = execution
        self.chosen = execution  # compress() records what it measured here
        # (as Conv3d takes them; flags not by truthiness: transposed="False" ran the transposed conv)
        self.kernel_size = as_triple(kernel_size, "kernel_size")
        self.stride = as_triple(stride, "stride")
        self.dilation = as_triple(dilation, "dilation")
        self.transposed = as_bool(transposed, "transposed")
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.kernel_volume = self.kernel_size[0] * self.kernel_size[1] * self.kernel_size[2]
        #: ReLU on the output (on the sum with ``add``), as the compressed
        #: Conv3d's ``relu`` (set by ``nn.fuse_for_inference``).
        self.relu = as_bool(relu, "relu")
        # list of SparseFormat (C_out, C_in) or one FKW
        self.offsets = self._checked_offsets(offsets, f"{type(self).__name__}: offsets:")
        weight = dense_weight(self.offsets)
        self.kernel_region = self._checked_region(kernel_region, weight, f"{type(self).__name__}:")
        self.register_buffer("bias", _bias_copy(bias, self.out_channels, "out_channels", self.format_dtype))
        self.register_buffer("engine_weight", weight, persistent=False)

    @property
    def format_name(self) -> str:
        return type(self.offsets if isinstance(self.offsets, FKW) else self.offsets[0]).__name__

    @property
    def format_dtype(self) -> torch.dtype:
        return self.offsets.dtype if isinstance(self.offsets, FKW) else self.offsets[0].dtype

    def __setstate__(self, state) -> None:  # (unpickled, deep-copied: its format product outside graphs first)
        run_outside_graphs(SparseConv3d, "_format_forward")
        super().__setstate__(state)

    def __setattr__(self, name: str, value) -> None:
        """``offsets`` assigned (formats edited and put back, other formats
        of the weight): checked as the conv's weight (count, shapes, one
        dtype, the conv's; nothing outside its ``kernel_region``) and its
        engine weight made anew from them, so that the engine and the
        formats run them alike (the engine ran the weight the conv was
        made with)."""
        if name == "offsets" and "engine_weight" in self._buffers:
            what = f"{type(self).__name__}: offsets:"
            offsets = self._checked_offsets(value, what)
            dtype = offsets.dtype if isinstance(offsets, FKW) else offsets[0].dtype
            if dtype != self.format_dtype:
                raise TypeError(f"{what} their dtype is {dtype}; this conv's is {self.format_dtype} (convert the "
                                f"conv: .to({dtype}))")
            weight = dense_weight(offsets)
            self._checked_region(self.kernel_region, weight, what)
            engine = self.engine_weight
            self.__dict__["offsets"] = offsets
            self.engine_weight = weight.to(engine.device, engine.dtype)
            return
        super().__setattr__(name, value)

    def get_extra_state(self):
        offsets = format_data(self.offsets) if isinstance(self.offsets, FKW) else \
            [format_data(f) for f in self.offsets]
        return {"offsets": offsets, "execution": self.execution, "chosen": self.chosen,
                "kernel_region": self.kernel_region}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs) -> None:
        refuse_uncompressed_state(self, state_dict, prefix)
        with extra_state_checked_first(self, state_dict, prefix, local_metadata):
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def _checked_region(self, region, weight: torch.Tensor, what: str):
        """``region`` (None, ``"cross"`` or offset indices) as a sorted tuple
        of offset indices, or None; a ValueError / TypeError starting with
        ``what`` where it is none for this kernel size or ``weight`` holds a
        nonzero value outside it (the conv would ignore it)."""
        from ..nn.functional import region_of  # noqa: PLC0415 - nn and formats are siblings

        try:
            keep = region_of(self.kernel_size, region)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{what} {error}") from None
        if keep is None:
            return None
        # (the mask on the weight's device: region_of gives it on the CPU)
        outside = (weight != 0).reshape(weight.shape[0], -1).any(1) & ~keep.to(weight.device)
        if outside.any():
            raise ValueError(f"{what} kernel_region {list(keep.nonzero().flatten().tolist())} leaves out offset "
                             f"{int(outside.nonzero()[0])}, which holds nonzero weights (the conv would ignore them; "
                             "zero them or widen the region)")
        return tuple(int(i) for i in keep.nonzero().flatten())

    def _region_mask(self) -> torch.Tensor | None:
        """The bool ``(K,)`` of the offsets this conv runs (None: all)."""
        from ..nn.functional import region_of  # noqa: PLC0415 - nn and formats are siblings

        # (modules pickled before the region was kept have none)
        return region_of(self.kernel_size, getattr(self, "kernel_region", None))

    def set_extra_state(self, state) -> None:
        """Loads the formats, execution, choice and region ``get_extra_state``
        gave, checked first: a bad state is a ValueError or TypeError and
        leaves the conv as it was (in ``load_state_dict`` its bias too:
        checked before torch copies it)."""
        (offsets, execution, chosen, region, weight), device = checked_extra_state(self, state, self.engine_weight)
        self.__dict__["offsets"] = offsets  # (its engine weight set below: not __setattr__'s)
        self.execution, self.chosen = execution, chosen
        self.kernel_region = region
        self.engine_weight = weight.to(device, self.engine_weight.dtype)

    def _checked_state(self, state) -> tuple:
        """``(offsets, execution, chosen, kernel_region, weight)`` of the
        ``_extra_state`` ``state`` (``weight`` the (K, C_in, C_out) dense one),
        or the ValueError / TypeError :meth:`set_extra_state` raises."""
        if not isinstance(state, dict) or not {"offsets", "execution", "chosen"} <= state.keys():
            raise ValueError(f"{type(self).__name__}: _extra_state must be the dict get_extra_state gives "
                             "(offsets, execution, chosen)")
        name = type(self).__name__
        # checked before anything is replaced: a bad state leaves the module as it was
        if state["execution"] not in EXECUTIONS:
            raise ValueError(f"{name}: _extra_state's execution must be one of {EXECUTIONS}; got "
                             f"{state['execution']!r}")
        if not isinstance(state["chosen"], str):
            raise TypeError(f"{name}: _extra_state's chosen must be a str; got {type(state['chosen']).__name__}")
        offsets = self._checked_offsets(state["offsets"], f"{name}: _extra_state's offsets do not make a weight:")
        dtype = offsets.dtype if isinstance(offsets, FKW) else offsets[0].dtype
        if dtype != self.format_dtype:
            raise TypeError(f"{name}: _extra_state's offsets have dtype {dtype}; this conv's are {self.format_dtype} "
                            f"(convert the layer first: .to({dtype}))")
        weight = dense_weight(offsets)
        # (a state saved before the region was kept has none: every offset runs, as it did then)
        region = self._checked_region(state.get("kernel_region"), weight, f"{name}: _extra_state's")
        return offsets, state["execution"], state["chosen"], region, weight

    def _checked_offsets(self, offsets, what: str):
        """``offsets`` if they hold this conv's weight: one FKW of weight
        shape (C_out, C_in, K) or a list of K formats of shape (C_out, C_in),
        all of one dtype, each passing its checks (as objects, or as the data
        :func:`format_data` gives of them)."""
        c_out, c_in, volume = self.out_channels, self.in_channels, self.kernel_volume
        if isinstance(offsets, dict):  # (one FKW's data)
            offsets = format_of_data(offsets, f"{what} the FKW")
        elif isinstance(offsets, (list, tuple)):
            offsets = [format_of_data(f, f"{what} offset {o}") for o, f in enumerate(offsets)]
        if isinstance(offsets, FKW):
            checked_format(offsets, f"{what} the FKW")
            if tuple(offsets.weight_shape) != (c_out, c_in, volume):
                raise ValueError(f"{what} the FKW holds a weight of shape {tuple(offsets.weight_shape)}; this "
                                 f"conv's is (C_out, C_in, K) = {(c_out, c_in, volume)}")
            return offsets
        if not isinstance(offsets, (list, tuple)) or len(offsets) != volume:
            got = f"{len(offsets)} formats" if isinstance(offsets, (list, tuple)) else type(offsets).__name__
            raise ValueError(f"{what} they must be one FKW or a list of K = {volume} formats (one per kernel "
                             f"offset); got {got}")
        for o, fmt in enumerate(offsets):
            checked_format(fmt, f"{what} offset {o}")
            if tuple(fmt.shape) != (c_out, c_in):
                raise ValueError(f"{what} offset {o} holds W[o].T of shape {tuple(fmt.shape)} (C_out, C_in): a "
                                 f"weight of shape {(volume, fmt.shape[1], fmt.shape[0])}; this conv's is "
                                 f"{(volume, c_in, c_out)}")
            if fmt.dtype != offsets[0].dtype:
                raise TypeError(f"{what} offset {o} has dtype {fmt.dtype}; offset 0 has {offsets[0].dtype}")
        return list(offsets)

    def _apply(self, fn, *args, **kwargs):
        dtype = converted_dtype(fn, self.format_dtype, layer_name(self))
        result = super()._apply(fn, *args, **kwargs)  # (the bias and engine_weight, as the formats below)
        self.__dict__["offsets"] = self.offsets._with_dtype(dtype) if isinstance(self.offsets, FKW) else \
            [f._with_dtype(dtype) for f in self.offsets]  # (engine_weight converted above)
        return result

    def forward(self, input: SparseTensor, add: SparseTensor | None = None) -> SparseTensor:
        """As ``pointsparse.nn.Conv3d``: ``relu(conv(input) + add)`` (``add``
        and the ReLU where given / set)."""
        if not isinstance(input, SparseTensor):
            raise TypeError(f"expected a SparseTensor; got {type(input).__name__}")
        if input.num_channels != self.in_channels:
            raise ValueError(f"input has {input.num_channels} channels; this conv takes "
                             f"{self.in_channels}")
        feats = autocast_input(input.feats, self.format_dtype)
        input = input if feats is input.feats else input.with_feats(feats)
        check_dtype(self, f"the input's feats are {input.dtype}", input.dtype, self.format_name, self.format_dtype)
        if self.execution not in EXECUTIONS:  # (set on the layer after it was made: a typo ran the format)
            raise ValueError(f"execution must be one of {EXECUTIONS}; got {self.execution!r}")
        if self.execution == "engine":
            from ..nn import functional as NF  # noqa: PLC0415 - nn and formats are siblings

            return NF.conv3d(input, self.engine_weight, self.kernel_size, self.stride, self.dilation,
                             self.bias, self.transposed, relu=self.relu,
                             kernel_region=getattr(self, "kernel_region", None), add=add)
        return self._format_forward(input, add)

    def _format_forward(self, input: SparseTensor, add: SparseTensor | None) -> SparseTensor:
        """:meth:`forward` through the format's product (``execution="format"``;
        outside graphs: :func:`run_outside_graphs`)."""
        refuse_export(type(self).__name__)
        refuse_gradient(self, input.feats, f"format {self.format_name}")
        kmap = _kmap.get_kmap(input, self.kernel_size, self.stride, self.dilation, self.transposed)
        with outside_transforms(input.feats, f"{type(self).__name__} (format {self.format_name})",
                                "give it a tensor made outside the transform, or transform the uncompressed module"):
            # Under torch.autocast the output in its precision, as the Conv3d gives it: the product in
            # the format's float32 (the values it holds), its sum and bias rounded once (autocast off
            # inside: the per-offset loop rounded its sum before the bias, CSR and FKW not at all).
            low = _autocast_dtype(input.feats)
            with torch.autocast(input.feats.device.type, enabled=False):
                out = self._format_conv(input.feats.detach(), kmap)
            out = out if low is None else out.to(low)
        if self.transposed:
            out_stride = tuple(a // b for a, b in zip(input.stride, self.stride))
        else:
            out_stride = tuple(a * b for a, b in zip(input.stride, self.stride))
        result = SparseTensor(out, kmap.out_coords, out_stride, cache=input.cache, validate=False)
        if add is not None:
            from ..nn import functional as NF  # noqa: PLC0415 - nn and formats are siblings

            if not isinstance(add, SparseTensor):
                raise TypeError(f"add must be a SparseTensor or None; got {type(add).__name__}")
            result = NF.add(result, add)
        return result.with_feats(torch.relu(result.feats)) if self.relu else result

    def _format_conv(self, feats: torch.Tensor, kmap) -> torch.Tensor:
        """The format's conv of plain ``feats`` over ``kmap``, plus the bias."""
        keep = self._region_mask()
        runs = [f.values.numel() > 0 and (keep is None or bool(keep[o])) for o, f in enumerate(self.offsets)] \
            if not isinstance(self.offsets, FKW) else None
        if isinstance(self.offsets, FKW):
            out = self._fkw_forward(feats, kmap)
        elif self._runs_fused_csr(feats):
            out = feats.new_zeros((kmap.num_out, self.out_channels))
            for o, in_idx, out_idx in offset_pairs(kmap):
                if runs[o]:
                    _csr_conv_accumulate(self.offsets[o], feats, in_idx, out_idx, out)
        else:
            products = [_format_product(f) if run else None for f, run in zip(self.offsets, runs)]
            out = conv_sum(feats, products, kmap, self.out_channels)
        if self.bias is not None:
            out = out + self.bias.to(out.device, out.dtype)
        return out

    def _runs_fused_csr(self, feats: torch.Tensor) -> bool:
        """Whether every offset runs the fused C++ CSR product (CPU float32/64)."""
        return (all(isinstance(f, CSR) and f.dtype == feats.dtype for f in self.offsets)
                and _ext.serves(feats, dtypes=_ext.FLOAT_DTYPES))

    def _fkw_forward(self, feats: torch.Tensor, kmap) -> torch.Tensor:
        """im2col over chunks of output sites: column q of the (C_in * K, n)
        panel holds, at row c * K + o, the input feature c of q's neighbour
        at offset o (0 where there is none). A NaN / inf weight is left out
        of that product (times an absent neighbour's 0 it made a NaN at
        every output site) and added over its offset's pairs alone, as the
        conv does."""
        K, c_in = self.kernel_volume, self.in_channels
        num_out = kmap.num_out
        out = feats.new_zeros((num_out, self.out_channels))
        fkw, bad = self.offsets, ~torch.isfinite(self.offsets.weight)
        nonfinite = bool(bad.any())
        if nonfinite:  # (their product with an absent neighbour's 0 was a NaN at every output site)
            fkw = type(fkw).__new__(type(fkw))
            fkw.__dict__.update(self.offsets.__dict__)
            fkw.weight = self.offsets.weight.masked_fill(bad, 0)
        chunk = max(1, (1 << 22) // max(1, c_in * K))
        for start in range(0, num_out, chunk):
            stop = min(num_out, start + chunk)
            panel = feats.new_zeros((c_in, K, stop - start))
            im2col(feats, kmap, start, stop, out=panel.permute(2, 1, 0))
            out[start:stop] = fkw.matmul(panel.reshape(c_in * K, -1)).t()
        if nonfinite:  # a NaN / inf weight reaches the outputs with a pair at its offset, as in the conv
            weight = self.engine_weight
            out += conv_sum(feats, weight.masked_fill(weight.isfinite(), 0).to(feats.dtype), kmap)
        return out

    def weight_nbytes(self) -> int:
        """The weight's storage (all offsets) alone."""
        if isinstance(self.offsets, FKW):
            return self.offsets.nbytes()
        return sum(f.nbytes() for f in self.offsets)

    def nbytes(self) -> int:
        """Weight storage (all offsets) plus the bias."""
        extra = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight_nbytes() + extra

    def train(self, mode: bool = True):
        warn_training(self, mode)
        return super().train(mode)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}" + (f", dilation={self.dilation}" if self.dilation != (1, 1, 1) else "")
                + (", transposed=True" if self.transposed else "")
                + f", format={self.format_name}, nbytes={self.nbytes()}, "
                f"execution={self.execution!r}, chosen={self.chosen!r}" + (", relu=True" if self.relu else "")
                + (f", kernel_region={list(self.kernel_region)}" if getattr(self, "kernel_region", None) is not None
                   else ""))
