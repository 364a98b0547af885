"""The mask mechanics and criteria the procedures build on, from the pruning
core (``pointsparse.prune``, whose torch names are ``torch.nn.utils.prune``'s
very objects)."""

from __future__ import annotations

from . import (channel_structured, custom_from_mask, global_unstructured, is_pruned, l1_unstructured,  # noqa: F401
               ln_structured, random_unstructured, remove)
from .criteria import snip as snip_criterion  # noqa: F401
from .report import sparsity_report  # noqa: F401

__all__ = ["channel_structured", "custom_from_mask", "global_unstructured", "is_pruned", "l1_unstructured",
           "ln_structured", "random_unstructured", "remove", "snip_criterion", "sparsity_report"]
