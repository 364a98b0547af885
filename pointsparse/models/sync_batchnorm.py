"""Batch normalisation whose statistics span every process of a
torch.distributed job (``torch.nn.SyncBatchNorm`` only runs on GPUs; this one
runs on any backend, gloo on the CPU included)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .. import nn as spnn
from ..tensor import SparseTensor


class _AllReduceSum(torch.autograd.Function):
    """The sum of ``tensor`` over every process of the default group, with
    its gradient: each process's share of the total loss reaches every
    input through the sum, so the gradient is the all-reduced sum of the
    output's gradients (torch.distributed.nn's ``all_reduce``, deprecated in
    torch 2.13, computed the same), itself this Function, so that a second
    derivative (a gradient taken with ``create_graph=True`` and
    differentiated again, as GraSP's Hessian-vector product) sums the
    processes' shares too."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone()
        torch.distributed.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        # (through the Function again: an all_reduce here ran outside autograd, and a second derivative
        # missed the other processes' shares behind torch's "c10d::allreduce_: an autograd kernel was not
        # registered" warning)
        return _AllReduceSum.apply(grad.contiguous())


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class SyncBatchNorm(spnn.BatchNorm):
    """:class:`pointsparse.nn.BatchNorm` with global statistics: in training,
    the per-channel sum, sum of squares and row count are all-reduced (with
    gradients), so N processes on N shards
    compute what one process computes on the whole batch (one site over all
    of them is BatchNorm's :class:`~pointsparse.nn.BatchStatisticsError`).
    Outside a distributed job, or in eval mode, it is a plain BatchNorm."""

    def forward(self, input):  # type: ignore[override]
        """A SparseTensor (normalises its feats) or a plain ``(N, C)`` tensor."""
        dist = torch.distributed
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input) if isinstance(input, SparseTensor) else nn.BatchNorm1d.forward(self, input)
        # (checked here: one channel broadcast below silently to num_features, others failed in torch)
        if isinstance(input, SparseTensor):
            self._check_feats(input)
        else:
            stats = self._stats()
            channels = self.num_features if stats is None else stats.shape[0]
            if not isinstance(input, torch.Tensor) or input.dim() != 2 or input.shape[1] != channels:
                got = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
                raise ValueError(f"SyncBatchNorm takes a SparseTensor or an (N, {channels}) tensor; got {got}")
        x = input.feats if isinstance(input, SparseTensor) else input
        c = x.shape[1]
        # bfloat16 / float16 feats: the statistics and the normalisation in
        # float32, as torch's batch norm keeps them (a float16 sum of a
        # shard's rows overflows), the output in the feats' dtype.
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        # Two passes (mean, then squared deviations) keep the variance exact
        # in float32 where E[x^2] - mean^2 would cancel.
        total = _all_reduce(torch.cat([x.sum(0), x.new_tensor([x.shape[0]])]))
        count = total[c]
        n = float(count.detach())  # (read once: the one-site check here, the running variance's correction below)
        if n == 1:  # (the same count on every process: each raises, none waits in the next all-reduce)
            raise self._one_site_error(f"1 site at stride {input.stride} over all processes"
                                       if isinstance(input, SparseTensor) else "1 row over all processes")
        mean = total[:c] / count
        centred = x - mean
        var = _all_reduce(centred.square().sum(0)) / count
        out = centred * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.to(out.dtype) + self.bias.to(out.dtype)
        out = out.to(dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * unbiased)
        return input.with_feats(out) if isinstance(input, SparseTensor) else out

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """``module`` with every :class:`pointsparse.nn.BatchNorm` (and
        ``torch.nn.BatchNorm1d``, as in point branches) replaced by a
        SyncBatchNorm holding the same parameters and buffers (the same
        tensors, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` shares
        them: their dtype, device and ``requires_grad`` kept) and hooks (a
        pruning reparametrisation, ``weight_orig`` + ``weight_mask``, with
        its hook). TypeError where ``module`` is no ``torch.nn.Module``."""
        if not isinstance(module, nn.Module):  # (else an AttributeError from the walk below)
            raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
        if isinstance(module, nn.BatchNorm1d) and not isinstance(module, cls):
            # The module's state under the new class (SyncBatchNorm adds none
            # of its own); each of its dicts (and sets) copied, their tensors and hooks shared.
            new = cls.__new__(cls)
            state = module.__dict__.items()
            new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in state})
            return new
        for name, child in module.named_children():
            setattr(module, name, cls.convert(child))
        return module
