"""Checks and arithmetic for a pruning ``amount`` (shared by every method)."""

from __future__ import annotations

import numbers


def validate_amount(amount) -> None:
    """``amount`` is a float in [0, 1] (a fraction) or an int >= 0 (a count)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be an int (a count) or a float in [0, 1]; got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if amount < 0:
            raise ValueError(f"amount as an int is a count and must be >= 0; got {amount}")
    elif not 0.0 <= float(amount) <= 1.0:
        raise ValueError(f"amount as a float is a fraction and must be in [0, 1]; got {amount}")


def count_to_prune(amount, available: int, what: str = "units") -> int:
    """How many of ``available`` units ``amount`` prunes (a fraction rounds to
    the nearest int, as ``torch.nn.utils.prune`` does)."""
    validate_amount(amount)
    if isinstance(amount, numbers.Integral):
        if amount > available:
            raise ValueError(
                f"amount={amount} is more than the {available} {what} still unpruned"
            )
        return int(amount)
    return int(round(float(amount) * available))


def validate_norm(n) -> None:
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not n > 0:
        raise ValueError(f"n (the norm order) must be a positive number or float('inf'); got {n!r}")
