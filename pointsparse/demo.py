"""Voxelise a generated street scene and train a small sparse network on it."""

from __future__ import annotations

import time

import torch

from . import nn as spnn
from .voxelize import voxelize


def street_points(n: int = 60000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A quick synthetic street: ground, two facades, poles, boxes (cars).
    Returns (points (n, 3), labels (n,)): 0 ground, 1 facade, 2 pole, 3 car."""
    g = torch.Generator().manual_seed(seed)
    parts, labels = [], []
    m = n // 4
    ground = torch.rand(m, 3, generator=g) * torch.tensor([60.0, 20.0, 0.0]) - torch.tensor([30.0, 10.0, 0.0])
    parts.append(ground); labels.append(torch.zeros(m, dtype=torch.long))
    for side in (-10.0, 10.0):
        f = torch.rand(m // 2, 3, generator=g) * torch.tensor([60.0, 0.0, 12.0]) + torch.tensor([-30.0, side, 0.0])
        parts.append(f); labels.append(torch.ones(m // 2, dtype=torch.long))
    for x in range(-25, 26, 10):
        a = torch.rand(m // 12, generator=g) * 6.2832
        pole = torch.stack([x + 0.15 * a.cos(), -8 + 0.15 * a.sin(), torch.rand(m // 12, generator=g) * 6], 1)
        parts.append(pole); labels.append(torch.full((m // 12,), 2, dtype=torch.long))
    for x in (-18.0, -5.0, 9.0, 21.0):
        car = torch.rand(m // 8, 3, generator=g) * torch.tensor([4.0, 1.8, 1.5]) + torch.tensor([x, 2.0, 0.0])
        parts.append(car); labels.append(torch.full((m // 8,), 3, dtype=torch.long))
    pts = torch.cat(parts)
    pts = pts + 0.02 * torch.randn(pts.shape, generator=g)
    return pts, torch.cat(labels)


def add_arguments(parser) -> None:
    parser.add_argument("--points", type=int, default=80000, help="points in the generated scene (default 80000)")
    parser.add_argument("--voxel-size", type=float, default=0.1, help="voxel edge in metres (default 0.1)")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    torch.manual_seed(args.seed)
    points, labels = street_points(args.points, args.seed)
    t0 = time.perf_counter()
    x, inverse = voxelize(points, points - points.mean(0), voxel_size=args.voxel_size)
    voxel_labels = torch.zeros(len(x), dtype=torch.long).scatter_reduce_(0, inverse, labels, "amax", include_self=False)
    print(f"scene: {len(points)} points -> {len(x)} voxels of {args.voxel_size} m "
          f"({(time.perf_counter() - t0) * 1e3:.1f} ms)")
    net = torch.nn.Sequential(
        spnn.Conv3d(3, 16, 3), spnn.BatchNorm(16), spnn.ReLU(),
        spnn.Conv3d(16, 32, 2, stride=2), spnn.BatchNorm(32), spnn.ReLU(),
        spnn.Conv3d(32, 32, 3), spnn.BatchNorm(32), spnn.ReLU(),
        spnn.Conv3d(32, 16, 2, stride=2, transposed=True), spnn.BatchNorm(16), spnn.ReLU(),
        spnn.Conv3d(16, 4, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out.feats, voxel_labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            acc = (out.feats.argmax(1) == voxel_labels).float().mean()
            print(f"step {step:3d}  loss {loss.item():.3f}  voxel accuracy {acc.item():.3f}")
    dt = (time.perf_counter() - t0) / args.steps
    print(f"{dt * 1e3:.0f} ms per training step on {torch.get_num_threads()} threads; "
          f"kernel maps built: {len(x.cache.kmaps)}")
    return 0
