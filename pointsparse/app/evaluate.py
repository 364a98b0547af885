"""Score a segmentation checkpoint (per-class IoU, mIoU) on point clouds.

``pointsparse eval --checkpoint DIR/checkpoint.pt [--data SOURCE...] [--out DIR] [--inference bf16]``
(the data defaults to what the run validated on, files of ``--data`` read
with the run's label map unless ``--label-map`` names another; ``--inference``: the model
fused for inference, or fused and in bfloat16), or ``pointsparse eval
--program model.pt2 [--data ...]``: a program ``pointsparse export`` wrote,
scored as it runs (on the CPU; its data defaults to the run's too)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import DirectoryLock
from ..data import DEFAULT_IGNORE, VALIDATION_SEED, VoxelDataset
from ..data.datasets import is_generated
from ..data.transforms import check_voxel_extent
from ..models import model_from_state
from . import counted, metrics
from .clouds import (FittedClouds, TrainedFeatures, files_source, nonfinite_hold, refuse_file_flags, skips_nonfinite,
                     warn_coarse_positions)
from .distributed import pick_device
from .scoring import EVAL_PREFIX, _inner, evaluate, loaded_frozen, point_level, write_report
from .train import (_note_ignored_class, add_data_arguments, check_args, generated_source, load_checkpoint,
                    require_labels, shown_in)
from .trainer import have_tqdm

__all__ = ["INFERENCE", "add_arguments", "checkpoint_model", "inference_model", "main"]

#: The forms ``pointsparse eval --inference`` scores a model in.
INFERENCE = ("float32", "fused", "bf16")


def checkpoint_model(state: dict, path) -> torch.nn.Module:
    """``models.model_from_state(state)``; where the checkpoint ``path``'s
    config or weights do not make the model (its ValueError or TypeError), a
    ValueError naming the file; also where a weight holds NaN or inf (its
    check: such a model scores, exports and predicts without a word, every
    point class 0; training refuses to write them, the commands that read a
    checkpoint refuse to run them, as models.load_model refuses to load
    them)."""
    try:
        return model_from_state(state)
    except (ValueError, TypeError) as error:
        raise ValueError(f"checkpoint {path}: {error}") from error


def checkpoint_epoch(state: dict) -> int | None:
    """The epochs the run of a checkpoint's ``state`` had trained (its
    ``epoch``; the run's metrics.json's ``epochs``), which ``eval --out``
    records beside the file it scored (``checkpoint.pt`` and ``best.pt``
    of one run, or one file a resumed run wrote over, read alike without
    it); None for a program, a checkpoint without that record or one whose
    record is no count (a hand-edited file: the report is still written)."""
    epoch = state.get("epoch")
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 0 else None


def inference_model(model: torch.nn.Module, inference: str = "float32") -> torch.nn.Module:
    """``model`` as ``pointsparse eval --inference`` runs it: itself
    (``"float32"``); ``nn.fuse_for_inference``'s copy, pruning masks made
    permanent and BatchNorm folded (``"fused"``); that copy in bfloat16
    (``"bf16"``; the features are cast to the convs' dtype by the scorer;
    SPVCNN's point branch stays float32: ``SPVCNN.to_bf16_inference``).
    ValueError for another name."""
    from ..nn import fuse_for_inference

    if inference not in INFERENCE:
        raise ValueError(f"inference must be one of {', '.join(INFERENCE)}; got {inference!r}")
    if inference == "float32":
        return model
    fused = fuse_for_inference(model)
    if inference != "bf16":
        return fused
    if point_level(fused):  # (SPVCNN's own cast, on the network inside an nn.MapsAhead too: in place)
        _inner(fused).to_bf16_inference()
        return fused
    return fused.to(torch.bfloat16)


def add_arguments(parser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint written by pointsparse train")
    which.add_argument("--program", metavar="FILE.pt2",
                       help="instead of a checkpoint, a program written by pointsparse export (run on the CPU as it "
                            "was exported: --inference does not apply)")
    add_data_arguments(parser, ignore_default=None, run_defaults=True)
    parser.set_defaults(data=None)
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="also write eval-metrics.json, eval-confusion.png and eval-topdown.png here (beside a "
                             "run's own metrics.json, which stays)")
    parser.add_argument("--val-scenes", type=int, default=None, metavar="N",
                        help="generated data: score N held-out scenes from the validation seed (default: the run's "
                             "--val-scenes, the scenes it validated on, which are the first of them)")
    parser.add_argument("--inference", choices=INFERENCE, default="float32",
                        help="score the model as it is run for inference: 'fused' (pruning masks made permanent, "
                             "BatchNorm folded, ReLU in the conv's store: nn.fuse_for_inference), 'bf16' (fused, "
                             "then bfloat16 weights and features: the AVX512-BF16 kernels where the CPU has them; "
                             "SPVCNN's point branch stays float32); default float32, the model as trained")
    add_maps_ahead_argument(parser)
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="score the finite points of clouds some of whose positions are NaN or inf (organised "
                             "clouds: points without a return), the others left out as predict --skip-nonfinite "
                             "leaves them; without it such a cloud is refused (the run's data, scored without "
                             "--data, are read as train --skip-nonfinite read them)")


def add_maps_ahead_argument(parser) -> None:
    parser.add_argument("--maps-ahead", action="store_true",
                        help="build each cloud's kernel maps and plans before the network runs, two at a time on "
                             "worker threads from 50k voxels (nn.MapsAhead; the same predictions; a checkpoint's "
                             "model only: a program builds its maps inside)")


def with_maps_ahead(model, args):
    """``nn.MapsAhead(model)`` where ``args.maps_ahead`` asks for it
    (``ValueError`` with ``--program``), else ``model``."""
    if not getattr(args, "maps_ahead", False):
        return model
    if getattr(args, "program", None) is not None:
        raise ValueError("--maps-ahead runs a checkpoint's model; an exported program builds its maps inside")
    from ..nn import MapsAhead

    return MapsAhead(model)


def main(args) -> int:
    """``pointsparse eval``: score a checkpoint on clouds (by default the data
    it was validated on)."""
    check_args(args)
    program = getattr(args, "program", None)
    if program is not None:
        model, state = program_and_state(program, args)
        args.device = "cpu"
    else:
        model, state = None, load_checkpoint(args.checkpoint)  # (the model made once the data are checked)
    config = state["config"]
    # An explicit --ignore-index always wins, 255 included.
    ignore_index = (args.ignore_index if args.ignore_index is not None
                    else config.get("ignore_index", DEFAULT_IGNORE))
    maps_ahead = getattr(args, "maps_ahead", False)
    # --maps-ahead runs the model on the CPU where --device is not given (cuda is the default elsewhere)
    device = pick_device("cpu" if maps_ahead and args.device is None else args.device, 0)
    if maps_ahead and device.type != "cpu":
        raise ValueError(f"--maps-ahead builds the maps on CPU worker threads; the model runs on {device}")
    # (the clouds are read, and kept, inside: the checks of their labels, and of the map where their format
    # takes another than the run's, read them first)
    with nonfinite_hold(skips_nonfinite(getattr(args, "skip_nonfinite", False), state, own_data=not args.data),
                        "score the other points"):
        spec, source = eval_source(args, state, ignore_index)  # (its flags checked; the clouds read on first use)
        # --out taken, as train takes it, before the evaluation's work and after the checks: another run's
        # folder is refused; one this run made goes again where it fails before writing there.
        with DirectoryLock(args.out, "--out") if args.out else contextlib.nullcontext():
            return _score(args, model, state, spec, source, ignore_index, device)


def _score(args, model, state: dict, spec, source, ignore_index: int, device) -> int:
    """``pointsparse eval``'s work once its flags are checked (``--out``, where given, held): ``model``
    the program's, or None for the checkpoint's."""
    config, program = state["config"], getattr(args, "program", None)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = "--data" if args.data else "the run's data"
    files = not is_generated(spec)
    samples = source
    if files:  # (generated scenes are made in memory; files are read cloud by cloud, twice, none kept: eval of
        # SemanticKITTI's 4,071 validation scans held them all, about 18 GB). Every cloud is checked before any
        # is scored, in one reading, the refusals in the order of the checks (labels, classes, label values,
        # extents), each naming its first cloud.
        source.keep = False
        tally, features = LabelTally(len(_classes(source, config)), ignore_index), TrainedFeatures(config)
        refused: dict[str, ValueError] = {}
        for i in range(len(source)):
            sample = source[i]
            require_labels([sample], where)  # (an mIoU of unlabelled clouds is NaN)
            for check, call in (("labels", lambda: tally.add(sample)),
                                ("extent", lambda: check_voxel_extent(sample, config["voxel_size"]))):
                try:
                    call()
                except ValueError as error:
                    refused.setdefault(check, error)
            warn_coarse_positions(sample, config["voxel_size"])
            features.check(sample)
        del sample, call  # (the last cloud checked, not held through the scoring)
    else:
        require_labels(source, where)
    classes = _classes(source, config)
    check_data_classes(classes, config["classes"], where, files)
    if source.classes is not None:  # (raw labels without a map: the ignore index is one of them by design)
        # (--ignore-index 0 read as "raw 0 is unlabeled", which the map ignores already, dropped class 0 unsaid)
        _note_ignored_class(classes, ignore_index, f"the label map {source.label_map.name!r}" if files
                            else f"the generated scenes ({spec[0]})", None, " in the metrics")
    if files:
        if "labels" in refused:
            raise refused["labels"]
        tally.finish(source.label_map, where, "--label-map")
        if "extent" in refused:
            raise refused["extent"]
        features.note(len(source))
        samples = FittedClouds(source, features)  # (features the model never saw: 0)
    else:
        check_scored_labels(source, len(classes), ignore_index, where)
    if model is None:
        model = with_maps_ahead(inference_model(checkpoint_model(state, args.checkpoint).to(device), args.inference),
                                args)
    dataset = VoxelDataset(samples, config["voxel_size"], ignore_index)
    t0 = time.perf_counter()
    with loaded_frozen():
        cm, first = evaluate(model, dataset, len(classes), ignore_index, device, args.batch_size,
                             progress=not args.no_progress and have_tqdm())
    elapsed = time.perf_counter() - t0
    print(metrics.format_table(cm, classes))
    print(f"{counted(len(source), 'cloud')} in {elapsed:.1f} s ({elapsed / max(len(source), 1):.2f} s per cloud)")
    if args.out:
        report = write_report(Path(args.out), cm, classes, first, None,
                              {**({"program": os.path.abspath(program)} if program is not None else
                                  {"checkpoint": os.path.abspath(args.checkpoint)}),
                               "epoch": checkpoint_epoch(state),
                               "data": spec, "inference": state.get("inference", args.inference),
                               "eval_time_s": elapsed,
                               "eval_time_per_cloud_s": elapsed / max(len(source), 1)}, ignore_index, EVAL_PREFIX)
        # (the pictures named as train names them: under --out as typed, not as metrics.json's absolute paths)
        shown = ", ".join(str(shown_in(p, args.out)) for p in report["pictures"].values())
        print(f"metrics: {Path(args.out) / (EVAL_PREFIX + 'metrics.json')}; pictures: {shown}")
    return 0


def _classes(source, config: dict) -> list:
    """The classes the data scored are read as: their label map's, else the run's."""
    return list(source.classes or config["classes"])


def check_data_classes(classes, checkpoint_classes, where: str, files: bool = True) -> None:
    """``ValueError`` naming ``where`` (the data) where its ``classes`` are
    not the checkpoint's (``files``: clouds read through a label map, which
    the message says to give)."""
    if list(classes) != list(checkpoint_classes):
        hint = " (give --label-map of the raw labels to the checkpoint's classes)" if files else ""
        raise ValueError(f"{where}: the data's classes {list(classes)} differ from the checkpoint's "
                         f"{list(checkpoint_classes)}{hint}")


def scored_labels(labels, num_classes: int, ignore_index: int, name: str):
    """One cloud's ``labels`` (numpy or torch) less ``ignore_index``;
    ``ValueError`` naming ``name`` where one is neither a class index nor
    ``ignore_index`` (raw labels read without their label map)."""
    labels = labels[labels != ignore_index]
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"{name}: label {int(labels[bad][0])} is neither a class index (0 to {num_classes - 1}) "
                         f"nor the ignore index {ignore_index}: give the label map of its raw labels (--label-map)")
    return labels


def check_scored_labels(source, num_classes: int, ignore_index: int, where: str, dist=None,
                        flag: str = "--label-map") -> None:
    """``ValueError`` before the model runs where a cloud of ``source`` has
    a label that is neither a class index nor ``ignore_index`` (naming the
    cloud: raw labels read without their label map; the confusion matrix
    refused it, naming none, after the clouds before it were scored), or
    where no point of any is scored (every label the ignore index, or no
    point at all, which the message says: an mIoU of NaN). A process of a distributed run (``dist``, a ``Dist`` whose world
    is larger than one) checks the clouds of its shard and gathers the
    others' outcomes: each refuses what any refused, and where no point of
    any shard is scored. Where more than half of the points carry the
    ignore index, and it is no class index, a warning on stderr
    (:func:`warn_mostly_ignored`, naming ``flag``, the option that gave the
    map; not in a distributed run); where fewer are, a warning naming the
    clouds with more than half of theirs ignored, where a label map read
    them (:func:`warn_mostly_ignored_clouds`)."""
    from .scoring import refuse_together, shard

    distributed = dist is not None and dist.active
    tally, error = LabelTally(num_classes, ignore_index), None
    try:
        for i in (shard(len(source), dist.rank, dist.world) if distributed else range(len(source))):
            tally.add(source[i])
    except ValueError as refused:
        if not distributed:
            raise
        error = str(refused)
    scored = tally.kept > 0
    if distributed:  # (every process learns every shard's outcome: all refuse together, with the same message)
        scored = any(refuse_together(dist, error, scored))
    tally.finish(getattr(source, "label_map", None), where, flag, scored, distributed)


class LabelTally:
    """What :func:`check_scored_labels` learns of the clouds, one at a time
    (:meth:`add`: ``ValueError`` naming a cloud whose label is neither a
    class index nor ``ignore_index``), so that eval checks its clouds in one
    reading before it scores them in another, holding one at a time."""

    def __init__(self, num_classes: int, ignore_index: int) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.points = self.kept = self.clouds = 0
        self.heavy: list[tuple[str, float]] = []  # (name, ignored share) of the clouds mostly ignored

    def add(self, sample) -> None:
        count = len(scored_labels(sample.labels, self.num_classes, self.ignore_index, sample.name))
        self.points, self.kept = self.points + len(sample.labels), self.kept + count
        if len(sample.labels):
            self.clouds += 1
            share = 1 - count / len(sample.labels)
            if share > MOSTLY_IGNORED:
                self.heavy.append((str(sample.name), share))

    def finish(self, label_map, where: str, flag: str, scored: bool | None = None, distributed: bool = False) -> None:
        """The refusals and warnings of :func:`check_scored_labels` on what
        was added (``scored``: whether any process scored a point, in a
        distributed run)."""
        scored = self.kept > 0 if scored is None else scored
        if not scored and not distributed and self.points == 0:  # (empty clouds: no label, ignored or not, to blame)
            raise ValueError(f"{where}: the clouds hold no points: nothing to score")
        if not scored:
            raise ValueError(f"{where}: every point's label is the ignore index {self.ignore_index} (--ignore-index; "
                             "raw labels the label map does not list are ignored too): nothing to score")
        if not distributed and not 0 <= self.ignore_index < self.num_classes:
            if not warn_mostly_ignored(self.points, self.kept, self.ignore_index, label_map, where, flag):
                # (a cloud of ignored labels beside good ones: the share of all points stayed under the bar)
                _warn_heavy(self.heavy, self.clouds, label_map, where, flag)


#: The share of ignored points above which :func:`warn_mostly_ignored` warns.
MOSTLY_IGNORED = 0.5


def warn_mostly_ignored(points: int, kept: int, ignore_index: int, label_map, where: str,
                        flag: str = "--label-map") -> bool:
    """A warning on stderr where more than :data:`MOSTLY_IGNORED` of the
    ``points`` of the data (``where``) are ignored (``kept`` are scored):
    raw labels read through a ``label_map`` that does not list them, most
    often the map of other data (raw SemanticKITTI ids read with
    semantic-kitti-learning kept 0.5% of a scan; its mIoU was printed as
    any other), or labels of the ignore index in the files themselves.
    Returns whether it warned."""
    if points == 0 or (points - kept) / points <= MOSTLY_IGNORED:
        return False
    why = _unlisted(label_map, flag) if label_map is not None else "the files' own labels"
    print(f"warning: {where}: {100 * (points - kept) / points:.1f}% of the points ({points - kept} of {points}) "
          f"carry the ignore index {ignore_index}, {why}; the metrics score the other {kept}", file=sys.stderr)
    return True


def warn_mostly_ignored_clouds(samples, ignore_index: int, num_classes: int, label_map, where: str,
                               flag: str = "--label-map") -> None:
    """:func:`warn_mostly_ignored` cloud by cloud (a run's training clouds,
    ``where``): a warning on stderr naming how many of ``samples`` have more
    than :data:`MOSTLY_IGNORED` of their points ignored, and the first, where
    a ``label_map`` read them (a map of other data makes a file's labels
    mostly ignored: SemanticKITTI ``.bin`` scans read with
    ``semantic-kitti-learning`` beside learning-id ``.npy`` files kept 0.5% of
    the scans' points, and their cars became another class, without a word).
    Nothing where the ignore index is a class index."""
    if label_map is None or 0 <= ignore_index < num_classes:
        return
    heavy, total = [], 0
    for sample in samples:
        labels = sample.labels
        if labels is None or len(labels) == 0:
            continue
        total += 1
        share = float(np.count_nonzero(np.asarray(labels) == ignore_index)) / len(labels)
        if share > MOSTLY_IGNORED:
            heavy.append((sample.name, share))
    _warn_heavy(heavy, total, label_map, where, flag)


def _warn_heavy(heavy: list, total: int, label_map, where: str, flag: str) -> None:
    """:func:`warn_mostly_ignored_clouds`' warning of the clouds ``heavy``
    ((name, ignored share) pairs) among ``total`` labelled ones."""
    if heavy and label_map is not None:
        name, share = heavy[0]
        print(f"warning: {where}: {len(heavy)} of {total} labelled clouds have more than "
              f"{100 * MOSTLY_IGNORED:.0f}% of their points ignored, the first {name} ({100 * share:.1f}%): "
              f"{_unlisted(label_map, flag)}", file=sys.stderr)


def _unlisted(label_map, flag: str) -> str:
    """The mostly-ignored warnings' cause where a map read the labels."""
    return (f"raw labels the label map {label_map.name!r} does not list: is it the map of these files' labels? "
            f"({flag})")


def program_and_state(path, args=None):
    """``(export.ProgramModel, a checkpoint-like dict)`` of a ``.pt2`` file
    ``pointsparse export`` wrote: ``config`` (classes, voxel size, ...),
    ``args`` and ``val_paths`` (the run's data), ``inference`` from the
    file's meta; ``ValueError`` naming the file where the meta lacks them,
    and first, naming the flag, where the command's ``args`` ask a program
    for what only a checkpoint's model does (``--inference``,
    ``--maps-ahead``, a ``--device`` other than the CPU)."""
    from ..export import ProgramModel

    if args is not None:
        typed = getattr(args, "_typed", None)  # (typed, whatever its value, as the commands refuse unread flags)
        if ("inference" in typed) if typed is not None else getattr(args, "inference", "float32") != "float32":
            raise ValueError(f"--inference {args.inference} shapes a checkpoint's model; a program keeps the form it "
                             "was exported in (pointsparse export --inference)")
        if getattr(args, "device", None) not in (None, "cpu"):
            raise ValueError(f"--device {args.device}: an exported program runs on the CPU")
        with_maps_ahead(None, args)  # (refuses --maps-ahead)
    model = ProgramModel.load(path)
    # logits for every input voxel, or (a VoxelPrune at stride 1) for the voxels it kept, with their coords
    kept_logits = model.output == "sparse" and model.output_stride == (1, 1, 1) and len(model.out_shape) == 1
    if model.output != "logits" and not kept_logits:
        raise ValueError(f"{path}: the program gives {model.output} output, not logits for the input voxels: "
                         "eval and predict run segmentation programs (pointsparse export's)")
    classes = model.num_classes if model.output == "logits" else model.out_shape[0]
    meta = model.meta
    missing = [key for key in ("classes", "voxel_size", "in_channels") if key not in meta]
    if missing:
        raise ValueError(f"{path}: its meta lacks {', '.join(missing)} (not a program pointsparse export wrote)")
    from ..checkpoint import check_config

    try:
        check_config(meta, path)
    except TypeError as error:  # (a meta value of the wrong kind: bad input, named in one line)
        raise ValueError(str(error)) from error
    if len(meta["classes"]) != classes or meta["in_channels"] != model.in_channels:
        raise ValueError(f"{path}: its meta says {meta['in_channels']} channels in and {len(meta['classes'])} "
                         f"classes; the program takes {model.in_channels} and gives {classes}")
    config = {key: value for key, value in meta.items() if key not in ("train_args", "val_paths", "inputs", "output")}
    return model, {"config": config, "args": meta.get("train_args") or {}, "val_paths": meta.get("val_paths") or [],
                   "inference": meta.get("inference", "float32")}


def eval_source(args, state: dict, ignore_index: int):
    """(the data spec, its clouds) that ``pointsparse eval`` scores: ``--data``,
    else the files the run validated on, else the run's data. Files take
    ``--label-map``, else the run's validation label map (but its training
    one for files of its training clouds' format), else its label
    map (as ``train --val-data`` takes them: the classes the model predicts),
    else the default map the run read its clouds through, where their
    formats take it (``clouds.files_source``, prune's rule too)."""
    saved = state.get("args") or {}  # (None: no record, as the other readers of it take it)
    if args.data:
        spec, validation = args.data, True
    elif state.get("val_paths"):  # the files the run validated on
        spec, validation = state["val_paths"], True
    else:
        spec, validation = saved.get("data") or ["generated"], False
    count = getattr(args, "val_scenes", None)
    if is_generated(spec):
        # (with --data generated, train.check_args refused --label-map)
        refuse_file_flags(spec, {"--label-map": args.label_map is not None,
                                 "--skip-nonfinite": getattr(args, "skip_nonfinite", False)}, own_data=not args.data)
        return spec, generated_source(spec, saved, count or saved.get("val_scenes", 4), VALIDATION_SEED)
    if count is not None:
        raise ValueError(f"--val-scenes counts generated scenes; the data scored here are files ({spec[0]}...): "
                         "drop it, or score generated data")
    # (unlabelled clouds of another format than the run's: read through its map, refused by the scoring's
    # check as clouds without labels, not asked for the map of labels they lack)
    # (--data's labelled files whose format reads them through another map than the run's, taken by default:
    # refused, as predict refuses to write its raw ids for them)
    return spec, files_source(state, spec, args.label_map, "--data" if args.data else "the run's data", validation,
                              ignore_index, format_maps=bool(args.data))
