"""Exact 64-bit coordinate keys, in C++ for CPU tensors and in torch for any
device (both give the same keys).

Keys are packed relative to a :class:`KeyLayout` fitted to the coordinates at
hand: from high to low bits the batch, then ``x - origin_x``, ``y - origin_y``,
``z - origin_z``, each field as wide as its span needs (the batch field as
wide as the largest batch index needs), 63 bits in all, so keys are >= 0 and
sorting them sorts rows by (batch, x, y, z). Any int32 coordinates work whose
batch count and x, y, z spans fit together: ``bits(max batch + 1) +
bits(x span) + bits(y span) + bits(z span) <= 63`` with ``bits(v) =
ceil(log2(v))`` and ``span = max - min + 1``; a set that does not fit is a
``ValueError`` naming its span.

Keys of two coordinate sets compare only when both are packed with one layout
(fit it to both: ``KeyLayout.of(a, b)``). Nothing caches keys: every op packs
the coords it compares with a layout fitted to all of them (a kernel map's
layout also leaves room for its offsets), so tensors of every stride that
share a :class:`~pointsparse.tensor.CoordinateCache` always meet."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ext

COORD_MIN = _ext.COORD_MIN  # int32 range: every x, y, z
COORD_MAX = _ext.COORD_MAX
BATCH_MAX = _ext.BATCH_MAX  # batch indices in [0, BATCH_MAX]
KEY_BITS = _ext.core.KEY_BITS  # the layout's fields add up to at most this


def _wrap64(v: int) -> int:
    """``v`` modulo 2**64 as a signed int64."""
    return (v + 2**63) % 2**64 - 2**63


def _ints(values, name: str, count: int) -> list[int]:
    """``values`` as ``count`` Python ints (numpy and 0-d tensor integers
    too); a bool, float or str among them is a TypeError (``int()`` made 1.5
    a 1), another count a ValueError, each naming ``name``."""
    from .tensor import as_int  # noqa: PLC0415 - the tensor layer imports this module

    try:
        out = [as_int(v, name) for v in values]
    except TypeError:
        raise TypeError(f"KeyLayout.fit: {name} must hold ints; got {values!r}") from None
    if len(out) != count:
        raise ValueError(f"KeyLayout.fit: {name} must be {count} ints; got {values!r}")
    return out


@dataclass(frozen=True)
class KeyLayout:
    """Where each field of a key sits: ``origin`` the (x, y, z) of field value
    0, ``bits`` the widths of the (batch, x, y, z) fields. Build one with
    :meth:`of` (from coords) or :meth:`fit` (from bounds)."""

    origin: tuple[int, int, int]
    bits: tuple[int, int, int, int]

    @classmethod
    def fit(cls, lo, hi, margin=(0, 0, 0)) -> "KeyLayout":
        """The layout of rows within ``[lo, hi]`` (4 ints each, [batch, x, y,
        z]; ``None``: no rows), with ``margin[a]`` spare values on both sides
        of axis ``a`` when that still fits (else none). ValueError naming the
        span when not even the rows fit."""
        if lo is None:
            return cls((0, 0, 0), (0, 0, 0, 0))
        lo, hi, margin = _ints(lo, "lo", 4), _ints(hi, "hi", 4), _ints(margin, "margin", 3)
        if lo[0] < 0:
            raise ValueError(f"batch indices must be >= 0; the smallest is {lo[0]}")
        # (as the core's fit_layout: a reversed axis made a layout of the bits of a negative span)
        if any(not COORD_MIN <= v <= COORD_MAX for v in lo + hi) or any(a > b for a, b in zip(lo, hi)):
            raise ValueError(f"KeyLayout.fit: lo and hi must be int32 bounds with lo <= hi on every field "
                             f"[batch, x, y, z]; got lo {lo}, hi {hi}")
        if any(m < 0 or m > 2**32 for m in margin):
            raise ValueError(f"key margin must lie in [0, 2^32]; got {margin}")
        layout = cls._widened(lo, hi, margin)
        if sum(layout.bits) <= KEY_BITS:
            return layout
        layout = cls._widened(lo, hi, [0, 0, 0])
        if sum(layout.bits) <= KEY_BITS:
            return layout
        spans = ", ".join(f"{name} [{lo[f] if f else 0}, {hi[f]}] ({layout.bits[f]} bits)"
                          for f, name in enumerate(("batch", "x", "y", "z")))
        raise ValueError(f"coordinates span {spans}: {sum(layout.bits)} bits in all, but a coordinate key holds "
                         f"{KEY_BITS} (the batch count and the x, y, z spans must fit together; split the batch "
                         "or shrink the extent)")

    @classmethod
    def _widened(cls, lo, hi, margin) -> "KeyLayout":
        """The layout of [lo, hi] with ``margin`` spare values per side (the
        C++ core's fit_layout, value for value)."""
        bits = [hi[0].bit_length()]
        bits += [(hi[a + 1] - lo[a + 1] + 2 * margin[a]).bit_length() for a in range(3)]
        return cls(tuple(lo[a + 1] - margin[a] for a in range(3)), tuple(bits))

    @classmethod
    def of(cls, *coords: torch.Tensor, margin=(0, 0, 0)) -> "KeyLayout":
        """The layout fitted to every row of the given (N, 4) int32 coords."""
        return cls.of_bounds(*(bounds(c) for c in coords), margin=margin)

    @classmethod
    def of_bounds(cls, *boxes, margin=(0, 0, 0)) -> "KeyLayout":
        """The layout fitted to coords of these :func:`bounds` (None: no rows)."""
        lo = hi = None
        for b in boxes:
            if b is not None:
                lo = b[0] if lo is None else [min(u, v) for u, v in zip(lo, b[0])]
                hi = b[1] if hi is None else [max(u, v) for u, v in zip(hi, b[1])]
        return cls.fit(lo, hi, margin)

    @property
    def shifts(self) -> tuple[int, int, int, int]:
        """Bit position of the (batch, x, y, z) fields."""
        z = 0
        y = self.bits[3]
        x = y + self.bits[2]
        return (x + self.bits[1], x, y, z)

    def axis_range(self, axis: int) -> tuple[int, int]:
        """``(lo, hi)`` of the coordinates field ``axis`` (0: x) holds."""
        return self.origin[axis], self.origin[axis] + (1 << self.bits[axis + 1]) - 1

    def delta(self, dx: int, dy: int, dz: int) -> int:
        """What shifting coordinates by (dx, dy, dz) adds to their key, as long
        as the shifted coordinates stay in the fields (modulo 2**64)."""
        _, sx, sy, _ = self.shifts
        return _wrap64((dx << sx) + (dy << sy) + dz)

    def contains(self, coords: torch.Tensor) -> torch.Tensor:
        """Bool ``(N,)``: which rows (int32 or int64 ``[batch, x, y, z]``) the layout holds."""
        c = coords.long()
        ok = (c[:, 0] >= 0) & (c[:, 0] < (1 << self.bits[0]))
        for a in range(3):
            lo, hi = self.axis_range(a)
            ok &= (c[:, a + 1] >= lo) & (c[:, a + 1] <= hi)
        return ok

    def core(self) -> list[int]:
        """The 7 ints the C++ core takes."""
        return [*self.origin, *self.bits]

    def __str__(self) -> str:
        axes = ", ".join(f"{n} in {list(self.axis_range(a))}" for a, n in enumerate("xyz"))
        return f"batch in [0, {(1 << self.bits[0]) - 1}], {axes}"


#: Largest |origin| of a layout's field (the core's bound: fitted layouts,
#: margins included, stay far inside it).
ORIGIN_MAX = 1 << 40


def check_layout(layout, name: str = "layout") -> None:
    """TypeError / ValueError naming ``name`` unless ``layout`` is a
    :class:`KeyLayout` the core takes: int fields, each field's bits in [0,
    62] and :data:`KEY_BITS` at most in all, origin within +-2**40 (a
    KeyLayout built by hand past them packed on the torch path into
    wrapped keys)."""
    if not isinstance(layout, KeyLayout):
        raise TypeError(f"{name} must be a KeyLayout (KeyLayout.of(coords) or KeyLayout.fit(lo, hi)); "
                        f"got {type(layout).__name__}")
    fields = (*layout.origin, *layout.bits) if isinstance(layout.origin, tuple) and isinstance(layout.bits, tuple) \
        else ()
    if len(fields) != 7 or any(type(v) is not int for v in fields):
        raise TypeError(f"{name} origin and bits must be ints (3 and 4 of them); got origin {layout.origin!r}, "
                        f"bits {layout.bits!r}")
    if any(not 0 <= b <= 62 for b in layout.bits) or sum(layout.bits) > KEY_BITS:
        raise ValueError(f"{name} bits must lie in [0, 62] and add up to at most {KEY_BITS}; got {layout.bits}")
    if any(abs(o) > ORIGIN_MAX for o in layout.origin):
        raise ValueError(f"{name} origin must lie within +-2**40; got {layout.origin}")


def check_strided(tensor: torch.Tensor, name: str) -> None:
    """TypeError naming ``name`` for a torch sparse-layout tensor (COO, CSR,
    ...): every op reads its argument as a dense array, where torch's own
    error came from deep inside ("unsupported memory format option
    Contiguous")."""
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor; got layout {tensor.layout} "
                        "(convert it with .to_dense())")


def check_has_data(tensor: torch.Tensor, name: str) -> None:
    """A dense tensor with data: a torch sparse (COO, CSR, ...) tensor is a
    TypeError (:func:`check_strided`), a meta tensor a ValueError, each
    naming ``name`` (torch's own error for meta: "Cannot copy out of meta
    tensor")."""
    check_strided(tensor, name)
    if tensor.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape only, no data); pointsparse needs real data "
                         "(for shape-only tracing use torch.compile / torch.export)")


def check_coords(coords: torch.Tensor, name: str = "coords") -> None:
    """Shape and dtype checks with messages that name the argument."""
    if not isinstance(coords, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(coords).__name__}")
    check_has_data(coords, name)
    if coords.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 [batch, x, y, z]; got dtype {coords.dtype}")
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"{name} must be (N, 4) int32 [batch, x, y, z]; got {tuple(coords.shape)}")


def check_stride_multiple(coords: torch.Tensor, stride, name: str = "coords") -> None:
    """ValueError unless x, y, z of every row are multiples of ``stride``
    (a 3-tuple): the coordinates of a tensor at that tensor stride."""
    if tuple(stride) == (1, 1, 1) or coords.shape[0] == 0:
        return
    st = torch.tensor(tuple(stride), dtype=coords.dtype, device=coords.device)
    bad = (torch.remainder(coords[:, 1:], st) != 0).any(1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} of a tensor with stride {tuple(stride)} must be multiples of the stride; "
                         f"row {row} is {coords[row].tolist()}")


def bounds(coords: torch.Tensor, name: str = "coords"):
    """``(lo, hi)``: the smallest and largest ``[batch, x, y, z]`` (lists of 4
    ints), or ``None`` without rows; ValueError naming the first row with a
    negative batch."""
    check_coords(coords, name)
    if coords.shape[0] == 0:
        return None
    if _ext.serves(coords):
        try:
            b = _ext.call(_ext.core.coords_bounds, _ext.to_numpy(coords))
        except ValueError as exc:
            raise ValueError(str(exc).replace("coords", name, 1)) from None
        return b[0].tolist(), b[1].tolist()
    return _bounds_torch(coords, name)


def _bounds_torch(coords: torch.Tensor, name: str = "coords"):
    """Same as :func:`bounds` from torch ops (any device)."""
    if coords.shape[0] == 0:
        return None
    lo, hi = torch.stack(torch.aminmax(coords, dim=0)).tolist()  # (one host read: a sync on a GPU)
    if lo[0] < 0:
        row = int((coords[:, 0] < 0).nonzero()[0, 0])
        raise ValueError(f"{name} row {row} = {coords[row].tolist()} has a negative batch index")
    return lo, hi


def pack(coords: torch.Tensor, layout: KeyLayout | None = None) -> torch.Tensor:
    """int64 keys of (N, 4) int32 coords in ``layout`` (default: the layout
    fitted to ``coords``); ValueError naming the first row outside it."""
    check_coords(coords)
    if layout is None:
        layout = KeyLayout.of(coords)
    else:
        check_layout(layout)
    if _ext.serves(coords):
        return _ext.to_tensor(_ext.call(_ext.core.pack_keys, _ext.to_numpy(coords), layout.core()))
    return pack_torch(coords, layout)


def pack_torch(coords: torch.Tensor, layout: KeyLayout | None = None, trusted: bool = False) -> torch.Tensor:
    """Same keys as :func:`pack` from torch ops (any device). ``trusted=True``:
    ``layout`` was fitted to these coords (``KeyLayout.of`` of them, maybe
    with others), so every row is inside: packed without that check (a pass
    and a host read, a sync on a GPU)."""
    if layout is None:
        layout, trusted = KeyLayout.of(coords), True
    elif not trusted:
        check_layout(layout)
    c = coords.long()
    bad = None if trusted else ~layout.contains(c)
    if bad is not None and bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"coords row {row} = {c[row].tolist()} lies outside the key layout: {layout}")
    sb, sx, sy, _ = layout.shifts
    o = layout.origin
    return (c[:, 0] << sb) | ((c[:, 1] - o[0]) << sx) | ((c[:, 2] - o[1]) << sy) | (c[:, 3] - o[2])


def check_keys(keys) -> None:
    """TypeError / ValueError naming ``keys`` unless they are a 1-D integer
    tensor (a float or bool tensor was cast to int64 silently: 2.5 and 2.7
    one key)."""
    if not isinstance(keys, torch.Tensor) or keys.is_floating_point() or keys.is_complex() \
            or keys.dtype == torch.bool:
        got = f"dtype {keys.dtype}" if isinstance(keys, torch.Tensor) else type(keys).__name__
        raise TypeError(f"keys must be a 1-D integer tensor (int64 keys, as pack makes them); got {got}")
    if keys.dim() != 1:
        raise ValueError(f"keys must be a 1-D integer tensor (int64 keys, as pack makes them); got shape "
                         f"{tuple(keys.shape)}")


def unpack(keys: torch.Tensor, layout: KeyLayout) -> torch.Tensor:
    """(N, 4) int32 coords of int64 keys of ``layout``."""
    check_keys(keys)
    check_layout(layout)
    if _ext.serves(keys):
        return _ext.to_tensor(_ext.call(_ext.core.unpack_keys, _ext.to_numpy(keys, torch.int64), layout.core()))
    return unpack_torch(keys, layout)


def unpack_torch(keys: torch.Tensor, layout: KeyLayout, trusted: bool = False) -> torch.Tensor:
    """Same as :func:`unpack` from torch ops (any device); ValueError, as
    the core's, for keys that are no keys of ``layout`` (negative, or past
    its bits) or whose coordinates pass int32. ``trusted=True``: keys
    packed in ``layout`` by the caller, unpacked without that check (a pass
    over them and a host read)."""
    if not trusted:
        check_layout(layout)
    keys = keys.long()
    sb, sx, sy, _ = layout.shifts
    fields = [keys >> sb]
    for a, s in enumerate((sx, sy, 0)):
        fields.append(((keys >> s) & ((1 << layout.bits[a + 1]) - 1)) + layout.origin[a])
    out = torch.stack(fields, dim=1)
    if trusted or not keys.numel():
        return out.to(torch.int32)
    if bool(((keys >> sum(layout.bits)) != 0).any() | (out < -2**31).any() | (out >= 2**31).any()):
        raise ValueError(f"keys must be keys of the layout ({layout}) of int32 coordinates")
    return out.to(torch.int32)


def unique(keys: torch.Tensor):
    """(unique_keys ascending, inverse, perm, seg_ptr) of int64 keys: rows
    ``perm[seg_ptr[j]:seg_ptr[j+1]]`` hold key ``j`` in their original order."""
    check_keys(keys)
    if _ext.serves(keys):
        out = _ext.call(_ext.core.unique_keys, _ext.to_numpy(keys, torch.int64))
        return tuple(_ext.to_tensor(a) for a in out)
    return unique_torch(keys)


def unique_torch(keys: torch.Tensor):
    """Same as :func:`unique` from torch ops (any device)."""
    keys = keys.long()
    sorted_keys, perm = torch.sort(keys, stable=True)
    uniq, counts = torch.unique_consecutive(sorted_keys, return_counts=True)
    seg_ptr = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=keys.device)
    seg_ptr[1:] = torch.cumsum(counts, 0)
    group = torch.repeat_interleave(torch.arange(uniq.numel(), device=keys.device), counts)
    inverse = torch.empty_like(keys)
    inverse[perm] = group
    return uniq, inverse, perm, seg_ptr


def sort(keys: torch.Tensor):
    """(sorted_keys, perm), stable."""
    check_keys(keys)
    if _ext.serves(keys):
        s, p = _ext.call(_ext.core.sort_keys, _ext.to_numpy(keys, torch.int64))
        return _ext.to_tensor(s), _ext.to_tensor(p)
    return sort_torch(keys)


def sort_torch(keys: torch.Tensor):
    """Same as :func:`sort` from torch ops (any device)."""
    return torch.sort(keys.long(), stable=True)
