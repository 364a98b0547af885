"""Sparse layers over :class:`pointsparse.SparseTensor`."""

from . import functional
from .functional import add, cat
from .modules import ELU, GELU, BatchNorm, Conv3d, Dropout, LeakyReLU, Linear, ReLU, Sigmoid, SiLU, Tanh

__all__ = ["add", "cat", "BatchNorm", "Conv3d", "Dropout", "ELU", "GELU", "LeakyReLU", "Linear", "ReLU", "Sigmoid", "SiLU",
           "Tanh", "functional"]
