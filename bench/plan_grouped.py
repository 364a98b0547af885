"""Issue 14, item 3: what the fused plan costs against its kernel map, and
whether the grouped method (gather, torch mm/bmm per group of offsets,
scatter-add) earns a place beside the fused engine. It did not, and left the
package: the grouped method timed here is bench/_grouped.py's pure-torch form.

    flock /work/cpu.lock .venv/bin/python bench/plan_grouped.py [--repeats 9] [--out PAGE.md] [--quick]

On the KITTI sweep at 0.05 m (a generated 100k street when absent): for the
submanifold k=3 and strided k=2 s=2 maps, the map build, the fused plan and
the grouped plan (interleaved medians); then the conv with each method,
forward and forward+backward at C = 64 and 128, outputs checked equal to
float rounding (and the gradients) first. Writes bench/results/plan_grouped.md
(or ``--out``; ``--quick``: a 20k generated street, C = 64 only, 2 repeats, the page in a
temporary folder).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from _common import (environment, interleaved, page_arg, page_path, positive_int, real_scene, real_sweeps,
                     street_scene, write_markdown)

import pointsparse as ps  # noqa: E402  (after _common puts the repo on the path)
from pointsparse import _ext  # noqa: E402
from pointsparse.nn import _engine  # noqa: E402
import _grouped as grouped  # noqa: E402  (bench/_grouped.py)

MAPS = (("submanifold k=3", 3, 1), ("strided k=2 s=2", 2, 2))



def plan_rows(coords: torch.Tensor, repeats: int) -> list[str]:
    rows = ["| map | pairs | map build ms | fused plan ms | fused plan / map | grouped plan ms |", "|---|---|---|---|---|---|"]
    for name, k, t in MAPS:
        kmap = ps.kmap.build(coords, k, t)
        med = interleaved({"map": lambda: ps.kmap.build(coords, k, t),
                           "fused": lambda: _engine.make_fused_plan(kmap),
                           "grouped": lambda: grouped.make_plan(kmap)}, repeats)
        rows.append(f"| {name} | {kmap.num_pairs} | {med['map'] * 1e3:.2f} | {med['fused'] * 1e3:.2f} | "
                    f"{100 * med['fused'] / med['map']:.0f}% | {med['grouped'] * 1e3:.2f} |")
        print(rows[-1], flush=True)
    return rows


def run(feats, weight, kmap, plan, backward: bool) -> tuple:
    """The output, and with ``backward`` the gradients of feats and weight."""
    f, w = feats.detach().requires_grad_(backward), weight.detach().requires_grad_(backward)
    if isinstance(plan, grouped.Plan):
        out = grouped.GroupedConv.apply(f, w, plan)
    else:
        out = _engine.ConvFunction.apply(f, w, None, plan, None, None)
    if backward:
        out.backward(torch.ones_like(out))
    return out, f.grad, w.grad


def method_rows(coords: torch.Tensor, repeats: int, widths=(64, 128)) -> list[str]:
    rows = ["| map | C | fused fwd ms | grouped fwd ms | grouped / fused | fused fwd+bwd ms | grouped fwd+bwd ms | "
            "grouped / fused |", "|---|---|---|---|---|---|---|---|"]
    for name, k, t in MAPS:
        kmap = ps.kmap.build(coords, k, t)
        plans = {"fused": _engine.make_fused_plan(kmap), "grouped": grouped.make_plan(kmap)}
        for c in widths:
            g = torch.Generator().manual_seed(c)
            feats, weight = torch.randn(kmap.num_in, c, generator=g), torch.randn(k**3, c, c, generator=g) / c
            for a, b in zip(*(run(feats, weight, kmap, plans[m], True) for m in ("fused", "grouped"))):
                err = float((a - b).detach().abs().max() / a.detach().abs().max())
                if err > 1e-5:
                    raise RuntimeError(f"{name} C={c}: the methods differ (rel {err:.1e})")
            med = interleaved({f"{m} {bw}": (lambda m=m, bw=bw: run(feats, weight, kmap, plans[m], bw))
                               for bw in (False, True) for m in plans}, repeats)
            f1, g1, f2, g2 = (med[f"{m} {bw}"] for bw in (False, True) for m in ("fused", "grouped"))
            rows.append(f"| {name} | {c} | {f1 * 1e3:.1f} | {g1 * 1e3:.1f} | {g1 / f1:.2f}x | {f2 * 1e3:.1f} | "
                        f"{g2 * 1e3:.1f} | {g2 / f2:.2f}x |")
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=positive_int, default=None, help="interleaved repeats (default 9, --quick 2)")
    p.add_argument("--quick", action="store_true", help="a smoke run: a 20k generated street, C = 64, 2 repeats")
    p.add_argument("--out", type=page_arg, default=None, help="the page (default bench/results/plan_grouped.md)")
    args = p.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 9)
    sweeps = {} if args.quick else real_sweeps()
    name, size = "kitti-raw/000049", 20_000 if args.quick else 100_000
    coords = real_scene(sweeps[name], 0.05) if name in sweeps else street_scene(size)
    scene = f"{name} @ 0.05 m" if name in sweeps else f"generated street {size // 1000}k"
    tables = ["\n".join(plan_rows(coords, repeats)),
              "\n".join(method_rows(coords, repeats, (64,) if args.quick else (64, 128)))]
    cmd = "flock /work/cpu.lock .venv/bin/python bench/plan_grouped.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                      else argv)
    output = page_path(args.out, "plan_grouped.md", args.quick)
    write_markdown(output, f"Plan cost and the grouped method ({scene}, {len(coords)} voxels)",
                   cmd, environment() | {"isa": _ext.core.conv_isa()}, tables)
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
