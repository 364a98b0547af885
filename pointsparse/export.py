"""A trained (or channel-pruned) segmentation checkpoint as a
``torch.export`` program in a ``.pt2`` file (the ``pointsparse export``
command, :mod:`pointsparse.app.export`, writes one with these functions).

The program's interface is plain tensors, so any runtime that can call the
``pointsparse::*`` operators can run it:

    inputs   feats  float32 (N, C)  per-voxel features (C = the checkpoint's in_channels)
             coords int32   (N, 4)  unique [batch, x, y, z] voxel coordinates
    output   logits float32 (N, K)  per-voxel class logits (K = number of classes)

A point-level network (SPVCNN) takes its points too and gives their logits:

    inputs   feats, coords          as above
             inverse     int64   (P,)    the voxel row of each point
             points      float32 (P, 3)  point positions in voxel units
             point_batch int64   (P,)    the batch index of each point
    output   logits      float32 (P, K)  per-point class logits

N and P are dynamic (traced for N, P >= 2; one row runs too, an empty input
fails torch's runtime assertion: :class:`ProgramModel` gives empty logits).
A voxel network whose output is not one row per input voxel on its coords
(:func:`export_model` tells on the example, and by a ``VoxelPrune`` of
its own that ran at stride 1, whose output rows are a selection however
many the example kept) has a program of its output instead, the number of
its rows dynamic too:

    a SparseTensor elsewhere (a backbone ending at stride 8, a VoxelPrune at the end, ...)
    output   feats  (M, C), coords int32 (M, 4), stride int32 (3,) (the buffer ``output_stride``)
             and where the output is a selection (a VoxelPrune at its stride, at the end or
             followed by layers on the kept voxels) its record: rows int64 (M,), the sorted rows
             kept of the n voxels the selection scored, and n (an int)
    a tensor (a classifier's global pooling and Linear)
    output   the tensor, e.g. float32 (B, K): one row per batch item

The program is the model in eval mode (batch norm with its running
statistics). Points map to voxels outside the program, as in eager mode
(``pointsparse.voxelize`` or the training pipeline's ``voxelize_sample``);
``extra_files["pointsparse.json"]`` of the file holds the checkpoint's
config (classes, voxel size, ...). A process loads it with
``torch.export.load(path)`` after ``import pointsparse`` (which registers the
operators and the SparseTensor pytree node).

Bad coords (duplicates, out of range) raise the same ``ValueError`` as in
eager mode when the program runs, from the kernel-map operator; coords of
another dtype than int32 the same ``TypeError``. Wrong shapes fail torch's own
guards (``AssertionError: Guard failed: feats.size()[1] == 4``) in the raw
program's module (``program.module()``, torch's: its ``eval()`` and
``train()`` raise ``NotImplementedError``), which pointsparse cannot change:
:class:`ProgramModel` (``ProgramModel.load(path)``) checks them first and
says what it takes."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from . import _ext
from .tensor import SparseTensor, as_bool, as_int

META_FILE = "pointsparse.json"
MIN_POINTS = 2


class VoxelLogits(nn.Module):
    """A segmentation network taking and returning SparseTensors, as a module
    of plain tensors: ``forward(feats, coords) -> logits`` (see the module
    docstring). The coordinates are not re-validated (the program's kernel-map
    operator rejects duplicates and out-of-range rows)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        torch._check(feats.shape[0] == coords.shape[0], lambda: "feats and coords must have the same rows")
        return self.model(SparseTensor(feats, coords, validate=False)).feats


class PointLogits(nn.Module):
    """:class:`VoxelLogits` for a point-level network (SPVCNN): ``forward(feats,
    coords, inverse, points, point_batch) -> per-point logits`` (see the
    module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor, coords: torch.Tensor, inverse: torch.Tensor, points: torch.Tensor,
                point_batch: torch.Tensor) -> torch.Tensor:
        torch._check(feats.shape[0] == coords.shape[0], lambda: "feats and coords must have the same rows")
        return self.model(SparseTensor(feats, coords, validate=False), inverse, points, point_batch)


class VoxelOutputs(nn.Module):
    """A voxel network whose output is not logits on its input's coords, as a
    module of plain tensors: ``forward(feats, coords)`` gives the output
    SparseTensor's ``(feats, coords, output_stride)`` (``stride``: the output's,
    kept as the int32 buffer ``output_stride``), or, where ``stride`` is None,
    the model's output tensor itself (see the module docstring; an empty
    buffer ``output_tensor`` marks such a program for :class:`ProgramModel`).
    ``kept``: the output is a selection (a ``VoxelPrune`` of the model's at
    the output's stride, at the end or followed by layers on its coords):
    its record follows, ``(rows, n)`` of ``CoordinateCache.kept`` (the sorted
    int64 rows kept of the ``n`` voxels the first selection at that stride
    scored), for :class:`ProgramModel` to record as eager's output does."""

    def __init__(self, model: nn.Module, stride=None, kept: bool = False) -> None:
        super().__init__()
        self.model = model
        self.sparse = stride is not None
        self.kept = kept
        if self.sparse:
            self.register_buffer("output_stride", torch.tensor(tuple(stride), dtype=torch.int32))
        else:  # (marks the program's kind: a tensor of one row per voxel has the shape of logits)
            self.register_buffer("output_tensor", torch.zeros(0, dtype=torch.int32))

    def forward(self, feats: torch.Tensor, coords: torch.Tensor):
        torch._check(feats.shape[0] == coords.shape[0], lambda: "feats and coords must have the same rows")
        out = self.model(SparseTensor(feats, coords, validate=False))
        if not self.sparse:
            return out
        if self.kept:
            rows, n = out.cache.kept[out.stride]
            return out.feats, out.coords, self.output_stride, rows, n
        return out.feats, out.coords, self.output_stride


def _check_exportable(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    stateful = getattr(getattr(torch.export, "_unlift", None), "_StatefulGraphModule", ())  # (program.module()'s)
    if isinstance(model, (ProgramModel, stateful)):  # (torch failed on its specialised shapes, or asked for eval())
        raise TypeError(f"model is an exported program already ({type(model).__name__}): export_model traces the "
                        "eager model (models.load_model, export.load_checkpoint); export.save writes a program "
                        "as it is")
    if model.training:
        raise ValueError("export runs inference: call model.eval() first (batch norm then uses its running "
                         "statistics, as the exported program will)")
    # (modules whose forward depends on the mode: a batch norm set back to training would normalise each
    # input by its own statistics, a dropout drop values; an Identity fuse_for_inference made runs alike)
    off = _ext.off_cpu(model)  # (ProgramModel runs on the CPU)
    if off is not None:
        kind, name, device = off
        raise ValueError(f"export writes CPU programs; the model's {kind} {name} is on {device}: export "
                         "model.cpu() with a CPU example")
    moded = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
    left = next(((name, module) for name, module in model.named_modules()
                 if module.training and isinstance(module, moded)), None)
    if left is not None:
        raise ValueError(f"export runs inference: the model's submodule {left[0]} ({type(left[1]).__name__}) is in "
                         "training mode; call model.eval() (it sets every submodule) after any .train()")
    from .formats import SparseConv3d, SparseLinear

    for name, module in model.named_modules():
        # (their products call the C++ core on numpy views of the tensors, outside torch's operators)
        if isinstance(module, (SparseLinear, SparseConv3d)) and module.execution == "format":
            fmt = module.format_name if isinstance(module, SparseConv3d) else type(module.weight_format).__name__
            engine = "set its execution to 'engine' (the fused engine on the weight it holds), or " \
                if isinstance(module, SparseConv3d) else \
                "set its execution to 'dense' (torch's linear on the weight it holds), or "
            what = f"the model's submodule {name}" if name else "the model"
            raise ValueError(f"{what} ({type(module).__name__}, {fmt}) runs its format's product, which "
                             f"torch.export cannot trace: {engine}export the model before formats.compress")


def _on_input_rows(out, voxels: SparseTensor) -> bool:
    """Whether the model's eager output ``out`` on ``voxels`` is a SparseTensor
    on exactly their coords (a logits program); else ``TypeError`` unless it
    is a SparseTensor elsewhere or a tensor of at least one dimension (a
    program of the output, :class:`VoxelOutputs`)."""
    if isinstance(out, SparseTensor):
        return out.stride == (1, 1, 1) and len(out) == len(voxels) and torch.equal(out.coords, voxels.coords)
    if isinstance(out, torch.Tensor) and out.dim() >= 1:
        return False
    what = f"a {out.dim()}-d tensor" if isinstance(out, torch.Tensor) else type(out).__name__
    raise TypeError(f"export writes programs of models returning a SparseTensor or a tensor of at least one "
                    f"dimension (one row per batch item, say); this one returns {what}")


@contextlib.contextmanager
def _pruned_strides(model: nn.Module):
    """The strides of the inputs of ``model``'s own
    :class:`~pointsparse.nn.VoxelPrune` layers (not a
    :class:`~pointsparse.nn.VoxelSkip`'s, which keeps every voxel) while the
    block runs, a set. One at stride 1 makes the output's rows a selection
    of the input's however many the example kept (a threshold all of its
    voxels passed, a keep ratio rounding up to all): its program gives the
    output's coords (:class:`VoxelOutputs`), not logits on the input's
    rows. At a coarser stride the transposed convs come back to the input's
    coords (the cache keeps them)."""
    from .nn import VoxelPrune, VoxelSkip  # noqa: PLC0415 - (the layers import the engine; export loads lazily)

    inside_skips = {id(m) for skip in model.modules() if isinstance(skip, VoxelSkip) for m in skip.prune.modules()}
    strides: set = set()

    def note(module, args):
        if args and isinstance(args[0], SparseTensor):
            strides.add(tuple(args[0].stride))

    hooks = [m.register_forward_pre_hook(note) for m in model.modules()
             if isinstance(m, VoxelPrune) and id(m) not in inside_skips]
    try:
        yield strides
    finally:
        for hook in hooks:
            hook.remove()


def _run_on_example(model: nn.Module, *example):
    """``model(*example)`` (eager, before the trace); its ``TypeError`` /
    ``ValueError`` (feats of another dtype or width, ...) of the same type,
    naming ``example`` and keeping the model's words."""
    try:
        return model(*example)
    except (TypeError, ValueError) as error:
        raise type(error)(f"example does not fit the model: {type(error).__name__}: {error}") from error


def export_model(model: nn.Module, example) -> torch.export.ExportedProgram:
    """``torch.export`` of ``VoxelLogits(model)`` with a dynamic number of
    voxels, traced on ``example`` (a stride-1 SparseTensor of at least 2
    voxels), where the model's output on it is one row per voxel on its
    coords; else of ``VoxelOutputs(model)``: the output SparseTensor's
    ``(feats, coords, stride)`` or the output tensor (the module docstring),
    its rows dynamic too. For a point-level network (SPVCNN) ``PointLogits(model)``, traced
    on ``example`` = ``(voxels, inverse, points, point_batch)`` (its forward's
    arguments, at least 2 points, its indices of any integer dtype, traced as
    int64; :func:`example_input` ``(points=True)``; an
    SPVCNN inside an ``nn.MapsAhead`` alike; a ``torch.compile``'d model is
    exported as the model it wraps),
    the numbers of voxels and of points dynamic. ``ValueError`` naming the
    submodule for a batch norm or dropout in training mode, or a compressed
    layer that runs its format's product (a ``formats.SparseLinear`` or
    ``formats.SparseConv3d`` with execution ``"format"``: no torch operator);
    the model's own ``TypeError`` / ``ValueError`` on an example it cannot
    run (feats of another dtype or width), of the same type, naming
    ``example``. Pruning masks (``prune``'s, torch's) are exported made
    permanent (the model itself is left as it is)."""
    from .models import SPVCNN
    from .nn import MapsAhead
    from .nn.fuse import _unpruned_copy

    while isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # torch.compile's wrapper: its model, whose
        model = model._orig_mod  # forward the wrapper runs (an SPVCNN under it was taken for a voxel network)
    _check_exportable(model)
    if any(hasattr(m, "weight_orig") or hasattr(m, "bias_orig") or torch.nn.utils.parametrize.is_parametrized(m)
           for m in model.modules()):
        # Pruning masks (and parametrizations) made permanent in a copy: the program holds each weight once, as
        # the hook computed it (orig x mask: the same values, the same zeros the engine skips), not orig, mask
        # and their product every call (torch warned of every such weight assigned during the export).
        model = _unpruned_copy(model)
    # (an SPVCNN inside an nn.MapsAhead takes SPVCNN's arguments too: the wrapper passes them on)
    point_level = isinstance(model.model if isinstance(model, MapsAhead) else model, SPVCNN)
    if point_level:
        if not (isinstance(example, tuple) and len(example) == 4 and isinstance(example[0], SparseTensor)
                and all(isinstance(t, torch.Tensor) for t in example[1:])):
            raise TypeError("example must be SPVCNN's arguments (voxels: SparseTensor, inverse, points, "
                            f"point_batch); got {type(example).__name__}")
        voxels, inverse, points, point_batch = example
        if len(inverse) < MIN_POINTS:
            raise ValueError(f"example must hold at least {MIN_POINTS} points; got {len(inverse)}")
    else:
        voxels = example
        if not isinstance(voxels, SparseTensor):
            raise TypeError(f"example must be a SparseTensor; got {type(voxels).__name__}")
    if voxels.stride != (1, 1, 1) or len(voxels) < MIN_POINTS:
        raise ValueError(f"example must be a stride-1 SparseTensor of at least {MIN_POINTS} voxels; got {voxels}")
    rows = torch.export.Dim("voxels", min=MIN_POINTS)
    with torch.no_grad():
        if not point_level:
            with _pruned_strides(model) as strides:
                out = _run_on_example(model, SparseTensor(voxels.feats.detach(), voxels.coords))
            if _on_input_rows(out, voxels) and (1, 1, 1) not in strides:
                wrapped = VoxelLogits(model)
            else:
                sparse = isinstance(out, SparseTensor)  # (its record: the example, a fresh tensor, had none)
                wrapped = VoxelOutputs(model, out.stride if sparse else None, sparse and out.stride in out.cache.kept)
            return torch.export.export(wrapped, (voxels.feats.detach(), voxels.coords),
                                       dynamic_shapes=({0: rows}, {0: rows}))
        _run_on_example(model, voxels, inverse, points, point_batch)  # its own checks first (torch.export's say less)
        # (indices of any integer dtype run the model: the program takes them as its interface names them, int64,
        # which ProgramModel gives it, not the example's int16 / int32)
        inverse, point_batch = inverse.long(), point_batch.long()
        each = torch.export.Dim("points", min=MIN_POINTS)
        return torch.export.export(PointLogits(model), (voxels.feats.detach(), voxels.coords, inverse, points,
                                                        point_batch),
                                   dynamic_shapes=({0: rows}, {0: rows}, {0: each}, {0: each}, {0: each}))


def save(program: torch.export.ExportedProgram, path, meta: dict | None = None) -> None:
    """``torch.export.save`` with ``meta`` as JSON in ``extra_files``,
    atomically (a failed write leaves what ``path`` held before);
    ``FileNotFoundError`` naming the folder where ``path``'s does not exist,
    a ``ValueError`` naming ``path`` where it is a folder or cannot be
    written (:func:`check_out_path`; a ``TypeError`` where it is no str or
    ``os.PathLike``); ``TypeError`` unless ``meta`` is None or a dict with
    str keys and JSON values, nested at most ``checkpoint.MAX_NESTING``
    levels deep; :func:`load` returns it as JSON gives it back (a tuple
    comes back a list)."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"program must be a torch.export.ExportedProgram (export.export_model's); got "
                        f"{type(program).__name__}")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta)):
        raise TypeError(f"meta must be None or a dict with str keys; got {type(meta).__name__} {meta!r:.200}")
    from .checkpoint import MAX_NESTING, _too_deep

    deep = _too_deep(meta or {}, "meta")  # (json.dumps recursed into it: Python's RecursionError, naming nothing)
    if deep is not None:
        raise TypeError(f"meta nests containers more than {MAX_NESTING} levels deep (at {deep}); "
                        "give it as a flatter dict")
    where = _non_str_key(meta or {}, "meta")
    if where is not None:  # JSON would write it as a string: load would give back another dict
        raise TypeError(f"meta's dicts must have str keys (JSON's); {where}")
    try:
        text = json.dumps(meta or {}, allow_nan=False)  # (NaN and inf are no JSON: only Python would read them)
    except (TypeError, ValueError) as error:  # a value JSON cannot hold (a set, a tensor, a cycle, ...)
        raise TypeError(f"meta must hold JSON values (str, finite numbers, bool, None, lists, dicts): {error}") \
            from None
    held = _input_containers(program)
    if held:  # (torch pickles the example inputs whole: load refuses a file of pickled objects)
        raise ValueError(f"the program's inputs hold {', '.join(sorted(held))}: torch.export.save pickles such an "
                         f"object whole, and export.load refuses a file of pickled Python objects; export the model "
                         f"with export.export_model (its program takes feats and coords tensors), or export a "
                         f"module whose forward takes tensors and builds the SparseTensor inside")
    check_out_path(path)
    from .checkpoint import atomic_write

    try:  # (into a file beside path, renamed over it when whole: a failed write leaves an earlier program whole)
        atomic_write(path, lambda f: torch.export.save(program, f, extra_files={META_FILE: text}))
    except (RuntimeError, OSError) as error:  # torch's archive writer: "open file failed", a full disk, ...
        raise ValueError(f"cannot write the exported program to {path} "
                         f"({_ext.brief(error)})") from error


def _input_containers(program: torch.export.ExportedProgram) -> set[str]:
    """``{"SparseTensor"}`` where a SparseTensor holds the program's example
    inputs (given to torch.export.export: torch.export.save pickles it
    whole), else empty (torch's own containers, an OrderedDict, save as
    data)."""
    example = program.example_inputs
    if example is None:
        return set()
    found: set[str] = set()
    todo = [torch.utils._pytree.tree_flatten(example)[1]]
    while todo:
        spec = todo.pop()
        children = list(spec.children())
        if spec.type is SparseTensor:
            found.add(spec.type.__name__)
        todo.extend(children)
    return found


def _non_str_key(value, where: str, depth: int = 0) -> str | None:
    """Where a dict inside ``value`` (dicts and lists, nested) has a key
    that is not a str, or None."""
    if depth > 100:
        return None  # (a cycle: json.dumps reports it; save refused meta nested deeper before this walk)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where} has the key {key!r}"
            found = _non_str_key(item, f"{where}[{key!r}]", depth + 1)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _non_str_key(item, f"{where}[{i}]", depth + 1)
            if found:
                return found
    return None


def _as_path(path) -> Path:
    """``path`` as a :class:`~pathlib.Path`: a ``TypeError`` naming it unless
    it is a str or an ``os.PathLike`` (pathlib's own named no argument)."""
    import os

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike naming the .pt2 file; got {type(path).__name__}")
    return Path(path)


def check_out_path(path) -> None:
    """Where :func:`save` can write ``path``: ``FileNotFoundError`` naming
    its folder where that does not exist, ``ValueError`` where ``path`` is a
    folder or its folder cannot be written, ``TypeError`` where it is no str
    or ``os.PathLike``. Cheap: the export CLI calls it before the export's
    work."""
    import os

    path = _as_path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the .pt2 file to write (e.g. {path / 'model.pt2'})")
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder} to write the exported program {path.name} in")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ValueError(f"cannot write the exported program to {path}: no write permission")


def load(path) -> tuple[torch.export.ExportedProgram, dict]:
    """``(program, meta)`` of a file written by :func:`save`;
    ``FileNotFoundError`` where there is no such file, a ``ValueError``
    naming it where it is a folder, no regular file (a pipe) or not such a
    program (another kind of file, or one truncated or damaged so that it
    no longer reads). Every member of the
    archive is checked against the CRC-32 the writer stored for it before
    torch reads it (torch's reader does not check them, so a flipped byte in
    a weight loaded silently); the error names the damaged member. A file
    holding pickled Python objects, which torch's reader would unpickle as
    code (:func:`_check_data_only`), is a ValueError naming the member, and
    so is one whose graph holds Python code torch would evaluate (a shape
    expression or a guard that is not sympy's numbers and symbols or a
    comparison of the inputs' sizes: :func:`_check_graph_code`), or one
    whose evaluation might never finish (a tower of powers, a number of
    thousands of digits, an expression nested thousands deep). The file is
    read once: torch reads the bytes checked, not the path again.
    ``TypeError`` where ``path`` is no str or ``os.PathLike``."""
    from .checkpoint import check_readable

    path = _as_path(path)
    check_readable(path, str(path), "the .pt2 file", "model.pt2", FileNotFoundError, f"no exported program at {path}")
    try:  # (read once: the bytes checked are the bytes torch reads, whatever replaces the file meanwhile)
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read the exported program {path} ({type(error).__name__}: {error})") from error
    _check_members(path, data)
    _check_data_only(path, data)
    extra = {META_FILE: ""}
    from . import __version__

    # torch's reader logs a traceback at WARNING for a file it cannot read and raises "check the warnings
    # above": the records are kept here, not printed, and their cause named in the error. A filter of the
    # logger's, added and removed: nothing of the logger's own is swapped and put back, which two loads in two
    # threads undid in each other's order (the logger kept one's stand-in handler for good).
    quiet = logging.getLogger("torch.export")
    kept = _KeptRecords()
    quiet.addFilter(kept)
    try:
        program = torch.export.load(io.BytesIO(data), extra_files=extra)
        meta = json.loads(extra[META_FILE] or "{}")
    except Exception as error:  # zipfile.BadZipFile, torch's RuntimeError, a damaged meta's decode errors, ...
        from .checkpoint import archive_kind

        if archive_kind(io.BytesIO(data)) == "torch.save":  # (torch's "error when deserializing the saved file")
            raise ValueError(f"{path} is a torch.save file (a checkpoint?), not an exported program: pointsparse "
                             f"export --checkpoint {path} --out model.pt2 writes a training checkpoint's program "
                             "(pointsparse.export.export_model and save a model's)") from None
        cause = kept.cause() or _ext.brief(error)
        raise ValueError(f"{path} is not a program written by pointsparse.export.save, or it is damaged, or it was "
                         f"written by another version of pointsparse or torch than these ({__version__} and "
                         f"{torch.__version__}) ({cause})") from error
    finally:
        quiet.removeFilter(kept)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its {META_FILE} holds {type(meta).__name__}, not the meta dict save writes")
    return program, meta


class _KeptRecords(logging.Filter):
    """The log records of a read (:func:`load`), kept and not printed (the
    logger's records meanwhile: another thread's too, as the level that
    silenced the reader before did)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list = []

    def filter(self, record) -> bool:
        self.records.append(record)
        return False

    def cause(self) -> str | None:
        """The first line of the innermost error a kept record carries
        (torch's "We failed to resolve torch.ops.pointsparse.X", "Serialized
        schema version ... does not match"), or None."""
        for record in reversed(self.records):
            error = record.exc_info[1] if record.exc_info else None
            seen = set()
            while error is not None and (error.__cause__ or error.__context__) is not None and id(error) not in seen:
                seen.add(id(error))
                error = error.__cause__ or error.__context__
            if error is not None:
                first = (str(error).strip().splitlines() or [""])[0]
                return f"{type(error).__name__}: {first[:300]}"
        return None


def _check_members(path: Path, data: bytes) -> None:
    """``ValueError`` naming ``path`` (and the member) where a member of the
    zip archive ``data`` (the bytes of ``path``) does not match its stored
    CRC-32 or its headers disagree; a file that is no zip at all is left to
    the reader's own error."""
    import zipfile

    from .checkpoint import embedded

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            # (the end of another zip inside, found where this one's end records are cut off)
            cut = embedded(archive)
            bad = None if cut else archive.testzip()  # reads every member, checks its CRC-32 and local header
    except zipfile.BadZipFile as error:
        try:
            if not zipfile.is_zipfile(io.BytesIO(data)):
                return  # not a zip: the loader says the file is no program
        except zipfile.BadZipFile:  # (its end records found but damaged: "span multiple disks")
            pass
        raise ValueError(f"{path} is damaged: its zip archive does not read ({error})") from error
    except (OSError, EOFError, ValueError, NotImplementedError) as error:
        raise ValueError(f"{path} is damaged: its zip archive does not read ({_ext.brief(error)})") from error
    if cut:
        raise ValueError(f"{path} is damaged: its zip archive's end records are missing (the file is cut short: "
                         "written or copied only in part?)")
    if bad is not None:
        raise ValueError(f"{path} is damaged: its member {bad} does not match the CRC-32 stored for it "
                         "(the file changed after it was written)")


def _check_data_only(path: Path, data: bytes) -> None:
    """``ValueError`` naming ``path`` and the member where the archive
    ``data`` (the bytes of ``path``) holds something ``torch.export.load``
    would unpickle as code: a ``.pt`` member
    (the sample inputs, a legacy weights or constants file) that does not
    read as data only (torch falls back to ``weights_only=False`` there), or
    a weight or constant its config marks ``use_pickle`` or stores as a
    pickled object (read with ``weights_only=False`` / ``pickle.loads``),
    or a graph (``models/``) holding Python code (:func:`_check_graph_code`).
    A file that is no zip is left to the reader's own error."""
    import zipfile

    def refused(name: str, why: str) -> ValueError:
        return ValueError(f"{path}: its member {name} {why}, which torch.export.load would unpickle as code; "
                          "pointsparse loads programs of tensors and plain data only (export_model's) and refuses it")

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return
    with archive:
        for name in archive.namelist():
            if name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
                except Exception:  # (weights_only's UnpicklingError, or a damaged pickle torch would retry too)
                    raise refused(name, "holds pickled Python objects other than tensors and plain data") from None
            elif name.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    entries = json.loads(archive.read(name)).get("config", {}).values()
                    pickled = [e for e in entries if e.get("use_pickle") or
                               ("constants" in name and not str(e.get("path_name", "")).startswith("tensor_"))]
                except (ValueError, AttributeError, TypeError) as error:
                    raise ValueError(f"{path} is damaged: its member {name} does not read ({error})") from None
                if pickled:
                    raise refused(name, f"marks {pickled[0].get('path_name')!r} as pickled Python objects")
            elif name.partition("/")[2].startswith("models/") or name.startswith("models/"):
                _check_graph_code(path, name, archive.read(name))


#: What a guard calls by name (torch's printer of guards writes these; all compute on numbers).
_GUARD_FUNCTIONS = frozenset({"abs", "max", "min", "round", "int", "float", "IsNonOverlappingAndDenseIndicator",
                              "cast_symbool_to_symint_guardless"})
#: The torch functions a guard calls (``torch.sym_float(...)``, ...).
_GUARD_TORCH_FUNCTIONS = frozenset({"sym_float", "sym_int", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt",
                                    "_sym_sqrt", "sym_sum"})
#: The methods a guard calls on an input (``L['feats'].size()``).
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})


def _identifier(text) -> bool:
    """Whether ``text`` is a str of letters, digits and underscores, not starting with a digit or underscore."""
    return isinstance(text, str) and text.isascii() and text.isidentifier() and not text.startswith("_")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _number_text(text) -> bool:
    """Whether ``text`` is a str writing a number (sympy's ``Float('0.5', precision=53)``)."""
    return isinstance(text, str) and _NUMBER.fullmatch(text) is not None


def _sympy_class(name: str) -> bool:
    """Whether ``name``, in the namespace torch's reader evaluates a shape
    expression in (torch's sympy functions, then sympy's), is a sympy class
    (a constructor of expressions: Symbol, Integer, Add, FloorDiv, ...) or
    none of theirs nor a builtin (sympy reads it as a function of that name,
    as srepr's ``ExprCondPair``); never a function such as ``sympify`` or a
    builtin."""
    import builtins

    import sympy
    from torch.utils._sympy import functions

    if not _identifier(name):
        return False
    found = [getattr(module, name) for module in (functions, sympy) if hasattr(module, name)]
    if not found:
        return not hasattr(builtins, name)
    return all(isinstance(f, type) and issubclass(f, sympy.Basic) for f in found)


#: The nodes both checks walk into (operators, comparisons, conditionals, tuples and lists of checked nodes).
_OPERATORS = (ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.Compare, ast.IfExp, ast.Tuple, ast.List, ast.operator,
              ast.unaryop, ast.cmpop, ast.boolop, ast.expr_context)


def _plain(node) -> bool:
    """Whether the ``ast`` node is a constant None, bool, int or float."""
    return isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (bool, int, float)))


def _expression_safe(node, named: str | None = None) -> bool:
    """Whether the ``ast`` node of a shape expression is sympy's srepr (or
    str) of one: calls of sympy classes (:func:`_sympy_class`) on numbers,
    names, operators and such calls, keywords of constants; a str only as
    the name of a Symbol or the digits of a number. ``named``: the class
    called with ``node`` as its first argument."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (named in ("Symbol", "Dummy") and _identifier(node.value)) or \
            (named in ("Float", "Integer", "Rational") and _number_text(node.value))
    if isinstance(node, ast.Constant):
        return _plain(node)
    if isinstance(node, ast.Name):
        return _identifier(node.id)  # (a reference; a call of it is checked below)
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Name) and _sympy_class(node.func.id) and \
            all(_expression_safe(a, node.func.id if i == 0 else None) for i, a in enumerate(node.args)) and \
            all(_identifier(k.arg) and isinstance(k.value, ast.Constant) and not isinstance(k.value.value, str)
                for k in node.keywords)
    if isinstance(node, _OPERATORS):
        return all(_expression_safe(child) for child in ast.iter_child_nodes(node))
    return False


def _on_input(node) -> bool:
    """Whether the ``ast`` node is a path into an input of the program:
    ``L['name']`` followed by indices, public attributes and size methods."""
    while True:
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "L":
            return isinstance(node.slice, ast.Constant) and _identifier(node.slice.value)
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and \
                type(node.slice.value) is int:
            node = node.value
        elif isinstance(node, ast.Attribute) and _identifier(node.attr):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in _GUARD_METHODS and not node.keywords and \
                all(isinstance(a, ast.Constant) and type(a.value) is int for a in node.args):
            node = node.func.value
        else:
            return False


def _guard_safe(node) -> bool:
    """Whether the ``ast`` node of a guard is one torch writes: comparisons
    and arithmetic of numbers, the inputs' sizes (:func:`_on_input`),
    ``math``'s functions and constants, ``torch.sym_*`` and the numeric
    builtins of :data:`_GUARD_FUNCTIONS` on such."""
    if isinstance(node, ast.Constant):
        return _plain(node)
    if isinstance(node, ast.Name):
        return node.id == "inf"
    if isinstance(node, (ast.Subscript, ast.Attribute)) and _on_input(node):
        return True
    if isinstance(node, ast.Attribute):  # (math.inf, math.pi)
        return isinstance(node.value, ast.Name) and node.value.id == "math" and _identifier(node.attr)
    if isinstance(node, ast.Call):
        func = node.func
        if _on_input(node):
            return True
        named = (isinstance(func, ast.Name) and func.id in _GUARD_FUNCTIONS) or (
            isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and (
                (func.value.id == "math" and _identifier(func.attr))
                or (func.value.id == "torch" and func.attr in _GUARD_TORCH_FUNCTIONS)))
        return named and not node.keywords and all(_guard_safe(a) for a in node.args)
    if isinstance(node, _OPERATORS):
        return all(_guard_safe(child) for child in ast.iter_child_nodes(node))
    return False


#: The bounds of a shape expression or guard that :func:`_check_graph_code` reads (torch writes far smaller
#: ones): sympy evaluates each expression as it reads it, Python each guard as the program runs, and a
#: crafted one (``2**2**2**64``) asked either for a number it never finished computing.
_TEXT_MAX = 10_000  #: characters
_DEPTH_MAX = 100  #: levels of nesting of its syntax tree
_DIGITS_MAX = 64  #: digits of a number written in it
_EXPONENT_MAX = 64  #: the largest exponent of a power (or shift) in size; a constant, and no power in another
_PRECISION_MAX = 1024  #: a keyword's largest number (Float's precision in bits, torch writes 53)
#: The functions that raise to a power (the second argument is the exponent), by the name they are called by.
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
#: sympy's classes torch writes in a shape expression (its own, :mod:`torch.utils._sympy`'s, are read too):
#: numbers, symbols, arithmetic, comparisons and logic, whose evaluation on bounded numbers is quick (sympy
#: has others, ``factorial``, ``fibonacci``, ..., that compute their value of a large integer as they are read).
_SYMPY_CLASSES = frozenset({
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Zero", "One", "NegativeOne", "Half", "Infinity",
    "NegativeInfinity", "NaN", "ComplexInfinity", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "floor",
    "ceiling", "sign", "Piecewise", "ExprCondPair", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "Equality", "Unequality",
    "StrictLessThan", "LessThan", "StrictGreaterThan", "GreaterThan", "And", "Or", "Not", "ITE", "BooleanTrue",
    "BooleanFalse"})
#: ``math``'s functions whose value of a large integer takes long to compute (a guard's others are quick).
_MATH_UNBOUNDED = frozenset({"factorial", "comb", "perm"})
_LONG_NUMBER = re.compile(rf"\d{{{_DIGITS_MAX + 1}}}")
#: A decimal exponent of a number (``1e999999999``: a few digits written, a value of a billion digits).
_EXPONENT = re.compile(r"[\d.][eE][+-]?(\d+)")


def _text_unbounded(text: str) -> str | None:
    """What of the bounds a shape expression's or guard's ``text`` passes
    before it is parsed (its length, the digits of its numbers, a decimal
    exponent's among them: ``1e999999999``), or None."""
    if len(text) > _TEXT_MAX:
        return f"{len(text)} characters, more than {_TEXT_MAX}"
    if _LONG_NUMBER.search(text) or any(int(m.group(1)[-3:]) > _DIGITS_MAX or m.group(1)[:-3].strip("0")
                                        for m in _EXPONENT.finditer(text)):
        return f"a number of more than {_DIGITS_MAX} digits"
    return None


def _too_deep(node) -> bool:
    """Whether the ``ast`` tree ``node`` nests more than :data:`_DEPTH_MAX`
    levels (walked without recursion: the checks after it recurse)."""
    stack = [(node, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _DEPTH_MAX:
            return True
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return False


def _small_int(node, named: bool = True) -> int | None:
    """The value of the ``ast`` node where it writes an int constant: ``3``,
    ``-3``, and where ``named`` ``Integer(3)`` / ``Integer('3')``; else None."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign, node = (-1 if isinstance(node.op, ast.USub) else 1), node.operand
    if named and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" and \
            len(node.args) == 1 and not node.keywords:
        node = node.args[0]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip().lstrip("+-").isdigit():
            return sign * int(node.value)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return sign * node.value
    return None


def _small_exponent(node, named: bool) -> bool:
    """Whether the ``ast`` node writes an exponent of at most
    :data:`_EXPONENT_MAX` in size: an int constant (:func:`_small_int`), or
    in an expression ``Rational(p, q)`` of such (``sqrt``'s ``1/2``)."""
    value = _small_int(node, named)
    if value is not None:
        return abs(value) <= _EXPONENT_MAX
    if named and isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Rational" and \
            len(node.args) == 2 and not node.keywords:
        return all(_small_exponent(a, named) for a in node.args)
    return False


def _bounded_class(name: str) -> bool:
    """Whether an expression may call ``name``: a class of
    :data:`_SYMPY_CLASSES` or :mod:`torch.utils._sympy`'s, or no name sympy
    or torch knows (sympy reads it as an undefined function of that name)."""
    import sympy
    from torch.utils._sympy import functions, numbers

    if name in _SYMPY_CLASSES or any(isinstance(getattr(m, name, None), type) for m in (functions, numbers)):
        return True
    return not hasattr(sympy, name) and not hasattr(functions, name)


def _values_unbounded(node, expression: bool) -> str | None:
    """What the ``ast`` node of a shape expression (``expression``) or of a
    guard that passed the code checks asks of sympy or Python that may take
    too long to compute, or None: a power (``**``, ``<<``, a call of
    :data:`_POWERS`) whose exponent is no int constant of at most
    :data:`_EXPONENT_MAX` in size or whose base holds another power; a list
    or tuple in arithmetic (``[0] * n``); a class other than
    :func:`_bounded_class`'s; a keyword's number past :data:`_PRECISION_MAX`,
    a Float's second argument; ``math``'s :data:`_MATH_UNBOUNDED`."""
    stack = [(node, False)]  # (a node, whether it is inside the base of a power)
    while stack:
        node, in_power = stack.pop()
        power = None
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Pow, ast.LShift)):
            power = node.left, node.right
        elif isinstance(node, ast.BinOp) and any(isinstance(s, (ast.List, ast.Tuple)) for s in (node.left, node.right)):
            return "a list or tuple in arithmetic"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            called = node.func.id
            if expression and not _bounded_class(called):
                return f"a call of {called}, none of the sympy classes torch writes in a shape expression"
            if called in _POWERS and expression:
                if len(node.args) != 2:
                    return f"{called} of {len(node.args)} arguments, not a base and an exponent"
                power = node.args[0], node.args[1]
            if called == "Float" and len(node.args) > 1:
                return "a Float of more than one argument (its precision is given as precision=)"
            for keyword in node.keywords:  # (a number of any type: Float(precision=1e9) stalled as the int did)
                value = keyword.value.value if isinstance(keyword.value, ast.Constant) else None
                if isinstance(value, (int, float, complex)) and not isinstance(value, bool) and \
                        abs(value) > _PRECISION_MAX:
                    return f"the keyword {keyword.arg}={value}, past {_PRECISION_MAX} (a precision in bits)"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                isinstance(node.func.value, ast.Name) and node.func.value.id == "math" and \
                node.func.attr in _MATH_UNBOUNDED:
            return f"a call of math.{node.func.attr}"
        if power is not None:
            if in_power:
                return "a power of a power (or of a shift)"
            if not _small_exponent(power[1], expression):
                return f"a power whose exponent is not an int constant of at most {_EXPONENT_MAX} in size"
            stack.append((power[0], True))
            continue
        stack.extend((child, in_power) for child in ast.iter_child_nodes(node))
    return None


def _check_graph_code(path: Path, name: str, data: bytes) -> None:
    """``ValueError`` naming ``path`` where the graph member ``name`` (its
    bytes ``data``) holds something torch would run as Python code:
    torch's reader evaluates each shape expression (``expr_str``) with
    ``sympy.sympify`` (an ``eval``), and ``program.module()`` executes the
    guards (``guards_code``), each written into a line of Python.
    :func:`_expression_safe` and :func:`_guard_safe` say what passes, and a
    guard holds no quote, ``#``, backslash or line break (torch writes its
    text into a string literal too). Each is also refused where it asks
    sympy or Python for a value that might take unbounded time or memory
    to compute: past :data:`_TEXT_MAX` characters, :data:`_DEPTH_MAX`
    levels of nesting or :data:`_DIGITS_MAX` digits (checked before it is
    parsed or walked), or :func:`_values_unbounded`'s."""
    def refused(what: str, text: str) -> ValueError:
        return ValueError(f"{path}: its graph holds {what} {text!r:.200}, which torch would run as Python code; "
                          "pointsparse loads programs whose shape expressions are sympy's numbers and symbols and "
                          "whose guards compare the inputs' sizes (export_model's) and refuses it")

    def unbounded(what: str, text: str, why: str) -> ValueError:
        return ValueError(f"{path}: its graph holds {what} {text!r:.200} with {why}, a value torch might never "
                          "finish computing as it reads the program or runs it; pointsparse reads shape "
                          f"expressions and guards of at most {_TEXT_MAX} characters nested at most {_DEPTH_MAX} "
                          f"levels, numbers of at most {_DIGITS_MAX} digits and powers of int constant exponents "
                          f"of at most {_EXPONENT_MAX} (export_model's) and refuses it")

    def checked(what: str, text: str, safe) -> None:
        """Refuses the shape expression or guard ``text`` unless it is in
        bounds and ``safe`` (its code check) passes its ``ast`` node."""
        why = _text_unbounded(text)
        if why is not None:
            raise unbounded(what, text, why)
        node = parsed(text)
        if node is not None and _too_deep(node):
            raise unbounded(what, text, f"more than {_DEPTH_MAX} levels of nesting")
        if node is None or not safe(node):
            raise refused(what, text)
        why = _values_unbounded(node, expression=what == "the shape expression")
        if why is not None:
            raise unbounded(what, text, why)

    def parsed(text: str):
        try:
            return ast.parse(text, mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return None

    try:
        graph = json.loads(data)
    except (ValueError, RecursionError) as error:  # (UnicodeDecodeError, JSONDecodeError, a nesting too deep)
        raise ValueError(f"{path} is damaged: its member {name} does not read ({str(error)[:200]})") from None
    seen: set[str] = set()
    stack = [graph]
    while stack:
        value = stack.pop()
        if isinstance(value, list):
            stack.extend(value)
        if not isinstance(value, dict):
            continue
        for key, item in value.items():
            if key == "expr_str" and isinstance(item, str):
                if item not in seen:
                    checked("the shape expression", item, _expression_safe)
                    seen.add(item)
            elif key == "guards_code":
                for guard in item if isinstance(item, list) else [item]:
                    if not isinstance(guard, str):
                        raise refused("the guard", guard)
                    checked("the guard", guard, lambda node, guard=guard: _guard_safe(node) and
                            not any(c in guard for c in "\"#\\") and guard.isprintable())
            else:
                stack.append(item)


# --------------------------------------------------------------------- running a program

def _signature(program: torch.export.ExportedProgram):
    """``(inputs, vals, outputs)`` of ``program``: its user inputs' names,
    each placeholder's example value by name, its output nodes; ValueError
    unless it takes and gives what :func:`export_model` writes."""
    inputs = list(program.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    outputs = [a for n in program.graph.nodes if n.op == "output" for a in n.args[0]]
    count = getattr(outputs[4], "meta", {}).get("val") if len(outputs) == 5 else 0  # a selection's n
    if len(inputs) not in (2, 5) or len(outputs) not in (1, 3, 5) or (len(inputs) == 5 and len(outputs) != 1) or \
            any(vals.get(name) is None for name in inputs) or not isinstance(count, (int, torch.SymInt)) or \
            any(not isinstance(getattr(o, "meta", {}).get("val"), torch.Tensor) for o in outputs[:4]):
        raise ValueError(f"program must take (feats, coords) or (feats, coords, inverse, points, point_batch) "
                         f"and give logits, a tensor or (feats, coords, stride[, kept rows, of n]), as "
                         f"export_model writes; it takes {inputs} and gives {len(outputs)} outputs")
    return inputs, vals, outputs


def output_kind(program: torch.export.ExportedProgram) -> str:
    """What ``program`` (:func:`export_model`'s) gives, read off its graph
    without building a module (:attr:`ProgramModel.output`): ``"sparse"``
    (an output SparseTensor's feats, coords and stride), ``"logits"`` (one
    row per input voxel, or a point-level program's point logits) or
    ``"tensor"``. ValueError, as :class:`ProgramModel`'s, for a program
    that takes or gives another number of tensors (ProgramModel checks
    their sizes further)."""
    inputs, vals, outputs = _signature(program)
    if len(outputs) in (3, 5):
        return "sparse"
    feats, first = vals[inputs[0]], outputs[0].meta["val"]
    if "output_tensor" not in program.state_dict and (
            len(inputs) == 5 or (first.dim() == 2 and str(first.shape[0]) == str(feats.shape[0]))):
        return "logits"  # (one row per input voxel: the rows' size is the input's)
    return "tensor"


class ProgramModel(nn.Module):
    """An exported program called as the eager model. A segmentation program
    (``output`` ``"logits"``): a voxel network's ``forward(x: SparseTensor) ->
    SparseTensor`` of logits on ``x``'s coords, a point-level one's (SPVCNN,
    ``point_level`` True) ``forward(voxels, inverse, points, point_batch) ->
    (P, K)`` point logits (what ``pointsparse eval --program`` scores). A
    program of another output (:class:`VoxelOutputs`): ``forward(x)`` gives
    the output SparseTensor at its stride (``output`` ``"sparse"``,
    ``output_stride``) or the output tensor (``output`` ``"tensor"``, such as a
    classifier's ``(B, K)``); a sparse output that is a selection (a
    VoxelPrune's, at stride 1 or coarser) records which voxels it kept, as the
    eager output does, so ``devoxelize(out, inverse)`` with an inverse into
    the voxels the selection scored (voxelize's, at stride 1) reads the kept
    voxels (zeros for the points of dropped ones); a sparse output knows
    ``x``'s batch items (a global pooling of it gives a row for each, where
    a selection emptied one). ``program`` is what
    :func:`load` or :func:`export_model` gives, ``meta`` the dict :func:`load`
    returns beside it (kept as ``.meta``). The input is checked against the program's before
    it runs (``TypeError`` / ``ValueError`` naming the argument and what the
    program takes, where the program itself would fail a torch guard with an
    ``AssertionError``): a stride-1 SparseTensor on the CPU, feats ``(N,
    in_channels)`` of the program's dtype, int32 coords, and SPVCNN's point
    arguments as SPVCNN checks them (``inverse`` and ``point_batch`` of any
    integer dtype, as SPVCNN takes them; ``points`` of the program's dtype). An empty input gives an empty output
    (no rows). Inference only: ``train()`` raises ``ValueError``, and the
    program runs without an autograd graph: a gradient of its output (under
    grad mode, through its weights or feats that require grad) raises a
    ``RuntimeError`` naming ProgramModel when asked for. It pickles
    (``pickle``, ``torch.save``) as its program, ``meta`` and ``source``;
    ``in_channels``, ``dtype``, ``out_shape`` (the output's sizes after its
    rows) and ``num_classes`` (a segmentation program's; None for others) say
    what the program takes and gives."""

    def __init__(self, program: torch.export.ExportedProgram, meta: dict | None = None) -> None:
        super().__init__()
        if not isinstance(program, torch.export.ExportedProgram):
            raise TypeError(f"program must be a torch.export.ExportedProgram (pointsparse.export.load's); got "
                            f"{type(program).__name__}")
        inputs, vals, outputs = _signature(program)
        feats, first = vals[inputs[0]], outputs[0].meta["val"]
        self.point_level = len(inputs) == 5
        self.output, self.output_stride = output_kind(program), None
        if self.output == "sparse":
            coords, stride = outputs[1].meta["val"], program.state_dict.get("output_stride")
            if first.dim() != 2 or coords.dim() != 2 or tuple(coords.shape[1:]) != (4,) or \
                    coords.dtype != torch.int32 or not isinstance(stride, torch.Tensor) or \
                    tuple(stride.shape) != (3,) or stride.dtype != torch.int32:
                raise ValueError(f"program must give (feats (M, C), coords int32 (M, 4), stride int32 (3,)) as "
                                 f"export_model writes for a sparse output; it gives {tuple(first.shape)}, "
                                 f"{tuple(coords.shape)} {coords.dtype}")
            self.output_stride = tuple(int(v) for v in stride)
            rows = outputs[3].meta["val"] if len(outputs) == 5 else None
            if rows is not None and (rows.dim() != 1 or rows.dtype != torch.int64):
                raise ValueError(f"program must give the kept rows of its selection as int64 (M,), as export_model "
                                 f"writes; it gives {tuple(rows.shape)} {rows.dtype}")
        #: whether a sparse program gives the record of its selection (export_model's since it did)
        self.records_kept = len(outputs) == 5
        if feats.dim() != 2 or (self.output != "tensor" and first.dim() != 2) or \
                not all(isinstance(d, int) for d in (feats.shape[1], *first.shape[1:])):
            raise ValueError(f"program must take feats (N, C) and give logits (N, K) with C and K fixed, as "
                             f"export_model writes (or an output whose sizes after its rows are fixed); it takes "
                             f"{tuple(feats.shape)} and gives {tuple(first.shape)}")
        self.in_channels, self.dtype = int(feats.shape[1]), feats.dtype
        self.out_shape = tuple(int(d) for d in first.shape[1:])
        self.num_classes = self.out_shape[0] if self.output == "logits" else None
        self.logits_dtype = first.dtype  # (SPVCNN's: float32 from its point branch, bf16 voxels or not)
        self.points_dtype = vals[inputs[3]].dtype if self.point_level else None
        # a point-level program exported since the graph checks its points' values itself
        # (pointsparse::point_coords): those checks are not made twice a call here
        checker = torch.ops.pointsparse.point_coords.default
        self.checks_points = self.point_level and any(node.op == "call_function" and node.target is checker
                                                      for node in program.graph.nodes)
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"meta must be None or the dict load returns; got {type(meta).__name__}")
        self.meta = dict(meta or {})
        self._program = program  # (its weights are run's: pickling writes them as they are now)
        self.run = program.module()
        self._autocast_dtypes: dict = {}  # autocast dtype -> the output's (_empty_dtype)
        self.training = False

    #: Where the program came from (``load``'s path), named in the input errors.
    source: str = "the program"

    @classmethod
    def load(cls, path) -> "ProgramModel":
        """The program in ``path`` (a file :func:`save` wrote), its meta in ``.meta``."""
        model = cls(*load(path))
        model.source = f"the program {path}"
        return model

    def __reduce__(self):
        """Pickling (``pickle``, ``torch.save``, ``copy.deepcopy``): the
        program as ``torch.export.save`` writes it, with ``meta`` and
        ``source`` (torch's module of the program holds local functions,
        which pickle refuses)."""
        buffer = io.BytesIO()
        torch.export.save(self._program, buffer)
        return _program_model_from_bytes, (buffer.getvalue(), self.meta, self.source)

    def train(self, mode: bool = True) -> "ProgramModel":
        if mode:
            raise ValueError("an exported program runs inference only (batch norm with its running statistics); "
                             "train the checkpoint it was exported from")
        return self  # (the program's module refuses eval() and train() alike: it is always in eval form)

    def _apply(self, fn, recurse=True):
        """``to()``, ``double()``, ``half()``, ``cuda()``... : a conversion
        that leaves every tensor as it is (``float()`` of a float32 program,
        ``cpu()``) does nothing; any other is a ValueError. torch's would
        convert the program's weights in place, those of every module of the
        same program with them, while the input check kept asking for the
        exported dtype (the engine then refused the feats)."""
        for t in [*self.run.parameters(), *self.run.buffers()]:
            probe = torch.empty(0, dtype=t.dtype, device=t.device)
            try:
                out = fn(probe)
                same = isinstance(out, torch.Tensor) and out.dtype == t.dtype and out.device == t.device
            except Exception as error:  # e.g. cuda() on a build without CUDA (torch's AssertionError)
                same, why = False, f" ({type(error).__name__}: {str(error)[:100]})"
            else:
                why = "" if not isinstance(out, torch.Tensor) else f" (to {out.dtype} on {out.device})"
            if not same:  # (the program's own dtype named, not the tensor's: a bf16 SPVCNN program keeps float32
                # tensors in its point branch, and .double() and .bfloat16() named one dtype each)
                raise ValueError(f"an exported program keeps the dtype and device it was exported with (a "
                                 f"{self.dtype} program on {t.device}: it would turn its {t.dtype} tensors{why}); "
                                 "export the checkpoint again in the form wanted (pointsparse export --inference "
                                 "float32, fused or bf16)")
        return self

    def _call(self, *args):
        """The program on ``args``. Under ``torch.autocast`` a program that
        casts between dtypes inside (SPVCNN's point branch: torch.export keeps
        each ``.to(float32)`` it traced as a check that the tensor is float32)
        fails torch's check on the first conv output autocast gave in its
        precision: a ValueError saying so instead of torch's bare "Tensor
        dtype mismatch". So does a bf16 program under fp16 autocast (or an
        fp16 one under bf16): torch's cat at its skips refuses a 16-bit dtype
        other than autocast's ("Unexpected floating ScalarType in
        at::autocast::prioritize"; the eager model's ``nn.cat`` runs with
        autocast off)."""
        # (inference: without an autograd graph, the output refuses a gradient by name where one is asked for)
        wanted = [t for t in (*args, *self.parameters()) if isinstance(t, torch.Tensor) and t.requires_grad] \
            if torch.is_grad_enabled() else []
        try:
            with torch.no_grad():
                out = self.run(*args)
        except (RuntimeError, AssertionError) as error:  # (on fake tensors, _empty_dtype's, the check asserts)
            if not torch.is_autocast_enabled("cpu"):
                raise
            low = torch.get_autocast_dtype("cpu")
            if "autocast::prioritize" in str(error):  # (a bf16 program under fp16 autocast, or the reverse)
                raise ValueError(
                    f"{self.source} cannot run under torch.autocast({low}): it is a {self.dtype} program, and "
                    f"torch's cat inside it refuses a 16-bit dtype other than autocast's (\"{error}\"); run it "
                    f"outside autocast or under torch.autocast('cpu', {self.dtype}), or export the float32 model "
                    "(pointsparse export --inference fused), whose program runs under either") from error
            if "dtype mismatch" not in str(error):
                raise
            raise ValueError(
                f"{self.source} cannot run under torch.autocast: it casts between dtypes inside (torch.export "
                f"kept each cast it traced in {self.dtype} as a check, which autocast's "
                f"{torch.get_autocast_dtype('cpu')} outputs fail); run it outside autocast, or export the "
                "model in the precision wanted (pointsparse export --inference bf16)") from error
        if not wanted:
            return out
        refuse = lambda t: _NoGradient.apply(self.source, t, *wanted) if t.is_floating_point() else t  # noqa: E731
        return tuple(refuse(t) if isinstance(t, torch.Tensor) else t for t in out) \
            if isinstance(out, (tuple, list)) else refuse(out)

    def _empty_dtype(self) -> torch.dtype:
        """The dtype of the output the program gives now: the traced one, or
        under ``torch.autocast`` that of a run on fake tensors of
        :data:`MIN_POINTS` rows (cached per autocast dtype), so that an
        empty input's output (never run: the program is traced for two rows
        and up) has the dtype a cloud's has. Fake tensors hold no data, so
        no data check runs (a real row of zeros was refused by a VoxelPrune
        threshold that kept none of it)."""
        if not torch.is_autocast_enabled("cpu"):
            return self.logits_dtype
        low = torch.get_autocast_dtype("cpu")
        if low not in self._autocast_dtypes:
            from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415 - torch's, for this probe only
            from torch.fx.experimental.symbolic_shapes import ShapeEnv  # noqa: PLC0415

            n = MIN_POINTS
            with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()):  # (the program's weights: real)
                feats = torch.zeros((n, self.in_channels), dtype=self.dtype)
                coords = torch.zeros((n, 4), dtype=torch.int32)
                if self.point_level:
                    rows = torch.zeros(n, dtype=torch.int64)
                    out = self._call(feats, coords, rows, torch.zeros((n, 3), dtype=self.points_dtype), rows)
                else:
                    out = self._call(feats, coords)
            self._autocast_dtypes[low] = (out[0] if isinstance(out, (tuple, list)) else out).dtype
        return self._autocast_dtypes[low]

    def forward(self, x: SparseTensor, inverse=None, points=None, point_batch=None):
        if not isinstance(x, SparseTensor):
            raise TypeError(f"x must be a SparseTensor; got {type(x).__name__}")
        if x.stride != (1, 1, 1):
            raise ValueError(f"x must be a stride-1 SparseTensor (voxels); got stride {x.stride}")
        if x.device.type != "cpu":
            raise ValueError(f"the program runs on the CPU; x is on {x.device} (x.cpu())")
        feats, coords = x.feats, x.coords  # (a SparseTensor made with validate=False is checked here too)
        if feats.dim() != 2 or coords.dim() != 2 or coords.shape[1] != 4 or feats.shape[0] != coords.shape[0]:
            raise ValueError(f"x must have feats (N, C) and coords (N, 4); got {tuple(feats.shape)} and "
                             f"{tuple(coords.shape)}")
        if feats.dtype != self.dtype:
            raise TypeError(f"feats must be {self.dtype} ({self.source} takes it); got {feats.dtype}")
        if feats.shape[1] != self.in_channels:
            raise ValueError(f"feats must have {self.in_channels} channels ({self.source} takes them); got "
                             f"{feats.shape[1]}")
        if not self.point_level:
            if (inverse, points, point_batch) != (None, None, None):
                raise TypeError("this program takes voxels only (feats, coords); inverse, points and point_batch "
                                "are a point-level network's (SPVCNN)")
            empty = feats.new_zeros((0, *self.out_shape), dtype=self._empty_dtype()) if not len(x) else None
            if self.output == "logits":
                return x.with_feats(empty if empty is not None else self._call(feats, x.coords))
            if self.output == "tensor":
                return empty if empty is not None else self._call(feats, x.coords)
            if empty is not None:  # (a selection of no voxel: of the none there were)
                out_feats, out_coords, kept = empty, x.coords, (x.coords.new_zeros(0, dtype=torch.int64), 0)
            else:
                out_feats, out_coords, _, *kept = self._call(feats, x.coords)
            out = SparseTensor(out_feats, out_coords, self.output_stride, validate=False)
            # (the batch items of x, as an eager output's cache knows them: x's own, or a selection's origin; a
            # selection that dropped every voxel of the last item pooled to B - 1 rows from the output's coords)
            out.cache.origin = x.cache.input_coords()
            if self.records_kept:  # (composed with x's record at that stride, as eager's selection with its input's)
                out.cache.note_kept(self.output_stride, kept[0], int(kept[1]), x.cache)
            else:  # a program written without the record
                _note_selection(out, x)
            return out
        from .models.spvcnn import check_points

        check_points(x, inverse, points, point_batch, values=not self.checks_points,
                     sixteen_bit=self.points_dtype in (torch.float16, torch.bfloat16))
        if points.dtype != self.points_dtype:
            raise TypeError(f"points must be {self.points_dtype} ({self.source} takes them); got {points.dtype}")
        # (indices of any integer dtype, as SPVCNN takes them: the same rows, as the program's int64)
        inverse, point_batch = inverse.long(), point_batch.long()
        if not len(inverse):
            return feats.new_zeros((0, self.num_classes), dtype=self._empty_dtype())
        return self._call(feats, x.coords, inverse, points, point_batch)

    def __repr__(self) -> str:  # (the program's module prints as a tree of empty Modules)
        kind = ", point_level=True" if self.point_level else ""
        if self.output == "logits":
            return (f"ProgramModel(in_channels={self.in_channels}, num_classes={self.num_classes}, "
                    f"dtype={self.dtype}{kind})")
        stride = f", output_stride={self.output_stride}" if self.output == "sparse" else ""
        return (f"ProgramModel(in_channels={self.in_channels}, output={self.output!r}, "
                f"out_shape={self.out_shape}{stride}, dtype={self.dtype})")


@torch.library.custom_op("pointsparse::refuse_gradient", mutates_args=())
def _refuse_gradient(grad: torch.Tensor, wanted: list[torch.Tensor], source: str) -> list[torch.Tensor]:
    """The backward of :class:`_NoGradient`: raises the RuntimeError naming
    :class:`ProgramModel` (``source``: its :attr:`~ProgramModel.source`)
    when a gradient is asked for. An operator, so that torch.compile
    (``fullgraph=True``) traces the backward through its fake implementation
    and the refusal is raised when the backward runs, not while compiling
    (dynamo's bare "Observed exception"); its outputs stand for the
    gradients of the ``wanted`` tensors, which the backward needs (a
    compiled backward drops an operator whose outputs nothing reads)."""
    raise RuntimeError(f"ProgramModel ({source}) runs inference only: its output has no gradient (it runs its "
                       "program without an autograd graph); compute gradients with the eager model "
                       "(pointsparse.export.load_checkpoint, models.load_model), or run the program under "
                       "torch.no_grad() / torch.inference_mode()")


@_refuse_gradient.register_fake
def _(grad, wanted, source):
    return [t.new_empty(t.shape) for t in wanted]  # (contiguous: ``wanted`` are expanded stand-ins)


class _NoGradient(torch.autograd.Function):
    """A program's output as it is, part of the autograd graph of the
    tensors that asked for gradients (the program's weights, feats that
    require grad), whose backward refuses the gradient, naming
    :class:`ProgramModel`, which runs its program without an autograd
    graph (inference only): :func:`_refuse_gradient`."""

    @staticmethod
    def forward(ctx, source: str, out: torch.Tensor, *wanted: torch.Tensor) -> torch.Tensor:
        ctx.source = source
        # Stand-ins of the wanted tensors' shapes, dtypes and devices (one element each, expanded), all the
        # refusal reads of them: the tensors themselves, saved, made a weight changed in place before the
        # backward (load_state_dict) torch's "modified by an inplace operation" instead of the refusal.
        ctx.save_for_backward(*(torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape) for t in wanted))
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *_refuse_gradient(grad, list(ctx.saved_tensors), ctx.source))


def _program_model_from_bytes(data: bytes, meta: dict, source: str) -> ProgramModel:
    """:meth:`ProgramModel.__reduce__`'s inverse."""
    model = ProgramModel(torch.export.load(io.BytesIO(data)), meta)
    model.source = source
    return model


def _note_selection(out: SparseTensor, x: SparseTensor) -> None:
    """For a program written without its selection's record (before
    :class:`VoxelOutputs` gave it): records in ``out``'s cache (a program's
    output, rebuilt with a fresh one) which of ``x``'s voxels it holds where
    it holds some of them, as
    the eager model's ``select_voxels`` (a stride-1 VoxelPrune) does, so that
    ``devoxelize(out, inverse)`` maps voxelize's inverse through them: at
    ``x``'s stride, where every row of ``out`` is a row of ``x`` and in
    ``x``'s order (a selection keeps sorted rows), composed with ``x``'s own
    record where ``x`` is a selection too. An output on all of ``x``'s
    voxels keeps no record of its own (it devoxelizes as ``x``), one
    elsewhere none at all."""
    from .models.spvcnn import point_rows  # noqa: PLC0415 - (models import the export's layers lazily too)

    n = x.coords.shape[0]
    if out.stride != x.stride or len(out) > n or (len(out) == n and x.stride not in x.cache.kept):
        return
    rows = out.coords.new_zeros(0, dtype=torch.int64)
    if len(out):
        try:  # (each output coord's row among x's: at x's own stride, the coords themselves looked up)
            rows = point_rows(x, out.coords)
        except ValueError:  # some output voxel is none of x's
            return
        if not bool((rows[1:] > rows[:-1]).all()):
            return
    out.cache.note_kept(x.stride, rows, n, x.cache)


# --------------------------------------------------------------------- checkpoints

def load_checkpoint(path, *, allow_non_finite: bool = False) -> tuple[nn.Module, dict]:
    """``(model in eval mode, config)`` of a ``pointsparse train`` checkpoint
    (channel-pruned ones included), read with ``weights_only=True``: the
    model :func:`pointsparse.models.load_model` gives (weights that hold NaN
    or inf refused unless ``allow_non_finite``, as there), and the config."""
    from .checkpoint import load_training
    from .models import model_from_state

    allow_non_finite = as_bool(allow_non_finite, "allow_non_finite")
    state = load_training(path)  # data only (weights_only=True), digest checked
    try:
        model = model_from_state(state, allow_non_finite=allow_non_finite)
    except (ValueError, TypeError) as error:  # (load_model's wording: the error names the file)
        raise (TypeError if isinstance(error, TypeError) else ValueError)(f"checkpoint {path}: {error}") from error
    return model.eval(), state["config"]


_EXAMPLE_VALUES_MAX = 2**31  #: the most feature values example_input makes (8 GiB of float32)


def example_input(in_channels: int, voxel_size: float = 0.2, seed: int = 0, points: bool = False):
    """A small generated street scene as the tracing example (its size is not
    baked into the program): a SparseTensor, or with ``points=True`` the
    arguments of a point-level network (SPVCNN): ``(voxels, inverse, points,
    point_batch)``. ``in_channels``: an int >= 1 (the generated feats cut or
    zero-padded to it), else a ValueError / TypeError naming it."""
    from .data import generated
    from .data.transforms import voxelize_sample

    in_channels = as_int(in_channels, "in_channels", 1)  # (-1 or 0 sliced the feats to a wrong width)
    v = voxelize_sample(generated.outdoor_scene(seed=seed, beams=16, azimuth_steps=256), voxel_size, 255)
    if len(v.input) * in_channels > _EXAMPLE_VALUES_MAX:  # (checked before the padding allocates them)
        raise ValueError(f"in_channels {in_channels}: the example's {len(v.input)} voxels would hold "
                         f"{len(v.input) * in_channels} feature values, past {_EXAMPLE_VALUES_MAX}")
    feats = v.input.feats[:, :in_channels] if v.input.feats.shape[1] >= in_channels else torch.nn.functional.pad(
        v.input.feats, (0, in_channels - v.input.feats.shape[1]))
    voxels = SparseTensor(feats.contiguous(), v.input.coords)
    if not points:
        return voxels
    return voxels, v.inverse, v.points, torch.zeros(len(v.inverse), dtype=torch.int64)
