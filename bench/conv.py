"""Sparse convolution speed: pointsparse's engine against a naive torch loop
(gather + mm + index_add_ per offset: pointsparse.nn.reference.conv_sum) and, when installed,
spconv's CPU build; effective GFLOP/s and the fraction of the torch.mm rate
measured in the same run.

    flock /tmp/ps-heavy.lock .venv/bin/python bench/conv.py [--quick] [--tune]
    flock /tmp/ps-heavy.lock .venv/bin/python bench/conv.py --parts --out bench/results/conv_parts.md

The engine (fused) and the grouped method (bench/_grouped.py: torch gather,
mm/bmm, index_add_ scatter; it left the package) are both timed.
Layers: submanifold k=3, strided k=2 s=2, transposed k=2 s=2, on generated
street scenes (25k / 100k / 200k voxels at 0.05 m) and the real sweeps.
Results: bench/results/conv.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch

from _common import (enforce_error, environment, interleaved, kitti_searched, page_arg, page_path, positive_int,
                     real_scene, real_sweeps, street_scene, timeit, write_markdown)

import pointsparse as ps  # noqa: E402  (after _common puts the repo on the path)
from pointsparse.nn import _engine  # noqa: E402
from pointsparse.nn import functional as F  # noqa: E402
from pointsparse.nn.reference import conv_sum  # noqa: E402  (the baseline: gather, mm, index_add_ per offset)
import _grouped as grouped  # noqa: E402  (bench/_grouped.py)

try:  # optional comparison; never installed by this project
    import spconv.pytorch as spconv  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    spconv = None


class Layer:
    """One benchmarked layer: its input tensor, kernel map and flop count."""

    def __init__(self, name: str, coords: torch.Tensor, kind: str, channels: int):
        self.name, self.kind, self.channels = name, kind, channels
        g = torch.Generator().manual_seed(0)
        base = ps.SparseTensor(torch.randn(len(coords), channels, generator=g), coords)
        if kind == "submanifold k=3":
            self.input, self.args = base, (3, 1, False)
        elif kind == "strided k=2 s=2":
            self.input, self.args = base, (2, 2, False)
        else:  # transposed k=2 s=2: from the stride-2 coords back to the scene
            down = ps.kmap.get_kmap(base, 2, 2)
            self.input = ps.SparseTensor(torch.randn(down.num_out, channels, generator=g), down.out_coords, 2,
                                         cache=base.cache, validate=False)
            self.args = (2, 2, True)
        k, t, transposed = self.args
        self.kmap = ps.kmap.get_kmap(self.input, k, t, 1, transposed)
        self.weight = torch.randn(k**3, channels, channels, generator=g) / (channels * 3) ** 0.5
        self.flops = 2.0 * self.kmap.num_pairs * channels * channels

    def ours(self, backward: bool, plan=None):
        feats = self.input.feats.requires_grad_(backward)
        weight = self.weight.requires_grad_(backward)
        if plan is None:
            k, t, transposed = self.args
            out = F.conv3d(self.input.with_feats(feats), weight, k, t, transposed=transposed).feats
        elif isinstance(plan, grouped.Plan):
            out = grouped.GroupedConv.apply(feats, weight, plan)
        else:
            out = _engine.ConvFunction.apply(feats, weight, None, plan, None, None)
        if backward:
            out.backward(torch.ones_like(out))
            feats.grad = weight.grad = None
        return out

    def naive(self, backward: bool):
        feats = self.input.feats.requires_grad_(backward)
        weight = self.weight.requires_grad_(backward)
        out = conv_sum(feats, weight, self.kmap)
        if backward:
            out.backward(torch.ones_like(out))
            feats.grad = weight.grad = None
        return out

    def spconv_fn(self):  # pragma: no cover - only with spconv installed
        """spconv's CPU layer on the same input (submanifold and strided only)."""
        if spconv is None or self.kind.startswith("transposed"):
            return None
        c = self.input.coords
        indices = torch.cat([c[:, :1], c[:, 1:] // self.input.stride[0]], 1).int()
        shape = (indices[:, 1:].max(0).values + 1).tolist()
        layer = (spconv.SubMConv3d(self.channels, self.channels, 3, bias=False) if self.args[1] == 1
                 else spconv.SparseConv3d(self.channels, self.channels, 2, 2, bias=False))

        def run(backward: bool):
            feats = self.input.feats.requires_grad_(backward)
            x = spconv.SparseConvTensor(feats, indices, shape, int(c[:, 0].max()) + 1)
            out = layer(x).features
            if backward:
                out.backward(torch.ones_like(out))
                feats.grad = None
                layer.zero_grad()
            return out
        return run


def mm_rate(rows: int, channels: int, repeats: int) -> float:
    """GFLOP/s of (rows x C) @ (C x C), the GEMM shape of the convolution."""
    a, b = torch.randn(rows, channels), torch.randn(channels, channels)
    out = torch.empty(rows, channels)
    t = timeit(lambda: torch.mm(a, b, out=out), repeats)
    return 2.0 * rows * channels * channels / t / 1e9


def sgemm_rate(repeats: int) -> float:
    a = torch.randn(2048, 2048)
    t = timeit(lambda: torch.mm(a, a), repeats)
    return 2.0 * 2048**3 / t / 1e9


def scenes(quick: bool) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, coords, sweep all channel widths)."""
    out = []
    for n in ((100_000,) if quick else (25_000, 100_000, 200_000)):
        out.append((f"street {n // 1000}k", street_scene(n), n == 100_000))
    for name, pts in real_sweeps().items():
        if quick and not name.startswith("kitti"):
            continue
        if name.startswith("ign"):
            continue  # aerial tiles: covered by the kmap bench
        out.append((f"{name} @0.05", real_scene(pts, 0.05), name.startswith("kitti")))
    return out


def bench(quick: bool, repeats: int) -> list[str]:
    rows = []
    header = ("| scene | voxels | layer | C | pairs | mm GF/s | fwd ms (ours / naive) | fwd GF/s | fwd % mm | "
              "fwd+bwd ms (ours / naive) | fwd+bwd GF/s | fwd+bwd % mm | speedup fwd+bwd | "
              "grouped fwd / fwd+bwd ms | spconv fwd+bwd ms |")
    rows.append(header)
    rows.append("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for scene, coords, sweep in scenes(quick):
        widths = (16, 32, 64, 128) if (sweep and not quick) else (64,)
        for kind in ("submanifold k=3", "strided k=2 s=2", "transposed k=2 s=2"):
            for c in widths:
                layer = Layer(scene, coords, kind, c)
                ref = layer.naive(False)
                got = layer.ours(False)
                err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
                if err > 1e-4:
                    raise RuntimeError(f"{scene} {kind} C={c}: ours differs from the naive loop (rel {err:.2e})")
                rate = mm_rate(max(layer.kmap.num_pairs // layer.kmap.kernel_volume, 1) * 4, c, repeats)
                steps = grouped.make_plan(layer.kmap)
                fns = {"fwd ours": lambda: layer.ours(False), "fwd naive": lambda: layer.naive(False),
                       "fwd+bwd ours": lambda: layer.ours(True), "fwd+bwd naive": lambda: layer.naive(True),
                       "fwd grouped": lambda: layer.ours(False, steps),
                       "fwd+bwd grouped": lambda: layer.ours(True, steps)}
                sp_run = layer.spconv_fn()
                if sp_run is not None:
                    fns["spconv fwd+bwd"] = lambda: sp_run(True)
                med = interleaved(fns, repeats)  # every method in each round
                f_ours, f_naive, b_ours, b_naive, f_grouped, b_grouped = (med[k] for k in (
                    "fwd ours", "fwd naive", "fwd+bwd ours", "fwd+bwd naive", "fwd grouped", "fwd+bwd grouped"))
                gf, gb = layer.flops / f_ours / 1e9, 3 * layer.flops / b_ours / 1e9
                sp = ("not installed" if spconv is None else "n/a" if sp_run is None
                      else f"{med['spconv fwd+bwd'] * 1e3:.1f}")
                rows.append(
                    f"| {scene} | {len(coords)} | {kind} | {c} | {layer.kmap.num_pairs} | {rate:.0f} | "
                    f"{f_ours * 1e3:.1f} / {f_naive * 1e3:.1f} | {gf:.0f} | {100 * gf / rate:.0f}% | "
                    f"{b_ours * 1e3:.1f} / {b_naive * 1e3:.1f} | {gb:.0f} | {100 * gb / rate:.0f}% | "
                    f"{b_naive / b_ours:.2f}x | {f_grouped * 1e3:.1f} / {b_grouped * 1e3:.1f} | {sp} |")
                print(rows[-1], flush=True)
    return rows


def tune(repeats: int) -> list[str]:
    """Forward and forward+backward of the engine at C=64: the fused method,
    and the grouped method over chunk_rows x epsilon x tile_rows, on the 100k
    street scene and the KITTI sweep."""
    layers = [Layer("street 100k", street_scene(100_000), kind, 64) for kind in ("submanifold k=3", "strided k=2 s=2")]
    sweeps = real_sweeps()
    if "kitti-raw/000049" in sweeps:
        layers.append(Layer("kitti @0.05", real_scene(sweeps["kitti-raw/000049"], 0.05), "submanifold k=3", 64))
    rows = ["| scene | layer | method | chunk_rows | epsilon | tile_rows | steps | fwd ms | fwd+bwd ms |",
            "|---|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        fused = _engine.make_fused_plan(layer.kmap)
        f = timeit(lambda: layer.ours(False, fused), repeats)
        b = timeit(lambda: layer.ours(True, fused), repeats)
        rows.append(f"| {layer.name} | {layer.kind} | fused | - | - | - | - | {f * 1e3:.1f} | {b * 1e3:.1f} |")
        print(rows[-1], flush=True)
        for chunk in (4096, 8192, 16384):
            for eps in (0.0, 0.25):
                for tile in (0, 8192):
                    plan = grouped.make_plan(layer.kmap, chunk, eps, tile)
                    f = timeit(lambda: layer.ours(False, plan), repeats)
                    b = timeit(lambda: layer.ours(True, plan), repeats)
                    rows.append(f"| {layer.name} | {layer.kind} | grouped | {chunk} | {eps} | {tile} | {len(plan.steps)} | "
                                f"{f * 1e3:.1f} | {b * 1e3:.1f} |")
                    print(rows[-1], flush=True)
    return rows


def parts(repeats: int) -> list[str]:
    """What one layer costs piece by piece: building its kernel map, building
    the engine's plans for it, and the fused kernels alone (no autograd, no
    allocation: outputs preallocated), at C=64."""
    layers = [Layer("street 100k", street_scene(100_000), kind, 64)
              for kind in ("submanifold k=3", "strided k=2 s=2")]
    sweeps = real_sweeps()
    if "kitti-raw/000049" in sweeps:
        layers.append(Layer("kitti @0.05", real_scene(sweeps["kitti-raw/000049"], 0.05), "submanifold k=3", 64))
    nt = torch.get_num_threads()
    rows = ["| scene | layer | pairs | kmap build ms | fused plan ms | grouped plan ms | forward kernel ms | "
            "input-gradient kernel ms | weight-gradient kernel ms |", "|---|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        x, kmap = layer.input, layer.kmap
        k, t, _ = layer.args
        t_map = timeit(lambda: ps.kmap.build(x.coords, k, t, tensor_stride=x.stride), repeats)
        t_fused = timeit(lambda: _engine.make_fused_plan(kmap), repeats)
        t_grouped = timeit(lambda: grouped.make_plan(kmap), repeats)
        core = _engine.make_fused_plan(kmap).core
        f, w = x.feats.numpy(), layer.weight.detach().numpy()
        g = torch.randn(kmap.num_out, layer.channels).numpy()
        out, gf, gw = np.empty_like(g), np.empty_like(f), np.empty_like(w)
        t_fwd = timeit(lambda: core.forward(f, w, None, out, nt), repeats)
        t_bin = timeit(lambda: core.backward_input(g, w, gf, nt), repeats)
        t_bw = timeit(lambda: core.backward_weight(f, g, gw, nt), repeats)
        rows.append(f"| {layer.name} | {layer.kind} | {kmap.num_pairs} | {t_map * 1e3:.1f} | {t_fused * 1e3:.1f} | "
                    f"{t_grouped * 1e3:.1f} | {t_fwd * 1e3:.1f} | {t_bin * 1e3:.1f} | {t_bw * 1e3:.1f} |")
        print(rows[-1], flush=True)
    return rows



# Tolerances against the first build, max |diff| / max |first build's|: the
# generic build and torch.mm sum in another order; bf16 rounds the inputs.
BUILD_TOLERANCE = {"generic": 1e-5, "torch.mm": 1e-5, "bf16": 2e-2}


def check_builds(case: str, fns: dict, buf: np.ndarray, isas) -> None:
    """Runs each of ``fns`` (a build's name, "torch.mm" or "bf16" -> a call
    writing ``buf``) once and holds the FMA builds of ``isas`` (all but
    generic) equal bit for bit, the others within BUILD_TOLERANCE of the
    first build's output; a RuntimeError naming ``case`` otherwise."""
    outs = {}
    for name, fn in fns.items():
        fn()
        outs[name] = buf.copy()
    fma = [i for i in isas if i != "generic"]
    for isa in fma[1:]:
        if not np.array_equal(outs[isa], outs[fma[0]]):
            raise RuntimeError(f"{case}: the {isa} build differs from the {fma[0]} build (the FMA builds must give "
                               "bit-identical results); nothing timed")
    ref = outs[isas[0]]
    scale = max(float(np.abs(ref).max()), 1e-30)
    for name, tol in BUILD_TOLERANCE.items():
        if name in outs and name != isas[0]:
            enforce_error(f"{case}, {name} against {isas[0]}", float(np.abs(outs[name] - ref).max()) / scale, tol,
                          f"max |diff| / max |{isas[0]}|")


def isa_builds(repeats: int, widths=None) -> list[str]:
    """Each kernel build this CPU runs (``_core.runnable_isas()``), forced
    through the plan's ``isa`` argument: a k=1 conv (a plain GEMM through the
    fused kernel) against ``torch.mm`` on the same shapes, and submanifold
    k=3 forward / input gradient / weight gradient on the KITTI sweep
    (``widths``: the k=3 widths instead of 64 and 128, the k=1 rows left out)."""
    sweeps = real_sweeps()
    if "kitti-raw/000049" not in sweeps:
        return [f"(the KITTI sweep {kitti_searched()} is not here)"]
    coords = real_scene(sweeps["kitti-raw/000049"], 0.05)
    nt, isas = torch.get_num_threads(), ps._ext.core.runnable_isas()
    bf16 = bool(ps._ext.core.conv_bf16())
    rows = ["| layer | C | " + " | ".join(f"{i} ms" for i in isas) + " | torch.mm ms | best build / torch.mm |"
            + (" bf16 forward ms |" if bf16 else ""), "|---|---|" + "---|" * (len(isas) + 2 + bf16)]
    shapes = ((1, 64), (1, 128), (1, 256), (3, 64), (3, 128)) if not widths else tuple((3, c) for c in widths)
    for k, channels in shapes:
        layer = Layer("kitti @0.05", coords, "submanifold k=3", channels)
        kmap = ps.kmap.get_kmap(layer.input, k)
        core = _engine.make_fused_plan(kmap).core
        f = layer.input.feats.detach().numpy()
        w = (torch.randn(k**3, channels, channels) / channels**0.5).numpy()
        g = torch.randn(kmap.num_out, channels).numpy()
        out, gf, gw = np.empty_like(g), np.empty_like(f), np.empty_like(w)
        parts = [("forward", out, lambda isa: core.forward(f, w, None, out, nt, isa))]
        if k == 3:
            parts += [("input grad", gf, lambda isa: core.backward_input(g, w, gf, nt, isa)),
                      ("weight grad", gw, lambda isa: core.backward_weight(f, g, gw, nt, isa))]
        for part, buf, run in parts:
            fns = {isa: (lambda isa=isa, run=run: run(isa)) for isa in isas}
            if k == 1:
                a, b, o = torch.from_numpy(f), torch.from_numpy(w[0]), torch.from_numpy(out)
                fns["torch.mm"] = lambda a=a, b=b, o=o: torch.mm(a, b, out=o)
            if bf16 and part == "forward":
                fb, wb = (torch.from_numpy(a).bfloat16().view(torch.int16).numpy() for a in (f, w))
                fns["bf16"] = lambda fb=fb, wb=wb: core.forward_bf16(fb, wb, None, out, nt)
            check_builds(f"k={k} {part}, C={channels}", fns, buf, isas)
            t = interleaved(fns, repeats)
            mm = f"{t['torch.mm'] * 1e3:.1f} | {t['torch.mm'] / t[isas[0]]:.2f}" if k == 1 else "- | -"
            rows.append(f"| k={k} {part} ({kmap.num_pairs} pairs) | {channels} | "
                        + " | ".join(f"{t[i] * 1e3:.1f}" for i in isas) + f" | {mm} |"
                        + (f" {t['bf16'] * 1e3:.1f} |" if "bf16" in t else (" - |" if bf16 else "")))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="street 100k and the KITTI sweep at C=64 only")
    parser.add_argument("--tune", action="store_true", help="also sweep bench/_grouped.py's chunk/epsilon/tile settings")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--parts", action="store_true",
                      help="only the costs piece by piece (map, plans, kernels alone) at C=64")
    only.add_argument("--isa", action="store_true",
                      help="only each kernel build (avx512 / avx2 / generic): k=1 GEMM vs torch.mm, k=3 on KITTI")
    parser.add_argument("--widths", type=positive_int, nargs="+", default=None,
                        help="with --isa: these k=3 widths only (e.g. 8 16 24 32 40: the column tails)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=None)
    parser.add_argument("--out", "--output", dest="out", type=page_arg, default=None,
                        help="the page (default bench/results/conv.md; --quick: a temporary folder); --output: "
                             "the same (its older name)")
    args = parser.parse_args()
    if args.widths and not args.isa:
        parser.error("--widths: the k=3 widths of --isa's page; without --isa nothing reads them")
    args.out = str(page_path(args.out, "conv.md", args.quick))
    torch.set_num_threads(args.threads)
    repeats = args.repeats or 3
    env = environment()
    sg = sgemm_rate(repeats)
    env["sgemm 2048 GF/s"] = f"{sg:.0f}"
    env["spconv"] = "not installed (skipped)" if spconv is None else "installed"
    print(env, flush=True)
    if args.isa:
        tables = ["## Kernel builds (KITTI sweep @0.05 m)\n\n" + "\n".join(isa_builds(repeats, args.widths))]
    elif args.parts:
        tables = ["## Piece by piece (C=64)\n\n" + "\n".join(parts(repeats))]
    else:
        tables = ["## Layers\n\n" + "\n".join(bench(args.quick, repeats))]
    if args.tune:
        tables.append("## Engine settings (street 100k, C=64)\n\n" + "\n".join(tune(repeats)))
    notes = (f"Big square sgemm in this run: {sg:.0f} GFLOP/s. `mm GF/s`: (P/K*4 x C) @ (C x C) in this run, "
             "P the layer's pairs. GF/s are effective: 2 * pairs * C_in * C_out per forward, three times that "
             "for forward+backward. Ours = the default engine method (fused C++ gather-GEMM-scatter); grouped = "
             "torch gather + mm/bmm + index_add_ scatter (bench/_grouped.py, same run). "
             "Naive = index_select + mm + index_add per offset with torch autograd. "
             "Times: medians of the repeats, the methods of each layer interleaved round by round after an "
             "untimed call of each. Ratios within one run are the comparison; absolute times depend on the "
             "machine and its load.")
    if args.isa:
        notes = ("Each build forced through ConvPlan's `isa` argument on the same plan, calls interleaved round by "
                 "round, medians; k=1 is a plain GEMM through the fused kernel (the identity offset), compared "
                 "with torch.mm on the same (voxels x C) @ (C x C). Checked before timing: the FMA builds give "
                 "bit-identical results (avx2 = avx512); generic and torch.mm within 1e-5, bf16 within 2e-2 of the "
                 "largest output of the first build. bf16: ConvPlan.forward_bf16 (AVX512-BF16) on the "
                 "same feats and weights rounded to bfloat16, float32 out.")
    elif args.parts:
        notes = ("kmap build: `pointsparse.kmap.build` with the default method; plans: the fused kernels' "
                 "`ConvPlan` and bench/_grouped.py's steps, both built once per map; kernels: the fused C++ "
                 "calls alone on preallocated outputs (no autograd, no allocation), medians over the repeats.")
    cmd = "flock /tmp/ps-heavy.lock .venv/bin/python bench/conv.py " + shlex.join(sys.argv[1:])
    write_markdown(__import__("pathlib").Path(args.out), "Sparse convolution (bench/conv.py)", cmd.strip(), env,
                   tables, notes)


if __name__ == "__main__":
    main()
