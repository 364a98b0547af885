"""The training and evaluation CLI: a tiny smoke run, exact resume, atomic
checkpoints, fine-tuning initialisation, metrics against hand-computed
numbers, learning-rate schedules."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time

import numpy as np
import pytest
import torch

from pointsparse.app import cli, evaluate, metrics
from pointsparse.app import train as tr
from pointsparse.models import MinkUNet
from reference import holed_cloud, scan_and_learning_ids

TINY = ["--data", "generated", "--scenes", "2", "--val-scenes", "1", "--beams", "16", "--azimuth-steps", "192",
        "--max-range", "16", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "2",
        "--no-progress", "--seed", "3"]

pytestmark = pytest.mark.usefixtures("one_thread")




def _without(argv, flag):
    """``argv`` without ``flag`` and its value."""
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def _parse(argv):
    parser = cli.CommandParser()  # (as the command line parses: the flags typed are recorded)
    tr.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_smoke_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert 0 <= report["miou"] <= 1 and set(report["per_class"]) == set(report["classes"])
    assert report["classes"][0] == "road" and report["steps"] == 1 and report["epochs"] == 1
    assert report["validation"] == "held-out generated scenes" and report["val_data"].startswith("generated scenes")
    for name in ("curves.png", "confusion.png", "topdown.png", "checkpoint.pt", "best.pt"):
        assert (out / name).stat().st_size > 0, name
    assert "mIoU" in capsys.readouterr().out
    # eval on the run's own validation scenes reproduces the run's score.
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(out), "--no-progress"]) == 0
    again = json.loads((out / "eval-metrics.json").read_text())
    assert again["confusion"] == report["confusion"]
    assert (out / "eval-topdown.png").stat().st_size > 0
    # --val-scenes N scores N held-out scenes from the same seed: the run's one, then two more.
    more = tmp_path / "more"
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(more), "--no-progress",
                     "--val-scenes", "3"]) == 0
    wider = np.array(json.loads((more / "eval-metrics.json").read_text())["confusion"])
    first = np.array(report["confusion"])
    assert wider.sum() > 2 * first.sum() and (wider >= first).all()
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--no-progress", "--val-scenes", "0"]) == 2


def _tiles(folder, intensity: bool = True):
    """``folder``/tile0-2.npz: three 400-point LAS-coded tiles (class 2 below z = 2, 6 above; with random
    intensities), drawn from seed 0 (the same files for every test that writes them)."""
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for i in range(3):
        xyz = rng.uniform(0, 8, (400, 3)).astype(np.float32)
        cls = np.where(xyz[:, 2] < 2, 2, 6).astype(np.uint8)
        extra = {"intensity": rng.integers(0, 900, 400)} if intensity else {}
        np.savez(folder / f"tile{i}.npz", xyz=xyz, classification=cls, **extra)
    return folder


def test_a_run_on_relative_paths_is_evaluated_from_another_folder(tmp_path, monkeypatch, capsys):
    """The run's held-out files and --data were saved as given: relative
    paths, which eval (and prune) of the checkpoint read from the folder
    they ran in ("no such file" anywhere else)."""
    data = _tiles(tmp_path / "data", intensity=False)
    monkeypatch.chdir(tmp_path)
    report = tr.train(_parse(["--data", "data/tile*.npz", "--label-map", "ign-lidarhd", "--epochs", "1", "--cr",
                              "0.125", "--blocks", "1", "--voxel-size", "0.5", "--no-progress", "--out", "run"]))
    saved = tr.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["val_paths"] == [str(data / "tile2.npz")] and saved["args"]["data"] == [str(data / "tile*.npz")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", "ev",
                     "--no-progress"]) == 0
    assert json.loads((elsewhere / "ev" / "eval-metrics.json").read_text())["confusion"] == report["confusion"]
    capsys.readouterr()


def test_metrics_json_names_its_files_by_absolute_paths(tmp_path, monkeypatch, capsys):
    """A run's metrics.json (and eval's eval-metrics.json) name the
    checkpoint, the pictures and the data files by absolute paths, as the
    checkpoint keeps its data paths: they were stored as typed, relative to
    the folder the command ran in, and found nothing from anywhere else."""
    _tiles(tmp_path / "data", intensity=False)
    monkeypatch.chdir(tmp_path)
    tr.train(_parse(["--data", "data/tile*.npz", "--label-map", "ign-lidarhd", "--epochs", "1", "--cr", "0.125",
                     "--blocks", "1", "--voxel-size", "0.5", "--no-progress", "--out", "run"]))
    assert cli.main(["eval", "--checkpoint", "run/checkpoint.pt", "--out", "ev", "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["checkpoint"] == str(tmp_path / "run" / "checkpoint.pt")
    assert report["data"] == [str(tmp_path / "data" / "tile*.npz")]
    assert report["pictures"] and all(p == str(tmp_path / "run" / f"{name}.png")
                                      for name, p in report["pictures"].items())
    scored = json.loads((tmp_path / "ev" / "eval-metrics.json").read_text())
    assert scored["checkpoint"] == str(tmp_path / "run" / "checkpoint.pt")
    assert scored["pictures"] and all(p == str(tmp_path / "ev" / f"eval-{name}.png")
                                      for name, p in scored["pictures"].items())
    capsys.readouterr()


def test_eval_report_records_the_epoch_of_the_checkpoint_it_scored(tmp_path, monkeypatch, capsys):
    """eval-metrics.json named the checkpoint it scored but not which of
    its run's epochs that file held (checkpoint.pt and best.pt of one run,
    or one file written over by a resumed run, read alike). It records the
    checkpoint's ``epoch`` now (the epochs its run had trained, as the
    run's metrics.json's ``epochs``); None for a checkpoint without that
    record."""
    run = tmp_path / "run"
    scores = iter([0.5])  # (epoch 1 the best, epoch 2 worse: best.pt holds epoch 1, checkpoint.pt epoch 2)
    monkeypatch.setattr(tr.metrics, "mean_iou", lambda cm: next(scores, 0.1))
    tr.main(_parse([*TINY, "--epochs", "2", "--out", str(run)]))
    monkeypatch.undo()

    def scored(name):
        out = tmp_path / f"ev-{name}"
        assert cli.main(["eval", "--checkpoint", str(run / name), "--out", str(out), "--no-progress"]) == 0
        return json.loads((out / "eval-metrics.json").read_text())

    assert tr.load_checkpoint(run / "best.pt")["epoch"] == 1 and tr.load_checkpoint(run / "checkpoint.pt")["epoch"] == 2
    assert scored("best.pt")["epoch"] == 1
    report = scored("checkpoint.pt")
    assert report["epoch"] == 2 and report["checkpoint"] == str(run / "checkpoint.pt")
    state = tr.load_checkpoint(run / "checkpoint.pt")
    del state["epoch"]
    tr.save_checkpoint(run / "bare.pt", state)
    report = scored("bare.pt")
    assert "epoch" in report and report["epoch"] is None
    capsys.readouterr()


def test_validation_labels_are_checked_before_training(tmp_path, monkeypatch):
    """Validation clouds whose labels no class holds (a raw label past the
    training clouds' classes) failed at the first validation, after an
    epoch, naming no cloud; clouds whose every label is ignored gave a
    validation mIoU of NaN. Both are refused before any training, naming
    the cloud or the clouds."""
    def no_work(*args, **kwargs):
        raise AssertionError("training started before the validation labels were checked")

    monkeypatch.setattr(tr.Trainer, "fit", no_work)
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (300, 3)).astype(np.float32)
    np.savez(tmp_path / "train.npz", xyz=xyz, labels=rng.integers(0, 3, 300))
    np.savez(tmp_path / "past.npz", xyz=xyz, labels=np.full(300, 7))
    np.savez(tmp_path / "ignored.npz", xyz=xyz, labels=np.full(300, 255))
    common = ["--data", str(tmp_path / "train.npz"), "--epochs", "1", "--cr", "0.125", "--blocks", "1",
              "--voxel-size", "0.5", "--no-progress"]
    with pytest.raises(ValueError, match=r"past\.npz: label 7 is neither a class index \(0 to 2\)"):
        tr.train(_parse([*common, "--val-data", str(tmp_path / "past.npz"), "--out", str(tmp_path / "a")]))
    with pytest.raises(ValueError, match="the validation clouds: every point's label is the ignore index 255"):
        tr.train(_parse([*common, "--val-data", str(tmp_path / "ignored.npz"), "--out", str(tmp_path / "b")]))


def test_train_skip_nonfinite_trains_on_the_finite_points_of_organised_clouds(tmp_path, capsys):
    """eval and predict took organised clouds (points without a return are NaN) with --skip-nonfinite;
    train had no such flag: such a cloud was refused ("xyz holds NaN or inf at ...") with no word on what
    to do. train --skip-nonfinite trains on the finite points (the same run as on the cloud less the
    others), a resumed run and eval of the run's validation clouds read them so too; without it the
    refusal names the flag, and with the generated scenes alone (no NaN to skip) the flag is refused."""
    xyz, labels, bad, holed = holed_cloud()
    (tmp_path / "holed").mkdir()
    (tmp_path / "finite").mkdir()
    for folder, points, keep in (("holed", holed, slice(None)), ("finite", xyz[~bad], ~bad)):
        np.savez(tmp_path / folder / "a.npz", xyz=points, labels=labels[keep])
        np.savez(tmp_path / folder / "b.npz", xyz=points[::-1].copy(), labels=labels[keep][::-1].copy())
    common = ["--epochs", "1", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "1",
              "--val-fraction", "0.5", "--no-progress", "--seed", "1"]
    assert cli.main(["train", "--data", str(tmp_path / "holed"), *common, "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "a.npz: xyz holds NaN or inf at 80 of 400 points" in err and "--skip-nonfinite" in err, err
    weights = []
    for folder, more in (("holed", ["--skip-nonfinite"]), ("finite", [])):
        out = tmp_path / f"run-{folder}"
        assert cli.main(["train", "--data", str(tmp_path / folder), *common, "--out", str(out), *more]) == 0, \
            capsys.readouterr().err
        weights.append(tr.load_checkpoint(out / tr.CHECKPOINT)["model"])
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    run = tmp_path / "run-holed"
    resumed = _parse(["--resume", "--out", str(run), "--no-progress"])
    tr.take_run_flags(resumed)
    assert resumed.skip_nonfinite is True
    assert cli.main(["eval", "--checkpoint", str(run / tr.CHECKPOINT), "--no-progress"]) == 0, \
        capsys.readouterr().err
    from pointsparse.app.tasks import checkpoint_batches  # (prune's clouds of the run: read so as well)

    assert len(checkpoint_batches(tr.load_checkpoint(run / tr.CHECKPOINT))[0].labels) > 0
    capsys.readouterr()
    assert cli.main(["train", *TINY, "--epochs", "1", "--skip-nonfinite", "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err
    assert "--skip-nonfinite" in err and "generated scenes" in err and "drop it" in err, err


def test_train_on_clouds_that_hold_no_points_says_so(tmp_path, capsys):
    """train --skip-nonfinite on a cloud whose every position is NaN (an organised cloud's frame without a
    return), or on empty clouds, trained an untrained model's epochs on nothing, without a word (eval refuses
    such clouds: "the clouds hold no points"); a cloud --skip-nonfinite left empty among others passed
    silently. Training clouds that hold no point at all are now refused before any training, naming
    --skip-nonfinite and LAS's withheld flag where points were left out, and a cloud left empty among others
    gets a note (a LAS file whose every point is flagged withheld, which the reader leaves out, is refused
    as such)."""
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (400, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 400)
    np.savez(tmp_path / "val.npz", xyz=xyz, labels=labels)
    np.savez(tmp_path / "nan.npz", xyz=np.full((400, 3), np.nan, np.float32), labels=labels)
    np.savez(tmp_path / "empty.npz", xyz=np.zeros((0, 3), np.float32), labels=np.zeros(0, np.int64))
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"classes": list("abc"), "map": {"0": 0, "1": 1, "2": 2}}))
    common = ["--val-data", str(tmp_path / "val.npz"), "--label-map", str(label_map), "--epochs", "1", "--cr",
              "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "1", "--no-progress"]
    laspy = pytest.importorskip("laspy")
    las = laspy.LasData(laspy.LasHeader(point_format=6, version="1.4"))
    las.x, las.y, las.z = (xyz[:, a].astype(np.float64) for a in range(3))
    las.classification = labels.astype(np.uint8)
    las.withheld = np.ones(400, np.uint8)  # (every point flagged withheld: all left out)
    las.write(tmp_path / "withheld.las")
    left_out = ("--data: the training clouds hold no points: every one was left out (--skip-nonfinite: positions "
                "NaN or inf; LAS files: points flagged withheld)")
    for data, more, words in ((["nan.npz"], ["--skip-nonfinite"], left_out), (["withheld.las"], [], left_out),
                              (["empty.npz"], [], "--data: the training clouds hold no points: nothing to train on"),
                              (["empty.npz", "nan.npz"], ["--skip-nonfinite"], "the training clouds hold no points")):
        out = tmp_path / f"no-{len(data)}-{len(more)}"
        assert cli.main(["train", "--data", *[str(tmp_path / d) for d in data], *common, *more, "--out",
                         str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err, err
        assert not (out / tr.CHECKPOINT).exists()
    out = tmp_path / "mixed"
    assert cli.main(["train", "--data", str(tmp_path / "val.npz"), str(tmp_path / "nan.npz"), *common,
                     "--skip-nonfinite", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "note: every point was left out of 1 of the 2 --data clouds" in err and "nan.npz" in err, err


def test_validation_labels_are_checked_in_a_distributed_run(tmp_path, monkeypatch):
    """Under --nproc 2 (or torchrun) the checks above were skipped: a label
    past the classes failed the first validation after an epoch of training
    (torch's spawn traceback, 'target labels must lie in [0, 3)', naming no
    cloud), and clouds whose every label is ignored wrote a validation mIoU
    of NaN. Each process checks the labels of its shard, naming the cloud,
    and the processes together whether any point is scored (simulated here:
    rank 0 of 2, a gather that finds its own outcome in both places)."""
    from pointsparse.app.distributed import Dist
    from pointsparse.data import open_source

    reduced = []
    def gather(out, obj, *args, **kwargs):
        out[:] = [obj, obj]
        reduced.append(obj)

    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (300, 3)).astype(np.float32)
    np.savez(tmp_path / "good.npz", xyz=xyz, labels=rng.integers(0, 3, 300))
    np.savez(tmp_path / "past.npz", xyz=xyz, labels=np.full(300, 7))
    np.savez(tmp_path / "ignored.npz", xyz=xyz, labels=np.full(300, 255))
    rank0 = Dist(0, 2)

    def check(*names):
        tr._check_scored(open_source([str(tmp_path / n) for n in names], None, 255), 3, 255, rank0)

    with pytest.raises(ValueError, match=r"past\.npz: label 7 is neither a class index \(0 to 2\)"):
        check("past.npz", "good.npz")
    check("good.npz", "past.npz")  # (cloud 1 is rank 1's: it refuses it)
    assert reduced[-1] == (None, True)
    with pytest.raises(ValueError, match="the validation clouds: every point's label is the ignore index 255"):
        check("ignored.npz", "ignored.npz")


def test_val_data_that_is_also_trained_on_is_noted(tmp_path, capsys):
    """``--data tiles/ --val-data tiles/c.npz`` trained on the validation cloud too and reported its mIoU as a
    held-out score without a word (a folder and a file in it, or one file named twice by two paths); the run now
    notes which validation clouds it also trains on, as it notes validating on the one training cloud. Separate
    clouds: no note."""
    rng = np.random.default_rng(0)
    (tmp_path / "tiles").mkdir()
    for name in "abc":
        np.savez(tmp_path / "tiles" / f"{name}.npz", xyz=rng.uniform(0, 8, (300, 3)).astype(np.float32),
                 labels=rng.integers(0, 3, 300))
    (tmp_path / "link.npz").symlink_to(tmp_path / "tiles" / "c.npz")
    for val in ([str(tmp_path / "tiles" / "c.npz")], [str(tmp_path / "link.npz")]):
        tr.open_training_data(_parse(["--data", str(tmp_path / "tiles"), "--val-data", *val, "--out", "x"]))
        err = capsys.readouterr().err
        assert "note: 1 of the 1 --val-data clouds are training clouds too" in err and val[0] in err, err
    tr.open_training_data(_parse(["--data", str(tmp_path / "tiles" / "a.npz"), "--val-data",
                                  str(tmp_path / "tiles" / "c.npz"), "--out", "x"]))
    assert "training clouds too" not in capsys.readouterr().err


def test_validating_on_the_training_clouds_is_noted_as_it_is(tmp_path, capsys):
    """Two --data files and the default --val-fraction 0.2 hold out none (0.4 of a cloud): the run validated on
    its training clouds with the note "one training cloud and no --val-data", beside its own log of 2 training
    clouds. The note now says why no cloud was held out, and what holds one out."""
    rng = np.random.default_rng(0)
    for name in "ab":
        np.savez(tmp_path / f"{name}.npz", xyz=rng.uniform(0, 8, (300, 3)).astype(np.float32),
                 labels=rng.integers(0, 3, 300))
    args = _parse(["--data", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", "x"])
    train, val, _ = tr.open_training_data(args)
    err = capsys.readouterr().err
    assert val is train and "one training cloud" not in err
    # (and its report says so: metrics.json's val_data said "held out" of every run without --val-data)
    assert tr.validation_record(args, train, val, None) == {"validation": "the training clouds (not held out)",
                                                           "val_data": "the --data clouds"}
    assert ("note: --val-fraction 0.2 of the 2 --data clouds holds out none (it rounds to 0) and no --val-data: "
            "validating on the training clouds (the validation mIoU is not held out)") in err, err
    tr.open_training_data(_parse(["--data", str(tmp_path / "a.npz"), "--out", "x"]))
    assert "note: one --data cloud and no --val-data: validating on the training cloud" in capsys.readouterr().err
    args = _parse(["--data", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--val-fraction", "0.5", "--out", "x"])
    train, val, _ = tr.open_training_data(args)
    assert len(train) == len(val) == 1 and "validating on the training" not in capsys.readouterr().err
    assert tr.validation_record(args, train, val, None) == {"validation": "held out of --data (--val-fraction)",
                                                           "val_data": [str(tmp_path / "b.npz")]}
    args = _parse(["--data", "generated", "--val-scenes", "3", "--out", "x"])
    assert tr.validation_record(args, None, None, None) == {
        "validation": "held-out generated scenes",
        "val_data": f"generated scenes of seeds {tr.VALIDATION_SEED}..{tr.VALIDATION_SEED + 2}"}
    args = _parse(["--data", str(tmp_path / "a.npz"), "--val-data", str(tmp_path / "b.npz"), "--out", "x"])
    assert tr.validation_record(args, None, None, ["B"]) == {"validation": "--val-data", "val_data": ["B"]}


@pytest.mark.parametrize("files, fraction", [(2, "0.75"), (3, "0.9")])
def test_a_val_fraction_that_holds_out_every_cloud_names_the_flag(tmp_path, capsys, files, fraction):
    """--val-fraction 0.75 of 2 --data files rounds to 2 held out: none was left to train on, and the run
    stopped with "no point clouds found in []", naming neither the flag nor the files. A one-line error
    naming --val-fraction and the count, exit status 2, nothing written."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(files):
        paths.append(str(tmp_path / f"{i}.npz"))
        np.savez(paths[-1], xyz=rng.uniform(0, 8, (300, 3)).astype(np.float32), labels=rng.integers(0, 3, 300))
    out = tmp_path / "run"
    assert cli.main(["train", "--data", *paths, "--val-fraction", fraction, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"error: --val-fraction {fraction} of the {files} --data clouds holds out all of them" in err, err
    assert not out.exists()


def test_val_data_of_a_format_whose_default_label_map_differs_is_refused(tmp_path):
    """``train --data <SemanticKITTI .bin> --val-data <Open3D-ML .npy of learning ids>`` read the validation
    labels through the training clouds' default map, SemanticKITTI's raw ids (learning id 9, road, read as
    ignored; 11, sidewalk, as the raw bicycle), and trained on with a validation mIoU of the wrong classes, no
    word said. Without --label-map / --val-label-map, validation clouds whose formats take another default
    map than the training clouds' are refused, naming both maps; with either flag they read as before."""
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (300, 3)).astype(np.float32)
    (tmp_path / "seq" / "velodyne").mkdir(parents=True)
    (tmp_path / "seq" / "labels").mkdir()
    np.c_[xyz, np.zeros(300)].astype(np.float32).tofile(tmp_path / "seq" / "velodyne" / "000000.bin")
    rng.choice([10, 40, 50], 300).astype(np.uint32).tofile(tmp_path / "seq" / "labels" / "000000.label")
    np.savez(tmp_path / "val.npz", xyz=xyz, labels=rng.choice([1, 9, 11], 300))
    files = ["--data", str(tmp_path / "seq"), "--val-data", str(tmp_path / "val.npz"), "--out", "x"]
    with pytest.raises(ValueError, match=r"--val-data: its clouds take no label map \(raw labels\) by default "
                                         r"\(.*val\.npz\), the --data clouds label map 'SemanticKITTI.*"
                                         r"--val-label-map"):
        tr.open_training_data(_parse(files))
    _, val, _ = tr.open_training_data(_parse([*files, "--val-label-map", "semantic-kitti-learning"]))
    assert sorted(np.unique(val[0].labels).tolist()) == [0, 8, 10]  # (learning ids less one: car, road, sidewalk)
    _, val, _ = tr.open_training_data(_parse([*files, "--label-map", "semantic-kitti"]))  # (as named: both)
    assert val.label_map.name == tr.open_training_data(_parse(files[:2] + ["--out", "x"]))[0].label_map.name


def test_a_run_on_a_formats_default_map_records_it_and_other_formats_are_read_through_it_or_refused(tmp_path,
                                                                                                   capsys):
    """``train --data <SemanticKITTI .bin>`` without --label-map read its clouds through SemanticKITTI's map
    (the .bin default) but recorded no map: ``eval --data <Open3D-ML learning ids>`` of the checkpoint read
    the learning ids as class indices (road, 9, scored as the run's parking, 9; every class one off) without
    a word, and prune's clouds (``--data``) the same. The config now records the map the run read its clouds
    through (``label_map``: the default's name, None for raw labels); files whose formats take another map
    by default are refused without --label-map, naming both; with it they read as given; the run's own
    format reads as before, and a checkpoint that records no map (older runs) as before."""
    from pointsparse import checkpoint
    from pointsparse.app.tasks import checkpoint_batches

    seq, learning = scan_and_learning_ids(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(seq), "--epochs", "1", "--cr", "0.125", "--blocks", "1", "--voxel-size",
                     "0.5", "--batch-size", "1", "--no-progress", "--out", str(run)]) == 0, capsys.readouterr().err
    ckpt = run / tr.CHECKPOINT
    state = tr.load_checkpoint(ckpt)
    assert state["config"]["label_map"] == "semantic-kitti" and state["args"]["label_map"] is None

    def confusion(*flags):
        out = tmp_path / f"ev{len(list(tmp_path.glob('ev*')))}"
        code = cli.main(["eval", "--checkpoint", str(ckpt), *flags, "--out", str(out), "--no-progress"])
        return json.loads((out / "eval-metrics.json").read_text())["confusion"] if code == 0 else code

    scored = confusion("--data", str(seq))
    assert confusion() == scored  # (the run's own clouds, through its map)
    capsys.readouterr()
    assert confusion("--data", str(learning)) == 2
    err = capsys.readouterr().err
    assert (f"--data: its clouds take no label map (raw labels) by default ({learning}); the run read its clouds "
            "through the label map 'semantic-kitti'") in err and "give --label-map" in err, err
    assert confusion("--data", str(learning), "--label-map", "semantic-kitti-learning") == scored
    with pytest.raises(ValueError, match=r"--data: its clouds take no label map \(raw labels\) by default"):
        checkpoint_batches(state, [str(learning)])
    assert torch.equal(checkpoint_batches(state, [str(learning)], "semantic-kitti-learning")[0].labels,
                       checkpoint_batches(state, [str(seq)])[0].labels)
    # A checkpoint that records no map: as before (the files' own default; here, the learning ids as indices).
    del state["config"]["label_map"]
    checkpoint.save(tmp_path / "old.pt", state)
    ckpt = tmp_path / "old.pt"
    assert confusion("--data", str(seq)) == scored
    assert confusion("--data", str(learning)) not in (2, scored)
    assert len(checkpoint_batches(state, [str(learning)])[0].labels) > 0
    # Resumed, such a run records the map its resumed epochs read its clouds through.
    assert cli.main(["train", "--resume", str(ckpt), "--epochs", "2", "--no-progress", "--out",
                     str(tmp_path / "resumed")]) == 0, capsys.readouterr().err
    assert tr.load_checkpoint(tmp_path / "resumed" / tr.CHECKPOINT)["config"]["label_map"] == "semantic-kitti"
    state["config"]["label_map"] = 5  # (hand-edited: refused on loading, naming it)
    checkpoint.save(tmp_path / "bad.pt", state)
    with pytest.raises(ValueError, match=r"bad\.pt: its config's label_map must be a label map's name or file"):
        tr.load_checkpoint(tmp_path / "bad.pt")


def test_eval_of_the_training_format_reads_it_through_the_runs_map_not_the_validation_ones(tmp_path, capsys):
    """A run on SemanticKITTI .bin scans validated on Open3D-ML learning ids (``--val-label-map
    semantic-kitti-learning``): ``eval --data <.bin scans>`` read the raw SemanticKITTI ids through the
    validation map (nearly every point ignored, a warning, exit 0 and wrong metrics). Files of the training
    clouds' format, whose default map is the run's and not the validation clouds', read through the run's map
    now (as --label-map semantic-kitti reads them); the validation clouds (the default, or --data) through
    --val-label-map as before."""
    seq, learning = scan_and_learning_ids(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(seq), "--val-data", str(learning), "--val-label-map",
                     "semantic-kitti-learning", "--epochs", "1", "--cr", "0.125", "--blocks", "1", "--voxel-size",
                     "0.5", "--batch-size", "1", "--no-progress", "--out", str(run)]) == 0, capsys.readouterr().err
    ckpt = run / tr.CHECKPOINT

    def metrics(*flags):
        out = tmp_path / f"ev{len(list(tmp_path.glob('ev*')))}"
        assert cli.main(["eval", "--checkpoint", str(ckpt), *flags, "--out", str(out), "--no-progress"]) == 0
        return json.loads((out / "eval-metrics.json").read_text())["confusion"]

    capsys.readouterr()
    scored = metrics("--data", str(seq))
    assert "ignored" not in capsys.readouterr().err
    assert sum(map(sum, scored)) == 400
    assert scored == metrics("--data", str(seq), "--label-map", "semantic-kitti") == metrics() \
        == metrics("--data", str(learning))



def test_val_data_of_other_classes_than_the_generated_scenes_is_refused(tmp_path):
    """``train --data generated --val-data <SemanticKITTI .bin>`` read the validation labels through
    SemanticKITTI's map (car 0 ... road 8) and scored them as the generated classes of those indices (car as
    road, road as person), with a validation mIoU and no word; --val-data files beside --data files were
    refused for other classes, and eval of such files refuses them. Now refused here too, naming both class
    lists; a map to the generated classes, and raw labels (their indices), read as before."""
    import json as json_

    from pointsparse.data.generated import OUTDOOR_CLASSES

    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (300, 3)).astype(np.float32)
    (tmp_path / "seq" / "velodyne").mkdir(parents=True)
    (tmp_path / "seq" / "labels").mkdir()
    np.c_[xyz, np.zeros(300)].astype(np.float32).tofile(tmp_path / "seq" / "velodyne" / "000000.bin")
    rng.choice([10, 40], 300).astype(np.uint32).tofile(tmp_path / "seq" / "labels" / "000000.label")
    np.savez(tmp_path / "raw.npz", xyz=xyz, labels=rng.integers(0, 9, 300))
    mine = tmp_path / "mine.json"
    mine.write_text(json_.dumps({"classes": list(OUTDOOR_CLASSES), "map": {"40": 0, "10": 7}}))
    gen = [*TINY[:2], "--scenes", "1", "--out", "x"]
    with pytest.raises(ValueError, match=r"validation classes \['car', 'bicycle'.* differ from the training classes "
                                         r"\['road', 'sidewalk'"):
        tr.open_training_data(_parse([*gen, "--val-data", str(tmp_path / "seq")]))
    _, val, _ = tr.open_training_data(_parse([*gen, "--val-data", str(tmp_path / "seq"), "--val-label-map",
                                              str(mine)]))
    assert sorted(np.unique(val[0].labels).tolist()) == [0, 7]
    assert len(tr.open_training_data(_parse([*gen, "--val-data", str(tmp_path / "raw.npz")]))[1]) == 1

def test_generated_training_scenes_that_are_the_validation_scenes_are_refused(tmp_path):
    """The generated training scenes start at seed ``--seed * 10000``, the
    held-out ones at VALIDATION_SEED (1,000,000): ``--seed 100`` trained on
    the validation scenes and scored the model on its own training data
    (its val mIoU, best.pt's choice), without a word, as did ``--scenes``
    past 10,000 from --seed 99. Refused now, naming the flags; --val-data
    files validate any seed."""
    from pointsparse.data import VALIDATION_SEED

    gen = ["--data", "generated", "--out", "x"]
    for flags in (["--seed", "100"], ["--seed", "99", "--scenes", "10001"],
                  ["--seed", "100", "--scenes", "1", "--val-scenes", "1"]):
        with pytest.raises(ValueError, match=r"--seed .* --scenes .* the held-out scenes' seeds .*--val-scenes"):
            tr.open_training_data(_parse([*gen, *flags]))
    for flags in (["--seed", "99", "--scenes", "10000"], ["--seed", "101"], ["--seed", "99", "--scenes", "9999"]):
        train, val, _ = tr.open_training_data(_parse([*gen, *flags]))
        held = set(range(val.first_seed, val.first_seed + len(val)))
        assert val.first_seed == VALIDATION_SEED and not held & set(range(train.first_seed,
                                                                          train.first_seed + len(train)))
    np.savez(tmp_path / "v.npz", xyz=np.random.default_rng(0).random((20, 3)), labels=np.zeros(20, np.int64))
    assert len(tr.open_training_data(_parse([*gen, "--seed", "100", "--val-data", str(tmp_path / "v.npz")]))[1]) == 1


def test_a_label_map_name_is_saved_as_a_name_beside_a_folder_so_named(tmp_path, monkeypatch):
    """``train --label-map ign-lidarhd`` run from a folder holding the data in a folder named ``ign-lidarhd``
    (as ../shared/datasets does) saved the map as the path of that folder, since it exists: eval of the
    checkpoint then failed with "label map '/.../ign-lidarhd' is neither a JSON file nor one of [...]". A label
    map is saved as a path only where it names a file, as load_label_map reads it."""
    (tmp_path / "ign-lidarhd").mkdir()
    (tmp_path / "mine.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    saved = tr.saved_args(_parse(["--data", "ign-lidarhd/a.npz", "--label-map", "ign-lidarhd", "--val-label-map",
                                  "mine.json", "--out", "x"]))
    assert saved["label_map"] == "ign-lidarhd" and saved["val_label_map"] == str(tmp_path / "mine.json")
    assert saved["data"] == [str(tmp_path / "ign-lidarhd" / "a.npz")]


def test_an_ignore_index_that_is_a_class_is_noted(tmp_path, capsys):
    """``--ignore-index 0`` with a label map (read as "0 is unlabeled", as the raw learning ids have it) made
    the map's class 0 (semantic-kitti-learning's car) count nowhere, without a word; the run now notes which
    class the ignore index drops, for a label map's classes and the generated scenes'. Raw labels without a map
    (where the ignore index is one of the raw labels by design) and the default 255: no note."""
    rng = np.random.default_rng(0)
    xyz = rng.uniform(0, 8, (300, 3)).astype(np.float32)
    np.savez(tmp_path / "a.npz", xyz=xyz, labels=rng.integers(0, 20, 300))
    np.savez(tmp_path / "b.npz", xyz=xyz, labels=rng.integers(0, 20, 300))
    files = ["--data", str(tmp_path / "a.npz"), "--val-data", str(tmp_path / "b.npz"), "--out", "x"]
    tr.open_training_data(_parse([*files, "--label-map", "semantic-kitti-learning", "--ignore-index", "0"]))
    assert "note: --ignore-index 0 is the class 'car' of the label map" in capsys.readouterr().err
    tr.open_training_data(_parse([*TINY, "--ignore-index", "3", "--out", "x"]))
    assert "note: --ignore-index 3 is the class 'building' of the generated scenes" in capsys.readouterr().err
    for argv in ([*files, "--ignore-index", "0"], [*files, "--label-map", "semantic-kitti-learning"]):
        tr.open_training_data(_parse(argv))
        assert "--ignore-index" not in capsys.readouterr().err


def test_train_on_files_with_label_map(tmp_path, capsys):
    _tiles(tmp_path)
    out = tmp_path / "run"
    args = _parse(["--data", str(tmp_path / "tile*.npz"), "--label-map", "ign-lidarhd", "--epochs", "1", "--cr",
                   "0.125", "--blocks", "1", "--voxel-size", "0.5", "--no-progress", "--out", str(out)])
    report = tr.train(args)
    assert report["classes"] == ["ground", "low-vegetation", "high-vegetation", "building"]
    assert report["points"]["ground"] + report["points"]["building"] == 400  # one held-out tile
    assert report["points"]["low-vegetation"] == 0
    # eval defaults to the held-out file and the run's label map.
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "eval-metrics.json").read_text())["confusion"] == report["confusion"]
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--no-progress", "--val-scenes", "2"]) == 2
    assert "--val-scenes counts generated scenes" in capsys.readouterr().err


def test_resume_continues_exactly(tmp_path):
    straight = tmp_path / "straight"
    tr.main(_parse([*TINY, "--epochs", "2", "--out", str(straight)]))
    cut = tmp_path / "cut"
    tr.main(_parse([*TINY, "--epochs", "2", "--time-limit", "0", "--out", str(cut)]))  # stops after epoch 1
    first = tr.load_checkpoint(cut / "checkpoint.pt")
    assert first["epoch"] == 1
    tr.main(_parse([*TINY, "--epochs", "2", "--resume", "--out", str(cut)]))
    a, b = tr.load_checkpoint(straight / "checkpoint.pt"), tr.load_checkpoint(cut / "checkpoint.pt")
    assert b["epoch"] == 2
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["history"]["step_loss"] == b["history"]["step_loss"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2
    # Resuming a run that has its epochs, or with a model flag of another value, did nothing or ignored the
    # flag without a word; each is refused now, the checkpoint untouched.
    before = (cut / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match="already trained 2 epochs and --epochs 2 asks for no more"):
        tr.main(_parse([*TINY, "--epochs", "2", "--resume", "--out", str(cut)]))
    with pytest.raises(ValueError, match=r"--cr 1.0 \(the run's .*\) would be ignored"):
        tr.main(_parse([*TINY, "--epochs", "3", "--cr", "1.0", "--resume", "--out", str(cut)]))
    # The restored optimizer and schedule keep the run's learning rate and weight decay: another value was
    # ignored; another --optimizer was a KeyError from inside the first step.
    with pytest.raises(ValueError, match=r"--lr 0.01 \(the run's 0.002\) would be ignored"):
        tr.main(_parse([*TINY, "--epochs", "3", "--lr", "0.01", "--resume", "--out", str(cut)]))
    with pytest.raises(ValueError, match=r"--optimizer sgd \(the run's adamw\), --weight-decay 0.0 \(the run's "
                                         r"0.0001\) would be ignored"):
        tr.main(_parse([*TINY, "--epochs", "3", "--optimizer", "sgd", "--weight-decay", "0", "--resume",
                        "--out", str(cut)]))
    assert (cut / "checkpoint.pt").read_bytes() == before


def test_a_model_pruning_voxels_at_stride_1_trains_on_the_kept_voxels(tmp_path):
    """A VoxelPrune that add_voxel_prune put at stride 1 (the last decoder
    stage's input, recorded in the config: predict and eval run it) gives
    logits on the kept voxels only: train --resume (and prune's
    --finetune-epochs, the taylor criterion) took the cross-entropy of
    those against the labels of every voxel, torch's bare 'Expected input
    batch_size (1056) to match target batch_size (2111)'. The loss now
    scores the kept voxels against their own labels (the rows the
    selection records), as the model predicts them; a model of other rows
    and no record of them is a ValueError naming the counts."""
    from pointsparse import checkpoint
    import pointsparse as ps
    from pointsparse.app.scoring import logits_of
    from pointsparse.app.tasks import checkpoint_batches
    from pointsparse.models import add_voxel_prune, load_model, voxel_prunes

    dense = tmp_path / "dense"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(dense)]))
    state = tr.load_checkpoint(dense / "checkpoint.pt")
    model = load_model(dense / "checkpoint.pt")
    pruner = add_voxel_prune(model, "fuse.3", 0.5)
    out = tmp_path / "pruned"
    out.mkdir()
    checkpoint.save(out / "checkpoint.pt", dict(state, model=model.state_dict(),
                                                config=dict(state["config"], voxel_prune=voxel_prunes(model))))
    # the loss's logits and labels: the kept voxels' (those the pruner keeps of its input, in its order)
    batch = checkpoint_batches(state)[0]  # (a cloud of the run, voxelised as it was)
    kept = []
    hook = pruner.register_forward_hook(lambda m, args, y: kept.append(m.select(args[0])[0]))
    with torch.no_grad():
        logits, labels = logits_of(model.eval(), batch)
    hook.remove()
    assert 0 < len(logits) < len(batch.labels) and torch.equal(labels, batch.labels[kept[0]])
    tr.main(_parse([*TINY, "--epochs", "2", "--resume", "--out", str(out)]))
    resumed = tr.load_checkpoint(out / "checkpoint.pt")
    assert resumed["epoch"] == 2 and "fuse.3" in resumed["config"]["voxel_prune"]
    assert all(math.isfinite(v) for v in resumed["history"]["step_loss"])

    class Half(torch.nn.Module):  # other rows, no selection recorded: no labels to pair them with
        def forward(self, x):
            return ps.SparseTensor(x.feats[::2], x.coords[::2])

    with pytest.raises(ValueError, match=rf"logits for {len(batch.labels[::2])} voxels.*{len(batch.labels)} voxels"):
        logits_of(Half(), batch)


def test_resume_refuses_weights_and_optimizer_state_that_do_not_fit_naming_the_file(tmp_path):
    """A checkpoint whose weights are not its config's model (another
    width, a tensor missing), whose weights hold NaN, or whose optimizer
    state is another model's: eval and load_model refused them naming the
    file; --resume raised torch's RuntimeError (a traceback listing every
    key), trained on NaN weights until 'training diverged' at its first
    step, and failed inside AdamW's first step. Each is a ValueError naming
    the file before any training, the checkpoint untouched."""
    run, wide = tmp_path / "run", tmp_path / "wide"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    tr.main(_parse([*TINY, "--epochs", "1", "--cr", "0.25", "--out", str(wide)]))
    state, other = tr.load_checkpoint(run / "checkpoint.pt"), tr.load_checkpoint(wide / "checkpoint.pt")
    nan = dict(state["model"], **{"stem.0.0.weight": state["model"]["stem.0.0.weight"].clone()})
    nan["stem.0.0.weight"][0, 0, 0] = math.nan
    cases = {
        "width": (dict(state, model=other["model"]), r"'stem.0.0.weight' has shape \(27, 7, 8\)"),
        "missing": (dict(state, model={k: v for k, v in state["model"].items() if not k.startswith("classifier")}),
                    r"do not fit the model its config builds: tensors 2 missing \(classifier"),
        "nan": (dict(state, model=nan), "stem.0.0.weight holds NaN or inf"),
        "optimizer": (dict(state, optimizer=other["optimizer"]),
                      r"optimizer state does not fit its model: exp_avg of stem.0.0.weight is \(27, 7, 8\), the "
                      r"parameter \(27, 7, 4\)"),
    }
    _resume_refuses(tmp_path, {name: (bad, f".*{message}") for name, (bad, message) in cases.items()})


def _resume_refuses(tmp_path, cases: dict) -> None:
    """Each of ``cases`` (``{name: (checkpoint state, pattern)}``) saved as
    its own run's checkpoint: --resume of it is a ValueError naming the file,
    then matching ``pattern``, before any work; the checkpoint untouched."""
    from pointsparse import checkpoint

    for name, (bad, pattern) in cases.items():
        out = tmp_path / name
        out.mkdir()
        checkpoint.save(out / "checkpoint.pt", bad)
        before = (out / "checkpoint.pt").read_bytes()
        with pytest.raises(ValueError, match=rf"--resume {re.escape(str(out / 'checkpoint.pt'))}: {pattern}"):
            tr.main(_parse(["--resume", "--epochs", "2", "--no-progress", "--out", str(out)]))
        assert (out / "checkpoint.pt").read_bytes() == before, name


def test_resume_refuses_run_state_of_the_wrong_kind_naming_the_file_and_entry(tmp_path):
    """The entries of a training checkpoint that --resume restores besides
    the weights (optimizer, scheduler, history, epoch, torch_rng, best_miou)
    were used as they came: one of another kind (a hand-edited file, another
    tool's checkpoint with pointsparse's keys) was a KeyError 'param_groups',
    an IndexError, AttributeError on None, torch's KeyError 'lr_lambdas' or
    'Expected a CPUGeneratorImplState of size 5056', a TypeError comparing a
    str epoch, a float epoch refused by the sampler, naming neither the file
    nor the entry. Each is a ValueError naming both, before any training, the
    checkpoint untouched."""
    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    state = tr.load_checkpoint(run / "checkpoint.pt")
    history = state["history"]
    cases = {
        "opt-empty": (dict(state, optimizer={}), "optimizer"),
        "opt-none": (dict(state, optimizer=None), "optimizer"),
        "opt-no-groups": (dict(state, optimizer={"state": {}, "param_groups": []}), "optimizer"),
        "sched-none": (dict(state, scheduler=None), "scheduler"),
        "sched-empty": (dict(state, scheduler={}), "scheduler"),
        "hist-none": (dict(state, history=None), "history"),
        "hist-short": (dict(state, history={k: v for k, v in history.items() if k != "step_time"}), "history"),
        "hist-str": (dict(state, history=dict(history, step_loss=["x"])), "history"),
        "val-epoch-long": (dict(state, history=dict(history, val_epoch=[1, 2])), "history"),
        "epoch-str": (dict(state, epoch="1"), "epoch"),
        "epoch-float": (dict(state, epoch=1.5), "epoch"),
        "epoch-negative": (dict(state, epoch=-1), "epoch"),
        "rng-none": (dict(state, torch_rng=None), "torch_rng"),
        "rng-short": (dict(state, torch_rng=torch.zeros(3, dtype=torch.uint8)), "torch_rng"),
        "ranks-str": (dict(state, torch_rng_ranks="x"), "torch_rng_ranks"),
        "ranks-one": (dict(state, torch_rng_ranks=[state["torch_rng"]]), "torch_rng_ranks"),
        "ranks-short": (dict(state, torch_rng_ranks=[state["torch_rng"], torch.zeros(3, dtype=torch.uint8)]),
                        "torch_rng_ranks"),
        "best-str": (dict(state, best_miou="x"), "best_miou"),
        "wall-str": (dict(state, wall_time_s="x"), "wall_time_s"),
        "wall-negative": (dict(state, wall_time_s=-1.0), "wall_time_s"),
    }
    _resume_refuses(tmp_path, {name: (bad, f"its {entry} ") for name, (bad, entry) in cases.items()})


def test_resume_sets_each_process_its_own_generator(one_thread):
    """--resume of a run of several processes sets each its rank's generator (a checkpoint kept rank 0's, which
    every process took); a checkpoint of another process count: rank 0 takes the run's, the others a stream of
    the seed, their rank and the epoch (not one another's), and rank 0 says that the run goes on not bit for
    bit."""
    from types import SimpleNamespace

    from pointsparse.app.distributed import Dist

    states = []
    for seed in (5, 6, 7):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    said = []

    def job(rank: int, world: int):
        return SimpleNamespace(dist=Dist(rank, world, torch.device("cpu")), args=SimpleNamespace(seed=3),
                               resume_path="run/checkpoint.pt", log=said.append)

    state = {"torch_rng": states[0], "torch_rng_ranks": states[:2], "epoch": 4}
    for rank in (0, 1):
        tr.TrainingJob._restore_rng(job(rank, 2), state)
        assert torch.equal(torch.get_rng_state(), states[rank])
    assert not said
    drawn = []
    for rank in (0, 1, 2):  # (a run of two resumed as three)
        tr.TrainingJob._restore_rng(job(rank, 3), state)
        drawn.append(torch.get_rng_state())
    assert torch.equal(drawn[0], states[0]) and not torch.equal(drawn[1], drawn[2])
    torch.manual_seed(tr.rank_seed(3, 2, 4))
    assert torch.equal(drawn[2], torch.get_rng_state())
    tail = ("the random streams of the processes the run did not keep (SPVCNN's dropout) start anew, so the run "
            "goes on as close as it can, not bit for bit")
    assert said == [f"--resume run/checkpoint.pt: the run ran 2 process(es), this one 3: {tail}"]
    single = {"torch_rng": states[2], "epoch": 1}
    tr.TrainingJob._restore_rng(job(0, 1), single)
    assert torch.equal(torch.get_rng_state(), states[2]) and len(said) == 1
    tr.TrainingJob._restore_rng(job(0, 1), state)  # (a run of two resumed as one: said too)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert said[-1] == f"--resume run/checkpoint.pt: the run ran 2 process(es), this one 1: {tail}"
    older = {"torch_rng": states[2], "epoch": 1, "args": {"nproc": 2}}  # (a run of two without the per-rank record)
    tr.TrainingJob._restore_rng(job(0, 2), older)
    assert said[-1] == ("--resume run/checkpoint.pt: the run ran 2 process(es) (its checkpoint keeps one process's "
                        f"random state), this one 2: {tail}")


def test_resume_of_a_history_without_val_epoch_draws_its_curves(tmp_path):
    """A checkpoint whose history has val_miou but no val_epoch (made before
    the run recorded it, or edited by hand) resumed, then its next
    validation started val_epoch one entry long beside two val_miou: the
    curves plot failed ('x and y must have same first dimension') after
    training and before metrics.json was written. The run's val_epoch is
    taken as 1..k, as the plot reads a history without one."""
    from pointsparse import checkpoint

    out = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    state = tr.load_checkpoint(out / "checkpoint.pt")
    assert state["history"].pop("val_epoch") == [1]
    checkpoint.save(out / "checkpoint.pt", state)
    tr.main(_parse(["--resume", "--epochs", "2", "--no-progress", "--out", str(out)]))
    history = tr.load_checkpoint(out / "checkpoint.pt")["history"]
    assert history["val_epoch"] == [1, 2] and len(history["val_miou"]) == 2
    assert (out / "metrics.json").is_file() and (out / "curves.png").is_file()


def test_resume_with_a_larger_time_budget_trains_on(tmp_path):
    """--time-budget may change on resume (README): a run its budget ended
    resumed with more budget and --epochs trains the epochs that now fit.
    The plan saved in the checkpoint was kept instead, so it was refused with
    '--epochs 1 asks for no more' beside the --epochs 3 typed."""
    out = tmp_path / "budget"
    tr.main(_parse([*TINY, "--epochs", "3", "--time-budget", "1e-7", "--out", str(out)]))
    state = tr.load_checkpoint(out / "checkpoint.pt")
    assert (state["epoch"], state["planned_epochs"]) == (1, 1)
    # The same budget fits no more epochs: said so, naming the budget rather than --epochs.
    with pytest.raises(ValueError, match=r"--time-budget 1e-07 min .*fits no more"):
        tr.main(_parse([*TINY, "--epochs", "3", "--time-budget", "1e-7", "--resume", "--out", str(out)]))
    # Resumed without it, the run's budget holds (it trained on to the run's --epochs, its schedule laid over them)
    with pytest.raises(ValueError, match=r"--time-budget 1e-07 min .*fits no more"):
        tr.main(_parse(["--resume", "--no-progress", "--out", str(out)]))
    tr.main(_parse([*TINY, "--epochs", "3", "--time-budget", "100", "--resume", "--out", str(out)]))
    state = tr.load_checkpoint(out / "checkpoint.pt")
    assert (state["epoch"], state["planned_epochs"]) == (3, 3)


def test_a_resumed_runs_wall_time_counts_the_epochs_before_the_resume(tmp_path, monkeypatch):
    """metrics.json's train_time_s of a resumed run counts every epoch (the
    history's step times), but its wall_time_s only the resumed process's:
    a run resumed for its last epoch reported less wall time than training
    time. The checkpoint keeps the wall time of the epochs it holds, and the
    resumed run adds its own."""
    out = tmp_path / "run"
    slow = tr.TrainingJob.log_step

    def log_step(self, *args):  # (wall time of the first process that no step time counts)
        time.sleep(1.5)
        return slow(self, *args)

    with monkeypatch.context() as patch:
        patch.setattr(tr.TrainingJob, "log_step", log_step)
        tr.main(_parse([*TINY, "--epochs", "2", "--time-limit", "0", "--out", str(out)]))  # stops after epoch 1
    first = json.loads((out / "metrics.json").read_text())
    assert first["epochs"] == 1 and first["wall_time_s"] >= 1.5
    held = tr.load_checkpoint(out / "checkpoint.pt")["wall_time_s"]  # (epoch 1's, before its report)
    assert 1.5 <= held <= first["wall_time_s"]
    tr.main(_parse(["--resume", "--no-progress", "--out", str(out)]))
    report = json.loads((out / "metrics.json").read_text())
    assert report["epochs"] == 2
    assert report["wall_time_s"] > held and report["wall_time_s"] >= report["train_time_s"]


def test_resume_without_epochs_finishes_the_runs_epochs(tmp_path):
    """A run of --epochs 2 killed after epoch 1 and resumed with --resume alone
    (README: "--resume after a kill continues exactly") trained on to the
    default --epochs 10, its schedule stretched over ten epochs, without a word.
    Left out, --epochs is the run's: the resumed run is the straight one; typed,
    it extends the run."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    tr.main(_parse([*TINY, "--epochs", "2", "--out", str(straight)]))
    tr.main(_parse([*TINY, "--epochs", "2", "--time-limit", "0", "--out", str(cut)]))
    tr.main(_parse(["--resume", "--no-progress", "--out", str(cut)]))
    a, b = tr.load_checkpoint(straight / "checkpoint.pt"), tr.load_checkpoint(cut / "checkpoint.pt")
    assert b["epoch"] == 2 and a["history"]["step_loss"] == b["history"]["step_loss"]
    assert a["history"]["lr"] == b["history"]["lr"]
    with pytest.raises(ValueError, match="already trained 2 epochs and --epochs 2 asks for no more"):
        tr.main(_parse(["--resume", "--no-progress", "--out", str(cut)]))
    tr.main(_parse(["--resume", "--epochs", "3", "--no-progress", "--out", str(cut)]))
    assert tr.load_checkpoint(cut / "checkpoint.pt")["epoch"] == 3


def test_resume_from_a_namespace_made_by_hand_takes_its_epochs(tmp_path):
    """A namespace not from the command line (prune --finetune-epochs makes
    one from the run's flags, epochs = the run's + N) records no flags typed:
    its --epochs is taken as it is, also where it equals the default 10."""
    import argparse

    out = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    parser = argparse.ArgumentParser()
    tr.add_arguments(parser)
    tr.main(parser.parse_args([*TINY, "--epochs", "10", "--eval-every", "10", "--resume", "--out", str(out)]))
    assert tr.load_checkpoint(out / "checkpoint.pt")["epoch"] == 10


def test_resume_takes_the_runs_optimizer(tmp_path):
    """A run trained with --optimizer sgd resumes with SGD when the flag is
    not repeated (an AdamW built from the default took SGD's state and
    failed with KeyError at its first step), and the checkpoint records it."""
    out = tmp_path / "sgd"
    flags = [*TINY, "--optimizer", "sgd", "--lr", "0.05", "--weight-decay", "0", "--out", str(out)]
    tr.main(_parse([*flags, "--epochs", "1"]))
    tr.main(_parse([*TINY, "--epochs", "2", "--resume", "--out", str(out)]))
    state = tr.load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2
    assert (state["args"]["optimizer"], state["args"]["lr"], state["args"]["weight_decay"]) == ("sgd", 0.05, 0.0)
    assert tr.run_optimizer(state) == {"optimizer": "sgd", "lr": 0.05, "weight_decay": 0.0}
    # A flag typed at its default value that is not the run's is refused like any other value (it was taken as
    # not given, and the run's value replaced it without a word).
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"--optimizer adamw \(the run's sgd\), --lr 0.002 \(the run's 0.05\) "
                                         "would be ignored"):
        tr.main(_parse([*TINY, "--epochs", "3", "--optimizer", "adamw", "--lr=0.002", "--resume", "--out", str(out)]))
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_takes_the_runs_ignore_index(tmp_path):
    """A run trained with --ignore-index 7 (a class of the generated scenes: 'car', counted nowhere) resumed
    without the flag trained its later epochs with the default 255, 'car' in the loss and the scores, while the
    checkpoint's config still said 7 (eval of it then scored another way than the run's metrics.json). It now
    resumes with the run's ignore index, the same bits as the run left alone; another value typed is refused
    like the run's other settings."""
    straight = tmp_path / "straight"
    flags = [*TINY, "--ignore-index", "7", "--epochs", "2"]
    tr.main(_parse([*flags, "--out", str(straight)]))
    cut = tmp_path / "cut"
    tr.main(_parse([*flags, "--time-limit", "0", "--out", str(cut)]))  # stops after epoch 1
    tr.main(_parse([*TINY, "--epochs", "2", "--resume", "--out", str(cut)]))
    a, b = tr.load_checkpoint(straight / "checkpoint.pt"), tr.load_checkpoint(cut / "checkpoint.pt")
    assert b["epoch"] == 2 and b["args"]["ignore_index"] == b["config"]["ignore_index"] == 7
    assert a["history"]["step_loss"] == b["history"]["step_loss"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    before = (cut / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"--ignore-index 255 \(the run's 7\) would be ignored"):
        tr.main(_parse([*TINY, "--epochs", "3", "--ignore-index", "255", "--resume", "--out", str(cut)]))
    assert (cut / "checkpoint.pt").read_bytes() == before
    tr.main(_parse([*TINY, "--epochs", "3", "--ignore-index", "7", "--resume", "--out", str(cut)]))  # its own: taken
    assert tr.load_checkpoint(cut / "checkpoint.pt")["epoch"] == 3


def test_resume_takes_the_runs_training_settings(tmp_path):
    """The schedule, its warm-up, the batch size, the class weights, augmentation and the seed shape a run's
    trajectory as its optimizer does, but the checkpoint recorded none of them: a run resumed without repeating
    them trained its later epochs with the defaults (another schedule, batch, loss, ...) without a word. The
    config records them now; a resume takes the run's, the same bits as the run left alone, and another value
    typed is refused like the run's other settings."""
    straight = tmp_path / "straight"
    own = ["--schedule", "constant", "--batch-size", "1", "--class-weights", "sqrt-inverse", "--no-augment",
           "--seed", "4"]
    flags = [*_without(_without(TINY, "--batch-size"), "--seed"), *own, "--epochs", "2"]
    tr.main(_parse([*flags, "--out", str(straight)]))
    cut = tmp_path / "cut"
    tr.main(_parse([*flags, "--time-limit", "0", "--out", str(cut)]))  # stops after epoch 1
    assert tr.load_checkpoint(cut / "checkpoint.pt")["config"]["training"] == {
        "schedule": "constant", "warmup": 0.05, "batch_size": 1, "class_weights": "sqrt-inverse",
        "no_augment": True, "seed": 4}
    bare = _without(_without(TINY, "--batch-size"), "--seed")
    tr.main(_parse([*bare, "--epochs", "2", "--resume", "--out", str(cut)]))
    a, b = tr.load_checkpoint(straight / "checkpoint.pt"), tr.load_checkpoint(cut / "checkpoint.pt")
    assert b["epoch"] == 2 and len(b["history"]["step_loss"]) == 4  # two scans an epoch, one a step
    assert a["history"]["step_loss"] == b["history"]["step_loss"] and a["history"]["lr"] == b["history"]["lr"]
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    before = (cut / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=r"--schedule cosine \(the run's constant\), --batch-size 2 \(the run's 1\), "
                                         r"--class-weights none \(the run's sqrt-inverse\), --seed 3 \(the run's 4\) "
                                         "would be ignored"):
        tr.main(_parse([*bare, "--epochs", "3", "--schedule", "cosine", "--batch-size", "2", "--class-weights",
                        "none", "--seed", "3", "--resume", "--out", str(cut)]))
    # (the run's own warm-up typed is no other value, but the run's schedule has none: unread, so refused)
    with pytest.raises(ValueError, match=r"--warmup 0.05 is the warm-up of --schedule cosine; --schedule constant"):
        tr.main(_parse([*bare, "--epochs", "3", "--warmup", "0.05", "--resume", "--out", str(cut)]))
    assert (cut / "checkpoint.pt").read_bytes() == before
    # A run that augmented, resumed with --no-augment, is refused too (the flag alone: it takes no value).
    plain = tmp_path / "plain"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(plain)]))
    with pytest.raises(ValueError, match=r"--no-augment \(the run augments\) would be ignored"):
        tr.main(_parse([*TINY, "--epochs", "2", "--no-augment", "--resume", "--out", str(plain)]))


def test_resume_of_a_checkpoint_without_the_training_record(tmp_path):
    """A checkpoint written before the config recorded the training settings (and without the run's flags,
    ``args``) resumes as it did: with the values typed, or the defaults; the checkpoint it writes records
    them from then on."""
    out = tmp_path / "old"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    state = tr.load_checkpoint(out / "checkpoint.pt")
    del state["config"]["training"], state["args"]
    tr.save_checkpoint(out / "checkpoint.pt", state)
    tr.main(_parse([*TINY, "--epochs", "2", "--batch-size", "1", "--schedule", "step", "--resume", "--out", str(out)]))
    state = tr.load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 2 and len(state["history"]["step_loss"]) == 1 + 2  # one step of 2, then two of 1
    assert state["config"]["training"]["batch_size"] == 1 and state["config"]["training"]["schedule"] == "step"
    # A record of the wrong kind (a hand-edited file) is refused naming the file and the setting.
    state["config"]["training"]["batch_size"] = "1"
    tr.save_checkpoint(out / "checkpoint.pt", state)
    with pytest.raises(ValueError, match=r"checkpoint.pt: its config's training batch_size is no --batch-size value; "
                                         "got '1'"):
        tr.main(_parse([*TINY, "--epochs", "3", "--resume", "--out", str(out)]))


def test_resume_of_a_checkpoint_without_the_record_takes_the_flags_it_kept(tmp_path):
    """A checkpoint written before the config recorded the training settings still holds the flags its run
    was given (``args``): a resume takes the run's schedule, batch size, ... from them (the defaults took
    their place: another schedule and batch without a word), the bits of the run left alone, and refuses
    another value typed, as for a checkpoint that records them."""
    own = ["--schedule", "constant", "--batch-size", "1", "--seed", "4"]
    flags = [*_without(_without(TINY, "--batch-size"), "--seed"), *own, "--epochs", "2"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    tr.main(_parse([*flags, "--out", str(straight)]))
    tr.main(_parse([*flags, "--time-limit", "0", "--out", str(cut)]))  # stops after epoch 1
    state = tr.load_checkpoint(cut / "checkpoint.pt")
    del state["config"]["training"]  # (as a checkpoint of an earlier version)
    tr.save_checkpoint(cut / "checkpoint.pt", state)
    bare = _without(_without(TINY, "--batch-size"), "--seed")
    with pytest.raises(ValueError, match=r"--batch-size 2 \(the run's 1\) would be ignored"):
        tr.main(_parse([*bare, "--epochs", "2", "--batch-size", "2", "--resume", "--out", str(cut)]))
    tr.main(_parse([*bare, "--epochs", "2", "--resume", "--out", str(cut)]))
    a, b = tr.load_checkpoint(straight / "checkpoint.pt"), tr.load_checkpoint(cut / "checkpoint.pt")
    assert a["history"]["step_loss"] == b["history"]["step_loss"] and a["history"]["lr"] == b["history"]["lr"]
    assert b["config"]["training"] == a["config"]["training"]


def test_resume_reads_the_runs_data(tmp_path, capsys):
    """A run of files resumed without repeating its --data and --label-map trained its later epochs on the
    default data (24 generated scenes) and validated there, writing that into the run's checkpoint: the data
    flags left out are the run's now (its checkpoint keeps them, absolute). Typed, they are taken as given
    (files move), the classes still checked against the run's."""
    data = _tiles(tmp_path / "tiles")
    flags = ["--label-map", "ign-lidarhd", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--no-progress",
             "--batch-size", "1", "--seed", "3"]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    tr.main(_parse(["--data", str(data / "tile*.npz"), *flags, "--epochs", "2", "--out", str(straight)]))
    tr.main(_parse(["--data", str(data / "tile*.npz"), *flags, "--epochs", "2", "--time-limit", "0", "--out",
                    str(cut)]))
    tr.main(_parse(["--epochs", "2", "--resume", "--no-progress", "--out", str(cut)]))
    a, b = tr.load_checkpoint(straight / "checkpoint.pt"), tr.load_checkpoint(cut / "checkpoint.pt")
    assert b["epoch"] == 2 and a["history"]["step_loss"] == b["history"]["step_loss"]
    assert b["config"]["classes"] == a["config"]["classes"] and b["args"]["data"] == a["args"]["data"]
    # The files moved: typed, the new place is read.
    moved = tmp_path / "moved"
    data.rename(moved)
    capsys.readouterr()
    tr.main(_parse(["--data", str(moved / "tile*.npz"), "--epochs", "3", "--resume", "--no-progress", "--out",
                    str(cut)]))
    assert tr.load_checkpoint(cut / "checkpoint.pt")["epoch"] == 3
    assert "validated on other clouds" not in capsys.readouterr().err  # (the same files, moved)
    # Other validation clouds: the best epoch is then picked among mIoUs of other clouds, which a note says
    other = _tiles(tmp_path / "other")
    (other / "tile2.npz").rename(other / "held.npz")
    tr.main(_parse(["--data", str(moved / "tile*.npz"), "--val-data", str(other / "held.npz"), "--epochs", "4",
                    "--resume", "--no-progress", "--out", str(cut)]))
    assert re.search(r"note: --resume .*checkpoint.pt: the run validated on other clouds \(1 cloud now, 0 of them "
                     r"among its 1\): its best epoch \(best.pt\) is chosen among mIoUs of different clouds",
                     capsys.readouterr().err)


def test_resume_from_best_pt_in_its_folder_says_it_replaces_the_last_checkpoint(tmp_path, capsys):
    """``--resume DIR/best.pt --out DIR`` branches from the best epoch, and
    its first checkpoint replaced the run's later checkpoint.pt without a
    word: a note says so before any work."""
    out = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    capsys.readouterr()
    tr.main(_parse([*TINY, "--epochs", "2", "--resume", str(out / "best.pt"), "--out", str(out)]))
    assert re.search(r"note: --resume .*best.pt in its own folder goes on from epoch 1: its first checkpoint replaces "
                     r".*checkpoint.pt, the run's last; to keep it, give another --out", capsys.readouterr().err)
    tr.main(_parse([*TINY, "--epochs", "3", "--resume", "--out", str(out)]))  # (its own checkpoint.pt: no note)
    assert "goes on from epoch" not in capsys.readouterr().err


def test_resume_on_other_generated_validation_scenes_says_so(tmp_path, capsys):
    """The generated scenes' flags that draw the validation scenes typed
    anew on resume (--val-scenes, --beams, ...): the note names them; --scenes
    (the training scenes) and the run's own values give none."""
    out = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    capsys.readouterr()
    tr.main(_parse([*TINY, "--epochs", "2", "--scenes", "3", "--resume", "--out", str(out)]))
    assert "validated on other clouds" not in capsys.readouterr().err
    tr.main(_parse([*TINY[:5], "2", *TINY[6:], "--epochs", "3", "--resume", "--out", str(out)]))
    assert re.search(r"the run validated on other clouds \(--val-scenes 2 \(the run's 1\)\)", capsys.readouterr().err)


def test_resume_mends_a_best_pt_whose_write_a_kill_cut_short(tmp_path, monkeypatch, capsys):
    """An epoch writes checkpoint.pt, then best.pt where it is the best: a
    kill between the two left best.pt an epoch behind (or absent), and
    --resume in the folder trusted it, so metrics.json reported a best mIoU
    that no file held (eval of best.pt scored the older epoch). The resumed
    run now writes best.pt again from the checkpoint where that is the run's
    best epoch and best.pt is older than it (the files' times: no second
    read of the checkpoint), and says so; a best.pt of a best epoch before
    the checkpoint's is left as it is."""
    score = {"value": 0.1}
    monkeypatch.setattr(tr.metrics, "mean_iou", lambda cm: score["value"])
    out = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    first = (out / "best.pt").read_bytes()
    score["value"] = 0.2
    tr.main(_parse([*TINY, "--epochs", "2", "--resume", "--out", str(out)]))
    assert tr.load_checkpoint(out / "best.pt")["epoch"] == 2
    (out / "best.pt").write_bytes(first)  # (epoch 2's best.pt write cut short: epoch 1's file stays)
    os.utime(out / "best.pt", ns=(1, 1))
    capsys.readouterr()
    score["value"] = 0.05
    tr.main(_parse([*TINY, "--epochs", "3", "--resume", "--out", str(out)]))
    assert re.search(r"note: --resume .*checkpoint.pt: .*best.pt did not hold the run's best epoch 2 \(validation "
                     r"mIoU 20.0%: its write was cut short\); written again from the checkpoint",
                     capsys.readouterr().err)
    best = tr.load_checkpoint(out / "best.pt")
    assert best["epoch"] == 2 and best["best_miou"] == 0.2
    assert json.loads((out / "metrics.json").read_text())["best_miou"] == 0.2
    # a best.pt of an earlier best epoch (epoch 2, the checkpoint at 3 scored less) is the run's: left alone
    before = (out / "best.pt").read_bytes()
    tr.main(_parse([*TINY, "--epochs", "4", "--resume", "--out", str(out)]))
    assert (out / "best.pt").read_bytes() == before and "did not hold" not in capsys.readouterr().err


def test_resume_reads_the_checkpoint_once(tmp_path, monkeypatch):
    """The run's flags and settings are taken from the checkpoint before the command's checks, and the job
    restores the same checkpoint: one read of the file (a full-width run's checkpoint, optimizer state
    included, is hundreds of MB), not one for each."""
    out = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    reads = []
    load = tr.load_checkpoint
    monkeypatch.setattr(tr, "load_checkpoint", lambda path: reads.append(path) or load(path))
    tr.main(_parse([*TINY, "--epochs", "2", "--resume", "--out", str(out)]))
    assert reads == [out / "checkpoint.pt"] and load(out / "checkpoint.pt")["epoch"] == 2


def test_nproc_workers_know_the_flags_typed(tmp_path, monkeypatch):
    """The --nproc workers (each of which checks the flags --resume would ignore) get the record of the flags
    typed with the options (it was left behind with the CLI's module objects: they compared with the defaults)."""
    import torch.multiprocessing

    sent = []
    monkeypatch.setattr(torch.multiprocessing, "spawn", lambda fn, args, **kw: sent.append(args[2]))
    assert tr.main(_parse([*TINY, "--nproc", "2", "--lr", "0.002", "--out", str(tmp_path / "run")])) == 0
    (plain,) = sent
    assert tr._given(plain, "lr", "weight_decay") == ["--lr 0.002"] and not hasattr(plain, "_module")


def test_a_workers_value_error_is_the_commands(tmp_path, monkeypatch):
    """A ValueError raised in a --nproc worker (a cloud its shard reads, a
    layer's BatchStatisticsError) came out as torch's ProcessRaisedException,
    a traceback around the message, where one process gives the CLI's one
    line and exit status 2: it is that ValueError now; other errors keep
    their traceback."""
    import torch.multiprocessing as mp

    text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
            "  File \"x.py\", line 1, in f\n    raise ValueError(...)\n")
    raised = {"value": text + "ValueError: b.npz: label 7 is neither a class index\n",
              "batch": text + "pointsparse.nn.modules.BatchStatisticsError: BatchNorm(8) got 1 site\n",
              "other": text + "RuntimeError: gloo: connection reset\n"}
    for kind, message in raised.items():
        def spawn(*args, message=message, **kwargs):
            raise mp.ProcessRaisedException(message, 1, 123)

        monkeypatch.setattr(mp, "spawn", spawn)
        argv = [*TINY, "--nproc", "2", "--out", str(tmp_path / kind)]
        if kind == "other":
            with pytest.raises(mp.ProcessRaisedException, match="connection reset"):
                tr.main(_parse(argv))
            continue
        with pytest.raises(ValueError) as error:
            tr.main(_parse(argv))
        assert str(error.value) == message.rstrip().splitlines()[-1].partition(": ")[2]
    def value_spawn(*args, **kwargs):
        raise mp.ProcessRaisedException(raised["value"], 1, 123)

    monkeypatch.setattr(mp, "spawn", value_spawn)
    assert cli.main(["train", *TINY, "--nproc", "2", "--out", str(tmp_path / "cli")]) == 2
    # A cloud without labels in rank 1's shard: rank 0 (simulated; its shard is labelled) refuses it too, with
    # rank 1's message, rather than wait in its next collective for a peer that is gone.
    from pointsparse.app.distributed import Dist
    from pointsparse.data import open_source

    xyz = np.random.default_rng(0).uniform(0, 8, (300, 3)).astype(np.float32)
    np.savez(tmp_path / "a.npz", xyz=xyz, labels=np.zeros(300, dtype=np.int64))
    np.savez(tmp_path / "b.npz", xyz=xyz)
    peer = "--val-data: b.npz has no labels; training and validation need labelled clouds"
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda out, obj, *args, **kwargs: out.__setitem__(slice(None), [obj, (peer, None)]))
    with pytest.raises(ValueError, match=peer):
        tr.require_labels(open_source([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")], None, 255), "--val-data",
                          Dist(0, 2))


def test_validation_clouds_feature_the_training_clouds_lacked_is_0_as_eval_has_it(tmp_path, capsys):
    """A run trained on colourless clouds validated on a cloud with colour fed that colour to the model, which
    eval (since it sets such a feature to 0, as in training) does not: the run's val mIoU and eval's of the same
    checkpoint on the same cloud differed. Validation now takes the cloud as eval does, and notes it."""
    import json

    from pointsparse.data import generated

    paths = []
    for i in range(3):
        scene = generated.outdoor_scene(seed=40 + i, beams=16, azimuth_steps=192, max_range=16)
        extra = {"rgb": np.random.default_rng(i).integers(0, 256, (len(scene.xyz), 3)).astype(np.uint8)} \
            if i == 2 else {}
        paths.append(tmp_path / f"c{i}.npz")
        np.savez(paths[-1], xyz=scene.xyz, labels=scene.labels, intensity=scene.intensity, **extra)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(paths[0]), str(paths[1]), "--val-data", str(paths[2]), "--epochs", "2",
                     "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "1", "--seed", "3",
                     "--no-progress", "--out", str(run)]) == 0
    assert f"note: 1 of the 1 clouds hold rgb ({paths[2]}), which the model's training clouds did not" in \
        capsys.readouterr().err
    trained = json.loads((run / "metrics.json").read_text())
    assert cli.main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(paths[2]), "--no-progress",
                     "--out", str(tmp_path / "ev")]) == 0
    scored = json.loads((tmp_path / "ev" / "eval-metrics.json").read_text())
    assert scored["confusion"] == trained["confusion"]
    # the voxels validation scores: the colour columns (the last three features) 0, the others as read
    from pointsparse.app import distributed

    args = _parse(["--data", str(paths[0]), str(paths[1]), "--val-data", str(paths[2]), "--epochs", "2", "--cr",
                   "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "1", "--seed", "3",
                   "--no-progress", "--threads", "1", "--out", str(tmp_path / "job")])
    job = tr.TrainingJob(args, distributed.init_distributed(args))
    feats = job.val_samples()[0].input.feats
    assert float(feats[:, -3:].abs().sum()) == 0 and float(feats[:, :4].abs().sum()) > 0


def test_a_diverged_run_ends_the_command_in_one_line(tmp_path, monkeypatch, capsys):
    """A run whose loss or weights stop being finite (--lr 1e9) ended `pointsparse train` with a 20-line traceback
    of TrainingDiverged, exit status 1, where other errors are one line. It is the CLI's error line, exit 1 (a
    failure, not bad input), from one process or from a --nproc worker; POINTSPARSE_TRACEBACK=1 gives the
    traceback."""
    import torch.multiprocessing as mp

    monkeypatch.delenv("POINTSPARSE_TRACEBACK", raising=False)
    assert cli.main(["train", *TINY, "--epochs", "3", "--optimizer", "sgd", "--lr", "1e9", "--out",
                     str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pointsparse train: error: ") and "training diverged (lower --lr" in err, err
    assert "Traceback" not in err and err.count("\n") == 2, err
    text = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most recent call last):\n"
            "  File \"x.py\", line 1, in f\n    raise TrainingDiverged(...)\n"
            "pointsparse.app.trainer.TrainingDiverged: the training loss is nan at step 3: training diverged\n")

    def spawn(*args, **kwargs):
        raise mp.ProcessRaisedException(text, 1, 123)

    monkeypatch.setattr(mp, "spawn", spawn)
    assert cli.main(["train", *TINY, "--nproc", "2", "--out", str(tmp_path / "two")]) == 1
    assert capsys.readouterr().err.startswith("pointsparse train: error: the training loss is nan at step 3: "
                                              "training diverged\n")
    monkeypatch.setenv("POINTSPARSE_TRACEBACK", "1")
    with pytest.raises(tr.TrainingDiverged):
        cli.main(["train", *TINY, "--nproc", "2", "--out", str(tmp_path / "three")])


def test_a_killed_worker_ends_the_command_in_one_line(tmp_path, monkeypatch, capsys):
    """A --nproc worker killed (SIGKILL, the OOM killer) ended the command with torch's ProcessExitedException
    traceback, exit status 1. It is one line naming the process and the signal (or exit status), and --resume
    where the run has a checkpoint; POINTSPARSE_TRACEBACK=1 gives the traceback."""
    import torch.multiprocessing as mp

    def spawn(*args, **kwargs):
        raise mp.ProcessExitedException("process 1 terminated with signal SIGKILL", error_index=1, error_pid=4321,
                                        exit_code=-9, signal_name="SIGKILL")

    monkeypatch.setattr(mp, "spawn", spawn)
    monkeypatch.delenv("POINTSPARSE_TRACEBACK", raising=False)
    out = tmp_path / "run"
    assert tr.main(_parse([*TINY, "--nproc", "2", "--out", str(out)])) == 1
    assert capsys.readouterr().err == ("pointsparse train: error: process 1 of the 2 (pid 4321) ended by signal "
                                       "SIGKILL; torch stopped the others\n")
    (out / "checkpoint.pt").write_bytes(b"")  # (a run with a checkpoint: --resume named)
    assert cli.main(["train", *TINY, "--nproc", "2", "--out", str(out)]) == 1
    assert capsys.readouterr().err.endswith("torch stopped the others (train --resume continues from its last "
                                            "checkpoint)\n")
    monkeypatch.setenv("POINTSPARSE_TRACEBACK", "1")
    with pytest.raises(mp.ProcessExitedException):
        tr.main(_parse([*TINY, "--nproc", "2", "--out", str(out)]))


def test_nproc_resume_checks_the_runs_settings_before_the_workers_start(tmp_path, monkeypatch):
    """--resume --nproc 2 of a run with --batch-size 3 (not repeated): the batch size's check against --nproc
    was left to each worker, which refused it inside torch's spawn (its ProcessRaisedException, a traceback,
    not the command's error); so was --warmup typed beside the run's constant schedule. The run's settings
    are taken before the checks, which refuse both before any worker starts."""
    import torch.multiprocessing

    sent = []
    monkeypatch.setattr(torch.multiprocessing, "spawn", lambda fn, args, **kw: sent.append(args[2]))
    out = tmp_path / "run"
    out.mkdir()
    for batch in (3, 4):
        training = {"schedule": "constant", "warmup": 0.05, "batch_size": batch, "class_weights": "none",
                    "no_augment": False, "seed": 3}
        tr.save_checkpoint(out / "checkpoint.pt", {"model": {}, "args": {"data": ["generated"]},
                                                   "config": {"classes": ["a", "b"], "training": training}})
        if batch == 3:
            with pytest.raises(ValueError, match=r"--batch-size \(3\) must be a multiple of --nproc \(2\)"):
                tr.main(_parse(["--resume", "--nproc", "2", "--no-progress", "--out", str(out)]))
    with pytest.raises(ValueError, match="--warmup 0.1 is the warm-up of --schedule cosine; --schedule constant"):
        tr.main(_parse(["--resume", "--nproc", "2", "--warmup", "0.1", "--no-progress", "--out", str(out)]))
    assert not sent
    assert tr.main(_parse(["--resume", "--nproc", "2", "--no-progress", "--out", str(out)])) == 0
    (plain,) = sent
    assert (plain.batch_size, plain.schedule, plain.seed) == (4, "constant", 3) and not tr._given(plain, "batch_size")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    tr.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "config": {}})
    good = path.read_bytes()

    def interrupted(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tr.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "config": {}})
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not exist"):
        tr.load_checkpoint(tmp_path / "nothing.pt")
    torch.save([1, 2], tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pointsparse"):
        tr.load_checkpoint(tmp_path / "other.pt")


def test_init_from_matches_classifier_rows_by_name():
    torch.manual_seed(0)
    src = MinkUNet(7, 3, cr=0.125, blocks=1)
    dst = MinkUNet(7, 4, cr=0.125, blocks=1)
    ckpt = {"model": src.state_dict(), "config": {"classes": ["road", "car", "pole"]}}
    copied = tr.init_from(dst, ckpt, ["car", "bus", "road", "tree"])
    state = dst.state_dict()
    assert torch.equal(state["stem.0.0.weight"], src.state_dict()["stem.0.0.weight"])
    w = src.state_dict()["classifier.fn.weight"]
    assert torch.equal(state["classifier.fn.weight"][0], w[1]) and torch.equal(state["classifier.fn.weight"][2], w[0])
    assert not torch.equal(state["classifier.fn.weight"][1], w[2])
    assert any("car, road" in c for c in copied)


def test_init_refuses_a_checkpoint_whose_weights_hold_nan(tmp_path):
    """--init of a checkpoint whose weights hold NaN (a damaged or diverged
    run's, which eval, --resume and load_model refuse naming the file and
    the tensor) copied them and trained until 'the training loss is nan at
    step 1: training diverged (lower --lr ...)', a traceback pointing at the
    learning rate. Refused before any training, naming both."""
    from pointsparse import checkpoint

    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    state = tr.load_checkpoint(run / "checkpoint.pt")
    weight = state["model"]["stem.0.0.weight"].clone()
    weight[0, 0, 0] = math.inf
    bad = tmp_path / "bad.pt"
    checkpoint.save(bad, dict(state, model=dict(state["model"], **{"stem.0.0.weight": weight})))
    out = tmp_path / "tuned"
    with pytest.raises(ValueError, match=rf"--init {bad}: stem.0.0.weight holds NaN or inf"):
        tr.main(_parse([*TINY, "--epochs", "1", "--init", str(bad), "--out", str(out)]))
    assert not (out / "checkpoint.pt").exists()
    # a negative running variance (finite): every output NaN as well
    variance = state["model"]["stem.0.1.running_var"].clone()
    variance[0] = -1.0
    checkpoint.save(bad, dict(state, model=dict(state["model"], **{"stem.0.1.running_var": variance})))
    with pytest.raises(ValueError, match=rf"--init {bad}: stem.0.1.running_var holds negative values"):
        tr.main(_parse([*TINY, "--epochs", "1", "--init", str(bad), "--out", str(out)]))
    assert not (out / "checkpoint.pt").exists()


def test_init_from_a_checkpoint_of_the_out_folder_is_refused(tmp_path, monkeypatch):
    """README: no command writes over what it reads. ``train --init
    DIR/checkpoint.pt --out DIR`` (or DIR/best.pt, or a copy beside them)
    started a new run that wrote its first epoch over the run it started
    from, checkpoint.pt and best.pt both, without a word. Refused before any
    training, as prune refuses an --out beside its --checkpoint; the same
    --init into another folder trains."""
    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    copy = run / "epoch1.pt"
    copy.write_bytes((run / "checkpoint.pt").read_bytes())
    before = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "best.pt")}
    for init, replaced in ((run / "checkpoint.pt", "checkpoint.pt"), (run / "best.pt", "checkpoint.pt"),
                           (copy, "checkpoint.pt")):
        with pytest.raises(ValueError, match=rf"--out {re.escape(str(run))}: the new run would replace "
                                             rf"{re.escape(str(run / replaced))}, .*--init {re.escape(str(init))}"):
            tr.main(_parse([*TINY, "--epochs", "1", "--init", str(init), "--out", str(run)]))
    # (named as the user typed it: a relative --out and --init, the same folder)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--out \./run: the new run would replace run/checkpoint.pt"):
        tr.main(_parse([*TINY, "--epochs", "1", "--init", "run/best.pt", "--out", "./run"]))
    assert {name: (run / name).read_bytes() for name in before} == before
    # A folder that holds only best.pt (checkpoint.pt moved away) is refused too: best.pt would be replaced.
    (run / "checkpoint.pt").unlink()
    with pytest.raises(ValueError, match=r"would replace .*best.pt"):
        tr.main(_parse([*TINY, "--epochs", "1", "--init", str(copy), "--out", str(run)]))
    tr.main(_parse([*TINY, "--epochs", "1", "--init", str(copy), "--out", str(tmp_path / "tuned")]))
    assert (tmp_path / "tuned" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("name", ["checkpoint.pt", "best.pt", "metrics.json", "curves.png"])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_training(name, tmp_path, monkeypatch):
    """A folder in --out named as a file the run writes: the run failed at
    its first checkpoint (or its end), after the work, with checkpoint.save's
    hint to write DIR/checkpoint.pt/checkpoint.pt. Refused before any
    training, naming --out, the folder and what the run writes there."""
    def no_work(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(tr.Trainer, "fit", no_work)
    out = tmp_path / "run"
    (out / name).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"--out {re.escape(str(out))}: {re.escape(str(out / name))} is a folder, "
                                         rf"where the run writes its .*: move it away, or give another --out") as info:
        tr.main(_parse([*TINY, "--epochs", "1", "--out", str(out)]))
    assert f"{name}/{name}" not in str(info.value)


RUN_FILES = ("checkpoint.pt", "best.pt", "metrics.json", "curves.png", "confusion.png", "topdown.png")


class _Killed(Exception):
    pass


def _killed_after(monkeypatch, writes: int) -> None:
    """The run stops (as if killed) after its ``writes``-th checkpoint
    (0: before its first step)."""
    real, done = tr.TrainingJob._checkpoint, []

    def checkpoint_then_stop(self, *args):
        real(self, *args)
        done.append(1)
        if len(done) == writes:
            raise _Killed

    def no_step(*args):
        raise _Killed

    monkeypatch.setattr(tr.TrainingJob, "_checkpoint", checkpoint_then_stop)
    if writes == 0:
        monkeypatch.setattr(tr.TrainingJob, "loss", no_step)


def test_a_new_run_replaces_the_previous_runs_files_at_its_first_checkpoint(tmp_path, monkeypatch, capsys):
    """A new run (no --resume) in a folder holding a finished run left the
    old run's best.pt, metrics.json and PNGs beside its own checkpoint.pt
    until its first validation (and its report at the end): eval of best.pt
    scored the old run's model, metrics.json reported it. Its first
    checkpoint now replaces them: the folder holds one run or the other.
    Stopped before that, the old run stays whole."""
    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    before = {name: (run / name).read_bytes() for name in RUN_FILES}
    with monkeypatch.context() as patch:
        _killed_after(patch, 0)
        with pytest.raises(_Killed):
            tr.main(_parse([*TINY, "--epochs", "3", "--eval-every", "2", "--seed", "4", "--out", str(run)]))
    assert {name: (run / name).read_bytes() for name in RUN_FILES} == before
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _killed_after(patch, 1)
        with pytest.raises(_Killed):
            tr.main(_parse([*TINY, "--epochs", "3", "--eval-every", "2", "--seed", "4", "--out", str(run)]))
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["checkpoint.pt"]
    state = tr.load_checkpoint(run / "checkpoint.pt")
    assert state["epoch"] == 1 and state["history"]["val_miou"] == [] and state["args"]["seed"] == 4
    said = capsys.readouterr()
    assert re.search(r"a new run in .*run: the previous run's best\.pt, metrics\.json, curves\.png, "
                     r"confusion\.png, topdown\.png removed", said.out)
    # (and said before any work, where a Ctrl-C still keeps the run: the line above came after its files were gone)
    assert re.search(r"note: --out .*run holds a run: this run replaces it \(its checkpoint.pt, best.pt, report\) at "
                     r"its first checkpoint; to continue that run instead, stop now and give train --resume --out "
                     r".*run\n", said.err)
    # The run to its end: its own files, as a rerun of the demo into its folder writes them.
    tr.main(_parse([*TINY, "--epochs", "2", "--seed", "4", "--out", str(run)]))
    assert all((run / name).is_file() for name in RUN_FILES)
    assert json.loads((run / "metrics.json").read_text())["config"]["training"]["seed"] == 4
    assert tr.load_checkpoint(run / "best.pt")["args"]["seed"] == 4


def test_a_new_run_removes_the_eval_report_of_the_previous_run(tmp_path, capsys):
    """``eval --out RUN`` of a run's checkpoint writes eval-metrics.json and
    its PNGs beside the run's files. A new run in RUN removed the old run's
    best.pt, metrics.json and PNGs at its first checkpoint and left those:
    eval-metrics.json named RUN/best.pt with the old model's scores beside
    the new run's best.pt. They go with the old run's other files now."""
    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    assert cli.main(["eval", "--checkpoint", str(run / "best.pt"), "--out", str(run), "--no-progress"]) == 0
    written = sorted(p.name for p in run.glob("eval-*"))
    assert "eval-metrics.json" in written
    capsys.readouterr()
    tr.main(_parse([*TINY, "--epochs", "1", "--seed", "4", "--out", str(run)]))
    assert not list(run.glob("eval-*"))
    said = re.search(r"the previous run's (best\.pt, .*) removed", capsys.readouterr().out)
    assert said and set(written) <= set(said.group(1).split(", "))


def test_resume_in_its_folder_removes_the_eval_report_of_a_checkpoint_it_replaces(tmp_path, monkeypatch, capsys):
    """``eval --out RUN`` of RUN/checkpoint.pt, then ``train --resume`` in
    RUN: eval-metrics.json and its PNGs, the scores of the epoch the
    checkpoint held, stayed beside the checkpoint.pt of a later epoch and
    read as its scores. The report goes when the checkpoint it scored is
    written over (checkpoint.pt at the first checkpoint of the resumed run,
    best.pt at its next best epoch), saying so; a report of a best.pt that
    the resumed epochs do not beat still describes that file and stays, as
    do files of the folder that are no report this project wrote."""
    from pointsparse.app import scoring

    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    (run / "eval-notes.txt").write_text("mine")  # (behind the prefix but no report file: never removed)

    def evaluated(name):
        assert cli.main(["eval", "--checkpoint", str(run / name), "--out", str(run), "--no-progress"]) == 0
        assert (run / "eval-metrics.json").is_file()
        return sorted(p.name for p in run.glob("eval-*") if p.name != "eval-notes.txt")

    def resume(epochs):
        capsys.readouterr()
        tr.main(_parse(["--resume", "--epochs", str(epochs), "--out", str(run), "--no-progress"]))
        return capsys.readouterr().out

    written = evaluated("checkpoint.pt")
    said = resume(2)
    assert not (run / "eval-metrics.json").exists() and (run / "eval-notes.txt").read_text() == "mine"
    removed = re.search(r"eval's report of (\S+) \((.*?)\) removed", said)
    assert removed and removed.group(1) == str(run / "checkpoint.pt"), said
    assert sorted(removed.group(2).split(", ")) == written
    # A best.pt the resumed epochs do not beat (its run's best mIoU recorded as 1): its report stays.
    evaluated("best.pt")
    state = tr.load_checkpoint(run / "checkpoint.pt")
    tr.save_checkpoint(run / "checkpoint.pt", {**state, "best_miou": 1.0})
    tr.save_checkpoint(run / "best.pt", {**tr.load_checkpoint(run / "best.pt"), "best_miou": 1.0})
    resume(3)
    assert json.loads((run / "eval-metrics.json").read_text())["checkpoint"] == str(run / "best.pt")
    assert tr.load_checkpoint(run / "best.pt")["epoch"] < 3
    # One the resumed epochs beat: best.pt holds a later epoch, its report goes.
    state = tr.load_checkpoint(run / "checkpoint.pt")
    tr.save_checkpoint(run / "checkpoint.pt", {**state, "best_miou": 0.0})
    monkeypatch.setattr(tr.metrics, "mean_iou", lambda cm: 0.5)
    said = resume(4)
    assert tr.load_checkpoint(run / "best.pt")["epoch"] == 4 and not list(run.glob(scoring.EVAL_PREFIX + "*.json"))
    assert f"eval's report of {run / 'best.pt'}" in said, said


def test_eval_removes_the_files_of_an_earlier_eval_it_does_not_write(tmp_path, monkeypatch, capsys):
    """An eval into a folder that an earlier eval wrote its pictures in, this
    time writing none (matplotlib not importable): eval-confusion.png and
    eval-topdown.png of the earlier eval stood beside the new
    eval-metrics.json, taken for its pictures. write_report removes the files
    of its report (behind its prefix) that it does not write."""
    from pointsparse.app import plots, scoring

    rng = np.random.default_rng(0)
    first = (rng.random((50, 3)).astype(np.float32), rng.integers(0, 3, 50), rng.integers(0, 3, 50), None)
    for prefix in ("", "eval-"):
        out = tmp_path / f"out{prefix}"
        out.mkdir()
        for name in scoring.REPORT_FILES:  # (an earlier report's; with matplotlib, write_report writes them all)
            (out / f"{prefix}{name}").write_bytes(b"earlier")
        (out / "other.png").write_bytes(b"not a report's")
        monkeypatch.setattr(plots, "available", lambda: False)
        report = scoring.write_report(out, np.eye(3, dtype=np.int64), ["a", "b", "c"], first, None, {}, -100, prefix)
        assert report["pictures"] == {}
        assert sorted(p.name for p in out.iterdir()) == sorted([f"{prefix}metrics.json", "other.png"])
        assert json.loads((out / f"{prefix}metrics.json").read_text())["classes"] == ["a", "b", "c"]


def test_resume_into_another_folder_brings_the_runs_best_checkpoint(tmp_path, capsys):
    """``--resume A/checkpoint.pt --out B`` wrote no B/best.pt unless the
    resumed epochs beat A's best, yet B/metrics.json reported A's best mIoU,
    of a file not in B. B gets the run's best.pt (A's, where the resumed
    epochs do not beat it); where no best.pt beside the checkpoint holds
    the run's best, B's best is that of the epochs from the resume on, and
    a note says so. B's metrics.json reports the mIoU its best.pt holds."""
    a, b = tmp_path / "a", tmp_path / "b"
    tr.main(_parse([*TINY, "--epochs", "2", "--out", str(a)]))
    (b / "best.pt").parent.mkdir()
    (b / "best.pt").write_bytes((a / "checkpoint.pt").read_bytes())  # (another run's, which B's run replaces)
    a_best = tr.load_checkpoint(a / "best.pt")
    capsys.readouterr()
    tr.main(_parse(["--resume", str(a / "checkpoint.pt"), "--epochs", "3", "--out", str(b), "--no-progress"]))
    report = json.loads((b / "metrics.json").read_text())
    best = tr.load_checkpoint(b / "best.pt")
    assert report["best_miou"] == best["best_miou"] == best["history"]["val_miou"][-1]
    if report["best_miou"] == a_best["best_miou"]:  # (not beaten: A's best epoch, as A holds it)
        assert best["epoch"] == a_best["epoch"] and all(torch.equal(best["model"][k], v)
                                                         for k, v in a_best["model"].items())
    # No best.pt beside the checkpoint (or none of its run): the best of the resumed epochs, noted.
    (tmp_path / "c").mkdir()
    lone = tmp_path / "c" / "checkpoint.pt"
    lone.write_bytes((a / "checkpoint.pt").read_bytes())
    capsys.readouterr()
    tr.main(_parse(["--resume", str(lone), "--epochs", "3", "--out", str(tmp_path / "d"), "--no-progress"]))
    assert re.search(r"no best\.pt beside it holds .*: .*d/best\.pt holds the best of the epochs from the resume "
                     r"on", capsys.readouterr().err)
    report = json.loads((tmp_path / "d" / "metrics.json").read_text())
    best = tr.load_checkpoint(tmp_path / "d" / "best.pt")
    assert best["epoch"] == 3 and report["best_miou"] == best["best_miou"] == best["history"]["val_miou"][-1]


def test_a_best_pt_that_is_not_the_resumed_runs_is_removed_at_its_first_checkpoint(tmp_path, monkeypatch,
                                                                                   capsys):
    """A run resumed in its folder from a checkpoint that records no best
    (a pruned one: its best is its fine-tuning's) beside a best.pt of
    another run: that best.pt stood beside the resumed epochs until their
    first validation. Removed at the first checkpoint, saying so."""
    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "2", "--out", str(run)]))
    state = tr.load_checkpoint(run / "checkpoint.pt")
    del state["best_miou"]
    tr.save_checkpoint(run / "checkpoint.pt", state)
    capsys.readouterr()
    with monkeypatch.context() as patch:
        _killed_after(patch, 1)
        with pytest.raises(_Killed):
            tr.main(_parse(["--resume", "--epochs", "4", "--eval-every", "4", "--out", str(run), "--no-progress"]))
    assert not (run / "best.pt").exists() and tr.load_checkpoint(run / "checkpoint.pt")["epoch"] == 3
    assert "best.pt removed: it holds no epoch of the run resumed from" in capsys.readouterr().out


def test_resume_of_a_finished_run_without_its_report_writes_it(tmp_path, capsys):
    """A kill after a run's last checkpoint, before its metrics.json and
    PNGs, left a finished run without a report, and --resume refused ("the
    run already trained N epochs"). --resume in its folder now writes the
    report of its last epoch (as the run would have: the same confusion
    matrix) and trains nothing; with the report there it still refuses,
    and resumed into another folder it says how to get it."""
    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "2", "--out", str(run)]))
    report = json.loads((run / "metrics.json").read_text())
    kept = {name: (run / name).read_bytes() for name in ("checkpoint.pt", "best.pt")}
    with pytest.raises(ValueError, match="the run already trained 2 epochs and --epochs 2 asks for no more"):
        tr.main(_parse(["--resume", "--out", str(run), "--no-progress"]))
    for name in ("metrics.json", "curves.png", "confusion.png", "topdown.png"):
        (run / name).unlink()
    with pytest.raises(ValueError, match=rf"the run already trained 2 epochs .*; its folder holds no report of them: "
                                         rf"train --resume {re.escape(str(run / 'checkpoint.pt'))} --out "
                                         rf"{re.escape(str(run))} writes it"):
        tr.main(_parse(["--resume", str(run / "checkpoint.pt"), "--out", str(tmp_path / "b"), "--no-progress"]))
    capsys.readouterr()
    assert tr.main(_parse(["--resume", "--out", str(run), "--no-progress"])) == 0
    assert "its report was missing" in capsys.readouterr().out
    again = json.loads((run / "metrics.json").read_text())
    assert again["confusion"] == report["confusion"] and again["epochs"] == 2 and again["steps"] == report["steps"]
    assert again["history"] == report["history"] and again["best_miou"] == report["best_miou"]
    assert all((run / name).stat().st_size > 0 for name in ("curves.png", "confusion.png", "topdown.png"))
    assert {name: (run / name).read_bytes() for name in kept} == kept
    # A report of fewer epochs (the run extended, killed after its last checkpoint) is rewritten too.
    (run / "metrics.json").write_text(json.dumps({**report, "epochs": 1}))
    assert tr.main(_parse(["--resume", "--out", str(run), "--no-progress"])) == 0
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    capsys.readouterr()


def test_resume_that_writes_a_missing_report_reads_no_training_cloud(tmp_path, monkeypatch, capsys):
    """--resume of a finished run without its report validates its last
    epoch and trains nothing: it reads (or generates) the validation clouds
    alone, not every training cloud (nor their class weights), which it
    read before writing the report."""
    from pointsparse.data.datasets import GeneratedScenes

    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--class-weights", "sqrt-inverse", "--out", str(run)]))
    (run / "metrics.json").unlink()
    sources, read = [], []
    opened = tr.open_training_data

    def spied(args, dist=None):
        train, val, classes = opened(args, dist)
        sources.append(train)
        return train, val, classes

    getitem = GeneratedScenes.__getitem__
    monkeypatch.setattr(tr, "open_training_data", spied)
    monkeypatch.setattr(GeneratedScenes, "__getitem__",
                        lambda self, i: (read.append(i) if any(self is s for s in sources) else None,
                                         getitem(self, i))[1])
    capsys.readouterr()
    assert tr.main(_parse(["--resume", "--out", str(run), "--no-progress"])) == 0
    assert "its report was missing" in capsys.readouterr().out
    assert len(sources) == 1 and read == []
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of --nproc"):
        tr.main(_parse([*TINY, "--nproc", "2", "--batch-size", "3", "--out", "x"]))
    with pytest.raises(ValueError, match="--epochs"):
        tr.main(_parse([*TINY, "--epochs", "0", "--out", "x"]))
    with pytest.raises(ValueError, match="--voxel-size"):
        tr.main(_parse([*TINY, "--voxel-size", "-1", "--out", "x"]))


@pytest.mark.parametrize("flag, value, message", [
    ("--beams", "0", "--beams must be >= 1"),
    ("--azimuth-steps", "-3", "--azimuth-steps must be >= 1"),
    ("--threads", "0", "--threads must be >= 1"),
    ("--max-range", "0", "--max-range must be > 0"),
    ("--max-range", "nan", "--max-range must be > 0"),
    ("--val-fraction", "0", r"--val-fraction must be in \(0, 1\)"),
    ("--val-fraction", "1", r"--val-fraction must be in \(0, 1\)"),
    ("--val-fraction", "-0.1", r"--val-fraction must be in \(0, 1\)"),
    ("--warmup", "-0.01", "--warmup must be"),
    ("--warmup", "1.5", "--warmup must be"),
    ("--time-limit", "-1", "--time-limit must be >= 0"),
    ("--time-budget", "0", "--time-budget must be > 0"),
    ("--weight-decay", "nan", "--weight-decay must be >= 0"),
])
def test_out_of_range_flags_fail_before_any_work(flag, value, message, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(tr, "train", no_work)
    monkeypatch.setattr(tr, "open_training_data", no_work)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        tr.main(_parse([*TINY, flag, value, "--out", str(out)]))
    assert not out.exists()


def test_scan_of_too_many_rays_fails_naming_both_flags_before_any_work(tmp_path, monkeypatch):
    """--beams 1024 --azimuth-steps 65536 passed check_args (each within its
    own limit) and was refused by the scenes with their keyword names; the
    product is checked with the flags, before --out is made."""
    def no_work(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(tr, "train", no_work)
    monkeypatch.setattr(tr, "open_training_data", no_work)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--beams x --azimuth-steps = 1024 x 65536 = 67,108,864 rays; a scan may "
                                         r"have at most 4,194,304"):
        tr.main(_parse([*TINY, "--beams", "1024", "--azimuth-steps", "65536", "--out", str(out)]))
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--data", "a.npy", "--beams", "32"], r"--beams 32: the generated scenes' settings; --data a.npy"),
    (["--data", "a.npy", "--beams", "64"], r"--beams 64: the generated scenes' settings"),  # (the default beams)
    (["--data", "a.npy", "b.npy", "--scenes", "8", "--max-range", "30"], r"--scenes 8, --max-range 30.0: the gen"),
    (["--data", "a.npy", "--val-data", "b.npy", "--val-scenes", "2"], "--val-scenes 2: the generated scenes'"),
    (["--data", "generated-indoor", "--azimuth-steps", "256"], r"--azimuth-steps 256: the LiDAR .* indoor"),
    (["--data", "generated", "--val-data", "b.npy", "--val-scenes", "2"], "--val-scenes 2: --val-data b.npy"),
    (["--data", "generated", "--val-fraction", "0.5"], "--val-fraction 0.5 holds out a share of the --data files; "
                                                       "the generated scenes validate on --val-scenes"),
    (["--data", "a.npy", "--val-data", "b.npy", "--val-fraction", "0.5"], "--val-fraction 0.5 holds out .* "
                                                                           "--val-data b.npy"),
    (["--data", "a.npy", "--val-label-map", "s3dis"], "--val-label-map s3dis maps the raw labels of --val-data; "
                                                      "without --val-data"),
    (["--schedule", "step", "--warmup", "0.1"], "--warmup 0.1 is the warm-up of --schedule cosine; --schedule step "
                                                "has none"),
    (["--schedule", "onecycle", "--warmup", "0"], "--warmup 0.0 is the warm-up of --schedule cosine"),
    (["--resume", "--init", "a.pt"], "--init a.pt: --resume continues its run's weights"),
])
def test_flags_the_run_would_not_read_are_refused(argv, message, tmp_path, monkeypatch):
    """A generated-scene flag with --data files, a LiDAR flag with the indoor
    scenes, --val-scenes or --val-fraction beside the data that validates,
    --val-label-map without --val-data, --warmup with a schedule that has
    none, --init with --resume: each was accepted and never read."""
    def no_work(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(tr, "train", no_work)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message + ".* would be ignored"):
        tr.main(_parse([*argv, "--out", str(out)]))
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--data", "generated", "--val-data", "generated"], "--val-data generated: generated scenes are no "
                                                         "validation files .* --val-scenes N held-out"),
    (["--data", "a.npy", "--val-data", "generated-indoor"], "--val-data generated-indoor: .* give --val-data files"),
])
def test_generated_scenes_as_val_data_are_refused(argv, message, tmp_path, monkeypatch):
    """They were read as 16 scenes from seed 0 on: the training scenes of
    --seed 0 (validation on the training data), whatever --val-scenes said."""
    def no_work(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(tr, "train", no_work)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        tr.main(_parse([*argv, "--out", str(out)]))
    assert not out.exists()


@pytest.mark.parametrize("argv", [
    ["--data", "a.npy", "--val-fraction", "0.3", "--label-map", "s3dis"],
    ["--data", "a.npy", "--val-data", "b.npy", "--val-label-map", "s3dis"],
    ["--data", "generated", "--val-data", "b.npy", "--beams", "32", "--scenes", "3"],
    ["--data", "generated-indoor", "--scenes", "3", "--val-scenes", "2"],
    ["--data", "generated-outdoor", "--beams", "32", "--max-range", "30", "--azimuth-steps", "256"],
    ["--schedule", "cosine", "--warmup", "0.2", "--init", "a.pt"],
    ["--schedule", "step", "--resume"],
])
def test_flags_the_run_reads_are_accepted(argv):
    tr.check_unread_flags(_parse([*argv, "--out", "r"]))


def test_torchrun_processes_are_the_ones_counted(tmp_path, monkeypatch):
    """Under torchrun (WORLD_SIZE > 1) --nproc started nothing and was
    dropped, and the batch was split by torchrun's process count unchecked
    (--batch-size 3 over 2 processes trained 2 scans a step): both refused."""
    def no_work(*args, **kwargs):
        raise AssertionError("training started before the arguments were checked")

    monkeypatch.setattr(tr, "train", no_work)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--nproc 2: torchrun started this process as one of its 2 .* would be "
                                         "ignored"):
        tr.main(_parse([*TINY, "--nproc", "2", "--out", str(out)]))
    with pytest.raises(ValueError, match=r"--batch-size \(3\) must be a multiple of the 2 processes torchrun"):
        tr.main(_parse([*TINY, "--batch-size", "3", "--out", str(out)]))
    assert not out.exists()



@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "1", "RANK": "2"}, r"RANK 2 is no rank of the 1 process\(es\) WORLD_SIZE counts \(0 to 0\)"),
    ({"RANK": "1"}, r"RANK 1 is no rank of the 1 process\(es\) WORLD_SIZE counts"),
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE .* must be an int >= 1; got 'two'"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE .* must be an int >= 1; got '0'"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, r"RANK .* must be an int >= 0; got '-1'"),
    ({"LOCAL_RANK": "x"}, r"LOCAL_RANK .* must be an int >= 0; got 'x'"),
    ({"LOCAL_WORLD_SIZE": "0"}, r"LOCAL_WORLD_SIZE .* must be an int >= 1; got '0'"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "abc"}, r"MASTER_PORT .* must be a port number, 1 to 65535; "
                                                            "got 'abc'"),
    ({"WORLD_SIZE": "2", "RANK": "1", "MASTER_PORT": "70000"}, r"MASTER_PORT .* got '70000'"),
])
def test_a_launch_environment_that_does_not_add_up_is_refused(env, message, tmp_path, monkeypatch):
    """RANK, WORLD_SIZE and the local ones (torchrun's, or a launcher's) were
    read unchecked: a RANK left over beside no WORLD_SIZE (a world of one)
    made the lone process a rank other than 0, which trained every epoch
    and wrote nothing, no checkpoint, log or metrics, exit status 0; a
    WORLD_SIZE of 0 divided by zero when the batch was split, one that is no
    number was int()'s 'invalid literal' naming no variable. Each is a
    ValueError naming the variable, before any work."""
    from pointsparse.app import distributed

    def no_work(*args, **kwargs):
        raise AssertionError("training started before the launch environment was checked")

    monkeypatch.setattr(tr, "train", no_work)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        tr.main(_parse([*TINY, "--out", str(out)]))
    with pytest.raises(ValueError, match=message):
        distributed.init_distributed(_parse([*TINY, "--out", str(out)]))
    assert not out.exists()


def test_a_process_waiting_for_the_others_says_so(tmp_path, monkeypatch, capsys, one_thread):
    """A process of a group whose others never come (WORLD_SIZE=2 and one process started, or a MASTER_ADDR no
    process listens at) waited out torch's 30 minutes saying nothing. After WAIT_NOTE_S it says what it waits for
    and what to check; a group formed sooner says nothing."""
    from pointsparse.app import distributed

    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "10.9.9.9", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    for name in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "WAIT_NOTE_S", 0.05)
    for wait, said in ((0.5, True), (0.0, False)):
        monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, wait=wait, **k: time.sleep(wait))
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
        distributed.init_distributed(_parse([*TINY, "--threads", "1", "--out", str(tmp_path / "run")]))
        time.sleep(0.1)
        err = capsys.readouterr().err
        assert ("process 1 of 2: still waiting for the others at 10.9.9.9:29555 after 0.05 s (torch gives up after "
                "30 minutes): check that every process started, with the same WORLD_SIZE, MASTER_ADDR and "
                "MASTER_PORT" in err) == said, err


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flags, saved, expect", [
    ([], 7, 7),  # default: the checkpoint's ignore index
    ([], None, 255),  # default, checkpoint without one: 255
    (["--ignore-index", "255"], 7, 255),  # an explicit 255 wins over the checkpoint's
    (["--ignore-index", "3"], 7, 3),
])
def test_eval_ignore_index_default_and_explicit(flags, saved, expect, tmp_path, monkeypatch):
    from pointsparse.data import NUM_FEATURES, OUTDOOR_CLASSES

    config = {"in_channels": NUM_FEATURES, "classes": list(OUTDOOR_CLASSES), "cr": 0.125, "blocks": 1,
              "voxel_size": 0.5, "model": "minkunet"}
    if saved is not None:
        config["ignore_index"] = saved
    state = {"model": tr.build_model(config).state_dict(), "config": config,
             "args": {"data": ["generated"], "val_scenes": 1, "beams": 16, "azimuth_steps": 192, "max_range": 16.0}}
    tr.save_checkpoint(tmp_path / "c.pt", state)
    used = []

    def fake_evaluate(model, dataset, num_classes, ignore_index, *args, **kwargs):
        used.append((ignore_index, dataset.ignore_index))
        raise _Stop

    monkeypatch.setattr(evaluate, "evaluate", fake_evaluate)
    with pytest.raises(_Stop):
        cli.main(["eval", "--checkpoint", str(tmp_path / "c.pt"), "--no-progress", *flags])
    assert used == [(expect, expect)]


def _generated_checkpoint(path):
    """A tiny untrained MinkUNet checkpoint of a run on generated scenes (its sensor kept small)."""
    from pointsparse.data import NUM_FEATURES, OUTDOOR_CLASSES

    config = {"in_channels": NUM_FEATURES, "classes": list(OUTDOOR_CLASSES), "cr": 0.125, "blocks": 1,
              "voxel_size": 0.5, "model": "minkunet"}
    state = {"model": tr.build_model(config).state_dict(), "config": config,
             "args": {"data": ["generated"], "val_scenes": 1, "beams": 16, "azimuth_steps": 192, "max_range": 16.0}}
    tr.save_checkpoint(path, state)
    return path


def test_eval_notes_an_ignore_index_that_is_a_class(tmp_path, monkeypatch, capsys):
    """``eval --ignore-index 0`` on files read through semantic-kitti-learning (read as "raw 0 is unlabeled",
    which the map already ignores) scored every point but the cars, without a word (train notes the same
    flag); eval now notes the class the ignore index drops from its metrics, for a label map's classes and
    the generated scenes'. The default 255, and raw labels without a map: no note."""
    from pointsparse.data import NUM_FEATURES
    from pointsparse.data.readers import load_label_map

    classes = load_label_map("semantic-kitti-learning").classes
    config = {"in_channels": NUM_FEATURES, "classes": classes, "cr": 0.125, "blocks": 1, "voxel_size": 0.5,
              "model": "minkunet"}
    tr.save_checkpoint(tmp_path / "k.pt", {"model": tr.build_model(config).state_dict(), "config": config,
                                            "args": {"label_map": "semantic-kitti-learning"}})
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", xyz=rng.uniform(0, 8, (300, 3)).astype(np.float32),
             labels=rng.integers(1, 20, 300))
    monkeypatch.setattr(evaluate, "evaluate", lambda *args, **kwargs: (_ for _ in ()).throw(_Stop()))
    cases = [(["--checkpoint", str(tmp_path / "k.pt"), "--data", str(tmp_path / "a.npz"), "--ignore-index", "0"],
              "note: --ignore-index 0 is the class 'car' of the label map"),
             (["--checkpoint", str(_generated_checkpoint(tmp_path / "g.pt")), "--ignore-index", "3"],
              "note: --ignore-index 3 is the class 'building' of the generated scenes"),
             (["--checkpoint", str(tmp_path / "k.pt"), "--data", str(tmp_path / "a.npz")], None),
             (["--checkpoint", str(tmp_path / "g.pt")], None)]
    for flags, note in cases:
        with pytest.raises(_Stop):
            cli.main(["eval", *flags, "--no-progress", "--device", "cpu"])
        err = capsys.readouterr().err
        assert (note in err and "count nowhere in the metrics" in err) if note else "--ignore-index" not in err


def test_eval_refuses_a_label_map_for_the_runs_generated_scenes(tmp_path, capsys):
    """eval without --data scores the run's data; where those are the generated
    scenes, --label-map (which maps files' raw labels) was never read: refused,
    exit 2, before --out is made (with --data generated, check_args refused it)."""
    ckpt = _generated_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "ev"
    for flags in (["--checkpoint", str(ckpt)], ["--checkpoint", str(ckpt), "--data", "generated"]):
        assert cli.main(["eval", *flags, "--label-map", "semantic-kitti", "--out", str(out), "--no-progress"]) == 2
        assert "--label-map maps the raw labels of point cloud files" in capsys.readouterr().err
    assert not out.exists()
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--out", str(out), "--no-progress"]) == 0


def test_a_batch_that_thins_out_to_one_voxel_names_the_flags(tmp_path, capsys):
    """A voxel size large for the clouds (or a small batch) leaves one voxel
    at the U-Net's coarsest stride, where batch norm has no statistics in
    training: the error names --voxel-size and --batch-size and the clouds,
    where torch's 'Expected more than 1 value per channel when training'
    came out."""
    argv = [*_without(_without(TINY, "--voxel-size"), "--batch-size"), "--voxel-size", "8", "--batch-size", "1",
            "--epochs", "1", "--out", str(tmp_path / "run")]
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert "pointsparse train: error: " in err and "Expected more than 1 value" not in err
    assert "1 site at stride" in err and "--voxel-size 8" in err and "--batch-size 1" in err, err
    assert "generated" in err  # (the batch's clouds)


@pytest.mark.parametrize("label", [2**40, 5000])
def test_raw_labels_past_any_class_count_need_a_label_map(label, tmp_path):
    """Without --label-map the raw labels are the classes (0 to the largest):
    a stray label of 2**40 built a list of 2**40 class names (a MemoryError
    or a machine out of memory), 5000 a 5001-class model; a ValueError
    names the file, the label and --label-map before any model is built."""
    rng = np.random.default_rng(0)
    for i in range(3):
        labels = rng.integers(0, 3, 300)
        labels[7] = label if i == 1 else labels[7]
        np.savez(tmp_path / f"c{i}.npz", points=rng.uniform(0, 6, (300, 3)).astype(np.float32), labels=labels)
    args = _parse(["--data", str(tmp_path / "c*.npz"), "--epochs", "1", "--cr", "0.125", "--blocks", "1",
                   "--voxel-size", "0.5", "--no-progress", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=rf"c1\.npz: raw label {label}.*--label-map"):
        tr.train(args)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_unlabelled_clouds_are_a_value_error(tmp_path):
    pts = np.random.default_rng(0).random((200, 3)).astype(np.float32) * 5
    np.save(tmp_path / "a.npy", pts)
    np.save(tmp_path / "b.npy", pts + 1)
    with pytest.raises(ValueError, match="no labels"):
        tr.main(_parse(["--data", str(tmp_path / "a.npy"), "--val-data", str(tmp_path / "b.npy"),
                        "--no-progress", "--out", str(tmp_path / "run")]))
    with pytest.raises(ValueError, match="--val-data.*no labels"):
        tr.main(_parse([*_without(TINY, "--val-scenes"), "--val-data", str(tmp_path / "b.npy"),
                        "--out", str(tmp_path / "run2")]))


def test_metrics_hand_computed():
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 0])
    target = torch.tensor([0, 1, 1, 1, 2, 9, 9])
    cm = metrics.confusion_matrix(pred, target, 3, ignore_index=9)
    assert cm.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    iou = metrics.iou_per_class(cm)
    assert np.allclose(iou, [1 / 2, 2 / 3, 1.0])
    assert math.isclose(metrics.mean_iou(cm), (1 / 2 + 2 / 3 + 1) / 3)
    assert math.isclose(metrics.accuracy(cm), 4 / 5)
    # A class never true is left out of the mean; never seen at all -> None.
    cm2 = metrics.confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 0]), 3)
    assert math.isclose(metrics.mean_iou(cm2), 0.5)
    s = metrics.summary(cm2, ["a", "b", "c"])
    assert s["per_class"] == {"a": 0.5, "b": None, "c": 0.0}
    assert "mIoU" in metrics.format_table(cm, ["a", "b", "c"])
    assert math.isnan(metrics.mean_iou(np.zeros((2, 2))))
    with pytest.raises(ValueError, match="target labels"):
        metrics.confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)
    with pytest.raises(ValueError, match="same length"):
        metrics.confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 3)


def test_metrics_json_says_which_classes_the_miou_averages_and_holds_no_nan(tmp_path):
    """A metrics review: per_class held an IoU of 0 for a class only
    predicted, which the mIoU leaves out, with no sign of it (the mean of
    the non-null per_class values was another number); a confusion matrix
    with nothing scored gave ``"miou": NaN``, which strict JSON readers
    refuse. ``miou_classes`` names the classes averaged; NaN is None."""
    import json

    from pointsparse.app import plots, scoring

    cm = metrics.confusion_matrix(np.array([0, 1, 3, 2]), np.array([0, 1, 2, 2]), 4)
    s = metrics.summary(cm, ["c0", "c1", "c2", "c3"])
    assert s["per_class"] == {"c0": 1.0, "c1": 1.0, "c2": 0.5, "c3": 0.0}
    assert s["miou_classes"] == ["c0", "c1", "c2"]
    assert math.isclose(s["miou"], np.mean([s["per_class"][c] for c in s["miou_classes"]]))
    empty = metrics.summary(np.zeros((2, 2), dtype=np.int64), ["a", "b"])
    assert (empty["miou"], empty["accuracy"], empty["miou_classes"]) == (None, None, [])
    json.loads(json.dumps(empty, allow_nan=False))
    assert metrics.percent(None) == "n/a (no point scored)" and metrics.percent(0.615) == "61.5%"
    report = scoring.write_report(tmp_path, np.zeros((2, 2), dtype=np.int64), ["a", "b"], None, None, {}, 255)
    assert report["miou"] is None
    json.loads((tmp_path / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_topdown_paints_the_points_not_scored_in_a_colour_no_class_has_and_names_it():
    """A plots review: ignored points were grey (0.6), as tab10's class 7
    (a car in the demo) and tab20's classes 14 and 15 nearly are, and the
    legend did not name them. They are black now, a colour no class has,
    named "not scored" in the legend where the cloud has such points."""
    from pointsparse.app import plots

    for n in (3, 10, 19, 20):
        colours = plots.class_colours(n)
        assert tuple(colours[n]) == plots.IGNORED_COLOUR
        assert np.abs(colours[:n] - colours[n]).max(axis=1).min() > 0.2  # (tab's darkest: 0.09, 0.75, 0.81)
    painted = plots.colour_indices(np.array([0, 255, 1]), np.array([0, 1, 7]), 3, 255)
    assert [v.tolist() for v in painted] == [[0, 3, 1], [0, 3, 3]]


def test_confusion_matrix_refuses_shapes_that_only_share_a_count():
    """pred and target were flattened before their shapes were compared, so a
    (2, 3) prediction scored against a (3, 2) target (a transposed batch) was
    counted pair by pair in the wrong order without a word."""
    pred = torch.tensor([[0, 1, 2], [0, 1, 2]])
    with pytest.raises(ValueError, match=r"pred and target must have the same shape \(dims of 1 aside\); got "
                                         r"\(2, 3\) and \(3, 2\)"):
        metrics.confusion_matrix(pred, pred.reshape(3, 2), 3)
    # dims of one line up the same values: (N, 1) against (N,), a 0-d id against one of [x], as before
    column = torch.tensor([[0], [1], [2]])
    assert metrics.confusion_matrix(column, column.flatten(), 3).trace() == 3
    assert metrics.confusion_matrix(torch.tensor(2), [2], 3)[2, 2] == 1
    assert metrics.confusion_matrix(pred, pred, 3).trace() == 6


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_iou_metrics_refuse_a_matrix_that_holds_no_counts(bad):
    """iou_per_class, mean_iou, accuracy and summary took any numbers: a
    negative count gave an IoU of 2.0 and NaN passed through as a score."""
    cm = np.array([[2.0, 0.0], [1.0, 3.0]])
    cm[0, 1] = bad
    for fn in (metrics.iou_per_class, metrics.mean_iou, metrics.accuracy):
        with pytest.raises(ValueError, match="the confusion matrix must hold counts"):
            fn(cm)
    with pytest.raises(ValueError, match="the confusion matrix must hold counts"):
        metrics.summary(cm, ["a", "b"])
    assert metrics.mean_iou(np.array([[2.0, 0.0], [1.0, 3.0]])) == pytest.approx((2 / 3 + 3 / 4) / 2)


def test_metrics_refuse_a_matrix_and_names_that_do_not_match():
    """summary and format_table zipped the classes with the matrix's rows: a
    class list one short dropped a class from per_class and the table while
    the mIoU counted it; a matrix not square failed with numpy's broadcast
    error, and a class count not a positive int with torch's."""
    cm = metrics.confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), 3)
    for fn in (metrics.summary, metrics.format_table):
        with pytest.raises(ValueError, match=r"classes: 2 names for the 3 classes of the \(3, 3\) confusion matrix"):
            fn(cm, ["a", "b"])
    for fn in (metrics.iou_per_class, metrics.mean_iou, metrics.accuracy):
        with pytest.raises(ValueError, match=r"confusion matrix must be square \(C, C\); got shape \(2, 3\)"):
            fn(np.ones((2, 3)))
    for bad in (0, -1, 3.0, True):
        with pytest.raises(ValueError, match=f"num_classes must be an int >= 1; got {bad!r}"):
            metrics.confusion_matrix(torch.tensor([0]), torch.tensor([0]), bad)
    assert metrics.confusion_matrix(torch.tensor([0]), torch.tensor([0]), np.int64(2)).shape == (2, 2)



def test_metrics_take_class_names_from_a_one_pass_iterable():
    """summary and format_table read the class names twice: once to count
    them against the matrix, once to name its rows. A generator or map of
    names (``map(str, range(C))``) passed the count and was then empty:
    per_class and points came back {} and the table had no class rows,
    without a word."""
    cm = metrics.confusion_matrix(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 1]), 3)
    names = ["a", "b", "c"]
    assert metrics.summary(cm, iter(names)) == metrics.summary(cm, names)
    assert metrics.format_table(cm, (n for n in names)) == metrics.format_table(cm, names)
    assert metrics.summary(cm, map(str, range(3)))["points"] == {"0": 1, "1": 2, "2": 0}

def test_confusion_matrix_refuses_what_is_no_class_index():
    """confusion_matrix cast pred and target with .long(): probabilities or
    max-logit values (0.7, 1.9) were truncated to classes 0 and 1 and
    scored without a word; an ignore_index past int64 and a num_classes
    whose matrix cannot be allocated were torch's overflow messages,
    naming nothing."""
    good = torch.tensor([0, 1, 1])
    for name, args in (("pred", (torch.tensor([0.7, 1.9, 1.0]), good)),
                       ("target", (good, np.array([0.0, 1.5, 1.0])))):
        with pytest.raises(ValueError, match=f"{name} must hold integer class indices"):
            metrics.confusion_matrix(*args, 3)
    with pytest.raises(TypeError, match="target must hold integer class indices"):
        metrics.confusion_matrix(good, good.to(torch.complex64), 3)
    # class ids stored as whole floats (as the readers take them from files) are those classes
    assert np.array_equal(metrics.confusion_matrix(good.double(), np.array([0.0, 1.0, 1.0], np.float32), 3),
                          metrics.confusion_matrix(good, good, 3))
    for bad in (2**70, 1.5, True, "255"):
        with pytest.raises((TypeError, ValueError), match="ignore_index must be"):
            metrics.confusion_matrix(good, good, 3, ignore_index=bad)
    with pytest.raises(ValueError, match="num_classes must be at most"):
        metrics.confusion_matrix(good, good, 2**40)
    # integer kinds and bools still count as classes
    want = metrics.confusion_matrix(good, good, 3)
    assert np.array_equal(metrics.confusion_matrix(good.int(), good.numpy().astype(np.uint8), 3), want)
    assert np.array_equal(metrics.confusion_matrix(good.bool(), good.bool(), 3, ignore_index=np.int64(-100)),
                          metrics.confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 1]), 3))


def test_confusion_matrix_names_pred_or_target_that_hold_no_numbers():
    """Class indices that are no numbers failed with torch's words, naming
    neither argument ("too many dimensions 'str'", a RuntimeError "Could not
    infer dtype of NoneType", NotImplementedError for a meta tensor), and
    uint64 targets past int64 wrapped round to negative ids: 2**64 - 100
    was scored as ignore_index -100, skipped without a word. A ragged list
    (no shape at all) is named too, not numpy's "inhomogeneous shape"."""
    good = [0, 1, 1]
    for bad in (["a", "b", "c"], [None, 0, 1], np.array(["0", "1", "1"]), np.array([0, 1, None], object),
                torch.empty(3, dtype=torch.long, device="meta"), [[0, 1], [1]]):
        for name, args in (("pred", (bad, good)), ("target", (good, bad))):
            with pytest.raises(TypeError, match=f"{name} must hold integer class indices"):
                metrics.confusion_matrix(*args, 3)
    wide = np.array([2**64 - 100, 1, 1], np.uint64)
    for name, args in (("pred", (wide, good)), ("target", (good, wide))):
        with pytest.raises(ValueError, match=f"{name} must hold class indices that fit int64; got {2**64 - 100}"):
            metrics.confusion_matrix(*args, 3, ignore_index=-100)
    # uint64 within int64 still count as classes
    assert np.array_equal(metrics.confusion_matrix(np.array(good, np.uint64), np.array(good, np.uint64), 3),
                          metrics.confusion_matrix(good, good, 3))


@pytest.mark.parametrize("schedule", tr.SCHEDULES)
def test_lr_schedules(schedule):
    f = [tr.lr_factor(schedule, s, 100, 0.1) for s in range(100)]
    assert all(0 < v <= 1 for v in f)
    if schedule == "constant":
        assert set(f) == {1.0}
    else:
        assert f[-1] < 0.05 and max(f) > 0.9
    if schedule == "cosine":
        assert f[0] < f[9] and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_history_lr_is_the_rate_each_step_ran_at(tmp_path):
    """history["lr"][i] (metrics.json, checkpoints) is the learning rate step i
    ran at; it was read after the scheduler's step, so the list was one step
    ahead: the first step's rate missing, the last a rate no step used."""
    used = []
    orig = tr.TrainingJob.loss

    def loss(job, net, batch):
        used.append(job.optimizer.param_groups[0]["lr"])
        return orig(job, net, batch)

    argv = [*_without(TINY, "--batch-size"), "--batch-size", "1", "--epochs", "2", "--schedule", "cosine",
            "--warmup", "0.5", "--out", str(tmp_path / "run")]
    try:
        tr.TrainingJob.loss = loss
        report = tr.train(_parse(argv))
    finally:
        tr.TrainingJob.loss = orig
    steps = len(report["history"]["step_loss"])
    assert steps == 4 and len(used) == steps
    expect = [2e-3 * tr.lr_factor("cosine", s, steps, 0.5) for s in range(steps)]
    assert np.allclose(used, expect, rtol=1e-12)
    assert report["history"]["lr"] == used


def test_the_first_step_after_a_new_plan_runs_at_the_new_plans_rate(tmp_path):
    """A run resumed with a larger --epochs (README: it extends the run; the
    schedule follows the planned count) ran its first resumed step at the rate
    the old plan set after its last step (its floor, 1% of --lr, under cosine),
    then jumped to the new plan's; --time-budget re-plans likewise after every
    epoch. Every step after a new plan runs at that plan's rate."""
    out = tmp_path / "run"
    flags = [*_without(TINY, "--batch-size"), "--batch-size", "1", "--schedule", "cosine", "--warmup", "0",
             "--out", str(out)]
    tr.main(_parse([*flags, "--epochs", "2"]))
    tr.main(_parse([*flags, "--epochs", "4", "--resume"]))
    lr = tr.load_checkpoint(out / "checkpoint.pt")["history"]["lr"]
    assert len(lr) == 8
    assert np.allclose(lr[:4], [2e-3 * tr.lr_factor("cosine", s, 4, 0) for s in range(4)], rtol=1e-12)
    assert np.allclose(lr[4:], [2e-3 * tr.lr_factor("cosine", s, 8, 0) for s in range(4, 8)], rtol=1e-12)


def test_class_weights_hand_computed():
    from pointsparse.data import Sample

    src = [Sample(np.zeros((5, 3)), np.array([0, 0, 0, 1, 9])), Sample(np.zeros((1, 3)), np.array([0]))]
    w = tr.class_weights(src, 3, ignore_index=9)
    raw = np.array([1 / np.sqrt(4 / 5), 1 / np.sqrt(1 / 5)])
    assert np.allclose(w[:2].numpy(), raw / raw.mean()) and w[2] == 0


def test_spvcnn_training_run(tmp_path):
    out = tmp_path / "spv"
    report = tr.train(_parse([*TINY, "--model", "spvcnn", "--class-weights", "sqrt-inverse", "--epochs", "1",
                              "--out", str(out)]))
    assert report["config"]["model"] == "spvcnn" and 0 <= report["miou"] <= 1
    assert cli.main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--no-progress"]) == 0


@pytest.mark.parametrize("flag", ["--threads", "--batch-size"])
def test_eval_checks_its_flags_before_reading_anything(flag, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--checkpoint", str(tmp_path / "missing.pt"), flag, "0"])
    with pytest.raises(ValueError, match=f"{flag} must be >= 1; got 0"):
        evaluate.main(args)


@pytest.mark.parametrize("prefix", ["", "eval-"])
def test_write_report_writes_the_files_report_files_names(tmp_path, prefix):
    """scoring.REPORT_FILES names what write_report writes (train's --out
    checks and a new run's removal of another run's report take it, through
    train.OUTPUTS): a report with curves, confusion and top-down writes those
    files, behind the prefix, and nothing else."""
    from pointsparse.app import plots, scoring

    if not plots.available():
        pytest.skip("matplotlib is not importable")
    rng = np.random.default_rng(0)
    first = (rng.random((50, 3)).astype(np.float32), rng.integers(0, 3, 50), rng.integers(0, 3, 50), None)
    history = {"step_loss": [1.0, 0.5], "epoch_loss": [0.7], "val_miou": [0.4]}
    scoring.write_report(tmp_path, np.eye(3, dtype=np.int64) * 4, ["a", "b", "c"], first, history, {}, -100, prefix)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(prefix + name for name in scoring.REPORT_FILES)
    assert {name for name in tr.OUTPUTS} == {tr.CHECKPOINT, tr.BEST, *scoring.REPORT_FILES}


def test_pictures_are_written_atomically(tmp_path, monkeypatch):
    """eval's PNGs (curves, confusion, top-down): a write that fails half-way
    (here the figure's savefig writes half a picture, then raises) leaves the
    earlier picture whole and no stray file (they were written in place: a
    truncated PNG over a good one)."""
    import matplotlib.figure

    from pointsparse.app import plots

    rng = np.random.default_rng(0)
    xyz = rng.random((200, 3)).astype(np.float32)
    labels, pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    draw = {"curves": lambda p: plots.curves({"step_loss": [1.0, 0.5, 0.3], "epoch_loss": [0.6],
                                              "val_miou": [0.4]}, p),
            "confusion": lambda p: plots.confusion(np.eye(3) * 5, ["a", "b", "c"], p),
            "topdown": lambda p: plots.topdown(xyz, labels, pred, ["a", "b", "c"], p)}
    good = {name: draw[name](tmp_path / f"{name}.png").read_bytes() for name in draw}
    real = matplotlib.figure.Figure.savefig

    def half_then_fail(self, fname, **kwargs):
        import io

        buffer = io.BytesIO()
        real(self, buffer, **{**kwargs, "format": "png"})
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if hasattr(fname, "write"):
            fname.write(data)
        else:
            with open(fname, "wb") as f:
                f.write(data)
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_then_fail)
    for name in draw:
        with pytest.raises(OSError, match="No space"):
            draw[name](tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes() == good[name], name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.png" for name in draw)


def test_topdown_greys_the_points_whose_label_is_ignored(tmp_path, monkeypatch):
    """The top-down picture greys the points whose LABEL is ignore_index, in
    both panels; a prediction of the class numbered ignore_index (ignore
    index 0 with a class 0) is painted in that class's colour (it was grey:
    the predictions were compared with ignore_index themselves)."""
    import matplotlib.axes

    from pointsparse.app import plots

    labels = np.array([0, 1, 2, 1, 0, 7])
    pred = np.array([0, 0, 2, 1, 1, 2])
    shown_labels, shown_pred = plots.colour_indices(labels, pred, 3, ignore_index=0)
    grey = 3
    assert shown_labels.tolist() == [grey, 1, 2, 1, grey, grey]  # ignored, and 7 past the classes
    assert shown_pred.tolist() == [grey, 0, 2, 1, grey, 2]  # row 1: class 0 predicted where 1 is labelled
    shown_labels, shown_pred = plots.colour_indices(labels, pred, 3)  # ignore_index 255: no class
    assert shown_labels.tolist() == [0, 1, 2, 1, 0, grey] and shown_pred.tolist() == pred.tolist()

    painted = []
    real = matplotlib.axes.Axes.scatter

    def record(self, x, y, c=None, **kwargs):
        painted.append(np.asarray(c))
        return real(self, x, y, c=c, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", record)
    xyz = np.stack([np.arange(6.0), np.arange(6.0) % 2, np.arange(6.0)], 1)  # z increasing: drawn in this order
    plots.topdown(xyz, labels, pred, ["a", "b", "c"], tmp_path / "t.png", ignore_index=0)
    colours = plots.class_colours(3)
    assert np.allclose(painted[0], colours[[grey, 1, 2, 1, grey, grey]])
    assert np.allclose(painted[1], colours[[grey, 0, 2, 1, grey, 2]])


def test_resume_takes_the_runs_threads(tmp_path):
    """A run of --threads 1 resumed without --threads trained on torch's
    default threads: its BatchNorm and loss reductions summed in another
    order, other bits than the run left alone. A resume takes the run's
    --threads where neither --threads nor --nproc is typed; typed, they win."""
    cut = tmp_path / "cut"
    tr.main(_parse([*TINY, "--epochs", "2", "--threads", "1", "--time-limit", "0", "--out", str(cut)]))
    args = _parse([*TINY, "--epochs", "2", "--resume", "--out", str(cut)])
    assert args.threads is None
    tr.take_run_flags(args)
    assert args.threads == 1
    args = _parse([*TINY, "--epochs", "2", "--threads", "2", "--resume", "--out", str(cut)])
    tr.take_run_flags(args)
    assert args.threads == 2
    args = _parse([*TINY, "--epochs", "2", "--nproc", "1", "--resume", "--out", str(cut)])
    tr.take_run_flags(args)
    assert args.threads is None


def test_the_table_marks_classes_left_out_of_the_miou():
    """A class only predicted (no ground-truth point) shows IoU 0.0 in the
    table while mean_iou leaves it out: the rows' mean (17.7) and the mIoU
    line (26.5) disagreed without a word. Such rows are marked, with a note."""
    cm = np.array([[8, 2, 0], [1, 5, 3], [0, 0, 0]])
    text = metrics.format_table(cm, ["a", "b", "c"])
    rows = text.splitlines()
    assert rows[3].startswith("c") and rows[3].endswith("0 *") and "0.0" in rows[3]
    assert rows[-1].startswith("* predicted but not in the ground truth: left out of the mIoU")
    assert "*" not in metrics.format_table(cm[:2, :2], ["a", "b"])


def test_figures_axes_read_as_their_titles_say(monkeypatch):
    """The curves put ticks at fractional epochs (1.25, 1.5) and wrote the
    loss axis as 2 x 10^0, 6 x 10^-1; the confusion matrix's title said "%"
    over a colour bar from 0 to 1. Epochs are whole ticks, losses plain
    numbers, the colour bar runs 0..100 (%)."""
    pytest.importorskip("matplotlib")
    from pointsparse.app import plots

    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig))
    history = {"step_loss": list(np.geomspace(2.5, 0.2, 30)), "epoch_loss": list(np.geomspace(2.0, 0.25, 3)),
               "val_miou": [0.2, 0.35, 0.6], "val_epoch": [1, 2, 3]}
    plots.curves(history, "unused.png")
    plots.confusion(np.array([[8, 2], [1, 9]]), ["a", "b"], "unused.png")
    loss_ax, miou_ax = figs[0].axes
    figs[0].canvas.draw()
    epochs = [t for t in miou_ax.get_xticks() if miou_ax.get_xlim()[0] <= t <= miou_ax.get_xlim()[1]]
    assert epochs and all(float(t).is_integer() for t in epochs)
    shown = [t.get_text() for t in loss_ax.get_yticklabels() + loss_ax.get_yticklabels(minor=True) if t.get_text()]
    assert shown and all(re.fullmatch(r"[0-9]+(\.[0-9]+)?", s) for s in shown), shown
    image = figs[1].axes[0].images[0]
    assert image.get_clim() == (0, 100)
    assert image.get_array().max() == pytest.approx(90.0)


def test_curves_of_a_single_epoch_run_tick_whole_epochs_and_steps(monkeypatch):
    """A run of --epochs 1 (one validation) drew its mIoU at epoch 1 on an
    axis ticked 0.945, 0.96, ..., 1.05, and a one-step run its loss on steps
    0.96 .. 1.04: matplotlib's integer locator falls back to fractions where
    the view holds fewer than two whole numbers. One epoch or step is one
    whole tick."""
    pytest.importorskip("matplotlib")
    from pointsparse.app import plots

    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig))
    for steps in (1, 3):
        plots.curves({"step_loss": [2.0, 1.5, 1.2][:steps], "epoch_loss": [1.5], "val_miou": [0.2],
                      "val_epoch": [1]}, "unused.png")
    for fig, steps in zip(figs, (1, 3)):
        fig.canvas.draw()
        for ax, want in zip(fig.axes, ([1.0] if steps == 1 else None, [1.0])):
            low, high = ax.get_xlim()
            ticks = [float(t) for t in ax.get_xticks() if low <= t <= high]
            assert ticks and all(t.is_integer() for t in ticks), (steps, ax.get_title(), ticks)
            if want is not None:
                assert ticks == want, (steps, ax.get_title(), ticks)


def test_init_from_reads_a_pruned_or_voxel_skipped_checkpoints_weights():
    """--init from a checkpoint of a pruned model (weights stored as
    weight_orig and weight_mask) or one with a VoxelSkip (the wrapped
    layer's weights under '.module.') copied none of those layers into the
    fresh model, silently: only the log's count was lower. The pruned
    weights (orig * mask) and the wrapped layers' weights are copied by
    their layer's name now, and what the model has no place for is named."""
    import pointsparse.prune as prune
    from pointsparse.models import add_voxel_skip

    torch.manual_seed(0)
    src = MinkUNet(7, 3, cr=0.125, blocks=1)
    prune.l1_unstructured(src.stem[0][0], "weight", amount=0.5)
    add_voxel_skip(src, "fuse.3", keep_ratio=0.5)
    own_src = src.state_dict()
    assert "stem.0.0.weight_orig" in own_src and any(".module." in k for k in own_src)
    dst = MinkUNet(7, 3, cr=0.125, blocks=1)
    unused = []
    copied = tr.init_from(dst, {"model": own_src, "config": {"classes": ["a", "b", "c"]}}, ["a", "b", "c"],
                          unused=unused)
    assert unused == []
    state = dst.state_dict()
    want = own_src["stem.0.0.weight_orig"] * own_src["stem.0.0.weight_mask"]
    assert torch.equal(dst.stem[0][0].weight, want) and "stem.0.0.weight" in copied  # (its mask too: the test below)
    wrapped = [k for k in own_src if ".module." in k and not k.endswith("num_batches_tracked")]
    for key in wrapped:
        plain = key.replace(".module.", ".", 1)
        assert torch.equal(state[plain], own_src[key]), key
    # what the model has no place for is reported, not dropped silently
    other = MinkUNet(7, 3, cr=0.25, blocks=1)  # (wider: no tensor of the source fits but the norms' counters)
    tr.init_from(other, {"model": own_src, "config": {"classes": ["a", "b", "c"]}}, ["a", "b", "c"], unused=unused)
    assert "stem.0.0.weight_orig" in unused


def test_init_from_a_channel_pruned_checkpoint_builds_its_widths(tmp_path, capsys):
    """train --init from a channel-pruned checkpoint (prune channels) built a
    full-width model of the flags' --cr / --blocks: none of its narrowed
    tensors fitted, one log line said so, and the run trained from scratch
    (its first epoch's loss and mIoU a fresh run's). The run now builds the
    checkpoint's architecture (its model, --cr and --blocks where not typed,
    its channel widths, the classifier's outputs this run's classes), every
    tensor copied; its checkpoints record the widths, so eval and --resume
    read them. A typed --cr of another value still builds what it says, and
    the log says so."""
    from pointsparse.app import cli as app_cli
    from pointsparse.models import load_model
    from pointsparse.prune.graph import widths

    run, cut = tmp_path / "run", tmp_path / "cut"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    assert app_cli.main(["prune", "channels", "--checkpoint", str(run / "checkpoint.pt"), "--ratio", "0.5",
                         "--out", str(cut)]) == 0
    capsys.readouterr()
    pruned = load_model(cut / "checkpoint.pt")
    untyped = [a for i, a in enumerate(TINY) if a not in ("--cr", "--blocks") and TINY[i - 1] not in ("--cr", "--blocks")]
    assert len(untyped) == len(TINY) - 4
    tr.main(_parse([*untyped, "--epochs", "1", "--lr", "1e-12", "--init", str(cut / "checkpoint.pt"), "--out",
                    str(tmp_path / "fine")]))
    log = capsys.readouterr().out
    assert re.search(r"--init .*checkpoint.pt: building its minkunet \(cr 0.125, blocks 1\) with its channel widths "
                     r"\(\d+ layers narrowed\)", log), log
    assert "fit no tensor" not in log, log
    state = tr.load_checkpoint(tmp_path / "fine" / "checkpoint.pt")
    assert (state["config"]["cr"], state["config"]["blocks"]) == (0.125, 1)
    fine = load_model(tmp_path / "fine" / "checkpoint.pt")
    assert widths(fine) == widths(pruned)
    assert sum(p.numel() for p in fine.parameters()) == sum(p.numel() for p in pruned.parameters())
    # a learning rate of 1e-12: the weights are still the pruned model's (BatchNorm statistics aside)
    ours, theirs = fine.state_dict(), pruned.state_dict()
    for key in theirs:
        if "running_" not in key and "num_batches" not in key:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-8, msg=key)
    # a typed --cr of another value builds what it says
    tr.main(_parse([*TINY[:13], "0.25", *TINY[14:], "--epochs", "1", "--init", str(cut / "checkpoint.pt"), "--out",
                    str(tmp_path / "wide")]))
    log = capsys.readouterr().out
    assert "--init" in log and "the run builds what was typed, --cr 0.25 (its 0.125)" in log, log
    # a checkpoint of VoxelSkip layers and no channel cut: its voxel layers, no widths (its wrapped layers' names
    # counted as narrowed ones)
    skipped = tmp_path / "skipped"
    assert app_cli.main(["prune", "voxels", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(skipped)]) == 0
    capsys.readouterr()
    tr.main(_parse([*untyped, "--epochs", "1", "--init", str(skipped / "checkpoint.pt"), "--out",
                    str(tmp_path / "fine-skipped")]))
    log = capsys.readouterr().out
    assert re.search(r"building its minkunet \(cr 0.125, blocks 1\) with its voxel_skip layers\n", log), log
    assert "widths" not in tr.load_checkpoint(tmp_path / "fine-skipped" / "checkpoint.pt")["config"]


def test_init_from_a_pruned_checkpoint_keeps_its_masks():
    """--init from a checkpoint whose weights are masked (prune vectors,
    offsets, schedule, init, rigl: weight_orig + weight_mask) copied the
    masked values into a dense model, whose training then regrew every
    pruned weight (a rigl checkpoint at 0.9 was at 0.45 after one epoch).
    The fresh model takes the masks too (as torch.nn.utils.prune stores
    them, so that its checkpoints keep them): the classifier's rows of the
    classes it shares with the checkpoint, by name, a new class's row
    dense."""
    import pointsparse.prune as prune

    torch.manual_seed(0)
    src = MinkUNet(7, 3, cr=0.125, blocks=1)
    prune.l1_unstructured(src.stem[0][0], "weight", amount=0.5)
    prune.l1_unstructured(src.classifier.fn, "weight", amount=0.5)
    own_src = src.state_dict()
    dst = MinkUNet(7, 4, cr=0.125, blocks=1)
    tr.init_from(dst, {"model": own_src, "config": {"classes": ["road", "car", "pole"]}},
                 ["car", "bus", "road", "tree"])
    conv, head = dst.stem[0][0], dst.classifier.fn
    assert torch.equal(conv.weight_mask, own_src["stem.0.0.weight_mask"])
    assert torch.equal(conv.weight, own_src["stem.0.0.weight_orig"] * own_src["stem.0.0.weight_mask"])
    mask = own_src["classifier.fn.weight_mask"]
    assert torch.equal(head.weight_mask[0], mask[1]) and torch.equal(head.weight_mask[2], mask[0])
    assert bool(head.weight_mask[1].all()) and bool(head.weight_mask[3].all())
    assert torch.equal(head.weight[0], (own_src["classifier.fn.weight_orig"] * mask)[1])
    assert not hasattr(dst.stem[1][0], "weight_mask")  # (a layer stored unmasked stays so)
    params = dict(dst.named_parameters())  # (trained through weight_orig: the forward applies the mask)
    assert "stem.0.0.weight_orig" in params and "stem.0.0.weight" not in params
    assert "stem.0.0.weight_mask" in dst.state_dict() and "classifier.fn.weight_mask" in dst.state_dict()


def test_init_from_a_minkunet_into_an_spvcnn_and_back_copies_the_voxel_unet(tmp_path, capsys):
    """--model spvcnn --init <a MinkUNet checkpoint> copied only the classifier rows: SPVCNN keeps its voxel
    U-Net under 'unet.' (unet.stem.0.0.weight for the MinkUNet's stem.0.0.weight), so none of the MinkUNet's
    other tensors had a name in it and the log named them all unused. A MinkUNet's tensors now go to the
    SPVCNN's 'unet.' ones of their name (and an SPVCNN's 'unet.' ones to a MinkUNet), by shape as any; the
    point MLPs, which a MinkUNet has none of, stay as initialised (or unused), and the log says so."""
    from pointsparse.models import SPVCNN

    torch.manual_seed(0)
    classes = ["a", "b", "c"]
    mink = MinkUNet(4, 3, cr=0.125, blocks=1)
    spv = SPVCNN(4, 3, cr=0.125, blocks=1)
    fresh_mlp = spv.point_mlps[0][0].weight.detach().clone()
    unused = []
    copied = tr.init_from(spv, {"model": mink.state_dict(), "config": {"classes": classes}}, classes, unused)
    assert unused == []
    got = spv.state_dict()
    for key, value in mink.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(got["unet." + key], value), key
    assert "unet.stem.0.0.weight" in copied and torch.equal(spv.point_mlps[0][0].weight, fresh_mlp)
    assert torch.equal(spv.classifier.weight, mink.classifier.fn.weight)  # (its rows, the widths alike)
    # the other way: the SPVCNN's voxel U-Net into a MinkUNet, its point MLPs unused
    spv2 = SPVCNN(4, 3, cr=0.125, blocks=1)
    back = MinkUNet(4, 3, cr=0.125, blocks=1)
    unused = []
    tr.init_from(back, {"model": spv2.state_dict(), "config": {"classes": classes}}, classes, unused)
    assert unused and all(k.startswith("point_mlps.") for k in unused)
    got = back.state_dict()
    for key, value in spv2.unet.state_dict().items():
        assert torch.equal(got[key], value), key
    # the log of train --init says what went where
    assert tr.init_renaming(spv, mink.state_dict())[2] == "a MinkUNet's tensors as this SPVCNN's voxel U-Net (unet.*)"
    assert tr.init_renaming(back, spv2.state_dict())[2] == "an SPVCNN's voxel U-Net (unet.*) as this MinkUNet's tensors"
    assert tr.init_renaming(back, mink.state_dict()) is None and tr.init_renaming(spv, spv2.state_dict()) is None
    run = tmp_path / "run"
    tr.main(_parse([*TINY, "--epochs", "1", "--out", str(run)]))
    capsys.readouterr()
    tr.main(_parse([*TINY, "--epochs", "1", "--model", "spvcnn", "--init", str(run / "checkpoint.pt"), "--out",
                    str(tmp_path / "spv")]))
    log = capsys.readouterr()
    assert re.search(r"initialised 19\d tensors from .*checkpoint.pt \(a MinkUNet's tensors as this SPVCNN's voxel "
                     r"U-Net \(unet.\*\)\)\n", log.out + log.err)


@pytest.mark.parametrize("command, flag", [("train", "--scenes"), ("train", "--val-scenes"), ("train", "--beams"),
                                           ("train", "--batch-size"), ("eval", "--val-scenes"),
                                           ("eval", "--batch-size")])
def test_count_flags_past_int64_name_the_flag(command, flag, tmp_path):
    """A count flag past int64 is refused naming the flag (it was 'count must be a positive int' from the scene
    generator, or an OverflowError deeper in), as one below 1 is."""
    import argparse

    parser = argparse.ArgumentParser()
    (tr if command == "train" else evaluate).add_arguments(parser)
    base = ["--checkpoint", str(tmp_path / "missing.pt")] if command == "eval" else ["--out", str(tmp_path / "o")]
    args = parser.parse_args([*base, flag, str(10**22)])
    with pytest.raises(ValueError, match=f"{flag} must be in \\[1, 2\\*\\*63\\); got {10**22}"):
        (tr.main if command == "train" else evaluate.main)(args)


def test_training_clouds_mostly_ignored_through_the_label_map_are_named(tmp_path, capsys):
    """SemanticKITTI .bin scans beside Open3D-ML learning-id files: the
    refusal of their mixed formats suggested one --label-map, and with
    ``semantic-kitti-learning`` the scans' raw ids trained as learning ids
    (most ignored, the rest other classes) without a word; only the
    validation clouds were checked. The refusal now says the files hold
    labels of different ids, and a run warns, naming the first, where
    training clouds are mostly ignored through the map; the learning-id
    file alone trains without it."""
    seq, learning = scan_and_learning_ids(tmp_path)
    flags = ["--epochs", "1", "--cr", "0.125", "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "1",
             "--no-progress", "--val-data", str(learning)]
    assert cli.main(["train", "--data", str(seq), str(learning), *flags, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "their files hold labels of different ids" in err and "whose raw ids every file's labels are" in err, err
    assert cli.main(["train", "--data", str(seq), str(learning), *flags, "--label-map", "semantic-kitti-learning",
                     "--out", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert ("warning: the training clouds: 1 of 2 labelled clouds have more than 50% of their points ignored, the "
            f"first {seq / 'velodyne' / '000000.bin'} (") in err, err
    assert "does not list: is it the map of these files' labels? (--label-map)" in err
    assert cli.main(["train", "--data", str(learning), *flags, "--label-map", "semantic-kitti-learning",
                     "--out", str(tmp_path / "c")]) == 0
    assert "warning: the training clouds" not in capsys.readouterr().err


def test_a_runs_label_map_file_gone_or_changed_is_named(tmp_path, capsys):
    """A run's --label-map file is recorded by its path: moved, eval,
    predict --format label and --resume failed with load_label_map's "is
    neither a JSON file nor one of [...]", naming neither the checkpoint nor
    the fix; edited (other raw ids), eval scored through the new file
    without a word. The run now records the file's bytes (sha256): a file
    gone is refused naming it and --label-map, a changed one warned of."""
    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        np.savez(data / f"c{i}.npz", xyz=rng.uniform(0, 8, (400, 3)).astype(np.float32),
                 labels=rng.choice([3, 7], 400))
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"classes": ["low", "high"], "map": {"3": 0, "7": 1}}))
    run = tmp_path / "run"
    assert cli.main(["train", "--data", str(data), "--label-map", str(mapping), "--epochs", "1", "--cr", "0.125",
                     "--blocks", "1", "--voxel-size", "0.5", "--batch-size", "1", "--no-progress",
                     "--out", str(run)]) == 0, capsys.readouterr().err
    ckpt = run / tr.CHECKPOINT
    assert tr.load_checkpoint(ckpt)["config"]["label_map_files"] == {
        str(mapping): hashlib.sha256(mapping.read_bytes()).hexdigest()}
    evaluate = ["eval", "--checkpoint", str(ckpt), "--no-progress", "--out", str(tmp_path / "ev")]
    assert cli.main(evaluate) == 0
    assert "has changed since the run" not in capsys.readouterr().err
    mapping.rename(tmp_path / "moved.json")
    for command in (evaluate, ["predict", "--checkpoint", str(ckpt), "--data", str(data), "--format", "labels",
                               "--out", str(tmp_path / "pred")],
                    ["train", "--resume", str(ckpt), "--epochs", "2", "--no-progress", "--out", str(tmp_path / "r")]):
        assert cli.main(command) == 2, command
        err = capsys.readouterr().err
        assert f"the run read its clouds through the label map file {mapping}, which is gone: give --label-map" \
            in err, err
    (tmp_path / "moved.json").rename(mapping)
    mapping.write_text(json.dumps({"classes": ["low", "high"], "map": {"7": 0, "3": 1}}))
    assert cli.main(evaluate) == 0
    assert f"the label map file {mapping} has changed since the run" in capsys.readouterr().err
    assert cli.main([*evaluate, "--label-map", str(mapping)]) == 0
    assert "has changed since the run" not in capsys.readouterr().err
    # resumed on the changed file: warned of, and the checkpoint records the bytes its later epochs read
    assert cli.main(["train", "--resume", str(ckpt), "--epochs", "2", "--no-progress", "--out", str(run)]) == 0
    assert f"--resume {ckpt}: the label map file {mapping} has changed since the run" in capsys.readouterr().err
    assert cli.main(evaluate) == 0
    assert "has changed since the run" not in capsys.readouterr().err


def test_a_validation_that_scored_nothing_is_null_in_metrics_json_and_marked_on_the_curve(tmp_path, monkeypatch):
    """A review: a NaN in the history's val_miou (a validation that scored nothing) was written into
    metrics.json as a bare NaN (strict JSON readers refuse it), and the curve dropped the point with no mark,
    as if that epoch had not been validated. The history's NaN and inf are null, and the curve marks such an
    epoch on its axis, named in the legend."""
    import json

    pytest.importorskip("matplotlib")
    from pointsparse.app import plots, scoring

    history = {"step_loss": [2.0, float("inf"), 1.0], "epoch_loss": [1.5, 1.2, 1.1],
               "val_miou": [0.2, float("nan"), 0.4], "val_epoch": [1, 2, 3], "step_time": [0.1, 0.1, 0.1],
               "lr": [0.1, 0.1, 0.1]}
    cm = metrics.confusion_matrix(np.array([0, 1]), np.array([0, 1]), 2)
    scoring.write_report(tmp_path, cm, ["a", "b"], None, history,
                         {"best_miou": float("nan"), "scores": np.array([0.5, np.nan], dtype=np.float32)}, 255)
    report = json.loads((tmp_path / "metrics.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert report["history"]["val_miou"] == [0.2, None, 0.4] and report["history"]["step_loss"] == [2.0, None, 1.0]
    assert report["best_miou"] is None and report["miou"] == 1.0 and report["scores"] == [0.5, None]
    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig))
    plots.curves(history, "unused.png")
    plots.curves(dict(history, val_miou=[0.2, 0.3, 0.4]), "unused.png")
    marked = [[line for line in fig.axes[1].get_lines() if line.get_label().startswith("nothing scored")]
              for fig in figs]
    assert len(marked[0]) == 1 and list(marked[0][0].get_xdata()) == [2.0] and marked[1] == []


def test_confusion_greys_the_row_of_a_class_with_no_true_points(monkeypatch):
    """A review: a class absent from the labels drew a white row of zeros in confusion.png, which reads as a
    class the model predicted nowhere. Its row is grey (masked) and its label says "(no points)"."""
    pytest.importorskip("matplotlib")
    from pointsparse.app import plots

    figs = []
    monkeypatch.setattr(plots, "save", lambda fig, path: figs.append(fig))
    cm = metrics.confusion_matrix(np.array([0, 1, 2]), np.array([0, 0, 2]), 3)  # (pred, target)
    plots.confusion(cm, ["road", "car", "tree"], "unused.png")
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["road", "car (no points)", "tree"]
    data = ax.get_images()[0].get_array()
    assert list(np.ma.getmaskarray(data).all(1)) == [False, True, False] and data[0, 0] == 50.0
