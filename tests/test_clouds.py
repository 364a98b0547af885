"""``pointsparse.app.clouds``: how train, eval, predict and prune read point
cloud files (``--skip-nonfinite``), driven through the command line on small
hand-made checkpoints and clouds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointsparse import checkpoint
from pointsparse.app import cli
from pointsparse.data import NUM_FEATURES
from pointsparse.data.readers import load_label_map
from pointsparse.models import MinkUNet
from reference import scan_and_learning_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(path, classes, label_map="semantic-kitti", **args):
    """A MinkUNet checkpoint at ``path`` (random weights) of ``classes``
    whose config records ``label_map``; ``args``: the run's arguments."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    checkpoint.save(path, {"model": MinkUNet(NUM_FEATURES, len(classes), cr=0.125, blocks=1).state_dict(),
                           "config": {"in_channels": NUM_FEATURES, "classes": list(classes), "cr": 0.125,
                                      "blocks": 1, "voxel_size": 0.5, "model": "minkunet", "label_map": label_map},
                           "args": {"data": ["/nowhere/seq"], "label_map": None, "optimizer": "adamw", "lr": 2e-3,
                                    "weight_decay": 1e-4, **args}})
    return path


def _holed(rng, n=400):
    """``n`` positions, every fifth NaN (an organised cloud's points without a return: 80 of 400)."""
    xyz = rng.uniform(0, 8, (n, 3)).astype(np.float32)
    xyz[::5] = np.nan
    return xyz


def test_every_command_refuses_nan_positions_naming_the_cloud_and_the_flag(tmp_path, capsys):
    """train, eval, predict and prune each wrapped their reading in a copy of --skip-nonfinite's hold; one
    helper holds it now, and each refusal reads the same: the cloud, the count, then the flag."""
    rng = np.random.default_rng(0)
    classes = load_label_map("semantic-kitti").classes
    holed = tmp_path / "holed.npz"
    np.savez(holed, xyz=_holed(rng), labels=rng.integers(0, 3, 400))
    ckpt = _run(tmp_path / "run" / "checkpoint.pt", classes, label_map=None)
    said = f"{holed}: xyz holds NaN or inf at 80 of 400 points; give --skip-nonfinite to "
    for argv, then in (
            (["train", "--data", str(holed), "--epochs", "1", "--no-progress", "--out", str(tmp_path / "t")],
             "train on the other points"),
            (["eval", "--checkpoint", str(ckpt), "--data", str(holed), "--no-progress"], "score the other points"),
            (["predict", "--checkpoint", str(ckpt), "--data", str(holed), "--out", str(tmp_path / "p")],
             "predict the other points"),
            (["prune", "channels", "--checkpoint", str(ckpt), "--data", str(holed), "--out", str(tmp_path / "c")],
             "prune on the other points")):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert said + then in err, (argv, err)


def test_eval_reads_unlabelled_clouds_of_another_format_inside_the_hold(tmp_path, capsys):
    """A run that records SemanticKITTI's map, given an unlabelled Open3D-ML cloud (no map by default) some of
    whose positions are NaN: prune reads it inside --skip-nonfinite's hold, eval read its first cloud outside
    (to learn whether it holds labels), took the NaN refusal for labels, and asked for --label-map with
    --skip-nonfinite and without it alike. eval now reads it as prune does: without the flag the refusal names
    the NaN positions and the flag; with it, the cloud's missing labels."""
    rng = np.random.default_rng(0)
    (tmp_path / "bare").mkdir()
    np.save(tmp_path / "bare" / "000000.npy", _holed(rng))
    ckpt = _run(tmp_path / "run" / "checkpoint.pt", load_label_map("semantic-kitti").classes)
    data = ["--checkpoint", str(ckpt), "--data", str(tmp_path / "bare")]
    assert cli.main(["prune", "channels", *data, "--skip-nonfinite", "--out", str(tmp_path / "p")]) == 0, \
        capsys.readouterr().err
    assert cli.main(["prune", "channels", *data, "--out", str(tmp_path / "q")]) == 2
    assert "give --skip-nonfinite to prune" in capsys.readouterr().err
    assert cli.main(["eval", *data, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "xyz holds NaN or inf at 80 of 400 points; give --skip-nonfinite to score" in err, err
    assert cli.main(["eval", *data, "--skip-nonfinite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "000000.npy has no labels" in err and "--label-map" not in err, err


def test_eval_and_prune_find_their_clouds_once(tmp_path, capsys, monkeypatch):
    """eval and prune of a run's files searched the --data folder for clouds and took their formats' default
    map up to three times each (the map's checks, then the source), the validation files' as often. Each
    command finds them, and takes their default, once now; what is read is unchanged."""
    import pointsparse.data.datasets as datasets
    import pointsparse.data.readers as readers

    seq, learning = scan_and_learning_ids(tmp_path)
    ckpt = _run(tmp_path / "run" / "checkpoint.pt", load_label_map("semantic-kitti").classes,
                data=[str(seq)], val_data=[str(learning)], val_label_map="semantic-kitti-learning")
    state = checkpoint.load_training(ckpt)
    state["val_paths"] = [str(learning)]
    checkpoint.save(ckpt, state)
    scans, defaults = [], []
    folder_clouds, default_map = readers._folder_clouds, datasets._default_map
    monkeypatch.setattr(readers, "_folder_clouds", lambda folder: scans.append(folder) or folder_clouds(folder))
    monkeypatch.setattr(datasets, "_default_map", lambda paths: defaults.append(list(paths)) or default_map(paths))
    for argv in (["eval", "--checkpoint", str(ckpt), "--data", str(seq), "--no-progress"],
                 ["eval", "--checkpoint", str(ckpt), "--no-progress"],
                 ["prune", "channels", "--checkpoint", str(ckpt), "--data", str(seq), "--out", str(tmp_path / "p")],
                 ["prune", "channels", "--checkpoint", str(ckpt), "--out", str(tmp_path / "q")]):
        scans.clear()
        defaults.clear()
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert scans.count(seq) <= 1, (argv, scans)
        for paths in defaults:
            assert defaults.count(paths) == 1, (argv, defaults)


def test_train_and_predict_take_each_clouds_default_map_once(tmp_path, capsys, monkeypatch):
    """train without --label-map took its --data clouds' default map twice: the source read them through it,
    then the config recorded it by a second ``default_label_map`` of the same clouds (searched again; a
    --resume whose checkpoint records its map took it too, to throw away). It records the map the source
    took now; predict --format label takes each cloud's once. The map recorded and the labels written are
    unchanged."""
    import shutil

    import pointsparse.data.datasets as datasets

    seq, learning = scan_and_learning_ids(tmp_path)
    for sub, suffix in (("velodyne", ".bin"), ("labels", ".label")):  # (two scans: --val-fraction holds one out)
        shutil.copy(seq / sub / f"000000{suffix}", seq / sub / f"000001{suffix}")
    looked = []
    format_map = datasets._format_map
    monkeypatch.setattr(datasets, "_format_map", lambda path: looked.append(path) or format_map(path))
    train = ["train", "--epochs", "1", "--no-progress"]
    for argv in ([*train, "--data", str(seq / "velodyne" / "000000.bin"), "--out", str(tmp_path / "one")],
                 [*train, "--data", str(seq), "--val-fraction", "0.5", "--out", str(tmp_path / "split")],
                 ["train", "--resume", str(tmp_path / "split" / "checkpoint.pt"), "--epochs", "2",
                  "--no-progress", "--out", str(tmp_path / "split")],
                 ["predict", "--checkpoint", str(tmp_path / "split" / "checkpoint.pt"), "--data", str(seq),
                  str(learning), "--format", "label", "--out", str(tmp_path / "p")]):
        looked.clear()
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert looked and all(looked.count(path) == 1 for path in looked), (argv, looked)
    for run in ("one", "split"):
        assert checkpoint.load_training(tmp_path / run / "checkpoint.pt")["config"]["label_map"] == "semantic-kitti"
    assert len(list((tmp_path / "p").rglob("*.label"))) == 3


def test_prune_reads_data_through_the_map_eval_reads_it_through(tmp_path, capsys):
    """A run on SemanticKITTI .bin scans validated on Open3D-ML learning ids (--val-label-map
    semantic-kitti-learning): eval --data <learning ids> read them through the validation map, prune --data
    refused them (give --label-map), and where the run typed --label-map semantic-kitti, read them through it,
    without a word (learning id 1, car, as raw id 1, outlier: ignored). eval and prune take --data's map by
    one rule now (files_source): both read the learning ids as the scan's classes."""
    from pointsparse.app.channels import load_state

    seq, learning = scan_and_learning_ids(tmp_path)
    classes = load_label_map("semantic-kitti").classes
    argv = ["prune", "channels", "--criterion", "taylor", "--ratio", "0.5"]
    for typed in (None, "semantic-kitti"):
        ckpt = _run(tmp_path / f"run-{typed}" / "checkpoint.pt", classes, data=[str(seq)],
                    val_data=[str(learning)], val_label_map="semantic-kitti-learning")
        state = checkpoint.load_training(ckpt)
        state["args"]["label_map"] = typed
        checkpoint.save(ckpt, state)
        pruned = []
        for data in (seq, learning):
            out = tmp_path / f"p-{typed}-{data.stem}"
            assert cli.main([*argv, "--checkpoint", str(ckpt), "--data", str(data), "--out", str(out)]) == 0, \
                capsys.readouterr().err
            pruned.append(load_state(out / "checkpoint.pt")["model"])
        assert all(torch.equal(pruned[0][k], pruned[1][k]) for k in pruned[0]), typed
        assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(learning), "--no-progress"]) == 0
        capsys.readouterr()


def test_predict_label_refuses_a_runs_map_whose_raw_ids_are_not_the_clouds(tmp_path, capsys):
    """predict --format label wrote the raw ids of the run's map whatever the clouds: a run on Open3D-ML
    learning ids (semantic-kitti-learning) predicting SemanticKITTI .bin scans wrote learning ids (car as 1,
    SemanticKITTI's outlier) into predictions/*.label, which the benchmark reads as raw ids. Where the
    clouds' format takes a map of the model's classes that writes other raw ids, predict now refuses,
    naming both maps and --label-map; with --label-map it writes that map's ids."""
    seq, _ = scan_and_learning_ids(tmp_path)
    classes = load_label_map("semantic-kitti").classes
    ckpt = _run(tmp_path / "run" / "checkpoint.pt", classes, label_map="semantic-kitti-learning")
    argv = ["predict", "--checkpoint", str(ckpt), "--data", str(seq), "--format", "label"]
    assert cli.main([*argv, "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "'semantic-kitti-learning'" in err and "'semantic-kitti'" in err and "--label-map" in err, err
    assert not list((tmp_path / "p").rglob("*.label"))
    assert cli.main([*argv, "--label-map", "semantic-kitti", "--out", str(tmp_path / "q")]) == 0, \
        capsys.readouterr().err
    written = np.fromfile(next((tmp_path / "q").rglob("*.label")), np.uint32)
    allowed = {int(raw) for raw, tid in load_label_map("semantic-kitti").mapping.items()}
    assert len(written) == 400 and set(written.tolist()) <= allowed
    # (the npz of learning ids: its format takes no map, the run's learning ids are written as before)
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(tmp_path / "learning.npz"), "--format",
                     "label", "--out", str(tmp_path / "r")]) == 0, capsys.readouterr().err
    assert np.fromfile(next((tmp_path / "r").rglob("*.label")), np.uint32).max() <= 19


def test_eval_refuses_a_runs_map_whose_raw_ids_are_not_the_clouds_as_predict_does(tmp_path, capsys):
    """A run trained with --label-map semantic-kitti-learning (Open3D-ML learning ids) scored on
    SemanticKITTI .bin scans with no --label-map: predict --format label refused the pair, naming both maps;
    eval read the scan's raw ids through the learning map (most points ignored), warned, and printed an mIoU
    of nothing that means anything, exit 0. eval --data refuses it now as predict does, with the same words
    (one check, clouds.check_format_maps); --label-map semantic-kitti scores the scan, and the npz of
    learning ids (its format takes no map) is scored through the run's map as before."""
    seq, learning = scan_and_learning_ids(tmp_path)
    classes = load_label_map("semantic-kitti").classes
    ckpt = _run(tmp_path / "run" / "checkpoint.pt", classes, label_map="semantic-kitti-learning")
    state = checkpoint.load_training(ckpt)
    state["args"]["label_map"] = "semantic-kitti-learning"
    checkpoint.save(ckpt, state)
    argv = ["eval", "--checkpoint", str(ckpt), "--no-progress"]
    messages = []
    for command in (["predict", "--checkpoint", str(ckpt), "--format", "label", "--out", str(tmp_path / "p")],
                    argv):
        assert cli.main([*command, "--data", str(seq)]) == 2
        err = capsys.readouterr().err
        assert "is read through the label map 'semantic-kitti' (its format's), whose raw id for car is 10; the " \
            "run's label map, 'semantic-kitti-learning', " in err and \
            "(--label-map semantic-kitti for these clouds)" in err and "warning" not in err, err
        messages.append(err)
    assert messages[1].startswith("pointsparse eval: error: --data: ") and "takes 1: give --label-map of these " \
        "files' labels" in messages[1], messages[1]
    assert cli.main([*argv, "--data", str(seq), "--label-map", "semantic-kitti"]) == 0, capsys.readouterr().err
    assert cli.main([*argv, "--data", str(learning)]) == 0, capsys.readouterr().err
