"""The application built on the pointsparse library: the ``pointsparse``
command line and what its commands run.

- ``cli``: the ``pointsparse`` command (``python -m pointsparse``).
- ``train`` / ``evaluate``: ``pointsparse train`` and ``pointsparse eval``
  (MinkUNet/SPVCNN segmentation, checkpoints, ``--resume``, DDP).
- ``trainer``: the :class:`~pointsparse.app.trainer.Trainer` loop that
  training, the pruning fine-tuning and the demo share.
- ``scoring``: predictions, confusion matrices (sharded over DDP ranks),
  ``metrics.json`` and the PNGs; ``metrics`` and ``plots`` beneath it.
- ``distributed``: process groups and workers for ``--nproc``/torchrun.
- ``demo``: ``pointsparse demo``; ``benchmark``: ``pointsparse bench``;
  ``export``: ``pointsparse export`` (on :mod:`pointsparse.export`).
- ``clouds``: how the commands read point cloud files (``--skip-nonfinite``'s
  hold).
- ``tasks``: ready-made experiment tasks (digits, generated scenes, a trained
  checkpoint) for the pruning procedures; ``procedures``: one driver per
  procedure, shared by ``pointsparse prune`` and ``bench/prune_procedures.py``;
  ``prune``: the ``pointsparse prune`` command; ``channels``: ``pointsparse
  prune channels`` on a training checkpoint.

The library (``pointsparse.tensor``, ``coords``, ``voxelize``, ``kmap``,
``nn``, ``models``, ``data``, ``prune``, ``formats``, ``ops``, ``export``,
``checkpoint``) never imports this package."""


def counted(n: int, word: str) -> str:
    """``n`` and ``word`` in the commands' messages: "1 cloud", "2 clouds" (``word`` singular, plural by "s")."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
