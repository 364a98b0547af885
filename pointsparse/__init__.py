"""pointsparse: a point-cloud sparse convolution engine (C++/OpenMP core and a
pure-torch path for any device) with a weight-pruning toolkit on top.

Public contract: ``../shared/API.md``. Subpackages: ``pointsparse.kmap``
(kernel maps), ``pointsparse.nn`` (layers), ``pointsparse.prune`` (pruning),
``pointsparse.formats`` (sparse weight formats and SpMM); also on first
use ``pointsparse.models`` (MinkUNet, SPVCNN) and ``pointsparse.export``
(exported programs)."""

from ._ext import backend, get_backend, num_threads, output_pool, reuse_freed_memory
from .tensor import CoordinateCache, SparseTensor, collate
from .voxelize import devoxelize, voxelize
from . import ops  # noqa: E402,F401  (registers the torch custom operators)

__version__ = "0.1.0"

# The subpackages of the public contract, and the models and exported
# programs, imported on first use so that `import pointsparse as ps;
# ps.nn.Conv3d(...)` (or `ps.export.load(path)`) works without paying for (or
# cycling through) every subpackage at import time.
_SUBPACKAGES = ("kmap", "nn", "prune", "formats", "models", "export")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} (not in this build)") from exc
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBPACKAGES))

__all__ = [
    "CoordinateCache",
    "SparseTensor",
    "backend",
    "collate",
    "devoxelize",
    "get_backend",
    "num_threads",
    "output_pool",
    "reuse_freed_memory",
    "voxelize",
    "__version__",
]
