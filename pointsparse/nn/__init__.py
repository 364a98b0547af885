"""Sparse layers over :class:`pointsparse.SparseTensor`."""

from . import functional
from .convert import weight_from
from .functional import add, cat, union
from .fuse import fold_batchnorm, fuse_for_inference
from .maps import MapSchedule, MapsAhead, build_maps, map_schedule
from .modules import (ELU, GELU, AvgPool3d, BatchNorm, BatchStatisticsError, Conv3d, Dropout, GlobalAvgPool,
                      GlobalMaxPool, InstanceNorm, LeakyReLU, Linear, MaxPool3d, ReLU, Sigmoid, SiLU, Tanh, VoxelPrune,
                      VoxelSkip)

__all__ = ["add", "cat", "union", "AvgPool3d", "BatchNorm", "BatchStatisticsError", "Conv3d", "Dropout", "ELU", "GELU",
           "GlobalAvgPool", "GlobalMaxPool", "InstanceNorm", "LeakyReLU", "Linear", "MaxPool3d", "ReLU", "Sigmoid",
           "SiLU", "Tanh", "VoxelPrune", "VoxelSkip",
           "fold_batchnorm", "fuse_for_inference", "functional",
           "MapSchedule", "MapsAhead", "build_maps", "map_schedule", "weight_from"]
