"""Score a segmentation checkpoint (per-class IoU, mIoU) on point clouds.

``pointsparse eval --checkpoint DIR/checkpoint.pt [--data SOURCE...] [--out DIR]``
(the data defaults to what the run validated on)."""

from __future__ import annotations

from .train import add_eval_arguments as add_arguments
from .train import evaluate_main as main

__all__ = ["add_arguments", "main"]
