"""Pruning toolkit: a superset of ``torch.nn.utils.prune``.

Switch by changing one import: every name of ``torch.nn.utils.prune`` listed
in ``API.md`` is re-exported here as the very same object, so a model pruned
by either library is understood by both. On top of it:

* granularities (all ``BasePruningMethod`` subclasses, with function forms):
  vector, kernel / kernel offset, channel, block, stripe
  (:mod:`.structured`), N:M (:mod:`.nm`), pattern (:mod:`.pattern`),
  Filter-Skeleton stripes (:mod:`.stripe`);
* criteria producing ``importance_scores`` (:mod:`.criteria`);
* sparsity regularizers (:mod:`.regularizers`);
* a sparsity and FLOPs report (:mod:`.report`);
* :func:`copy_model`: ``copy.deepcopy`` of a model that torch's own
  methods (re-exported here) masked, which deepcopy refuses after a forward
  in grad mode, as torch's does; this package's own methods' need none.

On a ``pointsparse.nn.Conv3d`` the weight is ``(K, C_in, C_out)``: the
``dim`` of ``ln_structured`` / ``random_structured`` counts in it, so
``dim=0`` (a torch conv's output filters) prunes kernel offsets here; output
channels are ``dim=2`` (or :func:`channel_structured`), input channels
``dim=1``.

Every method works on ``torch.nn`` Linear/ConvNd and on the sparse
``pointsparse.nn.Conv3d`` (weight ``(K, C_in, C_out)``): what the toolkit
knows about a layer type is its adapter (:mod:`.adapters`; register your own
layer types there)."""

from torch.nn.utils.prune import (
    BasePruningMethod,
    CustomFromMask,
    Identity,
    L1Unstructured,
    LnStructured,
    PruningContainer,
    RandomStructured,
    RandomUnstructured,
    custom_from_mask,
    global_unstructured,
    identity,
    is_pruned,
    l1_unstructured,
    ln_structured,
    random_structured,
    random_unstructured,
    remove,
)

from . import criteria, regularizers, report
from ._copyable import copy_model
from .adapters import WeightLayout, current_weight, is_sparse_conv, layout_of, weight_now
from .nm import NMStructured, is_nm_sparse, nm_structured
from .pattern import PatternStructured, as_patterns, learn_patterns, pattern_structured
from .report import format_report, print_report, sparsity_report
from .stripe import (
    FilterSkeleton,
    StripeFromSkeleton,
    attach_filter_skeleton,
    detach_filter_skeleton,
    prune_stripes,
)
from .structured import (
    BlockStructured,
    ChannelStructured,
    GroupStructured,
    KernelStructured,
    StripeStructured,
    VectorStructured,
    block_structured,
    channel_structured,
    global_structured,
    kernel_structured,
    panel_structured,
    stripe_structured,
    vector_structured,
)

__all__ = [
    # torch.nn.utils.prune, re-exported
    "BasePruningMethod", "PruningContainer", "Identity", "RandomUnstructured", "L1Unstructured",
    "RandomStructured", "LnStructured", "CustomFromMask", "identity", "random_unstructured",
    "l1_unstructured", "random_structured", "ln_structured", "global_unstructured",
    "custom_from_mask", "remove", "is_pruned",
    # granularities
    "GroupStructured", "VectorStructured", "KernelStructured", "ChannelStructured", "BlockStructured",
    "StripeStructured", "NMStructured", "PatternStructured", "StripeFromSkeleton", "FilterSkeleton",
    "vector_structured", "kernel_structured", "channel_structured", "block_structured", "panel_structured",
    "stripe_structured", "nm_structured", "pattern_structured", "global_structured",
    "attach_filter_skeleton", "detach_filter_skeleton", "prune_stripes",
    "as_patterns", "learn_patterns", "is_nm_sparse",
    # layouts, criteria, regularizers, report
    "WeightLayout", "layout_of", "current_weight", "weight_now", "is_sparse_conv",
    "criteria", "regularizers", "report", "sparsity_report", "format_report", "print_report",
    # a deepcopy that takes torch's own masked modules too
    "copy_model",
    # the channel-pruning modules, as attributes too (prune.workflow.prune_channels, prune.graph.plan)
    "graph", "surgery", "workflow",
]

# (last: they import the names above from this package)
from . import graph, surgery, workflow  # noqa: E402
