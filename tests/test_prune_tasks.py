"""The generated-scene task the pruning procedures and experiments run on."""

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
