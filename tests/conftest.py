"""Shared fixtures: the real datasets folder (skip cleanly when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


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


@pytest.fixture
def one_thread():
    """One torch thread for tiny models (they run fastest and steadiest so on a
    2-core machine); the previous count is restored afterwards. Test modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
