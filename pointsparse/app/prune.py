"""Pruning procedures on a ready-made task: ``pointsparse prune <procedure>``.

Procedures: sensitivity, schedule, lottery, init, rigl, amc, netadapt (each
through its driver in :mod:`pointsparse.app.procedures`), channels (a
trained checkpoint's every coupled group), vectors (a trained checkpoint's
engine vectors, masked), offsets (its convs' kernel offsets, masked) and
voxels (VoxelSkip or VoxelPrune in its MinkUNet's or SPVCNN's decoder
stages), all four in :mod:`pointsparse.app.channels`.
Tasks: ``--task digits`` (scikit-learn's bundled digits; ``--model
mlp|cnn|deep``), ``--task scene`` (generated street scenes, a sparse-conv
chain) or ``--checkpoint`` (a trained MinkUNet or SPVCNN and its clouds:
an SPVCNN's scored on its points). Each run starts from the task's model
(seeded; on a checkpoint its trained model, from which lottery, init and
rigl start too, while the lottery's random re-init control is a fresh model
of its widths), trains it first (but lottery, init and rigl, which train it
themselves), then runs the procedure and prints what it found; ``--quick``
shortens everything. sensitivity writes its plot and its scan as JSON
(``--out/sensitivity.png``, ``--out/sensitivity.json``) on any task.

On a ``--checkpoint`` every procedure but sensitivity writes the model it
pruned as ``--out/checkpoint.pt`` (:func:`.channels.save_pruned`: the run's
config, epoch and history, a fresh optimizer state), which ``eval``,
``export``, ``predict``, ``prune`` and ``train --resume`` read: amc's and
netadapt's with their channels cut; schedule's, lottery's, init's and rigl's
with their masks stored as ``torch.nn.utils.prune`` stores them
(``weight_orig`` + ``weight_mask``), held at zero by later training.
schedule: the model pruned to ``--sparsity`` and fine-tuned; lottery: the
last round's ticket as that round trained it (its mask, the weights rewound
to ``--rewind`` and trained again: the model whose metric the last round
prints); init: the model pruned by ``--method`` after its training; rigl:
the trained model with RigL's final masks (which RigL applies to the
weights directly, so the file stores them as masks). On a ``--task`` these
four print what they found and write no file."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch

from ..checkpoint import atomic_write, make_directory
from ..prune import adapters
from ..prune.sensitivity import DEFAULT_RATIOS
from . import channels, procedures
from .cli import given_flags
from .tasks import digits_task, scene_task

PROCEDURES = ("sensitivity", "schedule", "lottery", "init", "rigl", "amc", "netadapt", "channels", "vectors", "offsets",
              "voxels")


def add_arguments(parser) -> None:
    parser.add_argument("procedure", choices=PROCEDURES, help="which procedure to run")
    parser.add_argument("--task", choices=("digits", "scene"), default=None,
                        help="the procedures' ready-made task without --checkpoint: digits (default) or scene")
    parser.add_argument("--model", choices=("mlp", "cnn", "deep", "sparse", "minkunet"), default=None,
                        help="digits: mlp (default), cnn (default for amc/netadapt), deep; scene: sparse (a "
                             "sparse-conv chain, default) or minkunet (pointsparse.models.MinkUNet, cr 0.25)")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="target sparsity (schedule, init, rigl: default 0.9; vectors: the fraction of each "
                             "conv's engine vectors pruned, default 0.75; offsets: of its kernel offsets, default "
                             "0.74; vectors and offsets of a checkpoint pruned already prune that fraction of what "
                             "is left, as torch's pruning does, and say so)")
    parser.add_argument("--granularity", choices=("unstructured", "channel"), default="unstructured",
                        help="sensitivity granularity")
    parser.add_argument("--threshold", type=float, default=0.02, help="sensitivity: allowed metric drop")
    parser.add_argument("--schedule", choices=("agp", "constant", "oneshot"), default="agp",
                        help="schedule: how the sparsity rises to --sparsity over --rounds: agp (the cubic schedule "
                             "of automated gradual pruning, default), constant (equal steps) or oneshot (all at once, "
                             "then fine-tuned)")
    parser.add_argument("--rounds", type=int, default=5, help="pruning rounds (schedule, lottery)")
    parser.add_argument("--finetune-lr-factor", type=float, default=0.1,
                        help="schedule, amc: fine-tuning lr / training lr, in (0, 1] (0.1 or 0.01)")
    parser.add_argument("--prune-fraction", type=float, default=0.2, help="lottery: fraction pruned per round")
    parser.add_argument("--rewind", type=int, default=0, help="lottery: rewind iteration k (0 = original LTH)")
    parser.add_argument("--method", choices=("snip", "grasp", "synflow"), default="snip", help="init method")
    parser.add_argument("--distribution", choices=("uniform", "erk"), default="erk", help="rigl layer densities")
    parser.add_argument("--flops", type=float, default=0.5, help="amc: FLOPs budget as a fraction of dense")
    parser.add_argument("--reward", choices=("error", "flops"), default="error", help="amc reward")
    parser.add_argument("--episodes", type=int, default=120,
                        help="amc episodes (the first quarter, at most 30, act at random: a warm-up; --quick: 30, "
                             "of which 10)")
    parser.add_argument("--reconstruct", action="store_true", help="amc: least-squares reconstruction")
    parser.add_argument("--latency", type=float, default=None,
                        help="netadapt: latency budget, fraction of the initial (default 0.6 on --task digits, 0.85 "
                             "on --task scene and a --checkpoint, whose convs keep much of their time at any width; "
                             "on a --task, one below what the "
                             "latency table's narrowest widths leave is refused before training; a search that ends "
                             "above it exits 1)")
    parser.add_argument("--out", type=Path, default=Path("prune-out"),
                        help="folder for plots, ratios, tables, and the pruned checkpoint DIR/checkpoint.pt "
                             "(channels, vectors, offsets, voxels; amc, netadapt, schedule, lottery, init, rigl on a "
                             "--checkpoint), default ./prune-out; schedule, lottery, init and rigl on a --task write "
                             "no file and take no --out")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the task's model, its training batches and the procedure's random draws "
                             "(default 0)")
    parser.add_argument("--quick", action="store_true", help="short runs (seconds)")
    channels.add_arguments(parser)
    for action in parser._actions:  # ``prune PROCEDURE --help``: that procedure's flags alone
        if isinstance(action, argparse._HelpAction):
            action.__class__ = _ProcedureHelp


#: Flags one procedure reads that READ_BY leaves to main's own check.
_VECTORS_ONLY = ("square", "pairs", "panels")


def reads(dest: str, procedure: str) -> bool:
    """Whether ``prune procedure`` reads the flag stored in ``dest`` (--out
    and --checkpoint: every procedure)."""
    if dest in READ_BY:
        return procedure in READ_BY[dest]
    return procedure == "vectors" if dest in _VECTORS_ONLY else True


class _ProcedureHelp(argparse._HelpAction):
    """-h after a procedure's name (``prune channels --help``) lists the
    flags that procedure reads; before one, every procedure's."""

    def __call__(self, parser, namespace, values, option_string=None):
        procedure = getattr(namespace, "procedure", None)
        if procedure in PROCEDURES:
            for action in parser._actions:
                if action.option_strings and not isinstance(action, argparse._HelpAction) \
                        and not reads(action.dest, procedure):
                    action.help = argparse.SUPPRESS
            parser.description = (f"The flags `{parser.prog} {procedure}` reads (`{parser.prog} --help`: every "
                                  "procedure's).")
        super().__call__(parser, namespace, values, option_string)


def _task(args):
    if getattr(args, "checkpoint", None) is not None:
        from .tasks import checkpoint_task
        args.checkpoint_state, task = checkpoint_task(args.checkpoint, args.data, args.label_map,
                                                       skip_nonfinite=args.skip_nonfinite)
        return task
    if (args.task or "digits") == "scene":
        if args.model not in (None, "sparse", "minkunet"):
            raise ValueError(f"--model {args.model} is a digits model; the scene task takes sparse or minkunet")
        make = None
        if args.model == "minkunet":
            from ..models import MinkUNet

            def make(seed=args.seed):
                torch.manual_seed(seed)
                return MinkUNet(3, 4, cr=0.25, blocks=1)
        return scene_task(args.seed, points=3000 if args.quick else 6000, make_model=make)
    if args.model in ("sparse", "minkunet"):
        raise ValueError(f"--model {args.model} needs --task scene")
    model = args.model or ("cnn" if args.procedure in ("amc", "netadapt") else "mlp")
    return digits_task(model, args.seed)


# Flags that must be finite numbers in a range (lo, hi, whether each end is included).
_RANGES = {"sparsity": (0.0, 1.0, True, False), "threshold": (0.0, math.inf, True, False),
           # (a fraction of the training lr: a large one trained to NaN, past float32 it was torch's RuntimeError)
           "finetune_lr_factor": (0.0, 1.0, False, True), "prune_fraction": (0.0, 1.0, False, False),
           "flops": (0.0, 1.0, False, True), "latency": (0.0, 1.0, False, True)}
_COUNTS = ("rounds", "episodes")


def check_args(args) -> None:
    """ValueError naming the first flag that is NaN, infinite or out of its
    range, before any work."""
    for name, (lo, hi, lo_in, hi_in) in _RANGES.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        ok = math.isfinite(value) and (value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)
        if not ok:
            lo_s, hi_s = ("[" if lo_in else "(") + f"{lo:g}", f"{hi:g}" + ("]" if hi_in else ")")
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number in {lo_s}, {hi_s}; got {value}")
    for name in _COUNTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1; got {value}")
    if getattr(args, "rewind", 0) < 0:
        raise ValueError(f"--rewind must be >= 0; got {args.rewind}")
    seed = getattr(args, "seed", 0)  # (as train's: amc and the lottery controls refused a negative one after
    if not 0 <= seed < 2**32:  # training, the others took it)
        raise ValueError(f"--seed must be in [0, 2**32); got {seed}")


#: The procedures run on a task (their drivers in :mod:`.procedures`), and those on a checkpoint alone.
TASK_PROCEDURES = ("sensitivity", "schedule", "lottery", "init", "rigl", "amc", "netadapt")
CHECKPOINT_PROCEDURES = ("channels", "vectors", "offsets", "voxels")

#: The procedures that read each flag (--out and --checkpoint: every one; --square, --pairs and --panels: vectors,
#: refused by main's own check); each other procedure would ignore it.
READ_BY = {
    "task": TASK_PROCEDURES, "model": TASK_PROCEDURES, "seed": TASK_PROCEDURES, "quick": TASK_PROCEDURES,
    "sparsity": ("schedule", "init", "rigl", "vectors", "offsets"), "granularity": ("sensitivity",),
    "threshold": ("sensitivity",), "schedule": ("schedule",), "rounds": ("schedule", "lottery"),
    "finetune_lr_factor": ("schedule", "amc"), "prune_fraction": ("lottery",), "rewind": ("lottery",),
    "method": ("init",), "distribution": ("rigl",), "flops": ("amc",), "reward": ("amc",), "episodes": ("amc",),
    "reconstruct": ("amc",), "latency": ("netadapt",), "data": ("channels", *TASK_PROCEDURES),
    "label_map": ("channels", *TASK_PROCEDURES),
    "skip_nonfinite": ("channels", *TASK_PROCEDURES), "ratio": ("channels", "voxels"), "criterion": ("channels",),
    "scope": ("channels",), "multiple": ("channels",), "finetune_epochs": CHECKPOINT_PROCEDURES,
    "no_progress": CHECKPOINT_PROCEDURES,
    "placement": ("voxels",), "stages": ("voxels",), "score": ("voxels",),
}

#: The procedures that write files in --out (a plot, ratios, a latency table, a pruned checkpoint); the others
#: print what they found and write nothing on a --task, and on a --checkpoint the masked model they pruned
#: (:func:`writes_out`).
WRITES_OUT = ("sensitivity", "amc", "netadapt", *CHECKPOINT_PROCEDURES)


def writes_out(args) -> bool:
    """Whether ``prune <procedure>`` with these flags writes in --out: every
    procedure on a --checkpoint does (the others then save the masked model)."""
    return args.procedure in WRITES_OUT or getattr(args, "checkpoint", None) is not None

#: What ``--quick`` runs in place of a flag's value; and NetAdapt's iterations at most under it (50 else: a
#: checkpoint's search toward a --latency it cannot reach ran all 50, ten seconds each on 2 cores).
QUICK_EPISODES, QUICK_ROUNDS, QUICK_ITERATIONS = 30, 3, 8


def _given(args, *names: str) -> list[str]:
    """``--flag [value]`` of each of ``names`` typed on the command line
    (:func:`.cli.given_flags`)."""
    return given_flags(args, add_arguments, *names)


def check_read(args) -> None:
    """ValueError naming the flags ``prune <procedure>`` would not read: one
    another procedure takes, --task and --model with --checkpoint (its model
    and clouds are the task), --data and --label-map without it on a task,
    --reconstruct with it (amc cuts every coupled group), a count --quick
    replaces (amc's --episodes, lottery's --rounds above 3)."""
    procedure = args.procedure
    foreign = [(flag, READ_BY[name]) for name in READ_BY if procedure not in READ_BY[name]
               for flag in _given(args, name)]
    if foreign:
        listed = ", ".join(f"{flag} (prune {', '.join(readers)})" for flag, readers in foreign)
        one = len(foreign) == 1
        raise ValueError(f"{listed}: `prune {procedure}` takes {'no such flag' if one else 'none of them'}, so "
                         f"{'it' if one else 'they'} would be ignored: drop {'it' if one else 'them'}")
    if procedure not in TASK_PROCEDURES:
        return
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint is not None:
        flags = _given(args, "task", "model")
        if flags:
            raise ValueError(f"{', '.join(flags)}: --checkpoint runs `prune {procedure}` on its trained model "
                             "(MinkUNet or SPVCNN) and its run's clouds (or --data), so the task would be ignored: drop "
                             f"{'it' if len(flags) == 1 else 'them'}, or drop --checkpoint")
        if procedure == "amc" and args.reconstruct:
            raise ValueError("--reconstruct: amc on a --checkpoint cuts every coupled channel group, without the "
                             "least-squares reconstruction of single layers, so it would be ignored: drop it")
    else:
        flags = _given(args, "data", "label_map", "skip_nonfinite")
        if flags:
            raise ValueError(f"{', '.join(flags)}: the clouds of a --checkpoint's model; `prune {procedure}` on "
                             f"--task {args.task or 'digits'} runs on the task's own data, so "
                             f"{'it' if len(flags) == 1 else 'they'} would be ignored: give --checkpoint, or drop "
                             f"{'it' if len(flags) == 1 else 'them'}")
    if args.quick:
        if procedure == "amc" and _given(args, "episodes"):
            raise ValueError(f"--episodes {args.episodes}: --quick runs {QUICK_EPISODES} episodes, so it would be "
                             "ignored: drop one or the other")
        if procedure == "lottery" and _given(args, "rounds") and args.rounds > QUICK_ROUNDS:
            raise ValueError(f"--rounds {args.rounds}: --quick runs at most {QUICK_ROUNDS} rounds, so it would be "
                             "ignored: drop one or the other")
    if not writes_out(args) and _given(args, "out"):
        raise ValueError(f"--out {args.out}: `prune {procedure}` writes no file on a task (it prints what it found; "
                         "on a --checkpoint it writes the pruned checkpoint there), so it would be ignored: drop it, "
                         "or give --checkpoint")


def _check_out_beside(args) -> None:
    """:func:`.channels.check_out_beside` of --checkpoint and --out (with
    --finetune-epochs, the best.pt given is refused too)."""
    channels.check_out_beside(args.checkpoint, args.out, getattr(args, "finetune_epochs", 0) > 0,
                              ("--checkpoint", "--out"))


def main(args) -> int:
    # (sensitivity writes its plot and scan alone, no checkpoint: its --out may be the run's own folder)
    if (getattr(args, "checkpoint", None) is not None and getattr(args, "out", None) is not None
            and args.procedure != "sensitivity"):
        _check_out_beside(args)
    if args.procedure != "vectors":
        given = _given(args, "square", "pairs", "panels")
        if given:
            raise ValueError(f"{', '.join(given)}: the block shapes of `prune vectors`; `prune {args.procedure}` "
                             "takes none of them")
    if args.procedure == "channels" and args.sparsity is not None:
        raise ValueError("--sparsity: prune channels keeps --ratio of every coupled channel group; it takes no "
                         "--sparsity (that is prune vectors', offsets' and the procedures')")
    if args.procedure == "voxels" and args.sparsity is not None:
        raise ValueError("--sparsity: prune voxels keeps --ratio of the voxels (VoxelSkip's and VoxelPrune's "
                         "keep_ratio); it takes no --sparsity (that is prune vectors', offsets' and the procedures')")
    check_args(args)
    check_read(args)
    if not writes_out(args):  # (no folder made, none locked: an empty ./prune-out was left)
        return _run(args)
    from .train import holding_out
    with holding_out(args.out):  # (as train holds its --out; --finetune-epochs trains in it under this lock)
        return _run(args)


def _run(args) -> int:
    if args.procedure == "channels":
        return channels.main(args)
    if args.procedure == "vectors":
        return channels.vectors_main(args)
    if args.procedure == "offsets":
        return channels.offsets_main(args)
    if args.procedure == "voxels":
        return channels.voxels_main(args)
    if args.sparsity is None:
        args.sparsity = 0.9
    torch.manual_seed(args.seed)
    task = _task(args)
    steps = max(20, task.train_steps // (5 if args.quick else 1))
    if args.procedure == "lottery" and args.rewind >= steps:  # (the library named its rewind_step, train_steps)
        raise ValueError(f"--rewind {args.rewind} must be < {steps}, the steps each lottery round trains on task "
                         f"{task.name}{' with --quick' if args.quick else ''}: the rewind point is one of them")
    if task.trained_model is None:
        model = task.make_model(args.seed)
    else:  # (a checkpoint: its trained model; make_model(seed) draws the fresh ones, the lottery's re-init control)
        model = task.trained_model()
        _check_unpruned(args, model)
        _check_below(args, model)
    if args.procedure == "amc":
        _check_flops(args, task, model)
    if args.procedure == "netadapt":
        args.latency_table = _check_latency(args, task, model)
    if writes_out(args):  # (after the refusals: a refused run makes no folder)
        make_directory(args.out)
    print(f"task {task.name}: {steps} training steps, metric {task.metric}")
    if task.trained_model is not None:
        print(f"start: the trained weights of {args.checkpoint}"
              + (", not a fresh initialisation" if args.procedure in ("init", "rigl", "lottery") else ""))
    if args.procedure not in ("init", "rigl", "lottery"):
        if task.trained_model is not None:  # (the baseline below is the checkpoint trained further: both said)
            print(f"the checkpoint's {task.metric} on the task's validation cloud: {task.eval_fn(model):.4f}")
        task.train_fn(model, steps)
        print(f"dense {task.metric} after {steps} training steps{' more' if task.trained_model else ''} (the "
              f"procedure's baseline): {task.eval_fn(model):.4f}")
    return RUN[args.procedure](args, task, model, steps) or 0


def _sensitivity(args, task, model, steps) -> None:
    from ..prune.adapters import prunable_layers

    ratios = (0.0, 0.3, 0.6, 0.9) if args.quick else DEFAULT_RATIOS
    layers = None
    if args.granularity == "channel":  # (the tasks' models end in their output layer: its channels are the classes)
        names = [name for name, _ in prunable_layers(model)]
        layers = names[:-1]
        print(f"the output layer {names[-1]!r} is left out: its output channels are the model's classes")
    res, chosen, plot = procedures.sensitivity(task, model, args.granularity, args.threshold, ratios,
                                               plot=args.out / "sensitivity.png", layers=layers)
    print(f"  {'layer':>6}: {task.metric} with that share of its "
          f"{'output channels' if args.granularity == 'channel' else 'weights'} pruned, at "
          + " ".join(f"{r:g}" for r in ratios))
    for name, vals in res.curves.items():
        print(f"  {name:>6}: " + " ".join(f"{v:.3f}" for v in vals))
    print(f"ratios under a drop of {args.threshold}: {chosen}")
    print(f"plot: {plot}")
    print(f"scan: {_write_scan(args.out / 'sensitivity.json', res, args.threshold, chosen)}")


def _write_scan(path, res, threshold: float, chosen: dict):
    """``path``: the scan as JSON (the metric, the baseline, the ratios, each
    layer's curve and weight count, the threshold and the ratios it chose),
    for a user's own tables and plots; a non-finite score is written as
    null (JSON has no NaN)."""
    def number(v):
        return float(v) if math.isfinite(v) else None

    record = {"metric": res.metric, "granularity": res.granularity, "baseline": number(res.baseline),
              "ratios": [float(r) for r in res.ratios],
              "curves": {name: [number(v) for v in vals] for name, vals in res.curves.items()},
              "sizes": dict(res.sizes), "threshold": float(threshold), "chosen": dict(chosen)}
    text = json.dumps(record, indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _schedule(args, task, model, steps) -> None:
    per_round = max(10, steps // 4)
    res = procedures.schedule(task, model, args.sparsity, args.schedule, args.rounds, per_round * args.rounds,
                              args.finetune_lr_factor, task.eval_fn)
    for row in res.history:
        print(f"  round {row['round']}: target {row['target']:.3f} sparsity {row['sparsity']:.3f} "
              f"{task.metric} {row['metric']:.4f}")
    _save_masked(args, model, f"the model of the {args.schedule} schedule to --sparsity {args.sparsity:g}, "
                              "fine-tuned")


def _lottery(args, task, model, steps) -> None:
    rounds = min(args.rounds, QUICK_ROUNDS) if args.quick else args.rounds
    res, ctrl = procedures.lottery(task, model, steps, rounds, args.prune_fraction, args.rewind, (rounds,), args.seed)
    for row in res.rounds:
        print(f"  round {row['round']}: sparsity {row['sparsity']:.3f} {task.metric} {row['metric']:.4f}")
    print(f"controls at the last round: random re-init {ctrl[rounds]['reinit']:.4f}, "
          f"random mask {ctrl[rounds]['random_mask']:.4f}")
    _save_masked(args, model, f"round {rounds}'s ticket as it trained: its mask, the weights rewound to step "
                              f"{args.rewind} and trained again")


def _init(args, task, model, steps) -> None:
    procedures.prune_at_init(task, model, args.method, args.sparsity, steps, iterations=20 if args.quick else 100)
    print(f"{args.method}: sparsity {adapters.sparsity(model):.3f}, per layer "
          + ", ".join(f"{n} {v:.2f}" for n, v in adapters.layer_sparsity(model).items()))
    print(f"trained {task.metric}: {task.eval_fn(model):.4f}")
    _save_masked(args, model, f"the model pruned by {args.method} after its training")


def _rigl(args, task, model, steps) -> None:
    state = procedures.rigl(task, model, args.sparsity, args.distribution, steps, max(5, steps // 20))
    score = f"{task.metric} {task.eval_fn(model):.4f}"
    if state.density() == 1.0:  # (its updates ran, yet none could move a connection)
        print(f"RigL ({args.distribution}): sparsity 0.000, every weight kept: no connection to drop or grow, {score}")
    else:
        print(f"RigL ({args.distribution}): {state.updates} drop/grow updates, sparsity "
              f"{adapters.sparsity(model):.3f}, {score}")
    if args.checkpoint is not None:  # (RigL zeroes the weights it drops: as masks, training on keeps them at zero)
        adapters.apply_masks(model, state.masks)
        _save_masked(args, model, "the trained model with RigL's final masks")


#: Why lottery and rigl take a dense model (their library refusal of a masked one says "pass an unpruned model").
_DENSE_ONLY = {"lottery": "a lottery ticket is pruned from the dense network round by round",
               "rigl": "RigL draws and moves its layers' masks itself"}


def _check_unpruned(args, model) -> None:
    """ValueError naming --checkpoint where lottery or rigl would start from
    its masked model (prune vectors', offsets'), as each refuses it: RigL
    any mask, the lottery one that prunes a weight."""
    if args.procedure not in _DENSE_ONLY:
        return
    masked = [name for name, m in model.named_modules() if "weight_orig" in m._parameters
              and (args.procedure == "rigl" or not bool(m.weight_mask.all()))]
    if masked:
        raise ValueError(f"--checkpoint {args.checkpoint}: its model is already pruned (masks on {len(masked)} "
                         f"layers, e.g. {masked[0]!r}); {_DENSE_ONLY[args.procedure]}: give the dense checkpoint it "
                         "was pruned from")


def _check_below(args, model) -> None:
    """ValueError naming --sparsity where schedule or init would prune a
    --checkpoint already sparser than it (prune vectors', offsets', a
    schedule's): masks never un-prune, so it would prune nothing (within the
    three decimals the procedures print)."""
    if args.procedure not in ("schedule", "init"):
        return
    now = adapters.sparsity(model)
    if now - args.sparsity > 5e-4:
        raise ValueError(f"--sparsity {args.sparsity:g}: the model of --checkpoint {args.checkpoint} is already "
                         f"{now:.3f} sparse, and prune {args.procedure} never restores a pruned weight: give "
                         f"--sparsity >= {now:.3f}, or the dense checkpoint it was pruned from")


def _check_flops(args, task, model) -> None:
    """ValueError naming --flops where it is below the FLOPs AMC's largest
    cut leaves (every producer at amc_search's default ``max_ratio``, which
    prune amc runs): before the dense training, as --flops rather than the
    library's target_flops."""
    from ..prune.amc import DEFAULT_MAX_RATIO as AMC_MAX_RATIO, _flops_floor, layer_infos
    floor = _flops_floor(layer_infos(model, task.example_input, coupled=args.checkpoint is not None), AMC_MAX_RATIO)
    if args.flops < floor:
        raise ValueError(f"--flops {args.flops}: AMC removes at most {AMC_MAX_RATIO} of each layer's output channels, "
                         f"which leaves {floor:.3f} of the dense FLOPs of task {task.name}'s model; give --flops >= "
                         f"{math.ceil(floor * 1000) / 1000:.3f}")


def _netadapt_widths(args) -> int | None:
    """The widths per layer in prune netadapt's latency table (None on a
    --checkpoint: every coupled group, latencies measured directly)."""
    return None if args.checkpoint is not None else (4 if args.quick else 8)


def _latency(args) -> float:
    """prune netadapt's budget: --latency, or where none was given the
    task's default (:data:`DEFAULT_LATENCY`; a --checkpoint's: the scene
    task's)."""
    if args.latency is not None:
        return args.latency
    return DEFAULT_LATENCY["scene" if args.checkpoint is not None or args.task == "scene" else "digits"]


def _latency_flag(args, task) -> str:
    """--latency as prune netadapt's messages name it: its value, and where
    none was given, that it is the task's default."""
    default = f" (task {task.name}'s default: none given)" if args.latency is None else ""
    return f"--latency {_latency(args):g}{default}"


def _check_latency(args, task, model):
    """prune netadapt's latency table (None on a --checkpoint), built before
    the dense training (the weights do not enter it), and a ValueError
    naming --latency where it is below the least estimate the table's
    narrowest widths leave: no search on that table could meet it."""
    candidates = _netadapt_widths(args)
    if candidates is None:
        return None
    table, _ = procedures.latency_table(model, task.example_input, candidates, 3 if args.quick else 7)
    initial = table.initial_latency()
    floor = table.least_latency() / initial if initial > 0 else 0.0
    if _latency(args) < floor:
        raise ValueError(f"{_latency_flag(args, task)}: NetAdapt's narrowest widths (about 1/{candidates} of each layer's "
                         f"output channels) leave at least {floor:.3f} of the initial latency of task {task.name}'s "
                         f"model, as timed on this machine; give --latency >= {math.ceil(floor * 1000) / 1000:.3f} "
                         "(the latency table is timed afresh each run)")
    return table


def _amc(args, task, model, steps) -> None:
    coupled = args.checkpoint is not None  # a real network: every coupled group
    x = task.example_input
    episodes = QUICK_EPISODES if args.quick else args.episodes
    warmup = 10 if args.quick else min(30, episodes // 4)  # (AMC's own share, 100 of 400: a short search learns too)
    res = procedures.amc(task, model, args.flops, episodes, warmup, args.reward, args.reconstruct and not coupled, x,
                         args.seed, coupled)
    print(f"best ratios {json.dumps({k: round(v, 3) for k, v in res.ratios.items()})}")
    learned = res.learned_episodes
    print(f"  {learned} of the {len(res.history)} episodes acted by the trained agent"
          + ("" if learned else " (none: these ratios are a random search's best, not AMC's)"))
    print(f"  {task.metric} before fine-tuning {res.metric:.4f}, FLOPs {res.flops / res.dense_flops:.3f} of dense")
    print(f"ratios written to {res.export(args.out / 'amc_ratios.json')}")
    if coupled:
        pruned = procedures.cut_channels(model, res.ratios, example_input=x)
    else:
        pruned = procedures.cut_channels(model, res.ratios, args.reconstruct, x)
    task.train_fn(pruned, steps // 2, lr=task.lr * args.finetune_lr_factor)
    print(f"  after {steps // 2} fine-tuning steps: {task.metric} {task.eval_fn(pruned):.4f}")
    _save_if_checkpoint(args, pruned)


#: prune netadapt's --latency where none is given, per task (a --checkpoint: as the scene task). A sparse conv's
#: time follows its kernel map more than its channels: on the scene task the narrowest widths of the latency table
#: keep 0.53-0.78 of the initial latency (six runs on an Intel Xeon, bench/RESULTS.md stop 61), so 0.6 was mostly
#: refused there.
DEFAULT_LATENCY = {"digits": 0.6, "scene": 0.85}

#: The start of the library's RuntimeWarning of a missed budget, which prune netadapt reports as its error instead.
_UNMET = "NetAdapt could not meet the latency budget"


def _netadapt(args, task, model, steps) -> int:
    """The search, what it reached and its files; 1, with the library's
    message after the flag on stderr, where it ended above --latency (what
    it reached is printed and written all the same)."""
    # A checkpoint's network: every coupled group, latencies measured directly (no table).
    table_path = args.out / "latency_table.json"
    with warnings.catch_warnings():  # (its words come as this command's error below, not as a warning too)
        warnings.filterwarnings("ignore", message=_UNMET, category=RuntimeWarning)
        res, table, _ = procedures.netadapt(task, model, task.example_input, _latency(args), max(5, steps // 20),
                                            steps // 2, _netadapt_widths(args), 3 if args.quick else 7, table_path,
                                            log=lambda s: print("  " + s), table=args.latency_table,
                                            max_iterations=QUICK_ITERATIONS if args.quick else 50)
    print(f"channels {res.channels}; latency estimate {res.initial_latency * 1e3:.2f} -> "
          f"{res.estimated_latency * 1e3:.2f} ms (budget {res.budget * 1e3:.2f}), measured again "
          f"{res.measured_latency * 1e3:.2f} ms; {task.metric} {res.final_metric:.4f}")
    if table is not None:  # (as amc and sensitivity name their files)
        print(f"latency table: {table_path}")
    written = _save_if_checkpoint(args, res.model)
    if not res.message:
        return 0
    what = (f"the model it reached is written all the same: {written}" if written is not None else
            f"the latency table is written all the same: {table_path}" if table is not None else "nothing is written")
    print(f"pointsparse prune: error: {_latency_flag(args, task)} not met: {res.message}; {what}", file=sys.stderr)
    return 1


def _save_if_checkpoint(args, model):
    """On a --checkpoint, write ``model`` as --out/checkpoint.pt, say so and
    return its path (None otherwise)."""
    if args.checkpoint is None:
        return None
    path = channels.save_pruned(args.checkpoint_state, model, args.out)
    print(f"pruned checkpoint: {path}")
    return path


def _save_masked(args, model, what: str) -> None:
    """On a --checkpoint, write ``model`` (its masks as ``weight_orig`` +
    ``weight_mask``) as --out/checkpoint.pt and say what it is, naming the
    layers a global threshold pruned whole (they give zeros)."""
    if args.checkpoint is None:
        return
    path = channels.save_pruned(args.checkpoint_state, model, args.out)
    layers = adapters.layer_sparsity(model)
    whole = [name for name, value in layers.items() if value == 1.0]
    note = "" if not whole else (f"; {len(whole)} of its {len(layers)} prunable layers pruned whole "
                                 f"({'it gives' if len(whole) == 1 else 'they give'} zeros): "
                                 + ", ".join(map(repr, whole)))
    print(f"pruned checkpoint {path}: sparsity {adapters.sparsity(model):.3f} of its prunable layers' weights, "
          f"{what}; masks stored as weight_orig / weight_mask (held at zero by train --resume){note}")


RUN = {"sensitivity": _sensitivity, "schedule": _schedule, "lottery": _lottery, "init": _init, "rigl": _rigl,
       "amc": _amc, "netadapt": _netadapt}
