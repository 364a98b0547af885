"""Speed-up of executed weight sparsity on a real sweep: a submanifold
``Conv3d(C, C, 3)`` over KITTI (000049, 0.05 m voxels) pruned by kernel
offsets (``kernel_structured(scope="offset")``), by engine vectors
(``panel_structured``; ``square=True``: width x width blocks, which the
input gradient skips too; ``twin``: vectors of two panels, ``panels=2``;
``square2``: both; ``lines``: blocks of one panel's width of input
channels, a 64-byte line of a float32 input row, by two panels), unstructured (``l1_unstructured``) and 2:4
(``nm_structured``), forward and forward+backward, against the unpruned
conv timed in the same rounds (interleaved, medians), with a plot of the
speed-ups against the fraction pruned and the ideal lines (the page's name
with ``.png``). Every pruned conv's output is first checked against torch
ops on the masked weight. For vector
sparsity the same pruned weights are also timed through the dense kernels
(offsets skipped only), which is what sets ``_engine.VECTOR_DENSITY``. A
table times a decoder step with half the voxels dropped by
``nn.VoxelPrune`` or skipped by ``nn.VoxelSkip`` (see :func:`spatial`); ``--parts formats`` times 2:4 and
block weights through the engine and through their formats' products (see
:func:`formats_table`); ``--parts per_offset`` times each kernel offset
alone against the unpruned conv, per pair (see :func:`per_offset`).

    flock /work/cpu.lock .venv/bin/python bench/prune_exec.py [--channels 64] [--rounds 5] [--threads 1]
        [--parts sparsity spatial formats per_offset] [--modes fwd core] [--reuse-memory] [--quick]

``--modes``: the sparsity table's columns timed (``fwd``, ``fwd+bwd``,
``core``: the kernels alone; default all three, interleaved in every
round). ``--modes fwd core`` times forwards after forwards only, as
inference runs them: with ``fwd+bwd`` in the rounds, each forward follows
a backward that has filled the caches with other data.

``--reuse-memory``: ``pointsparse.reuse_freed_memory(True)`` first, as a
user may set it: every conv's fresh output then reuses freed pages instead
of faulting new ones in (the module rows; the kernels-alone rows write one
output allocated once either way).

``--quick``: every part at C = 32 on a 20k generated street (no dataset
needed), one round, the page in a temporary folder.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
import shlex
import sys
import time

import numpy as np
import torch

from _common import (environment, interleaved, kitti_searched, page_arg, page_path, positive_int, real_scene,
                     real_sweeps, street_scene, write_markdown)

import pointsparse as ps
from pointsparse import prune
from pointsparse.nn import _engine
from pointsparse.nn import functional as F
from pointsparse.nn.reference import conv_sum

#: Fractions of the weights pruned, per granularity (2:4 prunes half).
AMOUNTS = {"offset": (0.25, 0.5, 0.75), "vector": (0.25, 0.5, 0.75, 0.9), "twin": (0.25, 0.5, 0.75, 0.9),
           "lines": (0.5, 0.75),
           "square": (0.5, 0.75), "square2": (0.5, 0.75), "unstructured": (0.5, 0.75, 0.9), "2:4": (0.5,)}


def _prune(conv, kind: str, amount: float) -> None:
    if kind == "offset":
        prune.kernel_structured(conv, "weight", amount, scope="offset")
    elif kind == "unstructured":
        prune.l1_unstructured(conv, "weight", amount)
    elif kind == "2:4":
        prune.nm_structured(conv, "weight", 2, 4)
    elif kind == "twin":  # vectors of two panels: the AVX-512 dense tile's width (nn.functional.tile_panels)
        prune.panel_structured(conv, "weight", amount, panels=2)
    elif kind == "lines":  # width input channels x 2 panels: a float32 row's kept channels share 64-byte lines
        prune.panel_structured(conv, "weight", amount, rows=F.panel_width(conv.weight.dtype), panels=2)
    elif kind == "square2":  # 2 width square blocks: twins in the input gradient too
        prune.panel_structured(conv, "weight", amount, square=True, panels=2)
    else:
        prune.panel_structured(conv, "weight", amount, square=kind == "square")


def variants(channels: int, kinds=None) -> list[tuple[str, str, float, ps.nn.Conv3d]]:
    """(name, kind, amount, conv): the unpruned conv first, then every
    granularity of ``kinds`` (default all of AMOUNTS)."""
    torch.manual_seed(0)
    base = ps.nn.Conv3d(channels, channels, 3)
    out = [("unpruned", "dense", 0.0, base)]
    for kind, amounts in AMOUNTS.items():
        if kinds is not None and kind not in kinds:
            continue
        for amount in amounts:
            conv = ps.nn.Conv3d(channels, channels, 3)
            conv.load_state_dict(base.state_dict())
            _prune(conv, kind, amount)
            out.append((f"{kind} {amount:.0%}", kind, amount, conv))
    return out


def check(conv, x, kmap) -> None:
    with torch.no_grad():
        got = conv(x).feats
        ref = conv_sum(x.feats, conv.weight.detach(), kmap)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class _Density:
    """``_engine.VECTOR_DENSITY`` set to ``vector_density`` inside the block
    (< 0: the dense kernels, twin panels too: ``VECTOR_DENSITY_TWIN`` None)."""

    def __init__(self, vector_density: float) -> None:
        self.value = vector_density

    def __enter__(self) -> None:
        self.old = _engine.VECTOR_DENSITY, _engine.VECTOR_DENSITY_TWIN
        _engine.VECTOR_DENSITY = self.value
        if self.value < 0:
            _engine.VECTOR_DENSITY_TWIN = None

    def __exit__(self, *exc) -> None:
        _engine.VECTOR_DENSITY, _engine.VECTOR_DENSITY_TWIN = self.old


def core_forward(conv, x, kmap, vector_density: float):
    """The fused kernels alone (plan built, choice made, output allocated
    once): what the engine's forward costs without the per-call Python."""
    weight = conv.weight.detach().contiguous()
    with _Density(vector_density):
        run = _engine.choose_execution(weight)
    plan = _engine.get_plan(kmap)
    out = x.feats.new_empty((kmap.num_out, weight.shape[2]))
    args = (x.feats.numpy(), weight.numpy(), None, out.numpy(), torch.get_num_threads())
    return lambda: plan.core.forward(*args, active=run.active, vector=run.vector)


def once(conv, x, mode: str, vector_density: float) -> float:
    if callable(mode):
        t0 = time.perf_counter()
        mode()
        return time.perf_counter() - t0
    backward = mode == "fwd+bwd"
    with _Density(vector_density):
        t0 = time.perf_counter()
        if backward:
            feats = x.feats.detach().requires_grad_()
            conv(x.with_feats(feats)).feats.sum().backward()
        else:
            with torch.no_grad():
                conv(x)
        return time.perf_counter() - t0


MODES = ("fwd", "fwd+bwd", "core")


def measure(channels: int, coords: torch.Tensor, rounds: int, points: list | None = None, kinds=None,
            modes=MODES) -> str:
    """The sparsity table at ``channels``; ``points`` (when given) collects
    (channels, kind, amount, ideal, forward speed-up, fwd+bwd speed-up) per
    pruned conv for :func:`plot` (where both directions are timed).
    ``modes``: which columns are timed (the rounds interleave only those:
    without ``fwd+bwd`` the forwards run after forwards, as in inference,
    not after a backward that has left other data in the caches); the
    unpruned conv's forward is always timed."""
    modes = tuple(m for m in MODES if m in modes or m == "fwd")
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    sizes = kmap.sizes.to(torch.int64)
    runs = []  # (name, label, conv, mode or kernel call, vector_density, mode)
    amounts = {}
    for name, kind, amount, conv in variants(channels, kinds):
        amounts[name] = amount
        check(conv, x, kmap)
        for mode in modes:
            labels = [(kind, _engine.VECTOR_DENSITY)] + ([("vector/dense kernels", -1.0)] if kind in ("vector", "twin", "lines") else [])
            for label, vd in labels:
                runs.append((name, label, conv, core_forward(conv, x, kmap, vd) if mode == "core" else mode, vd, mode))
    # The fixed cost no pruned offset removes: the kernels with every offset
    # but the smallest zeroed (each output row still written, as bias) and
    # writing the output alone.
    smallest = int(torch.argmin(sizes))
    floor = ps.nn.Conv3d(channels, channels, 3)
    with torch.no_grad():
        floor.weight.copy_(next(r[2] for r in runs if r[0] == "unpruned").weight)
        floor.weight[torch.arange(floor.weight.shape[0]) != smallest] = 0
    written = x.feats.new_empty((kmap.num_out, channels))
    # The machine's practical multiply-add rate at this thread count: torch's
    # sgemm on a 2048^3 product, the ceiling for any kernel's pairs.
    sq = torch.randn(2048, 2048)
    sq_out = torch.empty_like(sq)
    extra = {"floor": core_forward(floor, x, kmap, _engine.VECTOR_DENSITY), "fill": lambda: written.fill_(0.5),
             "sgemm": lambda: torch.mm(sq, sq, out=sq_out)}
    base_core = core_forward(next(r[2] for r in runs if r[0] == "unpruned"), x, kmap, _engine.VECTOR_DENSITY)
    # The warm-up builds the maps and plans.
    med = interleaved({i: (lambda r=r: once(r[2], x, r[3], r[4])) for i, r in enumerate(runs)}, rounds)
    med.update(interleaved({**extra, "dense": base_core}, rounds))
    base = {r[5]: med[i] for i, r in enumerate(runs) if r[0] == "unpruned"}
    lines = [f"### C = {channels} ({len(coords):,} voxels, {int(sizes.sum()):,} pairs)", "",
             "| pruning | run as | engine path | ideal (pairs or FLOPs) | forward ms | fwd speed-up | "
             "fwd+bwd ms | fwd+bwd speed-up | kernels alone: fwd speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    rows = {}
    for i, (name, kind, conv, mode, vd, label) in enumerate(runs):
        rows.setdefault((name, kind), {})[label] = med[i]

    def cells(t: dict, mode: str, with_ms: bool) -> str:
        if mode not in t:
            return "- | -" if with_ms else "-"
        ratio = f"{base[mode] / t[mode]:.2f}x"
        return f"{1e3 * t[mode]:.1f} | {ratio}" if with_ms else ratio

    for (name, kind), t in rows.items():
        conv = next(r[2] for r in runs if r[0] == name)
        w = conv.weight.detach()
        if points is not None and kind != "dense" and kind != "vector/dense kernels" and "fwd+bwd" in t:
            points.append((channels, kind, amounts[name], ideal(w, sizes),
                           base["fwd"] / t["fwd"], base["fwd+bwd"] / t["fwd+bwd"]))
        lines.append(f"| {name} | {kind} | {path_of(w, kind)} | {ideal(w, sizes):.2f}x | {cells(t, 'fwd', True)} | "
                     f"{cells(t, 'fwd+bwd', True)} | {cells(t, 'core', False)} |")
    core = med["dense"]
    lines += ["", f"Fixed cost (kernels alone, timed in rounds of their own beside the dense kernels): only the "
              f"smallest offset kept ({int(sizes[smallest]):,} pairs, the rest zero) {1e3 * med['floor']:.2f} ms; writing the {kmap.num_out:,} x {channels} output alone "
              f"{1e3 * med['fill']:.2f} ms; dense {1e3 * core:.2f} ms. With every output row written whatever "
              f"is pruned, offset pruning that leaves a fraction f of the pairs reaches at most about dense / "
              f"(fixed + f x dense) = {1e3 * core:.1f} / ({1e3 * med['floor']:.2f} + f x {1e3 * core:.1f}): "
              + ", ".join(f"{core / (med['floor'] + f * core):.1f}x of {1 / f:.1f}x for f = {f}"
                          for f in (0.5, 0.25, 0.12)) + "."]
    if any(kind == "offset" for _, kind in rows):  # (the line is about offset-pruned convs alone)
        lines += ["", ceiling_line(rows, runs, sizes, channels, med)]
    return "\n".join(lines)


def ceiling_line(rows: dict, runs: list, sizes: torch.Tensor, channels: int, med: dict) -> str:
    """What no kernel could beat on this machine for each offset-pruned conv:
    the output written once (the fill timed above) plus the executed pairs'
    multiply-adds at the rate torch's sgemm reaches on a 2048^3 product in
    the same rounds; the best speed-up against the dense kernels' time, and
    as a fraction of the ideal (total pairs / executed pairs)."""
    rate = 2048 ** 3 / med["sgemm"]
    parts = []
    for (name, kind) in rows:
        if kind != "offset":
            continue
        w = next(r[2] for r in runs if r[0] == name).weight.detach()
        active = _engine.choose_execution(w).active  # the offsets the engine runs (None: all)
        executed = int(sizes.sum() if active is None else sizes[torch.from_numpy(active).bool()].sum())
        bound = med["fill"] + executed * channels * channels / rate
        parts.append(f"{name}: {executed:,} pairs executed, at least {1e3 * bound:.2f} ms, so at most "
                     f"{med['dense'] / bound:.2f}x of the {ideal(w, sizes):.2f}x ideal "
                     f"(**{med['dense'] / bound / ideal(w, sizes):.2f}** of it)")
    return (f"Machine ceiling for offset pruning: torch's sgemm (2048^3) ran {rate / 1e9:.1f} G multiply-adds a "
            f"second in these rounds ({1e3 * med['sgemm']:.1f} ms), the dense kernels "
            f"{int(sizes.sum()) * channels * channels / med['dense'] / 1e9:.1f} G. A kernel that wrote the output "
            f"once and ran the kept pairs at the sgemm rate would take the output's fill plus those products: "
            + "; ".join(parts) + ".")


def per_offset(channels: int, coords: torch.Tensor, rounds: int) -> str:
    """What a pair costs in each offset run alone (the fused kernels with
    every other offset zero, the output still written as bias), against a
    pair of the unpruned conv: the ms over the call with no offset at all
    (the bias written to every row), per pair. Offset pruning reaches its
    ideal only where the kept offsets' pairs cost what the dense conv's do."""
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    sizes = kmap.sizes.to(torch.int64)
    plan = _engine.get_plan(kmap)
    out = x.feats.new_empty((kmap.num_out, channels))
    weight = torch.randn(kmap.kernel_volume, channels, channels)
    feats, w, res, nt = x.feats.numpy(), weight.numpy(), out.numpy(), torch.get_num_threads()

    def alone(k):
        active = np.zeros(kmap.kernel_volume, np.uint8)
        if k is not None:
            active[k] = 1
        return lambda: plan.core.forward(feats, w, None, res, nt, active=active)

    fns = {k: alone(k) for k in range(kmap.kernel_volume)}
    fns["none"] = alone(None)
    fns["dense"] = lambda: plan.core.forward(feats, w, None, res, nt)
    med = interleaved(fns, rounds)
    total, block = int(sizes.sum()), ps._core.CONV_BLOCK_ROWS
    lines = [f"### Each offset alone, C = {channels} ({len(coords):,} voxels, {total:,} pairs)", "",
             f"Kernels alone, {torch.get_num_threads()} thread(s), medians of {rounds} interleaved rounds. No offset "
             f"(every row written as the bias): {1e3 * med['none']:.2f} ms. The unpruned conv: "
             f"{1e3 * med['dense']:.2f} ms, {1e9 * (med['dense'] - med['none']) / total:.1f} ns a pair over that.", "",
             f"| offset | pairs | pairs per run (block of {block} rows) | ms over no offset | ns a pair |",
             "|---|---|---|---|---|"]
    for k in range(kmap.kernel_volume):
        _, rows = kmap.pairs(k)
        runs = int(torch.unique(rows.to(torch.int64) // block).numel())  # the kernels' blocks of written rows
        extra = med[k] - med["none"]
        lines.append(f"| {k}{' (identity)' if k == plan.identity else ''} | {int(sizes[k]):,} | "
                     f"{int(sizes[k]) / max(runs, 1):.1f} | {1e3 * extra:.3f} | {1e9 * extra / max(int(sizes[k]), 1):.1f} |")
    return "\n".join(lines)


def spatial(channels: int, coords: torch.Tensor, rounds: int, keep: float = 0.5) -> str:
    """A U-Net decoder step on the sweep: the stride-2 tensor (from a k2 s2
    conv, not timed) through a residual block (two submanifold k3 convs, the
    identity shortcut, ReLU) and a k2 s2 transposed conv back to the full
    stride-1 coords: as is, with ``VoxelPrune(keep)`` first (the block and
    the transposed conv see the kept voxels only), and with ``VoxelSkip``
    around the block's convs (they run on the kept voxels, every voxel goes
    on). Every run starts from a fresh coordinate cache (``select_voxels``
    of all or of the kept rows), so each builds its maps every call."""
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    down = ps.nn.Conv3d(channels, channels, 2, 2)
    main = torch.nn.Sequential(ps.nn.Conv3d(channels, channels, 3), ps.nn.ReLU(), ps.nn.Conv3d(channels, channels, 3))
    up = ps.nn.Conv3d(channels, channels, 2, 2, transposed=True)
    with torch.no_grad():
        coarse = down(x)
    everything = torch.arange(len(coarse))
    pruner, skip, relu = ps.nn.VoxelPrune(keep), ps.nn.VoxelSkip(main, keep), ps.nn.ReLU()

    def run(how: str):
        with torch.no_grad():
            start = pruner(coarse) if how == "prune" else F.select_voxels(coarse, everything)
            # VoxelSkip adds its kept rows into the shortcut, as ResidualBlock takes it
            summed = skip.add_to(start, start) if how == "skip" else ps.nn.add(main(start), start)
            out = up(relu(summed))
        assert torch.equal(out.coords, x.coords)

    sizes = {"all": len(coarse), "kept": math.ceil(round(keep * len(coarse), 9))}  # one scan: keep_per_batch's count
    t = interleaved({how: (lambda how=how: run(how)) for how in ("all", "prune", "skip")}, rounds)
    return (f"### Spatial pruning, C = {channels}: decoder step from stride 2 ({sizes['all']:,} voxels) back to "
            f"stride 1 ({len(coords):,})\n\n| voxels convolved | time ms | speed-up |\n|---|---|---|\n"
            f"| all {sizes['all']:,} | {1e3 * t['all']:.1f} | 1.00x |\n"
            f"| VoxelPrune({keep}): {sizes['kept']:,} (the rest dropped) | {1e3 * t['prune']:.1f} | "
            f"{t['all'] / t['prune']:.2f}x |\n"
            f"| VoxelSkip({keep}): {sizes['kept']:,} (the rest through the shortcut) | {1e3 * t['skip']:.1f} | "
            f"{t['all'] / t['skip']:.2f}x |")


def formats_table(channels: int, coords: torch.Tensor, rounds: int) -> str:
    """N:M and block sparsity inside the conv (issue 13 item 3): 2:4 weights
    (``nm_structured``) and 16 x 16 blocks at 75% (``panel_structured(...,
    square=True)``, the engine's vector granularity) run through the engine
    (what ``choose_execution`` picks for them) and through their formats'
    own products (``formats.compress(..., "nm")``, BSR with 16 x 16 blocks,
    ``execution="format"``), forward without gradients, against the unpruned
    conv in the same interleaved rounds."""
    from pointsparse import formats

    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    base = ps.nn.Conv3d(channels, channels, 3)
    nm = ps.nn.Conv3d(channels, channels, 3)
    nm.load_state_dict(base.state_dict())
    prune.nm_structured(nm, "weight", 2, 4)
    block = ps.nn.Conv3d(channels, channels, 3)
    block.load_state_dict(base.state_dict())
    prune.panel_structured(block, "weight", 0.75, square=True)
    width = _engine.panel_width(torch.float32)
    runs = {"unpruned (engine)": base, "2:4 (engine)": nm, "2:4 (formats.NM product)": formats.compress(nm, "nm"),
            f"{width}x{width} blocks 75% (engine)": block,
            f"{width}x{width} blocks 75% (formats.BSR product)": formats.compress(block, "bsr",
                                                                                 blocksize=(width, width))}
    for name, module in runs.items():
        if "product" in name:
            module.execution = "format"
        with torch.no_grad():
            ref = conv_sum(x.feats, _effective_weight(module), ps.kmap.get_kmap(x, 3))
            torch.testing.assert_close(module(x).feats, ref, rtol=1e-4, atol=1e-4)
    med = interleaved({name: (lambda m=module: once(m, x, "fwd", _engine.VECTOR_DENSITY))
                       for name, module in runs.items()}, rounds, warmup=False)  # each ran once in the check
    base_t = med["unpruned (engine)"]
    lines = [f"### N:M and blocks inside the conv, C = {channels}", "",
             "| weights | run as | engine path | forward ms | speed-up |", "|---|---|---|---|---|"]
    for name, module in runs.items():
        path = _engine.choose_execution(_effective_weight(module)).name if "engine" in name else "format"
        lines.append(f"| {name.split(' (')[0]} | {name.split(' (')[1][:-1]} | {path} | {1e3 * med[name]:.1f} | "
                     f"{base_t / med[name]:.2f}x |")
    return "\n".join(lines)


def _effective_weight(module) -> torch.Tensor:
    """The (K, C_in, C_out) weight a conv or a compressed conv computes with."""
    if isinstance(module, ps.nn.Conv3d):
        return module.weight.detach()
    return module.engine_weight.detach()


def ideal(weight: torch.Tensor, sizes: torch.Tensor) -> float:
    """Dense FLOPs over the FLOPs the pruned weights imply at their
    granularity: total pairs / pairs of the nonzero offsets, or the columns
    of the nonzero vectors (the vector kernels' count)."""
    old = _engine.VECTOR_DENSITY
    _engine.VECTOR_DENSITY = 1.0
    try:
        implied = _engine.executed_flops(weight, sizes)
    finally:
        _engine.VECTOR_DENSITY = old
    return 2 * int(sizes.sum()) * weight.shape[1] * weight.shape[2] / implied


def path_of(weight: torch.Tensor, kind: str) -> str:
    if kind == "vector/dense kernels":
        return "offsets" if _engine.choose_execution(weight).active is not None else "dense"
    return _engine.choose_execution(weight).name


def plot(points: list, path: Path) -> None:
    """Speed-up against the fraction of weights pruned, one panel per
    channel count and direction, a line per granularity with its ideal
    dashed (dense FLOPs over the FLOPs left once its zero offsets or zero
    vectors are skipped: unstructured and 2:4 zeros leave few of either) and
    the FLOP count's 1 / (1 - pruned) dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    channels = sorted({p[0] for p in points})
    fig, axes = plt.subplots(2, len(channels), figsize=(4.4 * len(channels), 7.2), squeeze=False)
    for col, c in enumerate(channels):
        for row, (label, index) in enumerate((("forward", 4), ("forward + backward", 5))):
            ax = axes[row][col]
            for kind in AMOUNTS:
                pts = sorted((p[2], p[3], p[index]) for p in points if p[0] == c and p[1] == kind)
                if not pts:
                    continue
                xs = [0.0] + [p[0] for p in pts]
                line, = ax.plot(xs, [1.0] + [p[2] for p in pts], "o-", label=kind)
                ax.plot(xs, [1.0] + [p[1] for p in pts], "--", color=line.get_color(), alpha=0.6)
            grid = [i / 100 for i in range(0, 91)]
            ax.plot(grid, [1 / (1 - x) for x in grid], ":", color="grey", label="1 / (1 - pruned)")
            ax.set_title(f"C = {c}, {label}")
            ax.set_xlabel("fraction of weights pruned")
            ax.set_ylabel("speed-up over the unpruned conv (dashed: ideal)")
            ax.set_yscale("log", base=2)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"written {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 64 (--quick 32)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 5 (--quick 1)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--parts", nargs="+", default=None,
                        choices=["sparsity", "spatial", "formats", "per_offset"],
                        help="default sparsity spatial (--quick all four)")
    parser.add_argument("--kinds", nargs="+", default=None, choices=list(AMOUNTS),
                        help="the sparsity table's granularities (default all): fewer rows, more rounds in the time")
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/prune_exec.md")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="the sparsity table's columns timed (default all; the forward always): 'fwd core' "
                             "times forwards after forwards only, as inference runs them")
    parser.add_argument("--reuse-memory", action="store_true",
                        help="pointsparse.reuse_freed_memory(True) first: freed outputs' pages kept for the next "
                             "call (no page faults on a fresh output)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: C = 32, a 20k generated street, 1 round")
    args = parser.parse_args()
    if args.reuse_memory and not ps.reuse_freed_memory(True):
        parser.error("--reuse-memory: this C library does not take it (glibc only)")
    args.channels = args.channels or ([32] if args.quick else [64])
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.parts = args.parts or (["sparsity", "spatial", "formats", "per_offset"] if args.quick
                                else ["sparsity", "spatial"])
    sweeps = {} if args.quick else real_sweeps()
    if not args.quick and "kitti-raw/000049" not in sweeps:
        print(f"prune_exec: {kitti_searched()} is absent; nothing measured")
        return
    torch.set_num_threads(args.threads)
    scene = "generated street 20k @ 0.05 m" if args.quick else "kitti-raw/000049 @ 0.05 m"
    coords = street_scene(20_000) if args.quick else real_scene(sweeps["kitti-raw/000049"], 0.05)
    points: list = []
    parts = {"sparsity": lambda c, xyz, r: measure(c, xyz, r, points, args.kinds, args.modes), "spatial": spatial,
             "formats": formats_table, "per_offset": per_offset}
    tables = [parts[part](c, coords, args.rounds) for part in args.parts for c in args.channels]
    for t in tables:
        print(t, "\n")
    command = "python bench/prune_exec.py " + shlex.join(sys.argv[1:])
    output = page_path(args.out, "prune_exec.md", args.quick)
    write_markdown(output, f"Executed weight sparsity ({scene})", command, environment(),
                   tables, "Speed-ups are medians of interleaved rounds against the unpruned conv of the same "
                   "rounds, on the machine named above.")
    print(f"written {output}")
    if points:
        plot(points, output.with_suffix(".png"))


if __name__ == "__main__":
    main()
