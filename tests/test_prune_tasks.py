"""The generated-scene task the pruning procedures and experiments run on."""

import torch

from pointsparse import SparseTensor
from pointsparse.prune import tasks


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
