"""Segment point cloud files and write the class of every point.

``pointsparse predict (--checkpoint DIR/checkpoint.pt [--inference fused|bf16]
| --program model.pt2) --data FILE... --out DIR [--format npy|label|labels]``: each
cloud is voxelised at the model's voxel size, run, and its voxel predictions
sent back to its points. For each input file ``DIR/<its path below the inputs'
common folder, without its suffix>`` gets

- ``.npy`` (default): int32 ``(N,)``, the class index of each point in the
  file's point order (``DIR/classes.json`` names the classes), or
- ``.label`` (``--format label``): SemanticKITTI's uint32 labels, each class
  written as the raw id the label map's ``inverse`` gives it (SemanticKITTI's:
  the benchmark's ``learning_map_inv``), else the smallest raw id the map sends
  to it (the run's label map, ``--label-map``, or SemanticKITTI's for ``.bin``
  files; the run's is the one its config records, its format's default
  included), instance bits 0; a
  scan in a ``velodyne`` folder gets its file in a ``predictions`` folder beside
  that one (``sequences/08/predictions/000000.label``, as the benchmark takes), or
- ``.labels`` (``--format labels``): Semantic3D's text, one raw id a line (the
  label map's as for ``.label``: the run's, ``--label-map``, or Semantic3D's for
  a model of its classes), 0 for a point not predicted.

Where the map is taken by default (no ``--label-map``) and a cloud's format
reads its labels through another map of the model's classes that writes other
raw ids (a run on Open3D-ML learning ids predicting ``.bin`` scans), predict
refuses, naming both maps: give ``--label-map``.

One --out holds one format's predictions: an --out that holds the other
format's is refused (give a new one) before any cloud is run, and so is one
that another run (train, eval, predict) holds.

A cloud whose positions hold NaN or inf (an organised cloud's points without a
return) is refused, unless ``--skip-nonfinite``: its finite points are run and
the others written as -1 (``.npy``) or raw id 0, unlabeled (``.label``, ``.labels``), so
the output keeps one row per point of the file, in its order. LAS points flagged
withheld (the spec's "deleted") are left out so too, without the flag: the network
never sees them and their rows hold -1 or raw id 0.

The files' own labels, where they have any, play no part (they are not read)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import DirectoryLock, atomic_write
from . import counted
from .clouds import raw_ids  # (exported here as before; clouds.check_format_maps, eval and prune take it too)

__all__ = ["add_arguments", "main", "raw_ids"]

FORMATS = ("npy", "label", "labels")
#: Each format's file suffix.
SUFFIXES = {"npy": ".npy", "label": ".label", "labels": ".labels"}


def add_arguments(parser) -> None:
    from .evaluate import INFERENCE, add_maps_ahead_argument

    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint written by pointsparse train")
    which.add_argument("--program", metavar="FILE.pt2", help="instead, a program written by pointsparse export")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="point cloud files, folders or globs (.bin .npy .npz .las .laz .ply .pcd .txt)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the predictions in")
    parser.add_argument("--format", choices=FORMATS, default="npy",
                        help="npy: int32 class index per point (default); label: SemanticKITTI uint32 raw ids; "
                             "labels: Semantic3D text, one raw id a line")
    parser.add_argument("--label-map", default=None, metavar="NAME|JSON",
                        help="the raw ids --format label / labels writes (default: the run's label map, else "
                             "SemanticKITTI's for .bin files, Semantic3D's for a model of its classes)")
    parser.add_argument("--inference", choices=INFERENCE, default="float32",
                        help="with --checkpoint: run the model as trained (float32), fused, or fused in bf16")
    add_maps_ahead_argument(parser)
    parser.add_argument("--skip-nonfinite", action="store_true",
                        help="predict the points whose position is finite and write -1 (.npy) or raw id 0 "
                             "(.label / .labels, unlabeled) for those holding NaN or inf (organised clouds mark points "
                             "without a return so); default: such a cloud is refused")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _outputs(paths: list[Path], out: Path, suffix: str) -> list[Path]:
    """Each input's output path: its path below the inputs' common folder, the
    suffix replaced; a ``.label`` of a scan in a ``velodyne`` folder goes to a
    ``predictions`` folder beside it (SemanticKITTI's layout). The paths as
    given (made absolute), not their links' targets: a scan named through a
    symbolic link keeps the name given."""
    named, bases = [], []
    for p in paths:
        p = Path(os.path.abspath(p))
        if suffix == ".label" and p.parent.name == "velodyne":
            p = p.parent.parent / "predictions" / p.name
            bases.append(p.parent.parent)  # (the predictions folder is written, not the common root)
        else:
            bases.append(p.parent)
        named.append(p)
    root = Path(os.path.commonpath(bases))
    targets = [out / p.relative_to(root).with_suffix(suffix) for p in named]
    seen: dict[Path, Path] = {}
    for path, target in zip(paths, targets):
        if target in seen:
            raise ValueError(f"{seen[target]} and {path} would both be written to {target}")
        seen[target] = path
    read = _files_read(paths)
    for target in targets:
        held = read.get(target.resolve())
        if held is not None:
            raise ValueError(f"--out {out}: the prediction {target} would overwrite {held}; give another folder")
        if target.is_dir():
            raise ValueError(f"--out {out}: the prediction {target} is a folder there; give another folder")
        for folder in target.parents:
            if folder == out:
                break
            if folder.exists() and not folder.is_dir():
                raise ValueError(f"--out {out}: the prediction {target} goes into {folder}, which is a file; give "
                                 "another folder")
    return targets


def _other_format(paths: list[Path], out: Path, fmt: str) -> None:
    """``ValueError`` where ``out`` already holds predictions of another
    format (``.npy``, ``.label`` or ``.labels`` files of a format other than
    ``fmt``; the clouds and labels files predict reads, and SemanticKITTI's
    ``labels`` folders, are no predictions): the new files would lie beside
    them under a ``classes.json`` that names one format only. Nothing read,
    nothing run."""
    others = {SUFFIXES[f]: f for f in FORMATS if f != fmt}
    if not out.is_dir():
        return
    read = _files_read(paths)
    held = sorted(p for p in out.rglob("*") if p.suffix.lower() in others and p.is_file()
                  and p.resolve() not in read and not (p.suffix.lower() == ".label" and p.parent.name == "labels"))
    if held:
        other = others[held[0].suffix.lower()]
        named = ", ".join(map(str, held[:3])) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise ValueError(f"--out {out} holds predictions of --format {other} ({named}); --format {fmt} would "
                         f"write beside them: give a new --out (or remove them)")


def _files_read(paths: list[Path]) -> dict[Path, str]:
    """Every file the readers take for ``paths`` (resolved): the clouds and
    the labels files they read beside them (which predict leaves unread, and
    never writes over), each with what it is."""
    from ..data.readers import _sibling_labels

    read = {}
    for path in paths:
        p = path.resolve()
        read[p] = f"the input cloud {path}"
        for labels in (_sibling_labels(p), p.parent.parent / "labels" / (p.stem + ".label"),
                       p.with_suffix(".labels")):  # (Semantic3D's, beside its .txt)
            if labels is not None:
                read.setdefault(labels.resolve(), f"the labels of {path}")
    return read


def main(args) -> int:
    from ..data.datasets import is_generated
    from ..data.readers import find_clouds, load_label_map
    from .clouds import check_format_maps, check_run_map_file
    from .evaluate import checkpoint_model, inference_model, program_and_state, with_maps_ahead
    from .train import check_threads, load_checkpoint

    check_threads(args.threads)
    if is_generated(args.data) and not Path(args.data[0]).exists():
        raise ValueError(f"--data {args.data[0]}: predict writes the classes of point cloud files, and generated "
                         "scenes are none (eval --val-scenes N scores generated ones)")
    if args.program is not None:
        model, state = program_and_state(args.program, args)
    else:
        state = load_checkpoint(args.checkpoint)
        model = with_maps_ahead(inference_model(checkpoint_model(state, args.checkpoint), args.inference).eval(),
                                args)
    config = state["config"]
    classes = list(config["classes"])
    paths = find_clouds(args.data)  # (ValueError naming a spec that holds no cloud)
    label_map = ids = None
    if args.label_map is not None and args.format == "npy":
        raise ValueError("--label-map names the raw ids --format label / labels writes; --format npy writes class "
                         "indices")
    semantic3d = load_label_map("semantic3d")
    if args.format != "npy":
        # (the run's: its --label-map, else the map its config records it read its clouds through, a format's
        # default included: a run on .bin scans asked for one to write the .label of other formats' clouds)
        name = args.label_map or (state.get("args") or {}).get("label_map") or config.get("label_map")
        origin = "--label-map" if args.label_map else "the run's label map"
        if name is None and args.format == "label" and any(p.suffix.lower() == ".bin" for p in paths):
            name, origin = "semantic-kitti", "SemanticKITTI's, the default for .bin files"
        if name is None and classes == semantic3d.classes:
            name = "semantic3d"
        if name is None:
            # (a run on generated scenes read no map, and none in datasets/ holds their classes: said so, where
            # "give --label-map" sent the user looking for one)
            raise ValueError(f"--format {args.format} needs the label map whose raw ids to write: give --label-map "
                             "(a map file of the model's classes: the run read its clouds through none, and a "
                             "model of generated scenes has no raw ids; --format npy writes class indices)")
        if not args.label_map:
            check_run_map_file(state, name, f"--format {args.format}")
        label_map = load_label_map(name)
        try:
            ids = raw_ids(label_map, classes)
        except ValueError as error:  # (a map the user never named, where one was taken by default: say which)
            if args.label_map:
                raise
            raise ValueError(f"--format {args.format}: {error} (the label map is {origin}): give --label-map of "
                             "the model's classes") from error
    # A model of Semantic3D's classes (or --label-map semantic3d) reads .txt clouds as Semantic3D scans: the
    # benchmark's test scans have no .labels beside them, and were read as S3DIS rows.
    text_map = "semantic3d" if classes == semantic3d.classes or label_map == semantic3d else None
    if ids is not None and not args.label_map:
        check_format_maps(paths, classes, label_map, f"{origin}, {name!r},", f"--format {args.format}", "writes",
                          "the raw ids to write", text_map)
    targets = _outputs(paths, Path(args.out), SUFFIXES[args.format])
    _other_format(paths, Path(args.out), args.format)
    with DirectoryLock(args.out, "--out"):  # (as train holds its --out: another run's folder is refused)
        return _predict_all(args, model, config, paths, targets, label_map, ids, text_map)


def _predict_all(args, model, config: dict, paths: list[Path], targets: list[Path], label_map, ids,
                 text_map=None) -> int:
    """``pointsparse predict``'s work once its flags and outputs are checked (``--out`` held): each
    cloud of ``paths`` predicted into its ``targets`` file (``ids``: the raw id of each class for
    ``--format label`` / ``labels``), then ``classes.json``. ``text_map``: the label map ``.txt`` clouds are read
    with, for their layout only (``"semantic3d"``: Semantic3D scans)."""
    from ..data import DEFAULT_IGNORE, Batch
    from ..data.readers import read_cloud
    from ..data.transforms import voxelize_sample
    from .clouds import TrainedFeatures, nonfinite_hold, skips_nonfinite, warn_coarse_positions
    from .scoring import loaded_frozen, predict
    from .trainer import have_tqdm, progress_bar

    classes = list(config["classes"])
    # classes.json is written last, once every cloud is: an earlier run's must not make a run that fails
    # half-way look complete.
    (Path(args.out) / "classes.json").unlink(missing_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    ignore = config.get("ignore_index", DEFAULT_IGNORE)
    points = voxels = 0
    features = TrainedFeatures(config)
    t0 = time.perf_counter()
    with loaded_frozen():
        for path, target in progress_bar(list(zip(paths, targets)), "predict",
                                         not args.no_progress and have_tqdm()):
            with nonfinite_hold(skips_nonfinite(args.skip_nonfinite), "predict the other points and write -1 "
                                "(.npy) or raw id 0 (.label, .labels) for these"):
                sample = read_cloud(path, text_map if path.suffix.lower() == ".txt" else None,
                                    labels=False)  # (the file's own labels, where it has any, go unread)
            features.check(sample)
            sample = features.fitted(sample)  # (features the training clouds lacked: 0, as the model saw them)
            warn_coarse_positions(sample, config["voxel_size"])
            v = voxelize_sample(sample, config["voxel_size"], ignore)  # (coordinates it cannot hold: named)
            if v.feats.shape[1] != config["in_channels"]:
                raise ValueError(f"{path}: its points give {v.feats.shape[1]} features; the model takes "
                                 f"{config['in_channels']}")
            _, pred = predict(model, Batch.of([v]))
            pred = pred.cpu().numpy()
            target.parent.mkdir(parents=True, exist_ok=True)
            if args.format == "npy":
                written = pred.astype(np.int32)
            else:
                written = ids[pred].astype("<u4")
            if sample.kept is not None:  # (--skip-nonfinite, LAS withheld points: a row for every point of the file)
                full = np.full(len(sample.kept), -1 if args.format == "npy" else 0, written.dtype)
                full[sample.kept] = written
                written = full
            data = _npy_bytes(written) if args.format == "npy" else written.tobytes() if args.format == "label" \
                else _text_lines(written)
            atomic_write(target, lambda f, data=data: f.write(data))
            points, voxels = points + len(pred), voxels + len(v.input)
    elapsed = time.perf_counter() - t0
    features.note(len(paths))
    text = json.dumps({"classes": classes, "format": args.format, "files": len(paths),
                       **({"label_map": label_map.name} if label_map is not None else {})}, indent=1) + "\n"
    atomic_write(Path(args.out) / "classes.json", lambda f: f.write(text.encode()))
    print(f"{counted(len(paths), 'cloud')} ({counted(points, 'point')}, {counted(voxels, 'voxel')}) in {elapsed:.1f} s "
          f"({elapsed / len(paths):.2f} s per cloud): {args.out}")
    return 0


def _text_lines(ids: np.ndarray) -> bytes:
    """One integer a line (Semantic3D's ``.labels``)."""
    return ("\n".join(ids.astype(str).tolist()) + "\n").encode() if len(ids) else b""


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
