"""Kernel maps: for every kernel offset, which input row feeds which output row.

``build(coords, kernel_size, stride, dilation, tensor_stride, method)`` returns
a :class:`KernelMap`; ``get_kmap(tensor, ...)`` returns the map of a layer
from the tensor's :class:`~pointsparse.tensor.CoordinateCache`, building it
once per structural key.

Offsets (API.md): along one axis ``(i - (k - 1) // 2) * d * s`` for
``i in range(k)``, enumerated with ``i_z`` fastest. Pairs of one offset are
sorted by output row; every method returns identical tensors.

Methods:
    ``"mergesort"`` (CPU, C++): sort the keys once; the output keys shifted by
        an offset stay sorted, so one linear merge with the sorted input keys
        finds every pair (one merge per (dx, dy) column of offsets).
    ``"hash"`` (CPU, C++): an open-addressing table over the exact keys.
    ``"torch"`` (any device): sort + searchsorted in torch ops.
Submanifold maps compute half the offsets and mirror the rest (the pairs of
``-o`` are the swapped pairs of ``o``).

Every method packs the input and output coords in one key layout fitted to
both (:mod:`pointsparse.coords`) with a margin of the largest ``|offset|`` per
axis, so a shifted key never carries into another field; where the margin
does not fit the 63 key bits, rows are checked one by one. Coordinates may lie
anywhere in int32; kernels have at most :data:`MAX_KERNEL_VOLUME` offsets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from . import _ext
from . import coords as _coords
from .tensor import STRIDE_MAX, SparseTensor, Triple, as_bool, as_int, as_triple

__all__ = ["KernelMap", "KernelMapKey", "build", "get_kmap", "kernel_offsets", "downsample_coords", "default_method",
           "METHODS", "CPU_METHODS", "MAX_KERNEL_VOLUME", "MAX_OFFSET"]

METHODS = ("mergesort", "hash", "torch")
CPU_METHODS = ("mergesort", "hash")
# Most offsets one kernel may have (32**3): a bound on the per-offset work
# and memory of every method, checked before anything is built.
MAX_KERNEL_VOLUME = _ext.core.MAX_KERNEL_VOLUME
# Largest |offset| a kernel may reach: offsets are int32.
MAX_OFFSET = _coords.COORD_MAX


@dataclass(frozen=True)
class KernelMapKey:
    """The full structural key of a map in a coordinate cache."""

    tensor_stride: Triple
    kernel_size: Triple
    stride: Triple
    dilation: Triple
    transposed: bool = False

    #: Stride of the map's outputs: ``tensor_stride * stride``; a transposed
    #: map's key holds the stride of the finer tensor, which is its output.
    #: Set once (read on every conv call).
    out_stride: Triple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out = self.tensor_stride if self.transposed else tuple(
            a * b for a, b in zip(self.tensor_stride, self.stride))
        object.__setattr__(self, "out_stride", out)


@dataclass(frozen=True, eq=False)
class KernelMap:
    """An immutable kernel map.

    Attributes:
        out_coords: int32 ``(M, 4)`` output coordinates.
        in_idx, out_idx: int64 ``(P,)`` pairs of all offsets, grouped by offset
            (offset 0 first), within an offset sorted by ``out_idx``.
        sizes: int64 ``(K,)`` pairs per offset (on the CPU).
        offsets: int32 ``(K, 3)`` coordinate offsets (kernel index * dilation *
            tensor stride).
        num_in, num_out: rows of the input and output tensors.
        key: the structural key.
    """

    out_coords: torch.Tensor
    in_idx: torch.Tensor
    out_idx: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor
    num_in: int
    num_out: int
    key: KernelMapKey
    ptr: list[int] = field(init=False, repr=False)
    _offset_of_pairs: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        ptr = [0]
        for s in self.sizes.tolist():
            ptr.append(ptr[-1] + int(s))
        object.__setattr__(self, "ptr", ptr)

    @property
    def kernel_volume(self) -> int:
        return int(self.sizes.numel())

    @property
    def num_pairs(self) -> int:
        return self.ptr[-1]

    def pairs(self, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_idx, out_idx)`` of offset index ``offset``, an int in ``[0,
        kernel_volume)`` (TypeError / ValueError naming ``offset`` otherwise)."""
        offset = as_int(offset, "offset")
        if not 0 <= offset < self.kernel_volume:
            raise ValueError(f"offset must be an offset index in [0, {self.kernel_volume}) (the map's "
                             f"{self.kernel_volume} offsets); got {offset}")
        in_idx, out_idx = self.indices()
        lo, hi = self.ptr[offset], self.ptr[offset + 1]
        return in_idx[lo:hi], out_idx[lo:hi]

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_idx, out_idx)`` of every pair, as autograd can save them."""
        if self.in_idx.is_inference() and not torch.is_inference_mode_enabled():
            # Built under torch.inference_mode (a cached map then serves training): autograd cannot save
            # inference tensors (index_add_ and indexing save the indices), so ordinary copies from now on.
            with _ext.plain_ops():
                object.__setattr__(self, "in_idx", self.in_idx.clone())
                object.__setattr__(self, "out_idx", self.out_idx.clone())
        return self.in_idx, self.out_idx

    def offset_of_pairs(self, device=None) -> torch.Tensor:
        """int64 ``(P,)``: the offset index of every pair (``o`` repeated
        ``sizes[o]`` times), on ``device`` (the pairs' by default); made once
        per device and kept, as autograd can save it (one made under
        torch.inference_mode is made again outside it, as :meth:`indices`
        copies the pairs)."""
        device = self.in_idx.device if device is None else _device(device)
        got = self._offset_of_pairs.get(device)
        if got is None or (got.is_inference() and not torch.is_inference_mode_enabled()):
            with _ext.plain_ops():  # (kept past a torch.func transform: a plain tensor, as the map's own)
                got = torch.repeat_interleave(torch.arange(self.kernel_volume, device=device),
                                              self.sizes.to(device), output_size=self.num_pairs)
            self._offset_of_pairs[device] = got
        return got

    def transpose(self, out_coords: torch.Tensor, *, trusted: bool = False) -> "KernelMap":
        """The map of the adjoint operator: inputs and outputs swapped, pairs
        re-sorted by the new output row. ``out_coords`` are the coords of the
        new outputs (the old inputs, in their row order): int32
        ``(num_in, 4)``; a ValueError where a pair's input row is not at its
        output's coords plus its offset (other coords of the same row count
        labelled the outputs without a word). ``trusted``: the library's
        own maps, whose inputs it holds (a cache's, a graph's), skip that
        pass over the pairs."""
        return self._transpose(out_coords, trusted, "out_coords")

    def _transpose(self, out_coords: torch.Tensor, trusted: bool, name: str) -> "KernelMap":
        """:meth:`transpose`, its errors naming ``out_coords`` as ``name``
        (the ``kmap_transpose`` operator's ``fine_coords``)."""
        _coords.check_coords(out_coords, name)
        if out_coords.shape[0] != self.num_in:
            raise ValueError(f"{name} has {out_coords.shape[0]} rows; the map's inputs have {self.num_in}")
        if not trusted:
            self._check_inputs(out_coords, name)
        in_idx, out_idx = self.out_idx, self.in_idx
        if not self._in_idx_ascending():
            order = torch.argsort(self.offset_of_pairs() * max(self.num_in, 1) + self.in_idx, stable=True)
            in_idx, out_idx = in_idx[order], out_idx[order]
        key = KernelMapKey(self.key.tensor_stride, self.key.kernel_size, self.key.stride, self.key.dilation,
                           not self.key.transposed)
        return KernelMap(out_coords, in_idx, out_idx, self.sizes, self.offsets, self.num_out, self.num_in, key)

    def _check_inputs(self, in_coords: torch.Tensor, name: str) -> None:
        """ValueError naming ``in_coords`` as ``name`` (:meth:`transpose`'s
        ``out_coords``) unless every pair's input row of ``in_coords`` lies
        at its output row's coords plus the pair's offset (less it, for a
        transposed map: its inputs are the coarse rows), in the same batch
        item."""
        if not self.num_pairs:
            return
        device = self.in_idx.device
        offsets = self.offsets.to(device, torch.int64)
        # (in int64: a sum of int32 coords and offsets may pass int32)
        miss = in_coords.to(device).index_select(0, self.in_idx).long()
        miss -= self.out_coords.to(device).index_select(0, self.out_idx)
        per_pair = offsets.index_select(0, self.offset_of_pairs(device))  # (the offset of every pair, kept per device)
        miss[:, 1:] -= -per_pair if self.key.transposed else per_pair
        if bool(miss.any()):
            pair = int(miss.any(1).nonzero()[0])
            row, out = int(self.in_idx[pair]), int(self.out_idx[pair])
            have = in_coords[row].tolist()
            want = [h - m for h, m in zip(have, miss[pair].tolist())]
            raise ValueError(f"{name} must be the coords of the map's inputs (in their row order): row {row} "
                             f"is {have} but its pair with output row {out} {self.out_coords[out].tolist()} at "
                             f"offset {self.offsets[int(self.offset_of_pairs()[pair])].tolist()} puts it at {want}")

    def restricted(self, rows: torch.Tensor, out_coords: torch.Tensor, *, trusted: bool = False) -> "KernelMap":
        """The map onto the output rows ``rows`` only (a 1-D int64 or int32
        tensor of increasing rows in ``[0, num_out)``; ``out_coords``, int32
        ``(len(rows), 4)``, their coords), the same inputs. A map's pairs of
        one output row depend only on that row's coords and the inputs', so
        this is the map a search onto the kept coords makes, pair for pair
        and in its order (the rows renumbered in order: still grouped by
        offset and sorted by output row). A selection of voxels
        (``functional.select_voxels``) takes its downsampling maps this way:
        one pass over the pairs in the core (``_core.kmap_restrict``; torch
        ops on other devices) against a search that kmap_parents cannot
        serve (given out coords). (A submanifold map restricted on both sides
        is the kept voxels' map too, but the core's search of it is as fast:
        it is searched.) TypeError / ValueError naming the argument for rows
        or out_coords of another kind, and for out_coords other than the
        map's own coords of ``rows`` (they label the outputs) unless
        ``trusted`` (a selection's, which took them from those rows)."""
        return self._restricted(rows, out_coords, trusted, "out_coords")

    def _restricted(self, rows: torch.Tensor, out_coords: torch.Tensor, trusted: bool, name: str) -> "KernelMap":
        """:meth:`restricted`, its errors naming ``out_coords`` as ``name``
        (the ``kmap_restrict`` operator's ``kept_coords``)."""
        device = self.out_idx.device
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"rows must be a 1-D int64 (or int32) tensor of output rows; got "
                            f"{getattr(rows, 'dtype', type(rows).__name__)} {tuple(getattr(rows, 'shape', ()))}")
        _coords.check_coords(out_coords, name)
        if out_coords.shape[0] != rows.numel() or out_coords.device != device:
            raise ValueError(f"{name} must be the {rows.numel()} kept rows' coords on {device}; got "
                             f"{out_coords.shape[0]} rows on {out_coords.device}")
        rows = rows.to(device, torch.int64)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.num_out
                             or bool((rows[1:] <= rows[:-1]).any())):
            raise ValueError(f"rows must be increasing output rows in [0, {self.num_out}) (each once)")
        if not trusted:
            own = self.out_coords.to(device).index_select(0, rows)
            differ = (own != out_coords).any(1)
            if bool(differ.any()):
                i = int(differ.nonzero()[0])
                raise ValueError(f"{name} must be the map's coords of the kept rows: row {i} (output row "
                                 f"{int(rows[i])}) is {out_coords[i].tolist()}, not {own[i].tolist()}")
        renumber = torch.full((self.num_out,), -1, dtype=torch.int64, device=device)
        renumber[rows] = torch.arange(rows.numel(), dtype=torch.int64, device=device)
        if _ext.serves(self.out_idx):
            got = _ext.call(_ext.core.kmap_restrict, _ext.to_numpy(self.in_idx), _ext.to_numpy(self.out_idx),
                            _ext.to_numpy(self.sizes), _ext.to_numpy(renumber))
            in_idx, out_idx, sizes = (_ext.to_tensor(a) for a in got)
            return KernelMap(out_coords, in_idx, out_idx, sizes, self.offsets, self.num_in, rows.numel(), self.key)
        out_idx = renumber[self.out_idx]
        keep = out_idx >= 0
        # (the kept pairs counted up to each offset's end on the device; only those K + 1 counts to the host)
        ends = torch.tensor(self.ptr, dtype=torch.int64, device=device)
        kept = torch.cat([keep.new_zeros(1, dtype=torch.int64), keep.cumsum(0)])[ends].cpu()
        return KernelMap(out_coords, self.in_idx[keep], out_idx[keep], kept[1:] - kept[:-1], self.offsets,
                         self.num_in, rows.numel(), self.key)

    def _in_idx_ascending(self) -> bool:
        """Whether ``in_idx`` ascends within every offset (then the transpose
        needs no sort: true for maps between key-sorted coords)."""
        if self.num_pairs < 2:
            return True
        up = self.in_idx[1:] > self.in_idx[:-1]
        bounds = torch.tensor([p - 1 for p in self.ptr[1:-1] if 0 < p < self.num_pairs], dtype=torch.int64)
        if bounds.numel():
            up[bounds.to(up.device)] = True
        return bool(up.all())

    def to(self, device) -> "KernelMap":
        """A copy on ``device`` (a ``torch.device`` or a name: TypeError /
        ValueError naming it, as ``SparseTensor.to``)."""
        device = _device(device)
        return KernelMap(self.out_coords.to(device), self.in_idx.to(device), self.out_idx.to(device), self.sizes,
                         self.offsets, self.num_in, self.num_out, self.key)

    def __repr__(self) -> str:
        return (f"KernelMap(key={self.key}, num_in={self.num_in}, num_out={self.num_out}, "
                f"pairs={self.num_pairs}, offsets={self.kernel_volume})")


def _device(device) -> torch.device:
    """``device`` (a ``torch.device``, a name such as ``"cuda:0"`` or an
    index) as a ``torch.device``; TypeError / ValueError naming it."""
    if isinstance(device, torch.device):
        return device
    what = f"device must be a torch.device or a device name ('cpu', 'cuda:0', ...); got {device!r:.100}"
    if not isinstance(device, str):
        try:  # an accelerator's index (numpy integers too; not bool)
            device = as_int(device, "device")
        except (TypeError, ValueError):
            raise TypeError(what) from None
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{what} ({error})") from None


def kernel_offsets(kernel_size, dilation=1, tensor_stride=1) -> torch.Tensor:
    """int32 ``(K, 3)`` coordinate offsets in API.md order (``i_z`` fastest).
    ValueError when the kernel has more than :data:`MAX_KERNEL_VOLUME` offsets
    or an offset leaves int32 (``|offset| <= 2**31 - 1``)."""
    return _offsets(as_triple(kernel_size, "kernel_size"), as_triple(dilation, "dilation"),
                    as_triple(tensor_stride, "tensor_stride"))


def check_kernel(k: Triple, t: Triple, d: Triple, s: Triple = (1, 1, 1)) -> None:
    """ValueError where no kernel map takes a kernel of size ``k``, stride
    ``t`` and dilation ``d`` (normalised 3-tuples) on a tensor of stride
    ``s``: more than :data:`MAX_KERNEL_VOLUME` offsets, an offset past int32
    or an output stride past ``STRIDE_MAX``. The modules (``nn.Conv3d``,
    the pooling modules) check at construction with ``s`` 1 what every
    forward of theirs would refuse (a coarser input only widens the offsets
    and the output stride): the same check, the same words, sooner."""
    _check_offsets(k, d, s)
    _check_out_stride(t, s)


def _check_offsets(k: Triple, d: Triple, s: Triple) -> None:
    """:func:`check_kernel`'s offsets: their count and their reach."""
    volume = k[0] * k[1] * k[2]
    if volume > MAX_KERNEL_VOLUME:
        raise ValueError(f"kernel_size {k} has {volume:,} offsets; a kernel may have at most {MAX_KERNEL_VOLUME:,}")
    reach = max(max((k[a] - 1) // 2, k[a] - 1 - (k[a] - 1) // 2) * d[a] * s[a] for a in range(3))
    if reach > MAX_OFFSET:
        raise ValueError(f"kernel_size * dilation * tensor_stride reaches an offset of {reach} on one axis; "
                         f"offsets must stay within int32 (|offset| <= {MAX_OFFSET})")


def _check_out_stride(t: Triple, s: Triple) -> None:
    """:func:`check_kernel`'s output stride, ``s * t`` per axis."""
    if any(a * b > STRIDE_MAX for a, b in zip(s, t)):
        raise ValueError(f"tensor_stride {s} x stride {t} = output stride {tuple(a * b for a, b in zip(s, t))}; "
                         f"strides must be in [1, {STRIDE_MAX}] per axis")


def _offsets(k: Triple, d: Triple, s: Triple) -> torch.Tensor:
    """:func:`kernel_offsets` of normalised 3-tuples."""
    _check_offsets(k, d, s)
    axes = [[(i - (k[a] - 1) // 2) * d[a] * s[a] for i in range(k[a])] for a in range(3)]
    return torch.tensor(list(itertools.product(*axes)), dtype=torch.int32).reshape(-1, 3)


def _reach(offsets: torch.Tensor) -> list[int]:
    """The most ``|offset|`` per axis: the margin a map's key layout leaves."""
    return offsets.abs().amax(0).tolist() if offsets.shape[0] else [0, 0, 0]


def _downsampled(coords: torch.Tensor, out_stride: Triple) -> torch.Tensor:
    """int32 ``[batch, floor(c / out_stride) * out_stride]`` of every row
    (repeats kept); ValueError for a row that falls below int32."""
    st = torch.tensor(out_stride, dtype=torch.int64, device=coords.device)
    q = torch.div(coords[:, 1:].long(), st, rounding_mode="floor") * st
    low = (q < _coords.COORD_MIN).any(1)
    negative = coords[:, 0] < 0  # (named here, by the input's row, as the core names it; one read for both)
    if bool((low | negative).any()):
        if bool(negative.any()):
            row = int(negative.nonzero()[0, 0])
            raise ValueError(f"coords row {row} = {coords[row].tolist()} has a negative batch index")
        row = int(low.nonzero()[0, 0])
        raise ValueError(f"coords row {row} = {coords[row].tolist()} downsampled to stride {tuple(out_stride)} "
                         f"falls below the int32 range of coordinates")
    return torch.cat([coords[:, :1], q.int()], 1)


def downsample_coords(coords: torch.Tensor, out_stride) -> torch.Tensor:
    """Unique ``floor(c / out_stride) * out_stride`` per batch, sorted by key
    (quantise, radix sort, unique: "ranking"); ``out_stride`` an int or a
    3-tuple in ``[1, 2**31 - 1]``. ValueError when a downsampled coordinate
    falls below int32; TypeError / ValueError naming the argument for
    coords or out_stride of another kind."""
    _coords.check_coords(coords)
    out_stride = as_triple(out_stride, "out_stride")
    if max(out_stride) > STRIDE_MAX:
        raise ValueError(f"out_stride must be in [1, {STRIDE_MAX}] per axis; got {out_stride}")
    if _ext.serves(coords):
        return _ext.to_tensor(_ext.call(_ext.core.kmap_downsample, _ext.to_numpy(coords), list(out_stride)))
    return _unique_downsampled(coords, out_stride)[1]


def _unique_downsampled(coords: torch.Tensor, out_stride: Triple):
    """``(q, out_coords, inverse)`` in torch ops: every row downsampled
    (:func:`_downsampled`), the unique ones sorted by key, and each row's
    among them."""
    q = _downsampled(coords, out_stride)
    layout = _coords.KeyLayout.of(q)
    uniq, inverse, _, _ = _coords.unique_torch(_coords.pack_torch(q, layout, trusted=True))
    return q, _coords.unpack_torch(uniq, layout, trusted=True), inverse


def default_method(device) -> str:
    """The measured fastest method for tensors on ``device``: ``"mergesort"``
    where the core serves them (the CPU, under the backend policy:
    bench/results/kmap.md), ``"torch"`` elsewhere. ``device``: a
    ``torch.device``, a name or an index (TypeError / ValueError naming it
    otherwise)."""
    return "mergesort" if _ext.serves(_device(device)) else "torch"


def _check_method(method: str | None, device) -> str:
    if method is None:
        return default_method(device)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} (or None for the default); got {method!r}")
    if method in CPU_METHODS and torch.device(device).type != "cpu":
        raise ValueError(f"method {method!r} runs on CPU tensors; coords are on {device} (use 'torch' or None)")
    return method


#: The most (offset, output row) queries :func:`_query_torch` makes at once
#: (int64 keys and positions of that many: 128 MiB each).
QUERY_CHUNK = 1 << 24


def _query_torch(in_keys_sorted, in_perm, out_coords, offsets, mirror, layout, box):
    """The torch method's pairs of every offset by sort + searchsorted (any
    device, the CPU too: a loop over the offsets was 12-22% faster there on
    a k3 map of 87k voxels, equal on a k3 s2 map, bench/RESULTS.md stop 49,
    and would be a second copy of the search): the keys
    of every output row shifted by every queried offset searched at once (in
    chunks of at most :data:`QUERY_CHUNK` queries), the hits taken in
    (offset, output row) order, as the map keeps them. Offsets with
    ``mirror[o] >= 0`` take the swapped pairs of offset ``mirror[o]``, all at
    once (one sort by output row where they are not in order already). A few
    kernel launches and host syncs per map (a loop over the offsets took
    about 40 syncs: what bounded it on a GPU). Keys are in ``layout``, ``box``
    the bounds of ``out_coords`` (:func:`coords.bounds`); an
    output row whose shifted coords leave it has no pair."""
    dev = out_coords.device
    m, n, k = out_coords.shape[0], in_keys_sorted.numel(), offsets.shape[0]
    if not (m and n) or box is None:
        empty = torch.zeros(0, dtype=torch.int64, device=dev)
        return empty, empty.clone(), torch.zeros(k, dtype=torch.int64)
    out_keys = _coords.pack_torch(out_coords, layout, trusted=True)  # (the layout is fitted to them)
    offs = offsets.tolist()
    asked = [o for o in range(k) if mirror[o] < 0]
    deltas = torch.tensor([layout.delta(*offs[o]) for o in asked], dtype=torch.int64, device=dev)
    step = max(1, QUERY_CHUNK // m)
    ins, outs, counts = [], [], []
    for lo in range(0, len(asked), step):
        hi = min(len(asked), lo + step)
        q = out_keys[None, :] + deltas[lo:hi, None]
        pos = torch.searchsorted(in_keys_sorted, q.reshape(-1)).clamp_max(n - 1).view(q.shape)
        hit = in_keys_sorted[pos] == q
        for j in range(lo, hi):
            inside = _rows_inside(layout, box, offs[asked[j]], out_coords)
            if inside is not None:
                hit[j - lo] &= inside
        which, rows = hit.nonzero(as_tuple=True)  # row-major: by offset, then ascending output row
        ins.append(in_perm[pos[which, rows]])
        outs.append(rows)
        counts.append(hit.sum(1))
    counts = torch.cat(counts).tolist()
    found = dict(zip(asked, zip(torch.cat(ins).split(counts), torch.cat(outs).split(counts))))
    mirrored = [o for o in range(k) if mirror[o] >= 0]
    if mirrored:
        # the swapped pairs of every mirrored offset, in offset order, re-sorted by output row where needed
        new_out = torch.cat([found[mirror[o]][0] for o in mirrored])
        new_in = torch.cat([found[mirror[o]][1] for o in mirrored])
        lengths = [found[mirror[o]][0].numel() for o in mirrored]
        if new_out.numel() > 1:
            # (offset, output row) as one key: in order unless some offset's swapped rows are not
            group = torch.repeat_interleave(torch.arange(len(mirrored), device=dev),
                                            torch.tensor(lengths, device=dev), output_size=new_out.numel())
            key = group * max(m, n) + new_out
            if not bool((key[1:] > key[:-1]).all()):
                order = torch.argsort(key, stable=True)
                new_in, new_out = new_in[order], new_out[order]
        found.update(zip(mirrored, zip(new_in.split(lengths), new_out.split(lengths))))
    return (torch.cat([found[o][0] for o in range(k)]), torch.cat([found[o][1] for o in range(k)]),
            torch.tensor([found[o][0].numel() for o in range(k)], dtype=torch.int64))


def _rows_inside(layout, box, off, out_coords: torch.Tensor) -> torch.Tensor | None:
    """None where every row of the bounding ``box`` shifted by ``off`` stays
    in the layout (its margin holds the shift); else which rows of
    ``out_coords`` shifted by ``off`` it holds (the others have no pair)."""
    lo, hi = box
    if all(layout.axis_range(a)[0] <= lo[a + 1] + off[a] and hi[a + 1] + off[a] <= layout.axis_range(a)[1]
           for a in range(3)):
        return None
    shifted = out_coords.to(torch.int64, copy=True)  # (a copy even of int64 coords: shifted in place)
    shifted[:, 1:] += torch.tensor(off, device=out_coords.device)
    return layout.contains(shifted)


def _mirror_sources(offsets: torch.Tensor, submanifold: bool) -> list[int]:
    """``mirror[o]``: the index of ``-o`` when offset ``o``'s pairs are the
    swapped pairs of ``-o`` (submanifold maps, ``o`` lexicographically
    negative, ``-o`` in the kernel), else -1. Same rule as the C++ core."""
    offs = [tuple(o) for o in offsets.tolist()]
    mirror = [-1] * len(offs)
    if not submanifold:
        return mirror
    index = {o: i for i, o in enumerate(offs)}
    for i, o in enumerate(offs):
        neg = (-o[0], -o[1], -o[2])
        if o < (0, 0, 0) and neg in index:
            mirror[i] = index[neg]
    return mirror


def _sorted_unique_keys(coords: torch.Tensor, layout):
    """The coords' keys sorted, and their rows; duplicate rows are a
    ValueError (a cache's coords too: a tensor made with ``validate=False``
    reaches it unchecked, and the core's builders refuse them as well)."""
    keys = _coords.pack_torch(coords, layout, trusted=True)  # (the layout is fitted to them: _build_torch)
    sorted_keys, perm = _coords.sort_torch(keys)
    if sorted_keys.numel() > 1 and bool((sorted_keys[1:] == sorted_keys[:-1]).any()):
        raise ValueError("coords hold duplicate rows; each [batch, x, y, z] must appear once")
    return sorted_keys, perm


def _build_torch(coords, out_coords, offsets, submanifold):
    # (each bounds once: a host read, a sync on a GPU)
    box = _coords.bounds(coords)
    out_box = box if out_coords is coords else _coords.bounds(out_coords)
    try:
        layout = _coords.KeyLayout.of_bounds(box, out_box, margin=_reach(offsets))
    except ValueError as exc:
        raise ValueError(_outputs_named(str(exc), out_coords is not coords)) from None
    in_sorted, in_perm = _sorted_unique_keys(coords, layout)
    return _query_torch(in_sorted, in_perm, out_coords, offsets, _mirror_sources(offsets, submanifold), layout,
                        out_box)


def _build_core(fn, coords, out_coords, offsets, submanifold):
    out = None if submanifold else _ext.to_numpy(out_coords)
    try:
        in_idx, out_idx, sizes = _ext.call(fn, _ext.to_numpy(coords), out, _ext.to_numpy(offsets))
    except ValueError as exc:
        raise ValueError(_outputs_named(str(exc).replace("in_coords", "coords"), out is not None)) from None
    return _ext.to_tensor(in_idx), _ext.to_tensor(out_idx), _ext.to_tensor(sizes)


def _outputs_named(message: str, other_outputs: bool) -> str:
    """A key layout's refusal (``... bits in all``) of a map whose outputs
    are other coords (a strided map's: its inputs floored to the stride),
    saying that the spans it names are of both: a z span of [0, 1] named
    for inputs whose z were all 1 read as a wrong span."""
    if other_outputs and "bits in all" in message:
        return (f"{message} (the spans are of the map's input coords and its output coords together, which one "
                "key layout packs: a strided map's outputs are its inputs floored to the stride)")
    return message


def build(coords: torch.Tensor, kernel_size=3, stride=1, dilation=1, tensor_stride=1, method: str | None = None,
          out_coords: torch.Tensor | None = None) -> KernelMap:
    """The kernel map of a convolution over ``coords``.

    Args:
        coords: int32 ``(N, 4)`` unique ``[batch, x, y, z]`` rows.
        kernel_size, stride, dilation, tensor_stride: int or 3-tuple each.
        method: ``"mergesort"``, ``"hash"`` (CPU tensors), ``"torch"`` (any
            device) or ``None`` for :func:`default_method`. All return
            identical tensors, where they build the map: the default's
            map of a kernel tiling its stride (below) packs no keys, so
            it is built for coords whose spans (inputs and outputs
            together) need more than the 63 key bits, which the named
            methods refuse.
        out_coords: output coords to use instead of computing them (the
            coords a cache already holds for the output stride).

    Stride 1: outputs are the inputs (submanifold). Stride t > 1: outputs are
    the unique ``floor(c / (s * t)) * (s * t)``, sorted by (batch, x, y, z).
    ValueError (on every backend) when the output stride ``tensor_stride *
    stride`` passes ``2**31 - 1`` on an axis.
    With the default method, a map whose kernel tiles its stride (kernel ==
    stride, 1 or 2 per axis, dilation 1: a U-Net's k2 s2 downsampling) pairs
    each row with its parent from the downsampling's own sort, with no
    search: the same tensors, 1.1-1.6x faster than the merge-sort builder on
    real sweeps and generated streets of 100k-1M voxels (2 threads,
    bench/results/kmap_zen3_stop29.md).
    """
    return _build(coords, as_triple(kernel_size, "kernel_size"), as_triple(stride, "stride"),
                  as_triple(dilation, "dilation"), as_triple(tensor_stride, "tensor_stride"), method, out_coords)


def _tiles_its_stride(k: Triple, t: Triple, d: Triple) -> bool:
    """Whether a kernel tiles its stride (kernel == stride > 1 somewhere, 1
    or 2 per axis, dilation 1 where 2: the U-Net's k2 s2), whose map pairs
    each row with its parent, no search (``_core.kmap_parents``)."""
    return t != (1, 1, 1) and all(k[a] == t[a] and (k[a] == 1 or (k[a] == 2 and d[a] == 1)) for a in range(3))


def _build(coords: torch.Tensor, k: Triple, t: Triple, d: Triple, s: Triple, method: str | None = None,
           out_coords: torch.Tensor | None = None, trusted: bool = False) -> KernelMap:
    """:func:`build` of checked coords and normalised 3-tuples (the arguments
    are normalised once, at the public entry point). ValueError unless the
    coords (and out_coords) are multiples of their strides. A cache's maps
    pass ``trusted=True``: its coords are unique multiples of their stride
    by construction (validated when their tensor was made, or downsampled),
    so the check is skipped (some 0.25 ms per map on a 91k-voxel sweep) and
    the maps that need no search take their shortcuts (a 1x1x1 map; a kernel
    tiling its stride: ``_core.kmap_parents``). ValueError when ``s * t``,
    the output stride, passes ``STRIDE_MAX`` on an axis (on every backend)."""
    _check_out_stride(t, s)
    if not trusted:
        _coords.check_coords(coords)  # build()'s, and an exported program's operators' (their input coords)
    default = method is None
    method = _check_method(method, coords.device)
    offsets = _offsets(k, d, s)
    if not trusted:
        _coords.check_stride_multiple(coords, s)
    if out_coords is not None:
        _coords.check_coords(out_coords, "out_coords")
        if out_coords.device != coords.device:
            raise ValueError(f"out_coords are on {out_coords.device} but coords on {coords.device}")
        if not trusted:
            _coords.check_stride_multiple(out_coords, tuple(a * b for a, b in zip(s, t)), "out_coords")
            # (a row given twice was two output rows of one site; the bounds named: a negative batch was "coords")
            keys = _coords.pack(out_coords, _coords.KeyLayout.of_bounds(_coords.bounds(out_coords, "out_coords")))
            if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()) and \
                    _coords.unique(keys)[0].numel() != keys.numel():
                raise ValueError("out_coords hold duplicate rows; each [batch, x, y, z] must appear once")
    key = KernelMapKey(s, k, t, d, False)
    submanifold = out_coords is None and t == (1, 1, 1)
    if submanifold and offsets.shape[0] == 1 and trusted:
        # A cache's 1x1x1 map (a residual block's shortcut): every row paired
        # with itself, no search (the public build() still runs a builder,
        # which rejects duplicate coords). bench/call_overhead.py --parts
        # cache times it against the builder.
        n = coords.shape[0]
        rows = torch.arange(n, dtype=torch.int64, device=coords.device)
        return KernelMap(coords, rows, rows.clone(), torch.tensor([n], dtype=torch.int64), offsets, n, n, key)
    if not submanifold and (trusted or default) and _tiles_its_stride(k, t, d):
        # A map whose kernel tiles its stride (the U-Net's k2 s2
        # downsampling), a cache's or build()'s with the default method: each
        # row pairs with its parent, found by the downsampling's own sort
        # (kmap_parents), with no search. It rejects duplicate coords as the
        # builders do, with their message (untrusted coords were checked to
        # be multiples of their stride above). None: the out_coords given are
        # not the downsampled coords; a search below.
        if method != "torch" and _ext.serves(coords):
            got = _ext.call(_ext.core.kmap_parents, _ext.to_numpy(coords), [a * b for a, b in zip(s, t)], list(k),
                            None if out_coords is None else _ext.to_numpy(out_coords))
            if got is not None:
                parents, in_idx, out_idx, sizes = (_ext.to_tensor(a) for a in got)
                out = parents if out_coords is None else out_coords
                return KernelMap(out, in_idx, out_idx, sizes, offsets, coords.shape[0], out.shape[0], key)
        elif method == "torch" and out_coords is None:
            # the same map in torch ops (a GPU's): each row's parent from the downsampling's own unique
            return _parents_torch(coords, k, t, s, offsets, key)
    if out_coords is None:
        out_coords = coords if submanifold else downsample_coords(coords, tuple(a * b for a, b in zip(s, t)))
    if method == "torch":
        in_idx, out_idx, sizes = _build_torch(coords, out_coords, offsets, submanifold)
    else:
        fn = _ext.core.kmap_mergesort if method == "mergesort" else _ext.core.kmap_hash
        in_idx, out_idx, sizes = _build_core(fn, coords, out_coords, offsets, submanifold)
    return KernelMap(out_coords, in_idx, out_idx, sizes, offsets, coords.shape[0], out_coords.shape[0], key)


def _parents_torch(coords: torch.Tensor, k: Triple, t: Triple, s: Triple, offsets: torch.Tensor,
                   key: KernelMapKey) -> KernelMap:
    """The map of a kernel that tiles its stride (``_tiles_its_stride``) in
    torch ops, as ``_core.kmap_parents`` makes it: the downsampled coords'
    unique gives every row its parent (the output row) and its place in the
    parent (the offset), one sort by (offset, output row) orders the pairs.
    No search: a few launches and host reads (the GPU's k2 s2 maps).
    Duplicate coords (two rows with one parent and place) are the builders'
    ValueError and coords off their stride's multiples ``check_stride_multiple``'s,
    for a cache's coords too, as the core's kmap_parents (a tensor made with
    ``validate=False`` reaches it unchecked): one host read for both."""
    n = coords.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=coords.device)
        # (fresh coords, no view of the input: the kmap_parents operator's output may not alias it)
        return KernelMap(coords.new_zeros((0, 4)), empty, empty.clone(),
                         torch.zeros(offsets.shape[0], dtype=torch.int64), offsets, 0, 0, key)
    q4, out_coords, inverse = _unique_downsampled(coords, tuple(a * b for a, b in zip(s, t)))
    place = (coords[:, 1:].long() - q4[:, 1:].long()) // torch.tensor(s, dtype=torch.int64, device=coords.device)
    o = (place[:, 0] * k[1] + place[:, 1]) * k[2] + place[:, 2]
    m = out_coords.shape[0]
    code = o * m + inverse  # (unique values: one row per parent and place)
    in_idx = torch.argsort(code)
    out_idx = inverse[in_idx]
    pair = code[in_idx]
    off_stride = (torch.remainder(coords[:, 1:], torch.tensor(s, dtype=coords.dtype, device=coords.device)) != 0)
    if bool((pair[1:] == pair[:-1]).any() | off_stride.any()):
        _coords.check_stride_multiple(coords, s)  # (names the row)
        raise ValueError("coords hold duplicate rows; each [batch, x, y, z] must appear once")
    sizes = torch.bincount(o, minlength=offsets.shape[0]).cpu()
    return KernelMap(out_coords, in_idx, out_idx, sizes, offsets, n, m, key)


def get_kmap(tensor: SparseTensor, kernel_size, stride=1, dilation=1, transposed: bool = False,
             method: str | None = None) -> KernelMap:
    """The map of a layer applied to ``tensor``, from (or into) its cache.

    Not transposed: the map from ``tensor`` (stride ``s``) to stride ``s * t``.
    Transposed: ``tensor`` is at stride ``S``; the output is the finer tensor at
    ``S / t`` whose coords the cache holds, and the map is the transpose of
    that tensor's downsampling map (built once, shared by both).
    """
    if not isinstance(tensor, SparseTensor):
        raise TypeError(f"tensor must be a SparseTensor (its coordinate cache holds the maps); "
                        f"got {type(tensor).__name__}")
    # (before the cache is read: a map built earlier would otherwise answer for a method no build takes)
    _check_method(method, tensor.coords.device)
    # (a flag, not read by truthiness: transposed="no" built the transposed map)
    transposed = as_bool(transposed, "transposed")
    return _get_kmap(tensor, as_triple(kernel_size, "kernel_size"), as_triple(stride, "stride"),
                     as_triple(dilation, "dilation"), transposed, method)


def _get_kmap(tensor: SparseTensor, k: Triple, t: Triple, d: Triple, transposed: bool = False,
              method: str | None = None) -> KernelMap:
    """:func:`get_kmap` of normalised 3-tuples."""
    cache = tensor.cache
    coords = cache.coords_for(tensor.stride, tensor.coords)
    if not transposed:
        key = KernelMapKey(tensor.stride, k, t, d, False)
        out_stride = key.out_stride
        if out_stride != tensor.stride:
            # the output coords held there (a cached map's, or those a new map is built onto): changed in place
            # since, they labelled this conv's output without a word
            cache.check_unchanged(out_stride)

        def make():
            known = None if t == (1, 1, 1) else cache.get_coords(out_stride)
            return _build(coords, k, t, d, tensor.stride, method, out_coords=known, trusted=True)

        kmap = cache.get_kmap(key, make)
        cache.set_coords(out_stride, kmap.out_coords)
        return kmap
    if any(a % b for a, b in zip(tensor.stride, t)):
        raise ValueError(f"a transposed conv with stride {t} needs a tensor stride divisible by it; got {tensor.stride}")
    fine_stride = tuple(a // b for a, b in zip(tensor.stride, t))
    fine = cache.get_coords(fine_stride)
    if fine is None:
        raise ValueError(
            f"transposed conv: no coords at stride {fine_stride} in this tensor's coordinate cache; a transposed "
            f"conv upsamples back to coords that a strided conv came down from (keep the cache with with_feats())")
    cache.check_unchanged(fine_stride)
    down_key = KernelMapKey(fine_stride, k, t, d, False)
    up_key = KernelMapKey(fine_stride, k, t, d, True)

    def make_down():
        return _build(fine, k, t, d, fine_stride, method, out_coords=None if t == (1, 1, 1) else coords,
                      trusted=True)

    def make_up():
        down = cache.get_kmap(down_key, make_down)
        return down.transpose(fine, trusted=True)

    return cache.get_kmap(up_key, make_up)
