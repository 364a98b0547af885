"""Structured pruning through the dependency graph: MinkUNet (cr=1.0) with
every coupled channel group cut to a keep ratio, against the unpruned model
in the same run (interleaved repeats, medians): parameters, FLOPs (from the
kernel maps), forward time, speed-up and speed-up / FLOP reduction; at keep
0.35 also the kept counts rounded to 1, 8 and 16 channels.

Run on a quiet machine: ``python bench/prune_speed.py --repeats 5`` (tables in
bench/results/prune_speed.md, the plot in bench/results/prune_speed.png).
``--quick``: a 5k generated street, keep 0.5 only, one repeat, no KITTI, the
page and plot in a temporary folder."""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _common import environment, real_scene, real_sweeps, results_path, street_scene, write_markdown
from pointsparse import SparseTensor
from pointsparse.models import MinkUNet
from pointsparse.prune import graph as G
from pointsparse.prune.report import sparsity_report


def _input(coords: torch.Tensor) -> SparseTensor:
    g = torch.Generator().manual_seed(0)
    return SparseTensor(torch.randn(len(coords), 4, generator=g), coords)


def _variants(x, keeps):
    torch.manual_seed(0)
    dense = MinkUNet(4, 19, cr=1.0).eval()
    out = {"dense": dense}
    for keep, multiple in keeps:
        net = copy.deepcopy(dense)
        graph = G.DependencyGraph(net, x)
        graph.cut(G.plan(graph, keep, multiple=multiple), retrace=False)
        out[f"keep {keep} (x{multiple})"] = net
    return out


def _flops(net, x) -> float:
    return float(sparsity_report(net, x)["total"]["dense_flops"])


def _time_interleaved(models: dict, x, repeats: int, backward: bool = False) -> dict[str, float]:
    times = {k: [] for k in models}

    def run(net):
        if backward:
            net.train()
            net(x).feats.square().mean().backward()
            net.eval()
        else:
            with torch.no_grad():
                net(x)

    for net in models.values():  # warm-up: kernel maps of this input built once, engine plans cached
        run(net)
    for _ in range(repeats):
        for k, net in models.items():
            t0 = time.perf_counter()
            run(net)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def scene_table(name: str, coords: torch.Tensor, repeats: int, backward: bool, keeps) -> tuple[str, list]:
    """The markdown table of one scene and its (model, FLOP reduction, speed-up) points."""
    x = _input(coords)
    models = _variants(x, keeps)
    fwd = _time_interleaved(models, x, repeats)
    bwd = _time_interleaved({k: models[k] for k in ("dense", "keep 0.5 (x8)")}, x, 2, True) if backward else {}
    base_flops, base_params = _flops(models["dense"], x), sum(p.numel() for p in models["dense"].parameters())
    rows = [f"### {name}: {len(coords)} voxels, {repeats} interleaved repeats (median)", "",
            "| model | params | FLOPs | FLOP reduction | forward ms | speed-up | speed-up / FLOP reduction |"
            + (" fwd+bwd ms | fwd+bwd speed-up |" if backward else ""),
            "|---|---|---|---|---|---|---|" + ("---|---|" if backward else "")]
    points = []
    for k, net in models.items():
        flops = _flops(net, x)
        reduction, speed = base_flops / flops, fwd["dense"] / fwd[k]
        points.append((k, reduction, speed))
        row = (f"| {k} | {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M "
               f"({sum(p.numel() for p in net.parameters()) / base_params:.2f}) | {flops / 1e9:.1f} G | "
               f"{reduction:.2f}x | {fwd[k] * 1e3:.0f} | {speed:.2f}x | {speed / reduction:.2f} |")
        if backward:
            row += (f" {bwd[k] * 1e3:.0f} | {bwd['dense'] / bwd[k]:.2f}x |" if k in bwd else " | |")
        rows.append(row)
        print(row, flush=True)
    return "\n".join(rows), points


def plot(series: dict, path) -> None:
    """Speed-up against FLOP reduction per scene, with the ideal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    top = max(r for pts in series.values() for _, r, _ in pts)
    ax.plot([1, top], [1, top], "k--", lw=0.8, label="ideal (speed-up = FLOP reduction)")
    for name, pts in series.items():
        ax.plot([r for _, r, _ in pts], [s for _, _, s in pts], "o", label=name)
    ax.set_xlabel("FLOP reduction (x)")
    ax.set_ylabel("forward speed-up (x)")
    ax.set_title("MinkUNet cr=1.0, every coupled group cut")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick 1)")
    parser.add_argument("--voxels", type=int, default=None, help="generated scene size (default 30000, --quick 5000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 5k voxels, keep 0.5, 1 repeat, no KITTI")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.voxels = args.voxels or (5_000 if args.quick else 30_000)
    torch.set_num_threads(args.threads)
    rounding = [(0.5, 8)] if args.quick else [(0.75, 8), (0.5, 8), (0.35, 1), (0.35, 8), (0.35, 16)]
    table, points = scene_table("generated street scene (0.05 m)", street_scene(args.voxels), args.repeats, True,
                                rounding)
    tables, series = [table], {"generated street": points}
    sweeps = {} if args.quick else real_sweeps()
    if "kitti-raw/000049" in sweeps:
        table, points = scene_table("KITTI raw 000049 (0.05 m)", real_scene(sweeps["kitti-raw/000049"], 0.05),
                                    args.repeats, False, [(0.75, 8), (0.5, 8), (0.35, 8)])
        tables.append(table)
        series["KITTI 000049"] = points
    else:
        tables.append("KITTI raw 000049: " + ("not run with --quick" if args.quick else
                                              "not present (../shared/datasets/kitti-raw/000049.bin), skipped"))
    plot(series, results_path("prune_speed.png", args.quick))
    notes = ("Every coupled channel group of the dependency graph is cut to the keep ratio (channels of lowest "
             "summed magnitude over the group), rounded to the multiple in brackets. Times are medians of "
             "interleaved repeats; ratios are within this run. Plot: prune_speed.png.")
    output = results_path("prune_speed.md", args.quick)
    write_markdown(output, "Pruning through the dependency graph: MinkUNet cr=1.0",
                   f"python bench/prune_speed.py --repeats {args.repeats}" + (" --quick" if args.quick else ""),
                   environment(), tables, notes)
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
