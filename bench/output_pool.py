"""What the engine's output pool (``pointsparse.output_pool``) saves: the
same module calls with outputs from kept blocks (the default) and from
torch's allocator (fresh pages from glibc for every output over its mmap
threshold, as before stop 59), interleaved round by round in one process
(medians), on the KITTI sweep (000049, 0.05 m voxels; ``--quick``: a
generated street). Rows: a submanifold ``Conv3d(C, C, 3)`` unpruned and
with twin vectors pruned 75% (``panel_structured(panels=2)``: issue 13's
vector target), forward under ``no_grad``; a whole MinkUNet (``--cr``) in
float32 and, fused, in bf16 under ``inference_mode``; with ``--train`` also
its float32 training step (forward and backward, no optimiser step, BatchNorm
on the batch's statistics). Each pair's outputs are first checked equal bit
for bit.

    flock /work/cpu.lock .venv/bin/python bench/output_pool.py [--channels 64 128] [--rounds 11] [--train] [--quick]

The pool off is ``pointsparse._ext._pool_on = False`` between calls (the
kept blocks stay for the calls with it on), not ``output_pool(0)``, which
would empty it before every call that uses it."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys

import torch

from _common import (environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, quick_defaults,
                     write_markdown)

import pointsparse as ps
from pointsparse import _ext, prune
from pointsparse.models import MinkUNet
from pointsparse.nn import fuse_for_inference


@contextlib.contextmanager
def pool(on: bool):
    old = _ext._pool_on
    _ext._pool_on = on
    try:
        yield
    finally:
        _ext._pool_on = old


def pair(call):
    """(pool on, pool off) callables of ``call``, whose outputs are checked
    equal first."""
    def on():
        with pool(True):
            return call()

    def off():
        with pool(False):
            return call()

    a, b = on(), off()
    if not torch.equal(a, b):
        raise AssertionError("the outputs differ with the pool on and off")
    return on, off


def conv_rows(channels: list[int], coords: torch.Tensor) -> dict:
    calls = {}
    for c in channels:
        torch.manual_seed(0)
        x = ps.SparseTensor(torch.randn(len(coords), c), coords)
        for name, amount in (("unpruned", 0.0), ("twin 75%", 0.75)):
            conv = ps.nn.Conv3d(c, c, 3)
            if amount:
                prune.panel_structured(conv, "weight", amount, panels=2)

            def call(conv=conv, x=x):
                with torch.no_grad():
                    return conv(x).feats

            calls[f"Conv3d({c}, {c}, 3) {name}, forward"] = pair(call)
    return calls


def network_rows(coords: torch.Tensor, cr: float, train: bool = False) -> dict:
    torch.manual_seed(0)
    model = MinkUNet(4, 19, cr=cr).eval()
    x = ps.SparseTensor(torch.randn(len(coords), 4), coords)
    calls = {}
    if train:
        trained = MinkUNet(4, 19, cr=cr).train()

        def step():
            trained.zero_grad(set_to_none=True)
            out = trained(x).feats
            out.pow(2).mean().backward()
            return out.detach()

        calls[f"MinkUNet cr {cr} float32, training step"] = pair(step)

    def f32():
        with torch.inference_mode():
            return model(x).feats

    calls[f"MinkUNet cr {cr} float32, inference"] = pair(f32)
    if _ext.core.conv_bf16():
        fused = fuse_for_inference(MinkUNet(4, 19, cr=cr).eval()).bfloat16()
        xb = ps.SparseTensor(x.feats.bfloat16(), coords)

        def bf16():
            with torch.inference_mode():
                return fused(xb).feats

        calls[f"MinkUNet cr {cr} fused bf16, inference"] = pair(bf16)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=positive_int, nargs="+", default=None, help="default 64 128 (--quick: 32)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 11 (--quick: 1)")
    parser.add_argument("--cr", type=float, default=None, help="MinkUNet's width multiplier (default 1.0; --quick: 0.25)")
    parser.add_argument("--no-network", action="store_true", help="the single convs only")
    parser.add_argument("--train", action="store_true", help="also MinkUNet's training step (forward and backward)")
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/output_pool.md")
    parser.add_argument("--quick", action="store_true", help="a smoke run: C = 32, cr 0.25, a 20k generated street, 1 round, where those are not given")
    args = parser.parse_args()
    quick_defaults(args, channels=([64, 128], [32]), rounds=(11, 1), cr=(1.0, 0.25))
    channels, rounds = args.channels, args.rounds
    coords, scene = kitti_or_street(args.quick)
    calls = conv_rows(channels, coords)
    if not args.no_network:
        calls.update(network_rows(coords, args.cr, args.train))
    fns = {}
    for name, (on, off) in calls.items():
        fns[(name, "on")] = on
        fns[(name, "off")] = off
    med = interleaved(fns, rounds)
    lines = [f"Scene: {scene} ({len(coords):,} voxels), {rounds} interleaved rounds, medians; the pool's limit "
             f"{ps.output_pool()['max_bytes'] >> 20} MiB.", "",
             "| call | pool off (torch's allocator) ms | pool on (default) ms | speed-up |", "|---|---|---|---|"]
    for name in calls:
        off, on = med[(name, "off")], med[(name, "on")]
        lines.append(f"| {name} | {1e3 * off:.1f} | {1e3 * on:.1f} | {off / on:.2f}x |")
    state = ps.output_pool()
    lines += ["", f"Pool after the rounds: {state['kept_blocks']} blocks kept ({state['kept_bytes'] / 2**20:.0f} MiB), "
              f"{state['hits']} outputs from kept blocks, {state['misses']} allocated."]
    path = page_path(args.out, "output_pool.md", args.quick)
    command = "python bench/output_pool.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_markdown(path, "The engine's output pool", command, environment(), ["\n".join(lines)])
    print("\n".join(lines))
    print(f"written {path}")


if __name__ == "__main__":
    main()
