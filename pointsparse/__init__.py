"""pointsparse: a point-cloud sparse convolution engine (C++/OpenMP core and a
pure-torch path for any device) with a weight-pruning toolkit on top.

Public contract: ``../shared/API.md``. Subpackages: ``pointsparse.kmap``
(kernel maps), ``pointsparse.nn`` (layers), ``pointsparse.prune`` (pruning),
``pointsparse.formats`` (sparse weight formats and SpMM)."""

from ._ext import num_threads
from .tensor import CoordinateCache, SparseTensor, collate
from .voxelize import devoxelize, voxelize

__version__ = "0.1.0"

__all__ = [
    "CoordinateCache",
    "SparseTensor",
    "collate",
    "devoxelize",
    "num_threads",
    "voxelize",
    "__version__",
]
