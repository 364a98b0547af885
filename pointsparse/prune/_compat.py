"""The mask mechanics the procedures build on, taken from the pruning core
(``pointsparse.prune``), which re-exports ``torch.nn.utils.prune``'s objects.

Until the core's ``__init__`` has landed on this branch the same objects come
straight from torch (they are the very objects the core re-exports)."""

from __future__ import annotations

try:  # the pruning core
    from . import (custom_from_mask, global_unstructured, is_pruned, l1_unstructured, ln_structured,  # noqa: F401
                   random_unstructured, remove)
except ImportError:  # core not merged yet: torch's objects, which the core re-exports unchanged
    from torch.nn.utils.prune import (custom_from_mask, global_unstructured, is_pruned, l1_unstructured,  # noqa: F401
                                      ln_structured, random_unstructured, remove)

__all__ = ["custom_from_mask", "global_unstructured", "is_pruned", "l1_unstructured", "ln_structured",
           "random_unstructured", "remove"]
