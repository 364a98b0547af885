"""Augmentation, per-voxel features and labels, and batching (with
:func:`pointsparse.collate`).

Voxel labels are the majority label of the voxel's points (ties: the smaller
id); points labelled ``ignore_index`` do not vote, and a voxel whose points
are all ignored is ignored. Predictions go back to the points through the
voxelize inverse (``devoxelize(..., mode="nearest")``) and are scored there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .. import coords as _coords
from ..coords import KeyLayout
from ..tensor import SparseTensor, as_bool, as_float, collate, items_of
from ..voxelize import _voxelize
from .readers import _ignore_index
from .sample import Sample

# Input channels of every voxel: x, y, z (metres, centred in x and y),
# intensity, r, g, b (0 where the source has none).
NUM_FEATURES = 7
#: augment's bounds: the scale factor within [1/10, 10] (an order of magnitude either way changes the
#: scene's units, not its look), the jitter at most 1 m (a metre of noise on every coordinate blurs any
#: scene past its geometry; the usual is 1 cm).
SCALE_RANGE = (0.1, 10.0)
MAX_JITTER = 1.0


def _check_sample(sample, where: str) -> None:
    """TypeError naming ``where`` unless ``sample`` is a :class:`Sample` (an
    array or a VoxelSample was an AttributeError from inside)."""
    if not isinstance(sample, Sample):
        raise TypeError(f"{where}'s sample must be a Sample (pointsparse.data.Sample(xyz, labels, ...)); got "
                        f"{type(sample).__name__}")


def augment(sample: Sample, rng: np.random.Generator, rotate: bool = True, scale=(0.95, 1.05), flip: bool = True,
            jitter: float = 0.01) -> Sample:
    """A random rotation about z, uniform scaling in ``scale``, a random
    mirror of x and/or y, and Gaussian jitter of ``jitter`` metres.
    ``rng`` a numpy Generator; ``rotate`` and ``flip`` bools; ``scale`` None
    or ``(low, high)`` with ``0.1 <= low <= high <= 10`` (:data:`SCALE_RANGE`);
    ``jitter`` in ``0..1`` metres (:data:`MAX_JITTER`; None or False: none).
    TypeError/ValueError naming the argument otherwise (a jitter of 1e10
    passed and failed later blaming voxel_size, a scale of 1e-30 merged the
    cloud into one voxel), and ValueError where they take the points beyond
    float32."""
    _check_sample(sample, "augment")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator; got {type(rng).__name__}")
    rotate, flip = as_bool(rotate, "rotate"), as_bool(flip, "flip")  # ("no" or 0.5 were true and turned the cloud)
    if scale is not None:
        try:
            low, high = (as_float(v, "scale") for v in scale)
        except (TypeError, ValueError):
            raise TypeError(f"scale must be None or (low, high) numbers; got {scale!r:.60}") from None
        if not (SCALE_RANGE[0] <= low <= high <= SCALE_RANGE[1]):
            raise ValueError(f"scale must be None or (low, high) with {SCALE_RANGE[0]} <= low <= high <= "
                             f"{SCALE_RANGE[1]} (a random factor of the scene's size); got {scale!r:.60}")
    jitter = 0.0 if jitter is None or jitter is False else as_float(jitter, "jitter")
    if not 0 <= jitter <= MAX_JITTER:  # (NaN fails too)
        raise ValueError(f"jitter must be a number in 0..{MAX_JITTER} (metres: the standard deviation of the noise "
                         f"added to each coordinate); got {jitter!r}")
    xyz = sample.xyz.astype(np.float64)
    m = np.eye(3)
    if rotate:
        a = rng.uniform(0, 2 * np.pi)
        c, s = np.cos(a), np.sin(a)
        m = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ m
    if flip:
        m = np.diag([rng.choice([-1.0, 1.0]), rng.choice([-1.0, 1.0]), 1.0]) @ m
    if scale is not None:
        m = m * rng.uniform(low, high)  # (the checked bounds: an iterator given was read up by the check)
    xyz = xyz @ m.T
    if jitter:
        xyz = xyz + rng.normal(0, jitter, xyz.shape)
    with np.errstate(over="ignore"):
        xyz = xyz.astype(np.float32)
    if len(xyz) and not np.isfinite(xyz).all():
        raise ValueError(f"{sample.name or 'sample'}: scale {scale!r:.60} and jitter {jitter!r} take points beyond "
                         "float32")
    out = Sample(xyz, sample.labels, sample.intensity, sample.rgb, sample.name)
    out.kept = sample.kept  # (the same rows: predictions on them still go back to the file's rows)
    return out


def point_features(sample: Sample) -> np.ndarray:
    """float32 ``(N, NUM_FEATURES)``: centred x, y (less their float32
    mean; the float64 mean where the float32 sum overflows), raw z,
    intensity, rgb."""
    _check_sample(sample, "point_features")
    n = len(sample)
    out = np.zeros((n, NUM_FEATURES), dtype=np.float32)
    if n:
        out[:, :3] = sample.xyz
        with np.errstate(over="ignore"):
            mean = sample.xyz[:, :2].mean(0)
        if not np.isfinite(mean).all():  # (finite points whose float32 sum overflows, near 1e34 m: -inf features)
            mean = sample.xyz[:, :2].mean(0, dtype=np.float64).astype(np.float32)
        # Column by column: numpy broadcasts over the (N, 7) rows one short inner loop a row.
        out[:, 0] -= mean[0:1]  # (arrays, not scalars: the dtype promotion of the broadcast)
        out[:, 1] -= mean[1:2]
    if sample.intensity is not None:
        out[:, 3:4] = sample.intensity
    if sample.rgb is not None:
        out[:, 4:7] = sample.rgb
    return out


def _int_array(value, name: str) -> np.ndarray:
    """A 1-d int64 array of integers (not bools); TypeError/ValueError naming ``name``."""
    a = np.asarray(value)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integers; got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-d; got shape {a.shape}")
    if a.dtype == np.uint64 and len(a) and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} must fit int64; got {int(a.max())}")
    return a.astype(np.int64, copy=False)


def majority_labels(inverse, labels, num_voxels: int, ignore_index: int, mixed: str = "majority"):
    """Per-voxel majority of point ``labels`` (ignored points do not vote;
    ties: the smaller id): int64 ``(num_voxels,)``, ``ignore_index`` where
    no point votes. ``inverse[i]`` in ``[0, num_voxels)`` is the voxel of
    point ``i``; labels are ``>= 0`` or ``ignore_index``. A numpy array
    where both are arrays (or lists); a torch tensor, on ``inverse``'s
    device (else ``labels``'), where either is a tensor (``voxelize``'s
    inverse: a numpy result had no ``.float()`` / ``.to()``).

    ``mixed="ignore"``: MinkowskiEngine's ``sparse_quantize(labels=...,
    ignore_label=...)`` convention instead: a voxel whose points carry more
    than one label (``ignore_index`` counted as one) is ``ignore_index``,
    one whose points agree has their label."""
    given = [v for v in (inverse, labels) if isinstance(v, torch.Tensor)]
    if not given:
        return _majority_labels(inverse, labels, num_voxels, ignore_index, mixed)
    inverse, labels = (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in (inverse, labels))
    return torch.from_numpy(_majority_labels(inverse, labels, num_voxels, ignore_index, mixed)).to(given[0].device)


def _majority_labels(inverse, labels, num_voxels: int, ignore_index: int, mixed: str) -> np.ndarray:
    """:func:`majority_labels` of numpy arrays (or lists)."""
    if mixed not in ("majority", "ignore"):
        raise ValueError(f"mixed must be 'majority' or 'ignore'; got {mixed!r:.40}")
    inverse, labels = _int_array(inverse, "inverse"), _int_array(labels, "labels")
    if len(inverse) != len(labels):
        raise ValueError(f"inverse and labels must have one entry per point; got {len(inverse)} and {len(labels)}")
    if isinstance(num_voxels, (bool, np.bool_)) or not isinstance(num_voxels, (int, np.integer)) or num_voxels < 0:
        raise ValueError(f"num_voxels must be an int >= 0; got {num_voxels!r}")
    ignore_index = _ignore_index(ignore_index)
    if len(inverse) and (int(inverse.min()) < 0 or int(inverse.max()) >= num_voxels):
        raise ValueError(f"inverse holds voxel rows outside [0, {num_voxels})")
    out = np.full(int(num_voxels), ignore_index, dtype=np.int64)
    keep = labels != ignore_index
    if mixed == "ignore" and len(inverse):
        if int(labels[keep].min(initial=0)) < 0:
            raise ValueError(f"labels must be >= 0 or ignore_index ({ignore_index}); got {int(labels[keep].min())}")
        # the voxels whose points carry one label: their first point's label; the others stay ignore_index
        order = np.lexsort((labels, inverse))
        vox, lab = inverse[order], labels[order]
        start = np.r_[True, vox[1:] != vox[:-1]]
        end = np.r_[start[1:], True]
        agree = lab[start] == lab[end]
        out[vox[start][agree]] = lab[start][agree]
        return out
    if not keep.any():
        return out
    inv, lab = inverse[keep], labels[keep]
    if lab.min() < 0:
        raise ValueError(f"labels must be >= 0 or ignore_index ({ignore_index}); got {int(lab.min())}")
    # One int64 key per (voxel, class): the class ids made dense first when
    # voxel * (largest id + 1) would leave int64 (large raw ids wrapped round
    # into other voxels' keys).
    classes = None
    width = int(lab.max()) + 1
    if width * int(num_voxels) >= 2 ** 62:
        classes, lab = np.unique(lab, return_inverse=True)
        width = len(classes)
    pairs, counts = np.unique(inv * width + lab, return_counts=True)
    vox, cls = np.divmod(pairs, width)
    # Sort by (voxel, -count, class): the first row of each voxel wins.
    order = np.lexsort((cls, -counts, vox))
    vox, cls = vox[order], cls[order]
    first = np.r_[True, vox[1:] != vox[:-1]]
    out[vox[first]] = cls[first] if classes is None else classes[cls[first]]
    return out


@dataclass
class VoxelSample:
    """One voxelised cloud: a SparseTensor (batch index 0) with its labels
    and the point -> voxel map beside it."""

    input: SparseTensor         # float32 (M, NUM_FEATURES) mean feats over each voxel's points, int32 coords
    labels: torch.Tensor        # int64 (M,) majority labels
    inverse: torch.Tensor       # int64 (N,) voxel row of each point
    point_labels: torch.Tensor  # int64 (N,)
    xyz: np.ndarray             # float32 (N, 3) positions (after augmentation)
    name: str
    # float32 (N, 3) positions in voxel units, each inside its voxel: floor(points) == coords[inverse] (exact
    # while the coords, which start at 0, stay below 2**24, as float32 holds them)
    points: torch.Tensor | None = None
    # metres per voxel (voxelize_sample's; None: made by hand): Batch.of refuses samples of different sizes
    voxel_size: float | None = None

    @property
    def coords(self) -> torch.Tensor:
        return self.input.coords

    @property
    def feats(self) -> torch.Tensor:
        return self.input.feats


def check_voxel_size(value) -> float:
    """``voxel_size`` as a positive, finite Python float (not a bool or a
    string); TypeError/ValueError naming it."""
    size = as_float(value, "voxel_size")
    if not (size > 0 and math.isfinite(size)):
        raise ValueError(f"voxel_size must be positive and finite; got {value!r}")
    return size


#: What the extent errors advise: one point far from the others (a corrupt record, an outlier) stretches a
#: cloud's extent on its own, where a larger voxel_size is no cure.
_EXTENT_ADVICE = ("use a larger voxel_size, or look for a point far from the others: a corrupt or outlier point "
                  "stretches the extent on its own")


def _first_voxels(low: np.ndarray, high: np.ndarray, voxel_size: float, name: str = "",
                  after: str = "") -> np.ndarray:
    """``floor(low / voxel_size)`` per axis (float64), the voxel the shift
    moves to 0, after checking that the cloud's voxels from there fit a
    coordinate key: ValueError naming ``voxel_size`` (before anything is
    quantised), and the cloud ``name`` where it has one (its file), where
    ``points / voxel_size`` leaves float64, a span passes int32, or the x,
    y, z spans together pass the key's bits. ``after``: words after "the
    cloud's extent" saying what moved the points (augmentation)."""
    where = f"{name}: " if name else ""
    extent = f"the cloud's extent{after}"
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        first, last = np.floor(low / voxel_size), np.floor(high / voxel_size)
    if not (np.isfinite(first).all() and np.isfinite(last).all()):
        raise ValueError(f"{where}voxel_size {voxel_size!r} is too small for the cloud's coordinates{after} (from "
                         f"{low.tolist()} to {high.tolist()} m): points / voxel_size leaves float64")
    spans = last - first
    if (spans > _coords.COORD_MAX).any():
        raise ValueError(f"{where}voxel_size {voxel_size!r} puts {extent} of {(high - low).tolist()} m (x, y, z) "
                         f"across {(spans + 1).tolist()} voxels; voxel coordinates must fit int32 ({_EXTENT_ADVICE})")
    try:
        KeyLayout.fit([0, 0, 0, 0], [0, *(int(v) for v in spans)])
    except ValueError as exc:
        raise ValueError(f"{where}voxel_size {voxel_size!r} is too small for {extent} of "
                         f"{(high - low).tolist()} m (x, y, z): its {exc}; {_EXTENT_ADVICE}") from None
    return first


def _bounds(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 (lowest, highest) of each column of non-empty ``(N, 3)`` float32 positions."""
    # (the minimum per column: the same values as numpy's reduction over the (N, 3) rows, sooner)
    low = np.array([xyz[:, a].min() for a in range(3)], dtype=np.float64)
    high = np.array([xyz[:, a].max() for a in range(3)], dtype=np.float64)
    return low, high


#: What :func:`check_voxel_extent` says moved the points of an augmented sample.
AUGMENTED = " after this run's augmentation (a random rotation about z, scaling and jitter: not the file's own)"


def check_voxel_extent(sample: Sample, voxel_size: float, after: str = "") -> None:
    """The check :func:`voxelize_sample` makes before it quantises, alone:
    a ValueError naming the sample (its ``name``, the file it was read
    from) and ``voxel_size`` where the cloud's voxels at that size do not
    fit a coordinate key (an extent too wide for the size, often one
    corrupt or outlier point far from the others). ``after``: words that
    follow "the cloud's extent" in the message (:data:`AUGMENTED` for a
    sample ``augment`` moved, whose extent is not its file's)."""
    _check_sample(sample, "check_voxel_extent")
    voxel_size = check_voxel_size(voxel_size)
    if len(sample.xyz):
        _first_voxels(*_bounds(sample.xyz), voxel_size, sample.name, after)


def voxelize_sample(sample: Sample, voxel_size: float, ignore_index: int) -> VoxelSample:
    """Quantise a sample, its voxels counted from the cloud's first (the
    coordinates of a real tile stay small): a point at ``x`` lands in voxel
    ``floor(x / voxel_size) - floor(min(x) / voxel_size)`` per axis, in
    float64 from its float32 position, exactly. ``voxel_size``: one positive
    number (metres); ``ignore_index``: an int (TypeError/ValueError naming
    either otherwise). A ``voxel_size`` so small that the cloud's voxels do
    not fit a coordinate key (int32 per axis, 63 bits for the spans
    together) is a ValueError naming it and the sample's ``name`` (its
    file), before anything is quantised (:func:`check_voxel_extent`)."""
    _check_sample(sample, "voxelize_sample")
    voxel_size, ignore_index = check_voxel_size(voxel_size), _ignore_index(ignore_index)
    xyz = torch.from_numpy(sample.xyz).double()  # (Sample keeps float32, C-contiguous)
    first, bounds = np.zeros(3), None
    if len(xyz):
        low, high = _bounds(sample.xyz)
        first = _first_voxels(low, high, voxel_size, sample.name)
        # the extent check (voxelize's) from the bounds already read: floor and the shift keep the rows' order
        bounds = [np.floor(b / voxel_size) - first + 0.5 for b in (low, high)]
    feats = torch.from_numpy(point_features(sample))
    # Each point's voxel from its own position, less the first voxel: whole numbers, voxelised as the voxels'
    # centres at size 1 in float64 (exact up to 2**52). A shift of the positions instead (x - first *
    # voxel_size, rounded to float32) put points just below a boundary one voxel on.
    scaled = xyz / voxel_size
    cells = torch.floor(scaled) - torch.from_numpy(first)
    tensor, inverse = _voxelize(cells + 0.5, feats, (1.0,) * 3, None, "mean", bounds)
    # positions in voxel units kept inside their voxels: [cell, the float32 below cell + 1] (x / voxel_size
    # just below a whole number rounds up to it in float32)
    below = cells.float()
    top = torch.nextafter(below + 1, below)
    voxel_points = torch.minimum(torch.maximum((scaled - torch.from_numpy(first)).float(), below), top)
    labels = sample.labels if sample.labels is not None else np.full(len(sample), ignore_index, dtype=np.int64)
    vox_labels = majority_labels(inverse.numpy(), labels, len(tensor), ignore_index)
    return VoxelSample(tensor, torch.from_numpy(vox_labels), inverse.long(), torch.from_numpy(labels.astype(np.int64)),
                       sample.xyz, sample.name, voxel_points, voxel_size)


def _check_parts(i: int, s: VoxelSample) -> None:
    """TypeError/ValueError naming item ``i`` where the parts of a VoxelSample
    (made by hand) disagree: labels one per voxel, inverse and point labels
    one per point, inverse rows among its voxels (they were batched as they
    were, labels no longer meeting their voxels)."""
    m, n = len(s.input), len(s.inverse) if isinstance(s.inverse, torch.Tensor) else None
    for name, rows in (("labels", m), ("inverse", n), ("point_labels", n)):
        value = getattr(s, name)
        if not isinstance(value, torch.Tensor) or value.dtype.is_floating_point or value.dtype.is_complex or \
                value.dtype == torch.bool:
            raise TypeError(f"Batch.of item {i}: {name} must be an integer tensor of ({rows},); got "
                            f"{type(value).__name__} {getattr(value, 'dtype', '')}".rstrip())
        if tuple(value.shape) != (rows,):
            raise ValueError(f"Batch.of item {i}: {name} must be an integer tensor of ({rows},) (one per "
                             f"{'voxel' if name == 'labels' else 'point'}); got shape {tuple(value.shape)}")
    if n:
        lo, hi = (int(v) for v in torch.aminmax(s.inverse))  # (one pass, read once: this runs per batch)
        if lo < 0 or hi >= m:
            raise ValueError(f"Batch.of item {i}: inverse must hold voxel rows in [0, {m}); got {lo}..{hi}")
    if s.points is not None and (not isinstance(s.points, torch.Tensor) or not s.points.dtype.is_floating_point
                                 or tuple(s.points.shape) != (n, 3)):
        raise ValueError(f"Batch.of item {i}: points must be None or a float tensor of ({n}, 3); got "
                         f"{type(s.points).__name__} of shape {tuple(getattr(s.points, 'shape', ()))}")


def _check_voxel_sizes(samples: list) -> None:
    """ValueError naming the first sample voxelised at another
    ``voxel_size`` than the first that records one (within float32's
    rounding: 0.05 given as a numpy float32 is the same grid); samples made
    by hand (None) pass."""
    first = next((i for i, s in enumerate(samples) if getattr(s, "voxel_size", None) is not None), None)
    if first is None:
        return
    size = samples[first].voxel_size
    for i, s in enumerate(samples):
        other = getattr(s, "voxel_size", None)
        if other is not None and not math.isclose(other, size, rel_tol=1e-6):
            raise ValueError(f"Batch.of: item {i} ({s.name}) was voxelised at voxel_size {other}, item {first} "
                             f"({samples[first].name}) at {size}; a batch is one grid: voxelise every sample at one "
                             "voxel_size")


@dataclass
class Batch:
    """Voxel samples batched by :func:`pointsparse.collate`, labels beside."""

    input: SparseTensor          # stride-1 voxels of every sample
    labels: torch.Tensor         # int64 (M,) voxel labels
    inverse: torch.Tensor        # int64 (N,) voxel row of every point (global rows)
    point_labels: torch.Tensor   # int64 (N,)
    point_batch: torch.Tensor    # int64 (N,) batch index of every point (that of its sample's voxels)
    xyz: list                    # per-sample positions (for renders)
    names: list
    points: torch.Tensor | None = None  # float32 (N, 3) point positions in voxel units

    @classmethod
    def of(cls, samples: Sequence[VoxelSample]) -> "Batch":
        """The samples in one batch: their tensors through
        :func:`pointsparse.collate` (each sample's batch indices after those
        of the samples before it), point maps and labels concatenated to match."""
        # (checked here: collate's errors name collate and SparseTensors, neither of them given here)
        samples = items_of(samples, VoxelSample, "Batch.of", "sample")
        for i, s in enumerate(samples):
            _check_parts(i, s)
        _check_voxel_sizes(samples)
        # Range checked; sample i (empty or not)
        # has batch index i, so its points meet its own xyz and name.
        tensor = collate([s.input for s in samples])
        inverse, row = [], 0
        for s in samples:
            inverse.append(s.inverse + row)
            row += len(s.input)
        inverse = torch.cat(inverse).long()
        bare = [i for i, s in enumerate(samples) if s.points is None]
        if bare and len(bare) < len(samples):  # (a batch of points for some samples alone meets no model)
            has = next(i for i, s in enumerate(samples) if s.points is not None)
            raise ValueError(f"Batch.of: item {bare[0]} ({samples[bare[0]].name}) has no points where item {has} "
                             f"({samples[has].name}) has (voxelize_sample gives every sample its points); "
                             "batch samples of one kind")
        points = None if bare else torch.cat([s.points for s in samples])
        # (int64 whatever integer dtype a hand-made sample's labels have: cross_entropy refuses int32 targets)
        return cls(tensor, torch.cat([s.labels for s in samples]).long(), inverse,
                   torch.cat([s.point_labels for s in samples]).long(), tensor.coords[inverse, 0].long(),
                   [s.xyz for s in samples], [s.name for s in samples], points)

    @property
    def size(self) -> int:
        return len(self.names)

    def to(self, device) -> "Batch":
        return Batch(self.input.to(device), self.labels.to(device), self.inverse.to(device),
                     self.point_labels.to(device), self.point_batch.to(device), self.xyz, self.names,
                     None if self.points is None else self.points.to(device))
