"""Running a user's model in eval mode for a moment (a trace, a timing, a
FLOPs count, a calibration pass) and giving every module back its own mode;
running it on an example input of one or several arguments."""

from __future__ import annotations

import contextlib

from torch import nn


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode inside the block; afterwards each module has
    the mode it had (``model.train(was)`` gives every module the model's: a
    BatchNorm frozen in eval mode while the rest trains would train again)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def run_model(model: nn.Module, inputs):
    """``model(*inputs)`` where ``inputs`` is a tuple (a model of several
    arguments: SPVCNN's ``(voxels, inverse, points, point_batch)``), else
    ``model(inputs)``: a model run on an example input or a batch's inputs,
    as the dependency graph and the report run it."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)
