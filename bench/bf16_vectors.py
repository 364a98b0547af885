"""The bf16 inference forward with vector sparsity (AVX512-BF16): its dense
and vector-sparse forms against each other and against the float32 kernels,
in one process (the evidence behind ``nn._engine.BF16_VECTOR_DENSITY``).

    flock /work/cpu.lock .venv/bin/python bench/bf16_vectors.py [--rounds 9] [--threads 1] [--channels 16 32 64 128]
        [--pair-amounts 0.25 0.3 0.35 0.4 0.45] [--out PAGE.md] [--quick]

A submanifold k=3 conv on the KITTI sweep at 0.05 m (a generated 20k street
when absent), weights pruned by ``prune.panel_structured`` (vectors of 16
output columns per input channel: the float32 engine's granularity; with
``rows=2``, 16 x 2 blocks: whole bf16 vectors, channel pairs; with
``square=True``, 16 x 16 blocks) at several amounts; the plan's kernels
called directly (no autograd, one output buffer reused),
interleaved round by round. Per row: the float32 dense and vector kernels
(``_engine.choose_execution`` decides the offsets), the bf16 kernel forced
dense (``vector_density=-1``: offsets whose weight is zero still skipped) and
forced vector-sparse (``vector_density=1``); the density of listed bf16
vectors (offset, channel pair, 16 columns), which sets whether the engine
takes the vector form. Every bf16 vector output is first checked equal, bit
for bit, to the bf16 dense one, every float32 vector output within 1e-5 of
the largest float32 dense one. Writes bench/results/bf16_vectors.md
(``--quick``: a 20k street, C = 32, one round, the page in a temporary
folder). Needs a CPU with AVX512-BF16. Where the CPU runs AMX-BF16
(``_core.conv_amx()``) a column more: the AMX form (``tiles_width=0``: every
kept offset on the tiles), first checked against the bf16 dense form (the
same products summed in another order: within 1e-5 of the largest output).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from _common import environment, interleaved, kitti_or_street, page_arg, page_path, positive_int, write_markdown

import pointsparse as ps  # noqa: E402
from pointsparse import _ext, prune  # noqa: E402
from pointsparse.nn import _engine  # noqa: E402


def calls(plan, feats, weight, out, threads: int) -> dict:
    """name -> a call of one kernel on the same buffers."""
    run = _engine.choose_execution(weight)
    fb, wb = feats.bfloat16().view(torch.int16).numpy(), weight.bfloat16().view(torch.int16).numpy()
    f, w, o = feats.numpy(), weight.numpy(), out.numpy()

    def f32(vector):
        return lambda: plan.core.forward(f, w, None, o, threads, active=run.active, vector=vector)

    def bf16(density):
        return lambda: plan.core.forward_bf16(fb, wb, None, o, threads, vector_density=density)
    fns = {"float32 dense": f32(False), "float32 vector": f32(True), "bf16 dense": bf16(-1.0),
           "bf16 vector": bf16(1.0)}
    if _ext.core.conv_amx():
        fns["bf16 tiles"] = lambda: plan.core.forward_bf16(fb, wb, None, o, threads, tiles_width=0.0)
    return fns


def check(fns: dict, out: torch.Tensor) -> None:
    """The float32 vector form is within 1e-5 of the largest output of the
    float32 dense form; the bf16 vector form equals the bf16 dense form bit
    for bit; the AMX form (where it runs) is within 1e-5 of the largest
    output of it."""
    fns["float32 dense"]()
    dense = out.clone()
    fns["float32 vector"]()
    err = float((out - dense).abs().max()) / max(float(dense.abs().max()), 1e-30)
    if not err <= 1e-5:
        raise RuntimeError(f"the float32 vector form differs from the float32 dense form: max |diff| / max |dense| "
                           f"{err:.3g}, above the tolerance 1e-05")
    fns["bf16 dense"]()
    dense = out.clone()
    fns["bf16 vector"]()
    if not torch.equal(out, dense):
        raise RuntimeError("the bf16 vector form differs from the bf16 dense form")
    if "bf16 tiles" in fns:
        fns["bf16 tiles"]()
        if float((out - dense).abs().max()) > 1e-5 * float(dense.abs().max()):
            raise RuntimeError("the bf16 AMX form differs from the bf16 dense form")


def table(coords: torch.Tensor, widths, amounts, rounds: int, threads: int) -> list[str]:
    x = ps.SparseTensor(torch.zeros(len(coords), 1), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    names = ["float32 dense", "float32 vector", "bf16 dense", "bf16 vector"]
    amx = _ext.core.conv_amx()
    if amx:
        names.append("bf16 tiles")
    rows = ["| C | pruned | bf16 vector density | " + " | ".join(f"{n} ms" for n in names) +
            " | bf16 vector / bf16 dense | bf16 vector / float32 dense | bf16 vector / float32 vector |" +
            (" bf16 tiles / best vdpbf16ps form |" if amx else ""),
            "|---|---|---|" + "---|" * (len(names) + 3 + amx)]
    for c in widths:
        feats = torch.randn(kmap.num_in, c, generator=torch.Generator().manual_seed(c))
        out = torch.empty(kmap.num_out, c)
        for amount, shape in amounts:
            conv = ps.nn.Conv3d(c, c, 3)
            if amount > 0:
                prune.panel_structured(conv, "weight", amount, square=shape == "square",
                                       rows=shape if isinstance(shape, int) else None)
                prune.remove(conv, "weight")
            weight = conv.weight.detach().contiguous()
            fns = calls(plan, feats, weight, out, threads)
            check(fns, out)
            med = interleaved(fns, rounds)
            label = "none" if amount == 0 else f"{amount:.0%}" + {None: "", 2: " pairs", "square": " square"}[shape]
            rows.append(f"| {c} | {label} | {_engine.bf16_vectors(weight)[2]:.2f} | " +
                        " | ".join(f"{1e3 * med[n]:.2f}" for n in names) +
                        f" | {med['bf16 dense'] / med['bf16 vector']:.2f}x"
                        f" | {med['float32 dense'] / med['bf16 vector']:.2f}x"
                        f" | {med['float32 vector'] / med['bf16 vector']:.2f}x |" +
                        (f" {min(med['bf16 dense'], med['bf16 vector']) / med['bf16 tiles']:.2f}x |" if amx else ""))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=None, help="interleaved rounds (default 9, --quick 1)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 16 32 64 128")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a 20k street, C = 32, one round")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page's name in bench/results (default bf16_vectors.md)")
    parser.add_argument("--pair-amounts", type=float, nargs="+", default=None,
                        help="instead of the default amounts: the unpruned weight and whole bf16 vectors (16 x 2 "
                             "blocks) pruned by each of these fractions, so that the listed density is 1 - amount "
                             "(where the vector form crosses the dense one)")
    args = parser.parse_args()
    if not _ext.core.conv_bf16():
        sys.exit("this CPU has no AVX512-BF16: nothing to measure")
    rounds = args.rounds or (1 if args.quick else 9)
    torch.set_num_threads(args.threads)
    coords, name = kitti_or_street(args.quick)
    widths = args.channels or ((32,) if args.quick else (16, 32, 64, 128))
    amounts = [(0.0, None), (0.5, None), (0.75, None), (0.9, None), (0.5, 2), (0.75, 2), (0.5, "square"),
               (0.75, "square")]
    if args.pair_amounts:
        if not all(0.0 < a < 1.0 for a in args.pair_amounts):
            sys.exit(f"--pair-amounts must lie in (0, 1); got {args.pair_amounts}")
        amounts = [(0.0, None)] + [(a, 2) for a in args.pair_amounts]
    rows = table(coords, widths, amounts, rounds, args.threads)
    out = page_path(args.out, "bf16_vectors.md", args.quick)
    command = "python bench/bf16_vectors.py " + shlex.join(sys.argv[1:])
    write_markdown(out, f"bf16 vector sparsity, {name} ({len(coords):,} voxels), {args.threads} thread(s)",
                   command, environment(), ["\n".join(rows)])
    print(f"written {out}")


if __name__ == "__main__":
    main()
