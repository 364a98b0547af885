"""The one module that imports the C++ core and owns the torch <-> numpy
conversion. CPU tensors reach the core as zero-copy numpy views; results come
back as tensors sharing the core's buffers."""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import numpy as np
import torch
from torch.autograd import forward_ad

def _not_built() -> str:
    """The message of a pointsparse without its core: in a source checkout
    (beside its pyproject.toml), that this folder's package shadows one
    ``pip install .`` installed (``python -m pointsparse`` from the
    repository's root said "run make build, or pip install ." to a user who
    had installed it), naming the installed one where there is one."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return ("pointsparse's C++ core (pointsparse._core) is not built: run `make build` in the repository, or "
                "`pip install .`")
    import sys  # noqa: PLC0415 - only on this path

    installed = []
    for folder in sys.path:
        other = os.path.join(os.path.abspath(folder or os.curdir), "pointsparse")
        try:  # (a folder this process may not list: the message is still the checkout's)
            names = os.listdir(other) if other != here and os.path.isdir(other) else []
        except OSError:
            names = []
        if any(name.startswith("_core") and name.endswith((".so", ".pyd")) for name in names):
            installed.append(other)
    also = (f"; the one installed at {installed[0]} runs from any other folder (this checkout's package comes "
            "first on the path here)") if installed else (
        ", or `pip install .` and run from another folder (this checkout's package comes first on the path here)")
    return (f"pointsparse's C++ core (pointsparse._core) is not built in the source checkout {root}: run `make "
            f"build` there{also}")


try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(_not_built()) from exc

core = _core


class MissingExtra(ImportError):
    """An optional package a feature needs is not installed (laspy for LAS,
    open3d for PLY/PCD, scikit-learn for the digits task); the message names
    the package and how to install it. The command line prints it as a
    one-line error (an ImportError, so ``except ImportError`` still takes it)."""


#: Environment variable: the widest instruction set the engine runs by
#: default ('generic', 'avx2', 'avx512'; empty: the widest the CPU runs),
#: read once, here, before the engine's thresholds are. Under 'avx2' an
#: AVX-512 machine runs as one without AVX-512 (no bf16 kernels, no AMX):
#: an AMD Zen 3's defaults, for its tests and for benchmarks.
ISA_ENV = "POINTSPARSE_ISA"


def _isa_from_env() -> None:
    value = os.environ.get(ISA_ENV, "").strip()
    if not value:
        return
    if value not in ("generic", "avx2", "avx512"):
        raise ValueError(f"{ISA_ENV} must be 'generic', 'avx2', 'avx512' or empty; got {value!r}")
    _core.set_isa_limit(value)


_isa_from_env()


#: Overrides the core's answer to whether this CPU's AVX-512 FMAs run at full
#: width (``_core.avx512_full_width``: "1" or "0"; empty or unset: the CPU's
#: answer), which the engine's kernel choices and thresholds follow; read
#: once, here (``_core.set_avx512_full_width`` sets it later: nn._engine
#: follows the core's answer on each call). For benchmarks and tests that
#: compare the two kinds of CPU on one.
FULL_WIDTH_ENV = "POINTSPARSE_AVX512_FULL_WIDTH"


def _full_width_from_env() -> None:
    value = os.environ.get(FULL_WIDTH_ENV, "").strip()
    if not value:
        return
    if value not in ("0", "1"):
        raise ValueError(f"{FULL_WIDTH_ENV} must be '1', '0' or empty; got {value!r}")
    try:
        _core.set_avx512_full_width(int(value))  # (refuses 1 where the avx512 build does not run)
    except ValueError as error:
        raise ValueError(f"{FULL_WIDTH_ENV}={value}: {error}") from None


_full_width_from_env()

COORD_MIN: int = _core.COORD_MIN
COORD_MAX: int = _core.COORD_MAX
BATCH_MAX: int = _core.BATCH_MAX


# A process forked from one whose OpenMP pool has run (ours or torch's: they
# share libgomp) hangs at its next parallel region. Forked children therefore
# run the core on one thread, as torch's DataLoader workers do for torch.
_forked = False


def _mark_forked() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_mark_forked)


def max_threads() -> int:
    """The processors this process may run on: no core call uses more."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return max(1, os.cpu_count() or 1)


# Per Python thread: a thread count that num_threads() returns there (set by
# ``threads_here``), so that tasks running side by side on Python threads
# (nn.build_maps) each run their core calls on one OpenMP thread.
_local = threading.local()


@contextlib.contextmanager
def threads_here(n: int):
    """Within the block, :func:`num_threads` returns ``n`` (clamped as
    always) in the calling Python thread only; other threads are unchanged."""
    before = getattr(_local, "threads", None)
    _local.threads = n
    try:
        yield
    finally:
        _local.threads = before


def num_threads() -> int:
    """Threads each core call uses: ``POINTSPARSE_NUM_THREADS`` if set (an
    empty value counts as unset), else ``torch.get_num_threads()``, so the
    core and torch never oversubscribe; never more than :func:`max_threads`
    (a larger request is clamped: more threads than processors only wait on
    each other); 1 in a process created by ``fork`` (where a second OpenMP
    thread would hang), e.g. a DataLoader worker. Inside :func:`threads_here`
    its count, in that Python thread only (clamped the same way)."""
    if _forked:
        return 1
    here = getattr(_local, "threads", None)
    if here is not None:
        return max(1, min(here, max_threads()))
    env = os.environ.get("POINTSPARSE_NUM_THREADS", "").strip()
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"POINTSPARSE_NUM_THREADS must be an integer; got {env!r}") from None
        if value < 1:
            raise ValueError(f"POINTSPARSE_NUM_THREADS must be >= 1; got {value}")
    else:
        value = torch.get_num_threads()
    return max(1, min(value, max_threads()))


#: The backend policies: ``"auto"`` (the C++ core serves every call it can
#: take, the torch path the rest), ``"torch"`` (the pure-torch path for every
#: call, as on other devices), ``"core"`` (the core must serve: a call it
#: cannot take is a ValueError instead of a silent torch fallback).
BACKENDS = ("auto", "core", "torch")
#: The float dtypes the core's kernels take (conv, SpMM, voxel reductions).
FLOAT_DTYPES = (torch.float32, torch.float64)
BACKEND_ENV = "POINTSPARSE_BACKEND"
_override: str | None = None


def _checked_backend(name, what: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}; got {name!r}")
    return name.strip().lower()


def get_backend() -> str:
    """The policy in force: the innermost :class:`backend` set, else
    ``POINTSPARSE_BACKEND`` (empty or unset: ``"auto"``)."""
    if _override is not None:
        return _override
    env = os.environ.get(BACKEND_ENV, "").strip()
    return _checked_backend(env, BACKEND_ENV) if env else "auto"


class backend:
    """Set the backend policy (:data:`BACKENDS`) for every op of every module
    (coords, voxelize, kmap, the conv engine, the operators, the formats' SpMM).

    ``pointsparse.backend("torch")`` sets it until changed; ``with
    pointsparse.backend("torch"): ...`` sets it for the block and restores the
    previous one after. It overrides ``POINTSPARSE_BACKEND``; it is one
    process-wide setting (not per thread). An explicit per-call choice
    (``kmap.build(method="hash")``, ``_engine.conv``) still runs what it names."""

    def __init__(self, name: str):
        global _override
        self.name = _checked_backend(name, "backend")
        self._previous = _override
        _override = self.name

    def __enter__(self) -> "backend":
        return self

    def __exit__(self, *exc) -> bool:
        global _override
        _override = self._previous
        return False

    def __repr__(self) -> str:
        return f"pointsparse.backend({self.name!r})"


def takes(*tensors, dtypes=None) -> bool:
    """The core's own conditions: every tensor (None skipped; a device stands
    for a tensor on it) on the CPU and, given ``dtypes``, of one of them."""
    # A plain loop (is_cpu, no device objects): asked several times on every conv call.
    for t in tensors:
        if t is None:
            continue
        if isinstance(t, torch.Tensor):
            if not t.is_cpu or (dtypes is not None and t.dtype not in dtypes):
                return False
        elif torch.device(t).type != "cpu":
            return False
    return True


def serves(*tensors, dtypes=None) -> bool:
    """Whether the C++ core serves a call on these tensors: the one decision
    every module makes. ``"torch"``: never; ``"auto"``: when :func:`takes`;
    ``"core"``: when :func:`takes`, else a ValueError saying why not."""
    policy = get_backend()
    if policy == "torch":
        return False
    if takes(*tensors, dtypes=dtypes):
        return True
    if policy == "core":
        got = ", ".join(f"{t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else str(t)
                        for t in tensors if t is not None)
        need = "CPU tensors" + ("" if dtypes is None else " of dtype " + " or ".join(str(d) for d in dtypes))
        raise ValueError(f"backend 'core' is in force but the C++ core takes {need}; got {got}")
    return False


def off_cpu(module: torch.nn.Module):
    """``(kind, name, device)`` of ``module``'s first parameter or buffer on
    a device other than the CPU (a meta tensor aside), or None: what the
    parts that hold CPU tensors (formats, exported programs) refuse."""
    for kind, named in (("parameter", module.named_parameters()), ("buffer", module.named_buffers())):
        for name, tensor in named:
            if tensor.device.type not in ("cpu", "meta"):
                return kind, name, tensor.device
    return None


def torch_path() -> backend:
    """``backend("torch")`` as a context manager (the tests' name for it)."""
    return backend("torch")


def values(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``tensor``'s values where a torch.func transform
    wraps it: a ``grad`` / ``vjp`` / ``jacrev`` wrapper (live, or dead and kept
    in a cache) is unwrapped, as ``detach`` would (the core reads values, it
    never differentiates: the engine's autograd Functions do). A ``vmap``
    batch has no values of one sample: a TypeError."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(tensor):
        if functorch.is_batchedtensor(tensor):
            raise TypeError("the C++ core cannot run under torch.func.vmap (a batched tensor reached it): "
                            "loop over the samples instead")
        tensor = functorch.get_unwrapped(tensor)
    return tensor


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether grad mode is on and one of ``tensors`` (None aside) requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def carries_tangent(*tensors: torch.Tensor | None) -> bool:
    """Whether one of ``tensors`` (None aside) carries a forward-mode tangent
    (``torch.autograd.forward_ad``, ``torch.func.jvp``): the core's products
    have no jvp rule, so such a tensor takes a differentiable path."""
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def batched(*tensors: torch.Tensor | None) -> bool:
    """Whether one of ``tensors`` (None aside) is a ``torch.func.vmap`` batch
    (at any level of the transforms' wrappers): the core cannot read it, so
    it takes a Function with a vmap rule. False in a torch.compile / export
    trace (which traces vmap itself, and cannot trace this test)."""
    if torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    for t in tensors:
        while t is not None and functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_batchedtensor(t):
                return True
            t = functorch.get_unwrapped(t)
    return False


def in_transform() -> bool:
    """Whether a torch.func transform (``grad``, ``vjp``, ``jacrev``, ``vmap``, ...) is running."""
    return torch._C._functorch.maybe_current_level() is not None


def plain_ops():
    """A context in which torch ops make plain tensors inside a torch.func
    transform too (its dispatch off; elsewhere nothing changes): for what a
    coordinate cache keeps, maps and plans, never differentiated. Built in a
    transform, their index tensors came out wrapped at its level, and kept
    past it a later transform's ops met them as escaped wrappers (torch's
    'level <= current_level' INTERNAL ASSERT): a map built in
    ``jvp(grad(...))`` failed the next transform's torch-ops conv."""
    return torch._C._DisableFuncTorch() if in_transform() else contextlib.nullcontext()


def guard_or_false(cond) -> bool:
    """torch's ``guard_or_false``: a plain bool (eager) as it is; a symbolic
    one (a graph's row count) False unless known true. Its module (sympy
    under it) is not imported with the package: half a second of every
    process that imports it and traces no graph."""
    if isinstance(cond, bool):
        return cond
    return torch.fx.experimental.symbolic_shapes.guard_or_false(cond)


def to_numpy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A C-contiguous numpy view of a CPU tensor (a copy only when the dtype or
    layout must change); inside a torch.func transform, of its :func:`values`."""
    if tensor.device.type != "cpu":
        raise ValueError(f"the C++ core takes CPU tensors; got one on {tensor.device}")
    if in_transform():
        # with the transforms' dispatch off: inside one even a plain tensor's
        # detach() comes back wrapped, and .numpy() of a wrapper fails
        with torch._C._DisableFuncTorch():
            return _numpy(values(tensor), dtype)
    return _numpy(tensor, dtype)


def _numpy(tensor: torch.Tensor, dtype: torch.dtype | None) -> np.ndarray:
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous().numpy()


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def foreign_keywords(hints: dict[str, str]):
    """Decorate a constructor so that a keyword another library's class of
    the same role takes (MinkowskiEngine's ``features=``, ``dimension=``;
    spconv's ``indice_key=``) is a TypeError saying what to write here,
    not Python's bare "unexpected keyword argument". The signature stays
    the function's (``functools.wraps``)."""
    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            if kwargs:
                for name in filter(hints.__contains__, kwargs):  # (a constructor: the class called, a subclass's too)
                    where = type(args[0]).__name__ if fn.__name__ == "__init__" and args else fn.__qualname__
                    raise TypeError(f"{where}() takes no {name}= argument: {hints[name]}")
            return fn(*args, **kwargs)
        return call
    return wrap


def brief(error: BaseException, limit: int = 200) -> str:
    """``"Type: text"`` of ``error`` for a one-line message: its first line,
    cut where it passes ``limit`` characters at the last sentence's end
    in the limit's second half (else a word's there, else at the limit,
    marked ``...``): a message cut at a fixed width
    ended mid-sentence ("... there is a high likelihood that your
    checkpoint file is)")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(text) > limit:  # (a sentence's or a word's end in the limit's second half, else the limit itself)
        end = text.rfind(". ", limit // 2, limit)
        space = text.rfind(" ", limit // 2, limit)
        text = text[:end + 1] if end > 0 else (text[:space] if space > 0 else text[:limit]).rstrip(" ,;:") + " ..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def call(fn, *args, **keywords):
    """Call a core function; the core raises ValueError for bad arguments,
    and a MemoryError naming the function where its output does not fit
    (C++'s bare ``std::bad_alloc``: a kernel map of a large kernel over
    dense sites, whose pairs are counted only as they are found).
    ``keywords`` follow the thread count."""
    try:
        return fn(*args, num_threads(), **keywords)
    except MemoryError as error:
        name = getattr(fn, "__name__", "function")
        raise MemoryError(f"the C++ core's {name} ran out of memory ({str(error) or 'bad_alloc'}): what it makes "
                          "(a kernel map's pairs, a conv's output rows, a voxelised cloud) is larger than this "
                          "process may allocate; use fewer points or sites, a smaller kernel or fewer channels") \
            from None


def reuse_freed_memory(on: bool = True, max_bytes: int = 1 << 30) -> bool:
    """Keep freed memory in the process for the next call (glibc's malloc).

    Every inference call allocates and frees buffers of megabytes (the
    voxelised cloud, kernel maps, plans, conv outputs). With glibc's
    defaults each comes from fresh pages that the kernel faults in and
    zeroes on first touch. ``on``: blocks up to ``max_bytes`` (or 32 MiB, where a
    glibc version refuses more) come from the heap and up to ``max_bytes``
    of freed heap stays in the process, so a repeated
    call finds its pages mapped (the resident size stays near its peak);
    off: glibc's 128 KiB thresholds again (its dynamic threshold stays off).
    Process-wide (every library's allocations); returns False where the C
    library is not glibc (nothing changed). Measured with
    ``bench/ab_trees.py --setup 1 'ps.reuse_freed_memory(True)'`` (bench/RESULTS.md)."""
    if not isinstance(on, (bool, np.bool_)):  # (a numpy bool too, as every flag of the package: tensor.as_bool)
        raise TypeError(f"on must be a bool (True or False); got {on!r}")
    on = bool(on)
    from .tensor import as_int  # noqa: PLC0415 - the tensor layer imports this module

    try:
        max_bytes = as_int(max_bytes, "max_bytes", 0)
        if max_bytes > 1 << 30:
            raise ValueError
    except (TypeError, ValueError) as error:  # (a wrong type a TypeError, one out of range a ValueError)
        raise type(error)(f"max_bytes must be an int in [0, 2**30]; got {max_bytes!r}") from None
    return bool(core.reuse_freed_memory(on, max_bytes))


#: Outputs of at least this many bytes come from the output pool
#: (``cpp/runtime/pool.h``); smaller ones from torch. 32 MiB: glibc's largest
#: mmap threshold, above which every allocation is fresh pages; below it glibc
#: keeps freed blocks in its heap after the first (its threshold rises to
#: them), and with outputs of many sizes its heap served them better than the
#: pool's blocks of one size each (the north star's bf16 model 0.95x with the
#: pool from 1 MiB, bench/RESULTS.md "Stop 59").
POOL_MIN_BYTES = 32 << 20
# numpy's type for each dtype the pool serves (16-bit floats as int16, viewed back).
_POOL_TYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.bfloat16: np.int16,
               torch.float16: np.int16}
# Whether the pool keeps anything (output_pool(0) turns it off: outputs then come from torch).
_pool_on = True
# Held while the limit and _pool_on change together (two threads setting limits
# at once could otherwise leave the pool off under a limit above 0).
_pool_lock = threading.Lock()


def new_output(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for an engine output: from the output pool
    (memory freed by earlier outputs, so that a repeated call does not fault
    in fresh pages) where it is on and the output holds at least
    :data:`POOL_MIN_BYTES`, else ``torch.empty`` on the CPU (whatever torch's
    default device: the core writes it). Inside a torch.func transform
    always ``torch.empty``."""
    count = 1
    for n in shape:
        count *= int(n)
    kind = _POOL_TYPES.get(dtype)
    if not _pool_on or kind is None or count * dtype.itemsize < POOL_MIN_BYTES or in_transform():
        return torch.empty(shape, dtype=dtype, device="cpu")
    tensor = torch.from_numpy(core.pooled_empty([int(n) for n in shape], np.dtype(kind)))
    return tensor.view(dtype) if tensor.dtype != dtype else tensor


def output_pool(max_bytes: int | None = None) -> dict:
    """The engine's pool of output memory: the convolutions' outputs (and
    input gradients) of at least 32 MiB come from blocks that earlier
    outputs freed, so that a repeated call finds its pages mapped instead of
    faulting in and zeroing fresh ones (a 91k x 128 float32 output: some 10 ms
    on a 2-core Xeon, more than a pruned conv's kernels; bench/RESULTS.md
    "Stop 59"). Only the engine's own outputs (the rest of the process
    allocates as before, unlike :func:`reuse_freed_memory`); a freed block is
    kept while the kept blocks stay within ``max_bytes`` (default 256 MiB),
    the oldest freed first beyond it. ``max_bytes``: the new limit (0: keep
    nothing, every output from torch again; None: unchanged). Returns the
    state after the change: ``max_bytes``, ``kept_bytes``, ``kept_blocks``,
    ``hits`` (outputs served by a kept block), ``misses`` (outputs that
    allocated). Process-wide; thread-safe. A pooled output's storage cannot
    grow (``resize_`` to more elements raises, as for any tensor made by
    ``torch.from_numpy``), and torch's memory profiler does not count it."""
    global _pool_on
    if max_bytes is None:
        return dict(core.output_pool(-1))
    from .tensor import as_int  # noqa: PLC0415 - the tensor layer imports this module

    if isinstance(max_bytes, (bool, np.bool_)):
        raise TypeError(f"max_bytes must be an int (bytes) or None; got {max_bytes!r}")
    try:
        max_bytes = as_int(max_bytes, "max_bytes", 0)
        if max_bytes > 1 << 62:
            raise ValueError
    except ValueError:  # (one message for either end of the range)
        raise ValueError(f"max_bytes must be an int in [0, 2**62]; got {max_bytes!r}") from None
    with _pool_lock:
        state = dict(core.output_pool(max_bytes))
        _pool_on = max_bytes > 0
    return state
