"""``pointsparse predict``: each file's per-point classes, written as .npy or
SemanticKITTI .label, equal to the model's predictions on the same cloud,
from a checkpoint and from its exported program alike."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pointsparse import checkpoint
from pointsparse.app import cli
from pointsparse.checkpoint import load_training
from pointsparse.app.predict import _outputs, raw_ids
from pointsparse.data import Batch, generated
from pointsparse.data.readers import LabelMap, load_label_map, read_cloud, read_semantic3d
from pointsparse.data.transforms import voxelize_sample
from pointsparse.app.scoring import predict
from pointsparse.data import NUM_FEATURES
from pointsparse.models import SPVCNN, MinkUNet, load_model

from conftest import find_datasets
from test_prune_workflow import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def _clouds(folder, count: int = 2) -> list:
    """Generated street scenes as .npz files (xyz, intensity, labels), in two folders."""
    paths = []
    for i in range(count):
        scene = generated.outdoor_scene(seed=20 + i, beams=16, azimuth_steps=256)
        path = folder / ("a" if i % 2 else "b") / f"scan{i}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, xyz=scene.xyz, labels=scene.labels, intensity=scene.intensity)
        paths.append(path)
    return paths


def _expected(model, path, voxel_size: float) -> np.ndarray:
    v = voxelize_sample(read_cloud(path), voxel_size, 255)
    return predict(model, Batch.of([v]))[1].numpy()


def _sharp(model):
    """``model`` with every BatchNorm's running variance 0.01: each layer's
    features widened, so that the argmax of random weights varies from point
    to point (a model trained for a test's budget predicts one class
    everywhere)."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_var.fill_(0.01)
    return model


def _checkpoint(path, name: str = "minkunet"):
    """A MinkUNet (or SPVCNN) checkpoint for the generated classes with random weights and batch-norm statistics
    (a model trained for a test's budget predicts one class everywhere)."""
    torch.manual_seed(0)
    model = _sharp((SPVCNN if name == "spvcnn" else MinkUNet)(NUM_FEATURES, len(generated.OUTDOOR_CLASSES),
                                                              cr=0.25, blocks=1))
    config = {"in_channels": NUM_FEATURES, "classes": list(generated.OUTDOOR_CLASSES), "cr": 0.25, "blocks": 1,
              "voxel_size": 0.5, "ignore_index": 255, "model": name}
    torch.save({"model": model.state_dict(), "config": config}, path)
    return path


def _semantic3d_model_and_scan(tmp_path, low_intensity, sharp_batch_norm=False):
    """A checkpoint of a MinkUNet of Semantic3D's classes at tmp_path/s3d.pt
    and a 300-point Semantic3D scan tmp_path/in/sg27_station10.txt
    (intensities low_intensity..2047); returns the scan and the generator
    that wrote it, to draw on from. sharp_batch_norm: running variances of
    0.01, for predictions that vary with the input."""
    state = torch.load(_checkpoint(tmp_path / "generated.pt"), weights_only=False)
    classes = load_label_map("semantic3d").classes
    torch.manual_seed(1)
    model = MinkUNet(NUM_FEATURES, len(classes), cr=0.25, blocks=1)
    if sharp_batch_norm:
        _sharp(model)
    state["model"], state["config"]["classes"] = model.state_dict(), list(classes)
    torch.save(state, tmp_path / "s3d.pt")
    rng = np.random.default_rng(0)
    scan = tmp_path / "in" / "sg27_station10.txt"
    scan.parent.mkdir()
    with open(scan, "w") as f:
        for p, i, c in zip(rng.uniform(0, 8, (300, 3)), rng.integers(low_intensity, 2048, 300),
                           rng.integers(0, 256, (300, 3))):
            f.write(f"{p[0]:.3f} {p[1]:.3f} {p[2]:.3f} {i} {c[0]} {c[1]} {c[2]}\n")
    return scan, rng


def test_predict_reads_semantic3d_test_scans_without_labels_as_semantic3d(tmp_path):
    """Semantic3D's test scans have no .labels beside them: predict read them
    as S3DIS rows (colour from intensity, r, g; no intensity), silently where
    the intensities are 0 and up. A model of Semantic3D's classes reads a
    .txt as a Semantic3D scan."""
    scan, _ = _semantic3d_model_and_scan(tmp_path, low_intensity=0, sharp_batch_norm=True)
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "s3d.pt"), "--data", str(scan), "--out", str(out),
                     "--no-progress"]) == 0
    model = load_model(tmp_path / "s3d.pt").eval()
    expected = predict(model, Batch.of([voxelize_sample(read_semantic3d(scan), 0.5, 255)]))[1].numpy()
    assert np.array_equal(np.load(out / "sg27_station10.npy"), expected)


def test_predict_spvcnn_program(tmp_path):
    ckpt = _checkpoint(tmp_path / "checkpoint.pt", "spvcnn")
    program, out = tmp_path / "model.pt2", tmp_path / "pred"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(program)]) == 0
    paths = _clouds(tmp_path / "in")
    assert cli.main(["predict", "--program", str(program), "--data", *map(str, paths), "--out", str(out),
                     "--no-progress"]) == 0
    model = load_model(ckpt).eval()
    for path in paths:
        got = np.load(out / path.parent.name / f"{path.stem}.npy")
        assert np.array_equal(got, _expected(model, path, 0.5)) and len(np.unique(got)) > 1


def test_predict_writes_the_models_classes_per_point(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    program = tmp_path / "model.pt2"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(program)]) == 0
    paths = _clouds(tmp_path / "in")
    model = load_model(ckpt).eval()
    voxel_size = load_training(ckpt)["config"]["voxel_size"]
    for flag, source, more in (("--checkpoint", ckpt, []), ("--program", program, []),
                               ("--checkpoint", ckpt, ["--maps-ahead"])):
        out = tmp_path / f"{flag.strip('-')}{len(more)}"
        assert cli.main(["predict", flag, str(source), "--data", str(tmp_path / "in" / "a"),
                         str(tmp_path / "in" / "b"), "--out", str(out), "--no-progress", *more]) == 0
        for path in paths:
            got = np.load(out / path.parent.name / f"{path.stem}.npy")
            want = _expected(model, path, voxel_size)
            assert got.dtype == np.int32 and len(got) == len(np.load(path)["xyz"])
            assert np.array_equal(got, want) and len(np.unique(got)) > 1
        assert json.loads((out / "classes.json").read_text())["classes"] == list(generated.OUTDOOR_CLASSES)
    # SemanticKITTI labels through a label map of the model's classes: each class's smallest raw id
    classes = list(generated.OUTDOOR_CLASSES)
    mapping = {100 + 2 * i: i for i in range(len(classes))} | {101 + 2 * i: i for i in range(len(classes))}
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"classes": classes, "map": {str(k): v for k, v in mapping.items()}}))
    out = tmp_path / "labels"
    assert cli.main(["predict", "--program", str(program), "--data", *map(str, paths), "--out", str(out),
                     "--format", "label", "--label-map", str(label_map), "--no-progress"]) == 0
    for path in paths:
        raw = np.fromfile(out / path.parent.name / f"{path.stem}.label", dtype="<u4")
        assert np.array_equal(raw, 100 + 2 * _expected(model, path, voxel_size).astype(np.uint32))
    capsys.readouterr()
    for flags, message in (
            (["--program", str(program), "--inference", "bf16"], "a program keeps the form it was exported in"),
            (["--program", str(program), "--inference", "float32"], "keeps the form it was exported in"),  # (typed)
            (["--program", str(program), "--maps-ahead"], "an exported program builds its maps inside"),
            (["--program", str(program), "--label-map", "s3dis"], "--format npy writes class indices"),
            (["--program", str(program), "--format", "label"],
             "give --label-map (a map file of the model's classes: the run read its clouds through none"),
            (["--program", str(program), "--format", "label", "--label-map", "s3dis"], "has the classes"),
            (["--checkpoint", str(ckpt), "--data", str(tmp_path / "none")], "no such file or folder")):
        data = [] if "--data" in flags else ["--data", *map(str, paths)]
        assert cli.main(["predict", *flags, *data, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    far = tmp_path / "far.npy"
    np.save(far, np.array([[0, 0, 0], [1e12, 0, 0]], np.float32))  # beyond what a voxel grid holds
    assert cli.main(["predict", "--program", str(program), "--data", str(far), "--out", str(tmp_path / "x"),
                     "--no-progress"]) == 2
    assert f"{far}: " in capsys.readouterr().err  # the error names the file


def test_predict_on_a_semantickitti_scan(tmp_path):
    datasets = find_datasets()
    scan = None if datasets is None else datasets / "semantickitti/full-scan/velodyne/000000.bin"
    if scan is None or not scan.is_file():
        pytest.skip("no SemanticKITTI scan in the shared datasets")
    run = tmp_path / "run"
    assert cli.main(["train", *TINY, "--epochs", "1", "--out", str(run)]) == 0
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(run / "checkpoint.pt"), "--data", str(scan), "--out", str(out),
                     "--no-progress"]) == 0
    got = np.load(out / "000000.npy")
    assert len(got) == scan.stat().st_size // 16  # one class per point of the file, in its order
    model = load_model(run / "checkpoint.pt").eval()
    assert np.array_equal(got, _expected(model, scan, 0.5))


def test_raw_ids_take_each_classes_smallest_raw_id():
    m = LabelMap(["a", "b"], {7: 0, 3: 0, 9: 1, -1: 1})
    assert raw_ids(m, ["a", "b"]).tolist() == [3, 9]
    with pytest.raises(ValueError, match="gives no raw id for b"):
        raw_ids(LabelMap(["a", "b"], {1: 0}), ["a", "b"])
    with pytest.raises(ValueError, match="has the classes"):
        raw_ids(m, ["b", "a"])


def test_raw_ids_follow_a_label_maps_inverse_where_it_lists_one(tmp_path):
    """SemanticKITTI's map sends bus (13), other-vehicle (20) and four more raw
    ids to other-vehicle; --format label wrote 13 (bus) for it, where the
    benchmark's learning_map_inv writes 20: the map's "inverse" says which."""
    kitti = load_label_map("semantic-kitti")
    ids = dict(zip(kitti.classes, raw_ids(kitti, kitti.classes).tolist()))
    assert ids["other-vehicle"] == 20 and ids["car"] == 10 and ids["person"] == 30 and ids["traffic-sign"] == 81
    m = LabelMap(["a", "b"], {7: 0, 3: 0, 9: 1}, inverse={0: 7})
    assert raw_ids(m, ["a", "b"]).tolist() == [7, 9]  # b: its smallest raw id
    with pytest.raises(ValueError, match=r"inverse writes raw id 9 for class 'a', which the map sends to 'b'"):
        LabelMap(["a", "b"], {7: 0, 9: 1}, inverse={0: 9})
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"classes": ["a", "b"], "map": {"7": 0, "3": 0, "9": 1}, "inverse": {"a": 7}}))
    assert load_label_map(path).inverse == {0: 7}
    path.write_text(json.dumps({"classes": ["a", "b"], "map": {"7": 0, "9": 1}, "inverse": {"c": 7}}))
    with pytest.raises(ValueError, match=r"m\.json: 'inverse' names 'c', which is not one of the classes"):
        load_label_map(path)


def test_outputs_mirror_the_inputs_below_their_common_folder(tmp_path):
    seq = tmp_path / "sequences"
    scans = [seq / "00" / "velodyne" / "000000.bin", seq / "01" / "velodyne" / "000000.bin"]
    out = tmp_path / "out"
    assert _outputs(scans, out, ".npy") == [out / "00/velodyne/000000.npy", out / "01/velodyne/000000.npy"]
    assert _outputs(scans, out, ".label") == [out / "00/predictions/000000.label", out / "01/predictions/000000.label"]
    assert _outputs(scans[:1], out, ".label") == [out / "predictions/000000.label"]
    assert _outputs([tmp_path / "a.npz"], out, ".npy") == [out / "a.npy"]
    with pytest.raises(ValueError, match="would both be written to"):
        _outputs([tmp_path / "a.npz", tmp_path / "a.ply"], out, ".npy")


def test_outputs_are_named_after_the_paths_given_not_their_link_targets(tmp_path):
    """A cloud named through a symbolic link (scans/drive1.bin -> ../store/x/000000.bin, a data set arranged
    with links) had its prediction named after the link's target: out/store/x/000000.npy beside
    out/scans/local.npy, the name the user gave lost, and a SemanticKITTI velodyne/ scan linked from elsewhere
    got no predictions/ folder. The outputs now mirror the paths as given (made absolute, links kept)."""
    store, scans = tmp_path / "store", tmp_path / "scans"
    for sub in ("x", "y"):
        (store / sub).mkdir(parents=True)
        (store / sub / "000000.bin").write_bytes(b"")
    scans.mkdir()
    (scans / "drive1.bin").symlink_to(store / "x" / "000000.bin")
    (scans / "drive2.bin").symlink_to(store / "y" / "000000.bin")
    (scans / "local.bin").write_bytes(b"")
    out = tmp_path / "out"
    paths = [scans / "drive1.bin", scans / "drive2.bin", scans / "local.bin"]
    assert _outputs(paths, out, ".npy") == [out / "drive1.npy", out / "drive2.npy", out / "local.npy"]
    velodyne = tmp_path / "sequences" / "08" / "velodyne"
    velodyne.mkdir(parents=True)
    (velodyne / "000000.bin").symlink_to(store / "x" / "000000.bin")
    assert _outputs([velodyne / "000000.bin"], out, ".label") == [out / "predictions" / "000000.label"]


def test_predict_names_a_sequence_whose_velodyne_folder_is_empty(tmp_path, capsys):
    """predict on a sequence folder with an empty velodyne/ failed with Python's "commonpath() arg is an empty
    sequence"; now the folder is named (find_clouds), exit 2, nothing written."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    (tmp_path / "seq" / "velodyne").mkdir(parents=True)
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(tmp_path / "seq"), "--out",
                     str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "seq: no point cloud files in this folder (its velodyne/ holds no *.bin files)" in err, err
    assert not (tmp_path / "out").exists()


def test_predict_never_writes_over_what_it_reads(tmp_path, capsys):
    """--out where a prediction would land on an input cloud (a .npy cloud predicted into its own folder) or
    on the labels a cloud is read with (SemanticKITTI's labels/, a points/labels pair) is refused before
    anything is written, the inputs unchanged."""
    cloud = tmp_path / "in" / "c1.npy"
    cloud.parent.mkdir()
    np.save(cloud, (np.random.default_rng(0).random((2000, 4)) * 20).astype(np.float32))
    before = cloud.read_bytes()
    ckpt = _checkpoint(tmp_path / "m.pt")
    code = cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(cloud.parent),
                     "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "would overwrite the input cloud" in err and "give another folder" in err
    assert cloud.read_bytes() == before and sorted(p.name for p in cloud.parent.iterdir()) == ["c1.npy"]
    room = tmp_path / "d" / "points" / "room.npy"  # (Open3D-ML's layout: its labels in d/labels/room.npy)
    with pytest.raises(ValueError, match=r"would overwrite the labels of .*room\.npy"):
        _outputs([room], tmp_path / "d" / "labels", ".npy")
    with pytest.raises(ValueError, match=r"would overwrite the input cloud .*scan_points\.npy"):
        _outputs([tmp_path / "e" / "scan_points.npy"], tmp_path / "e", ".npy")
    assert _outputs([room], tmp_path / "d" / "pred", ".npy") == [tmp_path / "d" / "pred" / "room.npy"]


def test_scoring_commands_refuse_unlabelled_clouds(tmp_path, capsys):
    """eval on clouds without labels printed an mIoU of NaN (and wrote NaN into its JSON); prune channels
    --criterion taylor scored channels by a NaN loss (every score 0) and amc/netadapt ran on it: each now
    names the cloud, exit status 2, no checkpoint written."""
    cloud = tmp_path / "c1.npy"
    np.save(cloud, (np.random.default_rng(0).random((2000, 4)) * 20).astype(np.float32))
    ckpt = _checkpoint(tmp_path / "m.pt")
    runs = [(["eval", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(tmp_path / "ev"),
              "--no-progress"], "has no labels"),
            (["prune", "channels", "--checkpoint", str(ckpt), "--data", str(cloud), "--criterion", "taylor",
              "--out", str(tmp_path / "pc")], "--criterion taylor (scores by the loss's gradient) needs labelled"),
            (["prune", "netadapt", "--checkpoint", str(ckpt), "--data", str(cloud), "--quick",
              "--out", str(tmp_path / "pn")], "needs labelled clouds; cloud 0 of --data")]
    for argv, words in runs:
        assert cli.main(argv) == 2, argv
        assert words in capsys.readouterr().err, argv
    assert not list(tmp_path.rglob("checkpoint.pt")) and not list(tmp_path.rglob("*.json"))


def test_eval_of_unlabelled_clouds_of_another_format_than_the_runs_says_they_have_no_labels(tmp_path, capsys):
    """eval of an unlabelled .npy cloud with a run that records SemanticKITTI's map (read from .bin scans
    by default) asked for --label-map "of these files' labels", and with one given, said the cloud has no
    labels. The cloud's missing labels are named first, as for a run of the same format."""
    from pointsparse import checkpoint

    cloud = tmp_path / "c1.npy"
    np.save(cloud, (np.random.default_rng(0).random((2000, 4)) * 20).astype(np.float32))
    state = torch.load(_checkpoint(tmp_path / "m.pt"), weights_only=True)
    checkpoint.save(tmp_path / "sk.pt", {**state, "config": {**state["config"], "label_map": "semantic-kitti"}})
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "sk.pt"), "--data", str(cloud), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{cloud} has no labels" in err and "these files' labels" not in err, err


def test_a_failed_predict_leaves_no_classes_json(tmp_path, capsys):
    """classes.json marks a finished run (written after every cloud): a run into an earlier run's folder that
    fails on a later cloud removes the old one instead of leaving it beside a part of the new predictions."""
    good, bad = tmp_path / "in" / "a.npy", tmp_path / "in" / "b.npy"
    good.parent.mkdir()
    np.save(good, (np.random.default_rng(0).random((2000, 4)) * 20).astype(np.float32))
    np.save(bad, np.full((50, 4), np.nan, np.float32))
    ckpt, out = _checkpoint(tmp_path / "m.pt"), tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(good), "--out", str(out),
                     "--no-progress"]) == 0
    assert (out / "classes.json").exists()
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(good.parent), "--out", str(out),
                     "--no-progress"]) == 2
    assert "b.npy" in capsys.readouterr().err
    assert not (out / "classes.json").exists()


def test_eval_refuses_clouds_whose_every_label_is_ignored(tmp_path, capsys):
    """eval on labelled clouds none of whose points is scored (every label the ignore index: unlisted by the
    label map, or --ignore-index the only class they hold) printed an mIoU and accuracy of NaN, wrote NaN into
    metrics.json and exited 0, as eval on unlabelled clouds once did: now exit status 2, the reason named, no
    metrics written; one scored point is enough."""
    rng = np.random.default_rng(0)
    xyz = (rng.random((2000, 3)) * 20).astype(np.float32)
    ignored, zeros = tmp_path / "ignored.npz", tmp_path / "zeros.npz"
    np.savez(ignored, xyz=xyz, labels=np.full(2000, 255))
    np.savez(zeros, xyz=xyz, labels=np.zeros(2000, np.int64))
    ckpt = _checkpoint(tmp_path / "m.pt")
    for data, more in (([ignored], []), ([ignored, ignored], ["--batch-size", "1"]), ([zeros], ["--ignore-index", "0"])):
        argv = ["eval", "--checkpoint", str(ckpt), "--data", *map(str, data), "--out", str(tmp_path / "ev"),
                "--no-progress", *more]
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "every point's label is the ignore index" in err and "nothing to score" in err, err
    assert not list(tmp_path.rglob("*.json"))
    one = tmp_path / "one.npz"
    np.savez(one, xyz=xyz, labels=np.r_[np.full(1999, 255), [3]])
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(ignored), str(one), "--out",
                     str(tmp_path / "ev"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "ev" / "eval-metrics.json").read_text())
    assert sum(map(sum, report["confusion"])) == 1 and report["miou"] in (0.0, 1.0)


def test_predict_reads_no_labels(tmp_path, capsys):
    """predict leaves the files' own labels unused, and no longer reads them: labels that would not do for
    training (-1 for unlabelled points, which predict has no --ignore-index for; a labels file beside a scan
    that is cut short or of another scan) stopped it with an error about them; the predictions are those of
    the same cloud without labels."""
    scene = generated.outdoor_scene(seed=21, beams=16, azimuth_steps=256)
    n = len(scene.xyz)
    labelled, clean = tmp_path / "labelled", tmp_path / "clean"
    for folder in (labelled, clean):
        (folder / "seq" / "velodyne").mkdir(parents=True)
        np.c_[scene.xyz, scene.intensity].astype(np.float32).tofile(folder / "seq" / "velodyne" / "000000.bin")
        np.save(folder / "scan_points.npy", np.c_[scene.xyz, scene.intensity].astype(np.float32))
        np.savez(folder / "cloud.npz", xyz=scene.xyz, intensity=scene.intensity,
                 **({"labels": np.r_[np.full(10, -1), scene.labels[10:]]} if folder == labelled else {}))
    (labelled / "seq" / "labels").mkdir()
    (labelled / "seq" / "labels" / "000000.label").write_bytes(b"\0" * 4 * (n // 2))  # cut short
    np.save(labelled / "scan_labels.npy", np.zeros(n + 5, np.int64))  # another scan's
    ckpt = _checkpoint(tmp_path / "m.pt")
    names = ["seq/velodyne/000000.bin", "scan_points.npy", "cloud.npz"]
    for folder in (labelled, clean):
        assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", *(str(folder / p) for p in names),
                         "--out", str(tmp_path / f"out-{folder.name}"), "--no-progress"]) == 0, \
            capsys.readouterr().err
    for target in ("seq/velodyne/000000.npy", "scan_points.npy", "cloud.npy"):
        got = np.load(tmp_path / "out-labelled" / target)
        assert len(got) == n and np.array_equal(got, np.load(tmp_path / "out-clean" / target)), target


def test_eval_data_takes_the_runs_label_map(tmp_path, capsys):
    """eval --data on a run trained with --label-map (README's IGN run: ASPRS codes to 4 classes) read the
    files' raw labels as class indices unless --label-map was given again (the run's map served only its own
    validation files, and predict --format label's default): codes below the class count were scored silently
    as other classes, the others an error. Now --data files take the run's label map, as train --val-data
    does; the same scores as the run's validation files and an explicit --label-map."""
    from pointsparse.data.readers import load_label_map
    from pointsparse.models import MinkUNet

    ign = load_label_map("ign-lidarhd")
    torch.manual_seed(0)
    model = _sharp(MinkUNet(NUM_FEATURES, len(ign.classes), cr=0.25, blocks=1))
    rng = np.random.default_rng(0)
    tile = tmp_path / "tile.npz"
    np.savez(tile, xyz=(rng.random((3000, 3)) * [40, 40, 10]).astype(np.float32),
             classification=rng.choice(np.array([1, 2, 3], np.uint8), 3000))  # (all below the 4 classes)
    config = {"in_channels": NUM_FEATURES, "classes": list(ign.classes), "cr": 0.25, "blocks": 1,
              "voxel_size": 0.5, "ignore_index": 255, "model": "minkunet"}
    ckpt = tmp_path / "c.pt"
    torch.save({"model": model.state_dict(), "config": config, "val_paths": [str(tile)],
                "args": {"data": [str(tile)], "label_map": "ign-lidarhd"}}, ckpt)
    cms = []
    for i, flags in enumerate(([], ["--data", str(tile)], ["--data", str(tile), "--label-map", "ign-lidarhd"])):
        out = tmp_path / f"ev{i}"
        assert cli.main(["eval", "--checkpoint", str(ckpt), *flags, "--out", str(out), "--no-progress"]) == 0
        cms.append(json.loads((out / "eval-metrics.json").read_text())["confusion"])
    assert cms[0] == cms[1] == cms[2]
    assert np.asarray(cms[0])[3].sum() == 0 and np.asarray(cms[0]).sum() < 3000  # (1 ignored, none building)


def test_predict_out_where_a_prediction_cannot_go_is_refused_first(tmp_path, capsys):
    """--out holding a file where a prediction's folder goes (out/a for the clouds of in/a) or a folder
    where a prediction goes: a one-line error naming both, exit status 2, before any cloud is run (were
    FileExistsError / IsADirectoryError tracebacks, exit status 1, once the clouds before it were written)."""
    import shutil

    paths = _clouds(tmp_path / "in", 3)  # in/b/scan0, in/a/scan1, in/b/scan2
    ckpt = _checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    for clash, words in ((out / "a", "which is a file"), (out / "b" / "scan2.npy", "is a folder")):
        out.mkdir()
        if clash.name == "a":
            clash.write_text("x")
        else:
            clash.mkdir(parents=True)
        argv = ["predict", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--out", str(out), "--no-progress"]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("pointsparse predict: error: ") and words in err and str(clash) in err, err
        assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == \
            ([clash.relative_to(out)] if clash.name == "a" else []), clash
        shutil.rmtree(out)


def test_eval_names_a_cloud_whose_labels_are_no_class_first(tmp_path, capsys):
    """eval on clouds one of which holds labels that are no class index of the checkpoint (raw labels, read
    without their label map): an error naming that cloud and --label-map, before any cloud is scored (was the
    confusion matrix's "target labels must lie in [0, 9)", naming no cloud, after the clouds before it)."""
    paths = _clouds(tmp_path / "in", 2)
    raw = tmp_path / "raw.npz"
    with np.load(paths[0]) as z:
        np.savez(raw, xyz=z["xyz"], labels=np.where(z["labels"] == 2, 40, z["labels"]))
    ckpt = _checkpoint(tmp_path / "m.pt")
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", *map(str, paths), str(raw), "--batch-size", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{raw}: label 40 is neither a class index (0 to 8) nor the ignore index 255" in err and \
        "--label-map" in err, err


def test_predict_refuses_an_out_holding_the_other_formats_predictions(tmp_path, capsys):
    """predict --format npy into a folder an earlier --format label run wrote (and the other way round):
    exit status 2 naming the old predictions and asking for a new --out, before any cloud is run (the new
    files were written beside the old ones, under a classes.json naming the new format only); the same
    format again, and the other format into a new --out, run."""
    paths = _clouds(tmp_path / "in", 2)
    ckpt = _checkpoint(tmp_path / "m.pt")
    classes = list(generated.OUTDOOR_CLASSES)
    label_map = tmp_path / "map.json"
    label_map.write_text(json.dumps({"classes": classes, "map": {str(10 + i): i for i in range(len(classes))}}))
    formats = {"npy": [], "label": ["--format", "label", "--label-map", str(label_map)]}
    for first, second in (("label", "npy"), ("npy", "label")):
        out = tmp_path / f"out-{first}"
        argv = ["predict", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--no-progress"]
        assert cli.main([*argv, "--out", str(out), *formats[first]]) == 0
        assert cli.main([*argv, "--out", str(out), *formats[first]]) == 0  # the same format again
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        capsys.readouterr()
        assert cli.main([*argv, "--out", str(out), *formats[second]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pointsparse predict: error: ") and f"--format {first}" in err, err
        assert "new --out" in err and str(out / "a" / f"scan1.{first}") in err, err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing run, nothing removed
        assert json.loads((out / "classes.json").read_text())["format"] == first
        assert cli.main([*argv, "--out", str(tmp_path / f"new-{second}"), *formats[second]]) == 0
    # the clouds predict reads are no predictions: .npy clouds in --out itself, predicted as .label there
    clouds = tmp_path / "clouds"
    clouds.mkdir()
    np.save(clouds / "c.npy", (np.random.default_rng(0).random((2000, 4)) * 20).astype(np.float32))
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(clouds / "c.npy"), "--out", str(clouds),
                     *formats["label"], "--no-progress"]) == 0
    assert (clouds / "c.label").is_file()


def test_eval_and_predict_refuse_an_out_another_run_holds(tmp_path, capsys):
    """eval --out and predict --out take the lock train takes on its --out (checkpoint.DirectoryLock): while
    another run holds the folder, exit status 2 with its error and nothing written there (they wrote into it
    beside the other run's files); once it is free, both run. eval without --out takes no lock."""
    from pointsparse.checkpoint import DirectoryLock

    paths = _clouds(tmp_path / "in", 1)
    ckpt, out = _checkpoint(tmp_path / "m.pt"), tmp_path / "out"
    runs = {"eval": ["eval", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--out", str(out),
                     "--no-progress"],
            "predict": ["predict", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--out", str(out),
                        "--no-progress"]}
    with DirectoryLock(out):
        capsys.readouterr()
        for command, argv in runs.items():
            assert cli.main(argv) == 2, command
            err = capsys.readouterr().err
            assert err.startswith(f"pointsparse {command}: error: --out {out} is in use by another run"), err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    for command, argv in runs.items():
        assert cli.main(argv) == 0, command
    assert (out / "eval-metrics.json").is_file() and (out / "classes.json").is_file()
    free = tmp_path / "free"
    free.mkdir()
    with DirectoryLock(free):  # (no --out: the folder the command runs from is not taken)
        assert cli.main(runs["eval"][:-3] + ["--no-progress"]) == 0


def test_predict_and_eval_run_a_checkpoint_with_voxel_skips(tmp_path, capsys):
    """A checkpoint of a model with VoxelSkip inserted into its decoder
    blocks (config voxel_skip: models.voxel_skips) was refused by predict
    and eval (the config rebuilt the model without them); both now run the
    model with its skips, as load_model gives it, fused too."""
    from pointsparse import checkpoint
    from pointsparse.app.evaluate import inference_model
    from pointsparse.models import voxel_skips
    from pointsparse.nn import VoxelSkip

    state = load_training(_checkpoint(tmp_path / "dense.pt"))
    model = load_model(tmp_path / "dense.pt")
    for stage in model.fuse:
        for block in stage:
            block.main = VoxelSkip(block.main, 0.3)
    ckpt = tmp_path / "skip.pt"
    checkpoint.save(ckpt, dict(state, model=model.state_dict(),
                               config=dict(state["config"], voxel_skip=voxel_skips(model))))
    paths = _clouds(tmp_path / "in", 1)
    loaded = load_model(ckpt)
    assert voxel_skips(loaded) == voxel_skips(model)
    want = _expected(model.eval(), paths[0], 0.5)
    assert not np.array_equal(want, _expected(load_model(tmp_path / "dense.pt"), paths[0], 0.5))
    for inference in ("float32", "fused"):
        out = tmp_path / f"pred-{inference}"
        assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(paths[0]), "--out", str(out),
                         "--inference", inference, "--no-progress"]) == 0
        got = np.load(out / f"{paths[0].stem}.npy")
        fused = _expected(inference_model(loaded, inference).eval(), paths[0], 0.5)
        assert np.array_equal(got, fused) and (inference == "fused" or np.array_equal(got, want))
        if inference == "fused":  # its skips run: the eval model's classes (up to the fold's rounding)
            unpruned = _expected(inference_model(load_model(tmp_path / "dense.pt"), "fused").eval(), paths[0], 0.5)
            assert np.mean(got == want) > 0.99 and np.mean(got == unpruned) < np.mean(got == want)
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(paths[0]), "--out", str(tmp_path / "ev"),
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "ev" / "eval-metrics.json").read_text())
    labels = np.load(paths[0])["labels"]
    assert report["accuracy"] == pytest.approx(float(np.mean(want == labels)), abs=1e-6)


def test_predict_and_eval_run_a_checkpoint_with_voxel_prunes(tmp_path, capsys):
    """A checkpoint of a model given VoxelPrune by models.add_voxel_prune
    (config voxel_prune: models.voxel_prunes; a magnitude score and a
    learned one) ran in predict and eval as the unpruned model (a magnitude
    VoxelPrune holds no tensor) or was refused (a learned one); both now run
    the model with its pruners, as load_model gives it, fused too (the
    fused copy runs its own)."""
    from pointsparse import checkpoint
    from pointsparse.app.evaluate import inference_model
    from pointsparse.models import add_voxel_prune, voxel_prunes

    state = load_training(_checkpoint(tmp_path / "dense.pt"))
    model = load_model(tmp_path / "dense.pt")
    add_voxel_prune(model, "fuse.0", 0.3)
    add_voxel_prune(model, "fuse.2", 0.5, "learned", model.fuse[2][0].main[0].in_channels)
    ckpt = tmp_path / "prune.pt"
    checkpoint.save(ckpt, dict(state, model=model.state_dict(),
                               config=dict(state["config"], voxel_prune=voxel_prunes(model))))
    paths = _clouds(tmp_path / "in", 1)
    loaded = load_model(ckpt)
    assert voxel_prunes(loaded) == voxel_prunes(model)
    want = _expected(model.eval(), paths[0], 0.5)
    assert not np.array_equal(want, _expected(load_model(tmp_path / "dense.pt"), paths[0], 0.5))
    for inference in ("float32", "fused"):
        out = tmp_path / f"pred-{inference}"
        assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(paths[0]), "--out", str(out),
                         "--inference", inference, "--no-progress"]) == 0
        got = np.load(out / f"{paths[0].stem}.npy")
        fused = _expected(inference_model(loaded, inference).eval(), paths[0], 0.5)
        assert np.array_equal(got, fused) and (inference == "fused" or np.array_equal(got, want))
        if inference == "fused":  # its pruners run: the eval model's classes (up to the fold's rounding), not
            # the fused unpruned model's
            unpruned = _expected(inference_model(load_model(tmp_path / "dense.pt"), "fused").eval(), paths[0], 0.5)
            assert np.mean(got == want) > 0.99 and np.mean(got == unpruned) < np.mean(got == want)
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(paths[0]), "--out", str(tmp_path / "ev"),
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "ev" / "eval-metrics.json").read_text())
    labels = np.load(paths[0])["labels"]
    assert report["accuracy"] == pytest.approx(float(np.mean(want == labels)), abs=1e-6)


def test_predict_and_eval_run_a_checkpoint_with_a_stride_1_voxel_prune(tmp_path):
    """A VoxelPrune that add_voxel_prune put at stride 1 (the last decoder
    stage's input) gives logits on the kept voxels only: predict read them
    as logits[inverse] and failed with a bare IndexError (or, where every
    point's voxel row was below the kept count, gave points other voxels'
    classes). Each point now reads its voxel's logits through devoxelize
    (zeros, class 0, for the points of dropped voxels), in predict and eval."""
    import pointsparse as ps
    from pointsparse import checkpoint
    from pointsparse.models import add_voxel_prune, voxel_prunes

    state = load_training(_checkpoint(tmp_path / "dense.pt"))
    model = load_model(tmp_path / "dense.pt")
    add_voxel_prune(model, "fuse.3", 0.5)
    ckpt = tmp_path / "prune.pt"
    checkpoint.save(ckpt, dict(state, model=model.state_dict(),
                               config=dict(state["config"], voxel_prune=voxel_prunes(model))))
    paths = _clouds(tmp_path / "in", 1)
    v = voxelize_sample(read_cloud(paths[0]), 0.5, 255)
    batch = Batch.of([v])
    with torch.no_grad():
        out = model.eval()(batch.input)
    assert 0 < len(out) < len(batch.input)
    want = ps.devoxelize(out, batch.inverse).argmax(1).numpy()
    assert np.array_equal(predict(model, batch)[1].numpy(), want)
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(paths[0]), "--out", str(out),
                     "--no-progress"]) == 0
    assert np.array_equal(np.load(out / f"{paths[0].stem}.npy"), want)
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(paths[0]), "--out", str(tmp_path / "ev"),
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "ev" / "eval-metrics.json").read_text())
    labels = np.load(paths[0])["labels"]
    assert report["accuracy"] == pytest.approx(float(np.mean(want == labels)), abs=1e-6)
    # its program: the logits of the kept voxels with their coords (the meta says so), scored alike
    program = tmp_path / "prune.pt2"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(program)]) == 0
    from pointsparse import export

    loaded = export.ProgramModel.load(program)
    assert loaded.output == "sparse" and "kept" in loaded.meta["output"]
    # (the meta names every output of the raw program, the selection's record after feats, coords and stride)
    assert loaded.records_kept and "rows int64 (M,)" in loaded.meta["output"]
    assert cli.main(["eval", "--program", str(program), "--data", str(paths[0]), "--out", str(tmp_path / "evp"),
                     "--no-progress"]) == 0
    report = json.loads((tmp_path / "evp" / "eval-metrics.json").read_text())
    assert report["accuracy"] == pytest.approx(float(np.mean(want == labels)), abs=1e-6)
    assert "epoch" in report and report["epoch"] is None  # (a program: no checkpoint epoch)
    assert cli.main(["predict", "--program", str(program), "--data", str(paths[0]), "--out", str(tmp_path / "pp"),
                     "--no-progress"]) == 0
    assert np.array_equal(np.load(tmp_path / "pp" / f"{paths[0].stem}.npy"), want)


@pytest.mark.parametrize("host_frozen", [False, True])
def test_predict_and_eval_keep_what_they_loaded_out_of_the_collectors_passes(tmp_path, monkeypatch, host_frozen):
    """While predict and eval run their model cloud after cloud, what was alive when they started (torch, the
    model, a program's graph) is frozen out of the cyclic collector (whose full passes traversed every such
    object: 150-190 ms inside one cloud's call on the north star's program, bench/RESULTS.md stop 51), and put
    back when they end; where the process froze objects itself, they leave its policy alone."""
    import gc

    from pointsparse.app import evaluate as evaluate_cmd
    from pointsparse.app import scoring

    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    paths = _clouds(tmp_path / "in")
    seen = []
    real_predict, real_evaluate = scoring.predict, evaluate_cmd.evaluate

    def predict_spy(*args, **kwargs):
        seen.append(("predict", gc.get_freeze_count()))
        return real_predict(*args, **kwargs)

    def evaluate_spy(*args, **kwargs):
        seen.append(("eval", gc.get_freeze_count()))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(scoring, "predict", predict_spy)
    monkeypatch.setattr(evaluate_cmd, "evaluate", evaluate_spy)
    if host_frozen:
        gc.freeze()
    try:
        before = gc.get_freeze_count()
        assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--out",
                         str(tmp_path / "pred"), "--no-progress"]) == 0
        after_predict = gc.get_freeze_count()
        assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--no-progress",
                         "--out", str(tmp_path / "eval")]) == 0
        after_eval = gc.get_freeze_count()
    finally:
        gc.unfreeze()
    names = [name for name, _ in seen]
    assert names[:len(paths)] == ["predict"] * len(paths) and names.count("eval") == 1
    if host_frozen:  # (nothing frozen on top, nothing put back: the count only falls as frozen objects die)
        assert before > 100_000 and all(count <= before for _, count in seen)
        assert after_eval <= after_predict <= before and after_eval > before - 1000
    else:
        assert before == after_predict == after_eval == 0 and all(count > 100_000 for _, count in seen)


def test_commands_refuse_a_checkpoint_whose_weights_hold_nan(tmp_path, capsys):
    """A checkpoint whose weights hold NaN (a diverged run's, a damaged file's) ran silently: eval scored it,
    export wrote it, predict gave every point class 0 (training refuses to write such weights; reading them
    was not checked). Each command now refuses it naming the file and the tensor."""
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    state = torch.load(ckpt, weights_only=True)
    name = next(k for k, v in state["model"].items() if v.is_floating_point() and k.endswith("weight"))
    state["model"][name] = state["model"][name] * float("nan")
    torch.save(state, ckpt)
    paths = _clouds(tmp_path / "in")
    for argv in (["predict", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--out", str(tmp_path / "p"),
                  "--no-progress"],
                 ["eval", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--no-progress", "--out",
                  str(tmp_path / "e")],
                 ["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.pt2")]):
        capsys.readouterr()
        assert cli.main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert f"checkpoint {ckpt}: {name} holds NaN or inf" in err, (argv[0], err)
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "p").exists()


def test_predict_skip_nonfinite_writes_a_row_for_every_point_of_the_file(tmp_path, capsys):
    """Organised clouds (ROS PCDs, range images) mark points without a return
    as NaN: predict refused the whole file, and filtering it first left
    predictions that no longer lined up with it. --skip-nonfinite predicts
    the finite points and writes -1 (.npy) or raw id 0, unlabeled (.label),
    for the others, in the file's order."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    model = load_model(ckpt).eval()
    scene = generated.outdoor_scene(seed=5, beams=16, azimuth_steps=256)
    xyz = scene.xyz.astype(np.float32).copy()
    bad = np.zeros(len(xyz), bool)
    bad[::7] = True
    xyz[bad] = np.nan
    xyz[3, 1] = np.inf
    bad[3] = True
    cloud = tmp_path / "organised.npz"
    np.savez(cloud, xyz=xyz, intensity=scene.intensity)
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(out),
                     "--no-progress"]) == 2
    assert "--skip-nonfinite" in capsys.readouterr().err  # the refusal says what to do
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(out),
                     "--no-progress", "--skip-nonfinite"]) == 0
    got = np.load(out / "organised.npy")
    assert got.shape == (len(xyz),) and (got[bad] == -1).all()
    finite = tmp_path / "finite.npz"
    np.savez(finite, xyz=xyz[~bad], intensity=scene.intensity[~bad])
    assert np.array_equal(got[~bad], _expected(model, finite, 0.5))  # as the finite points alone
    label = tmp_path / "label"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(label),
                     "--format", "label", "--label-map", str(_generated_map(tmp_path)), "--no-progress",
                     "--skip-nonfinite"]) == 0
    raw = np.fromfile(label / "organised.label", dtype="<u4")
    assert raw.shape == (len(xyz),) and (raw[bad] == 0).all() and (raw[~bad] > 0).all()


def _generated_map(tmp_path):
    path = tmp_path / "gen.json"
    classes = list(generated.OUTDOOR_CLASSES)
    path.write_text(json.dumps({"classes": classes, "map": {str(100 + i): i for i in range(len(classes))}}))
    return path


def test_inference_model_of_a_model_inside_maps_ahead():
    """inference_model takes a model already wrapped in nn.MapsAhead: an
    SPVCNN's bf16 form (voxel branch bfloat16, point branch float32) was an
    AttributeError ('MapsAhead' object has no attribute 'to_bf16_inference');
    the wrapped copy now gives the bare model's bf16 logits, bit for bit."""
    import pointsparse as ps
    from pointsparse import nn as spnn
    from pointsparse.app.evaluate import inference_model

    torch.manual_seed(0)
    net = SPVCNN(4, 3, cr=0.125, blocks=1).eval()
    g = torch.Generator().manual_seed(1)
    points = torch.rand(300, 3, generator=g) * 8
    x, inverse = ps.voxelize(points, torch.randn(300, 4, generator=g), voxel_size=1.0)
    batch = torch.zeros(300, dtype=torch.long)
    wrapped = inference_model(spnn.MapsAhead(net), "bf16")
    bare = inference_model(net, "bf16")
    assert isinstance(wrapped, spnn.MapsAhead) and wrapped.model.classifier.weight.dtype == torch.float32
    assert next(wrapped.model.unet.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        voxels = x.with_feats(x.feats.bfloat16())
        assert torch.equal(wrapped(voxels, inverse, points, batch), bare(voxels, inverse, points, batch))


def test_predict_writes_semantic3d_labels_files(tmp_path):
    """Semantic3D's benchmark takes one text label a line (<name>.labels);
    predict wrote SemanticKITTI's binary .label only. --format labels writes
    the raw ids (Semantic3D's map for a model of its classes), never over the
    scan's own .labels beside it, and refuses an --out holding another
    format's predictions."""
    scan, rng = _semantic3d_model_and_scan(tmp_path, low_intensity=-2048)
    truth = scan.with_suffix(".labels")
    truth.write_text("\n".join(str(v) for v in rng.integers(0, 9, 300)) + "\n")
    before = truth.read_bytes()
    base = ["predict", "--checkpoint", str(tmp_path / "s3d.pt"), "--data", str(scan), "--no-progress"]
    out = tmp_path / "pred"
    assert cli.main([*base, "--out", str(out), "--format", "labels"]) == 0
    written = np.array([int(v) for v in (out / "sg27_station10.labels").read_text().split()])
    model = load_model(tmp_path / "s3d.pt").eval()
    expected = predict(model, Batch.of([voxelize_sample(read_semantic3d(scan), 0.5, 255)]))[1].numpy()
    assert np.array_equal(written, expected + 1)  # (Semantic3D's raw ids: class i is id i + 1)
    assert json.loads((out / "classes.json").read_text())["format"] == "labels"
    assert cli.main([*base, "--out", str(scan.parent), "--format", "labels"]) == 2  # (its own .labels there)
    assert truth.read_bytes() == before
    assert cli.main([*base, "--out", str(out)]) == 2  # (an --out of .labels predictions: npy refused)


def test_eval_warns_where_most_points_fall_outside_the_label_map(tmp_path, capsys):
    """eval of raw SemanticKITTI .label files read with semantic-kitti-learning (a map of the 0-19 learning
    ids; the real scan keeps 0.5% of its points) scored the few raw ids that happen to be learning ids and
    printed an mIoU near 0 without a word. Where more than half of the points carry the ignore index, eval
    warns on stderr, naming the data, the share and the label map; with the files' own map, no warning."""
    scene = generated.outdoor_scene(seed=21, beams=16, azimuth_steps=256)
    n = len(scene.xyz)
    seq = tmp_path / "seq"
    (seq / "velodyne").mkdir(parents=True)
    (seq / "labels").mkdir()
    np.c_[scene.xyz, scene.intensity].astype(np.float32).tofile(seq / "velodyne" / "000000.bin")
    raw = np.where(np.arange(n) % 10 == 0, 10, 40).astype(np.uint32)  # 10 car (a learning id), 40 road (none)
    raw.tofile(seq / "labels" / "000000.label")
    classes = load_label_map("semantic-kitti").classes
    state = torch.load(_checkpoint(tmp_path / "m.pt"), weights_only=False)
    torch.manual_seed(0)
    state["model"] = MinkUNet(NUM_FEATURES, len(classes), cr=0.25, blocks=1).state_dict()
    state["config"]["classes"] = list(classes)
    torch.save(state, tmp_path / "sk.pt")
    for label_map, warned in (("semantic-kitti-learning", True), ("semantic-kitti", False)):
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "sk.pt"), "--data", str(seq), "--label-map",
                         label_map, "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert ("warning:" in err) == warned, (label_map, err)
        if warned:
            assert "90.0% of the points" in err and repr(load_label_map(label_map).name) in err and \
                "--label-map" in err, err


def test_eval_skip_nonfinite_scores_the_finite_points_of_organised_clouds(tmp_path, capsys):
    """predict took organised clouds (points without a return are NaN) with --skip-nonfinite; eval had no
    such flag: a labelled organised cloud could be segmented but not scored (refused, without a word on what
    to do, as the whole file). eval --skip-nonfinite scores the finite points, as the same cloud less the
    others; without it the refusal names the flag."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    scene = generated.outdoor_scene(seed=5, beams=16, azimuth_steps=256)
    xyz = scene.xyz.astype(np.float32).copy()
    bad = np.zeros(len(xyz), bool)
    bad[::7] = True
    xyz[bad] = np.nan
    cloud, finite = tmp_path / "organised.npz", tmp_path / "finite.npz"
    np.savez(cloud, xyz=xyz, intensity=scene.intensity, labels=scene.labels)
    np.savez(finite, xyz=xyz[~bad], intensity=scene.intensity[~bad], labels=scene.labels[~bad])
    argv = ["eval", "--checkpoint", str(ckpt), "--no-progress"]
    assert cli.main([*argv, "--data", str(cloud)]) == 2
    err = capsys.readouterr().err
    assert str(cloud) in err and "--skip-nonfinite" in err, err
    cms = []
    for data, more in ((cloud, ["--skip-nonfinite"]), (finite, [])):
        out = tmp_path / f"ev-{data.stem}"
        assert cli.main([*argv, "--data", str(data), "--out", str(out), *more]) == 0, capsys.readouterr().err
        cms.append(json.loads((out / "eval-metrics.json").read_text())["confusion"])
    assert cms[0] == cms[1] and np.asarray(cms[0]).sum() > 0


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{ckpt}", "--val-scenes", "1", "--no-progress"],
    ["eval", "--checkpoint", "{ckpt}", "--data", "generated", "--val-scenes", "1", "--no-progress"],
    ["prune", "channels", "--checkpoint", "{ckpt}", "--out", "{tmp}/p"],
    ["prune", "channels", "--checkpoint", "{ckpt}", "--data", "generated-indoor", "--out", "{tmp}/p"],
])
def test_skip_nonfinite_on_generated_scenes_is_refused(tmp_path, capsys, argv):
    """train refuses --skip-nonfinite on the generated scenes (they hold no
    NaN or inf, so it would be ignored); eval and prune on a checkpoint
    took it there, on --data generated or a run's generated data, and
    ignored it without a word, as they do not --label-map. A one-line error
    naming the flag, exit status 2, nothing written."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    argv = [a.replace("{ckpt}", str(ckpt)).replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main([*argv, "--skip-nonfinite"]) == 2
    err = capsys.readouterr().err
    assert "error: --skip-nonfinite " in err and "generated scenes" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]



def _scene_las(path, scene, rows) -> None:
    """The generated ``scene``'s points ``rows`` (a bool mask) as a LAS 1.4 file (point format 6): its training
    ids as the classification, its intensity as uint16."""
    laspy = pytest.importorskip("laspy")
    header = laspy.LasHeader(point_format=6, version="1.4")
    header.scales = np.array([0.001, 0.001, 0.001])
    las = laspy.LasData(header)
    xyz = scene.xyz[rows].astype(np.float64)
    las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    las.classification = scene.labels[rows].astype(np.uint8)
    las.intensity = np.round(scene.intensity[rows, 0] * 60000).astype(np.uint16)
    las.write(path)


def _withheld_las(tmp_path):
    """(file, file of its kept points alone, withheld mask): a generated scene as LAS with every 5th point (and
    the first) flagged withheld, and the same scene less those points."""
    laspy = pytest.importorskip("laspy")
    scene = generated.outdoor_scene(seed=5, beams=16, azimuth_steps=256)
    withheld = np.zeros(len(scene), bool)
    withheld[::5] = True
    cloud, kept = tmp_path / "withheld.las", tmp_path / "kept.las"
    _scene_las(cloud, scene, np.ones(len(scene), bool))
    las = laspy.read(cloud)
    las.withheld = withheld.astype(np.uint8)
    las.write(cloud)
    _scene_las(kept, scene, ~withheld)
    return cloud, kept, withheld


def test_predict_and_eval_leave_out_withheld_las_points(tmp_path, capsys):
    """LAS points flagged withheld (to be treated as deleted) were run through the network with the others,
    shaping their neighbours' predictions, and scored by eval. They are left out now: predict runs the
    other points and still writes one row per point of the file, -1 (.npy) or raw id 0, unlabeled (.label)
    for a withheld one, as --skip-nonfinite does for points without a position; eval scores the cloud as the
    same file without them."""
    ckpt = _checkpoint(tmp_path / "m.pt")
    model = load_model(ckpt).eval()
    cloud, kept, withheld = _withheld_las(tmp_path)
    out = tmp_path / "pred"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(out),
                     "--no-progress"]) == 0
    got = np.load(out / "withheld.npy")
    assert got.shape == (len(withheld),) and (got[withheld] == -1).all()
    assert np.array_equal(got[~withheld], _expected(model, kept, 0.5))  # as the kept points alone
    label = tmp_path / "label"
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--out", str(label),
                     "--format", "label", "--label-map", str(_generated_map(tmp_path)), "--no-progress"]) == 0
    raw = np.fromfile(label / "withheld.label", dtype="<u4")
    assert raw.shape == (len(withheld),) and (raw[withheld] == 0).all() and (raw[~withheld] > 0).all()
    cms = []
    for data in (cloud, kept):
        ev = tmp_path / f"ev-{data.stem}"
        assert cli.main(["eval", "--checkpoint", str(ckpt), "--no-progress", "--data", str(data), "--out",
                         str(ev)]) == 0, capsys.readouterr().err
        cms.append(json.loads((ev / "eval-metrics.json").read_text())["confusion"])
    assert cms[0] == cms[1] and np.asarray(cms[0]).sum() == (~withheld).sum()

def test_eval_of_clouds_without_points_says_so(tmp_path, capsys):
    """eval of clouds that hold no point at all (an empty .npz) refused them as clouds "every point's label
    is the ignore index", pointing at --ignore-index and the label map, which play no part: the refusal now
    says the clouds hold no points."""
    empty = tmp_path / "empty.npz"
    np.savez(empty, xyz=np.zeros((0, 3), np.float32), labels=np.zeros(0, np.int64))
    assert cli.main(["eval", "--checkpoint", str(_checkpoint(tmp_path / "m.pt")), "--data", str(empty),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--data: the clouds hold no points: nothing to score" in err and "ignore index" not in err, err


def test_predict_label_format_names_where_its_default_label_map_came_from(tmp_path, capsys):
    """predict --format label of .bin scans with a model of other classes than SemanticKITTI's, and no
    --label-map: refused as "label map 'SemanticKITTI ...' has the classes [...]; the model predicts [...]",
    a map the user never named, with no word on what to do. The refusal now says the map was the default for
    .bin files and asks for --label-map of the model's classes."""
    scene = generated.outdoor_scene(seed=21, beams=16, azimuth_steps=256)
    scan = tmp_path / "seq" / "velodyne" / "000000.bin"
    scan.parent.mkdir(parents=True)
    np.c_[scene.xyz, scene.intensity].astype(np.float32).tofile(scan)
    assert cli.main(["predict", "--checkpoint", str(_checkpoint(tmp_path / "m.pt")), "--data", str(scan),
                     "--format", "label", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has the classes" in err and "the default for .bin files" in err and \
        "give --label-map of the model's classes" in err, err


def test_the_mostly_ignored_warning_names_the_option_that_gave_the_map(capsys):
    """train's validation check warned "(--label-map)" where the validation clouds were read with
    --val-label-map's map; the warning names the option in play."""
    from types import SimpleNamespace

    from pointsparse.app import evaluate, train

    label_map = load_label_map("semantic-kitti")
    clouds = [SimpleNamespace(labels=np.array([0, 255, 255, 255]), name="a")]
    source = type("Source", (), {"label_map": label_map, "__len__": lambda self: 1,
                                 "__getitem__": lambda self, i: clouds[i]})()
    for args, flag in ((SimpleNamespace(val_label_map="semantic-kitti"), "--val-label-map"),
                       (SimpleNamespace(val_label_map=None), "--label-map")):
        train._check_scored(source, len(label_map.classes), 255, None, train._val_map_flag(args))
        err = capsys.readouterr().err
        assert "75.0% of the points" in err and f"({flag})" in err, err


def test_a_cloud_mostly_ignored_beside_good_ones_is_named(capsys):
    """eval (and train's validation) warned only where more than half of all the points were ignored: a file whose
    labels are all ignored through the map (labels of other ids) beside good files went unmentioned, where train
    names such a training cloud. The check now names such clouds where the share of all stays under the bar, and
    says nothing twice where it warned of the whole."""
    from types import SimpleNamespace

    from pointsparse.app import evaluate

    label_map = load_label_map("semantic-kitti")

    def source(*clouds):
        return type("Source", (), {"label_map": label_map, "__len__": lambda self: len(clouds),
                                   "__getitem__": lambda self, i: clouds[i]})()

    good = [SimpleNamespace(labels=np.zeros(40, dtype=np.int64), name=f"good{i}.npz") for i in range(3)]
    bad = SimpleNamespace(labels=np.full(40, 255), name="other-ids.npz")
    evaluate.check_scored_labels(source(*good, bad), len(label_map.classes), 255, "--data")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1, err
    assert ("warning: --data: 1 of 4 labelled clouds have more than 50% of their points ignored, the first "
            f"other-ids.npz (100.0%): raw labels the label map {label_map.name!r} does not list") in err, err
    evaluate.check_scored_labels(source(good[0], bad, bad), len(label_map.classes), 255, "--data")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "66.7% of the points" in err, err
    evaluate.check_scored_labels(source(*good), len(label_map.classes), 255, "--data")
    assert capsys.readouterr().err == ""


def _labelled_run(tmp_path, label_map: str, recorded):
    """A run's checkpoint (tmp_path / c.pt) of a sharp MinkUNet over ``label_map``'s classes, its config
    naming the map and its args recording ``recorded`` as --label-map: (the map, model, config, path)."""
    from pointsparse import checkpoint

    labels = load_label_map(label_map)
    torch.manual_seed(0)
    model = _sharp(MinkUNet(NUM_FEATURES, len(labels.classes), cr=0.25, blocks=1))
    config = {"in_channels": NUM_FEATURES, "classes": list(labels.classes), "cr": 0.25, "blocks": 1,
              "voxel_size": 0.5, "ignore_index": 255, "model": "minkunet", "label_map": label_map}
    ckpt = tmp_path / "c.pt"
    checkpoint.save(ckpt, {"model": model.state_dict(), "config": config, "args": {"label_map": recorded}})
    return labels, model, config, ckpt


def test_predict_label_format_takes_the_map_the_run_recorded(tmp_path, capsys):
    """A run on SemanticKITTI .bin scans without --label-map (read through SemanticKITTI's map, which its
    config records) asked for --label-map in predict --format label of other files (Open3D-ML .npy scans):
    only .bin inputs took SemanticKITTI's map. The map the run recorded is the run's label map now: the same
    raw ids as --label-map semantic-kitti, for any input format; a checkpoint recording raw labels (None) is
    still asked for one."""
    from pointsparse import checkpoint

    sk, model, config, ckpt = _labelled_run(tmp_path, "semantic-kitti", None)
    scene = generated.outdoor_scene(seed=21, beams=16, azimuth_steps=256)
    cloud = tmp_path / "in" / "scan_points.npy"
    cloud.parent.mkdir()
    np.save(cloud, scene.xyz.astype(np.float32))
    written = []
    for i, flags in enumerate(([], ["--label-map", "semantic-kitti"])):
        out = tmp_path / f"out{i}"
        assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--format", "label",
                         "--out", str(out), "--no-progress", *flags]) == 0, capsys.readouterr().err
        written.append(np.fromfile(out / "scan_points.label", np.uint32))
    assert np.array_equal(written[0], written[1]) and set(np.unique(written[0])) <= set(sk.mapping)
    checkpoint.save(ckpt, {"model": model.state_dict(), "config": {**config, "label_map": None}})
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(cloud), "--format", "label", "--out",
                     str(tmp_path / "out2"), "--no-progress"]) == 2
    assert "give --label-map" in capsys.readouterr().err


def test_predict_label_format_refuses_a_runs_learning_ids_for_bin_scans(tmp_path, capsys):
    """A run on Open3D-ML learning ids (--label-map semantic-kitti-learning) asked to write the .label of
    SemanticKITTI .bin scans with no --label-map: its map writes car as 1, where a .bin scan's labels are read
    as SemanticKITTI's raw ids (car 10). predict refuses naming both maps and the flag to give (the hint once
    ended in a stray quote: "for these clouds')"); --label-map semantic-kitti writes the benchmark's raw ids."""
    ckpt = _labelled_run(tmp_path, "semantic-kitti-learning", "semantic-kitti-learning")[3]
    scene = generated.outdoor_scene(seed=21, beams=16, azimuth_steps=256)
    scan = tmp_path / "seq" / "velodyne" / "000000.bin"
    scan.parent.mkdir(parents=True)
    np.c_[scene.xyz, scene.intensity].astype(np.float32).tofile(scan)
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(scan), "--format", "label",
                     "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{scan} is read through the label map 'semantic-kitti'" in err and "raw id for car is 10" in err and \
        "'semantic-kitti-learning', writes 1" in err and "(--label-map semantic-kitti for these clouds)" in err, err
    assert not (tmp_path / "out" / "predictions").exists()
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(scan), "--format", "label", "--label-map",
                     "semantic-kitti", "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    written = np.fromfile(tmp_path / "out" / "predictions" / "000000.label", np.uint32)
    assert len(written) == len(scene.xyz) and set(np.unique(written).tolist()) <= set(load_label_map(
        "semantic-kitti").inverse.values())


def test_predict_of_generated_scenes_says_it_reads_files(tmp_path, capsys):
    """``predict --data generated`` said 'generated: no such file or folder';
    it names what predict reads now, and where generated scenes are scored.
    A folder named so is read as files still (is_generated's rule)."""
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "none.pt"), "--data", "generated",
                     "--out", str(tmp_path / "p")]) == 2
    assert ("--data generated: predict writes the classes of point cloud files, and generated scenes are none "
            "(eval --val-scenes N scores generated ones)") in capsys.readouterr().err


def test_a_label_map_that_sends_a_raw_id_past_its_classes_says_how_to_ignore_it():
    """Mapping a raw id to 255 (a common way to ignore it) was refused as
    'outside the 2 classes' alone; the message now says to leave it out."""
    with pytest.raises(ValueError, match=r"raw id 0 maps to 255, outside the 2 classes \(to ignore it, leave it out "
                                         r"of the map: what the map does not list is ignored\)"):
        LabelMap(["a", "b"], {0: 255, 1: 0, 2: 1})


def test_clouds_lacking_a_feature_the_model_trained_on_are_noted(tmp_path, capsys):
    """An xyz-only cloud given to a model trained on clouds with intensity ran with intensity 0 for every point
    without a word (a new user's scans: 77.7% against 77.0% there). train records the optional features its
    clouds held (``point_features``); predict and eval note the clouds that lack one; a checkpoint recording
    none (older, or trained without) notes nothing."""
    paths = _clouds(tmp_path / "train", 2)
    run = tmp_path / "run"
    assert cli.main(["train", "--data", *map(str, paths), "--epochs", "1", "--voxel-size", "0.5", "--cr",
                     "0.25", "--blocks", "1", "--val-fraction", "0.5", "--out", str(run), "--no-progress"]) == 0
    assert checkpoint.load(run / "checkpoint.pt")["config"]["point_features"] == ["intensity"]
    scene = generated.outdoor_scene(seed=30, beams=16, azimuth_steps=256)
    bare = tmp_path / "bare"
    bare.mkdir()
    np.save(bare / "xyz.npy", scene.xyz)
    np.savez(bare / "labelled.npz", xyz=scene.xyz, labels=scene.labels)
    capsys.readouterr()
    for argv in (["predict", "--data", str(bare), "--out", str(tmp_path / "p")],
                 ["eval", "--data", str(bare / "labelled.npz"), "--out", str(tmp_path / "e")]):
        assert cli.main([*argv, "--checkpoint", str(run / "checkpoint.pt"), "--no-progress"]) == 0
        err = capsys.readouterr().err
        count = "2 of the 2" if argv[0] == "predict" else "1 of the 1"
        assert f"note: {count} clouds hold no intensity" in err and "labelled.npz" in err, err
    assert cli.main(["predict", "--data", str(paths[0]), "--out", str(tmp_path / "q"), "--checkpoint",
                     str(run / "checkpoint.pt"), "--no-progress"]) == 0
    assert "hold no" not in capsys.readouterr().err
    older = _checkpoint(tmp_path / "older.pt")  # (no point_features in its config)
    assert cli.main(["predict", "--data", str(bare), "--out", str(tmp_path / "r"), "--checkpoint", str(older),
                     "--no-progress"]) == 0
    assert "hold no" not in capsys.readouterr().err


def test_eval_and_train_name_the_cloud_whose_extent_does_not_fit_the_voxel_grid(tmp_path, capsys):
    """One tile with a corrupt point at 1e30 m among good ones: predict named the file, but eval and train
    said "voxel_size 0.5 puts the cloud's extent of ..." naming none, and train gave the extent of the
    points after its augmentation (rotated), which matches nothing in the file. Both name the file now, and
    train refuses it as it reads its clouds, before "data ready", with the file's own extent."""
    good = _clouds(tmp_path / "in", 2)
    scene = generated.outdoor_scene(seed=25, beams=16, azimuth_steps=256)
    xyz = scene.xyz.copy()
    xyz[7, 0] = 1e30
    bad = tmp_path / "in" / "far.npz"
    np.savez(bad, xyz=xyz, labels=scene.labels, intensity=scene.intensity)
    said = f"{bad}: voxel_size 0.5 puts the cloud's extent of [1.00"
    assert cli.main(["eval", "--checkpoint", str(_checkpoint(tmp_path / "m.pt")), "--data", *map(str, good),
                     str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert said in err and "a corrupt or outlier point" in err, err
    for data in (["--data", str(good[0]), str(bad), "--val-data", str(good[1])],
                 ["--data", *map(str, good), "--val-data", str(bad)]):
        assert cli.main(["train", *data, "--epochs", "1", "--voxel-size", "0.5", "--cr", "0.25", "--blocks", "1",
                         "--out", str(tmp_path / "run"), "--no-progress"]) == 2
        out, err = capsys.readouterr()
        assert said in err and "augmentation" not in err and "data ready" not in out + err, (out, err)


def test_a_feature_the_training_clouds_lacked_is_0_with_a_note(tmp_path, capsys):
    """A cloud with colour given to a model whose training clouds held none (its config's ``point_features``:
    intensity alone) was fed its colour, which the model never saw, without a word. predict and eval set it to
    0, as in training, and note the cloud and the feature; a checkpoint that records no point_features (an
    older one) feeds the colour as before."""
    ckpt = _checkpoint(tmp_path / "older.pt")
    state = torch.load(ckpt, weights_only=False)
    state["config"]["point_features"] = ["intensity"]
    torch.save(state, tmp_path / "m.pt")
    scene = generated.outdoor_scene(seed=22, beams=16, azimuth_steps=256)
    rgb = np.random.default_rng(0).integers(0, 256, (len(scene.xyz), 3)).astype(np.uint8)
    colour, plain = tmp_path / "in" / "colour.npz", tmp_path / "plain" / "colour.npz"
    for path, extra in ((colour, {"rgb": rgb}), (plain, {})):
        path.parent.mkdir()
        np.savez(path, xyz=scene.xyz, labels=scene.labels, intensity=scene.intensity, **extra)
    model = load_model(ckpt).eval()
    assert not np.array_equal(_expected(model, colour, 0.5), _expected(model, plain, 0.5))  # (colour tells)
    for name, expected in (("m.pt", plain), ("older.pt", colour)):
        out = tmp_path / f"p-{name}"
        assert cli.main(["predict", "--checkpoint", str(tmp_path / name), "--data", str(colour), "--out", str(out),
                         "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert np.array_equal(np.load(out / "colour.npy"), _expected(model, expected, 0.5))
        noted = f"note: 1 of the 1 clouds hold rgb ({colour}), which the model's training clouds did not: it is set"
        assert (noted in err) == (name == "m.pt"), err
    cms = []
    for data in (colour, plain):
        out = tmp_path / f"e-{data.parent.name}"
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(data), "--out", str(out),
                         "--no-progress"]) == 0
        assert ("hold rgb" in capsys.readouterr().err) == (data == colour)
        cms.append(json.loads((out / "eval-metrics.json").read_text())["confusion"])
    assert cms[0] == cms[1]
    # prune's task on --data takes the clouds as eval does (its fine-tuning fed the colour)
    from pointsparse.app.tasks import checkpoint_batches

    batches = {data: checkpoint_batches(torch.load(tmp_path / "m.pt", weights_only=False), [str(data)])[0]
               for data in (colour, plain)}
    assert "1 of the 1 clouds hold rgb" in capsys.readouterr().err
    assert torch.equal(batches[colour].input.feats, batches[plain].input.feats)


def test_float32_positions_whose_step_passes_the_voxel_size_are_warned_of_once_per_file(tmp_path, capsys):
    """Absolute UTM positions stored as float32 (a step of 0.5 m at 6.8e6 m) merge voxels smaller than that
    step without a word (positions stored wider get Sample's warning, and the readers' shift). train, eval and
    predict warn once per file, naming it, the positions' reach, float32's step there and the voxel size; a
    cloud near the origin is not named."""
    near = _clouds(tmp_path / "in", 2)
    scene = generated.outdoor_scene(seed=23, beams=16, azimuth_steps=256)
    far = tmp_path / "in" / "far.npz"
    np.savez(far, xyz=(scene.xyz.astype(np.float64) + [2e7, 3e6, 0]).astype(np.float32), labels=scene.labels,
             intensity=scene.intensity)
    said = f"warning: {far}: its float32 positions reach 2e+07 m from the origin, where float32's step is 2 m, " \
           "coarser than the voxel size 0.5 m"
    ckpt = str(_checkpoint(tmp_path / "m.pt"))
    for argv in (["predict", "--checkpoint", ckpt, "--out", str(tmp_path / "p"), "--data", *map(str, near), str(far)],
                 ["eval", "--checkpoint", ckpt, "--data", *map(str, near), str(far)],
                 ["train", "--data", str(near[0]), str(far), "--val-data", str(near[1]), "--epochs", "1",
                  "--voxel-size", "0.5", "--cr", "0.25", "--blocks", "1", "--out", str(tmp_path / "run")]):
        assert cli.main([*argv, "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert err.count(said) == 1 and str(near[0]) + ":" not in err, (argv[0], err)


def test_predict_and_eval_count_one_cloud_in_the_singular(tmp_path, capsys):
    """predict and eval of one file said "1 clouds (...)" and "1 clouds in"."""
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    path, = _clouds(tmp_path / "in", count=1)
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--data", str(path), "--out", str(tmp_path / "p"),
                     "--no-progress"]) == 0
    assert "\n1 cloud (" in "\n" + capsys.readouterr().out
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(path), "--no-progress"]) == 0
    assert "\n1 cloud in " in capsys.readouterr().out
    from pointsparse.app import counted
    assert (counted(1, "epoch"), counted(0, "step"), counted(2, "voxel")) == ("1 epoch", "0 steps", "2 voxels")


def test_eval_holds_one_cloud_at_a_time(tmp_path, monkeypatch, capsys):
    """eval read every cloud and kept them all before scoring (about 36 B a
    point: SemanticKITTI's 4,071 validation scans, about 18 GB). It checks
    them in one reading and scores them in another, keeping one at a time:
    each file read twice, no earlier cloud alive at a read, the metrics those
    of the clouds kept (CloudFiles(keep=True)) in memory."""
    import gc
    import weakref
    from pointsparse.data import datasets

    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    paths = _clouds(tmp_path / "in", count=4)
    real, reads, alive_at_read = datasets.read_cloud, [], []
    held: list = []

    def counted_read(path, *args, **kwargs):
        gc.collect()
        alive_at_read.append(sum(r() is not None for r in held))
        sample = real(path, *args, **kwargs)
        reads.append(path)
        held.append(weakref.ref(sample))
        return sample

    monkeypatch.setattr(datasets, "read_cloud", counted_read)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--checkpoint", str(ckpt), "--data", *map(str, paths), "--out", str(out),
                     "--no-progress"]) == 0
    assert sorted(Path(p).name for p in reads) == sorted(p.name for p in paths * 2) and max(alive_at_read) <= 1
    got = json.loads((out / "eval-metrics.json").read_text())
    monkeypatch.setattr(datasets, "read_cloud", real)
    kept = datasets.CloudFiles(list(map(str, paths)))
    assert kept.keep and all(kept[i] is kept[i] for i in range(4))  # (the default keeps what it read)
    loose = datasets.CloudFiles(list(map(str, paths)), keep=False)
    first = loose[0]
    assert loose[0] is first and loose[1] is not None and loose[0] is not first  # (the last read alone kept)
    from pointsparse.app.scoring import evaluate as score
    from pointsparse.data import VoxelDataset
    model = load_model(ckpt).eval()
    cm, _ = score(model, VoxelDataset(kept, 0.5, 255), len(generated.OUTDOOR_CLASSES), 255, torch.device("cpu"))
    assert got["confusion"] == cm.tolist() and cm.sum() > 0
    with pytest.raises(TypeError, match="keep"):
        datasets.CloudFiles(list(map(str, paths)), keep="no")


def test_eval_names_its_pictures_under_out_as_typed_as_train_does(tmp_path, monkeypatch, capsys):
    """A review: eval's closing line named its pictures by metrics.json's absolute paths
    (``/home/.../ev/eval-confusion.png``) while it named its metrics.json, and train named its pictures,
    under ``--out`` as typed. The pictures are named as train names them."""
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(1)
    xyz = (rng.random((1500, 3)) * 20).astype(np.float32)
    np.savez(tmp_path / "c.npz", xyz=xyz, labels=rng.integers(0, 3, 1500))
    ckpt = _checkpoint(tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--checkpoint", "m.pt", "--data", "c.npz", "--out", "ev", "--no-progress"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("metrics: "))
    assert line == (f"metrics: {Path('ev', 'eval-metrics.json')}; pictures: {Path('ev', 'eval-confusion.png')}, "
                    f"{Path('ev', 'eval-topdown.png')}"), line
    report = json.loads((tmp_path / "ev" / "eval-metrics.json").read_text())
    assert all(Path(p).is_absolute() for p in report["pictures"].values()) and ckpt.is_file()
