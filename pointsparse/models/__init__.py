"""Segmentation networks built from :mod:`pointsparse.nn` layers."""

from .minkunet import MinkUNet, ResidualBlock
from .spvcnn import SPVCNN, point_to_voxel
from .sync_batchnorm import SyncBatchNorm

__all__ = ["MinkUNet", "ResidualBlock", "SPVCNN", "SyncBatchNorm", "point_to_voxel"]
