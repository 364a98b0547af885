"""How the commands read point cloud files: ``--skip-nonfinite``'s hold on
the reading (train, eval, predict, prune), one rule for it."""

from __future__ import annotations

import contextlib

__all__ = ["nonfinite_hold", "skips_nonfinite"]


def skips_nonfinite(flag: bool, state: dict | None = None, own_data: bool = False) -> bool:
    """Whether NaN or inf positions are left out: ``--skip-nonfinite``
    (``flag``), or, reading a run's own clouds (``own_data``: no ``--data``),
    the run's ``train --skip-nonfinite`` (its checkpoint ``state``), so that
    they are read as it read them."""
    saved = (state or {}).get("args") or {}
    return bool(flag) or (own_data and saved.get("skip_nonfinite") is True)


@contextlib.contextmanager
def nonfinite_hold(skip: bool, to: str):
    """Clouds read inside (and kept: the sources cache them) drop their NaN or
    inf positions where ``skip`` (``data.sample.nonfinite_rows_dropped``);
    otherwise such a cloud is a ValueError naming it and the flag:
    ``"<cloud>: xyz holds NaN or inf at ...; give --skip-nonfinite to <to>"``
    (``to``: what the command then does, "score the other points")."""
    from ..data.sample import NonFinitePositions, nonfinite_rows_dropped

    try:
        with nonfinite_rows_dropped() if skip else contextlib.nullcontext():
            yield
    except NonFinitePositions as error:  # (a ValueError of its own: --nproc's workers hand back a ValueError's)
        raise ValueError(f"{error}; give --skip-nonfinite to {to}") from error
