"""Running a user's model in eval mode for a moment (a trace, a timing, a
FLOPs count, a calibration pass) and giving every module back its own mode;
keeping its modes and buffers through a block that runs it as it is (a
scan's evaluations, the scoring passes of pruning at initialisation);
running it on an example input of one or several arguments."""

from __future__ import annotations

import contextlib

import torch
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


@contextlib.contextmanager
def kept(model: nn.Module):
    """A block after which every module of ``model`` has the mode it had
    and every buffer its values and identity (a forward in train mode moves
    the BatchNorm statistics; a user's callback may call ``model.eval()``)."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(m, key, b, b.detach().clone()) for m in model.modules() for key, b in m._buffers.items()
               if b is not None]
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for m, key, b, values in buffers:
                b.copy_(values)
                m._buffers[key] = b


def run_model(model: nn.Module, inputs):
    """``model(*inputs)`` where ``inputs`` is a tuple (a model of several
    arguments: SPVCNN's ``(voxels, inverse, points, point_batch)``), else
    ``model(inputs)``: a model run on an example input or a batch's inputs,
    as the dependency graph and the report run it."""
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)
