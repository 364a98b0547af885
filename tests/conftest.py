"""Shared fixtures: the real datasets folder (skip cleanly when absent), one
torch thread on request; and a thread count per pytest-xdist worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def datasets_folders() -> list[Path]:
    """The folders searched for the real datasets: the one
    ``$POINTSPARSE_DATASETS`` names alone where it is set (one naming no
    folder fell back to ../shared/datasets in silence), else
    ``../shared/datasets`` beside the checkout, then ``/work/shared/datasets``."""
    if os.environ.get("POINTSPARSE_DATASETS"):
        return [Path(os.environ["POINTSPARSE_DATASETS"])]
    return [Path(__file__).resolve().parents[2] / "shared" / "datasets", Path("/work/shared/datasets")]


def find_datasets() -> Path | None:
    """The first of :func:`datasets_folders` that exists; None when none does."""
    return next((folder for folder in datasets_folders() if folder.is_dir()), None)


def worker_threads(workers: int, cpus: int | None, threads: int) -> int | None:
    """The torch threads each of ``workers`` pytest-xdist workers runs with
    on ``cpus`` processors: their share (at least one) where the workers'
    default ``threads`` each would ask for more than there are, else None
    (the default stands)."""
    cpus = cpus or 1
    if workers < 2 or workers * threads <= cpus:
        return None
    return max(1, cpus // workers)


def pytest_configure(config):
    """In each pytest-xdist worker (``make test`` runs two): torch's threads
    set to the worker's share of the processors, and ``OMP_NUM_THREADS`` to
    the same for the processes its tests start (a train, a CLI call). Two
    workers of two threads each on two cores spin in each other's parallel
    regions: the suite took 518 s so and 428-434 s with this (457 s with
    OMP_NUM_THREADS=1; AMD EPYC Zen 5, bench/RESULTS.md stop 73), the
    kernel-heavy files 2-3x faster. Tests of thread counts set their own (1 and 2; the
    ``two_threads`` fixture), and the fuzzer's ``threads`` family runs the
    public entry points at both."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = worker_threads(int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")), cpus, torch.get_num_threads())
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    path = find_datasets()
    if path is None:
        pytest.skip(f"real datasets folder not present ({' or '.join(map(str, datasets_folders()))})")
    return path


@pytest.fixture
def two_threads():
    """Two torch threads (the engine's too; fewer where the core runs fewer)
    for a test of the threaded paths, whatever the worker's count
    (:func:`pytest_configure` gives each of make test's workers one here);
    the previous count is restored afterwards."""
    yield from _torch_threads(2)


@pytest.fixture
def one_thread():
    """One torch thread for tiny models (they run fastest and steadiest so on a
    2-core machine); the previous count is restored afterwards. Test modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    yield from _torch_threads(1)


def _torch_threads(count: int):
    """The body of the thread fixtures: torch's threads set to ``count``
    while the test runs, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
