"""mIoU of a channel-pruned MinkUNet against the unpruned one after the same
fine-tuning budget.

    make demo   # writes runs/demo/checkpoint.pt (MinkUNet cr=0.5 on generated streets)
    python bench/prune_finetune.py --checkpoint runs/demo/checkpoint.pt [--ratio 0.5] [--epochs 5] [--quick]

The unpruned model and a pruned copy (every coupled channel group of the
dependency graph kept at ``--ratio``, ranked by ``--criterion``) are both
trained ``--epochs`` more epochs with the run's own options (data, schedule,
held-out validation scenes); the table gives parameters and validation mIoU
after the same budget, and writes bench/results/prune_finetune.md. With
``--amc-episodes N`` (default 30; 0: none) a third model is AMC's
(``pointsparse.prune.amc``, every coupled group, reward the voxel mIoU of
``checkpoint_task``'s validation cloud without fine-tuning) at the FLOPs of
the ``--ratio`` model, fine-tuned alike. With ``--vectors AMOUNT`` (default
0.75; 0: none) another model is the ``--ratio`` model with ``AMOUNT`` of the
engine's vectors of every conv with more than one offset pruned as well
(``prune.panel_structured``: the granularity the fused kernels skip; the
north star's fastest float32 model), its masks kept through the fine-tuning
(``torch.nn.utils.prune``'s ``weight_orig`` / ``weight_mask``, which the
checkpoint stores and the trainer resumes); with ``--square`` its blocks are
16 x 16 (``panel_structured(square=True)``), with ``--pairs`` 16 x 2 (``rows=2``:
whole bf16 vectors, channel pairs, which the bf16 kernels skip, bench/bf16_vectors.py), with
``--panels 2`` 32 columns wide (twin vectors, the AVX-512 tile's width). With ``--offsets AMOUNT``
(default 0: none) another model is the ``--ratio`` model with ``AMOUNT`` of the kernel offsets
of every conv whose windows overlap pruned (``pointsparse prune offsets``:
``prune.kernel_structured(scope="offset")``; 0.74 keeps 7 of 27), masks kept alike: the north
star's model on AMX CPUs, whose bf16 tiles run the kept offsets. FLOPs: the dense FLOPs of each
model's shapes and the FLOPs the engine executes for its weights
(``sparsity_report``'s ``executed_flops``), on the cloud AMC searches on.
With ``--eval-scenes N`` every fine-tuned model is also scored on N held-out generated scenes
(``pointsparse eval --val-scenes N``, in ``--eval-inference``'s form): the run validates on 4,
whose mIoU moves by several points from seed to seed. Each model fine-tuned is kept in
``--out`` (OUT/rows.json holds its row, held-out scores and what it depended on: ``row_key``), so a
second run into the same OUT with another ``--vectors`` or ``--offsets`` amount fine-tunes only
the new model and tables it beside the unpruned and keep rows. ``--quick``: one epoch each and a 3-episode AMC search, runs in
``--out``-quick, the page in a temporary folder.
Without the checkpoint the script says so and measures nothing."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path

from _common import DEMO_CHECKPOINT, ROOT, absent_checkpoint, environment, results_path, shown, write_markdown

from prune_speed import _flops, amc_cut

from pointsparse.prune import sparsity_report
from pointsparse.models import load_model
from pointsparse.app.channels import (finetune, load_state, prune_checkpoint, prune_offsets_checkpoint,
                                      prune_vectors_checkpoint, save_pruned)
from pointsparse.app import cli
from pointsparse.app.tasks import checkpoint_batches, checkpoint_task


def _size(path: Path, x) -> tuple[int, float, float]:
    """(parameters, dense FLOPs, executed FLOPs on ``x``) of the model a
    checkpoint holds, loaded once; a masked tensor counts its kept entries."""
    model = load_model(path).eval()
    masks = dict(model.named_buffers())
    params = sum(int(masks[n[:-5] + "_mask"].count_nonzero()) if n.endswith("_orig") and n[:-5] + "_mask" in masks
                 else p.numel() for n, p in model.named_parameters())
    total = sparsity_report(model, x)["total"]
    return params, float(total["dense_flops"]), float(total["executed_flops"])


def amc_checkpoint(path: Path, out: Path, like: Path, episodes: int, warmup: int) -> tuple[Path, str]:
    """``out/checkpoint.pt``: the checkpoint's model cut to AMC's ratios,
    searched within the FLOPs of the model at ``like``; (its path, a summary
    of the search)."""
    state, task = checkpoint_task(path)
    dense, x = task.trained_model(), task.example_input
    target = _flops(load_model(like).eval(), x) / _flops(dense, x)
    t0 = time.perf_counter()
    net, _, res, _ = amc_cut(dense, x, target, episodes, warmup, task.eval_fn)
    summary = (f"AMC: {episodes} episodes ({warmup} random warm-up), budget {target:.4f} of the dense FLOPs (the "
               f"{like.parent.name} model's), reward -(1 - mIoU) before fine-tuning on checkpoint_task's "
               f"validation cloud (generated seed 3, default scene options: not the run's held-out scenes); best "
               f"episode {100 * res.metric:.1f}% at {res.flops / res.dense_flops:.4f} of the dense FLOPs (unpruned "
               f"{100 * task.eval_fn(dense):.1f}%), filled to the budget {100 * task.eval_fn(net):.1f}% at "
               f"{_flops(net, x) / _flops(dense, x):.4f}; search {time.perf_counter() - t0:.0f} s.")
    return save_pruned(state, net.train(), out), summary


def _prepare(name: str, args, out: Path) -> tuple[Path, str]:
    """The checkpoint of model ``name`` to fine-tune, in ``out``; a note."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if name == "unpruned":
        shutil.copy(args.checkpoint, out / "checkpoint.pt")
        return out / "checkpoint.pt", ""
    cut = args.out / f"keep {args.ratio}".replace(" ", "-") / "pruned.pt"  # the keep model as cut
    if "offsets" in name:
        return prune_offsets_checkpoint(cut, out, args.offsets), ""
    if "vectors" in name:
        return prune_vectors_checkpoint(cut, out, args.vectors, square=args.square,
                                        rows=2 if args.pairs else None, panels=args.panels), ""
    if name == "AMC":
        return amc_checkpoint(args.checkpoint, out, cut, args.amc_episodes, args.amc_warmup)
    path = prune_checkpoint(args.checkpoint, out, args.ratio, criterion=args.criterion)
    shutil.copy(path, out / "pruned.pt")  # as cut, before fine-tuning: AMC's FLOPs budget
    return path, ""


def _shape(args) -> str:
    """The --vectors model's block shape as its row name says it ("" for 16 x 1)."""
    shape = "square " if args.square else ("pair " if args.pairs else "")
    return shape + ("twin " if args.panels == 2 else f"{args.panels}-panel " if args.panels > 2 else "")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT,
                        help="the model to prune (default runs/demo/checkpoint.pt in the repository: make demo)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--epochs", type=int, default=None, help="more epochs for each model (default 5, --quick 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "prune-finetune",
                        help="the runs' folder (default runs/prune-finetune in the repository, beside the default "
                             "checkpoint, from any working folder; a given one as typed)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: one epoch each, in OUT-quick")
    parser.add_argument("--page", type=Path, default=None,
                        help="where the page goes (default bench/results/prune_finetune.md; --quick: a temporary folder)")
    parser.add_argument("--amc-episodes", type=int, default=None,
                        help="AMC search episodes (default 30, --quick 3; 0: no AMC model)")
    parser.add_argument("--amc-warmup", type=int, default=None,
                        help="AMC episodes of random actions first (default 10, --quick 1)")
    parser.add_argument("--vectors", type=float, default=0.75,
                        help="a model with this fraction of the --ratio model's engine vectors pruned too (0: none)")
    parser.add_argument("--square", action="store_true",
                        help="the --vectors model's blocks are 16 x 16 (whole bf16 vectors) instead of 16 x 1")
    parser.add_argument("--pairs", action="store_true",
                        help="the --vectors model's blocks are 16 x 2 (whole bf16 vectors: channel pairs)")
    parser.add_argument("--panels", type=int, default=1,
                        help="the --vectors model's blocks span this many 16-column panels (2: twin vectors, the "
                             "AVX-512 tile's width)")
    parser.add_argument("--offsets", type=float, default=0.0,
                        help="another model: the --ratio model with this fraction of each overlapping conv's "
                             "kernel offsets pruned (0: none)")
    parser.add_argument("--eval-scenes", type=int, default=0,
                        help="also score every fine-tuned model on this many held-out generated scenes "
                             "(`pointsparse eval --val-scenes N`; the run validates on 4): a steadier mIoU")
    parser.add_argument("--eval-inference", choices=("float32", "fused", "bf16"), default="float32",
                        help="the form the held-out scenes are scored in (`pointsparse eval --inference`)")
    parser.add_argument("--models", nargs="+", choices=("unpruned", "keep", "vectors", "offsets", "AMC"),
                        default=None,
                        help="fine-tune only these now (a long run split into shorter ones: rows of earlier runs "
                             "with the same checkpoint and epochs, kept in OUT/rows.json, join the table); "
                             "without it, the models such a run has not fine-tuned yet")
    args = parser.parse_args()
    args.absent = absent_checkpoint(parser, args.checkpoint, "prune_finetune")
    return args


def main() -> None:
    args = parse_args()
    if args.absent:
        return
    args.epochs = args.epochs or (1 if args.quick else 5)
    args.amc_episodes = (3 if args.quick else 30) if args.amc_episodes is None else args.amc_episodes
    args.amc_warmup = (1 if args.quick else 10) if args.amc_warmup is None else args.amc_warmup
    args.out_given = args.out  # (the page's command names it: --quick adds its suffix again)
    if args.quick:
        args.out = args.out.with_name(args.out.name + "-quick")
    state = load_state(args.checkpoint)
    start = state["history"]["val_miou"][-1] if state["history"].get("val_miou") else float("nan")
    x = checkpoint_batches(state, count=4)[-1].input  # checkpoint_task's validation cloud: AMC's budget is on it
    names = (("unpruned", f"keep {args.ratio}") + (("AMC",) if args.amc_episodes > 0 else ())
             + ((f"keep {args.ratio} + {_shape(args)}vectors {args.vectors}",)
                if args.vectors > 0 else ())
             + ((f"keep {args.ratio} + offsets {args.offsets}",) if args.offsets > 0 else ()))
    store = args.out / "rows.json"
    saved = load_rows(store, args)
    for name in names:
        kind = "vectors" if "vectors" in name else "offsets" if "offsets" in name else name.split()[0]
        out = args.out / name.replace(" ", "-")
        if saved["keys"].get(name) != row_key(name, args):
            saved["rows"].pop(name, None)  # fine-tuned from another checkpoint or budget: not this row
        done = name in saved["rows"] and (out / "checkpoint.pt").is_file()
        if (kind not in args.models) if args.models is not None else done:
            continue  # not asked for, or (no --models) fine-tuned by an earlier run with this key
        for scored in saved["held_out"].values():
            scored.pop(name, None)  # scores of the model this run replaces
        path, note = _prepare(name, args, out)
        t0 = time.perf_counter()
        finetune(path, args.epochs)
        report = json.loads((out / "metrics.json").read_text())
        saved["rows"][name] = [*_size(path, x), report["miou"], time.perf_counter() - t0, note]
        saved["keys"][name] = row_key(name, args)
        store.write_text(json.dumps(saved))
        print(f"{name}: mIoU {100 * report['miou']:.1f}% after {args.epochs} more epochs", flush=True)
    if any(n not in saved["rows"] for n in names):
        print(f"not all of {names} fine-tuned yet with this checkpoint and budget ({store}); page not written")
        return
    held = {}
    if args.eval_scenes > 0:
        held = saved["held_out"].setdefault(f"{args.eval_scenes} {args.eval_inference}", {})
        for name in names:
            if name not in held:
                held[name] = held_out_miou(args.out / name.replace(" ", "-") / "checkpoint.pt", args.eval_scenes,
                                           args.eval_inference)
                store.write_text(json.dumps(saved))
                print(f"{name}: mIoU {100 * held[name]:.1f}% on {args.eval_scenes} held-out scenes "
                      f"({args.eval_inference})", flush=True)
    write_page(args, state, start, names, saved["rows"], held)


def _digest(path: Path) -> str:
    """sha256 of a file's bytes (first 16 hex digits; "absent" for no file),
    kept per path, size and modification time."""
    path = Path(path)
    if not path.is_file():
        return "absent"
    st = path.stat()
    return _digest_of(path.resolve(), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _digest_of(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def row_key(name: str, args) -> str:
    """What model ``name``'s fine-tuning depends on: the checkpoint (its path
    and its bytes' digest: a checkpoint trained again at the same path, as
    ``make demo`` writes it, made the rows of the old one come back) and the
    epochs; the channel cut's ratio and criterion for every pruned model
    (the vectors' and offsets' amounts and shape are in their names); AMC's
    search. A row of OUT/rows.json is reused only under the same key, so
    runs with other ``--vectors`` or ``--offsets`` into one OUT fine-tune
    only their new models."""
    parts = [args.checkpoint.resolve(), _digest(args.checkpoint), args.epochs]
    if name != "unpruned":
        parts += [args.ratio, args.criterion]
    if name == "AMC":
        parts += [args.amc_episodes, args.amc_warmup]
    return " ".join(map(str, parts))


def load_rows(store: Path, args) -> dict:
    """OUT/rows.json: ``rows`` (name -> table row), ``keys`` (name ->
    row_key) and ``held_out`` ("SCENES INFERENCE" -> name -> mIoU). A file
    of the earlier form (one key for every row: checkpoint, epochs, ratio,
    criterion, AMC's search, then the amounts its rows' names say) keeps
    its rows where that key starts as this run's would."""
    saved = json.loads(store.read_text()) if store.is_file() else {}
    if "keys" not in saved:
        legacy = " ".join(map(str, (args.checkpoint.resolve(), args.epochs, args.ratio, args.criterion,
                                    args.amc_episodes, args.amc_warmup))) + " "
        rows = saved.get("rows", {}) if str(saved.get("key", "")).startswith(legacy) else {}
        saved = {"rows": rows, "keys": {n: row_key(n, args) for n in rows},
                 "held_out": saved.get("held_out", {}) if rows else {}}
    return saved


def held_out_miou(path: Path, scenes: int, inference: str) -> float:
    """mIoU of the checkpoint at ``path`` on ``scenes`` held-out generated
    scenes (``pointsparse eval --val-scenes``, from the validation seed: the
    run's own validation scenes are the first of them)."""
    out = path.parent / f"eval-{scenes}-{inference}"
    code = cli.main(["eval", "--checkpoint", str(path), "--val-scenes", str(scenes), "--inference", inference,
                     "--no-progress", "--out", str(out)])
    if code != 0:
        raise SystemExit(f"pointsparse eval failed on {path} (exit {code})")
    return float(json.loads((out / "eval-metrics.json").read_text())["miou"])


def write_page(args, state: dict, start: float, names, saved_rows: dict, held: dict) -> None:
    """The table of the fine-tuned models (rows as kept in OUT/rows.json;
    ``held``: name -> mIoU on the held-out scenes, or empty)."""
    rows = [(n, *saved_rows[n][:5]) for n in names]
    notes = [saved_rows[n][5] for n in names if saved_rows[n][5]]
    base, dense = rows[0][4], rows[0][2]

    def held_cells(n):
        if not held:
            return ""
        return f" {100 * held[n]:.1f}% | {100 * (held[n] - held[names[0]]):+.1f} |"

    table = "\n".join(f"| {n} | {p / 1e6:.2f} M | {f / dense:.3f} | {e / dense:.3f} | {100 * m:.1f}% | "
                      f"{100 * (m - base):+.1f} |{held_cells(n)} {t:.0f} s |" for n, p, f, e, m, t in rows)
    extra = (f" {args.eval_scenes} held-out scenes, {args.eval_inference} | vs unpruned (points) |" if held else "")
    header = ("| model | params (kept) | FLOPs (of unpruned) | executed FLOPs (of unpruned) | val mIoU | "
              f"vs unpruned (points) |{extra} fine-tuning time |\n|---|---|---|---|---|---|"
              + ("---|---|" if held else "") + "---|\n")
    summary = (f"Starting point: {shown(args.checkpoint)} (epoch {state['epoch']}, validation mIoU {100 * start:.1f}%); "
               f"every model trained {args.epochs} more epochs with the run's options. FLOPs on the cloud AMC "
               f"searched on.")
    command = (f"python bench/prune_finetune.py --checkpoint {shown(args.checkpoint)} --ratio {args.ratio} "
               f"--criterion {args.criterion} --epochs {args.epochs} --amc-episodes {args.amc_episodes} "
               f"--amc-warmup {args.amc_warmup} --vectors {args.vectors}{' --square' if args.square else ''}"
               f"{' --pairs' if args.pairs else ''}{f' --panels {args.panels}' if args.panels != 1 else ''}"
               f"{f' --offsets {args.offsets}' if args.offsets > 0 else ''}"
               f"{f' --eval-scenes {args.eval_scenes} --eval-inference {args.eval_inference}' if held else ''}"
               f" --out {shown(args.out_given)}"
               + (f" --page {args.page}" if args.page else "") + (" --quick" if args.quick else ""))
    output = args.page or results_path("prune_finetune.md", args.quick)
    write_markdown(output, "Pruned vs unpruned MinkUNet after the same fine-tuning budget",
                   command, environment(), [summary, header + table] + notes)
    print(header + table)
    print(f"written {output}")


if __name__ == "__main__":
    main()
