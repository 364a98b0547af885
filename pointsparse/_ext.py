"""The one module that imports the C++ core and owns the torch <-> numpy
conversion. CPU tensors reach the core as zero-copy numpy views; results come
back as tensors sharing the core's buffers."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

try:
    from . import _core
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pointsparse's C++ core (pointsparse._core) is not built: run `make build` in the "
        "repository, or `pip install .`"
    ) from exc

core = _core

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


def num_threads() -> int:
    """Threads each core call uses: ``POINTSPARSE_NUM_THREADS`` if set (an
    empty value counts as unset), else ``torch.get_num_threads()``, so the
    core and torch never oversubscribe; never more than :func:`max_threads`
    (a larger request is clamped: more threads than processors only wait on
    each other); 1 in a process created by ``fork`` (where a second OpenMP
    thread would hang), e.g. a DataLoader worker."""
    if _forked:
        return 1
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


_force_torch = False


def use_core(*tensors: torch.Tensor) -> bool:
    """Whether the C++ core serves an op on these tensors: all on the CPU, and
    not inside :func:`torch_path`."""
    return not _force_torch and all(t.device.type == "cpu" for t in tensors)


@contextlib.contextmanager
def torch_path():
    """Private, for tests: inside this block every op takes its pure-torch
    path (the one non-CPU tensors take) even on the CPU, so the tests can hold
    it against the core. Not thread-safe; not for production code."""
    global _force_torch
    previous, _force_torch = _force_torch, True
    try:
        yield
    finally:
        _force_torch = previous


def to_numpy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """A C-contiguous numpy view of a CPU tensor (a copy only when the dtype or
    layout must change)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"the C++ core takes CPU tensors; got one on {tensor.device}")
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous().numpy()


def to_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def call(fn, *args):
    """Call a core function; the core raises ValueError for bad arguments."""
    return fn(*args, num_threads())
