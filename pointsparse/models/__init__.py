"""Segmentation networks built from :mod:`pointsparse.nn` layers."""

from .minkunet import MinkUNet, ResidualBlock
from .sync_batchnorm import SyncBatchNorm

__all__ = ["MinkUNet", "ResidualBlock", "SyncBatchNorm"]
