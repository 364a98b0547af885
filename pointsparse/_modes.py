"""Running a user's model in eval mode for a moment (a trace, a timing, a
FLOPs count, a calibration pass) and giving every module back its own mode."""

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
