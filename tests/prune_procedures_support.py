"""Tiny seeded models, data and training callables for the pruning-procedure
tests (fast: a few milliseconds a step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pointsparse import SparseTensor
from pointsparse.nn import BatchNorm, Conv3d, ReLU




def teacher_data(n: int = 256, d: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    return x, (x @ w).argmax(1)


def mlp(seed: int = 0, widths=(8, 16, 12, 3), bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(widths[i + 1]))
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Trainer:
    """``train_fn(model, steps, lr)`` on the teacher data; records each call."""

    def __init__(self, seed: int = 0, lr: float = 0.1):
        self.x, self.y = teacher_data(seed=seed)
        self.lr = lr
        self.calls: list[tuple[int, float]] = []
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, model, steps, lr=None):
        lr = self.lr if lr is None else lr
        self.calls.append((steps, lr))
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        for _ in range(steps):
            idx = torch.randint(0, len(self.x), (32,), generator=self.gen)
            loss = nn.functional.cross_entropy(model(self.x[idx]), self.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    def accuracy(self, model) -> float:
        with torch.no_grad():
            return float((model(self.x).argmax(1) == self.y).float().mean())

    def loss(self, out, y):
        return nn.functional.cross_entropy(out, y)


def sparse_input(n: int = 60, channels: int = 3, seed: int = 0, extent: int = 6) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(0, extent, (n, 3), generator=g), dim=0)
    coords = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    return SparseTensor(torch.randn(len(coords), channels, generator=g), coords)


def sparse_chain(seed: int = 0, c_in: int = 3, width: int = 6, classes: int = 4) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(Conv3d(c_in, width, 3), BatchNorm(width), ReLU(), Conv3d(width, 2 * width, 3),
                        BatchNorm(2 * width), ReLU(), Conv3d(2 * width, classes, 1))
    for m in net.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def region_chain(seed: int = 0, outside: float = 0.0, c_in: int = 3, width: int = 6,
                 classes: int = 4) -> nn.Sequential:
    """A sparse chain whose first conv runs only its ``kernel_region="cross"``
    (7 of 27 offsets): the 20 offsets outside hold ``outside`` times random
    values (0: zeros, as a fresh region conv has), which the conv never
    runs; ``outside=1e-3``: smaller than any weight, the first a magnitude
    ranking over the whole tensor would prune."""
    torch.manual_seed(seed)
    net = nn.Sequential(Conv3d(c_in, width, 3, kernel_region="cross"), ReLU(), Conv3d(width, classes, 3))
    with torch.no_grad():
        conv = net[0]
        inside = conv.weight[list(conv.kernel_region)]
        conv.weight[list(conv.kernel_region)] = inside.sign() * (inside.abs() + 0.01)  # none below outside's
        rest = [k for k in range(27) if k not in conv.kernel_region]
        conv.weight[rest] = outside * torch.rand(len(rest), c_in, width)
    return net


class _Residual(nn.Module):
    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.main = nn.Sequential(Conv3d(channels, hidden, 3), BatchNorm(hidden), ReLU(), Conv3d(hidden, channels, 3),
                                  BatchNorm(channels))
        self.relu = ReLU()

    def forward(self, x):
        from pointsparse.nn import add
        return self.relu(add(self.main(x), x))


class ResidualNet(nn.Module):
    """A small residual sparse network (a MinkUNet-like wiring): a stem chain,
    a residual block, a per-site linear head."""

    def __init__(self, seed: int = 0, width: int = 8, hidden: int = 12, classes: int = 4):
        super().__init__()
        from pointsparse.nn import Linear
        torch.manual_seed(seed)
        self.stem = nn.Sequential(Conv3d(3, width, 3), BatchNorm(width), ReLU(), Conv3d(width, width, 3),
                                  BatchNorm(width), ReLU())
        self.block = _Residual(width, hidden)
        self.head = Linear(width, classes)
        for m in self.modules():
            if isinstance(m, BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(self.block(self.stem(x)))
