"""The vector-sparse forward kernels of each build against each other, and
against the dense kernel, in one process (issue 13; the evidence behind
``kSparse512MinCols`` in cpp/conv/sparse.cpp: the AVX-512 vector kernel runs
only from 128 output columns).

    flock /work/cpu.lock .venv/bin/python bench/sparse_isa.py [--rounds 9] [--channels 64 128] [--out PAGE.md] [--quick]

A submanifold k=3 conv on the KITTI sweep at 0.05 m (a generated 60k street
when absent), weights pruned by ``prune.panel_structured`` (75% and 50% of the
engine vectors), one thread, the plan's kernels called directly (no autograd,
no allocation: one output buffer reused), every build interleaved round by
round; outputs of the vector kernels checked equal to the dense kernel's first
(bit for bit between the FMA builds). A second table per width times the
best build's vector kernel with exactly n rows listed per panel against the
dense kernel and fits a line: the per-row cost and the fixed cost (gathered
input rows, output rows read and written per offset) that weight sparsity
cannot remove. A column names the build asked for:
below 128 output columns "avx512 vector" runs the AVX2 vector kernel (the
threshold itself) but at full width (``_core.avx512_full_width()``: Intel, AMD
Zen 5; from 16; ``POINTSPARSE_AVX512_FULL_WIDTH=0`` to time the other rule), so
that at C = 64 the two vector columns time the same code on a Zen 4.
Writes bench/results/sparse_isa.md (``--out``: another page)
(``--quick``: a 20k street, C = 64, 2 rounds, the page in a temporary folder)."""

from __future__ import annotations

import argparse
import shlex

import torch

from _common import (environment, interleaved, page_arg, page_path, positive_int, real_scene, real_sweeps,
                     street_scene, write_markdown)

import pointsparse as ps  # noqa: E402
from pointsparse import _ext, prune  # noqa: E402
from pointsparse.nn import _engine  # noqa: E402


def vector_build(isas) -> str:
    """The first build of ``isas`` (``_core.runnable_isas()``, best first)
    that has a vector kernel; a RuntimeError where none has."""
    for isa in isas:
        if isa in ("avx512", "avx2"):
            return isa
    raise RuntimeError(f"no vector build among the runnable builds {list(isas)} (avx512 or avx2 needed)")


def runs(plan, feats, weight, out) -> dict:
    """name -> a call of one build's kernel on the same buffers."""
    active = _engine.choose_execution(weight).active
    builds = [isa for isa in ("avx512", "avx2") if isa in _ext.core.runnable_isas()]

    def call(isa, vector):
        return lambda: plan.core.forward(feats.numpy(), weight.numpy(), None, out.numpy(), 1, isa=isa,
                                         active=active, vector=vector)
    best = vector_build(builds)
    return {**{f"{isa} vector": call(isa, True) for isa in builds}, f"{best} dense": call(best, False)}


def check(calls: dict, out: torch.Tensor) -> None:
    """Every vector build's output equals the dense kernel's, bit for bit."""
    results = {}
    for name, fn in calls.items():
        fn()
        results[name] = out.clone()
    dense = next(v for k, v in results.items() if k.endswith("dense"))
    for name, got in results.items():
        if not torch.equal(got, dense):
            raise RuntimeError(f"{name} differs from the dense kernel")


def table(coords: torch.Tensor, widths, amounts, rounds: int) -> list[str]:
    x = ps.SparseTensor(torch.zeros(len(coords), 1), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    rows, header = [], None
    for c in widths:
        feats = torch.randn(kmap.num_in, c, generator=torch.Generator().manual_seed(c))
        out = torch.empty(kmap.num_out, c)
        for amount in amounts:
            conv = ps.nn.Conv3d(c, c, 3)
            prune.panel_structured(conv, "weight", amount)
            prune.remove(conv, "weight")
            calls = runs(plan, feats, conv.weight.detach().contiguous(), out)
            check(calls, out)
            med = interleaved(calls, rounds)
            dense = next(v for k, v in med.items() if k.endswith("dense"))
            if header is None:
                header = "| C | vectors pruned | " + " | ".join(f"{k} ms" for k in med) + " | " + \
                         " | ".join(f"{k} speed-up" for k in med if k.endswith("vector")) + " |"
                rows += [header, "|" + "---|" * (2 + len(med) + len(med) - 1)]
            rows.append(f"| {c} | {amount:.0%} | " + " | ".join(f"{1e3 * v:.2f}" for v in med.values()) + " | " +
                        " | ".join(f"{dense / v:.2f}x" for k, v in med.items() if k.endswith("vector")) + " |")
            print(rows[-1], flush=True)
    return rows


def listed_weight(c: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """A (27, c, c) weight whose every (offset, panel) lists exactly ``n``
    rows (random ones): the vector kernels visit n rows per panel."""
    width = _engine.panel_width(torch.float32)
    w = torch.zeros(27, c, c)
    for k in range(27):
        for p in range(0, c, width):
            rows = torch.randperm(c, generator=generator)[:n]
            w[k, rows, p:p + width] = torch.randn(n, min(width, c - p), generator=generator)
    return w


def listed_line(coords: torch.Tensor, c: int, rounds: int) -> list[str]:
    """The vector kernel's time against the rows listed per panel (n = c,
    c/2, .., 1; each output first checked equal to the dense kernel's on
    the same weight), the dense kernel on the full weight beside it, and the
    least-squares line through the vector times: the slope is the cost of a
    listed row, the intercept what no weight sparsity removes."""
    x = ps.SparseTensor(torch.zeros(len(coords), 1), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.make_fused_plan(kmap)
    g = torch.Generator().manual_seed(c)
    feats, out = torch.randn(kmap.num_in, c, generator=g), torch.empty(kmap.num_out, c)
    counts = [c >> i for i in range(8) if c >> i >= 1]
    build = vector_build(_ext.core.runnable_isas())
    calls = {"dense": runs(plan, feats, listed_weight(c, c, g), out)[f"{build} dense"]}
    for n in counts:
        on_n = runs(plan, feats, listed_weight(c, n, g), out)
        # the vector kernel against the dense one on the same weight, before timing
        check({name: on_n[name] for name in (f"{build} vector", f"{build} dense")}, out)
        calls[n] = on_n[f"{build} vector"]
    med = interleaved(calls, rounds)
    xs, ys = counts, [med[n] for n in counts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    rows = [f"C = {c}: dense kernel {1e3 * med['dense']:.2f} ms; vector kernel ~ {1e3 * (my - slope * mx):.2f} ms "
            f"+ {1e3 * slope:.3f} ms per listed row (least squares)", "",
            "| rows listed per panel | vector kernel ms | dense / vector |", "|---|---|---|"]
    rows += [f"| {n} of {c} | {1e3 * med[n]:.2f} | {med['dense'] / med[n]:.2f}x |" for n in counts]
    print("\n".join(rows), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=None, help="interleaved rounds (default 9, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: a 20k street, C = 64, 2 rounds")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page's name in bench/results (default sparse_isa.md)")
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 64 128 (--quick 64)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 9)
    torch.set_num_threads(1)
    sweeps = {} if args.quick else real_sweeps()
    if "kitti-raw/000049" in sweeps:
        name, coords = "KITTI raw 000049 @ 0.05 m", real_scene(sweeps["kitti-raw/000049"], 0.05)
    else:
        name, coords = f"generated street {20 if args.quick else 60}k @ 0.05 m", \
            street_scene(20_000 if args.quick else 60_000)
    widths, amounts = ((64,), (0.75,)) if args.quick else ((64, 128), (0.75, 0.5))
    widths = tuple(args.channels) if args.channels else widths
    rows = table(coords, widths, amounts, rounds)
    lines = ["\n".join(listed_line(coords, c, rounds)) for c in widths]
    out = page_path(args.out, "sparse_isa.md", args.quick)
    write_markdown(out, f"Vector-sparse kernels of each build, {name} ({len(coords):,} voxels), 1 thread",
                   f"python bench/sparse_isa.py --rounds {rounds}" + (" --quick" if args.quick else "") +
                   (f" --out {shlex.quote(args.out)}" if args.out else "") +
                   (" --channels " + " ".join(map(str, args.channels)) if args.channels else ""),
                   environment(), ["\n".join(rows)] + lines)
    print(f"written {out}")


if __name__ == "__main__":
    main()
