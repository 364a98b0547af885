"""One layout for every data source: positions, optional intensity/colour,
per-point labels."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from dataclasses import dataclass
from dataclasses import field as _field

import numpy as np


# The documented range of each per-point feature (the readers' scaling lands in it).
_RANGES = {"intensity": (0.0, 1.5), "rgb": (0.0, 1.0)}
# How far (metres) the float32 cast may move a position given wider before a Sample warns: float32 keeps
# half a millimetre up to 16 km from the origin (a z as the readers leave it), not UTM's 6.8e6 m.
CAST_TOLERANCE = 1e-3
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_CHUNK = 1 << 13  # rows per step of that check
_SCALED = {"intensity": "scaled: 0..1, the brightest returns up to 1.5", "rgb": "scaled from 0..255 or 0..65535"}


class NonFinitePositions(ValueError):
    """A cloud's positions hold NaN or inf (the readers name the file);
    :func:`nonfinite_rows_dropped` makes a Sample drop those rows instead."""


# Set by nonfinite_rows_dropped(): Samples made inside drop the rows whose
# position is not finite instead of refusing them.
_DROP_NONFINITE = contextvars.ContextVar("pointsparse_drop_nonfinite", default=False)


@contextlib.contextmanager
def nonfinite_rows_dropped():
    """Inside, a :class:`Sample` drops the points whose position holds NaN or
    inf (their labels, intensity and colour with them) and records which
    rows it kept in ``Sample.kept``, where it refuses them otherwise (the
    readers make their Samples inside: ``predict --skip-nonfinite`` reads
    organised clouds, whose points without a return are NaN, so)."""
    token = _DROP_NONFINITE.set(True)
    try:
        yield
    finally:
        _DROP_NONFINITE.reset(token)


@dataclass
class Sample:
    """A labelled point cloud.

    Attributes:
        xyz: float32 ``(N, 3)`` positions in metres (any origin; training
            centres them). Given wider (float64, 32- or 64-bit integers),
            positions the float32 cast moves by more than 1 mm (UTM
            coordinates) give a UserWarning: subtract an origin first;
            finite ones past float32's range are a ValueError (not points
            without a return: :func:`nonfinite_rows_dropped` keeps them).
        labels: int64 ``(N,)`` training ids (``ignore_index`` for points that
            count nowhere), or None for unlabelled clouds.
        intensity: optional float32 ``(N, 1)`` return intensity scaled to
            0..1, at most 1.5 (the readers divide raw intensities by their
            99th percentile, so the brightest returns pass 1; they clip at
            1.5).
        rgb: optional float32 ``(N, 3)`` colour in 0..1.
        name: where the sample came from (file name or generator and seed).
        kept: bool ``(N_read,)``: the rows read that the sample holds, where
            it was made inside :func:`nonfinite_rows_dropped` and dropped
            some, or read by ``read_las`` from a file with points flagged
            withheld (or is :meth:`subset` of one, in order, or ``augment``'s);
            else None (every row). Given, it holds one True entry per point
            (a TypeError / ValueError naming it otherwise: pass None with
            ``dataclasses.replace(sample, xyz=other)``); given inside
            :func:`nonfinite_rows_dropped`, the rows dropped leave it too.

    Each array may be given as a torch tensor (its values are taken,
    detached, on the host).

    Non-finite positions (outside :func:`nonfinite_rows_dropped`), intensities or colours, and intensities or
    colours outside those ranges (colour in 0..255 not scaled, a negative
    intensity), are a ValueError naming the field.
    """

    xyz: np.ndarray
    labels: np.ndarray | None = None
    intensity: np.ndarray | None = None
    rgb: np.ndarray | None = None
    name: str = ""
    kept: np.ndarray | None = _field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for field in ("xyz", "labels", "intensity", "rgb", "kept"):
            setattr(self, field, _host(getattr(self, field), field, self.name))
        xyz = np.asarray(self.xyz)
        if xyz.dtype.kind == "c":
            raise TypeError(f"{self.name or 'sample'}: xyz must hold real numbers; got {xyz.dtype}")
        if xyz.dtype.kind not in "biuf":
            try:
                xyz = xyz.astype(np.float64)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{self.name or 'sample'}: xyz must hold numbers ({exc})") from None
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            raise ValueError(f"{self.name or 'sample'}: xyz must be (N, 3); got {xyz.shape}")
        with np.errstate(over="ignore"):  # (finite values past float32: refused below, naming them)
            self.xyz = np.ascontiguousarray(xyz, dtype=np.float32)
        n = len(self.xyz)
        if self.kept is not None:
            self.kept = _kept_mask(self.kept, n, self.name)
        finite = np.isfinite(self.xyz).all(1)
        if not np.can_cast(xyz.dtype, np.float32):
            self._refuse_overflow(xyz, finite)
            self._warn_cast_loss(xyz, finite)
        bad = n - int(finite.sum())
        if bad and _DROP_NONFINITE.get():
            self._drop_rows(finite)
            n = len(self.xyz)
        elif bad:
            raise NonFinitePositions(f"{self.name or 'sample'}: xyz holds NaN or inf at {bad} of {n} points")
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.shape != (n,):
                raise ValueError(f"{self.name or 'sample'}: labels must be ({n},); got {labels.shape}")
            if not np.issubdtype(labels.dtype, np.integer):
                raise TypeError(f"{self.name or 'sample'}: labels must be integers; got {labels.dtype}")
            if labels.dtype == np.uint64 and n and int(labels.max()) > np.iinfo(np.int64).max:
                # (cast as they were, they wrapped round to negative ids)
                raise ValueError(f"{self.name or 'sample'}: labels must fit int64; got {int(labels.max())}")
            self.labels = labels.astype(np.int64)
        for field, width in (("intensity", 1), ("rgb", 3)):
            value = getattr(self, field)
            if value is None:
                continue
            if np.asarray(value).dtype.kind == "c":  # (cast, the imaginary part was dropped)
                raise TypeError(f"{self.name or 'sample'}: {field} must hold real numbers; got "
                                f"{np.asarray(value).dtype}")
            try:
                value = np.asarray(value, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"{self.name or 'sample'}: {field} must hold numbers ({exc})") from None
            if value.ndim == 1:
                value = value[:, None]
            if value.shape != (n, width):
                raise ValueError(f"{self.name or 'sample'}: {field} must be ({n}, {width}); got {value.shape}")
            bad = int((~np.isfinite(value)).any(1).sum())
            if bad:
                raise ValueError(f"{self.name or 'sample'}: {field} holds NaN or inf at {bad} of {n} points")
            low, high = _RANGES[field]
            outside = ((value < low) | (value > high)).any(1)
            if outside.any():
                raise ValueError(f"{self.name or 'sample'}: {field} must lie in {low}..{high} ({_SCALED[field]}); "
                                 f"{int(outside.sum())} of {n} points do not (values {float(value.min())!r} to "
                                 f"{float(value.max())!r})")
            setattr(self, field, value)

    def _refuse_overflow(self, wide: np.ndarray, finite: np.ndarray) -> None:
        """A ValueError where positions given wider than float32 hold finite
        values past its range (the cast made them inf): they are no points
        without a return, which :func:`nonfinite_rows_dropped` drops (a z of
        1e39 was refused as NaN or inf, or dropped without a word)."""
        if finite.all():
            return
        rows = ~finite & np.isfinite(wide).all(1)
        if not rows.any():
            return
        values = wide[rows]
        first = values[np.abs(values) > _FLOAT32_MAX][0]
        raise ValueError(f"{self.name or 'sample'}: xyz holds {int(rows.sum())} of {len(wide)} points past float32's "
                         f"range (+-{_FLOAT32_MAX:.4g}; first {float(first)!r}), a Sample's positions: a corrupt "
                         "file, or positions to take relative to an origin first")

    def _warn_cast_loss(self, wide: np.ndarray, finite: np.ndarray) -> None:
        """A UserWarning where the float32 cast of positions given wider
        (float64, 32- or 64-bit integers) moved a finite point by more than
        :data:`CAST_TOLERANCE` (UTM metres: up to half a metre apart)."""
        worst = reach = 0.0
        for start in range(0, len(wide), _CHUNK):  # (in chunks: a few hundred KB, not copies of the cloud)
            rows = slice(start, start + _CHUNK)
            moved = np.abs(self.xyz[rows].astype(np.float64) - wide[rows])
            moved[~finite[rows]] = 0.0
            worst = max(worst, float(moved.max(initial=0.0)))
            size = np.abs(wide[rows].astype(np.float64, copy=False))
            size[~finite[rows]] = 0.0
            reach = max(reach, float(size.max(initial=0.0)))
        if worst > CAST_TOLERANCE:
            warnings.warn(f"{self.name or 'sample'}: xyz ({wide.dtype}, up to {reach:.3g} m) is up to {worst:.3g} m "
                          f"off in float32, a Sample's positions; subtract an origin first (e.g. xyz - "
                          f"xyz.min(0), in {wide.dtype}), as the readers do", UserWarning, stacklevel=4)

    def _drop_rows(self, keep: np.ndarray) -> None:
        """Keeps the rows ``keep`` (bool, one per row read) of the positions
        and of each per-point field of as many rows (one of another length is
        left for the shape checks to name), and records them in ``kept``."""
        n = len(keep)
        self.xyz = np.ascontiguousarray(self.xyz[keep])
        for name in ("labels", "intensity", "rgb"):
            value = getattr(self, name)
            if value is not None and np.ndim(value) >= 1 and len(value) == n:
                setattr(self, name, np.asarray(value)[keep])
        if self.kept is not None:  # (rows of the rows read: the file's rows that are left)
            narrowed = self.kept.copy()
            narrowed[np.flatnonzero(self.kept)[~keep]] = False
            keep = narrowed
        self.kept = keep

    def __eq__(self, other) -> bool:
        """The same name, positions, labels, intensity and colour (``kept``
        aside); the dataclass's own == compared the arrays as a tuple, a
        ValueError ("truth value ... ambiguous") for any two clouds."""
        if not isinstance(other, Sample):
            return NotImplemented
        same = lambda a, b: (a is None) == (b is None) and (a is None or np.array_equal(a, b))  # noqa: E731
        return self.name == other.name and all(same(getattr(self, f), getattr(other, f))
                                               for f in ("xyz", "labels", "intensity", "rgb"))

    def __len__(self) -> int:
        return len(self.xyz)

    def subset(self, mask) -> "Sample":
        """The points selected by a boolean mask (one entry per point) or a
        1-d array of point indices (negative ones from the end; a slice
        too), their labels, intensity and colour with them; TypeError/
        ValueError/IndexError naming ``mask`` otherwise (an int was "xyz must
        be (N, 3)", a mask of another length numpy's bare IndexError).

        ``kept`` (a Sample that :func:`nonfinite_rows_dropped` made) follows
        the points in file order: a boolean mask, a slice of positive step or
        increasing indices give the subset the rows read that it holds; a
        subset that reorders or repeats points holds no mask of the file's
        rows in its order, and its ``kept`` is None (as a Sample without).
        """
        mask = np.arange(len(self))[mask] if isinstance(mask, slice) else _point_mask(mask, len(self))
        pick = lambda a: None if a is None else a[mask]  # noqa: E731
        out = Sample(self.xyz[mask], pick(self.labels), pick(self.intensity), pick(self.rgb), self.name)
        if self.kept is not None and (mask.dtype == np.bool_ or bool((np.diff(mask % max(len(self), 1)) > 0).all())):
            kept = np.zeros_like(self.kept)
            kept[np.flatnonzero(self.kept)[mask]] = True
            out.kept = kept
        return out


def _host(value, field: str, name: str):
    """``value``, or a torch tensor's values on the host (detached; bfloat16,
    which numpy lacks, as float32); a meta tensor (no values) is a TypeError
    naming ``field``."""
    if not (hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "is_meta")):
        return value
    if value.is_meta:
        raise TypeError(f"{name or 'sample'}: {field} is a meta tensor (shapes without values); pass its values")
    value = value.detach().cpu()
    return value.float() if str(value.dtype) == "torch.bfloat16" else value


def _kept_mask(kept, n: int, name: str) -> np.ndarray:
    """``kept`` as a bool array of the rows read with one True entry per
    point (``n``); a TypeError / ValueError naming it otherwise."""
    a = np.asarray(kept)
    if a.dtype != np.bool_:
        raise TypeError(f"{name or 'sample'}: kept must be a boolean mask of the rows read (True: the rows the "
                        f"sample holds), or None; got {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name or 'sample'}: kept must be 1-d, one entry per row read; got shape {a.shape}")
    held = int(a.sum())
    if held != n:
        raise ValueError(f"{name or 'sample'}: kept holds {held} True entries; the sample has {n} points (one "
                         "True entry per point; dataclasses.replace with other points: pass kept=None, or the "
                         "rows they are)")
    return a


def _point_mask(mask, n: int) -> np.ndarray:
    """``mask`` (a bool mask of ``n`` or 1-d integer indices in [-n, n)) as
    a numpy array; the errors :meth:`Sample.subset` names."""
    a = np.asarray(mask.cpu() if hasattr(mask, "cpu") else mask)
    if a.size == 0 and a.ndim == 1:
        return a.astype(np.int64)  # ([] is float64)
    if a.dtype != np.bool_ and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"mask must hold bools or integers; got {a.dtype}")
    if a.ndim != 1 or (a.dtype == np.bool_ and len(a) != n):
        raise ValueError(f"mask must be a boolean mask of {n} (one per point) or a 1-d array of point indices; "
                         f"got {a.dtype} of shape {a.shape}")
    if a.dtype != np.bool_ and len(a) and (int(a.min()) < -n or int(a.max()) >= n):
        bad = int(a.min()) if int(a.min()) < -n else int(a.max())
        raise IndexError(f"mask holds point indices outside [-{n}, {n}): {bad}")
    return a
