"""Integer arguments across pointsparse.prune and pointsparse.formats: each
one takes what :func:`pointsparse.tensor.as_int` takes (an int, a numpy
integer, a 0-d integer tensor; passed on as a Python int) and refuses the
rest (a bool, numpy's bool included, a float, a string, a 0-d bool or float
tensor, a 1-element 1-d tensor) or a value below its minimum, with an error
that names the argument and shows the value."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import pointsparse as ps
from pointsparse import formats as F
from pointsparse.formats._base import check_shape
from pointsparse.prune import amc, criteria, graph as G, init, lottery, netadapt, pattern, rigl, schedule, structured, \
    surgery, workflow
from pointsparse.prune.nm import NMStructured
from prune_procedures_support import Trainer, mlp


def _loss(model, batch):
    return model(batch).pow(2).sum()


def _lottery_result():
    net = mlp(0)
    return lottery.LotteryResult(rewind_step=0, masks=[{}, {}], state=lottery.snapshot(net))


def _none(_):
    return None


def _square_conv():
    return ps.nn.Conv3d(16, 16, 3)


# (site, argument name, minimum or None, what a wrong type raises, call(value) -> the int passed on or None).
# A wrong type is a TypeError (as_int, procedure.check_int, positive_int, nonnegative_int) at every
# site. ``call`` runs only up to the check, or is cheap: procedures are called so that they
# stop right after it.
SITES = [
    ("LoadBalancedUnstructured.num_pe", "num_pe", 1, TypeError,
     lambda v: F.LoadBalancedUnstructured(0.5, num_pe=v).num_pe),
    ("LoadBalancedUnstructured.row_dim", "row_dim", None, TypeError,
     lambda v: F.LoadBalancedUnstructured(0.5, num_pe=1, row_dim=v).row_dim),
    ("EIE.from_dense.num_pe", "num_pe", 1, TypeError, lambda v: F.EIE.from_dense(torch.ones(8, 8), num_pe=v).num_pe),
    ("NM.from_dense.n", "n", 1, TypeError, lambda v: F.NM.from_dense(torch.ones(2, 8), n=v, m=4, prune=True).n),
    ("NM.from_dense.m", "m", 1, TypeError, lambda v: F.NM.from_dense(torch.ones(2, 8), n=1, m=v, prune=True).m),
    ("BSR.from_dense.blocksize", "blocksize", 1, TypeError,
     lambda v: F.BSR.from_dense(torch.ones(4, 4), blocksize=v).blocksize[0]),
    ("formats.check_shape", "shape", 0, TypeError, lambda v: check_shape((v, 4))[0]),
    ("lottery_ticket.rounds", "rounds", 0, TypeError,
     lambda v: lottery.lottery_ticket(mlp(0), Trainer(), Trainer().accuracy, 1, rounds=v, lr=-1)),
    ("lottery_ticket.train_steps", "train_steps", 1, TypeError,
     lambda v: lottery.lottery_ticket(mlp(0), Trainer(), Trainer().accuracy, v, lr=-1)),
    ("lottery.controls.seed", "seed", 0, TypeError,
     lambda v: lottery.controls(mlp, _lottery_result(), 7, Trainer(), Trainer().accuracy, 1, seed=v)),
    ("synflow_scores.iterations", "iterations", 1, TypeError,
     lambda v: init.synflow_scores(mlp(0), torch.zeros(1, 8), iterations=v, layers=[])),
    ("hessian_diagonal.samples", "samples", 1, TypeError,
     lambda v: criteria.hessian_diagonal(nn.Linear(2, 2), _loss, [], samples=v, generator="bad")),
    ("agp_sparsity.num_steps", "num_steps", 1, TypeError, lambda v: _none(schedule.agp_sparsity(1, v, 0.5))),
    ("sparsity_schedule.rounds", "rounds", 1, TypeError, lambda v: len(schedule.sparsity_schedule(0.5, v))),
    ("iterative_prune.steps_per_round", "steps_per_round", 0, TypeError,
     lambda v: schedule.iterative_prune(mlp(0), Trainer(), 1.5, steps_per_round=v)),
    ("prune_channels.multiple", "multiple", 1, TypeError,
     lambda v: workflow.prune_channels(mlp(0), torch.zeros(1, 8), 0.5, scope="bad", multiple=v)),
    ("amc_search.seed", "seed", 0, TypeError, lambda v: amc.amc_search(mlp(0), len, 0, seed=v, reward="bad")),
    ("amc_search.episodes", "episodes", 1, TypeError,
     lambda v: amc.amc_search(mlp(0), len, 0, episodes=v, reward="bad")),
    ("amc_search.warmup", "warmup", 0, TypeError, lambda v: amc.amc_search(mlp(0), len, 0, warmup=v, reward="bad")),
    ("RigL.update_interval", "update_interval", 1, TypeError,
     lambda v: rigl.RigL(mlp(0), update_interval=v).update_interval),
    ("RigL.end_step", "end_step", 1, TypeError, lambda v: rigl.RigL(mlp(0), end_step=v).end_step),
    ("RigL.seed", "seed", 0, TypeError, lambda v: _none(rigl.RigL(mlp(0), seed=v))),
    ("panel_structured.panels", "panels", 1, TypeError,
     lambda v: _none(structured.panel_structured(_square_conv(), "weight", 0.5, panels=v, rows=1))),
    ("panel_structured.rows", "rows", 1, TypeError,
     lambda v: _none(structured.panel_structured(_square_conv(), "weight", 0.5, rows=v))),
    ("VectorStructured.axis", "axis", None, TypeError, lambda v: structured.VectorStructured(0.5, axis=v).axis),
    ("BlockStructured.block_size", "block_size", 1, TypeError,
     lambda v: structured.BlockStructured(0.5, block_size=v).block_size[0]),
    ("kept_count.multiple", "multiple", 1, TypeError, lambda v: _none(G.kept_count(10, 0.5, v))),
    ("learn_patterns.num_patterns", "num_patterns", 1, TypeError,
     lambda v: _none(pattern.learn_patterns(torch.randn(2, 2, 27), num_patterns=v))),
    ("learn_patterns.pattern_size", "pattern_size", 1, TypeError,
     lambda v: _none(pattern.learn_patterns(torch.randn(2, 2, 27), pattern_size=v))),
    ("as_patterns position", "pattern positions", None, TypeError,
     lambda v: _none(pattern.as_patterns([[v]], 27))),
    ("keep_by_l1.num_keep", "num_keep", 1, TypeError, lambda v: len(surgery.keep_by_l1(nn.Linear(4, 4), v))),
    ("NMStructured.n", "n", 1, TypeError, lambda v: NMStructured(n=v, m=4).n),
    ("NMStructured.m", "m", 1, TypeError, lambda v: NMStructured(n=1, m=v).m),
    ("candidate_counts.channels", "channels", 1, TypeError, lambda v: netadapt.candidate_counts(v, 2)[0]),
    ("candidate_counts.num_candidates", "num_candidates", 1, TypeError,
     lambda v: len(netadapt.candidate_counts(8, v))),
]
IDS = [s[0] for s in SITES]

# Procedures that are called so that they stop at a later check (the value was taken): the errors they stop on.
LATER = r"^(lr|scope|reward|generator|final|final_sparsity|round_index) must be|^layers is empty"


def _name_pattern(name: str) -> str:
    """The message begins with the argument's name (a note in brackets may follow it)."""
    return rf"^{re.escape(name)}( \([^)]*\))? must be"


def _valid(minimum):
    return 2 if minimum is None or minimum <= 2 else minimum


def _run(call, value):
    """``call(value)``: what it passes on, or None when it stopped at a later check (not ``value``'s)."""
    try:
        return call(value)
    except (TypeError, ValueError) as exc:
        assert re.search(LATER, str(exc)), f"{value!r} was refused: {exc}"
        return None


@pytest.mark.parametrize("make", [int, np.int64, np.int32, np.uint8, torch.tensor],
                         ids=lambda m: getattr(m, "__name__", "tensor"))
@pytest.mark.parametrize("site, name, minimum, type_error, call", SITES, ids=IDS)
def test_integers_of_every_kind_are_taken_and_passed_on_as_ints(site, name, minimum, type_error, call, make):
    value = _valid(minimum)
    got = _run(call, make(value))
    if got is not None:
        assert type(got) is int and got == value


BAD_TYPES = [True, False, np.bool_(True), 2.0, 1.5, np.float64(2.0), "2", torch.tensor(True), torch.tensor(2.0),
             torch.tensor([2]), torch.tensor([[2]])]


# (blocksize and block_size take a pair too: a 1-d tensor there is a sequence, too short a ValueError as (2,) is)
REFUSED = [(*site, bad) for site in SITES for bad in BAD_TYPES
           if not (site[1] in ("blocksize", "block_size") and isinstance(bad, torch.Tensor) and bad.dim())]


@pytest.mark.parametrize("site, name, minimum, type_error, call, bad", REFUSED,
                         ids=[f"{r[0]}-{r[-1]!r}" for r in REFUSED])
def test_other_types_are_refused_naming_the_argument_and_the_value(site, name, minimum, type_error, call, bad):
    with pytest.raises(type_error) as info:
        call(bad)
    message = str(info.value)
    assert re.match(_name_pattern(name), message), message
    assert f"got {bad!r}" in message or f"got ({bad!r}, 4)" in message, message
