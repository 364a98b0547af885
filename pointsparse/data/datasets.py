"""Data sets of samples (generated scenes or files) and the voxelising,
augmenting torch Dataset over them.

Augmentation draws from ``numpy.random.default_rng([seed, epoch, index])``, so
an epoch is the same whether it runs straight or after ``--resume``, and
whichever process of a distributed job handles the item."""

from __future__ import annotations

import inspect
import numbers
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..tensor import _index, as_bool, as_int
from . import generated
from .readers import DEFAULT_IGNORE, LabelMap, _ignore_index, _is_semantic3d, find_clouds, load_label_map, read_cloud
from .sample import Sample
from .transforms import AUGMENTED, augment, check_voxel_extent, check_voxel_size, voxelize_sample

# Seeds of held-out generated scenes start here; training scenes use 0, 1, ...
VALIDATION_SEED = 1_000_000


def _item(index, count: int) -> int:
    """``index`` of a sequence of ``count`` items (an int, a numpy integer or
    a 0-d integer tensor) as an int in [0, count) (negative ones from the
    end); TypeError for a non-integer, IndexError out of range."""
    try:
        index = _index(index)  # (not bool; numpy's bool is no index either)
    except TypeError:
        raise TypeError(f"index must be an int; got {type(index).__name__} {index!r:.40}") from None
    if not -count <= index < count:
        raise IndexError(f"index {index} out of range for {count} samples")
    return index % count


class GeneratedScenes(Sequence[Sample]):
    """``count`` generated scenes of ``kind`` ("outdoor" or "indoor") with
    seeds ``first_seed, first_seed + 1, ...``, made on first use and kept."""

    def __init__(self, kind: str = "outdoor", count: int = 16, first_seed: int = 0, **scene_kwargs) -> None:
        if kind not in ("outdoor", "indoor"):
            raise ValueError(f"kind must be 'outdoor' or 'indoor'; got {kind!r}")
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral) or not \
                1 <= count <= sys.maxsize:  # (past sys.maxsize len() overflows)
            raise ValueError(f"count must be a positive int (at most {sys.maxsize}); got {count!r}")
        count, first_seed = int(count), as_int(first_seed, "first_seed", 0)
        # The scene arguments checked here, not at the first scene drawn
        # (deep in a training loop or a loader's worker).
        make = generated.outdoor_scene if kind == "outdoor" else generated.indoor_scene
        try:
            inspect.signature(make).bind(first_seed, **scene_kwargs)
        except TypeError as exc:
            raise TypeError(f"{kind} scenes take {list(inspect.signature(make).parameters)[1:]}: {exc}") from None
        # numpy numbers as Python's (kept in the run's arguments: JSON and
        # every later check take Python numbers)
        scene_kwargs = {k: v.item() if isinstance(v, np.generic) else v for k, v in scene_kwargs.items()}
        if kind == "outdoor":
            generated._check_scene_args(**scene_kwargs)
        elif "density" in scene_kwargs:
            generated._check_density(scene_kwargs["density"])
        self.kind, self.count, self.first_seed, self.scene_kwargs = kind, count, first_seed, scene_kwargs
        self.classes = list(generated.OUTDOOR_CLASSES if kind == "outdoor" else generated.INDOOR_CLASSES)
        self._cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Sample:
        index = _item(index, self.count)
        if index not in self._cache:
            make = generated.outdoor_scene if self.kind == "outdoor" else generated.indoor_scene
            self._cache[index] = make(self.first_seed + index, **self.scene_kwargs)
        return self._cache[index]


def _format_map(path: Path) -> str | None:
    """The label map :func:`read_cloud` reads the cloud at ``path`` through
    when given none: SemanticKITTI's for a ``.bin``, Semantic3D's for a
    Semantic3D scan, S3DIS's for other text (rows or a room folder); None (the
    raw labels) for the other formats."""
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return "semantic-kitti"
    if suffix == ".txt" and path.is_file() and _is_semantic3d(path):
        return "semantic3d"
    return "s3dis" if suffix == ".txt" or path.is_dir() else None


def _default_map(paths: list[Path]) -> str | None:
    """The one default label map of the clouds at ``paths``; a ValueError,
    naming a cloud of each, where their formats' defaults differ (one map
    for all gave every cloud the map of the first .bin or text file: an
    IGN .npz beside a SemanticKITTI scan read as ignored at every point)."""
    first = {}
    for path in paths:
        first.setdefault(_format_map(path), path)
    if len(first) < 2:
        return next(iter(first), None)
    (a, path_a), (b, path_b) = list(first.items())[:2]
    said = {m: f"label map {m!r}" if m else "no label map (raw labels)" for m in (a, b)}
    raise ValueError(f"clouds whose formats read through different label maps: {path_a} takes {said[a]} and "
                     f"{path_b} takes {said[b]}: their files hold labels of different ids (a SemanticKITTI .bin "
                     "scan's raw ids, an Open3D-ML .npy's learning ids), which one map reads right for one kind "
                     "alone; give the clouds of one data set, or one label_map (--label-map) whose raw ids every "
                     "file's labels are")


def default_label_map(specs) -> str | None:
    """The name of the label map the clouds of ``specs`` (paths, globs or
    folders) are read through when none is given: their formats' one
    default, None for raw labels (a ValueError where the formats' defaults
    differ, as :class:`CloudFiles` refuses them)."""
    return _default_map(find_clouds(specs))


class CloudFiles(Sequence[Sample]):
    """Point cloud files (paths, globs or folders; see
    :func:`~pointsparse.data.readers.find_clouds`), read on first use and kept,
    all through ``label_map``, else through their formats' one default map
    (a ValueError where the clouds' formats have different ones), whose name
    ``default_map`` keeps (:func:`default_label_map`'s; None for raw labels,
    and where ``label_map`` is given). ``keep=False`` keeps only the cloud
    read last: memory for one cloud, whatever the files, each read again
    when asked for again (``pointsparse eval`` reads its clouds so); the
    attribute ``keep`` set False later drops what was kept at the next
    read of a cloud not kept."""

    def __init__(self, specs, label_map=None, ignore_index: int = DEFAULT_IGNORE, *, keep: bool = True) -> None:
        self.keep = as_bool(keep, "keep")
        ignore_index = _ignore_index(ignore_index)  # (here, not at the first cloud read in a loader's worker)
        self.paths = find_clouds(specs)
        if not self.paths:
            raise ValueError(f"no point clouds found in {specs!r}")
        self.label_map: LabelMap | None = load_label_map(label_map) if label_map is not None else None
        self.default_map: str | None = None
        if self.label_map is None:
            self.default_map = _default_map(self.paths)
            self.label_map = load_label_map(self.default_map) if self.default_map is not None else None
        self.ignore_index = ignore_index
        self.classes = list(self.label_map.classes) if self.label_map is not None else None
        self._cache: dict[int, Sample] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        index = _item(index, len(self.paths))  # (a range took True for 1 and failed on a slice)
        if index not in self._cache:
            sample = read_cloud(self.paths[index], self.label_map, self.ignore_index)
            if not self.keep:
                self._cache.clear()
            self._cache[index] = sample
        return self._cache[index]


class VoxelDataset(torch.utils.data.Dataset):
    """Voxelised (and, for training, augmented) samples of ``source``. A
    cloud whose voxels at ``voxel_size`` do not fit a coordinate key is a
    ValueError naming it (its file) and its extent: the file's own, else,
    for training, the extent after augmentation, which the message says."""

    def __init__(self, source: Sequence[Sample], voxel_size: float, ignore_index: int = DEFAULT_IGNORE,
                 train: bool = False, seed: int = 0) -> None:
        voxel_size, ignore_index = check_voxel_size(voxel_size), _ignore_index(ignore_index)
        if not (hasattr(type(source), "__len__") and hasattr(type(source), "__getitem__")) or \
                isinstance(source, (str, bytes)):  # (an int failed at len(), in the DataLoader)
            raise TypeError(f"source must be a sequence of Samples (GeneratedScenes, CloudFiles, a list); got "
                            f"{type(source).__name__}")
        read = getattr(source, "ignore_index", None)  # (CloudFiles': the id its reader gave dropped points)
        if isinstance(read, numbers.Integral) and int(read) != ignore_index:
            # (the dropped points voted as a class of that id, or failed the first item naming neither)
            raise ValueError(f"ignore_index {ignore_index} differs from its source's ({int(read)}), the id the "
                             "source's points outside the label map carry; pass the same ignore_index to both")
        train = as_bool(train, "train")  # ("no" augmented every item)
        self.source, self.voxel_size, self.ignore_index = source, voxel_size, ignore_index
        self.train, self.seed = train, as_int(seed, "seed", 0)
        # The epoch in shared memory: a DataLoader's workers (forked, or spawned: torch's pickler shares
        # the storage) read the epoch the main process set last, persistent ones too (each kept epoch 0's
        # copy of the dataset and drew its augmentation every epoch). A plain pickle or deepcopy copies it
        # (copy.copy shares it, as it shares the source).
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch augmentation draws for (:meth:`set_epoch`)."""
        return int(self._epoch[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """The epoch to augment for, here and in every DataLoader worker
        holding this dataset (persistent ones too): an int >= 0."""
        epoch = as_int(epoch, "epoch", 0)
        if epoch > np.iinfo(np.int64).max:  # (held as int64)
            raise ValueError(f"epoch must be an int in 0..{np.iinfo(np.int64).max}; got {epoch}")
        self._epoch[0] = epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        # A negative index as its item's own: the augmentation seed takes the
        # index (numpy refused a negative one, and ds[-1] must be ds[n - 1]).
        index = _item(index, len(self))
        sample = self.source[index]
        if not isinstance(sample, Sample):  # (an AttributeError inside augment or voxelize_sample)
            raise TypeError(f"source[{index}] must be a Sample; got {type(sample).__name__}")
        if not self.train:
            return voxelize_sample(sample, self.voxel_size, self.ignore_index)
        augmented = augment(sample, np.random.default_rng([self.seed, int(self._epoch[0]), index]))
        try:
            return voxelize_sample(augmented, self.voxel_size, self.ignore_index)
        except ValueError:
            # (refused: the file's own extent named where it is the cause, as the file holds it; else the
            # augmented one, said to be that, which matches nothing in the file; else voxelize_sample's own words)
            check_voxel_extent(sample, self.voxel_size)
            check_voxel_extent(augmented, self.voxel_size, AUGMENTED)
            raise


GENERATED = ("generated", "generated-outdoor", "generated-indoor")


def is_generated(spec) -> bool:
    """Whether a data spec (a list of ``--data`` words) names the generated
    scenes: one of :data:`GENERATED` alone (a folder named
    ``generated_scans/`` is files)."""
    spec = [spec] if isinstance(spec, (str, Path)) else list(spec or ())
    return len(spec) == 1 and str(spec[0]) in GENERATED


def open_source(spec, label_map=None, ignore_index: int = DEFAULT_IGNORE, count: int = 16, first_seed: int = 0,
                **scene_kwargs) -> Sequence[Sample]:
    """``"generated"``/``"generated-outdoor"``/``"generated-indoor"`` (``count``
    scenes from ``first_seed``), or paths/globs/folders of files."""
    if isinstance(spec, (str, Path)):
        spec = [str(spec)]
    spec = list(spec)
    if is_generated(spec):
        kind = "indoor" if spec[0] == "generated-indoor" else "outdoor"
        return GeneratedScenes(kind, count, first_seed, **scene_kwargs)
    return CloudFiles(spec, label_map, ignore_index)
