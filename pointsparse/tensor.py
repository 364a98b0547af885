"""SparseTensor: features on exact integer coordinates, and the coordinate
cache that every tensor derived from the same input shares."""

from __future__ import annotations

import copy
import json
import operator
import warnings
import weakref
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.utils._pytree

from . import _ext
from . import coords as _coords

Triple = tuple[int, int, int]

#: Largest grid :meth:`SparseTensor.dense` allocates (bytes); larger is a ValueError.
MAX_DENSE_BYTES = 1 << 36
#: Largest tensor stride per axis (coords are int32).
STRIDE_MAX = 2**31 - 1


def _index(v) -> int:
    """int, numpy integers, 0-d integer tensors; not bool (TypeError otherwise)."""
    if isinstance(v, bool) or (isinstance(v, torch.Tensor)
                               and (v.dim() != 0 or v.is_floating_point() or v.dtype == torch.bool)):
        raise TypeError
    return operator.index(v)


def as_int(value, name: str, minimum: int | None = None) -> int:
    """A Python int from an int, a numpy integer or a 0-d integer tensor;
    TypeError/ValueError naming ``name``."""
    try:
        out = _index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int; got {value!r}") from None
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return out


def positive_int(value, name: str, what: str | None = None) -> int:
    """A positive int (numpy and 0-d tensor integers accepted); else an
    error naming ``name`` and the value (``what``: what the int counts, said
    in parentheses), worded alike for both kinds: a TypeError for another
    type (bool, float, str), a ValueError for an int below 1."""
    try:
        return as_int(value, name, 1)
    except (TypeError, ValueError) as error:
        counts = f" ({what})" if what else ""
        raise type(error)(f"{name} must be a positive int{counts}; got {value!r}") from None


def nonnegative_int(value, name: str) -> int:
    """An int >= 0 (numpy and 0-d tensor integers accepted); else an error
    naming ``name`` and the value, worded alike for both kinds: a TypeError
    for another type (bool, float, str), a ValueError for a negative."""
    try:
        return as_int(value, name, 0)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{name} must be an int >= 0; got {value!r}") from None


def as_float(value, name: str) -> float:
    """A Python float from an int, a float, a numpy number or a 0-d real
    tensor (not bool, numpy's bool included, not a string); TypeError naming ``name``
    (a ValueError for an int past the float range, whose float() raised a
    bare OverflowError)."""
    if isinstance(value, (bool, np.bool_, str, bytes)) or (
            isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool or value.is_complex())):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number; got {value!r}") from None
    except OverflowError:  # (its digits unprinted: a repr of thousands)
        raise ValueError(f"{name} must be a number within the float range; got a {type(value).__name__} "
                         "too large to convert to float") from None


def as_bool(value, name: str) -> bool:
    """A Python bool from a bool or a numpy bool; anything else (an int, the
    string ``"no"``, None) is a TypeError naming ``name``: a flag checked
    only for truthiness takes ``"no"`` or ``"False"`` for True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False (a bool); got {value!r}")
    return bool(value)


def as_triple(value, name: str, minimum: int = 1) -> Triple:
    """An int or 3-sequence of ints as a 3-tuple; ValueError/TypeError naming ``name``."""
    if type(value) is tuple and len(value) == 3 and type(value[0]) is int and type(value[1]) is int \
            and type(value[2]) is int and min(value) >= minimum:
        return value  # the common case (a module's own triple), on every conv call
    as_int = _index
    try:
        out = (as_int(value),) * 3
    except TypeError:
        try:
            out = tuple(as_int(v) for v in value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a 3-tuple of ints; got {value!r}") from None
        if len(out) != 3:
            raise TypeError(f"{name} must be an int or a 3-tuple of ints; got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{name} must be >= {minimum} on every axis; got {value!r}")
    return out  # type: ignore[return-value]


class Restriction:
    """A map a selection's cache makes when a conv first asks for it (an
    entry of ``CoordinateCache.derived``): ``restrict(source, rows, coords)``,
    the downsampling map ``source`` of another cache restricted to its
    output rows ``rows``, whose coords are ``coords``. Kept as its parts, not
    as a closure, so that a selection of these sites restricts ``source``
    through both selections' rows (:meth:`CoordinateCache.maps_onto`)
    instead of searching the map again."""

    __slots__ = ("source", "rows", "coords", "restrict")

    def __init__(self, source, rows: torch.Tensor, coords: torch.Tensor, restrict: Callable) -> None:
        self.source, self.rows, self.coords, self.restrict = source, rows, coords, restrict

    def __call__(self):
        return self.restrict(self.source, self.rows, self.coords)


def _version_of(t: torch.Tensor) -> int | None:
    """``t``'s in-place version counter, or None where it keeps none to read
    (an inference tensor, a tensor subclass, a graph's tensor while torch
    compiles or exports)."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor or t.is_inference():
        return None
    return t._version


class CoordinateCache:
    """What a network learns about one input's coordinates, shared by every
    SparseTensor derived from it: the coords at each tensor stride, every
    kernel map built so far (keyed by :class:`pointsparse.kmap.KernelMapKey`)
    and the convolution engine's plan of each map.

    Layers hand it down through :meth:`SparseTensor.with_feats`, so a map is
    built once per forward and reused by every layer with the same key, by the
    backward pass, and (transposed) by the upsampling that mirrors a
    downsampling.

    It holds coords, never keys: every op packs the coords it compares with
    one key layout fitted to all of them (:mod:`pointsparse.coords`), so the
    coords of every stride meet whatever their extents.

    ``kept``: where the coords of a stride are a selection of other voxels
    (a :class:`~pointsparse.nn.VoxelPrune`'s, ``functional.select_voxels``),
    ``stride -> (rows, n)``: they are the sorted rows ``rows`` of ``n``
    source voxels (the voxels before the first selection at that stride), so
    that ``devoxelize`` maps voxelize's inverse through them.

    ``origin``: in a selection's cache, the coords the first selection was
    made from (the input's side before any selection); their batch column
    numbers the batch items, which a selection that drops every voxel of
    one no longer does (:meth:`input_coords`: the global poolings' rows).

    ``versions`` (and ``views``, a copy of coords taken as a view of a larger
    tensor): each stride's coords as taken, so that a map lookup refuses
    coords changed in place since (:meth:`check_unchanged`); copies of the
    cache keep the refusal."""

    def __init__(self) -> None:
        self.coords: dict[Triple, torch.Tensor] = {}
        self.origin: torch.Tensor | None = None
        self.kmaps: dict[object, object] = {}
        # map key -> (map, plan): the engine's plan beside its map.
        self.plans: dict[object, tuple] = {}
        self.kept: dict[Triple, tuple] = {}
        # map key -> a callable making that map from another cache's without
        # a search (a selection's: functional.select_voxels), used once.
        self.derived: dict[object, Callable[[], object]] = {}
        # stride -> the version counter of the coords held there when they
        # were taken (see check_unchanged); strides without one are not checked.
        self.versions: dict[Triple, int] = {}
        # stride -> a copy of coords taken as a view (data[:, :4]): their
        # counter is their base's, which a change elsewhere in it bumps too.
        self.views: dict[Triple, torch.Tensor] = {}
        # stride -> {id: (weak reference, version, values of a view or None)}: other coords tensors, equal to
        # those held at stride, that a SparseTensor was made on with this cache (cache=): changed in place
        # since, a map lookup on them is refused (coords_for).
        self.aliases: dict[Triple, dict[int, tuple]] = {}

    def get_coords(self, stride: Triple) -> torch.Tensor | None:
        return self.coords.get(stride)

    def set_coords(self, stride: Triple, coords: torch.Tensor) -> None:
        if stride in self.coords:
            return
        self.coords[stride] = coords
        self._take(stride, coords)

    def _take(self, stride: Triple, coords: torch.Tensor, changed: bool = False) -> None:
        """Record the version counter of ``coords`` held at ``stride`` (as
        changed, -1, which no counter has, where ``changed``) and, for a
        view, their values to compare where the counter moves."""
        version = _version_of(coords)
        if version is None:
            return
        self.versions[stride] = -1 if changed else version
        if coords._base is not None and not changed:
            self.views[stride] = coords.clone()

    def _is_changed(self, stride: Triple) -> bool:
        version = self.versions.get(stride)
        # (a version is held only for a plain tensor outside inference mode, which it stays: only compiling is
        # asked again; this runs on every map lookup)
        if version is None or torch.compiler.is_compiling():
            return False
        coords = self.coords[stride]
        now = coords._version
        if now == version:
            return False
        held = self.views.get(stride)
        if held is not None and version != -1 and torch.equal(held, coords):
            self.versions[stride] = now  # (another part of their base changed: the coords are as taken)
            return False
        return True

    def check_unchanged(self, stride: Triple, changed: bool = False) -> None:
        """ValueError where the coords held at ``stride`` were changed in
        place since this cache took them (their maps, built on the old values,
        would be reused silently). Coords without a version counter
        (inference tensors, a graph's tensors while torch compiles) are not
        checked."""
        if changed or self._is_changed(stride):
            raise ValueError(f"the coords at stride {stride} were changed in place after a SparseTensor took them: "
                             "its coordinate cache holds kernel maps built on the old values; make a new "
                             "SparseTensor from the changed coords (or change a clone, coords.clone())")

    def note_alias(self, stride: Triple, coords: torch.Tensor) -> None:
        """Record ``coords``, other tensor than the coords held at ``stride``
        but equal to them (a SparseTensor made on them with this cache), at
        their version now (:meth:`coords_for` refuses them once changed)."""
        version = _version_of(coords)
        if version is None:
            return
        at = self.aliases.setdefault(stride, {})
        key = id(coords)
        values = coords.clone() if coords._base is not None else None  # (a view: its base's counter)
        at[key] = (weakref.ref(coords, lambda _, at=at, key=key: at.pop(key, None)), version, values)

    def coords_for(self, stride: Triple, coords: torch.Tensor) -> torch.Tensor:
        """The coords to build a map of a tensor on ``coords`` at ``stride``
        on, checked unchanged in place (ValueError, :meth:`check_unchanged`):
        the coords this cache holds there where ``coords`` are them or an
        alias of them (:meth:`note_alias`: equal when the tensor was made, so
        the maps never hold the alias), else ``coords`` (a tensor made
        unchecked, ``validate=False``)."""
        self.check_unchanged(stride)
        held = self.coords.get(stride)
        if coords is held or not self.aliases:
            return coords
        entry = self.aliases.get(stride, {}).get(id(coords))
        if entry is None or entry[0]() is not coords:
            return coords
        ref, version, values = entry
        now = _version_of(coords)
        if now is not None and now != version:
            if version == -1 or values is None or not torch.equal(values, coords):
                self.aliases[stride][id(coords)] = (ref, -1, values)  # (refused from now on)
                self.check_unchanged(stride, changed=True)
            self.aliases[stride][id(coords)] = (ref, now, values)  # (another part of their base changed)
        return held

    def _changed(self) -> set:
        """The strides whose coords were changed in place since taken."""
        return {s for s in list(self.versions) if self._is_changed(s)}

    def _take_versions(self, changed: set) -> None:
        """Record the version counter of each stride's coords (a copy's), as
        changed (a version no counter has, -1) where ``changed`` holds it:
        the copy carries the maps built on the old values, so it refuses
        them as the original does."""
        self.versions, self.views = {}, {}
        for s, coords in self.coords.items():
            self._take(s, coords, s in changed)

    def input_coords(self) -> torch.Tensor | None:
        """Coords whose batch indices are the batch items of the input this
        cache comes from: ``origin`` in a selection's cache, else the coords
        of the finest stride held (every stride of one cache holds the same
        items: downsampling keeps each voxel's item). None for an empty cache."""
        if self.origin is not None:
            return self.origin
        finest = None
        # (a loop, not min(key=...): graphs trace it; over a snapshot: another thread's conv on a tensor of this
        # cache may add a stride meanwhile, and a dict that grows while walked ends the walk in a RuntimeError)
        for s, coords in list(self.coords.items()):
            if finest is None or s[0] * s[1] * s[2] < finest[0]:
                finest = (s[0] * s[1] * s[2], coords)
        return None if finest is None else finest[1]

    def get_kmap(self, key, build: Callable[[], object]):
        """The cached map for ``key``, made once: by the callable ``derived``
        holds for it (a selection's map restricted from its source's), else
        by ``build()``."""
        kmap = self.kmaps.get(key)
        if kmap is None:
            with _ext.plain_ops():  # (kept past a transform: plain tensors)
                kmap = self.derived.pop(key, build)()
            self.kmaps[key] = kmap
        return kmap

    def maps_onto(self, stride: Triple, coords: torch.Tensor):
        """``(key, map, rows)`` of each downsampling map whose outputs are
        ``coords`` at ``stride`` (not transposed, a stride other than 1: a
        selection of those sites restricts them, ``functional.select_voxels``):
        the maps this cache holds (``rows`` None), and those it has still to
        restrict from another cache's (a :class:`Restriction` in ``derived``,
        these coords a selection themselves): that cache's map and the rows
        of its outputs these coords are. (Only held maps were given: a
        selection of a selection searched every map its source had not yet
        been asked for.) The maps are walked in snapshots taken at the
        first step (a generator: a conv on this cache between two steps,
        another thread's, added a map to the dict being walked)."""
        maps, pending_maps = list(self.kmaps.items()), list(self.derived.items())
        for key, kmap in maps:
            k = kmap.key
            if not k.transposed and k.stride != (1, 1, 1) and k.out_stride == stride and kmap.out_coords is coords:
                yield key, kmap, None
        for key, pending in pending_maps:
            if isinstance(pending, Restriction) and pending.coords is coords and key not in self.kmaps:
                yield key, pending.source, pending.rows

    def get_plan(self, kmap, build: Callable[[], object]):
        """The engine plan for the cached map ``kmap``, building it with
        ``build()`` once (kept while this cache holds the map)."""
        entry = self.plans.get(kmap.key)
        if entry is None or entry[0] is not kmap:
            with _ext.plain_ops():
                entry = self.plans[kmap.key] = (kmap, build())
        return entry[1]

    def note_kept(self, stride: Triple, rows: torch.Tensor, n, source: "CoordinateCache") -> None:
        """Records that this cache's coords at ``stride`` are the sorted
        ``rows`` of the ``n`` coords ``source`` holds there: in ``kept``,
        of ``source``'s source where those are a selection too."""
        before = source.kept.get(stride)
        self.kept[stride] = (rows, n) if before is None else (before[0].index_select(0, rows), before[1])

    def copy_finer(self, stride: Triple, into: "CoordinateCache") -> None:
        """Into ``into``: the coords of every stride finer than ``stride``
        (no coarser along any axis, and not ``stride`` itself) and the maps
        whose both sides are such strides (a selection of sites at ``stride``
        keeps what leads up to it; ``functional.select_voxels``). Walks
        snapshots of this cache's dicts, which another thread's conv on a
        tensor of this cache may add to meanwhile."""
        def finer(s) -> bool:
            return s != stride and all(a <= b for a, b in zip(s, stride))

        for s, coords in list(self.coords.items()):
            if finer(s) and s not in into.coords:
                into.coords[s] = coords  # (the same tensor: the version its maps were built at is carried)
                if s in self.versions:
                    into.versions[s] = self.versions[s]
                if s in self.views:
                    into.views[s] = self.views[s]
        for s, record in list(self.kept.items()):
            if finer(s):
                into.kept.setdefault(s, record)
        for key, kmap in list(self.kmaps.items()):
            coarse = tuple(a * b for a, b in zip(kmap.key.tensor_stride, kmap.key.stride))
            if finer(kmap.key.tensor_stride) and finer(coarse):
                into.get_kmap(key, lambda kmap=kmap: kmap)

    def __getstate__(self) -> dict:
        """Pickled and deep-copied without the plans (C++ objects, rebuilt on use)
        and the pending restrictions. Its dicts are copied here (one step
        each, the interpreter held): the copy walks these, while another
        thread's conv on a tensor of this cache may add to the cache's own."""
        state = {name: dict(value) if type(value) is dict else value for name, value in self.__dict__.items()}
        state["plans"] = {}
        state["derived"] = {}  # (restrictions of another cache's maps, not carried: a search builds them)
        state["versions"] = self._changed()  # (the copies' counters start afresh, these marked changed)
        state["views"] = {}
        state["aliases"] = {}  # (weak references: a copy's tensors hold the copied coords)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("kept", {})  # (caches pickled before it existed have none)
        self.__dict__.setdefault("derived", {})
        self.__dict__.setdefault("origin", None)
        self.__dict__["aliases"] = {}
        changed = state.get("versions")  # (a cache pickled before it had none)
        self._take_versions(changed if isinstance(changed, set) else set())

    def to(self, device) -> "CoordinateCache":
        """A copy on ``device`` (the coords, maps and selection records
        moved; plans and pending restrictions left to be made there), made
        from snapshots of this cache's dicts, which another thread's conv on
        a tensor of this cache may add to meanwhile."""
        out = CoordinateCache()
        out.coords = {s: c.to(device) for s, c in list(self.coords.items())}
        out.kmaps = {k: m.to(device) for k, m in list(self.kmaps.items())}
        out.kept = {s: (rows.to(device), n) for s, (rows, n) in list(self.kept.items())}
        out.origin = None if self.origin is None else self.origin.to(device)
        out._take_versions(self._changed())
        return out

    def __repr__(self) -> str:
        return f"CoordinateCache(strides={sorted(self.coords)}, kmaps={len(self.kmaps)})"


#: The feats dtypes a SparseTensor holds: those its layers run (float8 types
#: would pass a floating-point check and fail inside the first layer).
FEATS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def available_memory() -> int | None:
    """Bytes of memory the system has available (Linux's ``MemAvailable``),
    or None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory_for(nbytes: int, device, what: str, hint: str) -> None:
    """A ValueError naming ``what`` where ``nbytes`` on ``device`` (None:
    torch's default device, ``with torch.device(...)``'s) are more than the
    system has available, checked on the CPU only (Linux's
    ``MemAvailable``; overcommit granted a larger buffer, then the process
    was killed as it wrote the first values). ``hint``: what to shrink."""
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type != "cpu":
        return
    free = available_memory()
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {_bytes_text(nbytes)}, more than the {_bytes_text(free)} of memory "
                         f"available ({hint})")


def _bytes_text(nbytes: int) -> str:
    """``nbytes`` for a message: GiB from 1 GiB up, MiB below, bytes below 1 MiB."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def check_float_dtype(t: torch.Tensor, name: str, shape: str = "(N, C)") -> None:
    """A TypeError naming ``name`` unless ``t``'s dtype is one of
    :data:`FEATS_DTYPES` (float8 would pass a floating-point check)."""
    if t.dtype not in FEATS_DTYPES:
        raise TypeError(f"{name} must be a float tensor {shape} of float16, bfloat16, float32 or float64; "
                        f"got dtype {t.dtype}")


def _check_feats(feats, n: int | None = None) -> None:
    if not isinstance(feats, torch.Tensor):
        raise TypeError(f"feats must be a torch.Tensor; got {type(feats).__name__}")
    if feats.dtype not in FEATS_DTYPES:
        raise TypeError(f"feats must be a floating-point tensor (N, C) of float16, bfloat16, float32 or float64; got "
                        f"dtype {feats.dtype}" + (" (the layers run no float8 type)" if feats.is_floating_point() else ""))
    _coords.check_has_data(feats, "feats")
    if feats.dim() != 2:
        raise ValueError(f"feats must be (N, C); got shape {tuple(feats.shape)}")
    if n is not None and feats.shape[0] != n:
        raise ValueError(f"feats has {feats.shape[0]} rows but coords has {n}; they must match")


def check_coords_type(coords) -> None:
    """Type, layout, dtype (NaN/inf named for float coords), device and (N, 4) shape."""
    if isinstance(coords, torch.Tensor):
        _coords.check_has_data(coords, "coords")
    if isinstance(coords, torch.Tensor) and coords.is_floating_point():
        if not bool(torch.isfinite(coords).all()):
            raise ValueError("coords contain NaN or inf; they must be finite int32 [batch, x, y, z]")
    _coords.check_coords(coords)


def validate_coords(coords, stride: Triple) -> torch.Tensor:
    """Every check of API.md on user coords (the batch count and the x, y, z
    spans must fit one key: :mod:`pointsparse.coords`); returns their keys
    in the layout fitted to them."""
    check_coords_type(coords)
    if coords.shape[0] and bool((coords[:, 0] < 0).any()):
        row = int((coords[:, 0] < 0).nonzero()[0, 0])
        raise ValueError(f"coords has a negative batch index at row {row}: {coords[row].tolist()}")
    keys = _coords.pack(coords)
    _coords.check_stride_multiple(coords, stride)
    # Keys strictly increasing (coords in key order, as voxelize() and every
    # layer return them) hold no duplicate: one comparison pass, where the
    # unique below sorts (bench/call_overhead.py --parts cache).
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):
        uniq = _coords.unique(keys)[0]
        if uniq.numel() != keys.numel():
            raise ValueError(
                f"coords hold {keys.numel() - uniq.numel()} duplicate rows; each [batch, x, y, z] "
                "must appear once (voxelize() merges points that share a voxel)"
            )
    return keys


def _same_row_set(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the unique coords ``a`` and ``b`` hold the same rows, in any order."""
    if a.shape[0] != b.shape[0]:
        return False
    layout = _coords.KeyLayout.of(a, b)
    return torch.equal(torch.sort(_coords.pack_torch(a, layout, trusted=True)).values,
                       torch.sort(_coords.pack_torch(b, layout, trusted=True)).values)


def _check_downsampled_from(cache: CoordinateCache, stride: Triple, coords: torch.Tensor) -> None:
    """ValueError where ``cache``'s coords at a finer stride (one that
    divides ``stride`` on every axis) downsample to other sites than
    ``coords``, given at ``stride``, which the cache lacks: the first
    coords of a stride in a cache are the output coords of every strided
    conv onto it (API.md: the unique ``floor(c / stride) * stride``)."""
    from .kmap import _unique_downsampled  # noqa: PLC0415 - kmap imports this module

    for fine_stride, fine in list(cache.coords.items()):
        if any(b % a for a, b in zip(fine_stride, stride)):
            continue
        if not _same_row_set(_unique_downsampled(fine.to(coords.device), stride)[1], coords):
            raise ValueError(f"coords are not the sites the cache's coords at stride {fine_stride} downsample to at "
                             f"stride {stride} (the unique floor(c / stride) * stride): the cache's strided convs "
                             "would put their output on these coords; make coarser tensors with a strided conv "
                             "(or leave cache unset)")


def _check_downsamples_to(cache: CoordinateCache, stride: Triple, coords: torch.Tensor) -> None:
    """ValueError where ``coords``, given at ``stride``, which ``cache``
    lacks, downsample to other sites than the cache's coords at a coarser
    stride (one that ``stride`` divides on every axis): those are the
    output coords of every strided conv onto it, which API.md says are the
    unique ``floor(c / stride) * stride`` of the input's coords."""
    from .kmap import _unique_downsampled  # noqa: PLC0415 - kmap imports this module

    for coarse_stride, coarse in list(cache.coords.items()):
        if coarse_stride == stride or any(b % a for a, b in zip(stride, coarse_stride)):
            continue
        if not _same_row_set(_unique_downsampled(coords, coarse_stride)[1], coarse.to(coords.device)):
            raise ValueError(f"coords do not downsample to the cache's coords at stride {coarse_stride} (the unique "
                             f"floor(c / stride) * stride of coords given at stride {stride}): the cache's strided "
                             "convs would put their output on its coords, not on these coords' sites; make finer "
                             "tensors first and coarser ones with a strided conv (or leave cache unset)")


_SHARE_MAPS = ("tensors made from one another (layers' outputs, with_feats) share one CoordinateCache, which holds "
               "their kernel maps; cache= shares a tensor's with a new one on the same coords")
_SPARSE_TENSOR_HINTS = {
    "features": "the feats are its first argument: SparseTensor(feats, coords, stride)",
    "coordinates": "the coords are its second argument: SparseTensor(feats, coords, stride), int32 [batch, x, y, z] "
                   "rows, the batch index first",
    "indices": "the coords are its second argument: SparseTensor(feats, coords, stride), int32 [batch, x, y, z] "
               "rows, the batch index first (spconv's indices)",
    "tensor_stride": "the tensor stride is stride= (an int or 3 ints)",
    "coordinate_manager": _SHARE_MAPS,
    "coordinate_map_key": _SHARE_MAPS,
    "quantization_mode": "voxelise the points first: x, inverse = pointsparse.voxelize(points, feats, voxel_size) "
                         "(its reduce= says how a voxel's points combine)",
    "device": "make feats and coords on that device, or move the tensor with .to(device)",
    "requires_grad": "set it on the feats (feats.requires_grad_()) before making the tensor",
    "spatial_range": "the coords may take any int32 values, with no range to give",
    "spatial_shape": "the coords may take any int32 values, with no grid shape to give",
    "batch_size": "the batch is the coords' first column (the items 0 .. B-1)",
}


class SparseTensor:
    """Features ``(N, C)`` on int32 coordinates ``(N, 4)`` = ``[batch, x, y, z]``.

    ``stride`` is the tensor stride (coordinates are multiples of it). Build
    tensors from user data with ``SparseTensor(feats, coords, stride)``; layers
    derive new ones with :meth:`with_feats` (same coordinates) so that the
    :class:`CoordinateCache` travels with them.

    The constructor's checks branch on the coordinates' values: a forward
    that builds a tensor inside ``torch.compile(fullgraph=True)`` or
    ``torch.export`` passes ``validate=False`` there (torch cannot trace
    them: "Could not guard on data-dependent expression"), as
    :mod:`pointsparse.export` does; the first kernel map on the coords (a
    conv's) still refuses duplicate, negative-batch and out-of-range rows."""

    __slots__ = ("_feats", "_coords", "_stride", "cache")

    @_ext.foreign_keywords(_SPARSE_TENSOR_HINTS)  # (MinkowskiEngine's, TorchSparse's and spconv's keywords)
    def __init__(self, feats: torch.Tensor, coords: torch.Tensor, stride=1, *, cache: CoordinateCache | None = None,
                 validate: bool = True) -> None:
        if torch.jit.is_tracing():  # (its trace of the core's calls was an empty tensor's allocation: garbage out)
            raise TypeError("pointsparse does not run under torch.jit.trace (TorchScript): its operators leave no "
                            "trace there; deploy with torch.export (pointsparse.export) or torch.compile")
        stride = as_triple(stride, "stride")
        if validate:
            if max(stride) > STRIDE_MAX:
                raise ValueError(f"stride must be in [1, {STRIDE_MAX}] per axis; got {stride}")
            if cache is not None and not isinstance(cache, CoordinateCache):
                raise TypeError(f"cache must be a CoordinateCache or None; got {type(cache).__name__}")
            check_coords_type(coords)
            _check_feats(feats, coords.shape[0])
            if feats.device != coords.device:
                raise ValueError(f"feats are on {feats.device} but coords on {coords.device}")
            validate_coords(coords, stride)
        if validate and cache is not None:
            # A cache belongs to one set of coordinates: its maps and plans
            # were built on the coords it holds, which other coords of the
            # same length would silently reuse.
            held = cache.get_coords(stride)
            if held is not None and held is not coords and (
                    held.shape != coords.shape or held.device != coords.device or not torch.equal(held, coords)):
                raise ValueError(f"cache holds other coords at stride {stride} than the coords given: a coordinate "
                                 "cache belongs to one set of coordinates (derive tensors on the same coords with "
                                 "SparseTensor.with_feats, or leave cache unset)")
            if held is not None and held is not coords:
                cache.note_alias(stride, coords)  # (equal now: refused by a map lookup once changed in place)
            if held is None:
                _check_downsampled_from(cache, stride, coords)
                _check_downsamples_to(cache, stride, coords)
        elif not (isinstance(feats, torch.Tensor) and isinstance(coords, torch.Tensor)):
            pass  # (a pytree map's leaves of another kind: torch.utils._pytree.tree_map(lambda t: t.shape, x))
        elif torch.compiler.is_compiling():
            # (validate=False, as the README's in-graph construction: the one check a graph's kernels cannot make,
            # which took the first rows of longer feats silently; a check of symbols, no pass over the values)
            torch._check(feats.shape[0] == coords.shape[0],
                         lambda: "SparseTensor: feats and coords must have one row per site")
        elif feats.shape[0] != coords.shape[0]:
            raise ValueError(f"SparseTensor: feats and coords must have one row per site; got {feats.shape[0]} and "
                             f"{coords.shape[0]} rows")
        self._hold(feats, coords, stride, cache)

    def _hold(self, feats: torch.Tensor, coords: torch.Tensor, stride: Triple,
              cache: "CoordinateCache | None") -> None:
        """The slots of a tensor (the constructor's last step, and all of
        :meth:`with_feats`'s): ``cache`` (a new one for None) records
        ``coords`` at ``stride``."""
        self._feats, self._coords, self._stride = feats, coords, stride
        self.cache = cache if cache is not None else CoordinateCache()
        self.cache.set_coords(stride, coords)

    # --- accessors (TorchSparse / MinkowskiEngine names) ---
    @property
    def feats(self) -> torch.Tensor:
        return self._feats

    @feats.setter
    def feats(self, value) -> None:
        raise AttributeError("SparseTensor.feats (.F) is read-only: x.with_feats(feats) makes a tensor with new "
                             "feats on the same coords and coordinate cache")

    @property
    def coords(self) -> torch.Tensor:
        return self._coords

    @coords.setter
    def coords(self, value) -> None:
        raise AttributeError("SparseTensor.coords (.C) is read-only: its coordinate cache holds maps built on "
                             "them; make a new SparseTensor(feats, coords, stride) for other coords")

    F = feats
    C = coords

    @property
    def stride(self) -> Triple:
        return self._stride

    @stride.setter
    def stride(self, value) -> None:
        raise AttributeError("SparseTensor.stride is read-only: make a new SparseTensor(feats, coords, stride) "
                             "for another stride")

    @property
    def device(self) -> torch.device:
        return self._feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self._feats.dtype

    @property
    def shape(self) -> torch.Size:
        return self._feats.shape

    @property
    def num_channels(self) -> int:
        return self._feats.shape[1]

    def __len__(self) -> int:
        return self._coords.shape[0]

    @property
    def batch_size(self) -> int:
        """The largest batch index + 1 (0 without rows); of a VoxelPrune's
        selection (or a tensor after one) the batch items of the input it
        was made from (``CoordinateCache.origin``), as the global poolings
        count them: a selection that dropped every voxel of the last item
        holds no row of it, and ``dense()`` gave one slab fewer."""
        origin = getattr(self.cache, "origin", None)
        items = self._coords if origin is None else origin  # (the origin holds every item this tensor's rows do)
        return int(items[:, 0].max()) + 1 if len(items) else 0

    def __add__(self, other):
        """``x + y`` of two tensors on the same sites: :func:`pointsparse.nn.add`
        (as TorchSparse's and MinkowskiEngine's residual blocks write it)."""
        if not isinstance(other, SparseTensor):
            return NotImplemented
        from .nn.functional import add  # noqa: PLC0415 - the layers import this module

        return add(self, other)

    def with_feats(self, feats: torch.Tensor) -> "SparseTensor":
        """A tensor on the same coords and stride with new feats, sharing this
        one's coordinate cache."""
        _check_feats(feats, self._coords.shape[0])  # not len(): a symbolic row count stays symbolic
        if feats.device != self._feats.device:
            raise ValueError(f"feats are on {feats.device} but the tensor is on {self._feats.device}")
        if torch.jit.is_tracing():
            SparseTensor(feats, self._coords, self._stride)  # (its refusal)
        # What SparseTensor(feats, coords, stride, cache=cache, validate=False) makes, without the
        # constructor's normalising and checks of arguments that are this tensor's own: every layer derives
        # its output so, and torch.compile traced the constructor's Python at each one (15% of the bytecode
        # it traced for a MinkUNet, bench/RESULTS.md stop 78).
        out = object.__new__(SparseTensor)
        out._hold(feats, self._coords, self._stride, self.cache)
        return out

    def to(self, *args, **kwargs) -> "SparseTensor":
        """Move to a device and/or cast feats (``.to("cuda")``, ``.to(torch.float64)``);
        ValueError naming the target where torch cannot go there (a device
        this torch build lacks, a non-floating dtype); TypeError for an
        argument torch's ``Tensor.to`` takes no such type of."""
        if any(isinstance(a, SparseTensor) for a in (*args, *kwargs.values())):
            raise TypeError("SparseTensor.to takes a device, a dtype or a torch.Tensor (as torch.Tensor.to); got a "
                            "SparseTensor (for its device and dtype: .to(other.feats))")
        try:
            feats = self._feats.to(*args, **kwargs)
        except (AssertionError, RuntimeError, TypeError) as exc:  # e.g. "Torch not compiled with CUDA enabled"
            target = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
            if isinstance(exc, TypeError):  # (torch: no such combination of argument types)
                raise TypeError(f"SparseTensor.to takes a device, a dtype or a torch.Tensor (as torch.Tensor.to); "
                                f"got ({target}): {exc}") from None
            raise ValueError(f"SparseTensor.to({target}) is not possible here: {exc}") from None
        if feats.dtype not in FEATS_DTYPES:
            raise TypeError(f"SparseTensor.to: feats must stay floating point (float16, bfloat16, float32 or "
                            f"float64); got {feats.dtype}")
        if feats.device.type == "meta":
            raise ValueError("SparseTensor.to: a SparseTensor needs real data, not the meta device (shape only); "
                             "for shape-only tracing use torch.compile / torch.export")
        if feats.device == self._feats.device:
            return SparseTensor(feats, self._coords, self._stride, cache=self.cache, validate=False)
        cache = self.cache.to(feats.device)
        coords = cache.coords.get(self._stride)
        if coords is None or self.cache.coords.get(self._stride) is not self._coords:
            coords = self._coords.to(feats.device)  # never swap in other coords of the same stride
        out = SparseTensor(feats, coords, self._stride, cache=cache, validate=False)
        out._note_equal_coords()  # (a copy, as deepcopy's: the moved copy of an alias stays refused once changed)
        return out

    def cpu(self) -> "SparseTensor":
        return self.to("cpu")

    def cuda(self, device=None) -> "SparseTensor":
        return self.to("cuda" if device is None else device)

    def double(self) -> "SparseTensor":
        return self.to(torch.float64)

    def float(self) -> "SparseTensor":
        return self.to(torch.float32)

    def half(self) -> "SparseTensor":
        return self.to(torch.float16)

    def bfloat16(self) -> "SparseTensor":
        return self.to(torch.bfloat16)

    def detach(self) -> "SparseTensor":
        return self.with_feats(self._feats.detach())

    def __deepcopy__(self, memo: dict) -> "SparseTensor":
        """Copies of the feats, coords and coordinate cache (its plans
        rebuilt on use). Feats that are no graph leaf are refused, as torch
        refuses to deep-copy such a tensor: a copy of their values would
        drop the graph they hang on."""
        if not self._feats.is_leaf:
            raise TypeError("copy.deepcopy(SparseTensor): its feats are not a graph leaf (autograd computed them), "
                            "and torch deep-copies no such tensor; copy .detach() for the values without the graph")
        out = type(self).__new__(type(self))
        memo[id(self)] = out
        for name in SparseTensor.__slots__:  # one memo: the copied cache holds the copied coords
            setattr(out, name, copy.deepcopy(getattr(self, name), memo))
        out._note_equal_coords()
        return out

    def __setstate__(self, state) -> None:
        """Unpickled: the slots (``(None, slots)``, as ``object`` pickles
        them), then :meth:`_note_equal_coords`."""
        for name, value in (state[1] if isinstance(state, tuple) else state).items():
            object.__setattr__(self, name, value)
        self._note_equal_coords()

    def _note_equal_coords(self) -> None:
        """In a copy (deepcopy, unpickling, a move to another device):
        coords other than the copied cache's own at this stride but equal to
        them (the copy of a tensor made on a copy of them with ``cache=``)
        noted as their alias, refused once changed in place
        (:meth:`CoordinateCache.coords_for`), as the original's were."""
        held = self.cache.coords.get(self._stride)
        if held is not None and held is not self._coords and held.shape == self._coords.shape \
                and held.device == self._coords.device and torch.equal(held, self._coords):
            self.cache.note_alias(self._stride, self._coords)

    def dense(self, shape: Sequence[int] | None = None) -> torch.Tensor:
        """Dense ``(B, C, X, Y, Z)``: site ``coords // stride`` holds its feats,
        inactive sites are 0. ``shape`` is the spatial ``(X, Y, Z)`` or the full
        ``(B, C, X, Y, Z)``; by default just large enough. Coordinates must be
        non-negative (shift them first)."""
        n, c = self._feats.shape
        st = torch.tensor(self._stride, device=self._coords.device, dtype=torch.int64)
        idx = self._coords[:, 1:].long() // st
        if n and bool((idx < 0).any()):
            raise ValueError("dense() needs non-negative coordinates; shift the coords first")
        if shape is None:
            b = self.batch_size
            spatial = tuple(int(v) + 1 for v in idx.max(0).values) if n else (0, 0, 0)
        else:
            try:
                shape = tuple(_index(s) for s in shape)  # (not bools: True is no size)
            except TypeError:
                raise TypeError(
                    f"shape must be a sequence of ints (X, Y, Z) or (B, C, X, Y, Z); got {shape!r}") from None
            if any(s < 0 or s >= 2**63 for s in shape):  # (past int64: torch's "Overflow when unpacking long")
                raise ValueError(f"shape must be non-negative ints below 2**63; got {shape}")
            if len(shape) == 5:
                b, spatial = shape[0], shape[2:]
                if shape[1] != c:
                    raise ValueError(f"shape has {shape[1]} channels but the tensor has {c}")
            elif len(shape) == 3:
                b, spatial = self.batch_size, shape
            else:
                raise ValueError(f"shape must be (X, Y, Z) or (B, C, X, Y, Z); got {shape}")
            if n and (bool((idx >= torch.tensor(spatial, device=idx.device)).any())
                      or int(self._coords[:, 0].max()) >= b):
                raise ValueError(f"active sites fall outside the dense shape {shape}")
        out = self._dense_buffer(b, spatial, c)
        if n:  # (written in place in the (B, C, X, Y, Z) grid: a (B, X, Y, Z, C) one permuted after took twice it)
            out[self._coords[:, 0].long(), :, idx[:, 0], idx[:, 1], idx[:, 2]] = self._feats
        else:  # linked to the feats all the same (a zero gradient), as the layers' outputs are
            out = out + self._feats[:0].sum(0)[:, None, None, None]
        return out

    def _dense_buffer(self, b: int, spatial, c: int) -> torch.Tensor:
        """The zeroed ``(B, C, X, Y, Z)`` grid, its size checked before allocating:
        against :data:`MAX_DENSE_BYTES`, and on the CPU against the memory the
        system has available (Linux: a larger zeroed buffer was granted, then
        the process killed as it wrote the zeros)."""
        numel = b * c
        for s in spatial:
            numel *= int(s)
        nbytes = numel * self._feats.element_size()
        if nbytes > MAX_DENSE_BYTES:
            raise ValueError(f"dense() of shape {(b, c, *spatial)} needs {nbytes / 2**30:.1f} GiB, over the "
                             f"{MAX_DENSE_BYTES / 2**30:.0f} GiB limit (crop or shift the coords, or pass a shape)")
        check_memory_for(nbytes, self._feats.device, f"dense() of shape {(b, c, *spatial)}",
                         "crop or shift the coords, or pass a shape")
        try:
            return self._feats.new_zeros((b, c, *spatial))
        except RuntimeError as exc:  # the allocator refused
            raise ValueError(f"dense() of shape {(b, c, *spatial)} ({nbytes / 2**30:.1f} GiB) could not be "
                             f"allocated: {exc}") from None

    def __repr__(self) -> str:
        return (f"SparseTensor(n={len(self)}, channels={self._feats.shape[1]}, stride={self._stride}, "
                f"dtype={self.dtype}, device={self.device})")


def _flatten(tensor: SparseTensor):
    return [tensor.feats, tensor.coords], tensor.stride


def _flatten_with_keys(tensor: SparseTensor):
    from torch.utils._pytree import GetAttrKey

    return [(GetAttrKey("feats"), tensor.feats), (GetAttrKey("coords"), tensor.coords)], tensor.stride


def _unflatten(children, stride) -> SparseTensor:
    """A tensor rebuilt from its flattened parts (as torch.compile / export do
    at a graph's edges), with a fresh coordinate cache: its values
    unchecked, but tensor leaves of another dtype or rank refused (metadata
    only, which a graph's fake tensors have): a pytree map over a batch,
    ``tree_map(lambda t: t.half(), batch)``, casts the coords too, and a
    conv then ran on coords rounded to float16 without a word."""
    feats, coords = children
    hint = ("; a pytree map over a SparseTensor maps its coords too (map only floating tensors, or use "
            "SparseTensor.to)")
    if isinstance(coords, torch.Tensor):
        if coords.dtype != torch.int32:
            raise TypeError(f"coords must be int32 [batch, x, y, z]; got dtype {coords.dtype}{hint}")
        if coords.dim() != 2:
            raise ValueError(f"coords must be (N, 4) int32 [batch, x, y, z]; got {coords.dim()} dimension(s){hint}")
    if isinstance(feats, torch.Tensor):
        if feats.dtype not in FEATS_DTYPES:
            raise TypeError(f"feats must be a floating-point tensor (N, C) of float16, bfloat16, float32 or float64; "
                            f"got dtype {feats.dtype}{hint}")
        if feats.dim() != 2:
            raise ValueError(f"feats must be (N, C); got {feats.dim()} dimension(s){hint}")
    return SparseTensor(feats, coords, stride, validate=False)


# A pytree node (children feats and coords, the stride as context), so that
# torch.export takes and returns SparseTensors and ExportedPrograms that do can
# be saved and loaded (in a process that has imported pointsparse).
torch.utils._pytree.register_pytree_node(
    SparseTensor, _flatten, _unflatten, serialized_type_name="pointsparse.SparseTensor",
    flatten_with_keys_fn=_flatten_with_keys, to_dumpable_context=lambda stride: json.dumps(list(stride)),
    from_dumpable_context=lambda text: tuple(json.loads(text)))


def items_of(values, kind: type, caller: str, one: str) -> list:
    """``values`` (a non-empty iterable of ``kind``) as a list, for a
    function taking a list of them (``caller``, e.g. "collate"; ``one``: what
    to call a single item, as in "give [tensor]"): a TypeError for one item
    given bare (whose list() says "'X' object is not iterable"), for what is
    no iterable or holds another type, and a ValueError for none."""
    name = kind.__name__
    if isinstance(values, kind):
        raise TypeError(f"{caller} takes a list of {name}s; got one {name} (give [{one}])")
    try:
        items = iter(values)
    except TypeError:  # (Python's own: "'int' object is not iterable")
        raise TypeError(f"{caller} takes a list of {name}s; got {type(values).__name__}") from None
    values = list(items)  # (a TypeError raised while iterating is the iterable's own)
    if not values:
        raise ValueError(f"{caller} needs at least one {name}; got none")
    for i, v in enumerate(values):
        if not isinstance(v, kind):
            raise TypeError(f"{caller} takes {name}s; item {i} is {type(v).__name__}")
    return values


def collate(tensors: Iterable[SparseTensor]) -> SparseTensor:
    """One batched SparseTensor: the batch indices of the i-th tensor are
    shifted past those of the tensors before it, an empty tensor counting
    one batch (as MinkowskiEngine's and TorchSparse's sparse_collate, the
    i-th of single-scan tensors has batch index i, whether or not one
    before it is empty). Empty tensors at the end hold no row, so the
    result's ``batch_size`` cannot count them."""
    tensors = items_of(tensors, SparseTensor, "collate", "tensor")
    stride, channels, device = tensors[0].stride, tensors[0].num_channels, tensors[0].device
    dtype = tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.stride != stride:
            raise ValueError(f"item {i} has stride {t.stride}, item 0 {stride}: collate needs one stride")
        if t.num_channels != channels:
            raise ValueError(f"item {i} has {t.num_channels} channels, item 0 {channels}")
        if t.dtype != dtype:  # torch.cat would promote them all silently
            raise ValueError(f"item {i} has feats of dtype {t.dtype}, item 0 {dtype}: collate needs one dtype "
                             "(cast them first, e.g. .to(torch.float32))")
        if t.device != device:
            raise ValueError(f"item {i} is on {t.device}, item 0 on {device}")
    sizes = [max(t.batch_size, 1) for t in tensors]
    if sum(sizes) - 1 > _coords.BATCH_MAX:
        raise ValueError(f"collate: the tensors hold {sum(sizes)} batches in all; batch indices must stay "
                         f"within [0, {_coords.BATCH_MAX}]")
    coords, offset = [], 0
    for i, (t, size) in enumerate(zip(tensors, sizes)):
        if len(t) and getattr(t.cache, "origin", None) is None and not torch.compiler.is_compiling() \
                and int(t.coords[:, 0].min()) > 0:  # (a VoxelPrune's selection may have emptied its batch 0)
            first = int(t.coords[:, 0].min())
            empty = f"batch {offset} is" if first == 1 else f"batches {offset} to {offset + first - 1} are"
            warnings.warn(f"collate: item {i} holds no row of batch 0 (its smallest batch index is {first}); collate "
                          f"shifts each item's batch indices past the items before, so its rows land at batch "
                          f"{offset + first} and {empty} empty (counted by the global poolings); make each scan "
                          "with batch index 0 (voxelize's default) and let collate number them", stacklevel=2)
        c = t.coords.clone()
        c[:, 0] += offset
        offset += size
        coords.append(c)
    # (one dtype: the cat as outside autocast, whose cat refuses a 16-bit dtype other than its own, "Unexpected
    # floating ScalarType in at::autocast::prioritize": bf16 clouds batched under fp16 autocast)
    with torch.autocast(device.type, enabled=False):
        feats = torch.cat([t.feats for t in tensors], 0)
    all_coords = torch.cat(coords, 0)
    # Batch ranges are disjoint and each input has unique coords: only the
    # span of the whole needs checking (the batch count and the x, y, z spans
    # must fit one key).
    _coords.KeyLayout.of(all_coords)
    return SparseTensor(feats, all_coords, stride, validate=False)
