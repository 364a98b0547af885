"""Spatial pruning on MinkUNet: inference time and mIoU after fine-tuning,
``nn.VoxelPrune`` against the unpruned model given the same fine-tuning.

    make demo   # writes runs/demo/checkpoint.pt (MinkUNet cr=0.5 on generated streets, 0.2 m voxels)
    flock /work/cpu.lock python bench/voxel_prune.py --variant unpruned     # fine-tune, evaluate (~2 min)
    flock /work/cpu.lock python bench/voxel_prune.py --variant voxelprune   # the same with VoxelPrune
    flock /work/cpu.lock python bench/voxel_prune.py --variant voxelskip    # the same with VoxelSkip
    flock /work/cpu.lock python bench/voxel_prune.py --report               # time them, write the table
    python bench/voxel_prune.py [--quick]     # all of it in one process

Every variant starts from the checkpoint's weights and is fine-tuned for
``--steps`` steps (AdamW, constant ``--lr``, plain cross-entropy, batches of
``--batch`` augmented generated street scenes, seeds 0..``--scenes``-1, the
same batches in the same order for each). The VoxelPrune variant keeps
``--keep`` of the voxels (largest feature norm, per scan) entering each of
the decoder stages ``--stages`` (0: stride 8, 1: stride 4, 2: stride 2; the
stride-1 stage feeds the classifier and keeps every voxel): the stage's convs
build their maps on the kept voxels, and the transposed conv after it comes
back to every voxel of the finer stride. The VoxelSkip variant keeps every
voxel: each residual block of the decoder stages ``--skip-stages`` (by
default all four, the stride-1 one too) runs its convs on ``--keep`` of its
input voxels (largest feature norm) and the others pass through its
shortcut (``nn.VoxelSkip`` around ``block.main``). mIoU is per point on
held-out scenes (seeds 1000 ..), time the median of interleaved eval-mode
forwards without gradients on one held-out scan (and the decoder's share:
the forward less the encoder alone). ``--seed N`` repeats a variant's
fine-tuning with other batches; ``--report`` averages the seeds' mIoU.
``--score learned`` ranks the voxels of both pruned variants by a learned
score instead (``VoxelPrune(score="learned")``: ``Linear(C, 1)`` on the
feats, the kept feats scaled by its sigmoid so that it trains); those runs
are saved as ``voxelprune-learned`` and ``voxelskip-learned`` beside the
others, and the report with ``--score learned`` reads them. Each variant is its own command so
that no lock hold runs long; the report reads their saved weights, and its
page says how they were fine-tuned as each run recorded it (result.json), not
as the report's own options say (and where the runs differ, how). The default
``--checkpoint`` and ``--out`` are in the repository (runs/), wherever the
script runs from. A missing checkpoint, or a report of a folder without the
unpruned run, is an error (exit 2); ``--time-sweep`` without the KITTI sweep
says so and measures nothing (exit 0, as bench/north_star.py)."""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import time
from pathlib import Path

import torch

from _common import (DEMO_CHECKPOINT, ROOT, RESULTS_DIR, absent_checkpoint, environment, shown, interleaved, kitti_path, kitti_searched, positive_int,
                     write_markdown)

import pointsparse as ps
from pointsparse.app import metrics
from pointsparse.data import Batch, VoxelDataset, open_source, read_cloud, voxelize_sample
from pointsparse.models import load_model
from pointsparse.nn.fuse import fuse_for_inference

VARIANTS = ("unpruned", "voxelprune", "voxelskip")
SCORE_WORDS = {"magnitude": "feature norm",
               "learned": "a learned score (Linear(C, 1) on the feats, trained through the sigmoid that scales "
                          "the kept feats)"}
DEFAULT_OUT, DEFAULT_RESULTS = ROOT / "runs" / "voxel-prune", RESULTS_DIR / "voxel_prune.md"
DEFAULT_CHECKPOINT = DEMO_CHECKPOINT  # (make demo writes it)
# What each run records of its fine-tuning in result.json, and whose runs the page reads it from (the pruned
# variants' settings from theirs alone).
RECORDED = {"checkpoint": VARIANTS, "steps": VARIANTS, "batch": VARIANTS, "lr": VARIANTS, "scenes": VARIANTS,
            "val_scenes": VARIANTS, "voxel_size": VARIANTS, "max_range": VARIANTS,
            "keep": ("voxelprune", "voxelskip"), "stages": ("voxelprune",), "skip_stages": ("voxelskip",)}
NOT_RECORDED = "?"


def _first_conv_channels(module: torch.nn.Module) -> int:
    """Input channels of the first ``ps.nn.Conv3d`` inside ``module``."""
    return next(m for m in module.modules() if isinstance(m, ps.nn.Conv3d)).in_channels


def add_voxel_prune(model: torch.nn.Module, keep: float, stages, score: str = "magnitude") -> None:
    """VoxelPrune(keep) on the input of each decoder stage ``model.fuse[j]``
    (``models.add_voxel_prune``: a forward pre-hook, the model's own forward
    unchanged; the pruner registered on the model as ``voxel_prune.fuse_<j>``,
    so that a learned scorer trains and is saved with the weights, and
    ``models.voxel_prunes`` records them for a checkpoint's config)."""
    for j in stages:
        channels = _first_conv_channels(model.fuse[j]) if score == "learned" else None
        ps.models.add_voxel_prune(model, f"fuse.{j}", keep, score, channels)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """A variant's saved weights into ``model`` (as :func:`build` makes it);
    a learned scorer saved before ``models.add_voxel_prune`` held it
    (``voxel_prune_<j>.``) under its key now (``voxel_prune.fuse_<j>.``)."""
    weights = torch.load(path, weights_only=True)
    model.load_state_dict({re.sub(r"^voxel_prune_(\d+)\.", r"voxel_prune.fuse_\1.", k): v for k, v in weights.items()})


def add_voxel_skip(model: torch.nn.Module, keep: float, stages, score: str = "magnitude") -> None:
    """VoxelSkip(keep) around the convs (``main``) of every residual block of
    the decoder stages ``model.fuse[j]``: each block convolves the voxels of
    largest feature norm (or, ``score="learned"``, of largest learned score)
    and the others pass through its shortcut."""
    for j in stages:
        for block in model.fuse[j]:
            channels = _first_conv_channels(block.main) if score == "learned" else None
            block.main = ps.nn.VoxelSkip(block.main, keep, score, channels)


def variant_dir(args, variant: str) -> str:
    """The folder name of a variant's run: ``<variant>-learned`` for the
    pruned variants under ``--score learned``."""
    return variant if variant == "unpruned" or args.score == "magnitude" else f"{variant}-{args.score}"


def build(args, variant: str) -> torch.nn.Module:
    model = load_model(args.checkpoint)
    if variant == "voxelprune":
        add_voxel_prune(model, args.keep, args.stages, args.score)
    elif variant == "voxelskip":
        add_voxel_skip(model, args.keep, args.skip_stages, args.score)
    return model


def scenes(args, train: bool, count: int, first_seed: int, voxel_size: float | None = None) -> VoxelDataset:
    """Generated street scenes ``first_seed ..``, voxelised (augmented when ``train``)."""
    source = open_source(["generated"], count=count, first_seed=first_seed, max_range=args.max_range)
    return VoxelDataset(source, voxel_size or args.voxel_size, train=train, seed=args.seed)


def finetune(model: torch.nn.Module, args) -> float:
    data = scenes(args, True, args.scenes, 0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=1e-4)
    model.train()
    t0 = time.perf_counter()
    order = torch.randperm(args.steps * args.batch, generator=torch.Generator().manual_seed(args.seed)) % len(data)
    for step in range(args.steps):
        data.set_epoch(step)
        batch = Batch.of([data[int(i)] for i in order[step * args.batch:(step + 1) * args.batch]])
        logits = model(batch.input).feats
        loss = torch.nn.functional.cross_entropy(logits, batch.labels, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - t0


def evaluate(model: torch.nn.Module, args) -> float:
    data = scenes(args, False, args.val_scenes, 1000)
    model.eval()
    cm = 0
    with torch.no_grad():
        for i in range(len(data)):
            batch = Batch.of([data[i]])
            pred = model(batch.input).feats.argmax(1)[batch.inverse]
            cm = cm + metrics.confusion_matrix(pred, batch.point_labels, model.num_classes, ignore_index=255)
    return metrics.mean_iou(cm)


def run_variant(args) -> None:
    torch.manual_seed(args.seed)
    model = build(args, args.variant)
    seconds = finetune(model, args)
    miou = evaluate(model, args)
    out = (args.out / f"seed-{args.seed}" if args.seed else args.out) / variant_dir(args, args.variant)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "weights.pt")
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in RECORDED}
    (out / "result.json").write_text(json.dumps({"miou": miou, "finetune_s": seconds, "seed": args.seed, **record}))
    print(f"{variant_dir(args, args.variant)}: mIoU {100 * miou:.1f}% after {args.steps} steps ({seconds:.0f} s)")


def encoder(model: torch.nn.Module, x) -> None:
    """MinkUNet's stem and encoder stages alone (the same work in every variant)."""
    y = model.stem(x)
    for stage in model.down:
        y = stage(y)


def time_variants(models: dict, scan, rounds: int) -> dict:
    """Median seconds of each variant's forward and of the encoder alone,
    interleaved, each call on a fresh coordinate cache (maps built every call)."""
    fresh = lambda: ps.SparseTensor(scan.feats, scan.coords)  # noqa: E731
    fns = {v: (lambda m=m: m(fresh())) for v, m in models.items()}
    fns["encoder"] = lambda: encoder(models["unpruned"], fresh())
    with torch.no_grad():
        return interleaved(fns, rounds)


def timed_scan(args):
    """``(tensor, words)``: the scan the report times and how to name it: a
    held-out generated scan, or (``--time-sweep``) the real KITTI sweep
    000049 (the north star's input; its features as every cloud's); ``(None,
    why)`` when that sweep is absent."""
    if not args.time_sweep:
        voxel = args.time_voxel_size or args.voxel_size
        scan = Batch.of([scenes(args, False, 1, 1000, voxel)[0]]).input
        return scan, f"a held-out generated scan of {len(scan):,} voxels at {voxel} m"
    path = kitti_path()
    if path is None:
        return None, f"--time-sweep needs {kitti_searched()}, which is absent; nothing timed"
    voxel = args.time_voxel_size or 0.05
    scan = Batch.of([voxelize_sample(read_cloud(path), voxel, 255)]).input
    return scan, f"the KITTI sweep 000049 ({len(scan):,} voxels at {voxel} m)"


def seed_runs(args, variant: str) -> list[dict]:
    """The variant's result.json of every seed run under ``--out`` (seed 0 in
    it, seed N in seed-N), seed 0's first, each with its ``run``: the variant
    and seed, as the page names it."""
    name, runs = variant_dir(args, variant), []
    for folder in [args.out] + sorted(args.out.glob("seed-*")):
        if (folder / name / "result.json").is_file():
            seed = "seed 0" if folder == args.out else folder.name.replace("-", " ")
            runs.append({**json.loads((folder / name / "result.json").read_text()), "run": f"{variant} {seed}"})
    return runs


def _text(value) -> str:
    """A recorded option as its command line writes it (a list as its words)."""
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def recorded_options(args, runs: dict) -> tuple[argparse.Namespace, list[str]]:
    """``args`` with each option of ``RECORDED`` as the ``runs`` (variant ->
    :func:`seed_runs`) recorded it, for the page's summary and Command line:
    its value where the runs agree, else their values joined by '/' ('?' for
    runs made before result.json recorded it); and notes naming the options
    the runs recorded different values of, run by run, and those some did
    not record."""
    described, differ, unrecorded = copy.copy(args), [], []
    for option, variants in RECORDED.items():
        values = {run["run"]: run.get(option, NOT_RECORDED) for v in variants for run in runs.get(v, [])}
        words = list(dict.fromkeys(map(_text, values.values())))
        if not values:
            continue
        flag = "--" + option.replace("_", "-")
        if NOT_RECORDED in words:
            unrecorded.append(flag)
        if len(words) == 1 and words != [NOT_RECORDED]:
            setattr(described, option, Path(words[0]) if option == "checkpoint" else next(iter(values.values())))
            continue
        setattr(described, option, "/".join(words))
        if len(set(words) - {NOT_RECORDED}) > 1:  # (a value beside '?' alone: in the note of what is not recorded)
            differ.append(f"{flag} " + ", ".join(f"{_text(v)} ({run})" for run, v in values.items()))
    notes = ([f"The runs differ in how they were fine-tuned: {'; '.join(differ)}."] if differ else []) + \
        ([f"{NOT_RECORDED}: not recorded by runs made before result.json recorded it ({', '.join(unrecorded)})."]
         if unrecorded else [])
    return described, notes


def as_run(args, run: dict) -> argparse.Namespace:
    """``args`` with the pruning ``run`` recorded (keep, stages), so that the
    model rebuilt to load its weights and timed is the one it fine-tuned."""
    return argparse.Namespace(**{**vars(args), **{k: run[k] for k in ("keep", "stages", "skip_stages") if k in run}})


def missing_runs(args) -> str | None:
    """Why ``--report`` has nothing to report under ``--out`` (no unpruned
    run there), or None."""
    if (args.out / variant_dir(args, "unpruned") / "weights.pt").is_file():
        return None
    return f"--report: {args.out / 'unpruned'} holds no run; run --variant unpruned first (or name the runs' --out)"


def report(args, write: bool = True) -> None:
    """Time and tabulate the variants run under ``--out`` (the unpruned one
    is needed: :func:`missing_runs`; a pruned variant never run there is left
    out of the table); the page describes the runs as they recorded their
    fine-tuning."""
    ran = [v for v in VARIANTS if (args.out / variant_dir(args, v) / "weights.pt").is_file()]
    runs = {v: seed_runs(args, v) for v in ran}
    shown, notes = recorded_options(args, runs)
    models = {}
    for variant in ran:
        seed0 = next((run for run in runs[variant] if run["run"].endswith(" seed 0")), {})
        models[variant] = build(as_run(args, seed0), variant)
        load_weights(models[variant], args.out / variant_dir(args, variant) / "weights.pt")
        models[variant].eval()
    if args.fused:
        models = {v: fuse_for_inference(m) for v, m in models.items()}
    scan, where = timed_scan(args)
    if scan is None:
        print(f"voxel_prune: {where}")
        return
    med = time_variants(models, scan, args.rounds)
    miou = {v: [run["miou"] for run in runs[v]] for v in ran}
    mean = {v: sum(m) / len(m) for v, m in miou.items()}
    decoder = {v: med[v] - med["encoder"] for v in ran}
    rows = [f"| {v} | {1e3 * med[v]:.1f} | {med['unpruned'] / med[v]:.2f}x | {1e3 * decoder[v]:.1f} | "
            f"{decoder['unpruned'] / decoder[v]:.2f}x | " + " / ".join(f"{100 * m:.1f}" for m in miou[v]) +
            f" | {100 * mean[v]:.1f}% | {100 * (mean[v] - mean['unpruned']):+.1f} |" for v in ran]
    header = ("| model | forward ms | speed-up | decoder ms | decoder speed-up | val mIoU per seed (%) | mean | "
              "vs unpruned (points) |\n|---|---|---|---|---|---|---|---|\n")
    summary = (f"{shown.checkpoint}: MinkUNet fine-tuned {shown.steps} steps of {shown.batch} scans each "
               f"(lr {shown.lr}), once per seed ({len(miou['unpruned'])}: the batches' order, augmentation and torch "
               "seed); "
               + ", ".join(([f"VoxelPrune({shown.keep}) before decoder stages {_stages(shown.stages)}"]
                            if "voxelprune" in ran else []) +
                           ([f"VoxelSkip({shown.keep}) around the convs of each residual block of decoder stages "
                             f"{_stages(shown.skip_stages)}"] if "voxelskip" in ran else [])) +
               f" (0: stride 8 .. 3: stride 1), voxels ranked by {SCORE_WORDS[args.score]}; "
               f"forward{' (BatchNorm folded, ReLU in the convs: fuse_for_inference)' if args.fused else ''} "
               f"on {where}, {torch.get_num_threads()} threads, median of "
               f"{args.rounds} interleaved rounds "
               f"(maps built in every call; the decoder is the forward less the encoder, {1e3 * med['encoder']:.1f} "
               f"ms, timed in the same rounds); mIoU per point on {shown.val_scenes} held-out scenes."
               + "".join(" " + note for note in notes))
    table = header + "\n".join(rows)
    print(summary + "\n\n" + table)
    command = command_line(shown)
    if write:
        write_markdown(args.results, "VoxelPrune and VoxelSkip on MinkUNet after the same fine-tuning",
                       command, environment(), [summary, table])


def _stages(value) -> str:
    """Stages as the summary names them: ``[0, 1, 2]``, or the runs' differing words as given."""
    return value if isinstance(value, str) else str(list(value))


def command_line(args) -> str:
    """The page's Command line: every option the variants were fine-tuned
    and the report timed with (the data, the fine-tuning, the threads and
    rounds), then the report's own (``args`` as :func:`recorded_options`
    gives them: the fine-tuning as the runs recorded it)."""
    q = shlex.quote
    return (f"python bench/voxel_prune.py --checkpoint {q(shown(args.checkpoint))} --steps {args.steps} "
            f"--batch {args.batch} --lr {args.lr} --scenes {args.scenes} --val-scenes {args.val_scenes} "
            f"--voxel-size {args.voxel_size} --max-range {args.max_range} --threads {args.threads} "
            f"--keep {args.keep}" + (f" --score {args.score}" if args.score != "magnitude" else "") + " --stages " +
            _text(args.stages) + " --skip-stages " + _text(args.skip_stages) +
            (f" --out {q(shown(args.out))}" if args.out != DEFAULT_OUT else "") +
            " --variant V [--seed N] for each V and N, then the same with --report" + f" --rounds {args.rounds}" +
            (f" --time-voxel-size {args.time_voxel_size}" if args.time_voxel_size else "") +
            (" --time-sweep" if args.time_sweep else "") + (" --fused" if args.fused else "") +
            (f" --results {q(str(args.results))}" if args.results != DEFAULT_RESULTS else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                        help="the model to fine-tune (default runs/demo/checkpoint.pt in the repository: make demo)")
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2],
                        help="decoder stages VoxelPrune drops voxels before")
    parser.add_argument("--skip-stages", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2, 3],
                        help="decoder stages whose residual blocks VoxelSkip wraps (3: stride 1, which feeds "
                             "the classifier: every voxel still reaches it)")
    parser.add_argument("--score", choices=ps.nn.VoxelPrune.SCORES, default="magnitude",
                        help="what ranks the voxels of both pruned variants; a learned score's runs are saved "
                             "as <variant>-learned")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--scenes", type=int, default=24)
    parser.add_argument("--val-scenes", type=int, default=4)
    parser.add_argument("--voxel-size", type=float, default=0.2)
    parser.add_argument("--max-range", type=float, default=35.0)
    parser.add_argument("--time-voxel-size", type=float, default=None,
                        help="voxel edge of the scan the report times (default --voxel-size; finer: a larger scan)")
    parser.add_argument("--time-sweep", action="store_true",
                        help="time on the real KITTI sweep 000049 (0.05 m unless --time-voxel-size) instead")
    parser.add_argument("--fused", action="store_true",
                        help="time the models as deployed: fuse_for_inference (BatchNorm folded, ReLU in the convs)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the batches' order, augmentation and torch's seed (the same for every variant); runs "
                             "go to --out/seed-N for N > 0 (--report reads every seed's)")
    parser.add_argument("--rounds", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="the runs' folder (default runs/voxel-prune in the repository; --quick: OUT-quick)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 1 held-out scene, 1 round")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if absent_checkpoint(parser, args.checkpoint, "voxel_prune"):
        return
    if args.quick:
        args.steps, args.val_scenes, args.rounds, args.out = 4, 1, 1, args.out.with_name(args.out.name + "-quick")
    given = args.variant  # neither --variant nor --report: everything in one process
    if args.report and given != "unpruned" and missing_runs(args):  # (before any fine-tuning)
        parser.error(missing_runs(args))
    if (args.report or not given) and args.time_sweep and kitti_path() is None:  # (absent data: as north_star.py)
        print(f"voxel_prune: --time-sweep needs {kitti_searched()}, which is absent; nothing measured")
        return
    torch.set_num_threads(args.threads)
    for variant in [given] if given else ([] if args.report else list(VARIANTS)):
        args.variant = variant
        run_variant(args)
    if args.report or not given:
        report(args, write=not args.quick)


if __name__ == "__main__":
    main()
