"""Where a MinkUNet's time goes, op by op (issue 14, item 5): voxelize,
building the input tensor, kernel maps, plans, each conv kind, BatchNorm,
ReLU, concatenation, residual adds, classifier, loss and optimizer, for
inference (``model.eval()`` and ``nn.fuse_for_inference``) and a training
step (forward and backward).

    flock /work/cpu.lock .venv/bin/python bench/profile_minkunet.py [--cr 1.0] [--rounds 3] [--out PAGE.md] [--quick]

Forward times are exclusive wall times taken by wrapping each module's
forward and the engine's map and plan builders (a conv's time excludes the
map and plan it builds; maps are built inside the first conv that needs
them, as in a user's loop). Backward: the conv's autograd backward is wrapped
likewise (its kind known from the forward that made it); the other autograd
nodes come from ``torch.profiler`` (their CPU time), and the rest of the
backward's wall time is the autograd engine's own work. Medians over rounds;
one cloud per call, maps built anew every call. Writes
bench/results/profile_minkunet.md (or ``--out``; ``--quick``: a 20k generated street, one
round after the warm-up, the page in a temporary folder). ``--north-star``:
a column more, the inference of bench/north_star.py's fastest model (keep
0.25 + fuse + pair vectors 75% + bf16), page profile_minkunet_north_star.md.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time
from collections import defaultdict

import numpy as np
import torch

from _common import environment, page_arg, page_path, positive_int, real_sweeps, street_points, write_markdown

import pointsparse as ps  # noqa: E402  (after _common puts the repo on the path)
from pointsparse import _ext  # noqa: E402
from pointsparse import kmap as _kmap  # noqa: E402
from pointsparse import nn as spnn  # noqa: E402
from pointsparse.models import MinkUNet  # noqa: E402
from pointsparse.nn import _engine  # noqa: E402

VOXEL = 0.05
CLASSES = 19


class Timer:
    """Exclusive wall time per label: a wrapped call's time less the time of
    the wrapped calls inside it."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[float] = []

    def wrap(self, label, fn):
        """``label``: a string, or a function of the call's arguments giving one."""
        def timed(*args, **kwargs):
            self._stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t0
                inner = self._stack.pop()
                name = label(*args) if callable(label) else label
                self.total[name] += spent - inner
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1] += spent
        return timed


def conv_label(conv: spnn.Conv3d) -> str:
    k, t = conv.kernel_size[0], conv.stride[0]
    if conv.transposed:
        return f"conv transposed k={k} s={t}"
    return f"conv strided k={k} s={t}" if t > 1 else f"conv submanifold k={k}"


MODULE_LABELS = ((spnn.BatchNorm, "BatchNorm"), (spnn.ReLU, "ReLU"), (spnn.Linear, "classifier (Linear)"))


@contextlib.contextmanager
def instrumented(model: torch.nn.Module, forward: Timer, backward: Timer):
    """Wraps the model's modules, the map and plan builders, cat and add,
    and the conv's autograd backward, for the duration of the block."""
    conv_of_node: dict[int, str] = {}
    saved = []

    def patch(owner, name, new):
        saved.append((owner, name, owner.__dict__.get(name)))
        setattr(owner, name, new)

    for m in model.modules():
        if isinstance(m, spnn.Conv3d):
            patch(m, "forward", forward.wrap(conv_label(m), labelled_conv(m.forward, conv_label(m), conv_of_node)))
        for cls, label in MODULE_LABELS:
            if isinstance(m, cls):
                patch(m, "forward", forward.wrap(label, m.forward))
    patch(_kmap, "get_kmap", forward.wrap("kernel maps", _kmap.get_kmap))
    # The convs (nn.functional) call _get_kmap, not get_kmap: without this
    # their maps went into the conv rows.
    patch(_kmap, "_get_kmap", forward.wrap("kernel maps", _kmap._get_kmap))
    patch(_engine, "make_fused_plan", forward.wrap("plans", _engine.make_fused_plan))
    patch(_engine, "transposed_plan", forward.wrap("plans", _engine.transposed_plan))
    patch(spnn, "cat", forward.wrap("concatenation", spnn.cat))
    patch(spnn, "add", forward.wrap("residual add", spnn.add))
    conv_backward = _engine.ConvFunction.__dict__["backward"].__func__
    patch(_engine.ConvFunction, "backward", staticmethod(backward.wrap(
        lambda ctx, grad: conv_of_node.get(id(ctx), "conv (other)"), conv_backward)))
    try:
        yield
    finally:
        for owner, name, old in reversed(saved):
            if old is None:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


def labelled_conv(forward, label: str, conv_of_node: dict):
    """The conv's forward, noting which conv made each autograd node."""
    def run(x, **kwargs):  # add=: a fused residual block's shortcut
        out = forward(x, **kwargs)
        if out.feats.grad_fn is not None:
            conv_of_node[id(out.feats.grad_fn)] = label
        return out
    return run


def node_group(name: str) -> str | None:
    """The table row of an autograd node (None: the conv, timed by its wrapper)."""
    groups = (("ConvFunction", None), ("BatchNorm", "BatchNorm"), ("Relu", "ReLU"), ("Threshold", "ReLU"),
              ("Cat", "concatenation"), ("AddBackward", "residual add"), ("Addmm", "classifier (Linear)"),
              ("NllLoss", "loss"), ("LogSoftmax", "loss"), ("AccumulateGrad", "accumulate grads"))
    for key, group in groups:
        if key in name:
            return group
    return "other autograd nodes"


def profiled_nodes(prof, backward: Timer) -> None:
    """Adds the CPU time of every autograd node but the conv's to ``backward``."""
    prefix = "autograd::engine::evaluate_function: "
    for event in prof.events():
        if event.name.startswith(prefix):
            group = node_group(event.name[len(prefix):])
            if group is not None:
                backward.total[group] += event.cpu_time_total / 1e6
                backward.calls[group] += 1


def rest(timer: Timer, wall: float, label: str) -> None:
    """The wall time no wrapped call accounts for."""
    timer.total[label] += wall - sum(timer.total.values())


def inference(model, points: torch.Tensor, feats: torch.Tensor, dtype: torch.dtype = torch.float32) -> Timer:
    timer = Timer()
    model.eval()
    t0 = time.perf_counter()
    with instrumented(model, timer, Timer()), torch.no_grad():
        x, _ = timer.wrap("voxelize", ps.voxelize)(points, feats, voxel_size=VOXEL)
        model(x if dtype == torch.float32 else x.with_feats(x.feats.to(dtype)))
    rest(timer, time.perf_counter() - t0, "rest (Python, glue)")
    return timer


def training_step(model, optimizer, points, feats, labels) -> tuple[Timer, Timer]:
    fwd, bwd = Timer(), Timer()
    model.train()
    optimizer.zero_grad()
    with instrumented(model, fwd, bwd):
        t0 = time.perf_counter()
        x, inverse = fwd.wrap("voxelize", ps.voxelize)(points, feats, voxel_size=VOXEL)
        logits = model(x).feats
        loss = fwd.wrap("loss", torch.nn.functional.cross_entropy)(logits, labels[:len(logits)])
        rest(fwd, time.perf_counter() - t0, "rest (Python, glue)")
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            loss.backward()
        wall = time.perf_counter() - t0
    profiled_nodes(prof, bwd)
    rest(bwd, wall, "rest (autograd engine)")
    t0 = time.perf_counter()
    optimizer.step()
    bwd.total["optimizer step (SGD)"] += time.perf_counter() - t0
    return fwd, bwd


ROWS = ("voxelize", "kernel maps", "plans", "conv submanifold k=3", "conv submanifold k=1",
        "conv strided k=2 s=2", "conv transposed k=2 s=2", "BatchNorm", "ReLU", "concatenation", "residual add",
        "classifier (Linear)", "loss", "accumulate grads", "other autograd nodes", "optimizer step (SGD)",
        "rest (Python, glue)", "rest (autograd engine)")


def table(columns: dict[str, list[Timer]]) -> str:
    """Medians over rounds of each row in each column, ms, with the share of the column's total."""
    names = list(columns)
    lines = ["| op | " + " | ".join(f"{n} ms (share)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    totals = {n: statistics.median(sum(t.total.values()) for t in runs) for n, runs in columns.items()}
    for row in ROWS:
        cells = []
        for n, runs in columns.items():
            values = [t.total[row] for t in runs if row in t.total]
            cells.append("-" if not values else
                         f"{statistics.median(values) * 1e3:.1f} ({100 * statistics.median(values) / totals[n]:.0f}%)")
        if any(c != "-" for c in cells):
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{totals[n] * 1e3:.0f}**" for n in names) + " |")
    return "\n".join(lines)


def cloud(quick: bool = False) -> tuple[str, np.ndarray]:
    sweeps = {} if quick else real_sweeps()
    if "kitti-raw/000049" in sweeps:
        return "kitti-raw/000049", sweeps["kitti-raw/000049"]
    size = 20_000 if quick else 100_000
    return f"generated street ({size // 1000}k voxels)", street_points(size)


NORTH_STAR = "north star model, inference"


def north_star_model(points: torch.Tensor, feats: torch.Tensor) -> torch.nn.Module:
    """bench/north_star.py's ``keep 0.25 + fuse + pair vectors 75% + bf16``
    row: MinkUNet(4, 19) with every coupled channel group cut to 0.25 (x8),
    fused, 75% of the bf16 vectors (16 x 2 blocks) pruned and made permanent,
    in bfloat16."""
    from north_star import vector_sparse  # noqa: PLC0415 - bench modules, imported only for this column
    from prune_speed import _variants  # noqa: PLC0415

    x, _ = ps.voxelize(points, feats, voxel_size=VOXEL)
    nets, _ = _variants(x, [(0.25, 8)])
    return vector_sparse(spnn.fuse_for_inference(nets["keep 0.25 (x8)"]), 0.75, rows=2).to(torch.bfloat16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cr", type=float, default=1.0)
    p.add_argument("--rounds", type=positive_int, default=None, help="rounds after the warm-up (default 3, --quick 1)")
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke run: a 20k generated street, one round")
    p.add_argument("--north-star", action="store_true",
                   help=f"a column more: '{NORTH_STAR}' (bench/north_star.py's keep 0.25 + fuse + pair vectors "
                        "75%% + bf16 model); the page is profile_minkunet_north_star.md")
    p.add_argument("--out", type=page_arg, default=None,
                   help="the page (default bench/results/profile_minkunet.md, or profile_minkunet_north_star.md)")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    name, pts = cloud(args.quick)
    points = torch.from_numpy(np.ascontiguousarray(pts))
    feats = torch.cat([points - points.mean(0), torch.ones(len(points), 1)], 1)
    torch.manual_seed(0)
    model = MinkUNet(4, CLASSES, cr=args.cr)
    fused = spnn.fuse_for_inference(model)
    star = north_star_model(points, feats) if args.north_star else None
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    labels = torch.randint(0, CLASSES, (len(points),), generator=torch.Generator().manual_seed(1))
    columns = defaultdict(list)
    for r in range(rounds + 1):  # the first round warms up
        runs = {"inference eval()": inference(model, points, feats),
                "inference fused": inference(fused, points, feats)}
        if star is not None:
            runs[NORTH_STAR] = inference(star, points, feats, torch.bfloat16)
        runs["training forward"], runs["training backward + step"] = training_step(model, optimizer, points, feats,
                                                                                   labels)
        if r:
            for k, v in runs.items():
                columns[k].append(v)
        print(f"round {r}: " + ", ".join(f"{k} {sum(v.total.values()):.2f} s" for k, v in runs.items()), flush=True)
    text = table(columns)
    print(text)
    title = f"MinkUNet cr={args.cr} per-op profile ({name} @ {VOXEL} m, {args.threads} threads)"
    args_given = sys.argv[1:] if argv is None else argv
    command = "flock /work/cpu.lock .venv/bin/python bench/profile_minkunet.py " + shlex.join(args_given)
    output = page_path(args.out, "profile_minkunet_north_star.md" if args.north_star else "profile_minkunet.md",
                       args.quick)
    write_markdown(output, title, command, environment() | {"isa": _ext.core.conv_isa()}, [text])
    print(f"written {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
