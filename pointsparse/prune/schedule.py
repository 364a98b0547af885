"""Iterative pruning: cycles of prune-then-fine-tune up to a final sparsity
(Han et al. 2015), with constant steps or the cubic schedule of automated
gradual pruning (AGP, Zhu & Gupta 2017), against one-shot pruning.

Fine-tuning runs at ``finetune_lr_factor`` (1/10 by default, 1/100
selectable) times the training learning rate ``lr``, passed to
``train_fn(model, steps, lr=...)`` when ``train_fn`` takes ``lr``."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..tensor import as_int, positive_int
from .adapters import sparsity as _sparsity
from .procedure import (call_train, check_callable, check_fraction, check_lr, global_magnitude_prune,
                        layer_magnitude_prune, metric_value)

SCHEDULES = ("agp", "constant")
SCOPES = ("global", "layer")
# The most rounds sparsity_schedule lays out (its list has one entry per round).
MAX_ROUNDS = 1_000_000


def _check_step_args(step, num_steps, final, initial) -> tuple[int, int, float, float]:
    """``(step, num_steps, final, initial)``: the steps as Python ints,
    ``step`` clamped to ``[0, num_steps]``, after checking that both are ints
    (numpy integers too; ``num_steps >= 1``), and ``final``, ``initial``
    sparsities in [0, 1] as Python floats (numpy numbers too), ``initial <=
    final`` (as :func:`sparsity_schedule` checks them)."""
    step, num_steps = as_int(step, "step"), as_int(num_steps, "num_steps")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    final = check_fraction(final, "final", high_open=False)
    initial = check_fraction(initial, "initial", high_open=False)
    _check_order(final, initial, "final", "initial")
    return min(max(step, 0), num_steps), num_steps, final, initial


def agp_sparsity(step: int, num_steps: int, final: float, initial: float = 0.0) -> float:
    """AGP: ``s_t = s_f + (s_i - s_f) * (1 - t/n)^3`` for ``t`` in ``[0, n]``
    (fast early, slow near the end). ``step`` and ``num_steps >= 1`` are ints
    (``step`` clamped to ``[0, n]``), ``final`` and ``initial`` sparsities in
    [0, 1], ``initial <= final`` (masks never un-prune)."""
    return _agp(*_check_step_args(step, num_steps, final, initial))


def constant_sparsity(step: int, num_steps: int, final: float, initial: float = 0.0) -> float:
    """Equal increments: ``s_t = s_i + (s_f - s_i) * t/n`` (arguments as for
    :func:`agp_sparsity`)."""
    return _constant(*_check_step_args(step, num_steps, final, initial))


def _agp(t: int, n: int, final: float, initial: float) -> float:
    return final + (initial - final) * (1.0 - t / n) ** 3


def _constant(t: int, n: int, final: float, initial: float) -> float:
    return initial + (final - initial) * t / n


def _check_targets(final, initial, final_name: str = "final", initial_name: str = "initial") -> tuple[float, float]:
    """``(final, initial)`` as Python floats: sparsities in [0, 1),
    ``initial <= final`` (errors naming them as the caller's arguments)."""
    final = check_fraction(final, final_name)
    initial = check_fraction(initial, initial_name)
    _check_order(final, initial, final_name, initial_name)
    return final, initial


def _check_order(final: float, initial: float, final_name: str, initial_name: str) -> None:
    if initial > final:
        raise ValueError(f"{initial_name} ({initial}) must be <= {final_name} ({final}): masks never un-prune, so "
                         "a falling schedule cannot be followed")


def sparsity_schedule(final: float, rounds: int, kind: str = "agp", initial: float = 0.0) -> list[float]:
    """The target sparsity after each of ``rounds`` pruning rounds (the last
    is ``final``); ``rounds`` is an int in ``[1, MAX_ROUNDS]``, ``initial <= final``."""
    final, initial = _check_targets(final, initial)
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}; got {kind!r}")
    rounds = positive_int(rounds, "rounds")
    if rounds > MAX_ROUNDS:
        raise ValueError(f"rounds must be <= MAX_ROUNDS={MAX_ROUNDS}; got {rounds}")
    fn = _agp if kind == "agp" else _constant  # arguments checked once above, not per round
    return [fn(t, rounds, final, initial) for t in range(1, rounds + 1)]


@dataclass
class ScheduleResult:
    """One row per round: target and reached sparsity, metric after fine-tuning."""

    history: list[dict] = field(default_factory=list)

    @property
    def final_metric(self) -> float | None:
        return self.history[-1]["metric"] if self.history else None


def _prune_to(model, target, scope, layers):
    if scope == "global":
        global_magnitude_prune(model, target, layers)
    else:
        layer_magnitude_prune(model, target, layers)


def iterative_prune(model: nn.Module, train_fn: Callable, final_sparsity: float, rounds: int = 5,
                    steps_per_round: int = 100, schedule: str = "agp", scope: str = "global", lr: float | None = None,
                    finetune_lr_factor: float = 0.1, eval_fn: Callable | None = None, layers=None,
                    initial_sparsity: float = 0.0) -> ScheduleResult:
    """Prune a trained ``model`` in ``rounds`` steps to ``final_sparsity`` by
    magnitude (``scope`` global: one threshold over all layers; ``layer``: the
    same ratio in each), fine-tuning ``steps_per_round`` steps after each.
    The model stays pruned (masks through the core's ``custom_from_mask``
    mechanics)."""
    check_callable(train_fn, "train_fn")
    if eval_fn is not None:
        check_callable(eval_fn, "eval_fn")
    check_lr(lr)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}; got {scope!r}")
    if isinstance(finetune_lr_factor, bool) or not isinstance(finetune_lr_factor, numbers.Real) \
            or not (finetune_lr_factor > 0 and math.isfinite(finetune_lr_factor)):
        raise ValueError(f"finetune_lr_factor must be a finite number > 0 (0.1 or 0.01 usually); "
                         f"got {finetune_lr_factor!r}")
    try:
        steps_per_round = as_int(steps_per_round, "steps_per_round", 0)
    except (TypeError, ValueError) as error:  # (a wrong type a TypeError, a negative a ValueError)
        raise type(error)(f"steps_per_round (finetune_steps) must be an int >= 0 (fine-tuning steps after each "
                          f"round); got {steps_per_round!r}") from None
    _check_targets(final_sparsity, initial_sparsity, "final_sparsity", "initial_sparsity")
    targets = sparsity_schedule(final_sparsity, rounds, schedule, initial_sparsity)
    ft_lr = None if lr is None else lr * finetune_lr_factor
    result = ScheduleResult()
    for i, target in enumerate(targets, 1):
        _prune_to(model, target, scope, layers)
        reached = _sparsity(model, layers)
        call_train(train_fn, model, steps_per_round, ft_lr)
        metric = metric_value(eval_fn(model)) if eval_fn is not None else None
        result.history.append({"round": i, "target": target, "sparsity": reached, "metric": metric})
    return result


def one_shot_prune(model: nn.Module, train_fn: Callable, sparsity: float, finetune_steps: int = 500,
                   scope: str = "global", lr: float | None = None, finetune_lr_factor: float = 0.1,
                   eval_fn: Callable | None = None, layers=None) -> ScheduleResult:
    """Prune once to ``sparsity`` and fine-tune ``finetune_steps`` (the
    baseline iterative pruning is compared with at an equal step budget)."""
    check_fraction(sparsity, "sparsity")
    return iterative_prune(model, train_fn, sparsity, 1, finetune_steps, "constant", scope, lr, finetune_lr_factor,
                           eval_fn, layers)
