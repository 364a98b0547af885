"""A bfloat16 / float16 conv in training: the float32 kernels on the
widened values (what the engine runs since stop 64,
``_engine.sixteen_bit_on_float32``) against the torch path it ran before
(each offset's product in the 16-bit dtype, ``backend("torch")`` around the
call). One submanifold ``Conv3d(C, C, 3)`` on the KITTI sweep (000049, 0.05
m; a generated street of 20k voxels where the dataset is absent), forward
and backward (feats, weight and bias gradients), the kernel map built once,
interleaved rounds, medians. Before timing, both paths' outputs and
gradients are checked against float64 on the same 16-bit values: the
engine within one rounding of the dtype (a float32 sum rounded once), and
its output bit for bit the float32 engine's rounded.

    python bench/bf16_training.py [--channels 16 32 64] [--dtypes bfloat16 float16] [--rounds 7] [--threads 2] [--out PAGE.md] [--quick]

``--quick``: C = 16 on a 20k generated street, one round (``--channels`` and
``--rounds`` where given), the page in a temporary folder."""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from _common import (enforce_error, environment, interleaved, kitti_or_street, page_arg, page_path, positive_int,
                     quick_defaults, write_markdown)

import pointsparse as ps
from pointsparse.nn import functional as F

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _step(x: ps.SparseTensor, weight: torch.Tensor, bias: torch.Tensor, up: torch.Tensor, torch_path: bool):
    feats = x.feats.detach().requires_grad_()
    w, b = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    if torch_path:
        with ps.backend("torch"):
            out = F.conv3d(x.with_feats(feats), w, 3, bias=b)
    else:
        out = F.conv3d(x.with_feats(feats), w, 3, bias=b)
    out.feats.backward(up)
    return out.feats.detach(), feats.grad, w.grad, b.grad


def _relative(got, want) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def table(coords: torch.Tensor, channels: int, dtype: torch.dtype, rounds: int) -> str:
    g = torch.Generator().manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels, generator=g).to(dtype), coords)
    ps.kmap.get_kmap(x, 3)  # (built once, outside the rounds)
    weight = (torch.randn(27, channels, channels, generator=g) / (27 * channels) ** 0.5).to(dtype)
    bias = torch.randn(channels, generator=g).to(dtype)
    up = torch.randn(len(coords), channels, generator=g).to(dtype)
    exact = _step(x.with_feats(x.feats.double()), weight.double(), bias.double(), up.double(), False)
    name = str(dtype).replace("torch.", "")
    eps = torch.finfo(dtype).eps
    for label, torch_path, tolerance in (("engine", False, 2 * eps), ("torch path", True, 64 * eps)):
        got = _step(x, weight, bias, up, torch_path)
        for part, g_, e in zip(("output", "feats grad", "weight grad", "bias grad"), got, exact):
            enforce_error(f"{name} C = {channels}, {label}, {part}", _relative(g_, e), tolerance, "max relative error")
    engine = _step(x, weight, bias, up, False)[0]
    wide = F.conv3d(x.with_feats(x.feats.float()), weight.float(), 3, bias=bias.float()).feats.to(dtype)
    if not torch.equal(engine, wide):
        raise RuntimeError(f"{name} C = {channels}: the engine's output is not the float32 engine's rounded")
    times = interleaved({"engine": lambda: _step(x, weight, bias, up, False),
                         "torch": lambda: _step(x, weight, bias, up, True)}, rounds)
    errors = {label: _relative(_step(x, weight, bias, up, tp)[0], exact[0]) for label, tp in
              (("engine", False), ("torch", True))}
    return (f"| {name} | {channels} | {times['torch'] * 1e3:.1f} | {errors['torch']:.1e} | "
            f"{times['engine'] * 1e3:.1f} | {errors['engine']:.1e} | {times['torch'] / times['engine']:.2f}x |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=positive_int, nargs="+", default=None,
                        help="default 16 32 64 (--quick: 16)")
    parser.add_argument("--dtypes", choices=sorted(DTYPES), nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 7 (--quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=page_arg, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="C = 16 on a 20k generated street, 1 round, where those are not given")
    args = parser.parse_args(argv)
    quick_defaults(args, channels=([16, 32, 64], [16]), rounds=(7, 1))
    torch.set_num_threads(args.threads)
    coords, scene = kitti_or_street(args.quick)
    channels, rounds = args.channels, args.rounds
    rows = [table(coords, c, DTYPES[d], rounds) for d in args.dtypes for c in channels]
    head = (f"### One submanifold Conv3d(C, C, 3), forward + backward, {scene} ({len(coords)} voxels), "
            f"{args.threads} threads, medians of {rounds} interleaved rounds\n\n"
            "| dtype | C | torch path ms | its output's error | engine ms | its output's error | speed-up |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    notes = ("Errors: the output's largest difference from float64 on the same 16-bit values, over its largest "
             "value. The engine's output is the float32 engine's on the widened values, rounded once (checked "
             "bit for bit); every output and gradient of both paths is checked against float64 before timing.")
    path = page_path(args.out, "bf16_training.md", args.quick)
    command = "python bench/bf16_training.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                   else sys.argv[1:]))
    write_markdown(path, "A 16-bit conv in training: the engine against the torch path", command.strip(),
                   environment(), [head], notes)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
