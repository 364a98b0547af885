"""The Trainer loop (pointsparse.app.trainer): epochs against a plan that
may change, early stops, what is logged, loading timed inside the step."""

from __future__ import annotations

import time

import pytest
import torch

from pointsparse.app.trainer import Trainer, TrainingDiverged, check_finite_loss, fit_steps


def _toy(steps_per_epoch=3, delay=0.0):
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    loaded = []

    def data(epoch):
        for i in range(steps_per_epoch):
            time.sleep(delay)
            loaded.append((epoch, i))
            yield x, y

    def loss(m, batch):
        value = torch.nn.functional.mse_loss(m(batch[0]), batch[1])
        return value, float(value)

    return model, data, loss, loaded


def test_fit_runs_the_planned_epochs_and_logs_every_step():
    model, data, loss, loaded = _toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    logged, ended = [], []
    plan = {"epochs": 2}

    def end_epoch(epoch):
        ended.append(epoch)
        plan["epochs"] = 3  # a re-plan after the first epoch is followed
        return False

    trainer = Trainer(model, opt, loss, data, sched, lambda e, v, s: logged.append((e, v, s)), end_epoch)
    assert trainer.fit(0, lambda: plan["epochs"]) == 3
    assert ended == [0, 1, 2] and [e for e, _, _ in logged] == [0] * 3 + [1] * 3 + [2] * 3
    assert loaded == [(e, i) for e in range(3) for i in range(3)]
    assert sched.last_epoch == 9 and logged[-1][1] < logged[0][1]  # the loss went down
    assert trainer.fit(3, 3) == 3 and len(logged) == 9  # nothing left to do


def test_end_epoch_stops_and_loading_counts_in_the_step_time():
    model, data, loss, _ = _toy(steps_per_epoch=2, delay=0.02)
    logged = []
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss, data,
                      log_step=lambda e, v, s: logged.append(s), end_epoch=lambda epoch: epoch == 1)
    assert trainer.fit(0, 10) == 2 and len(logged) == 4
    assert min(logged) >= 0.02


def test_a_diverged_loss_raises_from_the_logger():
    model, data, _, _ = _toy()
    nan_loss = lambda m, b: (m(b[0]).sum() * float("nan"), float("nan"))  # noqa: E731
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nan_loss, data,
                      log_step=lambda e, v, s: check_finite_loss(v, 1))
    with pytest.raises(TrainingDiverged, match="diverged"):
        trainer.fit(0, 1)


def test_fit_steps_trains_then_leaves_eval_mode():
    model, _, _, _ = _toy()
    model = torch.nn.Sequential(model, torch.nn.Dropout(0.0))
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    calls = []

    def batch_fn():
        calls.append(1)
        return x, y

    before = model[0].weight.detach().clone()
    fit_steps(model, 4, batch_fn, torch.nn.functional.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1))
    assert len(calls) == 4 and not model.training and not torch.equal(before, model[0].weight)
