"""One driver per pruning procedure, on a :class:`~pointsparse.app.tasks.Task`
(its model factory, ``train_fn``, ``eval_fn``, batches, loss and example
input): what ``pointsparse prune <procedure>`` runs and prints, and what
``bench/prune_procedures.py`` runs and compares. The procedures themselves
are library functions in :mod:`pointsparse.prune`; a driver only wires a
task into one."""

from __future__ import annotations

import time
from typing import Callable

from torch import nn

from ..prune import amc as _amc
from ..prune import init as _init
from ..prune import lottery as _lottery
from ..prune import netadapt as _netadapt
from ..prune import rigl as _rigl
from ..prune import schedule as _schedule
from ..prune import sensitivity as _sensitivity
from ..prune import surgery
from ..prune._copyable import copy_model
from .tasks import Task


def trained(task: Task, seed: int = 0, steps: int | None = None) -> nn.Module:
    """The task's model (seeded), trained ``steps`` (default the task's) steps."""
    model = task.make_model(seed)
    task.train_fn(model, steps or task.train_steps)
    return model


def sensitivity(task: Task, model: nn.Module, granularity: str = "unstructured", threshold: float = 0.02,
                ratios=_sensitivity.DEFAULT_RATIOS, metric: str | None = None, plot=None, layers=None):
    """Scan every layer's metric (``layers``: those named) against its pruned
    ratio; (scan, the ratios within ``threshold`` of the baseline, the plot's
    path or None)."""
    res = _sensitivity.sensitivity_scan(model, task.eval_fn, ratios, granularity, layers,
                                        metric=metric or task.metric)
    chosen = _sensitivity.choose_ratios(res, threshold)
    return res, chosen, _sensitivity.plot_sensitivity(res, plot, threshold) if plot is not None else None


def schedule(task: Task, model: nn.Module, sparsity: float, kind: str = "agp", rounds: int = 5, steps: int = 100,
             finetune_lr_factor: float = 0.1, eval_fn: Callable | None = None):
    """Prune to ``sparsity`` with ``steps`` fine-tuning steps in all: at once
    (``kind="oneshot"``) or over ``rounds`` rounds of ``steps // rounds``
    (``"agp"``, ``"constant"``)."""
    if kind == "oneshot":
        return _schedule.one_shot_prune(model, task.train_fn, sparsity, steps, lr=task.lr,
                                        finetune_lr_factor=finetune_lr_factor, eval_fn=eval_fn)
    return _schedule.iterative_prune(model, task.train_fn, sparsity, rounds, steps // rounds, kind, lr=task.lr,
                                     finetune_lr_factor=finetune_lr_factor, eval_fn=eval_fn)


def lottery(task: Task, model: nn.Module, steps: int, rounds: int, fraction: float = 0.2, rewind: int = 0,
            control_rounds=(), seed: int = 0, metric_fn: Callable | None = None):
    """Lottery tickets (``fraction`` of the remaining weights per round,
    rewound to step ``rewind``) and the random re-init / random mask controls
    at ``control_rounds``; (result, {round: controls})."""
    metric_fn = metric_fn or task.eval_fn
    res = _lottery.lottery_ticket(model, task.train_fn, metric_fn, steps, rounds, fraction, rewind, lr=task.lr)
    ctrl = {r: _lottery.controls(task.make_model, res, r, task.train_fn, metric_fn, steps, seed, task.lr)
            for r in control_rounds}
    return res, ctrl


def prune_at_init(task: Task, model: nn.Module, method: str, sparsity: float, steps: int, batches: int = 4,
                  iterations: int = 100) -> nn.Module:
    """SNIP / GraSP / SynFlow masks on ``batches`` of the task's batches, then ``steps`` training steps."""
    _init.prune_at_init(model, method, sparsity, [task.batch_fn() for _ in range(batches)], task.loss_fn,
                        task.example_input, iterations=iterations)
    task.train_fn(model, steps)
    return model


def rigl(task: Task, model: nn.Module, sparsity: float, distribution: str, steps: int, update_interval: int):
    """Train ``steps`` steps as RigL (drop/grow until 3/4 of the steps); returns the RigL state."""
    state = _rigl.RigL(model, 1.0 - sparsity, distribution, update_interval=update_interval,
                       end_step=int(steps * 0.75))
    with state:
        task.train_fn(model, steps)
    return state


def amc(task: Task, model: nn.Module, flops: float, episodes: int, warmup: int, reward: str = "error",
        reconstruct: bool = False, calibration=None, seed: int = 0, coupled: bool = False):
    """AMC's search for per-layer channel ratios within ``flops`` of the dense FLOPs."""
    return _amc.amc_search(model, task.eval_fn, task.example_input, episodes=episodes, warmup=warmup,
                           reward=reward, target_flops=flops, reconstruct=reconstruct, calibration_input=calibration,
                           seed=seed, coupled=coupled)


def cut_channels(model: nn.Module, ratios: dict, reconstruct: bool = False, calibration=None,
                 example_input=None) -> nn.Module:
    """A copy of ``model`` with ``ratios`` of the channels removed (through
    every coupled group when ``example_input`` is given)."""
    pruned = copy_model(model)  # (copy.deepcopy refuses a weight torch's pruning computed)
    surgery.apply_channel_ratios(pruned, ratios, reconstruct, calibration, example_input=example_input)
    return pruned


def latency_table(model: nn.Module, example_input, candidates: int = 8, repeats: int = 7):
    """NetAdapt's latency table of ``model`` at ``candidates`` widths per
    layer, each entry the fastest of ``repeats`` timings; (table, seconds to
    build it). The weights do not enter it: it may be built before training."""
    t0 = time.perf_counter()
    table = _netadapt.build_latency_table(model, example_input, num_candidates=candidates, repeats=repeats)
    return table, time.perf_counter() - t0


def netadapt(task: Task, model: nn.Module, example_input, budget: float, short_steps: int, long_steps: int,
             candidates: int | None = 8, repeats: int = 7, table_path=None, log: Callable | None = None,
             table=None, max_iterations: int = 50):
    """NetAdapt to ``budget`` of the latency, on a latency table of
    ``candidates`` widths per layer (None: latencies measured directly, every
    coupled group) or on ``table``, one :func:`latency_table` built already,
    in at most ``max_iterations`` iterations; (result, table, seconds to
    build the table: 0 for one given)."""
    seconds = 0.0
    if table is None and candidates is not None:
        table, seconds = latency_table(model, example_input, candidates, repeats)
    if table is not None and table_path is not None:
        table.save(table_path)
    res = _netadapt.netadapt(model, table, task.train_fn, task.eval_fn, example_input, budget,
                             short_steps=short_steps, long_steps=long_steps, lr=task.lr, log=log,
                             max_iterations=max_iterations)
    return res, table, seconds
