"""The north star's bf16 convs, each timed in the AMX form and in the
engine's ``vdpbf16ps`` choice, inside the network (the evidence behind
``nn._engine.BF16_TILES_WIDTH``; needs a CPU with AMX-BF16; without one it says so and exits 0).

    flock /work/cpu.lock .venv/bin/python bench/bf16_layers.py [--rounds 5] [--threads 2] [--amount 0.75] [--quick]

The model is bench/north_star.py's "keep 0.25 + fuse + pair vectors 75% +
bf16" MinkUNet (``--amount``: the pair vectors pruned) on KITTI raw 000049
at 0.05 m (a generated street of 20k voxels where the dataset is absent).
One forward of the network calls every bf16 conv; each call is run once
in each form, the tiles' output checked against the vdpbf16ps one (within
a bfloat16 rounding step of the largest output), then ``--rounds`` times
more in each form on the same buffers, interleaved in a new order each
round, and its median kept: the tiles (``tiles_width=0``) against the vdpbf16ps form
the engine picks without them (the vector threshold of ``nn._engine``).
Per conv: its weight's shape, rows, the form each way, the listed width
(density of listed bf16 vectors x sqrt(C_in x C_out)) and the two times;
then the convs' total under each candidate width (the tiles where the
listed width reaches it). Writes bench/results/bf16_layers.md (``--out``:
another page; ``--quick``: the generated street, one round, the page in a
temporary folder).
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from _common import enforce_error, environment, kitti_path, page_arg, page_path, positive_int, street_scene, write_markdown
from north_star import inputs, vector_sparse
from prune_speed import _variants

import pointsparse as ps
from pointsparse import _ext
from pointsparse.nn import _engine

WIDTHS = (0.0, 8.0, 12.0, 16.0, 20.0, 24.0, 32.0, math.inf)


FORMS = (("tiles", 0.0), ("vdpbf16ps", math.inf))  # (name, tiles_width)


def check_tiles(shape: tuple, outputs: dict) -> None:
    """The tiles' output against the vdpbf16ps form's (the same products
    summed in another order): within 1e-5 of the largest output for a
    float32 output, one bfloat16 rounding step of it (2^-7) for a bfloat16
    one (int16 storage); else a RuntimeError naming the conv."""
    got, want = (torch.from_numpy(outputs[k]) for k in ("tiles", "vdpbf16ps"))
    bf16 = want.dtype == torch.int16
    if bf16:
        got, want = got.view(torch.bfloat16).float(), want.view(torch.bfloat16).float()
    err = float((got - want).abs().max()) / max(float(want.abs().max()), 1e-30)
    enforce_error(f"conv {shape}, tiles against vdpbf16ps", err, 2.0 ** -7 if bf16 else 1e-5,
                  "max |tiles - vdpbf16ps| / max |vdpbf16ps|")


class Timed:
    """A plan's core whose forward_bf16 runs each form (FORMS) once, checks
    the tiles against the vdpbf16ps form (:func:`check_tiles`), then times
    ``rounds`` runs of each on the same buffers, interleaved in a new
    (seeded) order each round, and appends the conv's row to ``rows``."""

    def __init__(self, core, weight, rounds: int, rows: list):
        self.core, self.weight, self.rounds, self.rows = core, weight, rounds, rows

    def forward_bf16(self, *args, **kwargs):
        out = args[3] if args[3] is not None else kwargs["out_bf16"]
        ran, outputs = {}, {}
        for name, width in FORMS:  # untimed: warm, and the outputs checked before timing
            ran[name] = self.core.forward_bf16(*args, **dict(kwargs, tiles_width=width))
            outputs[name] = np.array(out, copy=True)
        check_tiles(tuple(self.weight.shape), outputs)
        times = {name: [] for name, _ in FORMS}
        order = np.random.default_rng(len(self.rows))
        for _ in range(self.rounds):
            for i in order.permutation(len(FORMS)):
                name, width = FORMS[i]
                t0 = time.perf_counter()
                self.core.forward_bf16(*args, **dict(kwargs, tiles_width=width))
                times[name].append(time.perf_counter() - t0)
        _, c_in, c_out = self.weight.shape
        self.rows.append({"shape": tuple(self.weight.shape), "rows": out.shape[0], "ran": ran,
                          "width": _engine.bf16_vectors(self.weight)[2] * math.sqrt(c_in * c_out),
                          "tiles": statistics.median(times["tiles"]),
                          "vdpbf16ps": statistics.median(times["vdpbf16ps"])})
        # the output the network goes on with: the engine's own choice
        return self.core.forward_bf16(*args, **kwargs)


def measure(x: ps.SparseTensor, amount: float, rounds: int) -> list[dict]:
    """One row per bf16 conv of the model's forward on ``x``."""
    nets, _ = _variants(x, [(0.25, 8)])
    model = vector_sparse(ps.nn.fuse_for_inference(nets["keep 0.25 (x8)"]), amount, rows=2).to(torch.bfloat16)
    xb = ps.SparseTensor(x.feats.bfloat16(), x.coords)
    rows = []
    real = _engine.bf16_forward

    def spy(feats, weight, bias, plan, relu=False, add=None):
        timed = _engine.FusedPlan(Timed(plan.core, weight, rounds, rows), plan.identity, plan.num_in, plan.num_out)
        return real(feats, weight, bias, timed, relu, add)

    with torch.no_grad():
        model(xb)  # maps and plans built, warm
        _engine.bf16_forward = spy
        try:
            model(xb)
        finally:
            _engine.bf16_forward = real
    return rows


def tables(rows: list[dict]) -> list[str]:
    per = ["| conv (K, C_in, C_out) | rows | vdpbf16ps form | listed width | vdpbf16ps ms | tiles ms | "
           "vdpbf16ps / tiles |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        per.append(f"| {r['shape']} | {r['rows']:,} | {r['ran']['vdpbf16ps']} | {r['width']:.1f} | "
                   f"{1e3 * r['vdpbf16ps']:.2f} | {1e3 * r['tiles']:.2f} | {r['vdpbf16ps'] / r['tiles']:.2f}x |")
    total = ["| tiles where the listed width reaches | the convs' total ms |", "|---|---|"]
    for w in WIDTHS:
        name = "never (vdpbf16ps only)" if w == math.inf else f"{w:g}" + (" (the engine's)" if
                                                                         w == _engine.BF16_TILES_WIDTH else "")
        ms = 1e3 * sum(r["tiles"] if r["width"] >= w else r["vdpbf16ps"] for r in rows)
        total.append(f"| {name} | {ms:.1f} |")
    return ["\n".join(per), "\n".join(total)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="runs of each conv each way (default 5, --quick 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--amount", type=float, default=0.75, help="the pair vectors pruned (default 0.75)")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page's name in bench/results (default bf16_layers.md)")
    parser.add_argument("--quick", action="store_true", help="a generated street of 20k voxels, one round")
    args = parser.parse_args()
    if not _ext.core.conv_amx():
        print("bf16_layers: this CPU (or OS) runs no AMX-BF16 tiles: nothing measured")
        return
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (1 if args.quick else 5)
    if args.quick or kitti_path() is None:
        coords, name = street_scene(20000), "a generated street (20k voxels)"
        xyz = coords[:, 1:].float() * 0.05
        feats = torch.cat([xyz / 50.0, torch.rand(len(xyz), 1, generator=torch.Generator().manual_seed(0))], 1)
    else:
        xyz, feats = inputs(np.fromfile(str(kitti_path()), dtype=np.float32).reshape(-1, 4))
        name = "KITTI raw 000049 at 0.05 m"
    base, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
    rows = measure(ps.SparseTensor(base.feats, base.coords), args.amount, rounds)
    out = page_path(args.out, "bf16_layers.md", args.quick)
    write_markdown(out, f"The north star's bf16 convs in the AMX form and the vdpbf16ps one, {name} "
                        f"({len(base):,} voxels), pair vectors {args.amount:.0%}, {args.threads} threads",
                   "python bench/bf16_layers.py " + shlex.join(sys.argv[1:]), environment(), tables(rows))
    print(out.read_text())


if __name__ == "__main__":
    main()
