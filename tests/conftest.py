"""Shared fixtures: the real datasets folder (skip cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def find_datasets() -> Path | None:
    """``$POINTSPARSE_DATASETS``, else ``../shared/datasets`` beside the
    checkout, else ``/work/shared/datasets``; None when none exists."""
    candidates = []
    if os.environ.get("POINTSPARSE_DATASETS"):
        candidates.append(Path(os.environ["POINTSPARSE_DATASETS"]))
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "datasets")
    candidates.append(Path("/work/shared/datasets"))
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    path = find_datasets()
    if path is None:
        pytest.skip("real datasets folder (../shared/datasets) not present")
    return path
