"""Structured pruning through the dependency graph: MinkUNet (cr=1.0) with
every coupled channel group cut to a keep ratio, against the unpruned model
in the same run (interleaved repeats, medians): parameters, FLOPs (from the
kernel maps), forward time, speed-up and speed-up / FLOP reduction; at keep
0.35 also the kept counts rounded to 1, 8 and 16 channels; and AMC
(``pointsparse.prune.amc``, resource-constrained, every coupled group) at the
FLOPs of the keep-0.5 model, its channels cut as the search chose them. Every
cut model's output is checked against the dense model with the same channels
masked.

Run on a quiet machine: ``python bench/prune_speed.py --repeats 5`` (tables in
bench/results/prune_speed.md, the plot in bench/results/prune_speed.png;
``--out PAGE.md``: the page there, the plot beside it as PAGE.png).
``--quick``: a 5k generated street, keep 0.5 only, one repeat, no KITTI, the
page and plot in a temporary folder."""

from __future__ import annotations

import argparse
import copy
import shlex
import statistics
import time

import torch

from _common import (enforce_error, environment, kitti_searched, page_arg, page_path, positive_int, real_scene,
                     real_sweeps, street_scene, write_markdown)
from pointsparse import SparseTensor
from pointsparse.models import MinkUNet
from pointsparse.prune import graph as G
from pointsparse.prune.amc import amc_search, flops_for, layer_infos
from pointsparse.prune.report import sparsity_report


def _input(coords: torch.Tensor) -> SparseTensor:
    g = torch.Generator().manual_seed(0)
    return SparseTensor(torch.randn(len(coords), 4, generator=g), coords)


def _variants(x, keeps):
    """The dense model and one copy per (keep ratio, multiple), every coupled
    group cut; (models, the kept channels of each cut model)."""
    torch.manual_seed(0)
    dense = MinkUNet(4, 19, cr=1.0).eval()
    out, kept = {"dense": dense}, {}
    for keep, multiple in keeps:
        net = copy.deepcopy(dense)
        graph = G.DependencyGraph(net, x)
        kept[f"keep {keep} (x{multiple})"] = keep_sets = G.plan(graph, keep, multiple=multiple)
        graph.cut(keep_sets, retrace=False)
        out[f"keep {keep} (x{multiple})"] = net
    return out, kept


def fidelity(dense, x):
    """``eval_fn(model)``: ``max(0, 1 - |model(x) - dense(x)| / |dense(x)|)``
    over all logits (AMC's metric on an untrained network, which has no task
    metric; its arg-max is nearly one class everywhere, so agreement of
    classes tells the candidates apart too little)."""
    with torch.no_grad():
        target = dense(x).feats

    def eval_fn(model):
        with torch.no_grad():
            return max(0.0, 1.0 - float((model(x).feats - target).norm() / target.norm()))
    return eval_fn


def fill_budget(model, x, ratios: dict, target: float) -> dict:
    """``ratios`` scaled by the least factor in [0, 1] whose FLOPs (AMC's
    model) are within ``target`` of the dense FLOPs: the search's best
    episode may stop short of the budget; this spends the rest evenly."""
    infos = layer_infos(model, x, coupled=True)
    budget = target * flops_for(infos, {})
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if flops_for(infos, {n: r * mid for n, r in ratios.items()}) > budget:
            lo = mid
        else:
            hi = mid
    return {n: r * hi for n, r in ratios.items()}


def amc_cut(dense, x, target: float, episodes: int, warmup: int, eval_fn, multiple: int = 1, seed: int = 0):
    """AMC's resource-constrained search (reward -error, every episode within
    ``target`` of the dense FLOPs) over every coupled group of ``dense``; a
    copy cut to the best episode's ratios filled up to the budget
    (:func:`fill_budget`), kept counts rounded to ``multiple``; (cut model,
    kept channels, the search's AMCResult, the ratios cut)."""
    res = amc_search(dense, eval_fn, x, episodes=episodes, warmup=warmup, reward="error", target_flops=target,
                     coupled=True, seed=seed)
    ratios = fill_budget(dense, x, res.ratios, target)
    net = copy.deepcopy(dense)
    graph = G.DependencyGraph(net, x)
    keep = G.plan(graph, {name: 1.0 - r for name, r in ratios.items()}, multiple=multiple)
    graph.cut(keep, retrace=False)
    return net, keep, res, ratios


TOLERANCE = 1e-4  # of cut_error


def cut_error(dense, x, keep, net, name: str = "the cut model") -> float:
    """max |cut(x) - masked(x)| / max |masked(x)|: the cut model against the
    dense one with the same channels masked (they compute the same function);
    a RuntimeError naming the model ``name`` where it is above TOLERANCE."""
    masked = copy.deepcopy(dense)
    G.DependencyGraph(masked, x).mask(keep)
    with torch.no_grad():
        ref, got = masked(x).feats, net(x).feats
    return enforce_error(name, float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)), TOLERANCE,
                         "max |cut - masked| / max |masked|")


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


def _with_amc(models, kept, x, amc: dict | None) -> dict:
    """Add AMC's models at the keep-0.5 model's FLOPs (x1: as searched, x8:
    counts rounded to 8); a summary of the search."""
    if not amc:
        return {}
    dense = models["dense"]
    target = _flops(models["keep 0.5 (x8)"], x) / _flops(dense, x)
    t0 = time.perf_counter()
    eval_fn = fidelity(dense, x)
    net, keep, res, ratios = amc_cut(dense, x, target, amc["episodes"], amc["warmup"], eval_fn)
    seconds = time.perf_counter() - t0
    models["AMC (x1)"], kept["AMC (x1)"] = net, keep
    net8 = copy.deepcopy(dense)
    graph = G.DependencyGraph(net8, x)
    kept["AMC (x8)"] = G.plan(graph, {n: 1.0 - r for n, r in ratios.items()}, multiple=8)
    graph.cut(kept["AMC (x8)"], retrace=False)
    models["AMC (x8)"] = net8
    best = max(res.history, key=lambda h: h["reward"])["episode"]
    return {"target": target, "seconds": seconds, "best": res.metric, "filled": eval_fn(net), "best_episode": best,
            "uniform": eval_fn(models["keep 0.5 (x8)"]),
            "episodes": amc["episodes"], "warmup": amc["warmup"], "best_flops": res.flops / res.dense_flops,
            "kept": {n: len(k) for n, k in keep.items()}}


def _row(k, net, x, base, fwd, bwd, err) -> tuple[str, float, float]:
    flops, params = _flops(net, x), sum(p.numel() for p in net.parameters())
    reduction, speed = base[0] / flops, fwd["dense"] / fwd[k]
    row = (f"| {k} | {params / 1e6:.2f} M ({params / base[1]:.2f}) | {flops / 1e9:.1f} G | "
           f"{reduction:.2f}x | {fwd[k] * 1e3:.0f} | {speed:.2f}x | {speed / reduction:.2f} | "
           + (f"{err:.1e} |" if err is not None else "- |"))
    if bwd:
        row += f" {bwd[k] * 1e3:.0f} | {bwd['dense'] / bwd[k]:.2f}x |" if k in bwd else " | |"
    return row, reduction, speed


def scene_table(name: str, coords: torch.Tensor, repeats: int, backward: bool, keeps,
                amc: dict | None = None) -> tuple[str, list, dict]:
    """The markdown table of one scene, its (model, FLOP reduction, speed-up)
    points and the AMC search's summary (``amc``: episodes and warm-up, or
    None for no AMC rows)."""
    x = _input(coords)
    models, kept = _variants(x, keeps)
    search = _with_amc(models, kept, x, amc)
    errors = {k: cut_error(models["dense"], x, kept[k], net, k) for k, net in models.items() if k in kept}
    fwd = _time_interleaved(models, x, repeats)
    timed = [k for k in ("dense", "keep 0.5 (x8)", "AMC (x1)", "AMC (x8)") if k in models]
    bwd = _time_interleaved({k: models[k] for k in timed}, x, repeats, True) if backward else {}
    base = (_flops(models["dense"], x), sum(p.numel() for p in models["dense"].parameters()))
    rows = [f"### {name}: {len(coords)} voxels, {repeats} interleaved repeats (median)", "",
            "| model | params | FLOPs | FLOP reduction | forward ms | speed-up | speed-up / FLOP reduction "
            "| cut vs masked |" + (" fwd+bwd ms | fwd+bwd speed-up |" if backward else ""),
            "|---|---|---|---|---|---|---|---|" + ("---|---|" if backward else "")]
    points = []
    for k, net in models.items():
        row, reduction, speed = _row(k, net, x, base, fwd, bwd, errors.get(k))
        points.append((k, reduction, speed))
        rows.append(row)
        print(row, flush=True)
    return "\n".join(rows), points, search


def plot(series: dict, path) -> None:
    """Speed-up against FLOP reduction per scene, with the ideal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    top = max(r for pts in series.values() for _, r, _ in pts)
    ax.plot([1, top], [1, top], "k--", lw=0.8, label="ideal (speed-up = FLOP reduction)")
    for name, pts in series.items():
        uniform = [p for p in pts if not p[0].startswith("AMC")]
        line, = ax.plot([r for _, r, _ in uniform], [s for _, _, s in uniform], "o", label=name)
        amc = [p for p in pts if p[0].startswith("AMC")]
        if amc:
            ax.plot([r for _, r, _ in amc], [s for _, _, s in amc], "*", ms=10, color=line.get_color(),
                    label=f"{name}: AMC at the keep-0.5 FLOPs")
    ax.set_xlabel("FLOP reduction (x)")
    ax.set_ylabel("forward speed-up (x)")
    ax.set_title("MinkUNet cr=1.0, every coupled group cut")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SCENES = ("generated", "kitti")


def _amc_note(scene: str, search: dict) -> str:
    return (f"AMC on {scene}: {search['episodes']} episodes ({search['warmup']} random warm-up), reward -(1 - "
            f"fidelity), fidelity = max(0, 1 - |y - y_dense| / |y_dense|) over the logits (the network is "
            f"untrained); budget {search['target']:.4f} of the dense FLOPs (the keep-0.5 model's, fidelity "
            f"{search['uniform']:.3f}); best episode (number {search['best_episode']}): "
            f"fidelity {search['best']:.3f} at {search['best_flops']:.4f} of the dense FLOPs, its ratios then "
            f"scaled evenly to fill the budget (fidelity {search['filled']:.3f}); search {search['seconds']:.0f} s. "
            f"Kept channels per group (x1): {search['kept']}.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=positive_int, default=None, help="default 3 (--quick 1)")
    parser.add_argument("--voxels", type=positive_int, default=None, help="generated scene size (default 30000, --quick 5000)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 5k voxels, keep 0.5, 1 repeat, a 3-episode AMC search, no KITTI")
    parser.add_argument("--amc-episodes", type=int, default=None,
                        help="AMC search episodes per scene (default 30, --quick 3; 0: no AMC rows)")
    parser.add_argument("--amc-warmup", type=int, default=None,
                        help="AMC episodes of random actions first (default 10, --quick 1)")
    parser.add_argument("--scenes", nargs="+", choices=SCENES, default=None,
                        help="which scenes (one alone writes prune_speed_SCENE.md/.png, both prune_speed.md/.png; "
                             "--quick: generated only)")
    parser.add_argument("--out", type=page_arg, default=None,
                        help="the page (default bench/results/prune_speed.md, prune_speed_SCENE.md for one scene); "
                             "the plot beside it, as PAGE.png")
    args = parser.parse_args()
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.voxels = args.voxels or (5_000 if args.quick else 30_000)
    torch.set_num_threads(args.threads)
    args.amc_episodes = (3 if args.quick else 30) if args.amc_episodes is None else args.amc_episodes
    args.amc_warmup = (1 if args.quick else 10) if args.amc_warmup is None else args.amc_warmup
    args.scenes = args.scenes or (["generated"] if args.quick else list(SCENES))
    amc = {"episodes": args.amc_episodes, "warmup": args.amc_warmup} if args.amc_episodes > 0 else None
    rounding = [(0.5, 8)] if args.quick else [(0.75, 8), (0.5, 8), (0.35, 1), (0.35, 8), (0.35, 16)]
    tables, series, notes = [], {}, []
    if "generated" in args.scenes:
        table, points, search = scene_table("generated street scene (0.05 m)", street_scene(args.voxels),
                                            args.repeats, True, rounding, amc)
        tables, series = [table], {"generated street": points}
        notes = [_amc_note("the generated street", search)] if search else []
    sweeps = real_sweeps() if "kitti" in args.scenes else {}
    if "kitti-raw/000049" in sweeps:
        table, points, search = scene_table("KITTI raw 000049 (0.05 m)", real_scene(sweeps["kitti-raw/000049"], 0.05),
                                            args.repeats, False, [(0.75, 8), (0.5, 8), (0.35, 8)], amc)
        tables.append(table)
        series["KITTI 000049"] = points
        notes += [_amc_note("KITTI 000049", search)] if search else []
    elif "kitti" in args.scenes:
        tables.append(f"KITTI raw 000049: not present ({kitti_searched()}), skipped")
    stem = "prune_speed" if len(set(args.scenes)) == len(SCENES) else f"prune_speed_{args.scenes[0]}"
    output = page_path(args.out, f"{stem}.md", args.quick)
    if series:
        output.parent.mkdir(parents=True, exist_ok=True)
        plot(series, output.with_suffix(".png"))
    notes = ["Every coupled channel group of the dependency graph is cut to the keep ratio (channels of lowest "
             "summed magnitude over the group), rounded to the multiple in brackets. Times are medians of "
             "interleaved repeats; ratios are within this run. 'cut vs masked': max |cut - masked| / max |masked| "
             "of the outputs, the masked model being the dense one with the same channels zeroed; checked before "
             f"timing, at most {TOLERANCE:g} (a larger one stops the run). Plot: "
             f"{output.with_suffix('.png').name}."] + notes
    write_markdown(output, "Pruning through the dependency graph: MinkUNet cr=1.0",
                   f"python bench/prune_speed.py --repeats {args.repeats} --voxels {args.voxels} --threads "
                   f"{args.threads} --amc-episodes {args.amc_episodes} --amc-warmup {args.amc_warmup} --scenes "
                   f"{' '.join(args.scenes)}"
                   + (" --quick" if args.quick else "") + (f" --out {shlex.quote(args.out)}" if args.out else ""),
                   environment(), tables, "\n\n".join(notes))
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
