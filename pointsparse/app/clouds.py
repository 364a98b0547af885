"""How the commands read point cloud files: ``--skip-nonfinite``'s hold on
the reading (train, eval, predict, prune), the label map a checkpoint's
files are read through (eval, prune), and the refusal of a run's map that
the files' format contradicts (eval, predict, prune): one rule for each."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import sys
from pathlib import Path

import numpy as np

from ..data import CloudFiles
from ..data.datasets import default_label_map
from ..data.readers import find_clouds

__all__ = ["check_format_maps", "files_label_map", "files_source", "nonfinite_hold", "raw_ids",
           "refuse_file_flags", "skips_nonfinite"]


def skips_nonfinite(flag: bool, state: dict | None = None, own_data: bool = False) -> bool:
    """Whether NaN or inf positions are left out: ``--skip-nonfinite``
    (``flag``), or, reading a run's own clouds (``own_data``: no ``--data``),
    the run's ``train --skip-nonfinite`` (its checkpoint ``state``), so that
    they are read as it read them."""
    saved = (state or {}).get("args") or {}
    return bool(flag) or (own_data and saved.get("skip_nonfinite") is True)


#: The flags only point cloud files take: what each does there, and why the
#: generated scenes have no use for it.
_FILE_FLAGS = {
    "--label-map": ("maps the raw labels of point cloud files", "labelled with their own classes"),
    "--val-label-map": ("maps the raw labels of point cloud files", "labelled with their own classes"),
    "--skip-nonfinite": ("leaves out the NaN or inf points of point cloud files", "which hold none"),
}


def refuse_file_flags(spec, given: dict, own_data: bool = False) -> None:
    """A ValueError naming the first flag of ``given`` (file-only flags of
    :data:`_FILE_FLAGS` -> whether each was given) that was given, where the
    data, ``spec`` (``--data``'s, or with ``own_data`` a run's own), are the
    generated scenes: the flag would be ignored. train, eval and prune on a
    checkpoint refuse them so."""
    flag = next((flag for flag, on in given.items() if on), None)
    if flag is not None:
        does, why = _FILE_FLAGS[flag]
        where = "the run's data" if own_data else "--data"
        raise ValueError(f"{flag} {does}; {where} ({spec[0]}) are the generated scenes, {why}, so it would be ignored: drop "
                         "it, or give --data files")


@contextlib.contextmanager
def nonfinite_hold(skip: bool, to: str):
    """Clouds read inside (and kept: the sources cache them) drop their NaN or
    inf positions where ``skip`` (``data.sample.nonfinite_rows_dropped``);
    otherwise such a cloud is a ValueError naming it and the flag:
    ``"<cloud>: xyz holds NaN or inf at ...; give --skip-nonfinite to <to>"``
    (``to``: what the command then does, "score the other points")."""
    from ..data.sample import NonFinitePositions, nonfinite_rows_dropped

    try:
        with nonfinite_rows_dropped() if skip else contextlib.nullcontext():
            yield
    except NonFinitePositions as error:  # (a ValueError of its own: --nproc's workers hand back a ValueError's)
        raise ValueError(f"{error}; give --skip-nonfinite to {to}") from error


def map_file_digest(path) -> str:
    """The sha256 of a label map file's bytes, as a run records it
    (``config["label_map_files"]``)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_run_map_file(state: dict, name, where: str, flag: str = "--label-map") -> None:
    """Where ``name`` is a label map file a run recorded (its config's
    ``label_map_files``: path -> sha256, written by ``train``): a ValueError
    naming it and the fix (``flag``) where the file is gone (load_label_map's
    "is neither a JSON file nor one of [...]" named neither the checkpoint
    nor --label-map), a warning on stderr where its bytes changed since the run
    (the clouds are read through the file as it is now: an edited map's
    raw ids were scored through without a word)."""
    files = (state.get("config") or {}).get("label_map_files")
    if not isinstance(files, dict) or not isinstance(name, str) or name not in files:
        return
    if not Path(name).is_file():
        raise ValueError(f"{where}: the run read its clouds through the label map file {name}, which is gone: give "
                         f"{flag} (that file where it is now, or a copy of it)")
    if map_file_digest(name) != files[name]:
        print(f"warning: {where}: the label map file {name} has changed since the run (its checkpoint records "
              f"other bytes): the clouds are read through the file as it is now ({flag} says which map to read "
              "them through)", file=sys.stderr)


def files_source(state: dict, spec, label_map, where: str, validation: bool, ignore_index: int, taken=None,
                 format_maps: bool = False):
    """The clouds of the data ``spec`` (files) as a checkpoint's model reads
    them (``state``), eval's and prune's: through :func:`files_label_map`'s
    map (``label_map``: ``--label-map``; ``validation``: files the user gave,
    or the run's validation files, not its training ones). Where that map is
    refused (their formats take another default than the run's map, or
    several), the clouds taken (the first ``taken``, read cyclically; all
    where None) are read through the run's map where none holds labels (an
    example input, Semantic3D test scans read as Semantic3D rows), else the
    refusal stands. ``format_maps`` (eval's and prune's ``--data``): where the
    map is the run's, taken by default (no ``label_map``: a typed one is read
    as given), and a cloud taken holds labels, :func:`check_format_maps`
    refuses files whose format reads them through another map of the run's
    classes. The spec's clouds are found once."""
    paths = find_clouds(spec)  # (once: the map's checks and the source take them)
    default = functools.cache(lambda: default_label_map(paths))  # (their formats' map, once where it is needed)
    try:
        name = files_label_map(state, paths, label_map, where, validation, default)
    except ValueError:
        if "label_map" not in state["config"]:
            raise
        check_run_map_file(state, state["config"]["label_map"], where)
        source = CloudFiles(paths, state["config"]["label_map"], ignore_index)
        if _labelled(source, taken):
            raise
        return source
    if label_map is None:
        check_run_map_file(state, name, where)
    source = CloudFiles(paths, name, ignore_index)
    if format_maps and label_map is None and name is not None and _labelled(source, taken):
        check_format_maps(paths, state["config"]["classes"], source.label_map, f"the run's label map, {name!r},", where,
                          "takes", "these files' labels", reading=True, default=default)
    return source


def _labelled(source, taken=None) -> bool:
    """Whether a cloud ``source`` gives holds labels: of its first ``taken``
    (read cyclically), all where None."""
    return any(source[i % len(source)].labels is not None for i in range(len(source) if taken is None else taken))


def files_label_map(state: dict, paths, label_map, where: str, validation: bool = True, default=None):
    """The label map a checkpoint's model reads the clouds at ``paths`` (a data
    spec's, found once: ``readers.find_clouds``) through:
    ``label_map`` (``--label-map``), else the run's ``--val-label-map``
    (``validation``: files scored as the run validated; but the map the run
    read its training clouds through for files of their format where the
    validation clouds' format takes another default, :func:`_training_format`)
    or ``--label-map``,
    else, where its config records the map the run read its clouds through
    by their formats' default (``label_map``; None: raw labels), that map; a
    ValueError naming ``where`` where the files' formats take another one by
    default (a run on SemanticKITTI .bin scans scored Open3D-ML learning ids
    as class indices, one class off). A checkpoint that records no map (an
    older run's): None, the files' own default, as before. Their formats'
    default is taken once, where it is needed (``default``: a caller's
    cached ``default_label_map`` of ``paths``)."""
    saved, config = state.get("args") or {}, state["config"]
    paths = list(paths)
    default = default or functools.cache(lambda: default_label_map(paths))
    if label_map is None and validation and saved.get("val_label_map") and _training_format(state, paths, default):
        return config["label_map"]
    given = label_map or (validation and saved.get("val_label_map")) or saved.get("label_map")
    if given or "label_map" not in config:
        return given or None
    run = config["label_map"]
    if default() != run:
        def said(name) -> str:
            return "no label map (raw labels)" if name is None else f"the label map {name!r}"

        raise ValueError(f"{where}: its clouds take {said(default())} by default ({paths[0]}); the run "
                         f"read its clouds through {said(run)}, to its {len(config['classes'])} classes: give "
                         "--label-map of these files' labels to the run's classes")
    return run


def check_format_maps(paths, classes: list[str], label_map, origin: str, where: str, verb: str, what: str,
                      text_map: str | None = None, reading: bool = False, default=None) -> None:
    """``ValueError`` where a cloud's format (of those at ``paths``) reads its
    labels through a map of the model's ``classes`` (its default:
    SemanticKITTI's for a ``.bin``, Semantic3D's for a Semantic3D scan, or a
    ``.txt`` where ``text_map`` names it so, S3DIS's for other text) that
    gives a class another raw id than ``label_map``, the run's map taken by
    default (``origin`` says which): a run on Open3D-ML learning ids given
    SemanticKITTI ``.bin`` scans, whose labels are raw ids (car 10, not 1).
    predict refuses to write such ids, eval to score the scans' labels
    through such a map (``reading``: maps that read every raw id alike pass).
    The message, ``"<where>: <path> is read through the label map ... whose
    raw id for car is 10; <origin> <verb> 1: give --label-map of <what>
    (--label-map <the format's> for these clouds)"``, names both maps.
    ``default``: a cached ``default_label_map`` of all ``paths`` (one format's
    map for all, else each cloud's is taken)."""
    from ..data.readers import load_label_map

    seen: dict[str | None, object] = {}
    try:
        if default is not None and not text_map:
            seen[default()] = paths[0]
    except ValueError:  # (formats of several defaults: each cloud's own below)
        pass
    for path in paths if not seen else ():  # (a .txt is read as Semantic3D's where text_map says so)
        seen.setdefault(text_map if text_map and os.fspath(path).lower().endswith(".txt") else
                        default_label_map([path]), path)
    ids = None
    for name, path in seen.items():
        if name is None:
            continue
        own = load_label_map(name)
        if own == label_map or list(own.classes) != list(classes) or \
                (reading and (own.mapping, own.names) == (label_map.mapping, label_map.names)):
            continue
        try:
            ids = raw_ids(label_map, classes) if ids is None else ids
        except ValueError:
            if not reading:
                raise
            return  # (a class the run's map gives no raw id, or an id past 16 bits: no class to name; read as given)
        theirs = raw_ids(own, classes)
        if (theirs != ids).any():
            k = int((theirs != ids).nonzero()[0][0])
            raise ValueError(f"{where}: {path} is read through the label map {name!r} (its format's), whose raw id "
                             f"for {classes[k]} is {int(theirs[k])}; {origin} {verb} {int(ids[k])}: give "
                             f"--label-map of {what} (--label-map {name} for these clouds)")


def raw_ids(label_map, classes: list[str]) -> np.ndarray:
    """uint32 ``(len(classes),)``: for each class, the raw id the map's
    ``inverse`` lists for it, else the smallest raw id that ``label_map`` (a
    :class:`~pointsparse.data.readers.LabelMap`) sends to it;
    ``ValueError`` where the map's classes are not ``classes`` or a class has
    no raw id."""
    if list(label_map.classes) != list(classes):
        raise ValueError(f"label map {label_map.name!r} has the classes {label_map.classes}; the model predicts "
                         f"{classes}")
    best: dict[int, int] = {}
    for raw, tid in label_map.mapping.items():
        if raw >= 0 and (tid not in best or raw < best[tid]):
            best[tid] = raw
    best.update(label_map.inverse)
    missing = [classes[i] for i in range(len(classes)) if i not in best]
    if missing:
        raise ValueError(f"label map {label_map.name!r} gives no raw id for {', '.join(missing)}")
    if max(best.values()) > 0xFFFF:
        raise ValueError(f"label map {label_map.name!r}: raw ids above 65535 do not fit SemanticKITTI's 16 bits")
    return np.array([best[i] for i in range(len(classes))], dtype=np.uint32)


def _training_format(state: dict, paths: list, default) -> bool:
    """Whether the clouds at ``paths`` (``default()``: their formats' default
    map) are of the run's training clouds' format
    and not of its validation clouds' (a run on SemanticKITTI .bin scans
    validated on Open3D-ML learning ids through --val-label-map): their
    default map is the one the run recorded reading its clouds through, the
    validation clouds' default another."""
    run = state["config"].get("label_map", False)
    val = state.get("val_paths") or (state.get("args") or {}).get("val_data")
    if run is False or not val:
        return False
    try:  # (the validation files themselves: not their format's, by definition; not searched twice)
        val = find_clouds(val)
        if [os.path.abspath(p) for p in paths] == [os.path.abspath(p) for p in val]:
            return False
        return default() == run != default_label_map(val)
    except (ValueError, OSError):  # (files of mixed formats, or validation files gone: the documented order)
        return False


def warn_coarse_positions(sample, voxel_size: float) -> bool:
    """A warning on stderr, naming the cloud (its file), where its float32
    positions lie so far from the origin that float32's step there is
    coarser than ``voxel_size``: their points fall on a grid of that step,
    several voxels apart, and merge (absolute UTM coordinates stored as
    float32: 0.5 m apart at 6.8e6 m, against 0.1 m voxels). Positions given
    wider get ``Sample``'s warning and the readers' shift; float32 ones
    come as stored, what they lost already lost. Returns whether it warned."""
    if not len(sample.xyz):
        return False
    reach = float(np.abs(sample.xyz).max())
    step = float(np.spacing(np.float32(reach)))
    if step <= voxel_size:
        return False
    print(f"warning: {sample.name or 'a cloud'}: its float32 positions reach {reach:.4g} m from the origin, where "
          f"float32's step is {step:g} m, coarser than the voxel size {voxel_size:g} m: its points lie on a grid of "
          f"{step:g} m and their voxels merge; store positions relative to an origin (e.g. xyz - xyz.min(0), "
          "taken in float64 before the float32 cast)", file=sys.stderr)
    return True


#: The optional point features a cloud may hold (:func:`pointsparse.data.transforms.point_features`: 0 where a
#: cloud holds none).
OPTIONAL_FEATURES = ("intensity", "rgb")


def held_features(samples) -> list[str]:
    """The optional features (:data:`OPTIONAL_FEATURES`) that any of
    ``samples`` holds: what a run's training clouds gave its model, which
    train records in the checkpoint's config (``point_features``)."""
    return [f for f in OPTIONAL_FEATURES if any(getattr(s, f) is not None for s in samples)]


class TrainedFeatures:
    """The optional features a model was trained with (the config's
    ``point_features``) against those of the clouds it is given. A cloud
    lacking one has it 0, as for a model trained without it, and its
    predictions may be the worse (an xyz-only ``.npy`` given to a model
    trained on intensity ran without a word). A cloud holding one the
    training clouds lacked has it set to 0 by :meth:`fitted`, as the model
    saw it in training (colour fed to a model that never saw any ran without
    a word). :meth:`note` prints a line on stderr for each. A config that
    records none (an older checkpoint's): nothing noted, nothing changed."""

    def __init__(self, config: dict) -> None:
        recorded = config.get("point_features")
        self.trained = [f for f in recorded or () if f in OPTIONAL_FEATURES]
        self.untrained = [f for f in OPTIONAL_FEATURES if f not in self.trained] if recorded is not None else []
        self.lacking: dict[str, list[str]] = {}
        self.unseen: dict[str, list[str]] = {}

    def check(self, sample) -> None:
        for feature in self.trained:
            if getattr(sample, feature) is None:
                self.lacking.setdefault(feature, []).append(str(sample.name))
        for feature in self.untrained:
            if getattr(sample, feature) is not None:
                self.unseen.setdefault(feature, []).append(str(sample.name))

    def fitted(self, sample):
        """``sample`` as the model takes it: a shallow copy without the
        features its training clouds lacked (0, as in training), else itself."""
        drop = [f for f in self.untrained if getattr(sample, f) is not None]
        if not drop:
            return sample
        fitted = copy.copy(sample)  # (the arrays shared: a reader's cached cloud keeps its own)
        for feature in drop:
            setattr(fitted, feature, None)
        return fitted

    def fit_all(self, samples) -> list:
        """``samples`` checked, noted (:meth:`note`) and each
        :meth:`fitted`, as the model takes them."""
        samples = list(samples)
        for sample in samples:
            self.check(sample)
        self.note(len(samples))
        return [self.fitted(sample) for sample in samples]

    def note(self, total: int) -> None:
        for feature, names in self.lacking.items():
            print(f"note: {len(names)} of the {total} clouds hold no {feature} ({_shown(names)}), which the model's "
                  f"training clouds held: it is 0 for their points, and their predictions may be the worse",
                  file=sys.stderr)
        for feature, names in self.unseen.items():
            print(f"note: {len(names)} of the {total} clouds hold {feature} ({_shown(names)}), which the model's "
                  f"training clouds did not: it is set to 0 for their points, as the model saw it in training",
                  file=sys.stderr)


class FittedClouds:
    """``source`` (a sequence of samples) as a model trained with
    ``features`` takes it: each sample through :meth:`TrainedFeatures.fitted`
    as it is asked for (a run's validation clouds holding a feature its
    training clouds lacked: 0, as eval then scores them)."""

    def __init__(self, source, features: TrainedFeatures) -> None:
        self.source, self.features = source, features

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        return self.features.fitted(self.source[index])


def _shown(names: list[str]) -> str:
    """The first two of ``names``, and how many more."""
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
