"""Checkpoint files that are data, never code, and that say when they are damaged.

A checkpoint is written as a small envelope ``{"format": FORMAT, "sha256":
hex digest, "payload": bytes}``, where ``payload`` is the ``torch.save`` of the
state; both levels are read with ``torch.load(weights_only=True)``, so a file
can hold tensors, numbers, strings and containers of them but can never run
code. The digest is checked before the payload is unpickled: a flipped byte
anywhere is a ``ValueError`` naming the file. Files written before the
envelope existed (a plain state dictionary, or any ``torch.save`` of data)
are still read, with ``weights_only=True`` but without a digest to check:
the CRC-32 the zip format keeps of each record is checked instead (a
flipped byte in a tensor's data is a ``ValueError`` naming the file;
``torch.load`` checks none).

Writes are atomic (a per-process temporary file beside the target, flushed,
then renamed) and :class:`DirectoryLock` keeps two runs from writing into the
same output directory."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import secrets
import sys
import zipfile
from pathlib import Path

import torch

from ._ext import brief

FORMAT = "pointsparse-checkpoint-1"
_ENVELOPE_KEYS = {"format", "sha256", "payload"}


def _serialise(state) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


#: What pickling raises on an object it cannot take at all (a lambda, a lock, a generator).
_PICKLE_ERRORS = (pickle.PicklingError, AttributeError, TypeError)


def _pickled(state) -> bytes | None:
    """:func:`_serialise`'s bytes, or None where pickle cannot take ``state``."""
    try:
        return _serialise(state)
    except _PICKLE_ERRORS:
        return None


#: The longest file name, in bytes, that common file systems take (ext4, XFS, Btrfs).
_NAME_BYTES = 255


def atomic_write(path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` (a name unique
    to this process and call; ``path``'s name, cut where the two would pass
    a file name's 255 bytes), flush it to disk, then rename it over ``path``:
    an interrupt or a concurrent writer never leaves a torn file."""
    path = Path(path)
    suffix = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    name = path.name  # (cut where the temporary name would pass the 255 bytes a file name may have)
    while name and len(os.fsencode(f".{name}{suffix}")) > _NAME_BYTES:
        name = name[:-1]
    tmp = path.with_name(f".{name}{suffix}")
    handling = sys.exc_info()[1]  # (the caller's: what the chain below stops at)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        # (torch's writer raised its own "unexpected pos" RuntimeError while a Ctrl-C or a full disk left its
        # archive: the Ctrl-C was a traceback of exit status 1, and the disk's error hid above the last line)
        chain = _chain(error, handling)
        stop = next((e for e in chain if isinstance(e, KeyboardInterrupt)), None)
        if stop is not None and stop is not error:
            raise stop.with_traceback(None) from None
        failed = next((e for e in chain if isinstance(e, OSError) and e.strerror and e.filename is None), None)
        if failed is not None:
            raise OSError(failed.errno, f"{failed.strerror} (writing it)", os.fspath(path)) from error
        raise


def _chain(error: BaseException, outside: BaseException | None = None) -> list[BaseException]:
    """``error`` and the exceptions being handled when it was raised
    (``__context__``, each in turn), up to ``outside`` (what the caller was
    handling when the write began: no cause of the write's)."""
    chain = [error]
    while (chain[-1].__context__ is not None and chain[-1].__context__ is not outside
           and all(e is not chain[-1].__context__ for e in chain)):
        chain.append(chain[-1].__context__)
    return chain


#: Seconds since its last write after which a dead process's temporary file is taken as left (a live writer on
#: another machine of a shared folder writes on, its process id meaningless here; ten minutes leave room for the
#: clocks of a file server and this machine to differ).
_LEFT_AFTER_S = 600.0


def _remove_left_temporaries(folder: Path, name: str) -> None:
    """Remove the temporary files of :func:`atomic_write` for the file
    ``name`` in ``folder`` whose process is gone from this machine and that
    nothing wrote for :data:`_LEFT_AFTER_S` (:func:`save` calls it before
    each checkpoint): a write killed by SIGKILL (a
    ``--nproc`` worker torch's spawn ended) runs no clean-up, and its file,
    as large as a checkpoint, stayed beside the run for good."""
    import glob
    import time

    try:
        found = list(folder.glob(f".{glob.escape(name)}.tmp-*-*"))
    except OSError:
        return
    for tmp in found:
        pid = tmp.name[len(name) + 6:].partition("-")[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            if time.time() - tmp.stat().st_mtime > _LEFT_AFTER_S:
                tmp.unlink()
        except OSError:  # (gone meanwhile, or not ours to remove: left)
            pass


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (one of another user's
    counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def _loads(payload: bytes) -> bool:
    """Whether :func:`load` takes ``payload`` (the data-only unpickler
    accepts it): read onto the meta device, the unpickler's work without a
    copy of the tensors' bytes; where that device cannot rebuild a tensor
    (a quantized one), read onto the CPU as :func:`load` does."""
    try:
        torch.load(io.BytesIO(payload), map_location="meta", weights_only=True)
    except pickle.UnpicklingError:
        return False
    except Exception:  # (not the unpickler's refusal: the meta device's limits)
        try:
            torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return False
    return True


_CONTAINERS = (dict, list, tuple, set, frozenset)


def _refused(value, where: str = "state", seen: set | None = None) -> str | None:
    """``"an object of TYPE at PLACE"`` for the first object in ``value``
    that :func:`load` refuses (or pickle cannot take) while all it holds is
    taken (each object put to the unpickler alone: what it takes is the
    unpickler's to say, the classes a caller allows too), or None. ``seen``: the ids of the
    containers walked so far (each is walked once: one holding itself, or
    held in several places, whose first walk finds what a second would)."""
    if type(value) in (torch.Tensor, torch.nn.Parameter, str, bytes, int, float, bool, type(None)):
        return None
    if isinstance(value, _CONTAINERS):
        seen = set() if seen is None else seen
        if id(value) in seen:
            return None
        seen.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            found = _refused(key, f"a key of {where}", seen) or _refused(item, f"{where}[{key!r}]", seen)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _refused(item, f"{where}[{i}]", seen)
            if found:
                return found
    elif isinstance(value, (set, frozenset)):
        for item in value:
            found = _refused(item, f"an item of {where}", seen)
            if found:
                return found
    if type(value) in _CONTAINERS:
        return None
    payload = _pickled(value)
    if payload is not None and _loads(payload):
        return None
    kind = type(value)
    return f"an object of {kind.__module__}.{kind.__qualname__} at {where}"


#: The deepest nesting of containers :func:`save` takes (a training
#: checkpoint's optimizer state nests about five): its walks of the state and
#: pickle recurse once per level, and Python's recursion limit (1000) stopped
#: them some hundreds of levels down with a RecursionError naming nothing.
MAX_NESTING = 100


def _too_deep(value, where: str = "state") -> str | None:
    """The place (its first levels, then ``...``) of a container in
    ``value`` nested more than :data:`MAX_NESTING` levels deep, or None;
    walked with a stack of its own (no recursion), each container once."""
    seen: set[int] = set()
    stack = [(value, where, 0)]
    while stack:
        value, where, depth = stack.pop()
        if not isinstance(value, _CONTAINERS) or id(value) in seen:
            continue
        if depth > MAX_NESTING:
            return where
        seen.add(id(value))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(item, _CONTAINERS):
                place = f"{where}[{key!r}]" if depth < 3 and not isinstance(value, (set, frozenset)) else \
                    where if where.endswith("...") else f"{where}..."
                stack.append((item, place, depth + 1))
        if isinstance(value, dict):
            stack.extend((key, f"a key of {where}", depth + 1) for key in value if isinstance(key, _CONTAINERS))
    return None


def _meta_tensor(value, where: str = "state", seen: set | None = None) -> str | None:
    """The place of the first tensor on the meta device (a shape, no values)
    in ``value`` (a tensor, or containers of them), or None."""
    if isinstance(value, torch.Tensor):
        return where if value.is_meta else None
    if not isinstance(value, _CONTAINERS):
        return None
    seen = set() if seen is None else seen
    if id(value) in seen:  # (a container holding itself)
        return None
    seen.add(id(value))
    if isinstance(value, dict):
        places = ((item, f"{where}[{key!r}]") for key, item in value.items())
    elif isinstance(value, (list, tuple)):
        places = ((item, f"{where}[{i}]") for i, item in enumerate(value))
    else:
        places = ((item, f"an item of {where}") for item in value)
    return next((found for item, place in places if (found := _meta_tensor(item, place, seen))), None)


def _as_path(path) -> Path:
    """``path`` (a str or ``os.PathLike``) as a Path, else a TypeError naming it."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be the checkpoint file's path (a str or Path); got {type(path).__name__}")
    return Path(path)


def save(path, state) -> None:
    """Write ``state`` (tensors, numbers, strings, containers) to ``path``
    atomically, with a SHA-256 digest of its bytes. ``TypeError`` (nothing
    written) naming the type and place of an object in ``state`` that
    :func:`load` would refuse (a numpy number, a Path, an
    argparse.Namespace, ...) or pickle cannot take (a lambda, a lock):
    the payload is put to :func:`load`'s unpickler before the file is
    written. ``FileNotFoundError`` naming the
    folder where ``path``'s does not exist, ``ValueError`` where ``path``
    is a folder, ``state`` holds a tensor on the meta device (a shape,
    no values) or nests containers more than :data:`MAX_NESTING` levels
    deep; ``TypeError`` where it is no path (a str or Path)."""
    given, path = path, _as_path(path)
    if str(os.fspath(given)).endswith(("/", os.sep)):  # (pathlib drops the slash: a file of the folder's name)
        raise ValueError(f"{os.fspath(given)} is a folder (it ends with a slash); give the checkpoint file to write "
                         f"(e.g. {path / 'checkpoint.pt'})")
    if path.is_dir():  # (else an error naming the hidden temporary file, after the work of serialising)
        raise ValueError(f"{path} is a folder; give the checkpoint file to write (e.g. {path / 'checkpoint.pt'})")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no folder {path.parent} to write the checkpoint {path.name} in")
    deep = _too_deep(state)
    if deep:  # (before the walks below and pickle, which recurse once per level)
        raise ValueError(f"state nests containers more than {MAX_NESTING} levels deep (at {deep}), more than a "
                         "checkpoint holds; flatten it (a list of records, not records holding records)")
    meta = _meta_tensor(state)
    if meta:  # (a model built on the meta device, not materialised: the file would hold no weights)
        raise ValueError(f"{meta} is a tensor on the meta device (a shape, no values), which a checkpoint cannot "
                         "hold; materialise the model first (model.to_empty(device='cpu'), then initialise or load "
                         "its weights)")
    payload = _pickled(state)
    # (a file no run could load back, or no file at all: found at once, not when resuming)
    if payload is None or not _loads(payload):
        what = _refused(state) or "an object that is no data"
        raise TypeError(f"state holds {what}, which checkpoint.load refuses (it reads data only: tensors, "
                        "Python numbers, strings, bytes and containers of them); convert it before saving "
                        "(float(x), x.tolist(), str(path), vars(namespace))")
    envelope = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    # (a checkpoint's folder, once per save: predict's thousands of small atomic writes list no folder)
    _remove_left_temporaries(path.parent, path.name)
    atomic_write(path, lambda f: torch.save(envelope, f))


# What torch.load raises on a file that is not a (whole) torch file, or that
# holds something weights_only refuses.
_READ_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError,
                IndexError, TypeError, AttributeError, OSError, UnicodeDecodeError, OverflowError, MemoryError)


def _load_bytes(source, path: Path, what: str):
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # (an "Unsupported operand" is a byte that starts no pickle opcode: text, JSON, garbage)
        if ("weights_only" in str(exc) or "Unsupported global" in str(exc)) and "Unsupported operand" not in str(exc):
            raise ValueError(f"{path}: {what} holds Python objects other than tensors and plain data; "
                             "pointsparse loads checkpoints as data only (weights_only=True) and refuses it") from None
        # (the line saying what, not torch's advice to retry with weights_only=False)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise ValueError(f"{path}: {what} is damaged or not a torch file ({reason[:200]})") from None
    except _READ_ERRORS as exc:
        raise ValueError(f"{path}: {what} is damaged, truncated or not a torch file ({brief(exc)})") from None


def archive_kind(path) -> str | None:
    """What the zip archive at ``path`` holds, read off its member names:
    ``"program"`` (a ``torch.export.save`` file, :mod:`pointsparse.export`'s
    ``.pt2``), ``"torch.save"`` (a checkpoint, or any ``torch.save`` file),
    else None (no zip, one that does not read, another archive). For the
    errors of a file given where the other kind is read."""
    try:
        with zipfile.ZipFile(path) as archive:
            if embedded(archive):
                return None
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, UnicodeDecodeError):
        return None
    if any(name.endswith(("/archive_format", "/models/model.json")) for name in names):
        return "program"
    if any(name.endswith("/data.pkl") and name.count("/") == 1 for name in names):
        return "torch.save"
    return None


def embedded(archive: zipfile.ZipFile) -> bool:
    """Whether the archive Python's ``zipfile`` found is one stored inside
    the file rather than the file's own: its first record starts past the
    file's first byte. A file cut short loses its own archive's end records,
    and ``zipfile`` then takes the end records of a zip the file holds
    uncompressed (an exported program holds a ``torch.save`` archive of its
    sample inputs): the cut program read as a checkpoint. torch writes its
    archives from their first byte."""
    records = archive.infolist()
    return bool(records) and min(r.header_offset for r in records) > 0


def _bad_record(path: Path) -> str | None:
    """The name of the first record of the zip archive at ``path`` whose
    CRC-32 does not match its bytes (or whose header does not read), or None
    (all match, or no zip: torch's format before 1.6 keeps no CRC).
    ``torch.load`` checks none of them."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, UnicodeDecodeError):
        return None


def check_readable(path: Path, label: str, give: str, example: str | None = None,
                   missing: type[Exception] = ValueError, missing_message: str | None = None) -> None:
    """The checks before a file at ``path`` is read (a checkpoint, an
    exported program, a latency table): ``ValueError`` where it is a folder
    (naming ``example``, the file such a folder holds, where given) or is no
    regular file (a pipe, a device: never opened, a pipe would block);
    ``missing`` (``missing_message``, by default "LABEL does not exist")
    where there is nothing. ``label`` names the path in the messages,
    ``give`` the file to give instead."""
    if path.is_dir():
        raise ValueError(f"{label} is a folder; give {give} in it (e.g. {path / example})" if example is not None
                         else f"{label} is a folder; give {give}")
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{label} is not a regular file; give {give}")
        raise missing(missing_message or f"{label} does not exist")


def load(path):
    """The state saved by :func:`save` (or a plain ``torch.save`` of data)
    at ``path``, read as data only. ``ValueError`` naming the file when it is
    missing, damaged (digest or zip CRC-32 mismatch, truncated, not a torch
    file), no regular file or holds anything but data; ``TypeError`` where
    it is no path (a str or Path)."""
    path = _as_path(path)
    check_readable(path, f"checkpoint {path}", "the checkpoint file", "checkpoint.pt")
    try:
        outer = _load_bytes(path, path, "the checkpoint")
    except ValueError:
        if archive_kind(path) == "program":  # (torch's reader said it found no data.pkl: "damaged")
            raise ValueError(f"{path} is an exported program (pointsparse export's .pt2), not a checkpoint: run "
                             "it with pointsparse.export.ProgramModel.load, or give it to --program "
                             "(pointsparse eval, predict)") from None
        raise
    if not (isinstance(outer, dict) and _ENVELOPE_KEYS & set(outer)):
        # a file written before the envelope (or by torch.save): data only, no digest, but the zip's CRCs
        bad = _bad_record(path)
        if bad is not None:
            raise ValueError(f"{path}: the checkpoint is corrupted (the CRC-32 of its record {bad} does not match "
                             "its contents)")
        return outer
    payload, digest = outer.get("payload"), outer.get("sha256")
    if outer.get("format") != FORMAT or not isinstance(payload, bytes) or not isinstance(digest, str):
        raise ValueError(f"{path}: the checkpoint's envelope is damaged or of an unknown format "
                         f"(expected {FORMAT!r} with a payload and its SHA-256)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError(f"{path}: the checkpoint is corrupted (SHA-256 of its contents does not match the "
                         "digest written with it)")
    return _load_bytes(io.BytesIO(payload), path, "the checkpoint's contents")


def load_training(path) -> dict:
    """A training checkpoint (``pointsparse train``, ``pointsparse prune
    channels``): :func:`load`, and a ``ValueError`` naming the file when it
    is not a dict with ``model`` and ``config``, or its record of the run
    (``args``, ``val_paths``) is of another kind than its runs write."""
    state = load(path)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        what = f"{path} is not a pointsparse training checkpoint (a dict with 'config' and 'model')"
        if not isinstance(state, dict):
            raise ValueError(f"{what}; it holds a {type(state).__name__}")
        if _is_state_dict(state):
            raise ValueError(f"{what}: it holds a bare state_dict ({len(state)} tensors, no config); build the model "
                             "it belongs to and load_state_dict it, or give pointsparse.models.model_from_state "
                             "{'config': {...}, 'model': state_dict}" + _kernels_note(state))
        keys = ", ".join(repr(k) for k in list(state)[:5]) + (", ..." if len(state) > 5 else "")
        inner = next((v for v in state.values() if _is_state_dict(v)), None)  # ({"state_dict": ...}, theirs)
        raise ValueError(f"{what}; its keys are {keys or 'none'}" + ("" if inner is None else _kernels_note(inner)))
    check_config(state["config"], path)
    _check_run_record(state, path)
    return state


def _check_run_record(state: dict, path) -> None:
    """``ValueError`` naming the file and the entry where a training
    checkpoint's record of its run, which eval, prune and ``--resume`` read
    for the run's data, is of another kind than its runs write: ``args``
    (a dict of its flags by name; ``data`` and ``val_data`` lists of
    sources or None) and ``val_paths`` (a list of file paths), each where
    present and not None (its readers take None for none; another kind was
    an AttributeError or "not iterable" from them, naming no file)."""
    def strings(value) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    args = state.get("args") or {}
    if not (isinstance(args, dict) and all(isinstance(k, str) for k in args)):
        raise ValueError(f"{path}: its args must be a dict of the run's flags by name (a damaged or hand-edited "
                         f"checkpoint); got {type(args).__name__}" + (" with keys that are no names"
                                                                      if isinstance(args, dict) else ""))
    for key in ("data", "val_data"):
        if args.get(key) is not None and not strings(args[key]):
            raise ValueError(f"{path}: its args' {key} must be a list of the run's sources (str) or None (a damaged "
                             f"or hand-edited checkpoint); got {args[key]!r:.100}")
    if state.get("val_paths") is not None and not strings(state["val_paths"]):
        raise ValueError(f"{path}: its val_paths must be a list of file paths (str), the clouds the run validated "
                         f"on (a damaged or hand-edited checkpoint); got {state['val_paths']!r:.100}")


def _is_state_dict(value) -> bool:
    """Whether ``value`` is a non-empty dict of str -> tensor."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _kernels_note(state: dict) -> str:
    """Where the state_dict ``state`` keeps conv weights under ``kernel``
    (MinkowskiEngine's and TorchSparse's name), a sentence saying so and how
    to convert them; else ``""``."""
    kernels = [k for k, v in state.items() if k.rpartition(".")[2] == "kernel" and v.dim() in (2, 3)]
    if not kernels:
        return ""
    few = ", ".join(kernels[:3]) + (", ..." if len(kernels) > 3 else "")
    return (f"; its {len(kernels)} 'kernel' tensors ({few}) are MinkowskiEngine or TorchSparse conv weights, their "
            "offsets in another order: put each in a pointsparse Conv3d's 'weight' as "
            "pointsparse.nn.weight_from(kernel, kernel_size, 'minkowski' (or 'torchsparse'))")


def check_config(config, where) -> None:
    """``TypeError`` / ``ValueError`` naming ``where`` (the checkpoint or program file) unless
    ``config`` is a dict whose run settings, where present, are of their kind:
    ``classes`` a non-empty list of str, ``in_channels`` and ``blocks`` ints
    >= 1, ``voxel_size`` and ``cr`` finite numbers > 0, ``ignore_index`` an
    int, ``model`` a str, ``label_map`` a str or None (a damaged or
    hand-edited file otherwise failed deep inside voxelisation or model
    building, not naming it)."""
    import math
    import numbers

    if not isinstance(config, dict):
        raise TypeError(f"{where}: its config must be a dict; got {type(config).__name__}")

    def bad(key, expected, kind=ValueError):
        raise kind(f"{where}: its config's {key} must be {expected}; got {config[key]!r:.100}")

    def integral(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    def real(v):
        return isinstance(v, numbers.Real) and not isinstance(v, bool)

    if "classes" in config and (not isinstance(config["classes"], list)
                                or not all(isinstance(c, str) for c in config["classes"])):
        bad("classes", "a list of class names", TypeError)
    if "classes" in config and not config["classes"]:  # (eval and export each failed on it their own way)
        bad("classes", "a non-empty list of class names")
    for key in ("in_channels", "blocks"):
        if key in config and not integral(config[key]):
            bad(key, "an int >= 1", TypeError)
        if key in config and config[key] < 1:
            bad(key, "an int >= 1")
    for key in ("voxel_size", "cr"):
        if key in config and not real(config[key]):
            bad(key, "a finite number > 0", TypeError)
        if key in config and not (math.isfinite(config[key]) and config[key] > 0):
            bad(key, "a finite number > 0")
    if "ignore_index" in config and not integral(config["ignore_index"]):
        bad("ignore_index", "an int", TypeError)
    if "model" in config and not isinstance(config["model"], str):
        bad("model", "a model name", TypeError)
    if "label_map" in config and not (config["label_map"] is None or isinstance(config["label_map"], str)):
        bad("label_map", "a label map's name or file (str), or None", TypeError)


def check_directory(path, what: str = "--out") -> Path:
    """``ValueError`` naming ``what`` and ``path`` where ``path`` is a file
    (nothing made: the early check of a command's output directory)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file; it must be a directory (or not exist yet)")
    return path


def make_directory(path, what: str = "--out") -> Path:
    """``path`` as a directory, made where it does not exist yet; a
    ``ValueError`` naming ``what`` and ``path`` where it is a file, lies
    under a file or cannot be made (permissions, a read-only file system)."""
    path = check_directory(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # FileExistsError / NotADirectoryError (a file on the way), PermissionError, ...
        raise ValueError(f"{what} {path}: cannot make this directory ({type(error).__name__}: "
                         f"{error.strerror or error})") from error
    return path


class DirectoryLock:
    """An exclusive lock on an output directory for the life of a run
    (``fcntl.flock`` on ``DIR/.lock``: released by the OS when the process
    ends, however it ends). A second run on the same directory gets a
    ``ValueError`` at once instead of overwriting the first one's files.
    A run that fails leaves no trace of the lock: where it made the
    directory and wrote nothing else there, the directory goes again, and
    a ``.lock`` it made goes."""

    def __init__(self, directory, what: str = "--out") -> None:
        self.directory = Path(directory)
        self.what = what
        self._file = None
        self._made = ()  # (the directory made?, the .lock made?)

    def __enter__(self) -> "DirectoryLock":
        import fcntl

        made_directory = not self.directory.exists()
        make_directory(self.directory, self.what)
        lock = self.directory / ".lock"
        made_lock = not lock.exists()
        try:
            f = open(lock, "a+")
        except OSError as error:  # PermissionError (read-only, another user's), a read-only file system, ...
            raise ValueError(f"{self.what} {self.directory}: cannot write in this directory ({type(error).__name__}: "
                             f"{error.strerror or error}); give a directory this user may write") from error
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ValueError(f"{self.what} {self.directory} is in use by another run ({holder}); "
                                 "give each run its own directory") from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._file = f
        self._made = (made_directory, made_lock)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._file is None:
            return
        if exc_type is not None and self._made[1]:  # still held: no other run can be using it
            try:
                (self.directory / ".lock").unlink()
                if self._made[0]:
                    self.directory.rmdir()  # only where it is empty now
            except OSError:
                pass
        self._file.close()  # closing releases the flock
        self._file = None
