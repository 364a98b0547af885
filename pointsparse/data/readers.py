"""Readers from the usual on-disk formats into :class:`Sample`.

Every reader returns float32 positions, optional intensity (0..1, the
brightest returns up to 1.5) and colour (0..1), and int64 training labels:
raw class ids pass through a :class:`LabelMap`, and ids the map does not
name become ``ignore_index``. Positions stored wider than float32 holds
(float64 or 32/64-bit integer arrays, text, ASCII or double PLY/PCD) come
as stored where float32 holds their x and y within 0.1 mm (up to about
1 km), else with x and y relative to their minimum, subtracted in float64
before the float32 cast (UTM coordinates keep their millimetres), z as
stored; LAS
tiles relative to their minimum on every axis (z an elevation); float32
ones come as stored.

=================  ==========================================================
format             reader
=================  ==========================================================
SemanticKITTI      :func:`read_semantickitti` (``velodyne/*.bin`` float32
                   x, y, z, intensity; ``labels/*.label`` uint32, lower 16
                   bits the semantic id)
numpy              :func:`read_numpy` (``.npz`` with ``xyz``/``points``,
                   optional ``origin``, ``intensity``, ``rgb``, and
                   ``classification``/``labels``; ``.npy`` (N, 3+) with the
                   labels in a sibling file, ``points`` -> ``labels``)
LAS/LAZ            :func:`read_las` (laspy, optional extra)
PLY/PCD            :func:`read_open3d` (open3d, optional extra; labels from
                   a ``labels``/``label``/``class``/``classification``
                   attribute, CloudCompare's ``scalar_Classification`` or
                   KITTI-360's ``semantic``)
S3DIS text         :func:`read_text` (rows ``x y z [r g b] [label]``, or a
                   room's ``Annotations/<class>_<n>.txt`` files)
Semantic3D         :func:`read_semantic3d` (``<name>.txt`` rows ``x y z
                   intensity r g b``, labels in ``<name>.labels``)
=================  ==========================================================
"""

from __future__ import annotations

import collections
import functools
import glob
import inspect
import itertools
import json
import numbers
import os
import re
import tokenize
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._ext import MissingExtra, brief
from .sample import NonFinitePositions, Sample

DEFAULT_IGNORE = 255
_INT64_MIN, _INT64_MAX = -2**63, 2**63 - 1
# An installed wheel carries the label maps in pointsparse/label_maps/; a
# source checkout reads them from datasets/.
_PACKAGED_LABEL_MAPS = Path(__file__).resolve().parents[1] / "label_maps"
LABEL_MAP_DIR = _PACKAGED_LABEL_MAPS if _PACKAGED_LABEL_MAPS.is_dir() else Path(__file__).resolve().parents[2] / "datasets"


@dataclass
class LabelMap:
    """Raw class ids (or S3DIS class names) to training ids.

    Attributes:
        classes: training class names; training id ``i`` is ``classes[i]``.
        mapping: raw id -> training id; unlisted raw ids are ignored.
        names: optional class name -> training id (S3DIS annotation files).
        name: a human-readable name.
        inverse: optional training id -> the raw id written for it (``predict
            --format label``; SemanticKITTI's ``learning_map_inv``), each one
            a raw id ``mapping`` sends to that class; a class not listed is
            written as the smallest raw id sent to it.
    """

    classes: list[str]
    mapping: dict[int, int]
    names: dict[str, int] = field(default_factory=dict)
    name: str = ""
    inverse: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"label map {self.name!r}"
        if not isinstance(self.classes, (list, tuple)) or not all(isinstance(c, str) for c in self.classes):
            raise TypeError(f"{where}: classes must be a list of class names (str)")
        self.classes = list(self.classes)
        seen: dict[str, int] = {}
        for i, c in enumerate(self.classes):  # (inverse, train --init and the tables go by class name)
            if c in seen:
                raise ValueError(f"{where}: classes name {c!r} twice (training ids {seen[c]} and {i})")
            seen[c] = i
        whole = lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool)  # noqa: E731
        for field_name, key_ok, key_kind in (("mapping", whole, "int raw ids"),
                                             ("names", lambda k: isinstance(k, str), "str class names")):
            table = getattr(self, field_name)
            if not isinstance(table, dict):
                raise TypeError(f"{where}: {field_name} must be a dict; got {type(table).__name__}")
            for key, tid in table.items():
                if not key_ok(key):
                    raise TypeError(f"{where}: {field_name} keys must be {key_kind}; got {key!r}")
                if not whole(tid):
                    raise TypeError(f"{where}: {field_name}[{key!r}] must be an int training id; got {tid!r}")
                if field_name == "mapping" and not _INT64_MIN <= key <= _INT64_MAX:
                    raise ValueError(f"{where}: raw id {key} does not fit int64")
                if not 0 <= tid < len(self.classes):
                    raise ValueError(f"{where}: {'raw id' if field_name == 'mapping' else 'class name'} {key!r} "
                                     f"maps to {tid}, outside the {len(self.classes)} classes (to ignore it, leave "
                                     "it out of the map: what the map does not list is ignored)")
            setattr(self, field_name, {(int(k) if field_name == "mapping" else k): int(v) for k, v in table.items()})
        if not isinstance(self.inverse, dict):
            raise TypeError(f"{where}: inverse must be a dict; got {type(self.inverse).__name__}")
        for tid, raw in self.inverse.items():
            if not whole(tid) or not whole(raw):
                raise TypeError(f"{where}: inverse must map int training ids to int raw ids; got {tid!r}: {raw!r}")
            if not 0 <= tid < len(self.classes):
                raise ValueError(f"{where}: inverse lists training id {tid}, outside the {len(self.classes)} classes")
            if self.mapping.get(int(raw)) != tid:
                sent = self.mapping.get(int(raw))
                to = "no class" if sent is None else repr(self.classes[sent])
                raise ValueError(f"{where}: inverse writes raw id {raw} for class {self.classes[tid]!r}, which the map "
                                 f"sends to {to}")
        self.inverse = {int(k): int(v) for k, v in self.inverse.items()}

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def apply(self, raw: np.ndarray, ignore_index: int = DEFAULT_IGNORE) -> np.ndarray:
        """int64 training ids of integer raw ids (unlisted -> ``ignore_index``,
        an int: TypeError/ValueError naming it otherwise, as the readers
        check it; 1.5 was cast to 1, a class)."""
        ignore_index = _ignore_index(ignore_index)
        raw = np.asarray(raw)
        if not np.issubdtype(raw.dtype, np.integer):
            raise TypeError(f"raw labels must be integers; got {raw.dtype}")
        if raw.dtype == np.uint64 and raw.size and int(raw.max()) > _INT64_MAX:
            raise ValueError(f"raw labels must fit int64; got {int(raw.max())}")
        raw = raw.astype(np.int64).reshape(-1)
        if raw.size == 0:
            return raw
        # A sorted look-up of the listed ids: no table sized by the largest
        # raw id (one label of 1e12 once asked for a 7 TiB table).
        keys = np.array(sorted(self.mapping), dtype=np.int64)
        values = np.array([self.mapping[k] for k in keys.tolist()], dtype=np.int64)
        out = np.full(raw.shape, ignore_index, dtype=np.int64)
        if keys.size:
            pos = np.minimum(np.searchsorted(keys, raw), keys.size - 1)
            ok = keys[pos] == raw
            out[ok] = values[pos[ok]]
        return out

    @classmethod
    def identity(cls, classes) -> "LabelMap":
        classes = list(classes)
        return cls(classes, {i: i for i in range(len(classes))}, name="identity")


def load_label_map(name_or_path) -> LabelMap:
    """A label map from a JSON file, or by name from the project's
    ``datasets/`` folder (``semantic-kitti``, ``semantic-kitti-learning``,
    ``ign-lidarhd``, ``ahn3``, ``s3dis``, ``semantic3d``). JSON: ``{"classes": [...], "map": {"raw":
    train_id}, "names": {...}, "inverse": {"class name": raw}}`` (``names``
    and ``inverse`` optional: :class:`LabelMap`); a key named twice in one
    object is a ValueError naming the file and the key (json would keep the
    last)."""
    if isinstance(name_or_path, LabelMap):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"label_map must be a LabelMap, a JSON file path or a map's name (str); got "
                        f"{type(name_or_path).__name__}")
    path = Path(name_or_path)
    if not path.is_file():
        candidate = LABEL_MAP_DIR / f"{name_or_path}.json"
        if not candidate.is_file():
            known = sorted(p.stem for p in LABEL_MAP_DIR.glob("*.json")) if LABEL_MAP_DIR.is_dir() else []
            raise ValueError(f"label map {name_or_path!r} is neither a JSON file nor one of {known}")
        path = candidate
    try:
        # (JSON is UTF-8, a byte-order mark first where a Windows editor saved it: not the locale's encoding)
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_keys(path))
    except _DuplicateKey:
        raise
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:  # (JSONDecodeError, an int of
        # more digits than Python converts, ...)
        raise ValueError(f"{path}: not a label map (not readable JSON: {exc})") from None
    if not isinstance(data, dict) or "classes" not in data or "map" not in data:
        raise ValueError(f"{path}: not a label map (needs 'classes' and 'map')")
    classes = data["classes"]
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"{path}: 'classes' must be a list of class names (strings); got {classes!r:.200}")
    mapping = _id_table(data["map"], path, "map", raw_ids=True)
    names = _id_table(data.get("names", {}), path, "names", raw_ids=False)
    name = data.get("name", path.stem)
    if not isinstance(name, str):
        raise ValueError(f"{path}: 'name' must be a string; got {name!r:.200}")
    inverse = {}
    for cls, raw in _id_table(data.get("inverse", {}), path, "inverse", raw_ids=False, values="raw id").items():
        if cls not in classes:
            raise ValueError(f"{path}: 'inverse' names {cls!r}, which is not one of the classes")
        inverse[classes.index(cls)] = raw
    try:
        return LabelMap(classes, mapping, names, name, inverse)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


class _DuplicateKey(ValueError):
    """A JSON object naming one key twice (raised from inside json.loads)."""


def _unique_keys(path):
    """A ``json.loads`` ``object_pairs_hook`` refusing a key that one object
    names twice (json keeps the last silently: a label map's ``"map"`` given
    twice, or one raw id listed twice, lost the first): ValueError naming
    ``path`` and the key."""
    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise _DuplicateKey(f"{path}: the key {key!r:.100} appears twice in one JSON object (a JSON reader "
                                    "keeps only the last)")
            out[key] = value
        return out
    return hook


def _id_table(table, path: Path, field_name: str, raw_ids: bool, values: str = "training id") -> dict:
    """A label map's ``map`` (raw id -> training id; the ids written as
    decimal strings, JSON's only keys) or ``names`` (class name -> training
    id): ValueError naming the file and the field for anything else (a list,
    a float, bool or out-of-range id), never a silent ``int()``."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: {field_name!r} must be an object of {'raw id' if raw_ids else 'name'} -> "
                         f"{values}; got {type(table).__name__}")
    out: dict = {}
    for key, tid in table.items():
        if raw_ids:
            if not re.fullmatch(r"\s*-?[0-9]{1,40}\s*", key):
                raise ValueError(f"{path}: {field_name!r} key {key!r:.100} is not a whole number (a raw class id)")
            key = int(key)
            if not _INT64_MIN <= key <= _INT64_MAX:
                raise ValueError(f"{path}: {field_name!r} raw id {key} does not fit int64")
        if key in out:
            raise ValueError(f"{path}: {field_name!r} lists {key!r} twice")
        if not isinstance(tid, int) or isinstance(tid, bool):
            raise ValueError(f"{path}: {field_name!r}[{key!r}] must be an integer {values}; got {tid!r:.100}")
        out[key] = tid
    return out


def _finite(values: np.ndarray) -> np.ndarray:
    """The finite entries of ``values`` (all of an integer array), flat."""
    return values[np.isfinite(values)] if values.dtype.kind == "f" else values.reshape(-1)


def _finite_range(values: np.ndarray):
    """The least and the greatest finite entry of ``values`` (numpy
    scalars of its dtype), None where it has none; :func:`_finite`'s
    ``min()`` and ``max()`` without its copy of the values."""
    if values.dtype.kind != "f":
        return (values.min(), values.max()) if values.size else None
    ok = np.isfinite(values)
    if not ok.any():
        return None
    return np.min(values, where=ok, initial=np.inf), np.max(values, where=ok, initial=-np.inf)


def _scale_intensity(values, where: str) -> np.ndarray:
    """Float intensities kept as they are when already in 0..1; integer (or
    larger) ones divided by their 99th percentile and clipped to 0..1.5.
    A negative value, of any type, is a ValueError naming ``where`` (the
    file and field): return strength is 0 or more in every format read
    here (LAS stores it unsigned; a PLY/PCD/numpy field may be declared
    signed, but clipping its negative half to 0 lost it silently). Signed
    reflectance (some scanners' -2048..2047) must be shifted to 0 and up
    first. The range and the scale are the finite values'; NaN and inf are
    returned as read, for Sample to count and refuse, or to drop with
    their point where its position is not finite (an organised cloud's
    point without a return, NaN in every field)."""
    raw = np.asarray(values)
    finite = _finite(raw)
    if finite.size and finite.min() < 0:
        neg = int((finite < 0).sum())
        raise ValueError(f"{where}: intensity must be 0 or more; {neg} of {raw.size} values are negative (from "
                         f"{finite.min().item()!r}; shift signed reflectance to 0 and up first)")
    v = raw.astype(np.float32).reshape(-1, 1)
    # (scaled by a NaN maximum or percentile, every value was NaN; left unscaled, a 0..255 float intensity
    # with NaN at its points without a return was refused as outside 0..1.5)
    top = _finite(v)
    if top.size == 0 or (np.issubdtype(raw.dtype, np.floating) and float(top.max()) <= 1.0):
        return v
    scale = float(np.percentile(top, 99)) or float(top.max()) or 1.0
    ok = np.isfinite(v)
    return np.where(ok, np.clip(np.where(ok, v, 0) / scale, 0, 1.5), v).astype(np.float32)


def _scale_rgb(values, where: str, top: float | None = None) -> np.ndarray | None:
    """Colour scaled to 0..1, once: divided by ``top`` where given, else by
    1 (floats already in 0..1), 255 (8-bit) or 65535 (16-bit) as the finite
    values show (NaN and inf divided as they are, for Sample to refuse or to
    drop with their point: an organised cloud's point without a return,
    NaN in every field, chose 65535 for a 0..1 colour, every point black).
    Negative values or values above 65535 are a ValueError naming
    ``where``; all-zero colour is none (None)."""
    v = np.asarray(values)
    span = _finite_range(v)
    if span is not None and (span[0] < 0 or span[1] > 65535):
        raise ValueError(f"{where}: colour values must be in 0..255 (8-bit), 0..65535 (16-bit) or 0..1; got "
                         f"{span[0]!r} to {span[1]!r}")
    if v.size == 0 or not v.any():
        return None  # absent colour (some tiles carry all-zero rgb)
    if top is None:
        high = span[1] if span is not None else 0
        top = 1.0 if np.issubdtype(v.dtype, np.floating) and high <= 1.0 else (255.0 if high <= 255 else 65535.0)
    out = v.astype(np.float32)
    out /= np.float32(top)
    return out.reshape(-1, 3)


def _integral(raw, where: str, placed: np.ndarray | None = None) -> np.ndarray:
    """Floating labels as int64 when every value is a whole number (files
    often store class ids as floats); ValueError naming ``where`` (the file
    and key) otherwise, never a silent truncation. ``placed``: where given
    (one bool a label), the points whose position is finite; the others are
    no points (an organised cloud's point without a return, NaN in every
    field, a float label too), left for Sample to refuse or drop with their
    point: their labels are not checked (0 stands in)."""
    raw = _real(raw, where, "labels").reshape(-1)
    if raw.dtype == np.uint64 and raw.size and int(raw.max()) > _INT64_MAX:
        raise ValueError(f"{where}: labels must fit int64; got {int(raw.max())}")
    if not np.issubdtype(raw.dtype, np.floating):
        return raw
    if placed is not None and placed.shape == raw.shape and not placed.all():
        raw = np.where(placed, raw, 0)
    whole = np.isfinite(raw) & (np.floor(raw) == raw) & (np.abs(raw) < 2.0 ** 63)
    if not whole.all():
        bad = raw[~whole]
        raise ValueError(f"{where}: labels must be whole numbers; {bad.size} of {raw.size} are not "
                         f"(first {float(bad[0])!r})")
    return raw.astype(np.int64)


def _placed(xyz) -> np.ndarray | None:
    """The rows of stored positions ``xyz`` (their first 3 columns) that are
    finite, None where every row is (or none is given)."""
    if xyz is None or np.asarray(xyz).dtype.kind != "f":
        return None
    placed = np.isfinite(xyz[:, :3]).all(1)
    return None if placed.all() else placed


def _real(values, where: str, what: str, shapes=None) -> np.ndarray:
    """``values`` as an array of integers or floats (bool, complex, datetime,
    strings and records refused, not cast) of one of ``shapes`` (None in a
    shape: any size); ValueError naming ``where`` otherwise."""
    values = np.asarray(values)
    if values.dtype.kind not in "iuf":
        raise ValueError(f"{where}: {what} must be integers or floats; got {values.dtype}")
    if shapes is not None and not any(len(shape) == values.ndim and all(s is None or s == d for s, d in
                                                                          zip(shape, values.shape))
                                      for shape in shapes):
        raise ValueError(f"{where}: {what} must be of shape {' or '.join(map(str, shapes))}; got {values.shape}")
    return values


def _labels(raw, label_map: LabelMap | None, ignore_index: int, where: str = "labels", xyz=None):
    """Training ids of raw labels: through ``label_map``, or as they are
    without one, where a negative label other than ``ignore_index`` is a
    ValueError naming ``where``. ``xyz``: the stored positions, whose rows
    that are not finite hold no label (:func:`_integral`'s ``placed``)."""
    if raw is None:
        return None
    raw = _integral(raw, where, _placed(xyz))
    if label_map is None:
        raw = raw.astype(np.int64)
        bad = (raw < 0) & (raw != ignore_index)
        if bad.any():
            raise ValueError(f"{where}: label {int(raw[np.argmax(bad)])} is negative (training ids are 0 and up, "
                             f"or the ignore index {ignore_index}; pass a label map or ignore_index)")
        return raw
    return label_map.apply(raw, ignore_index)


def _names_the_file(reader):
    """Readers fail with a ValueError that names the file: whatever numpy,
    zipfile, laspy or Open3D raise on a corrupt, truncated or unreadable file
    (an ImportError for a missing optional package passes unchanged). A path
    that is not there is a FileNotFoundError naming it; a path of another type
    a TypeError; so is a labels file named beside it (``label_path``,
    ``labels_path``; not looked for with ``labels=False``), its message
    naming the argument and the cloud. The arguments pass through as given
    (the path is the reader's first parameter, by position or by its name,
    e.g. ``scan_path=``). ``ignore_index`` and ``withheld`` are checked
    here (TypeError/ValueError naming them), and the
    ``label_map`` argument is loaded first, outside the wrapping, so its
    errors name the label map's file, not the cloud's."""
    signature = inspect.signature(reader)
    first = next(iter(signature.parameters))

    @functools.wraps(reader)
    def read(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        path = bound.arguments[first]
        _check_path(path)
        for argument in ("label_path", "labels_path"):  # (a labels file named beside the cloud)
            given = bound.arguments.get(argument)
            if given is None:
                continue
            if not isinstance(given, (str, os.PathLike)):  # (an int was opened as a file descriptor)
                raise TypeError(f"{argument} must be a file path (str or Path); got {type(given).__name__}")
            if bound.arguments.get("labels", True) and not os.path.isfile(given):
                if os.path.isdir(given):
                    raise ValueError(f"{given}: a folder, not a labels file ({argument} of {path})")
                raise FileNotFoundError(f"{given}: no such file ({argument} of {path})")
        if "ignore_index" in bound.arguments:
            bound.arguments["ignore_index"] = _ignore_index(bound.arguments["ignore_index"])
        if not isinstance(bound.arguments.get("withheld", False), (bool, np.bool_)):  # (read_las's; "no" was true)
            raise TypeError(f"withheld must be a bool (True: read the points flagged withheld too); got "
                            f"{bound.arguments['withheld']!r}")
        if bound.arguments.get("label_map") is not None:
            bound.arguments["label_map"] = load_label_map(bound.arguments["label_map"])
        try:
            return reader(*bound.args, **bound.kwargs)
        except ImportError:
            raise
        except ValueError as exc:
            if str(path) in str(exc):
                raise
            # (NonFinitePositions keeps its type: predict says what to do about it)
            raise (NonFinitePositions if isinstance(exc, NonFinitePositions) else ValueError)(f"{path}: {exc}") from None
        except (OSError, EOFError, KeyError, IndexError, TypeError, RuntimeError, MemoryError, OverflowError,
                zipfile.BadZipFile, UnicodeDecodeError, tokenize.TokenError) as exc:
            # tokenize.TokenError: numpy parsing a corrupt .npy header
            raise ValueError(f"{path}: cannot read this file ({brief(exc, 300)})") from None
    return read


def _check_path(path) -> None:
    """A reader's ``path``: a str or PathLike (TypeError otherwise), not
    empty (``Path("")`` is ".": read_cloud("") read the current folder as an
    S3DIS room; ValueError) and there (FileNotFoundError naming it)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or Path); got {type(path).__name__}")
    if os.fspath(path) == "":
        raise ValueError("path must not be empty (a cloud file or folder; Path('') would be the current folder)")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")


def _ignore_index(value) -> int:
    """``ignore_index`` as an int: an integer (not a bool) that fits int64;
    TypeError/ValueError naming the argument otherwise (1.5 was truncated,
    True and "7" used as given, None blamed on the file)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"ignore_index must be an int; got {type(value).__name__} {value!r:.40}")
    if not _INT64_MIN <= int(value) <= _INT64_MAX:
        raise ValueError(f"ignore_index must be an int in int64; got {int(value)}")
    return int(value)


def _check_npy_size(shape, dtype, available: int, where: str) -> None:
    """ValueError before allocating when an array header claims more bytes
    than the file (or archive member) holds."""
    need = int(np.prod(shape, dtype=np.float64)) * np.dtype(dtype).itemsize
    if need > available:
        raise ValueError(f"{where}: the header claims {shape} {np.dtype(dtype)} ({need} bytes) but only "
                         f"{available} bytes are there (truncated or corrupt)")


def _npy_header(f, where) -> tuple:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` array ``f`` (a
    file object at its start) holds, ``f`` left at its data; a ValueError
    naming ``where`` for a damaged header (truncated, an unknown version,
    one numpy refuses: its own message did not name the file)."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        return read_header(f)
    except (ValueError, EOFError) as error:
        raise ValueError(f"{where}: a damaged .npy header: {error}") from None


def _npz_shape(z, key: str, path) -> tuple:
    """The shape of ``z[key]`` from its header, checked against the
    member's size (nothing read past the header)."""
    info = z.zip.getinfo(key + ".npy")
    with z.zip.open(info) as f:
        shape, _, dtype = _npy_header(f, f"{path} key {key!r}")
    _check_npy_size(shape, dtype, info.file_size, f"{path} key {key!r}")
    if dtype.hasobject:
        raise ValueError(f"{path} key {key!r}: object arrays are not point data")
    return tuple(shape)


def _npz_array(z, key: str, path) -> np.ndarray:
    """``z[key]`` after checking its header against the member's size."""
    _npz_shape(z, key, path)
    return z[key]


_NPY_MAGIC = b"\x93NUMPY"


def _load_npy(path) -> np.ndarray:
    """A ``.npy`` array, its header checked against the file size first
    (memory-mapped, then copied); never unpickles. A ValueError naming the
    file where it is no ``.npy`` file (numpy took one without its magic
    string for a pickle, and advised loading it unsafely), its header claims
    more bytes than it holds (numpy: 'mmap length is greater than file
    size'), or it holds Python objects."""
    with open(path, "rb") as f:
        start = f.read(len(_NPY_MAGIC))
        if not start:
            raise ValueError(f"{path}: not a .npy file (it is empty)")
        if start != _NPY_MAGIC:
            raise ValueError(f"{path}: not a .npy file (it does not start with numpy's magic string {_NPY_MAGIC!r}; "
                             f"it starts {start!r})")
        f.seek(0)
        shape, _, dtype = _npy_header(f, path)
        data = os.fstat(f.fileno()).st_size - f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: object arrays are not point data")
    _check_npy_size(shape, dtype, data, str(path))
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.array(arr)


_ZIP_STARTS = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or the end record of one holding none


def _check_npz_start(path) -> None:
    """ValueError naming the file where a ``.npz`` does not start as a zip
    archive does: numpy loads such a file as a pickle (its refusal advised
    loading an HTML page saved as ``.npz`` unsafely) or, where it starts with
    the ``.npy`` magic, as one array (no archive: a TypeError followed)."""
    with open(path, "rb") as f:
        start = f.read(16)
    if not start:
        raise ValueError(f"{path}: not a .npz archive (it is empty)")
    if start.startswith(_NPY_MAGIC):
        raise ValueError(f"{path}: not a .npz archive: it holds one .npy array (name it .npy)")
    if not start.startswith(_ZIP_STARTS):
        raise ValueError(f"{path}: not a .npz archive (it does not start with a zip signature; it starts {start!r})")


@_names_the_file
def read_semantickitti(scan_path, label_path=None, label_map="semantic-kitti",
                       ignore_index: int = DEFAULT_IGNORE, *, labels: bool = True) -> Sample:
    """One SemanticKITTI scan: ``velodyne/NNNNNN.bin`` (float32 x, y, z,
    intensity) and ``labels/NNNNNN.label`` (uint32; lower 16 bits semantic id,
    upper 16 instance); a coordinate past :data:`SCAN_POSITION_LIMIT` (1e9 m)
    is a ValueError naming the file (no position: a corrupt file, or
    another kind read as float32). ``label_path`` defaults to the sibling ``labels``
    folder; a missing label file gives an unlabelled sample, as does
    ``labels=False`` (no label file read). Intensities (remissions) come as
    stored and must lie in 0..1; a value outside (negative, above 1, NaN) is
    a ValueError naming the file, not clipped."""
    scan_path = Path(scan_path)
    size = scan_path.stat().st_size
    if size % 16:  # (np.fromfile drops a partial float at the end: check the bytes themselves)
        raise ValueError(f"{scan_path}: {size} bytes is not a whole number of points (16 bytes each: float32 x, y, "
                         "z, intensity); the file is truncated or not a SemanticKITTI scan")
    data = np.fromfile(scan_path, dtype=np.float32)
    data = data.reshape(-1, 4)
    if not labels:
        label_path = None
    elif label_path is None:
        guess = scan_path.parent.parent / "labels" / (scan_path.stem + ".label")
        label_path = guess if guess.is_file() else None
    ids = None
    if label_path is not None:
        label_size = os.stat(label_path).st_size
        if label_size % 4:  # np.fromfile would drop the partial record
            raise ValueError(f"{label_path}: {label_size} bytes is not a whole number of labels (4 bytes each: "
                             f"uint32) for {scan_path}; the label file is truncated or not a SemanticKITTI one")
        raw = np.fromfile(label_path, dtype=np.uint32)
        if raw.size != len(data):
            raise ValueError(f"{label_path}: {raw.size} labels for {len(data)} points in {scan_path}")
        ids = _labels(raw & 0xFFFF, load_label_map(label_map) if label_map is not None else None, ignore_index)
    # (a point whose position is not finite, a point without a return, is left for Sample to refuse or drop,
    # NaN remission and all: refused here as an intensity, it hid the NonFinitePositions --skip-nonfinite takes)
    placed = np.isfinite(data[:, :3]).all(1)
    _scan_positions(data[placed, :3], scan_path)
    _remissions(data[placed, 3:4], scan_path)
    return Sample(data[:, :3], ids, intensity=data[:, 3:4], name=str(scan_path))


#: Metres from the origin past which a ``.bin`` scan's coordinate is no position (a LiDAR's reach is hundreds
#: of metres, UTM's millions): the bytes of another file read as float32 (text: 1e27 m).
SCAN_POSITION_LIMIT = 1e9


def _scan_positions(xyz: np.ndarray, scan_path) -> None:
    """ValueError naming the file where a finite coordinate of a ``.bin``
    scan lies past :data:`SCAN_POSITION_LIMIT` metres: raw float32 bytes
    of something else (a text file of 16-byte lines read as 100 points at
    1e27 m, all alike: one voxel, predicted with exit 0, as voxels are
    counted from the cloud's first and its extent was 0)."""
    far = np.abs(xyz) > SCAN_POSITION_LIMIT
    if far.any():
        rows = far.any(1)
        raise ValueError(f"{scan_path}: {int(rows.sum())} of {len(xyz)} points lie past {SCAN_POSITION_LIMIT:g} m "
                         f"from the origin (first {xyz[rows][0].tolist()}): not positions in metres: a corrupt file, "
                         "or not a SemanticKITTI scan (float32 x, y, z, intensity)")


def _remissions(values: np.ndarray, scan_path) -> np.ndarray:
    """A SemanticKITTI scan's float32 remissions, which lie in 0..1, as they
    are; ValueError naming the file where one does not (negative, above 1,
    NaN or inf): the file is of another kind (a sensor's 0..255 intensity,
    another record layout) or corrupt. They were clipped to 0..1 silently
    (0..255 intensities all became 1, inf 1, -inf 0), where the other
    readers refuse a negative intensity naming the file and scale a float
    one above 1 by its 99th percentile, the range of those formats being
    unfixed; SemanticKITTI's is fixed, so a value outside it is not read
    as another scale here. The caller passes the remissions of the points
    whose position is finite (the others are no points)."""
    bad = ~((values >= 0) & (values <= 1))
    if bad.any():
        finite = values[np.isfinite(values)]
        seen = f"values {float(finite.min())!r} to {float(finite.max())!r}" if finite.size else "no finite values"
        nonfinite = int((~np.isfinite(values)).sum())
        raise ValueError(f"{scan_path}: intensity (each point's 4th float32) must lie in 0..1, as SemanticKITTI's "
                         f"remissions do; {int(bad.sum())} of {values.size} points do not ({seen}"
                         f"{f', {nonfinite} NaN or inf' if nonfinite else ''}): the file is corrupt or not a "
                         "SemanticKITTI scan (intensities of another range: save the points as .npy, whose reader "
                         "scales them)")
    return values


_NPZ_XYZ = ("xyz", "points", "pos", "coords")
_NPZ_LABELS = ("labels", "label", "classification", "semantic", "class")


@_names_the_file
def read_numpy(path, label_map=None, ignore_index: int = DEFAULT_IGNORE, labels_path=None, *,
               labels: bool = True) -> Sample:
    """A ``.npz`` archive or a ``.npy`` array.

    ``.npz``: positions under ``xyz``/``points``, optional ``origin`` (not
    added: positions stay relative to it, which keeps coordinates small),
    ``intensity``, ``rgb``, labels under one of ``labels``, ``label``,
    ``classification``, ``semantic``, ``class`` (two of them holding
    different per-point labels are a ValueError: keep one);
    positions of 4, 6 or 7 columns hold intensity and/or colour as a
    ``.npy`` cloud's do (then no ``intensity``/``rgb`` key for them).
    ``.npy``: ``(N, 3)`` positions, ``(N, 4)`` with intensity or ``(N, 6)``
    with colour; labels from ``labels_path`` or the sibling file named with
    ``labels`` in place of ``points`` (Open3D-ML layout); none read with
    ``labels=False``.

    Positions stored wider than float32 holds (float64, 32- or 64-bit
    integers) come as stored where float32 holds their x and y within
    0.1 mm (up to about 1 km), else with x and y relative to their
    minimum, subtracted in float64 (UTM coordinates keep their
    millimetres), z as stored; float32
    ones (or narrower) come as stored."""
    path = Path(path)
    label_map = load_label_map(label_map) if label_map is not None else None
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if labels_path is not None:  # (it was ignored without a word)
            raise ValueError(f"{path}: labels_path {labels_path} is for .npy clouds; an .npz archive holds its own "
                             f"labels (under one of {_NPZ_LABELS})")
        _check_npz_start(path)
        with np.load(path) as z:
            key = next((k for k in _NPZ_XYZ if k in z.files), None)
            if key is None:
                raise ValueError(f"{path}: no positions (looked for {_NPZ_XYZ}; has {z.files})")
            xyz = _npz_array(z, key, path)
            if xyz.ndim != 2 or xyz.shape[1] not in (3, 4, 6, 7):
                raise ValueError(f"{path}: key {key!r} must be (N, 3|4|6|7) [x y z (intensity) (r g b)] (as a .npy "
                                 f"cloud; or (N, 3) positions with 'intensity' and 'rgb' keys); got {xyz.shape}")
            _real(xyz, f"{path} key {key!r}", "positions")
            n = len(xyz)
            for column, name, held in (("an intensity", "intensity", xyz.shape[1] in (4, 7)),
                                       ("colour", "rgb", xyz.shape[1] >= 6)):
                if held and name in z.files:
                    raise ValueError(f"{path}: key {key!r} holds {column} column and the key {name!r} another: "
                                     "keep one")
            held = [k for k in _NPZ_LABELS if k in z.files] if labels else []
            # (per-point arrays under two of the keys: the first was read, the other dropped without a word; a
            # key of another shape, such as class names, is no second labelling, nor is a copy of the first)
            # (shapes from the headers, checked as every member read here is; arrays read only where two compare)
            per_point = [k for k in held if _npz_shape(z, k, path) in ((n,), (n, 1))] if len(held) > 1 else held
            if len(per_point) > 1 and any(not np.array_equal(np.ravel(_npz_array(z, per_point[0], path)),
                                                             np.ravel(_npz_array(z, k, path))) for k in per_point[1:]):
                raise ValueError(f"{path}: holds different labels under the keys {per_point[0]!r} and "
                                 f"{per_point[1]!r}{f' (and {len(per_point) - 2} more)' if len(per_point) > 2 else ''}"
                                 ": keep one")
            lab_key = (per_point or held or [None])[0]
            raw = _real(_npz_array(z, lab_key, path), f"{path} key {lab_key!r}", "labels",
                        [(n,), (n, 1)]) if lab_key else None
            intensity = rgb = None
            if "intensity" in z.files:
                intensity = _scale_intensity(_real(_npz_array(z, "intensity", path), f"{path} key 'intensity'",
                                                   "intensity", [(n,), (n, 1)]), f"{path} key 'intensity'")
            if "rgb" in z.files:
                rgb = _scale_rgb(_real(_npz_array(z, "rgb", path), f"{path} key 'rgb'", "colour", [(n, 3)]),
                                 f"{path} key 'rgb'")
            if xyz.shape[1] in (4, 7):  # (the columns a .npy cloud holds: dropped without a word, they were)
                intensity = _scale_intensity(xyz[:, 3], f"{path} key {key!r} column 4 (intensity)")
            if xyz.shape[1] >= 6:
                rgb = _scale_rgb(xyz[:, -3:], f"{path} key {key!r} columns {xyz.shape[1] - 2}-{xyz.shape[1]} (rgb)")
        return Sample(_positions(xyz), _labels(raw, label_map, ignore_index, f"{path} key {lab_key!r}", xyz),
                      intensity, rgb, name=str(path))
    if suffix != ".npy":
        raise ValueError(f"{path}: read_numpy reads .npy or .npz files (any case)")
    arr = _load_npy(path)
    if arr.ndim != 2 or arr.shape[1] not in (3, 4, 6, 7):
        raise ValueError(f"{path}: a .npy cloud must be (N, 3|4|6|7) [x y z (intensity) (r g b)]; got {arr.shape}")
    _real(arr, str(path), "a .npy cloud's values")
    intensity = _scale_intensity(arr[:, 3], f"{path} column 4 (intensity)") if arr.shape[1] in (4, 7) else None
    rgb = _scale_rgb(arr[:, -3:], str(path)) if arr.shape[1] >= 6 else None
    if not labels:
        labels_path = None
    elif labels_path is None:
        sibling = _sibling_labels(path)
        labels_path = sibling if sibling is not None and sibling.is_file() else None
    raw = _load_npy(labels_path) if labels_path is not None else None
    if raw is not None and raw.shape not in ((len(arr),), (len(arr), 1)):
        raise ValueError(f"{labels_path}: labels of shape {raw.shape} for {len(arr)} points in {path} (needs "
                         f"({len(arr)},) or ({len(arr)}, 1))")
    return Sample(_positions(arr), _labels(raw, label_map, ignore_index, f"{labels_path}", arr), intensity, rgb,
                  name=str(path))


#: Metres the float32 cast of stored positions may move a point before the
#: readers take x and y relative to the points' minimum (:func:`_positions`).
SHIFT_TOLERANCE = 1e-4


def _positions(xyz: np.ndarray) -> np.ndarray:
    """The first 3 columns of stored positions, for :class:`Sample`'s
    float32: a dtype float32 holds exactly (float32, float16, 8- and 16-bit
    integers) as stored; a wider one (float64, 32- and 64-bit integers) as
    stored too where float32 holds its x and y within
    :data:`SHIFT_TOLERANCE` (0.1 mm) and its step there is within it too
    (|x|, |y| up to about 1 km), else with x and y relative to the
    points' minimum, taken in float64 before the float32 cast (UTM positions
    of 6.8e6 m were cast whole: half a metre apart in float32), and z as
    stored: the features take z raw (a LiDAR's ground near -1.7 m) and x, y
    centred, so the same scan stored in float32 or float64 gives the same
    features, and a scan float32 holds gives the same voxels too (a shift by
    the minimum moved every voxel boundary: 0.1-0.2% of a KITTI scan's
    voxels changed); a z of up to 10 km keeps its millimetres in float32.
    Positions stored as float32 have lost what they lost already; nothing
    here recovers it. Rows with NaN or inf are left for :class:`Sample` to
    count and refuse."""
    xyz = xyz[:, :3]
    if len(xyz) == 0 or np.can_cast(xyz.dtype, np.float32):
        return xyz
    x64 = xyz.astype(np.float64, copy=False)  # (float64 text rows: no copy; the shift below makes one)
    finite = np.isfinite(x64).all(1)
    if not finite.any():
        return x64.copy()
    plane = x64[:, :2] if finite.all() else x64[finite, :2]
    with np.errstate(over="ignore", invalid="ignore"):  # (past float32's range: inf, moved by more than any bound)
        moved = np.abs(plane.astype(np.float32).astype(np.float64) - plane).max()
        # (and small enough that float32's step there stays within the bound, for the float32 sums and
        # rotations after: UTM positions on a whole-metre grid are exact in float32, but 0.5 m apart there)
        step = np.spacing(np.float32(np.abs(plane).max()))
    if moved <= SHIFT_TOLERANCE and step <= SHIFT_TOLERANCE:
        return x64  # (as the float32 branch returns xyz: Sample's float32 cast makes its own array)
    shift = (x64 if finite.all() else x64[finite]).min(0)
    shift[2:] = 0.0
    return x64 - shift


def _labels_of_a_cloud(path: Path) -> bool:
    """Whether ``path`` is the labels array that :func:`_sibling_labels`
    gives a cloud file that exists (Open3D-ML's ``labels/x.npy`` beside
    ``points/x.npy``, ``x_labels_0.npy`` beside ``x_points_0.npy``), or the
    ``labels`` folder beside a ``points`` or ``velodyne`` one (Open3D-ML's,
    SemanticKITTI's)."""
    if path.is_dir():
        return path.name == "labels" and any((path.parent / d).is_dir() for d in ("points", "velodyne"))
    if path.parent.name == "labels":
        cloud = path.parent.parent / "points" / path.name
    elif "labels" in path.name:
        cloud = path.with_name(path.name.replace("labels", "points"))
    else:
        return False
    return cloud != path and cloud.is_file() and _sibling_labels(cloud) == path


def _sibling_labels(path: Path) -> Path | None:
    if path.parent.name == "points":
        return path.parent.parent / "labels" / path.name
    if "points" in path.name:
        return path.with_name(path.name.replace("points", "labels"))
    return None


# Shortest point record of each LAS point format (0..10), in bytes.
_LAS_RECORD = (20, 28, 26, 34, 57, 63, 30, 36, 38, 59, 67)
# LASzip stores the first point of each chunk (50 000 points by default)
# raw, so a LAZ file holds at least ~20 bytes per 50 000 points.
_LAZ_POINTS_PER_BYTE = 2500


def _check_las_header(path: Path) -> bool:
    """The LAS 1.0-1.4 public header block read here and checked against the
    file size before laspy sees the file: laspy loops over a corrupt header's
    millions of VLRs (minutes) and allocates a header's point count. Scale
    factors must be finite and positive; a 1.4 header's legacy point count,
    where not 0, must equal the extended one (laspy reads the extended);
    uncompressed, the count must equal the whole point records up to the
    file's end (or the waveform packets or extended VLRs after them).
    Returns whether the points are compressed (LAZ)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: the file is empty (not a LAS/LAZ file)")
    with open(path, "rb") as f:
        head = f.read(375)
    if head[:4] != b"LASF":
        raise ValueError(f"{path}: not a LAS/LAZ file (it does not start with 'LASF')")
    if len(head) < 227:
        raise ValueError(f"{path}: {size} bytes is too short for a LAS header (227 bytes at least)")
    major, minor = head[24], head[25]
    header_size = int(np.frombuffer(head, "<u2", 1, 94)[0])
    point_offset, vlrs = (int(v) for v in np.frombuffer(head, "<u4", 2, 96))
    point_format, record = head[104], int(np.frombuffer(head, "<u2", 1, 105)[0])
    count = int(np.frombuffer(head, "<u4", 1, 107)[0])
    if (major, minor) not in ((1, 0), (1, 1), (1, 2), (1, 3), (1, 4)):
        raise ValueError(f"{path}: LAS version {major}.{minor} is not 1.0 to 1.4")
    least = 375 if minor >= 4 else 235 if minor == 3 else 227
    if not least <= header_size <= min(point_offset, size):
        raise ValueError(f"{path}: LAS header size {header_size} is not between {least} and the offset to the "
                         f"points ({point_offset}) within the file's {size} bytes")
    if point_offset > size:
        raise ValueError(f"{path}: the LAS header puts the points at byte {point_offset}, past the file's {size} "
                         "bytes (truncated or corrupt)")
    if vlrs * 54 > point_offset - header_size:
        raise ValueError(f"{path}: the LAS header claims {vlrs} variable-length records (54 bytes each at least) "
                         f"in the {point_offset - header_size} bytes before the points")
    compressed = bool(point_format & 0x80)
    point_format &= 0x3F
    if point_format >= len(_LAS_RECORD) or record < _LAS_RECORD[point_format]:
        raise ValueError(f"{path}: LAS point format {point_format} with {record}-byte records is not one of the "
                         f"formats 0-10 (records of {_LAS_RECORD} bytes at least)")
    scales = np.frombuffer(head, "<f8", 3, 131)
    if not (np.isfinite(scales) & (scales > 0)).all():
        raise ValueError(f"{path}: LAS scale factors {scales.tolist()} must be finite and above 0 (a zero, negative "
                         "or NaN scale collapses or corrupts the coordinates)")
    if minor >= 4:
        extended = int(np.frombuffer(head, "<u8", 1, 247)[0])
        if count and count != extended:  # laspy reads the extended count only
            raise ValueError(f"{path}: the LAS 1.4 header's legacy point count {count} and extended point count "
                             f"{extended} differ")
        count = extended
        first_evlr, evlrs = int(np.frombuffer(head, "<u8", 1, 235)[0]), int(np.frombuffer(head, "<u4", 1, 243)[0])
        if evlrs and (first_evlr < point_offset or first_evlr + evlrs * 60 > size):
            raise ValueError(f"{path}: the LAS header claims {evlrs} extended records from byte {first_evlr}, "
                             f"outside the file's {size} bytes")
    data = size - point_offset
    if not compressed and count * record > data:
        raise ValueError(f"{path}: the LAS header says {count} points ({count * record} bytes) but the file holds "
                         f"{data // record} ({data} bytes of point data; truncated)")
    if not compressed:
        # Whole records past the header's count: laspy reads the count only and drops the rest silently. The
        # point data ends at the file's end, or where what may follow the points starts (1.3+ waveform
        # packets, 1.4 extended VLRs); an offset inside the points themselves is no such end.
        ends = [size]
        if minor >= 3:
            ends.append(int(np.frombuffer(head, "<u8", 1, 227)[0]))
        if minor >= 4 and evlrs:
            ends.append(first_evlr)
        held = (min(e for e in ends if e >= point_offset + count * record) - point_offset) // record
        if held > count:
            raise ValueError(f"{path}: the LAS header says {count} points but the file holds {held} point "
                             f"records ({record} bytes each); the header's count is wrong (reading {count} would "
                             f"drop {held - count} silently)")
    if compressed and count > _LAZ_POINTS_PER_BYTE * max(data, 1):
        raise ValueError(f"{path}: the LAZ header says {count} points; {data} bytes of compressed points cannot "
                         "hold that many (corrupt)")
    return compressed


@_names_the_file
def read_las(path, label_map=None, ignore_index: int = DEFAULT_IGNORE, *, labels: bool = True,
             withheld: bool = False) -> Sample:
    """A LAS/LAZ file through laspy (``pip install laspy``, plus ``lazrs`` for
    LAZ). Positions are taken relative to the points' minimum (real tiles
    have large absolute coordinates, and the header's minimum is not always
    filled in): the integer records less their minimum, times the header's
    scale factors, which the offsets do not enter; labels from
    ``classification``, or an extra-bytes ``label``, ``labels``, ``class`` or
    ``semantic`` dimension where no point is classified (every code 0 or 1;
    none with ``labels=False``). The public header is
    checked against the file size first: in an uncompressed file a point
    count above or below the whole records there is a ValueError naming
    both.

    Points flagged withheld (the LAS spec: not to be included in
    processing, as if deleted) are left out, as
    :func:`~pointsparse.data.sample.nonfinite_rows_dropped` leaves points
    out: the sample's ``kept`` records the file's rows it holds (None where
    none is withheld; ``predict`` writes -1 / raw id 0 in the others), and
    the positions' minimum and the intensity's scale are the kept points'.
    ``withheld=True`` reads them with the others."""
    try:
        import laspy
    except ImportError:
        raise MissingExtra("reading LAS/LAZ needs the optional extra laspy: pip install laspy") from None
    compressed = _check_las_header(Path(path))
    try:
        las = laspy.read(str(path))
    except laspy.errors.LaspyException as exc:
        if compressed and not laspy.LazBackend.detect_available():  # (an extra missing, as laspy itself is)
            raise MissingExtra(f"{path}: cannot read this compressed (LAZ) point data: reading LAZ needs the "
                               f"optional extra lazrs or laszip: pip install lazrs ({exc})") from None
        raise ValueError(f"{path}: laspy cannot read this file ({brief(exc, 300)})") from None
    names = set(las.point_format.dimension_names)
    keep = None  # (the withheld flag: bit 7 of the classification byte in formats 0-5, a flag bit in 6-10)
    if not withheld and "withheld" in names:
        flagged = np.asarray(las.withheld).astype(bool)
        keep = ~flagged if flagged.any() else None
    pick = (lambda values: np.asarray(values)) if keep is None else (lambda values: np.asarray(values)[keep])
    # Relative to the points' own minimum, not the header's (which a writer may leave at 0: positions of
    # 6.8e6 m then lost a decimetre as float32): the integer records less their minimum, times the scale. The
    # header's offsets cancel there, so they play no part (a NaN offset made every point NaN, one of 1e300
    # swamped the records in float64: every x 0).
    records = np.stack([pick(las.X), pick(las.Y), pick(las.Z)], 1).astype(np.int64)
    scales = np.asarray(las.header.scales, dtype=np.float64)
    xyz64 = (records - records.min(0)) * scales if len(records) else np.zeros((0, 3))
    if len(xyz64) and xyz64.max() > _FLOAT32_MAX:
        raise ValueError(f"{path}: the LAS scale factors {scales.tolist()} put the points' extent at "
                         f"{(xyz64.max(0)).tolist()} m, past float32 (a corrupt header)")
    xyz = xyz64.astype(np.float32)
    intensity = _scale_intensity(pick(las.intensity), f"{path} intensity") if "intensity" in names else None
    rgb = None
    if {"red", "green", "blue"} <= names:
        rgb = _scale_rgb(np.stack([pick(las.red), pick(las.green), pick(las.blue)], 1), str(path))
    raw = _las_labels(las, names, path, pick) if labels else None
    return Sample(xyz, _labels(raw, load_label_map(label_map) if label_map else None, ignore_index),
                  intensity, rgb, name=str(path), kept=keep)


#: Extra-bytes dimensions of a LAS file read as its labels where its classification is never set (all 0).
_LAS_LABEL_DIMENSIONS = ("label", "labels", "class", "semantic")


def _las_labels(las, names: set, path, pick) -> np.ndarray | None:
    """A LAS file's raw labels: ``classification``, or, where no point is
    classified (every code 0, created, or 1, unclassified: ASPRS's two
    codes for none) and the file holds an extra-bytes dimension named as
    labels are (:data:`_LAS_LABEL_DIMENSIONS`, any case), that one (data
    sets that ship their labels so read as one class without a word).
    Where both hold other labels, ``classification`` is read and a warning
    names the other."""
    extra = [n for n in las.point_format.extra_dimension_names if n.lower() in _LAS_LABEL_DIMENSIONS]
    raw = pick(las.classification) if "classification" in names else None
    if not extra:
        return raw
    other = pick(las[extra[0]])
    if raw is None or not (np.asarray(raw) > 1).any():
        if not np.issubdtype(other.dtype, np.integer):
            raise ValueError(f"{path}: its labels' extra dimension {extra[0]!r} holds {other.dtype} values; labels "
                             "are integers")
        return other
    if other.any() and not np.array_equal(other, raw):
        warnings.warn(f"{path}: labels read from classification; its extra dimension {extra[0]!r} holds others, "
                      "not read", stacklevel=3)
    return raw


_HEADER_LIMIT = 1 << 20  # bytes searched for the end of a PLY/PCD text header
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
_PCD_TYPES = {("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8", ("U", 1): "u1", ("U", 2): "u2",
              ("U", 4): "u4", ("U", 8): "u8", ("F", 4): "f4", ("F", 8): "f8"}


def _text_header(path: Path, end: bytes, kind: str) -> tuple[list[str], bytes, int, int]:
    """The header lines of a PLY/PCD file up to the line starting with
    ``end`` (included), where its data starts, and the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_HEADER_LIMIT)
    lines, pos = [], 0
    while True:
        nl = head.find(b"\n", pos)
        if nl < 0:
            raise ValueError(f"{path}: not a {kind} file (no '{end.decode()}' line in its first "
                             f"{min(size, _HEADER_LIMIT)} bytes)")
        line = head[pos:nl].decode("ascii", errors="replace").strip()
        lines.append(line)
        pos = nl + 1
        if line.split()[:1] == [end.decode()]:
            return lines, head, pos, size


_ASCII_CHUNK = 1 << 20  # bytes of an ASCII body split and converted at a time (the tests lower it)
_ASCII_SPACE = (b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c")  # what bytes.split() splits at


def _ascii_pieces(path: Path, start: int, count: int):
    """The first ``count`` whitespace-separated tokens after byte ``start``
    in pieces, each ``(index of its first token, its tokens)``; fewer may
    be there (the caller checks). A piece is about ``_ASCII_CHUNK`` bytes of
    the body cut at whitespace, so neither the body nor a list of all its
    tokens is held at once (a 1M-point PLY's tokens took 900 MB)."""
    done, carry, size = 0, b"", _ASCII_CHUNK
    with open(path, "rb") as f:
        f.seek(start)
        while done < count:
            block = f.read(size)
            data = carry + block
            if block:
                cut = max(data.rfind(c) for c in _ASCII_SPACE)
                if cut < 0:  # (one token so far, longer than a chunk: read on)
                    carry, size = data, size * 2
                    continue
                data, carry, size = data[:cut], data[cut:], _ASCII_CHUNK
            # (at most count tokens; the rest of the body stays one unread piece)
            tokens = data.split(None, count - done)[:count - done]
            if tokens:
                yield done, tokens
            done += len(tokens)
            if not block:
                return


def _ascii_numbers(path: Path, tokens: list[bytes], first: int, what: str) -> np.ndarray:
    """The float64 values of ``tokens``, the body's values ``first + 1`` on;
    ValueError naming the value when one is not a number (Open3D
    reads a garbled text body as uninitialised memory). np.fromstring's
    handling of a bad token differs between numpy versions, and its count=
    pads a short body with garbage."""
    try:
        return np.array(tokens, dtype=np.float64)
    except ValueError:
        for i, token in enumerate(tokens):
            try:
                float(token)
            except ValueError:
                raise ValueError(f"{path}: {what}: value {first + i + 1} ({token[:40]!r}) is not a number") from None
        raise


def _not_integral(col: np.ndarray, dtype: np.dtype) -> int | None:
    """The first row of a text column read as float64 whose value an
    integer ``dtype`` cannot hold (not whole, or out of its range), None
    where all fit or ``dtype`` is not an integer type."""
    if dtype.kind not in "iu":
        return None
    info = np.iinfo(dtype)
    bad = ~((np.floor(col) == col) & (col >= info.min) & (col <= info.max))
    return int(np.argmax(bad)) if bad.any() else None


_FLOAT32_MAX = float(np.finfo(np.float32).max)  # 3.4028234663852886e38


def _first_bad_token(tokens, ok) -> int | None:
    """The index of the first token ``ok`` refuses (each distinct token
    tested once), None where all pass."""
    bad = {t for t in set(tokens) if not ok(t)}
    return next(i for i, t in enumerate(tokens) if t in bad) if bad else None


def _ranked_column_problem(tokens, col: np.ndarray, dtype: np.dtype, plain_int, underscore: bool = False,
                           below: int = 3) -> tuple[int, int, str] | None:
    """The first problem of a text column (its tokens and their float64
    values) of the most telling kind below rank ``below``, as ``(rank, row,
    why)``: rank 0 a token holding '_' (looked for where ``underscore``:
    Python reads 5_0 as 50, rply cannot), 1 an integer not written as
    ``plain_int``, 2 a value the type cannot hold; None where none. A
    column read in pieces keeps each piece's problem of a lower rank than
    it holds: the whole column's is then the one of the lowest rank, at its
    first row."""
    if underscore and below > 0:
        i = _first_bad_token(tokens, lambda t: b"_" not in t)
        if i is not None:
            return 0, i, "which holds a '_' (Open3D cannot read it)"
    if dtype.kind in "iu":
        i = _first_bad_token(tokens, plain_int.fullmatch) if below > 1 else None
        if i is not None:
            return 1, i, (f"not a plain decimal integer as a {dtype} value must be (Open3D fails on it or reads "
                          "another value)")
        i = _not_integral(col, dtype) if below > 2 else None
        return (2, i, f"not a {dtype} as the header says") if i is not None else None
    top = _FLOAT32_MAX if dtype.itemsize == 4 else float(np.finfo(np.float64).max)
    bad = np.abs(col) > top if below > 2 else None  # NaN passes, as it does in Open3D
    if bad is not None and bad.any():
        return 2, int(np.argmax(bad)), f"past the range of a {dtype} value (Open3D fails on it or reads inf)"
    return None


def _kept_problem(kept, tokens, col: np.ndarray, row: int, dtype: np.dtype, plain_int, underscore: bool = False):
    """A text column's problem once its piece ``tokens`` (values ``col``,
    the first at row ``row``) is read: ``kept``, the problem of its pieces
    before, ``(rank, row, why, token)`` or None, unless this piece holds one
    of a lower rank (:func:`_ranked_column_problem`), then that one."""
    below = kept[0] if kept is not None else 3
    problem = _ranked_column_problem(tokens, col, dtype, plain_int, underscore, below) if below else None
    if problem is None:
        return kept
    rank, i, why = problem
    return rank, row + i, why, tokens[i]


def _text_column_problem(tokens, col: np.ndarray, dtype: np.dtype, plain_int) -> tuple[int, str] | None:
    """The first row (and why) of a text column, its tokens and their float64
    values, that a C reader of a ``dtype`` field would read otherwise than
    Python: an integer not written as ``plain_int`` (a pattern; strtol stops
    at a '.' or 'e', 2.0 and 1e1 read 2 and 1), out of the type's range or
    not whole, a float32 past float32's range (1e39) or any value past
    float64's (inf), None where all are read alike."""
    problem = _ranked_column_problem(tokens, col, dtype, plain_int)
    return problem[1:] if problem is not None else None


_PLY_INT_TOKEN = re.compile(rb"[+-]?[0-9]+")  # rply reads integers with strtol(..., 10)
# Open3D's PLY reader (0.20) reads properties of these type names only and skips the others (char, int8,
# short, int16, ushort, uint, uint32); it reads each group of three into one array of its first member's type.
_OPEN3D_PLY_TYPES = ("uchar", "uint8", "uint16", "int", "int32", "float", "float32", "double", "float64")
_OPEN3D_PLY_GROUPS = (("x", "y", "z"), ("nx", "ny", "nz"), ("red", "green", "blue"))
# (read_open3d's labels, the first there; scalar_*: CloudCompare's names for a scalar field it writes)
_OPEN3D_LABELS = ("labels", "label", "class", "classification", "scalar_Classification", "scalar_classification",
                  "scalar_Label", "scalar_label", "semantic")  # (semantic: KITTI-360's PLY)


def _check_open3d_ply_types(path: Path, types: dict[str, str]) -> None:
    """The vertex properties Open3D groups (x y z, nx ny nz, red green blue)
    all three or none, of one type, and those :func:`read_open3d` reads of a
    type Open3D reads: ValueError naming the file and the properties
    otherwise. Open3D reads a group into one array of its first member's
    type, the others' bytes reinterpreted (a double y among float x and z
    gave y = 3e-41) and a missing or skipped member as uninitialised memory;
    it skips a lone property of a type it does not read (a ushort label:
    the cloud came back unlabelled). A vertex without x, y, z (none of
    them; Open3D's names are lower case) is refused too: Open3D failed
    on it with its own "TensorMap does not contain primary key" error."""
    if not any(p in types for p in ("x", "y", "z")):
        raise ValueError(f"{path}: PLY vertex element has no x, y, z properties (positions); it has "
                         f"{', '.join(types) or 'none'} (Open3D reads positions from properties named x, y, z, "
                         "lower case)")
    for group in _OPEN3D_PLY_GROUPS:
        held = [p for p in group if p in types]
        if held and (len(held) < 3 or len({np.dtype(_PLY_TYPES[types[p]]) for p in group}) > 1):
            declared = ", ".join(f"{p} {types[p]}" if p in types else f"no {p}" for p in group)
            raise ValueError(f"{path}: PLY vertex properties {' '.join(group)} must be all three or none, of one "
                             f"type (Open3D reads them as one array: a missing one as uninitialised memory, another "
                             f"type's bytes reinterpreted); got {declared}")
    for prop in ("x", "y", "z", "red", "green", "blue", "intensity", *_OPEN3D_LABELS):
        if prop in types and types[prop] not in _OPEN3D_PLY_TYPES:
            raise ValueError(f"{path}: PLY vertex property {prop!r} is of type {types[prop]}, which Open3D does not "
                             f"read (it drops the property); declare it one of {', '.join(_OPEN3D_PLY_TYPES)}")


def _check_ply(path: Path) -> np.ndarray | None:
    """A PLY file's header against its body before Open3D reads it: the
    vertex count against the bytes (binary) or numbers (ASCII) there, and
    ASCII tokens (of the vertex element and those before it) as Open3D's
    rply reader (strtol, strtod) would read them: integers plain decimal
    integers in range, no '_' anywhere (Python reads 5_0 as 50), float32
    values within float32's range. Open3D logs "Read PLY failed" on a short
    body or a token it cannot read but returns the header's count of points,
    the missing ones uninitialised memory. List properties are refused in
    the vertex element and those before it (a row's length is then in its
    data, which this check does not walk; mesh PLYs put vertex first).
    Where the vertex element is the header's last, a body holding more than
    its rows (a whole record more, binary; a value more, ASCII) is refused
    too: Open3D reads the header's count, and the rest went unread. Where
    elements follow it (a mesh's faces), the rest of the body must be able
    to hold their declared rows (elements are stored in header order: a
    header's 10**12 faces with none in the file is a truncated file, which
    Open3D read as its points after "Read PLY failed").
    Returns the float64 ``(n, 3)`` x, y, z an ASCII body holds where they
    are declared float32 (:func:`_text_positions`), else None."""
    lines, _, start, size = _text_header(path, b"end_header", "PLY")
    if lines[0] != "ply":
        raise ValueError(f"{path}: not a PLY file (it does not start with 'ply')")
    fmt, elements = None, []  # elements: [name, count, [(property name, dtype or None for a list)]]
    least: list[int] = []  # each element's fewest bytes a row (binary): its fixed properties and lists' counts
    vertex_types: dict[str, str] = {}  # the vertex element's property -> type as declared
    for line in lines[1:-1]:
        word = line.split()
        if not word or word[0] in ("comment", "obj_info"):
            continue
        if word[0] == "format" and len(word) == 3:
            fmt = word[1]
        elif word[0] == "element" and len(word) == 3 and word[2].isdigit():
            elements.append([word[1], int(word[2]), []])
            least.append(0)
        elif word[0] == "property" and elements and len(word) == 3 and word[1] in _PLY_TYPES:
            elements[-1][2].append((word[2], np.dtype(_PLY_TYPES[word[1]])))
            least[-1] += np.dtype(_PLY_TYPES[word[1]]).itemsize
            if elements[-1][0] == "vertex":
                vertex_types[word[2]] = word[1]
        elif word[0] == "property" and elements and len(word) == 5 and word[1] == "list" and \
                word[2] in _PLY_TYPES and word[3] in _PLY_TYPES:
            elements[-1][2].append((word[4], None))
            least[-1] += np.dtype(_PLY_TYPES[word[2]]).itemsize  # (its count; an empty list holds no more)
        else:
            raise ValueError(f"{path}: PLY header line {line[:80]!r} is not a format, element or property line "
                             f"this reader knows")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise ValueError(f"{path}: PLY format {fmt!r} is not ascii, binary_little_endian or binary_big_endian")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise ValueError(f"{path}: the PLY header has no vertex element")
    upto = elements[:names.index("vertex") + 1]
    for name, _, props in upto:
        lists = [prop for prop, dtype in props if dtype is None]
        if lists:
            raise ValueError(f"{path}: PLY element {name!r} has the list property {lists[0]!r}; this reader takes "
                             "lists only in elements after 'vertex' (a mesh's faces), not in it or before it")
    _check_open3d_ply_types(path, vertex_types)
    n, props = upto[-1][1], upto[-1][2]
    # Up to the vertex element, each row needs its (fixed-size) properties.
    # Where the vertex element is the last, nothing may follow its rows (Open3D reads the header's count and
    # left the points after it unread without a word); a mesh's faces after its vertices are data.
    last = len(upto) == len(elements)
    # The elements after the vertex element follow its rows (PLY stores elements in header order): a file
    # that cannot hold the rows its header declares there is truncated (Open3D logs "Read PLY failed" and
    # returns the points): checked against the fewest bytes (binary) or values (ASCII) those rows take.
    after = elements[len(upto):]
    declared = ", ".join(f"{count} {name}" for name, count, _ in after)
    if fmt == "ascii":
        values_after = sum(count * len(p) for _, count, p in after)  # (a value per property, a count per list)
        return _check_ascii_ply(path, start, size, upto, last, (values_after, declared))
    need = sum(count * sum(d.itemsize for _, d in p) for _, count, p in upto)
    held_bytes = size - start
    row = sum(d.itemsize for _, d in props)
    if held_bytes < need:
        held = max(0, held_bytes - (need - n * row)) // max(row, 1)
        raise ValueError(f"{path}: the header says {n} points ({need} bytes) but the file holds {held} "
                         f"({held_bytes} bytes of data; truncated)")
    if last and row and held_bytes - need >= row:  # (a trailing newline is no point)
        raise ValueError(f"{path}: the header says {n} points but the file holds more: {held_bytes - need} bytes "
                         f"after them, {(held_bytes - need) // row} whole {row}-byte records; the header's count is "
                         f"wrong (reading {n} would drop the rest silently)")
    bytes_after = sum(count * row_least for (_, count, _), row_least in zip(after, least[len(upto):]))
    if held_bytes - need < bytes_after:
        raise ValueError(f"{path}: the header says {declared} after its {n} points (at least {bytes_after} bytes) "
                         f"but the file holds {held_bytes - need} bytes after the points (truncated)")
    return None


def _xyz_picks(dtypes, names) -> list[int] | None:
    """The fields x, y, z of an ASCII PLY/PCD body (``names[j]`` field
    ``j``'s name, ``dtypes[j]`` its declared type) where the three are
    there once each and declared float32, else None. Open3D parses a
    float32 field to float32, which drops what UTM positions' text holds
    below half a metre; the text itself is exact in float64 (as Open3D's
    legacy reader takes it), and the reader shifts it like any position
    stored wider than float32. Integer and float64 fields come from Open3D
    as they are (exact there)."""
    picks = [[j for j, name in enumerate(names) if name == axis] for axis in "xyz"]
    if any(len(j) != 1 for j in picks) or any(dtypes[j[0]] != np.float32 for j in picks):
        return None
    return [j[0] for j in picks]


def _text_positions(dtypes, names, column) -> np.ndarray | None:
    """The float64 ``(n, 3)`` x, y, z of an ASCII PLY/PCD body (``column(j)``
    the float64 values of field ``j``) where :func:`_xyz_picks` takes them,
    else None."""
    picks = _xyz_picks(dtypes, names)
    return np.stack([column(j) for j in picks], 1) if picks is not None else None


def _check_ascii_ply(path: Path, start: int, size: int, upto, last: bool = False,
                     after: tuple[int, str] = (0, "")) -> np.ndarray | None:
    """:func:`_check_ply` of an ASCII body (``upto``: the elements up to the
    vertex element, ``[name, count, [(property, dtype)]]``), read in pieces
    of :func:`_ascii_pieces`: its tokens numbers (the first that is not,
    named), as many as the header needs, then each property's column as
    :func:`_ranked_column_problem` takes it, the first property with a
    problem named at its first row. Returns the float64 ``(n, 3)`` x, y, z
    where they are declared float32 (:func:`_xyz_picks`), else None; they
    are filled in as read, sized only where the body after byte ``start``
    of the ``size`` can hold the header's values (a digit and a space each:
    a header's 10**15 points asked for 21 PiB). ``last``: the vertex element
    is the header's last, so a value after its rows is a ValueError (the
    header's count is wrong). ``after``: the fewest values the elements
    after the vertex element take and what the header declares there; the
    body must hold a value after the vertices where that is not 0, and a
    digit and a space for each value in all (else truncated)."""
    _, n, props = upto[-1]
    values_after, declared = after
    short_after = (f"{path}: the header says {declared} after its {n} points (at least {values_after} "
                   f"value{'s' if values_after != 1 else ''}) ")  # (the start of both refusals below)
    columns, offset = [], 0  # (element, its first value's index, its rows, row length, column, property, dtype)
    for name, count, p in upto:
        columns += [(name, offset, count, len(p), j, prop, dtype) for j, (prop, dtype) in enumerate(p)]
        offset += count * len(p)
    need, vertex = offset, len(columns) - len(props)  # (the vertex element's first column)
    picks = _xyz_picks([dtype for _, dtype in props], [prop for prop, _ in props])
    xyz = np.empty((n, 3)) if picks is not None and need <= (size - start + 1) // 2 else None
    found: list[tuple | None] = [None] * len(columns)  # each column's problem so far: (rank, row, why, token)
    held = 0
    if values_after and 2 * (need + values_after) - 1 > size - start:
        raise ValueError(f"{short_after}but the file's {size - start} bytes of data cannot hold them (truncated)")
    more = last or values_after > 0  # (one more: is anything after them?)
    for first, tokens in _ascii_pieces(path, start, need + more):
        values = _ascii_numbers(path, tokens, first, "vertex data")
        held = first + len(tokens)
        underscore = b"_" in b" ".join(tokens)
        for c, (name, off, count, width, j, prop, dtype) in enumerate(columns):
            lo, hi = max(first, off), min(held, off + count * width)
            g = lo + (off + j - lo) % width  # the column's first value in this piece
            if g >= hi:
                continue
            row, cut = (g - off) // width, slice(g - first, hi - first, width)
            col_tokens, col = tokens[cut], values[cut]
            if xyz is not None and c >= vertex and j in picks:
                xyz[row:row + len(col), picks.index(j)] = col
            found[c] = _kept_problem(found[c], col_tokens, col, row, dtype, _PLY_INT_TOKEN, underscore)
    if held < need:
        width = len(props)
        points = max(0, held - (need - n * width)) // max(width, 1)
        raise ValueError(f"{path}: the header says {n} points but the file holds {points} "
                         f"({held} of the {need} numbers needed; truncated)")
    if held == need and values_after:
        raise ValueError(f"{short_after}but the file holds none after the points (truncated)")
    if held > need and last:
        raise ValueError(f"{path}: the header says {n} points but the file holds more: values after them, where "
                         f"the vertex element is the last; the header's count is wrong (reading {n} would drop the "
                         "rest silently)")
    for (name, _, _, _, _, prop, _), problem in zip(columns, found):
        if problem is not None:
            _, i, why, token = problem
            raise ValueError(f"{path}: {name} {i} property {prop!r} is {token[:40].decode('ascii', 'replace')!r}, "
                             f"{why}")
    return xyz


_PCD_KEYS = ("VERSION", "FIELDS", "SIZE", "TYPE", "COUNT", "WIDTH", "HEIGHT", "VIEWPOINT", "POINTS", "DATA")
_PCD_INT_TOKEN = re.compile(r"[+-]?(0|[1-9][0-9]*)")  # Open3D: strtol(..., 0), so 010 is octal 8 and 0x10 is 16


_OPEN3D_PCD_ARRAYS = ("positions", "normals", "colors")  # the names of Open3D's own arrays
_OPEN3D_PCD_COLOURS = ("rgb", "rgba")  # the fields Open3D unpacks into colors
_OPEN3D_PCD_READ = ("x", "y", "z", "intensity", *_OPEN3D_LABELS)  # the other fields read_open3d takes


def _check_open3d_pcd_fields(path: Path, names, types, sizes, counts) -> None:
    """A PCD header's FIELDS as Open3D's reader takes them: each name once
    (a name given twice, or one of Open3D's array names ``positions``,
    ``normals``, ``colors``, shares one buffer between two fields: the
    process aborted on a corrupt heap), x y z all three of one type (a mix
    such as ``SIZE 4 8 4`` fails Open3D's header parse, which the reader
    reported only as "no points read"), and normal_x normal_y normal_z all
    three or none, of the type of x y z (Open3D sizes the normals by x's
    type: another type overran them, a missing one crashed it); the fields
    :func:`read_open3d` takes of COUNT 1 (Open3D keeps only a field's first
    value) and rgb/rgba 4 packed bytes (Open3D returns black for any other
    size); ValueError naming the file and the fields otherwise."""
    declared = {}
    for name, t, b, c in zip(names, types, sizes, counts):
        if name in declared or name in _OPEN3D_PCD_ARRAYS:
            why = "names it twice" if name in declared else "names a field after one of Open3D's own arrays " \
                f"({', '.join(_OPEN3D_PCD_ARRAYS)})"
            raise ValueError(f"{path}: PCD FIELDS {' '.join(names)} {why}: {name!r} (Open3D reads both into one "
                             "buffer, corrupting memory); rename the field")
        if name in _OPEN3D_PCD_COLOURS and (b != 4 or c != 1):
            raise ValueError(f"{path}: PCD field {name!r} has SIZE {b} COUNT {c}; Open3D reads colour only from "
                             f"one 4-byte packed {name} value (0x00RRGGBB, TYPE F, U or I SIZE 4 COUNT 1) and "
                             "returns black for any other")
        if name in _OPEN3D_PCD_READ and c != 1:
            raise ValueError(f"{path}: PCD field {name!r} has COUNT {c}; Open3D reads only the first of a field's "
                             f"values (the other {c - 1} would be dropped): declare it COUNT 1")
        declared[name] = f"{t.upper()}{b}"

    def listed(group):
        return ", ".join(f"{p} TYPE {declared[p][0]} SIZE {declared[p][1:]}" if p in declared else f"no {p}"
                         for p in group)
    xyz = ("x", "y", "z")
    if not all(p in declared for p in xyz) or len({declared[p] for p in xyz}) > 1:
        raise ValueError(f"{path}: PCD fields x y z must all be there, of one TYPE and SIZE (Open3D reads them as one "
                         f"array and fails on anything else); got {listed(xyz)} (FIELDS {' '.join(names)})")
    normals = ("normal_x", "normal_y", "normal_z")
    if any(p in declared for p in normals) and \
            (not all(p in declared for p in normals) or {declared[p] for p in normals} != {declared["x"]}):
        raise ValueError(f"{path}: PCD fields normal_x normal_y normal_z must be all three or none, of the TYPE and "
                         f"SIZE of x y z ({declared['x'][0]} {declared['x'][1:]}; Open3D reads them as one array sized "
                         f"by x's type, and crashed on a missing one or another type); got {listed(normals)}")


def _check_pcd(path: Path) -> np.ndarray | None:
    """A PCD file's header against its body before Open3D reads it: POINTS
    (or WIDTH x HEIGHT) against the bytes (binary, binary_compressed) or the
    rows (ascii) there; Open3D returns uninitialised memory for missing
    ascii rows and reads a text integer field through strtol (1.5 and 1e1
    -> 1, 010 -> 8). Open3D matches header keys case-sensitively by prefix
    ("DATAX" is DATA, "points" nothing), so each line must start with one of
    the keys as a whole word, and the count is Open3D's: the last POINTS, or
    WIDTH x HEIGHT at the HEIGHT line; POINTS must equal WIDTH x HEIGHT.
    The FIELDS are checked as Open3D takes them (x y z of one type, normals
    whole and of that type, no name twice: :func:`_check_open3d_pcd_fields`).
    A body holding more than the count (a whole record, binary; a row,
    ascii) is refused too: Open3D reads the count, and the rest went unread.
    Returns the float64 ``(n, 3)`` x, y, z an ASCII body holds where they
    are declared float32 (:func:`_text_positions`), else None."""
    lines, head, start, size = _text_header(path, b"DATA", "PCD")
    fields: dict[str, list[str]] = {}
    n = None
    try:
        for line in lines:
            word = line.split()
            if not word or word[0].startswith("#"):
                continue
            if word[0] not in _PCD_KEYS:
                raise ValueError(f"{path}: PCD header line {line[:80]!r} does not start with one of "
                                 f"{', '.join(_PCD_KEYS)} (upper case, a whole word) or '#'")
            fields[word[0]] = word[1:]
            if word[0] == "POINTS":
                n = int(word[1])
            elif word[0] == "HEIGHT":
                if "WIDTH" not in fields:
                    raise ValueError(f"{path}: PCD HEIGHT comes before WIDTH (Open3D counts the points as "
                                     "WIDTH x HEIGHT at the HEIGHT line)")
                n = int(fields["WIDTH"][0]) * int(word[1])
        if n is None:
            raise KeyError("POINTS")
        if "WIDTH" in fields and "POINTS" in fields:
            width, height, points = (int(fields[k][0]) for k in ("WIDTH", "HEIGHT", "POINTS")) \
                if "HEIGHT" in fields else (int(fields["WIDTH"][0]), 1, int(fields["POINTS"][0]))
            if points != width * height:
                raise ValueError(f"{path}: PCD POINTS {points} is not WIDTH x HEIGHT ({width} x {height})")
        names, sizes, types = fields["FIELDS"], [int(v) for v in fields["SIZE"]], fields["TYPE"]
        counts = [int(v) for v in fields.get("COUNT", ["1"] * len(names))]
        data = fields["DATA"][0]
    except (KeyError, IndexError) as exc:
        raise ValueError(f"{path}: not a PCD header (FIELDS, SIZE, TYPE, POINTS or WIDTH and HEIGHT, DATA; "
                         f"{exc!r})") from None
    except ValueError as exc:
        if str(path) in str(exc):
            raise
        raise ValueError(f"{path}: not a PCD header (FIELDS, SIZE, TYPE, POINTS or WIDTH and HEIGHT, DATA; "
                         f"{exc!r})") from None
    if not len(names) == len(sizes) == len(types) == len(counts) or min(counts, default=1) < 1 or n < 0:
        raise ValueError(f"{path}: PCD FIELDS {names}, SIZE {sizes}, TYPE {types}, COUNT {counts} do not agree")
    if sum(counts) > _PCD_MAX_VALUES:  # (before a field type is listed per value)
        raise ValueError(f"{path}: PCD COUNT {counts} gives {sum(counts):,} values a point; at most "
                         f"{_PCD_MAX_VALUES:,}")
    dtypes, columns = [], []
    for name, t, b, c in zip(names, types, sizes, counts):
        if (t.upper(), b) not in _PCD_TYPES:
            raise ValueError(f"{path}: PCD field {name!r} has TYPE {t} SIZE {b}; not a type this reader knows")
        dtypes += [np.dtype(_PCD_TYPES[t.upper(), b])] * c
        columns += [name] * c
    _check_open3d_pcd_fields(path, names, types, sizes, counts)
    row = sum(d.itemsize for d in dtypes)
    held_bytes = size - start
    if data == "binary":
        if held_bytes < n * row:
            raise ValueError(f"{path}: the header says {n} points ({n * row} bytes) but the file holds "
                             f"{held_bytes // max(row, 1)} ({held_bytes} bytes of data; truncated)")
        if row and held_bytes - n * row >= row:  # (Open3D reads the header's count; a trailing newline is no point)
            raise ValueError(f"{path}: the header says {n} points but the file holds more: "
                             f"{held_bytes // row} whole {row}-byte records; the header's count is wrong (reading "
                             f"{n} would drop the rest silently)")
    elif data == "binary_compressed":
        if held_bytes < 8:
            raise ValueError(f"{path}: binary_compressed PCD data has no size words (truncated)")
        with open(path, "rb") as f:
            f.seek(start)
            packed, unpacked = np.frombuffer(f.read(8), "<u4").tolist()
        if unpacked != n * row or packed > held_bytes - 8:
            raise ValueError(f"{path}: the header says {n} points ({n * row} bytes) but the compressed data "
                             f"says {unpacked} bytes, packed in {packed} of the {held_bytes - 8} there")
    elif data == "ascii":
        # numpy allocates max_rows rows first: no more than the body's bytes can hold (a row of k numbers takes
        # 2k bytes, k digits and their separators and line end, the last line's end optional)
        fit = (held_bytes + 1) // (2 * max(len(dtypes), 1)) + 1
        try:
            with warnings.catch_warnings():  # numpy's note that max_rows counts rows, not blank lines
                warnings.simplefilter("ignore", UserWarning)
                rows = np.loadtxt(path, dtype=np.float64, ndmin=2, comments=None, skiprows=len(lines),
                                  max_rows=min(n + 1, fit))  # (one more: is there a row after them?)
        except ValueError as exc:
            raise ValueError(f"{path}: PCD ascii data is not rows of {len(dtypes)} numbers: {exc}") from None
        if len(rows) == fit <= n:  # (more rows than k-number rows fit: theirs are shorter, the count not read)
            raise ValueError(f"{path}: PCD ascii rows hold {rows.shape[1]} numbers; the header's fields "
                             f"need {len(dtypes)}")
        if len(rows) < n:
            raise ValueError(f"{path}: the header says {n} points but the file holds {len(rows)} (truncated)")
        if len(rows) > n:  # (Open3D reads the header's count: the rows after it went unread without a word)
            raise ValueError(f"{path}: the header says {n} points but the file holds more rows; the header's count "
                             f"is wrong (reading {n} would drop the rest silently)")
        if n and rows.shape[1] != len(dtypes):
            raise ValueError(f"{path}: PCD ascii rows hold {rows.shape[1]} numbers; the header's fields "
                             f"need {len(dtypes)}")
        int_cols = [j for j, dtype in enumerate(dtypes) if dtype.kind in "iu"]
        found = _pcd_int_problems(path, len(lines), n, int_cols, dtypes, rows) if n and int_cols else {}
        for j, dtype in enumerate(dtypes):
            problem = found.get(j) if j in int_cols else \
                _text_column_problem(None, rows[:, j], dtype, _PCD_INT_TOKEN) if n else None
            if problem is not None:
                i, why = problem[-2:]
                shown = problem[0][:40] if j in int_cols else float(rows[i, j])
                raise ValueError(f"{path}: point {i} value {j + 1} ({columns[j]!r}) is {shown!r}, {why}")
        return _text_positions(dtypes, columns, lambda j: rows[:n, j]) if n else None
    else:
        raise ValueError(f"{path}: PCD DATA {data!r} is not ascii, binary or binary_compressed")
    return None


_PCD_MAX_VALUES = 1 << 16  # values one PCD point may hold (the sum of COUNT; PCL's widest descriptors hold hundreds)
_ASCII_ROWS = 1 << 16  # lines of an ASCII PCD body whose integer tokens are checked at a time (the tests lower it)


def _pcd_int_problems(path: Path, skip: int, n: int, int_cols: list[int], dtypes, rows: np.ndarray) -> dict:
    """The integer fields' tokens of an ASCII PCD body (its ``n`` rows of
    numbers after ``skip`` header lines, read as float64 in ``rows``) as
    strtol reads them (1e1 as 1, 010 as 8): each field's first problem of
    :func:`_ranked_column_problem`, ``{field: (token, row, why)}``. The
    tokens come as Python strings ``_ASCII_ROWS`` lines at a time: one
    array of them all, fixed-width, took 4 bytes a character of the
    longest (one 200-digit label in 1M points: 1.1 GB)."""
    found: dict[int, tuple] = {}
    done = 0
    with open(path, encoding=None) as f, warnings.catch_warnings():  # (opened as np.loadtxt opens a path)
        warnings.simplefilter("ignore", UserWarning)  # (numpy's notes on blank lines and empty input)
        for _ in range(skip):
            f.readline()
        while done < n:
            lines = list(itertools.islice(f, _ASCII_ROWS))
            if not lines:
                break
            tokens = np.loadtxt(lines, dtype=object, ndmin=2, comments=None, max_rows=n - done, usecols=int_cols)
            for c, j in enumerate(int_cols):
                found[j] = _kept_problem(found.get(j), tokens[:, c].tolist(), rows[done:done + len(tokens), j],
                                         done, dtypes[j], _PCD_INT_TOKEN)
            done += len(tokens)
    return {j: (problem[3], problem[1], problem[2]) for j, problem in found.items() if problem is not None}


@_names_the_file
def read_open3d(path, label_map=None, ignore_index: int = DEFAULT_IGNORE, *, labels: bool = True) -> Sample:
    """A PLY or PCD file through open3d (optional extra ``open3d-cpu``; on
    Debian it needs the system library ``libusb-1.0-0``). Colour from
    ``colors``, intensity from ``intensity``, labels from a ``labels``,
    ``label``, ``class`` or ``classification`` attribute, or CloudCompare's
    ``scalar_Classification`` / ``scalar_Label`` fields (whole-number floats),
    or KITTI-360's ``semantic`` property (none with ``labels=False``). The header's point
    count is checked against the data there first (Open3D pads a short file
    with uninitialised memory); other suffixes are refused (Open3D reads
    ``.pts``, ``.xyz``... unchecked: a 20-byte ``.pts`` asked for 4 GB).

    Positions stored wider than float32 holds (double, 32- or 64-bit
    integers, and any ASCII body's text, read in float64) come as
    :func:`read_numpy` takes them (as stored where float32 holds them, else
    x and y relative to their minimum); binary float32 ones as stored."""
    path = Path(path)
    if path.suffix.lower() not in (".ply", ".pcd"):
        raise ValueError(f"{path}: read_open3d reads .ply or .pcd files (any case); got suffix {path.suffix!r}")
    try:
        import open3d as o3d
    except (ImportError, OSError) as exc:
        raise MissingExtra(f"reading PLY/PCD needs the optional extra open3d-cpu (pip install open3d-cpu; and the system's libusb-1.0-0): {exc}") from None
    # The checks parse an ASCII body as float64 to check it; the values still come from Open3D's own parse,
    # the only one exact for 64-bit integer fields (a U8 label past 2**53) and that unpacks a PCD's packed
    # float rgb, and the one that names the attributes as for a binary file; but for x, y, z declared
    # float32, which Open3D parses to float32 (UTM positions half a metre apart), the text's own float64.
    text_xyz = _check_ply(path) if path.suffix.lower() == ".ply" else _check_pcd(path)
    cloud = o3d.t.io.read_point_cloud(str(path))
    if "positions" not in cloud.point:
        raise ValueError(f"{path}: no points read")
    attrs = {k: cloud.point[k].numpy() for k in cloud.point}
    xyz = attrs["positions"]
    if text_xyz is not None:
        if text_xyz.shape != xyz.shape:
            raise ValueError(f"{path}: Open3D read {xyz.shape[0]} points, the header says {text_xyz.shape[0]}")
        xyz = text_xyz
    labels_key = next((k for k in _OPEN3D_LABELS if k in attrs), None) if labels else None
    raw = _integral(attrs[labels_key], f"{path} attribute {labels_key!r}", _placed(xyz)) if labels_key else None
    intensity = _scale_intensity(attrs["intensity"], f"{path} attribute 'intensity'") if "intensity" in attrs \
        else None
    rgb = _scale_rgb(attrs["colors"], f"{path} attribute 'colors'") if "colors" in attrs else None
    return Sample(_positions(xyz), _labels(raw, load_label_map(label_map) if label_map else None, ignore_index),
                  intensity, rgb, name=str(path))


@_names_the_file
def read_text(path, label_map="s3dis", ignore_index: int = DEFAULT_IGNORE, *, labels: bool = True) -> Sample:
    """S3DIS-style text: a file of rows ``x y z [r g b] [label]`` (colour in
    0..255), or a room folder with ``Annotations/<class>_<n>.txt`` files whose
    class comes from the file name through the map's ``names``; with
    ``labels=False`` an unlabelled sample (a label column skipped). The text
    is read in float64 and the positions come as :func:`read_numpy` takes
    float64 ones: as stored where float32 holds x and y within 0.1 mm (up
    to about 1 km), else relative to their minimum (the room's, for a
    folder), subtracted in float64 (UTM coordinates keep their millimetres),
    z as stored."""
    path = Path(path)
    label_map = load_label_map(label_map) if label_map is not None else None
    if path.is_dir():
        ann = path / "Annotations" if (path / "Annotations").is_dir() else path
        files = _visible(ann.glob("*.txt"))
        if not files:
            raise ValueError(f"{path}: no Annotations/*.txt files")
        parts, ids = [], []
        first = None  # (the first file, and whether it holds colour: every file must agree)
        for f in files:
            rows = _load_rows(f)
            _rgb_rows(rows, f)  # each file's colour range checked, naming it
            # x y z (r g b), a 4th or 7th column unread (the class comes from the name)
            rows = rows[:, :6] if rows.shape[1] >= 6 else rows[:, :3]
            if first is None:
                first = (f, rows.shape[1])
            elif rows.shape[1] != first[1]:
                shown = {3: "x y z, no colour", 6: "x y z r g b"}
                raise ValueError(f"{f}: {rows.shape[1]} columns ({shown[rows.shape[1]]}) where {first[0]} has "
                                 f"{first[1]} ({shown[first[1]]}); a room's annotation files must all hold colour "
                                 "or none")
            cls = f.stem.rsplit("_", 1)[0]
            tid = label_map.names.get(cls, ignore_index) if label_map is not None else ignore_index
            parts.append(rows)
            ids.append(np.full(len(rows), tid, dtype=np.int64))
        rows = np.concatenate(parts)
        parts.clear()  # (the files' rows: not held beside the room's)
        rgb, xyz = _rgb_rows(rows, path), _positions(rows)
        del rows  # (nor the room's while the sample casts and checks its arrays)
        return Sample(xyz, np.concatenate(ids) if labels else None, rgb=rgb, name=str(path))
    rows = _load_rows(path)
    if rows.shape[1] == 7 and (_finite(rows[:, 3]) < 0).any():  # (no S3DIS colour: Semantic3D's intensity)
        raise ValueError(f"{path}: 7 columns whose 4th holds negative values: not S3DIS rows x y z r g b label "
                         "(colour is 0 or more) but, it seems, a Semantic3D scan x y z intensity r g b; read it "
                         "with read_semantic3d, or put its <name>.labels beside it, or give the label map "
                         "'semantic3d' (--label-map semantic3d) for read_cloud to read it so")
    raw = _integral(rows[:, -1], f"{path} label column", _placed(rows)) if labels and rows.shape[1] in (4, 7) \
        else None
    rgb, xyz = _rgb_rows(rows, path), _positions(rows)
    del rows  # (the float64 rows: not held while the sample casts and checks its arrays)
    return Sample(xyz, _labels(raw, label_map, ignore_index, f"{path} label column"), rgb=rgb, name=str(path))


# Semantic3D's intensity: a signed 12-bit integer per point
_SEMANTIC3D_INTENSITY = (-2048, 2047)


@_names_the_file
def read_semantic3d(path, label_map="semantic3d", ignore_index: int = DEFAULT_IGNORE, *,
                    labels: bool = True) -> Sample:
    """A Semantic3D scan: ``<name>.txt`` rows ``x y z intensity r g b``
    (intensity an integer in -2048..2047, colour in 0..255) and the labels
    in ``<name>.labels`` beside it, one integer a line, a line per point (0
    unlabelled, 1..8 the classes; the ``semantic3d`` map, the default, sends
    0 to ``ignore_index``). The benchmark's test scans have no ``.labels``:
    without one (or with ``labels=False``) the sample is unlabelled. A
    ``.labels`` of another count of lines than the scan's rows is a
    ValueError naming both files, as is a label that is not a whole number.
    Intensity comes as ``(i + 2048) / 4095``: -2048..2047 onto 0..1, the
    range the other readers give (fixed, as SemanticKITTI's remissions, so
    not scaled by a percentile); an intensity outside -2048..2047 or not a
    whole number, or a colour outside 0..255, is a ValueError naming the
    file. Positions as :func:`read_text` takes them (float64 text: as
    :func:`read_numpy` takes float64 positions)."""
    path = Path(path)
    label_map = load_label_map(label_map) if label_map is not None else None
    rows = _load_rows(path, (7,), "x y z intensity r g b (Semantic3D)")
    placed = np.isfinite(rows[:, :3]).all(1)  # (a point without a position: left for Sample to refuse or drop)
    lo, hi = _SEMANTIC3D_INTENSITY
    raw_i = rows[placed, 3]
    bad = ~((raw_i >= lo) & (raw_i <= hi) & (np.floor(raw_i) == raw_i))
    if bad.any():
        first = float(raw_i[np.argmax(bad)])
        raise ValueError(f"{path}: intensity (column 4) must be a whole number in {lo}..{hi}, as Semantic3D's is; "
                         f"{int(bad.sum())} of {raw_i.size} points' intensities are not (first {first!r})")
    rgb = rows[placed, 4:7]
    bad = ~((rgb >= 0) & (rgb <= 255)).all(1)
    if bad.any():
        raise ValueError(f"{path}: colour (columns 5-7) must lie in 0..255, as Semantic3D's does; {int(bad.sum())} "
                         f"of {len(rgb)} points' colours do not (first {rgb[np.argmax(bad)].tolist()})")
    intensity = ((rows[:, 3:4] - lo) / (hi - lo)).astype(np.float32)
    rgb = _scale_rgb(rows[:, 4:7], str(path), 255.0)
    raw = None
    label_path = path.with_suffix(".labels")
    if labels and label_path.is_file():
        try:
            with warnings.catch_warnings():  # (numpy warns "input contained no data" on an empty file)
                warnings.simplefilter("ignore", UserWarning)
                raw = np.loadtxt(label_path, dtype=np.float64, ndmin=2)
        except ValueError as exc:
            raise ValueError(f"{label_path}: not one integer label a line (labels of {path}): {exc}") from None
        if raw.shape[1] != 1 and raw.size:
            raise ValueError(f"{label_path}: must hold one integer label a line (labels of {path}); got "
                             f"{raw.shape[1]} columns")
        raw = _integral(raw.reshape(-1), f"{label_path} (labels of {path})", placed)
        if raw.size != len(rows):
            raise ValueError(f"{label_path}: {raw.size} labels for the {len(rows)} points of {path} (one label a "
                             "line, a line per point)")
    xyz = _positions(rows)
    del rows
    return Sample(xyz, _labels(raw, label_map, ignore_index, f"{label_path}"), intensity, rgb, name=str(path))


def _load_rows(path, columns=(3, 4, 6, 7), layout: str = "x y z [r g b] [label]") -> np.ndarray:
    try:
        with warnings.catch_warnings():  # (numpy warns "input contained no data" on an empty file: said below)
            warnings.simplefilter("ignore", UserWarning)
            rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise ValueError(f"{path}: not rows of numbers: {exc}") from None
    if rows.size == 0:  # (numpy gives an empty file, or one of comments only, as 0 rows of 1 column)
        raise ValueError(f"{path}: holds no points (an empty file, or comments only); rows must hold {layout}")
    if rows.shape[1] not in columns:
        raise ValueError(f"{path}: rows must hold {layout}; got {rows.shape[1]} columns")
    return rows


def _rgb_rows(rows, where):
    """Text colour in 0..255, or 16-bit (0..65535) where a value passes 255,
    scaled to 0..1 once (by :func:`_scale_rgb`); negative values or values
    above 65535 a ValueError naming ``where``."""
    if rows.shape[1] < 6:
        return None
    rgb = rows[:, 3:6]
    span = _finite_range(rgb)  # (a NaN row's colour: no 16-bit colour)
    return _scale_rgb(rgb, str(where), 255.0 if span is None or span[1] <= 255 else 65535.0)


def read_cloud(path, label_map=None, ignore_index: int = DEFAULT_IGNORE, *, labels: bool = True) -> Sample:
    """Any supported file, by extension (``.bin`` SemanticKITTI, ``.npy``/
    ``.npz``, ``.las``/``.laz``, ``.ply``/``.pcd``, ``.txt`` or an S3DIS room
    folder). A ``.txt`` is a Semantic3D scan (:func:`read_semantic3d`) where
    a ``<stem>.labels`` lies beside it or ``label_map`` is Semantic3D's
    (``"semantic3d"``: the benchmark's test scans, which have no
    ``.labels``), else S3DIS rows (:func:`read_text`). ``label_map``
    defaults to SemanticKITTI's for ``.bin``, Semantic3D's for a Semantic3D
    scan, S3DIS's for other text.
    ``labels=False``: the points and their features only, the file's labels
    (and a labels file beside it) not read, whatever they hold."""
    _check_path(path)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".bin":
        return read_semantickitti(path, label_map=label_map or "semantic-kitti", ignore_index=ignore_index,
                                  labels=labels)
    if suffix in (".npy", ".npz"):
        return read_numpy(path, label_map, ignore_index, labels=labels)
    if suffix in (".las", ".laz"):
        return read_las(path, label_map, ignore_index, labels=labels)
    if suffix in (".ply", ".pcd"):
        return read_open3d(path, label_map, ignore_index, labels=labels)
    if suffix == ".txt" and _is_semantic3d(path, label_map):
        return read_semantic3d(path, label_map or "semantic3d", ignore_index, labels=labels)
    if suffix == ".txt" or path.is_dir():
        return read_text(path, label_map or "s3dis", ignore_index, labels=labels)
    raise ValueError(f"{path}: unknown point cloud format {suffix!r} (.bin .npy .npz .las .laz .ply .pcd .txt)")


def _is_semantic3d(path: Path, label_map=None) -> bool:
    """Whether :func:`read_cloud` reads the ``.txt`` at ``path`` as a
    Semantic3D scan: a ``<stem>.labels`` lies beside it, or ``label_map`` is
    Semantic3D's (its name, or the map loaded from it)."""
    if path.with_suffix(".labels").is_file():
        return True
    if isinstance(label_map, (str, os.PathLike)):
        return os.fspath(label_map) == "semantic3d" or Path(label_map).resolve() == LABEL_MAP_DIR.resolve() / \
            "semantic3d.json"
    return isinstance(label_map, LabelMap) and (LABEL_MAP_DIR / "semantic3d.json").is_file() and \
        label_map == load_label_map("semantic3d")


def _visible(paths) -> list[Path]:
    """``paths`` sorted, less the hidden ones (names starting with '.'): a
    folder's search skips them as the shell's glob and ``glob.glob`` do
    (macOS leaves ``._scan.bin`` AppleDouble files beside each scan it
    copies; ``pathlib``'s glob matched them)."""
    return sorted(p for p in paths if not p.name.startswith("."))


def find_clouds(specs) -> list[Path]:
    """Cloud files named by paths, globs (``**`` matching any depth of
    folders, each real folder once: symlinked folders are followed, never
    round a loop) or folders. A folder is searched for
    ``velodyne/*.bin`` (SemanticKITTI), ``points/*.npy`` (Open3D-ML), else
    every supported file in it (``*labels*`` arrays, ``.bin`` and ``.txt``
    files are label files, not clouds (a ``*labels*`` LAS, LAZ, PLY or PCD
    file, which holds positions, is a cloud), nor are Semantic3D's ``.labels`` and SemanticKITTI's
    ``.label``, in a folder or a glob: in a
    glob, the ``*labels*`` arrays that are the labels of a cloud file there;
    hidden files, named ``.*``, are skipped as a glob skips them, and so
    are text files named README*, LICENSE*, LICENCE*, NOTICE*, COPYING*,
    CHANGELOG* or CITATION*, any case);
    an S3DIS room folder (with ``Annotations/``) is one cloud. A path found
    by two specs comes once, where first found. An empty path (``""``, which
    ``Path`` takes for the current folder) is a ValueError."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    given = specs
    iterable = hasattr(specs, "__iter__") and not isinstance(specs, (bytes, dict))
    specs = list(specs) if iterable else []
    if not iterable or not all(isinstance(s, (str, os.PathLike)) for s in specs):
        got = [type(s).__name__ for s in specs] if iterable else type(given).__name__
        raise TypeError(f"specs must be a path, glob or folder (str or Path), or a list of them; got {got}")
    if any(os.fspath(s) == "" for s in specs):  # (Path("") is ".": every cloud of the current folder was read)
        raise ValueError(f"specs must not hold an empty path (a file, glob or folder each); got {given!r:.200}")
    out: list[Path] = []
    for spec in specs:
        spec = os.fspath(spec)
        # A path that exists is taken as named, even where it holds glob characters ("scan[1].npy").
        # ('**' any depth of folders, as pathlib and zsh take it: it matched one level, so "tiles/**/*.npz"
        # read the clouds one folder down and skipped the rest without a word)
        matches = sorted(_glob(spec)) if any(ch in spec for ch in "*?[") and not os.path.exists(spec) else [spec]
        if matches != [spec]:  # (a glob's Semantic3D .labels and SemanticKITTI .label files are its scans'
            # labels, not clouds: 'seq/*/*' over velodyne/ and labels/ stopped on a .label as an unknown format)
            clouds = [m for m in matches if not m.lower().endswith((".labels", ".label"))]
            if matches and not clouds:
                kitti = any(m.lower().endswith(".label") for m in matches)
                raise ValueError(f"{spec!r} matches only " + (
                    ".label files (SemanticKITTI labels; give the velodyne/*.bin scans)" if kitti else
                    ".labels files (Semantic3D labels; give the .txt scans)"))
            # (nor are the label arrays of Open3D-ML's clouds: '*.npy' over x_points_0.npy and x_labels_0.npy
            # read the labels as a cloud, and stopped on its (N, 1) shape)
            arrays = {m for m in clouds if _labels_of_a_cloud(Path(m))}
            if clouds and len(arrays) == len(clouds):
                shown = ", ".join(sorted(arrays)[:3]) + (f" and {len(arrays) - 3} more" if len(arrays) > 3 else "")
                raise ValueError(f"{spec!r} matches only the label arrays of clouds ({shown}): give the clouds")
            matches = [m for m in clouds if m not in arrays]
        if not matches:
            raise ValueError(f"no files match {spec!r}")
        for m in map(Path, matches):
            if not m.exists():
                raise ValueError(f"{m}: no such file or folder")
            if m.is_file():
                out.append(m)
                continue
            found = _folder_clouds(m)
            if not found:
                raise ValueError(_no_clouds(m))
            out.extend(found)
    # Each path once (a folder and a file in it, overlapping globs): eval scored a cloud named twice twice.
    # By the path as named, made absolute: two links to one file stay two clouds (predict names an output
    # after each).
    unique: dict[str, Path] = {}
    for p in out:
        unique.setdefault(os.path.abspath(p), p)
    return list(unique.values())


def _glob(spec: str) -> list[str]:
    """The paths ``spec`` matches as ``glob.glob(spec, recursive=True)``
    takes it (a ``**`` component any depth of folders, hidden ones not
    searched), but each ``**`` searches each folder once, by its real path,
    under the shortest name that reaches it: glob's followed a symlink to a
    folder above it round the loop (``latest -> ..``: every cloud below 41
    times, one lap longer each; two such links never returned). A symlink
    to a folder is followed, as glob followed it, unless that folder is
    searched already (under a shorter name, or as one above it)."""
    parts = spec.split(os.sep)
    if "**" not in parts:
        return glob.glob(spec)
    i = parts.index("**")
    head, tail = os.sep.join(parts[:i]), os.sep.join(parts[i + 1:])
    if i and not head:  # ('/**/...': the root)
        head = os.sep
    bases = [b for b in (glob.glob(head) if glob.has_magic(head) else [head]) if os.path.isdir(b or os.curdir)]
    out: list[str] = []
    for base in bases:
        for folder in _folders_below(base):
            if tail:
                out.extend(_glob(os.path.join(glob.escape(folder), tail) if folder else tail))
            else:  # ('x/**': the folder, as glob gives it, every folder below and the files in each)
                if folder:  # (the current folder, '**' alone, is not named: glob gives its contents)
                    out.append(folder if folder != base else os.path.join(base, ""))
                out.extend(f for f in glob.glob(os.path.join(glob.escape(folder), "*")) if not os.path.isdir(f))
    return out


def _folders_below(base: str) -> list[str]:
    """``base`` ("" the current folder) and the folders below it that are
    not hidden, symlinked ones followed, each real folder once, under the
    shortest path that reaches it (breadth first, names sorted)."""
    seen, found = set(), []
    queue = collections.deque([base])
    while queue:
        folder = queue.popleft()
        real = os.path.realpath(folder or os.curdir)
        if real in seen:
            continue
        seen.add(real)
        found.append(folder)
        try:
            with os.scandir(folder or os.curdir) as entries:
                names = sorted(e.name for e in entries if not e.name.startswith(".") and _is_folder(e))
        except OSError:  # (unreadable: glob skipped it too)
            continue
        queue.extend(os.path.join(folder, name) for name in names)
    return found


def _is_folder(entry) -> bool:
    try:
        return entry.is_dir()  # (a symlink to a folder too)
    except OSError:
        return False


# Text files a dataset folder holds beside its clouds (a folder's search skips
# them; matched on the name's start, any case).
_DOCUMENT_NAMES = ("README", "LICENSE", "LICENCE", "NOTICE", "COPYING", "CHANGELOG", "CITATION")


# Formats whose files always hold points (a header and positions): never a label file, whatever the name
# (a folder's search skips the other formats' files named *labels*: they may be bare label arrays or text).
_POINT_FORMATS = (".las", ".laz", ".ply", ".pcd")


def _folder_clouds(folder: Path) -> list[Path]:
    """The clouds :func:`find_clouds` finds in one folder (not searched deeper)."""
    if (folder / "Annotations").is_dir():
        return [folder]
    if (folder / "velodyne").is_dir():
        return _visible((folder / "velodyne").glob("*.bin"))
    if (folder / "points").is_dir():
        return _visible((folder / "points").glob("*.npy"))
    return [p for p in _visible(folder.iterdir()) if p.suffix.lower() in
            (".bin", ".npy", ".npz", ".las", ".laz", ".ply", ".pcd", ".txt")
            and ("labels" not in p.name or p.suffix.lower() in _POINT_FORMATS)
            and p.is_file()  # (not a folder named "x.npy")
            and not (p.suffix.lower() == ".txt" and p.name.upper().startswith(_DOCUMENT_NAMES))]


def _no_clouds(folder: Path) -> str:
    """Why ``folder`` gives no clouds; where its subfolders hold some (S3DIS's
    ``Area_5`` of rooms, SemanticKITTI's ``sequences``), naming them and the
    glob that takes them all."""
    message = f"{folder}: no point cloud files in this folder"
    for layout, pattern in (("velodyne", "*.bin"), ("points", "*.npy")):  # (the layouts _folder_clouds reads)
        if (folder / layout).is_dir():
            return f"{message} (its {layout}/ holds no {pattern} files)"
    entries = _visible(folder.iterdir())
    holders = [sub.name for sub in entries if sub.is_dir() and _folder_clouds(sub)]
    if holders:
        shown = ", ".join(holders[:5]) + (f" and {len(holders) - 5} more" if len(holders) > 5 else "")
        # (the glob only where it matches nothing else: a match that holds no cloud is refused)
        every = f", or '{folder / '*'}' for all" if len(holders) == len(entries) else ""
        message += f"; its subfolders {shown} hold clouds (a folder is not searched deeper: give them{every})"
    return message
