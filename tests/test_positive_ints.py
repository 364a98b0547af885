"""Every positive-int argument of the pruning toolkit and the formats takes
and refuses the same values (tensor.positive_int): ints, numpy integers and
0-d integer tensors >= 1 pass on as Python ints; 0 and negatives are a
ValueError, bools, floats and strings a TypeError (torch's convention: a
wrong type), each worded alike, naming the argument and the value."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pointsparse import formats
from pointsparse import prune
from pointsparse.nn import Conv3d
from pointsparse.prune import graph as G, init, rigl, schedule, workflow
from pointsparse.tensor import positive_int
from prune_procedures_support import sparse_chain, sparse_input


def _panel(**kw):
    return prune.panel_structured(Conv3d(4, 32, 3), "weight", 0.5, **kw)


def _graph_plan(multiple):
    net = sparse_chain(width=8)
    return G.plan(G.DependencyGraph(net, sparse_input(n=60)), 0.5, multiple=multiple)


def _prune_channels(multiple):
    return workflow.prune_channels(sparse_chain(width=8), sparse_input(n=60), 0.5, multiple=multiple)


SITES = {
    "iterations": (lambda v: init.synflow_scores(sparse_chain(width=4), sparse_input(n=30), 0.5, iterations=v),
                   "iterations"),
    "rounds": (lambda v: schedule.sparsity_schedule(0.5, v), "rounds"),
    "multiple": (_graph_plan, "multiple"),
    "multiple (--multiple)": (_prune_channels, r"multiple \(--multiple\)"),
    "update_interval": (lambda v: rigl.RigL(sparse_chain(width=4), 0.5, update_interval=v), "update_interval"),
    "end_step": (lambda v: rigl.RigL(sparse_chain(width=4), 0.5, end_step=v), "end_step"),
    "panels": (lambda v: _panel(panels=v), "panels"),
    "rows": (lambda v: _panel(rows=v), "rows"),
    "num_pe": (lambda v: formats.pe_nnz(torch.ones(4, 4), v), "num_pe"),
}


@pytest.mark.parametrize("site", sorted(SITES))
@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (torch.tensor(0), ValueError),
                                        (np.int64(-1), ValueError), (True, TypeError), (np.bool_(True), TypeError),
                                        (2.0, TypeError), ("2", TypeError), (torch.tensor(2.0), TypeError)])
def test_bad_positive_ints_are_named_alike(site, bad, error):
    call, name = SITES[site]
    with pytest.raises(error, match=rf"^{name} must be a positive int( \([^)]*\))?; got {re.escape(repr(bad))}$"):
        call(bad)


@pytest.mark.parametrize("site", sorted(SITES))
def test_numpy_and_tensor_ints_are_accepted(site):
    call, _ = SITES[site]
    call(np.int64(2))
    call(torch.tensor(2))


def test_positive_int_says_what_it_counts():
    assert positive_int(np.int32(3), "n") == 3 and type(positive_int(np.int32(3), "n")) is int
    with pytest.raises(ValueError, match=r"^panels must be a positive int \(adjacent panels per block\); got 0$"):
        positive_int(0, "panels", "adjacent panels per block")


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (np.int64(-3), ValueError), (torch.tensor(-1), ValueError),
                                        (True, TypeError), (1.5, TypeError), ("2", TypeError)])
def test_non_negative_ints_word_every_bad_value_alike(bad, error):
    """tensor.nonnegative_int (amc_search's warmup) said 'a non-negative int'
    for a bool or a float and 'an int >= 0' for a negative, and amc_search's
    seed beside it was checked by hand: every bad value of either is now
    worded as the seed's always was, a ValueError for a negative and a
    TypeError for another type."""
    from pointsparse.prune import amc
    from pointsparse.tensor import nonnegative_int
    from prune_procedures_support import mlp

    assert nonnegative_int(np.int64(0), "warmup") == 0 and type(nonnegative_int(np.int64(0), "warmup")) is int
    with pytest.raises(error, match=rf"^count must be an int >= 0; got {re.escape(repr(bad))}$"):
        nonnegative_int(bad, "count")
    for name in ("warmup", "seed"):
        with pytest.raises(error, match=rf"^{name} must be an int >= 0; got {re.escape(repr(bad))}$"):
            amc.amc_search(mlp(0), len, 0, reward="bad", **{name: bad})
