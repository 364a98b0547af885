"""SyncBatchNorm across two real gloo processes on the CPU: the outputs, the
gradients of feats, weight and bias and the running statistics are what one
BatchNorm gives on the whole batch, and torch's deprecation warnings stay
quiet (its torch.distributed.nn collectives are deprecated in torch 2.13)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# The workers' opening: imports and the shard of each seed (the test's _cloud, in the workers).
_HEAD = textwrap.dedent("""
    import sys, warnings
    import torch
    import pointsparse as ps
    from pointsparse.app import distributed
    from pointsparse.models import SyncBatchNorm

    def cloud(seed):
        g = torch.Generator().manual_seed(seed)
        coords = torch.unique(torch.randint(0, 9, (300, 3), generator=g), dim=0)
        coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
        return ps.SparseTensor(torch.randn(len(coords), 5, generator=g, dtype=torch.float64) * 2 + 1, coords)
""")

SCRIPT = _HEAD + textwrap.dedent("""

    def step(norm, x, upstream):
        feats = x.feats.clone().requires_grad_(True)
        out = norm(x.with_feats(feats)).feats
        (out * upstream).sum().backward()
        return out.detach(), feats.grad

    def worker(rank, port, out):
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        try:
            shards = [cloud(0), cloud(1)]
            ups = [torch.randn(s.feats.shape[0], 5, generator=torch.Generator().manual_seed(7 + i),
                               dtype=torch.float64) for i, s in enumerate(shards)]
            synced = SyncBatchNorm(5).double().train()
            with torch.no_grad():
                synced.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
                synced.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(4))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got, grad = step(synced, shards[rank], ups[rank])
            torch.save({"out": got, "grad": grad, "wgrad": synced.weight.grad, "bgrad": synced.bias.grad,
                        "mean": synced.running_mean, "var": synced.running_var,
                        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]}, f"{out}/{rank}.pt")
        finally:
            torch.distributed.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.spawn(worker, args=(distributed.free_port(), sys.argv[1]), nprocs=2, join=True)
""")


def _cloud(seed):
    """The workers' shard of ``seed`` (their opening's cloud, run here)."""
    space: dict = {}
    exec(_HEAD, space)
    return space["cloud"](seed)


def _run_workers(tmp_path, script_text: str):
    """Runs the two gloo workers of ``script_text``; their saved results (none with a warning), the two
    shards and their upstream gradients."""
    script = tmp_path / "workers.py"
    script.write_text(script_text)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert ranks[0]["warnings"] == [] and ranks[1]["warnings"] == []
    shards = [_cloud(0), _cloud(1)]
    ups = [torch.randn(s.feats.shape[0], 5, generator=torch.Generator().manual_seed(7 + i), dtype=torch.float64)
           for i, s in enumerate(shards)]
    return ranks, shards, ups


def test_two_gloo_processes_normalise_and_backpropagate_as_one_batchnorm(tmp_path):
    from pointsparse import nn as spnn

    ranks, shards, ups = _run_workers(tmp_path, SCRIPT)
    plain = spnn.BatchNorm(5).double().train()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
        plain.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(4))
    feats = torch.cat([s.feats for s in shards]).clone().requires_grad_(True)
    out = torch.nn.functional.batch_norm(feats, plain.running_mean, plain.running_var, plain.weight, plain.bias,
                                         training=True, momentum=plain.momentum, eps=plain.eps)
    (out * torch.cat(ups)).sum().backward()
    torch.testing.assert_close(torch.cat([ranks[0]["out"], ranks[1]["out"]]), out.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([ranks[0]["grad"], ranks[1]["grad"]]), feats.grad, rtol=1e-9, atol=1e-10)
    for r in ranks:  # (DDP sums the parameters' gradients of the ranks: each rank holds its shard's share)
        assert torch.equal(r["mean"], ranks[0]["mean"]) and torch.equal(r["var"], ranks[0]["var"])
    torch.testing.assert_close(ranks[0]["wgrad"] + ranks[1]["wgrad"], plain.weight.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ranks[0]["bgrad"] + ranks[1]["bgrad"], plain.bias.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ranks[0]["mean"], plain.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ranks[0]["var"], plain.running_var, rtol=1e-12, atol=1e-12)


DOUBLE_BACKWARD = _HEAD + textwrap.dedent("""

    def worker(rank, port, out):
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        try:
            x = cloud(rank)
            up = torch.randn(x.feats.shape[0], 5, generator=torch.Generator().manual_seed(7 + rank),
                             dtype=torch.float64)
            v = torch.randn(5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
            norm = SyncBatchNorm(5).double().train()
            feats = x.feats.clone().requires_grad_(True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                o = norm(x.with_feats(feats)).feats
                grad, = torch.autograd.grad((o * up).sum(), feats, create_graph=True)
                h, = torch.autograd.grad((grad.square() * v).sum(), feats)
            torch.save({"h": h, "warnings": [f"{w.category.__name__}: {w.message}" for w in caught]},
                       f"{out}/{rank}.pt")
        finally:
            torch.distributed.destroy_process_group()

    if __name__ == "__main__":
        torch.multiprocessing.spawn(worker, args=(distributed.free_port(), sys.argv[1]), nprocs=2, join=True)
""")


def test_two_gloo_processes_differentiate_the_gradient_as_one_batchnorm(tmp_path):
    """A second derivative through the all-reduces (a gradient taken with
    create_graph=True and differentiated again, as GraSP's Hessian-vector
    product does) is one BatchNorm's on the whole batch: the all-reduce's
    backward ran torch.distributed.all_reduce outside autograd, so the
    second derivative missed the other process's share (0.02 off in
    float64) behind torch's 'c10d::allreduce_: an autograd kernel was not
    registered' warning."""
    ranks, shards, ups = _run_workers(tmp_path, DOUBLE_BACKWARD)
    v = torch.randn(5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    feats = torch.cat([s.feats for s in shards]).clone().requires_grad_(True)
    weight, bias = torch.ones(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    out = torch.nn.functional.batch_norm(feats, None, None, weight, bias, training=True, eps=1e-5)
    grad, = torch.autograd.grad((out * torch.cat(ups)).sum(), feats, create_graph=True)
    h, = torch.autograd.grad((grad.square() * v).sum(), feats)
    torch.testing.assert_close(torch.cat([ranks[0]["h"], ranks[1]["h"]]), h, rtol=1e-9, atol=1e-10)
