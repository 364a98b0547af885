"""The tasks the pruning procedures and experiments run on: the generated scenes, and a checkpoint's clouds."""

import re

import torch

from pointsparse import SparseTensor
from pointsparse.app import tasks


def test_street_points_are_seeded_and_labelled():
    a, la = tasks.street_points(2000, seed=3)
    b, lb = tasks.street_points(2000, seed=3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape[1] == 3 and la.shape == (a.shape[0],)
    assert set(la.unique().tolist()) == {0, 1, 2, 3}


def test_scene_task_trains_and_scores():
    task = tasks.scene_task(seed=0, points=3000, voxel_size=0.5, width=4)
    x, y = task.batch_fn()
    assert isinstance(x, SparseTensor) and y.shape == (len(x),) and int(y.max()) <= 3
    model = task.make_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    task.train_fn(model, 2)
    assert any(not torch.equal(p, q) for p, q in zip(before, model.parameters()))
    score = task.eval_fn(model)
    assert 0.0 <= score <= 1.0


def test_scene_tensor_labels_voxels_by_majority(monkeypatch):
    # Voxel (0, 0, 0) holds labels [1, 1, 3] (majority 1; the largest id is 3),
    # voxel (2, 0, 0) holds [2, 0] (a tie: the smaller id) and voxel (0, 4, 0) one point.
    pts = torch.tensor([[0.1, 0.1, 0.1], [0.2, 0.3, 0.1], [0.4, 0.1, 0.2], [1.1, 0.1, 0.1], [1.2, 0.2, 0.2],
                        [0.1, 2.2, 0.1]])
    labels = torch.tensor([1, 3, 1, 2, 0, 3])
    monkeypatch.setattr(tasks, "street_points", lambda n, seed: (pts, labels))
    x, y = tasks.scene_tensor(0, voxel_size=0.5)
    by_voxel = {tuple(c[1:].tolist()): int(v) for c, v in zip(x.coords, y)}
    assert by_voxel == {(0, 0, 0): 1, (2, 0, 0): 0, (0, 4, 0): 3}
    assert y.dtype == torch.long
    g = torch.Generator().manual_seed(0)
    many = torch.rand(500, 3, generator=g) * 3
    many_labels = torch.randint(0, 4, (500,), generator=g)
    monkeypatch.setattr(tasks, "street_points", lambda n, seed: (many, many_labels))
    x, y = tasks.scene_tensor(0, voxel_size=0.5)
    for c, v in zip(x.coords[:, 1:].tolist(), y.tolist()):  # brute force per voxel
        held = many_labels[(torch.floor(many / 0.5).long() == torch.tensor(c)).all(1)].tolist()
        counts = [held.count(k) for k in range(4)]
        assert v == counts.index(max(counts)), (c, held)


def test_tasks_refuse_bad_arguments_before_any_work(monkeypatch):
    """digits_task and scene_task check their model arguments at once, naming
    them: an unknown digits model made a Task ('digits-bogus') whose
    make_model failed later, inside a procedure; batch_size 0 trained on
    empty batches (a NaN loss); scene_task(width=0) made a Task whose model
    failed to build later. Nothing is loaded or generated first."""
    import pytest

    monkeypatch.setattr(tasks, "_load_digits", lambda: pytest.fail("data loaded before the arguments were checked"))
    monkeypatch.setattr(tasks, "scene_tensor", lambda *a: pytest.fail("scenes made before the arguments were checked"))
    with pytest.raises(ValueError, match="digits model must be 'mlp', 'cnn' or 'deep'; got 'bogus'"):
        tasks.digits_task("bogus")
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match=f"batch_size must be (a positive int|an int >= 1); got {bad}"):
            tasks.digits_task("mlp", batch_size=bad)
    with pytest.raises(ValueError, match="width must be a positive int; got 0"):
        tasks.scene_task(width=0)


def test_prune_refuses_a_runs_map_whose_raw_ids_are_not_the_data_as_eval_does(tmp_path, capsys):
    """A run trained with --label-map semantic-kitti-learning (Open3D-ML learning ids) pruned on SemanticKITTI
    .bin scans with no --label-map: eval --data refused the pair (clouds.check_format_maps), prune read the
    scans' raw ids (car 10) through the learning map, every point ignored, and channels --criterion taylor
    scored on that loss and wrote a checkpoint, exit 0; the procedures' clouds (checkpoint_task) were read
    so too. prune refuses them now with eval's words, before --out; --label-map semantic-kitti reads them, and
    the npz of learning ids (its format takes no map) and an unlabelled .bin sweep are read as before."""
    import numpy as np
    import pytest

    from pointsparse import checkpoint
    from pointsparse.app import cli
    from pointsparse.data.readers import load_label_map
    from reference import scan_and_learning_ids
    from test_clouds import _run

    seq, learning = scan_and_learning_ids(tmp_path)
    ckpt = _run(tmp_path / "run" / "checkpoint.pt", load_label_map("semantic-kitti").classes,
                label_map="semantic-kitti-learning")
    state = checkpoint.load_training(ckpt)
    state["args"]["label_map"] = "semantic-kitti-learning"
    checkpoint.save(ckpt, state)
    said = "is read through the label map 'semantic-kitti' (its format's), whose raw id for car is 10; the run's " \
        "label map, 'semantic-kitti-learning', takes 1: give --label-map of these files' labels (--label-map " \
        "semantic-kitti for these clouds)"
    argv = ["prune", "channels", "--criterion", "taylor", "--checkpoint", str(ckpt)]
    assert cli.main([*argv, "--data", str(seq), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pointsparse prune: error: --data: {seq / 'velodyne' / '000000.bin'} ") and said in err, err
    assert not (tmp_path / "p").exists()
    with pytest.raises(ValueError, match="^--data: .*" + re.escape(said)):
        tasks.checkpoint_task(ckpt, [str(seq)], clouds=2)
    assert tasks.checkpoint_task(ckpt, [str(seq)], "semantic-kitti", clouds=2)[1].name == "checkpoint"
    for data, out in ((seq, "q"), (learning, "r")):
        more = ["--label-map", "semantic-kitti"] if data == seq else []
        assert cli.main([*argv, "--data", str(data), *more, "--out", str(tmp_path / out)]) == 0, \
            capsys.readouterr().err
    (tmp_path / "sweep").mkdir()  # (no labels: nothing read through a map; channels' example input)
    np.fromfile(seq / "velodyne" / "000000.bin", np.float32).tofile(tmp_path / "sweep" / "000000.bin")
    assert cli.main(["prune", "channels", "--checkpoint", str(ckpt), "--data", str(tmp_path / "sweep"), "--out",
                     str(tmp_path / "s")]) == 0, capsys.readouterr().err


def test_prune_names_the_file_that_lacks_labels(tmp_path, capsys):
    """prune's procedures on a --checkpoint take four clouds of --data (read cyclically), channels --criterion
    taylor one; a folder of a labelled and an unlabelled cloud was refused as "cloud 1 of --data <folder> has
    no labelled voxel (give clouds with labels)", which named neither the file nor what such a cloud lacks.
    The refusal names the file now (where --data does not name it alone), and says that it holds no labels or
    only labels the loss ignores."""
    import numpy as np

    from pointsparse.app import cli
    from test_clouds import _run

    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    np.savez(folder / "a.npz", xyz=rng.uniform(0, 8, (400, 3)).astype(np.float32), labels=rng.integers(0, 3, 400))
    np.savez(folder / "b.npz", xyz=rng.uniform(0, 8, (400, 3)).astype(np.float32))
    np.savez(tmp_path / "ignored.npz", xyz=rng.uniform(0, 8, (400, 3)).astype(np.float32),
             labels=np.full(400, 255))
    ckpt = _run(tmp_path / "run" / "checkpoint.pt", list("abc"), label_map=None)
    said = "has no labelled voxel: no labels, or every label the ignore index 255"
    for procedure, data, words in (
            (["sensitivity", "--quick"], folder, f"cloud 1 of --data {folder} ({folder / 'b.npz'}) {said}"),
            (["channels", "--criterion", "taylor"], folder / "b.npz", f"cloud 0 of --data {folder / 'b.npz'} {said}"),
            (["channels", "--criterion", "taylor"], tmp_path / "ignored.npz",
             f"cloud 0 of --data {tmp_path / 'ignored.npz'} {said}")):
        argv = ["prune", *procedure, "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "p")]
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "needs labelled clouds; " + words in err, (argv, err)
    assert not (tmp_path / "p").exists()
