"""The training loop that ``pointsparse train``, the pruning fine-tuning
(``prune channels --finetune-epochs``, the experiment tasks' ``train_fn``)
and the demo share: epochs of optimisation steps over pluggable pieces
(data, model, loss, optimiser and schedule, and what logs each step and
ends each epoch: validation, checkpoints, reports)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from ..models.loading import non_finite_weight  # (the library's check of a loaded model; training's too)


class TrainingDiverged(RuntimeError):
    """The loss or the weights stopped being finite."""


def check_finite_loss(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(f"the training loss is {loss} at step {step}: training diverged (lower --lr, "
                               "check the data for NaN/inf features); no checkpoint was written for this epoch")


def check_finite_weights(model: torch.nn.Module, epoch: int) -> None:
    name = non_finite_weight(model)
    if name is not None:
        raise TrainingDiverged(f"{name} holds NaN/inf after epoch {epoch}: training diverged (lower --lr); "
                               "no checkpoint was written for this epoch")


def have_tqdm() -> bool:
    """tqdm is a dependency, but a trimmed install still trains (no bars)."""
    import importlib.util

    try:
        return importlib.util.find_spec("tqdm") is not None
    except (ImportError, ValueError):
        return False


def progress_bar(iterable, desc: str, enabled: bool, **kwargs):
    """``iterable`` in a tqdm bar when ``enabled``, else as it is."""
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, **kwargs)


_END = object()


@dataclass
class Trainer:
    """Epochs of steps: for each batch of ``data(epoch)``, ``loss(model,
    batch) -> (loss, value)``, backward, ``optimizer.step()`` and
    ``scheduler.step()``; then ``log_step(epoch, value, seconds)``. After
    each epoch ``end_epoch(epoch)`` validates, checkpoints or reports, and
    returns True to stop early. ``data`` yields batches as the loop asks for
    them, so loading (augmentation, voxelisation, batching) counts in a
    step's seconds."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.nn.Module, object], tuple[torch.Tensor, object]]
    data: Callable[[int], Iterable]
    scheduler: object | None = None
    log_step: Callable[[int, object, float], None] | None = None
    end_epoch: Callable[[int], bool] | None = None

    def step(self, batch):
        """One optimisation step on ``batch``; returns the loss's logged value."""
        loss, value = self.loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return value

    def fit(self, first_epoch: int = 0, epochs: int | Callable[[], int] = 1) -> int:
        """Train from ``first_epoch`` while the epoch is below ``epochs`` (a
        count, or a callable read before every epoch: a plan that changes);
        returns the epochs done in all."""
        total = epochs if callable(epochs) else (lambda: epochs)
        epoch = first_epoch
        while epoch < total():
            self.model.train()
            batches = iter(self.data(epoch))
            while True:
                start = time.perf_counter()
                batch = next(batches, _END)
                if batch is _END:
                    break
                value = self.step(batch)
                if self.log_step is not None:
                    self.log_step(epoch, value, time.perf_counter() - start)
            stop = self.end_epoch is not None and self.end_epoch(epoch)
            epoch += 1
            if stop:
                break
        return epoch


def fit_steps(model: torch.nn.Module, steps: int, batch_fn: Callable[[], tuple], loss_fn: Callable,
              optimizer: torch.optim.Optimizer) -> None:
    """``steps`` steps on ``batch_fn() -> (inputs, targets)`` with
    ``loss_fn(model(inputs), targets)`` (``model(*inputs)`` for a tuple:
    an SPVCNN's), then ``model.eval()`` (the experiment tasks'
    ``train_fn``)."""
    from .._modes import run_model
    trainer = Trainer(model, optimizer, lambda m, b: (loss_fn(run_model(m, b[0]), b[1]), None),
                      lambda epoch: (batch_fn() for _ in range(steps)))
    trainer.fit(0, 1)
    model.eval()
