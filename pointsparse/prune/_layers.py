"""Kept only for ``prune/cli.py`` (``_layers.sparsity``, ``_layers.layer_sparsity``)
until the application moves it: the layer helpers live in :mod:`.adapters`."""

from .adapters import layer_sparsity, sparsity  # noqa: F401
