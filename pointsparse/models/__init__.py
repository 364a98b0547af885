"""Segmentation networks built from :mod:`pointsparse.nn` layers."""

from .loading import (add_voxel_prune, add_voxel_skip, build_model, load_model, model_from_state, voxel_prunes,
                      voxel_skips)
from .minkunet import MinkUNet, ResidualBlock
from .spvcnn import SPVCNN, point_rows, point_to_voxel
from .sync_batchnorm import SyncBatchNorm

__all__ = ["add_voxel_prune", "add_voxel_skip", "build_model", "load_model", "model_from_state", "MinkUNet",
           "ResidualBlock", "SPVCNN", "SyncBatchNorm", "point_rows", "point_to_voxel", "voxel_prunes", "voxel_skips"]
