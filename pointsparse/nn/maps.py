"""Kernel maps and plans built ahead, side by side.

A network asks its input's :class:`~pointsparse.tensor.CoordinateCache` for
each map (and the engine's plan of it) when a layer first needs it, so the
maps of one input are built one after another, each on all threads. Most of
that work is sorts and passes over 10^4-10^5 rows, which gain little from a
second thread (the coordinate sorts stay on one thread below 2^18 keys: on a
busy machine every barrier of a 2-thread sort can wait a time slice), while
the maps of one network are largely independent of each other: the
submanifold map at each stride needs only that stride's coords, and only
the downsampling chain is sequential.

:func:`map_schedule` records which maps and plans a network builds (they
depend on its structure, not on the coordinates); :func:`build_maps` builds
them into a new input's cache as tasks of one thread each, ``workers`` at a
time (by default the core's thread count from :data:`PARALLEL_MIN_ROWS` input rows on, else one
after another), each as soon as the coords it reads are there; the network
then finds every map in the cache. :class:`MapsAhead` does both around a model. The
maps and plans are those the network would build itself (the same
functions), so its outputs are unchanged bit for bit.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
import os
import threading

import torch

from .. import _ext
from .. import kmap as _kmap
from ..tensor import CoordinateCache, SparseTensor, as_int
from . import _engine


@dataclass(frozen=True)
class MapSchedule:
    """The maps a network builds for an input, in the order it asks for
    them (``maps``: :class:`pointsparse.kmap.KernelMapKey`), and those of
    them whose engine plan it builds too (``plans``)."""

    maps: tuple
    plans: frozenset

    def __post_init__(self) -> None:
        if not isinstance(self.maps, tuple) or not all(isinstance(k, _kmap.KernelMapKey) for k in self.maps):
            raise TypeError("MapSchedule.maps must be a tuple of pointsparse.kmap.KernelMapKey")
        if not isinstance(self.plans, frozenset) or not self.plans <= set(self.maps):
            raise TypeError("MapSchedule.plans must be a frozenset of keys in MapSchedule.maps")


class _Recorder(CoordinateCache):
    """A coordinate cache that notes every map and plan asked of it;
    made from ``source`` (a copy of what it holds: the coords of every
    stride, the maps and plans built so far, the selections' records)."""

    def __init__(self, source: CoordinateCache | None = None) -> None:
        super().__init__()
        self.asked: list = []
        self.planned: set = set()
        if source is not None:
            # (shallow copies: the same tensors and maps, so the versions taken of the coords still hold; a
            # map the source has is found, not built, and a selection's pending restrictions are made here
            # only, the source's left to its own network)
            for name in ("coords", "kmaps", "plans", "kept", "derived", "versions", "views"):
                setattr(self, name, dict(getattr(source, name)))
            self.origin = source.origin

    def get_kmap(self, key, build):
        if key not in self.asked:
            self.asked.append(key)
        return super().get_kmap(key, build)

    def get_plan(self, kmap, build):
        self.planned.add(kmap.key)
        return super().get_plan(kmap, build)


def map_schedule(model: torch.nn.Module, example: SparseTensor, *args, **kwargs) -> MapSchedule:
    """The maps and plans ``model`` builds for an input like ``example``:
    runs ``model(example, *args, **kwargs)`` once, without gradients and in eval mode (each
    module's training flag is restored after), on a copy of the example's
    cache (the coords of every stride it holds, say those a strided conv
    came down from, which a transposed conv goes back to; the maps built so
    far, found there, not built again; the example's cache is left as it
    is), noting what it asks for. Only that cache is followed: the maps a layer
    builds on coords of its own (``VoxelPrune`` makes a cache for the voxels
    it keeps) are left to the network. ``example`` may also be the tuple
    of the forward's arguments, a SparseTensor first (SPVCNN's ``(voxels,
    inverse, points, point_batch)``), as ``export_model``,
    ``DependencyGraph`` and ``sparsity_report`` take it."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if isinstance(example, (tuple, list)) and example and isinstance(example[0], SparseTensor) and not args:
        example, args = example[0], tuple(example[1:])  # (it was a TypeError: "got tuple")
    if not isinstance(example, SparseTensor):
        raise TypeError(f"example must be a SparseTensor; got {type(example).__name__}")
    recorder = _Recorder(example.cache)
    x = SparseTensor(example.feats, example.coords, example.stride, cache=recorder, validate=False)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(x, *args, **kwargs)
    finally:
        for m, mode in modes:
            m.training = mode
    return MapSchedule(tuple(recorder.asked), frozenset(recorder.planned))


def _coarse_stride(key) -> tuple:
    return tuple(a * b for a, b in zip(key.tensor_stride, key.stride))


def _down_key(key):
    """The downsampling map a transposed map transposes."""
    return _kmap.KernelMapKey(key.tensor_stride, key.kernel_size, key.stride, key.dilation, False)


def _build_one(cache: CoordinateCache, key, plan: bool) -> None:
    """Builds ``key``'s map (and its plan) into ``cache`` as the network
    would: through ``kmap._get_kmap`` on a tensor of the coords it reads."""
    stride = _coarse_stride(key) if key.transposed else key.tensor_stride
    coords = cache.coords[stride]
    tensor = SparseTensor(coords.new_empty((coords.shape[0], 0), dtype=torch.float32), coords, stride, cache=cache,
                          validate=False)
    kmap = _kmap._get_kmap(tensor, key.kernel_size, key.stride, key.dilation, key.transposed)
    if plan:
        _engine.get_plan(kmap, cache)


def _check_workers(workers) -> int | None:
    """``workers`` as a Python int (numpy integers too; not bools or
    floats), or None."""
    if workers is None:
        return None
    try:
        workers = as_int(workers, "workers")
    except TypeError:
        raise TypeError(f"workers must be an int >= 1 or None; got {workers!r}") from None
    if workers < 1:
        raise ValueError(f"workers must be >= 1; got {workers}")
    return workers


#: The input rows from which :func:`build_maps` (``workers=None``) builds its
#: maps side by side; below, in order in the calling thread. Measured
#: (``python bench/maps_ahead.py``, the north star's bf16 model, end to end,
#: 2 threads, Intel Xeon, bench/RESULTS.md stop 39): two workers 0.93-0.94x
#: the time of the maps built as the network runs on the KITTI sweep (91k
#: voxels), 0.95x on a generated street of 60k, but 1.16x on one of 20k
#: (small maps are mostly Python, whose threads take turns at the
#: interpreter); in order, 0.96-0.98x on all three.
PARALLEL_MIN_ROWS = 50_000


def build_maps(tensor: SparseTensor, schedule: MapSchedule, workers: int | None = None) -> None:
    """Builds every map (and plan) of ``schedule`` that ``tensor``'s cache
    lacks into it, ``workers`` tasks at a time (default: the core's thread
    count, :func:`pointsparse._ext.num_threads`, from
    :data:`PARALLEL_MIN_ROWS` input rows on, else 1), each task a map on one
    thread, started as soon as the coords it reads are in the cache (a
    strided map's output coords come from the map before it; a transposed
    map follows its downsampling map). The maps are those the network would
    build; the network then finds them all. With one worker, or off the
    CPU, they are built in order in the calling thread, as the network
    would (a map whose input coords or downsampling map are not built yet
    after them). ValueError where a map's input coords never come (a schedule
    recorded on another network or on an input of another stride)."""
    if not isinstance(tensor, SparseTensor):
        raise TypeError(f"tensor must be a SparseTensor; got {type(tensor).__name__}")
    if not isinstance(schedule, MapSchedule):
        raise TypeError(f"schedule must be a MapSchedule (nn.map_schedule); got {type(schedule).__name__}")
    workers = _check_workers(workers)
    if workers is None:
        workers = _ext.num_threads() if len(tensor) >= PARALLEL_MIN_ROWS else 1
    cache = tensor.cache
    # (a schedule recorded on the CPU holds the engine's plans; off the CPU the network builds none, nor do we)
    plans = schedule.plans if tensor.coords.device.type == "cpu" else frozenset()
    todo = [k for k in schedule.maps if k not in cache.kmaps or (k in plans and k not in cache.plans)]
    pending = set(todo)  # not yet built: waiting or running
    running: dict = {}

    def ready(key) -> bool:
        if key.transposed:  # after its downsampling map (and that map's plan, which it transposes)
            return _down_key(key) not in pending and _coarse_stride(key) in cache.coords and \
                key.tensor_stride in cache.coords
        if key.tensor_stride not in cache.coords:
            return False
        # Two strided maps onto one stride: the later takes the earlier's
        # output coords (as in the network's order), so never both at once.
        return key.stride == (1, 1, 1) or all(k.stride == (1, 1, 1) or k.transposed or k.out_stride != key.out_stride
                                              for k in running.values())

    if workers == 1 or tensor.coords.device.type != "cpu":
        while todo:
            # In order, but a map whose coords or downsampling map are not
            # there yet waits for them (a transposed conv whose downsampling
            # map the network built inside its own: recorded before it).
            key = next((k for k in todo if ready(k)), None)
            if key is None:
                raise ValueError(_stuck(todo))
            todo.remove(key)
            _build_one(cache, key, key in plans)
            pending.discard(key)
        return

    def task(key) -> None:
        with _ext.threads_here(1):
            _build_one(cache, key, key in plans)

    pool = _pool(workers)
    try:
        while todo or running:
            # The downsampling chain first: every later map waits on its coords.
            for key in sorted(todo, key=lambda k: k.stride == (1, 1, 1) or k.transposed):
                if len(running) < workers and ready(key):
                    todo.remove(key)
                    running[pool.submit(task, key)] = key
            if not running:
                raise ValueError(_stuck(todo))
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for future in finished:
                pending.discard(running.pop(future))
                future.result()  # a task's error, raised here
    finally:
        wait(list(running))  # after an error: the tasks still running finish before it is raised


# The worker threads, kept for the process: one pool, of the largest worker
# count asked so far (build_maps never runs more than its own count of tasks
# at once, so a smaller count runs on it too). A pool per count, kept, held
# every count's idle threads (and their scratch memory) in a long run that
# asked for many (workers=None follows torch.set_num_threads).
_POOL: list = []  # [] or [(the pool, its worker count)]
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if _POOL and _POOL[0][1] >= workers:
            return _POOL[0][0]
        # A smaller pool is let go, not shut down: a build_maps of another thread that took it submits on
        # to it; its threads end once the last such call is done with it (a collected pool's workers exit).
        _POOL.clear()
        _POOL.append((ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pointsparse-maps"), workers))
        return _POOL[0][0]


def _forget_pool() -> None:
    """In a forked child: the parent's pool has no threads here."""
    global _POOL_LOCK
    _POOL.clear()
    _POOL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _stuck(keys) -> str:
    strides = sorted({_coarse_stride(k) if k.transposed else k.tensor_stride for k in keys})
    return (f"build_maps: {len(keys)} map(s) of the schedule read coords at strides {strides} that this tensor's "
            "cache never holds (a schedule recorded on another network, or on an input of another stride?)")


class MapsAhead(torch.nn.Module):
    """``model`` whose input's maps and plans are built ahead, side by side
    (:func:`build_maps`), before it runs: the same outputs. The schedule is
    recorded on the first call (:func:`map_schedule`: one extra run of the
    model then) and kept (``schedule``: the last one used), one per input
    stride (an input of another stride records its own). The first argument of a call must
    be the network's SparseTensor; the rest go to ``model`` as they are.
    Under ``torch.compile`` / ``torch.export`` the model runs as it is.
    ``workers``: as :func:`build_maps`'s. It starts in its model's mode
    (``training``), as the wrapped module is."""

    def __init__(self, model: torch.nn.Module, workers: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        workers = _check_workers(workers)
        self.model = model
        # its model's mode (a module starts in training mode: a wrapped eval model was refused by export's
        # "call model.eval() first"); only the flag: the model's own modules keep theirs
        self.training = model.training
        self.workers = workers
        self.schedule: MapSchedule | None = None
        self._schedules: dict[tuple, MapSchedule] = {}  # by input stride

    def forward(self, x: SparseTensor, *args, **kwargs):
        if torch.compiler.is_compiling():
            return self.model(x, *args, **kwargs)
        if not isinstance(x, SparseTensor):
            raise TypeError(f"MapsAhead's first argument must be a SparseTensor; got {type(x).__name__}")
        schedules = self.__dict__.setdefault("_schedules", {})  # (a module pickled before it had them)
        if x.stride not in schedules:
            schedules[x.stride] = map_schedule(self.model, x, *args, **kwargs)
        self.schedule = schedules[x.stride]
        build_maps(x, self.schedule, self.workers)
        return self.model(x, *args, **kwargs)
