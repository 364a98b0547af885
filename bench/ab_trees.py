"""Two or more checkouts of the package timed on the north star's whole
inference (or an SPVCNN's: ``--model spvcnn``), in lockstep: each tree runs in a child process of its own (its
``pointsparse`` imported from that tree, its module built there), and the
parent asks the children in turn for one run at a time, alternating their
order every round, so that a slow phase of these virtual machines falls on
every tree alike (separate runs of one tree move by 15% here within
minutes). The parent waits 50 ms before each request, so that the idle
OpenMP threads of the child that ran last have stopped spinning.

    python bench/ab_trees.py OLD_TREE NEW_TREE [...] [--rounds 11] [--threads 2] [--setup INDEX CODE]
        [--out PAGE.md] [--quick]

The workload is bench/north_star.py's "keep 0.25 + fuse + vectors 75%"
MinkUNet (``--model pairs-bf16``: "keep 0.25 + fuse + pair vectors 75% + bf16") (built by this tree's bench code against each tree's package) on
KITTI raw 000049 at 0.05 m: end to end from the points (voxelize, every map
and plan, the network) and the network alone (maps cached). Every tree's
logits must equal the first tree's bit for bit before any timing (the page
says so, or gives the largest difference). ``--model spvcnn``: an unpruned
SPVCNN (cr 0.5, 19 classes, eval mode, seeded alike in every tree) from the
sweep's points to per-point logits (end to end: voxelize and the model's
inputs made each run). ``--setup I 'SPATIAL = True'``
adds VoxelPrune(0.5) before that child's three coarse decoder stages (as
north_star.py's VoxelPrune rows). A tree of an earlier commit:
``git worktree add /tmp/old <commit>`` and its module built there (see
bench/ab_builds.py). ``--quick``: this tree against itself on a generated
street of 20k voxels, one round unless ``--rounds`` is given, the page in a
temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import environment, kitti_path, page_arg, page_path, positive_int, quick_defaults, write_markdown

BENCH = Path(__file__).resolve().parent

# The child: the tree's package first on the path, this tree's bench code
# after it; the model built once; then one run per line read ("e2e" or
# "net"), its seconds printed; "save PATH" writes the logits.
CHILD = r"""
import sys, time
tree, bench, threads, quick, setup = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
which = sys.argv[6]
sys.path.insert(0, tree)
sys.path.insert(1, bench)
import numpy as np
import torch
torch.set_num_threads(threads)
import pointsparse as ps
assert ps.__file__.startswith(tree), (ps.__file__, tree)
exec(setup)
import _common
from north_star import inputs, vector_sparse
from prune_speed import _variants
if quick or _common.kitti_path() is None:
    coords = _common.street_scene(20000)
    xyz = coords[:, 1:].float() * 0.05
    feats = torch.cat([xyz / 50.0, torch.rand(len(xyz), 1, generator=torch.Generator().manual_seed(0))], 1)
else:
    xyz, feats = inputs(np.fromfile(str(_common.kitti_path()), dtype=np.float32).reshape(-1, 4))
if which == "spvcnn":  # --model spvcnn: SPVCNN(cr 0.5, 19 classes) in eval mode, seeded: the same weights in every tree
    from pointsparse.data import Batch, Sample
    from pointsparse.data.transforms import voxelize_sample
    cloud = np.ascontiguousarray(xyz.numpy(), dtype=np.float32)

    def point_inputs():
        b = Batch.of([voxelize_sample(Sample(cloud, None), 0.05, 255)])
        return b.input, b.inverse, b.points, b.point_batch

    cached = point_inputs()
    torch.manual_seed(0)
    spv = ps.models.SPVCNN(cached[0].num_channels, 19, cr=0.5).eval()
    with torch.no_grad():
        spv(*cached)
        print("ready", flush=True)
        for line in sys.stdin:
            what = line.split()
            if what[0] == "save":
                np.save(what[1], spv(*point_inputs()).numpy())
                print("saved", flush=True)
                continue
            t0 = time.perf_counter()
            spv(*(point_inputs() if what[0] == "e2e" else cached))
            print(time.perf_counter() - t0, flush=True)
    sys.exit(0)
base, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
x = ps.SparseTensor(base.feats, base.coords)
nets, _ = _variants(x, [(0.25, 8)])
if which == "pairs-bf16":
    dtype = torch.bfloat16
    model = vector_sparse(ps.nn.fuse_for_inference(nets["keep 0.25 (x8)"]), globals().get("AMOUNT", 0.75),
                          rows=2).to(dtype)
else:
    dtype = torch.float32
    model = vector_sparse(ps.nn.fuse_for_inference(nets["keep 0.25 (x8)"]), 0.75)
if globals().get("SPATIAL"):  # --setup I 'SPATIAL = True': VoxelPrune(0.5) before the 3 coarse decoder stages
    from voxel_prune import add_voxel_prune
    add_voxel_prune(model, 0.5, (0, 1, 2))
x = ps.SparseTensor(base.feats.to(dtype), base.coords)
if globals().get("EXPORT"):  # --setup I 'EXPORT = True': the model as an exported program (north_star.Program)
    from north_star import Program
    model = Program(model, x)
with torch.no_grad():
    model(x)
    print("ready", flush=True)
    for line in sys.stdin:
        what = line.split()
        if what[0] == "save":
            v, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
            np.save(what[1], model(ps.SparseTensor(v.feats.to(dtype), v.coords)).feats.float().numpy())
            print("saved", flush=True)
            continue
        t0 = time.perf_counter()
        if what[0] == "e2e":
            v, _ = ps.voxelize(xyz, feats, voxel_size=0.05)
            model(ps.SparseTensor(v.feats.to(dtype), v.coords))
        else:
            model(x)
        print(time.perf_counter() - t0, flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="checkouts with their module built (the first is the baseline)")
    parser.add_argument("--rounds", type=positive_int, default=None, help="default 11 (--quick: 1)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=page_arg, default=None)
    parser.add_argument("--setup", nargs=2, action="append", default=[], metavar=("INDEX", "CODE"),
                        help="Python run in tree INDEX's child after `import pointsparse as ps`, e.g. "
                             "1 'ps.reuse_freed_memory(True)' (a tree may be given twice); 1 'EXPORT = True' "
                             "times that child's model as an exported .pt2 program (north_star.Program); with --model "
                             "pairs-bf16, 1 'AMOUNT = 0.5' prunes that child's pair vectors by 0.5 instead of 0.75")
    parser.add_argument("--model", choices=("vectors", "pairs-bf16", "spvcnn"), default="vectors",
                        help="vectors: the float32 keep 0.25 + fuse + vectors 75%% model (default); pairs-bf16: "
                             "its 16 x 2 vector blocks in bfloat16 (the bf16 kernels; needs AVX512-BF16 to run "
                             "them, and trees whose prune.panel_structured takes rows); spvcnn: an unpruned "
                             "SPVCNN (cr 0.5, 19 classes, eval mode, seeded) from the points to per-point logits "
                             "(--setup code runs; its SPATIAL and EXPORT are not read)")
    parser.add_argument("--quick", action="store_true",
                        help="this tree against itself on a generated street, 1 round unless --rounds is given")
    args = parser.parse_args()
    quick_defaults(args, rounds=(11, 1))
    root = str(BENCH.parent)
    trees = [str(Path(t).resolve()) for t in args.trees] or [root, root]
    if args.quick:
        trees = [root, root]
    if len(trees) < 2:
        parser.error("give two or more trees")
    for t in trees:
        if not any((Path(t) / "pointsparse").glob("_core*.so")):
            parser.error(f"{t}: no built module in pointsparse/ (build it there first)")
    quick = args.quick or kitti_path() is None
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), POINTSPARSE_NUM_THREADS=str(args.threads))
    env.pop("PYTHONPATH", None)
    setups = {}
    for index, code in args.setup:
        if not index.isdigit():
            parser.error(f"--setup {index!r}: INDEX is a tree's index (0 for the first tree), not {index!r}")
        if int(index) >= len(trees):
            parser.error(f"--setup {index}: there is no tree {index}; the run has trees 0 to {len(trees) - 1}"
                         + (" (--quick runs this tree against itself)" if args.quick else ""))
        setups[int(index)] = code
    kids = [subprocess.Popen([sys.executable, "-c", CHILD, t, str(BENCH), str(args.threads), "1" if quick else "0",
                              setups.get(i, ""), args.model], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                             cwd=t)
            for i, t in enumerate(trees)]

    def ask(i: int, line: str) -> str:
        time.sleep(0.05)  # the other child's idle OpenMP threads stop spinning first
        kids[i].stdin.write(line + "\n")
        kids[i].stdin.flush()
        return kids[i].stdout.readline().strip()

    try:
        for i, k in enumerate(kids):
            if k.stdout.readline().strip() != "ready":
                raise SystemExit(f"ab_trees: the child of {trees[i]} failed")
        with tempfile.TemporaryDirectory() as tmp:
            outs = []
            for i in range(len(kids)):
                ask(i, f"save {tmp}/{i}.npy")
                outs.append(np.load(f"{tmp}/{i}.npy"))
        same = [bool(np.array_equal(outs[0], o)) for o in outs]
        diffs = [float(np.abs(outs[0] - o).max()) if o.shape == outs[0].shape else float("inf") for o in outs]
        times = {(i, w): [] for i in range(len(kids)) for w in ("e2e", "net")}
        for r in range(args.rounds):
            order = list(range(len(kids)))
            if r % 2:
                order.reverse()
            for w in ("e2e", "net"):
                for i in order:
                    times[(i, w)].append(float(ask(i, w)))
    finally:
        for k in kids:
            k.stdin.close()
            k.wait()
    med = {key: float(np.median(v)) for key, v in times.items()}
    name = {"pairs-bf16": "North star model (keep 0.25 + fuse + pair vectors 75% + bf16)",
            "spvcnn": "SPVCNN (cr 0.5, unpruned, float32)"}.get(args.model,
                                                                "North star model (keep 0.25 + fuse + vectors 75%)")
    lines = [f"### {name}, {'a generated street' if quick else 'KITTI raw 000049 at 0.05 m'}, "
             f"{args.threads} threads, medians of {args.rounds} lockstep rounds", "",
             "| tree | logits vs the first | end to end ms | ratio | network alone ms | ratio |",
             "|---|---|---|---|---|---|"]
    for i, t in enumerate(trees):
        if i in setups:
            t = f"{t} + `{setups[i]}`"
        same_text = "equal" if same[i] else f"max diff {diffs[i]:.2e}"
        lines.append(f"| {t} | {same_text} | {1e3 * med[(i, 'e2e')]:.1f} | {med[(0, 'e2e')] / med[(i, 'e2e')]:.2f}x | "
                     f"{1e3 * med[(i, 'net')]:.1f} | {med[(0, 'net')] / med[(i, 'net')]:.2f}x |")
    path = page_path(args.out, "ab_trees.md", args.quick)
    write_markdown(path, "Checkouts in lockstep on the north star's inference",
                   "python bench/ab_trees.py " + shlex.join(sys.argv[1:]), environment(), ["\n".join(lines)],
                   "Ratios: the first tree's median over each tree's (above 1: faster than the first).")
    print(path.read_text())


if __name__ == "__main__":
    main()
