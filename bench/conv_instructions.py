"""Instructions per call of the fused convolution kernels, counted by
valgrind's callgrind: a figure that repeats to the instruction on a machine
whose timings move by a quarter from one minute to the next (the 2-core
virtual machines this project runs on), for comparing two builds of the
kernels where a timing cannot tell 5% apart.

    python bench/conv_instructions.py [--channels 8 32 64] [--kinds dense offset vector] [--calls 2]
        [--out bench/results/conv_instructions.md] [--quick]

A submanifold ``Conv3d(C, C, 3)`` over the KITTI sweep (000049, 0.05 m; a
generated street of 20k voxels where the dataset is absent), unpruned and
pruned as ``bench/prune_exec.py`` prunes it (``offset``: 75% of the kernel
offsets, ``vector``: 75% of the engine's vectors, ``vector50``: 50%), run by the engine's
choice (dense, offset-skipping or vector-sparse kernels), one thread, the
widest build that runs under valgrind (which has no AVX-512: the AVX2
build on an AVX-512 CPU; the page names it). Each case runs in a child process under
``valgrind --tool=callgrind`` that loads the extension module alone (numpy,
no torch), builds the plan and calls ``ConvPlan.forward`` ``--calls`` times;
a child making no call gives the set-up's count, and the difference over
``--calls`` is one call's instructions (the binding's checks and the
kernels). Every child's output must equal the engine's own plan run in
the parent (same build, outside valgrind). A child takes some 10-30 s (no
torch to load under valgrind); the default run about 5 minutes. ``--quick``: C = 8 unpruned
on the generated street, one call (the options given kept), the page in a temporary folder."""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import (LOAD_CORE, callgrind_instructions, environment, kitti_or_street, page_arg, page_path,
                     positive_int, quick_defaults, write_markdown)
from prune_exec import variants

import pointsparse as ps
from pointsparse.nn import _engine

KINDS = {"dense": "unpruned", "offset": "offset 75%", "offset50": "offset 50%", "vector": "vector 75%",
         "vector50": "vector 50%", "twin": "twin 75%", "twin50": "twin 50%"}

# The child: the extension module by its path, the case from the .npz, the
# plan, `calls` forwards on one thread; the last output saved for the check.
CHILD = LOAD_CORE + r"""
data, name, calls, out_path = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
d = np.load(data)
plan = core.ConvPlan(d["in_idx"], d["out_idx"], d["ptr"], int(d["num_in"]), int(d["num_out"]), int(d["identity"]), 1)
# Every array read out of the .npz before the loop (each read of an .npz
# member unzips it again and checks its CRC: as many instructions as the
# kernels at C = 64).
feats, weight, active = d["feats"], d["weight_" + name], d["active_" + name]
active = active if active.size else None
vector = bool(d["vector_" + name])
out = np.empty((int(d["num_out"]), weight.shape[2]), dtype=np.float32)
for _ in range(calls):
    plan.forward(feats, weight, None, out, 1, None, False, active=active, vector=vector)
if calls:
    np.save(out_path, out)
with open(out_path + ".isa", "w") as f:  # the build that ran: valgrind runs no AVX-512, whatever the CPU has
    f.write(core.runnable_isas()[0])
"""


def case_data(channels: int, coords: torch.Tensor, kinds, folder: Path) -> tuple[Path, dict, int, dict]:
    """The .npz a child reads (map, feats, each variant's weight and the
    engine's choices for it: the forward's, and the input gradient's under
    ``input_``), the engine path of each variant (the input gradient's
    under the key ``("input", kind)``), the pairs, and
    each variant's output from the engine's own plan in this process (the
    same build), which every child's output must equal."""
    torch.manual_seed(0)
    x = ps.SparseTensor(torch.randn(len(coords), channels), coords)
    kmap = ps.kmap.get_kmap(x, 3)
    plan = _engine.get_plan(kmap)
    arrays = {"in_idx": kmap.in_idx.numpy(), "out_idx": kmap.out_idx.numpy(),
              "ptr": np.asarray(kmap.ptr, dtype=np.int64), "num_in": kmap.num_in, "num_out": kmap.num_out,
              "identity": -1 if plan.identity is None else plan.identity, "feats": x.feats.numpy()}
    wanted = {KINDS[k]: k for k in kinds}
    paths, outputs = {}, {}
    for name, _, _, conv in variants(channels, sorted({k.rstrip("0123456789") for k in kinds if k != "dense"})):
        if name not in wanted:
            continue
        weight = conv.weight.detach().contiguous()
        run = _engine.choose_execution(weight)
        kind = wanted[name]
        arrays[f"weight_{kind}"] = weight.numpy()
        arrays[f"active_{kind}"] = np.zeros(0, np.uint8) if run.active is None else run.active
        arrays[f"vector_{kind}"] = run.vector
        # The input gradient's choice, on the transposed weight, as the module makes it.
        run_in = _engine.choose_execution(weight, transpose=True)
        arrays[f"input_active_{kind}"] = np.zeros(0, np.uint8) if run_in.active is None else run_in.active
        arrays[f"input_vector_{kind}"] = run_in.vector
        paths[kind] = run.name
        paths["input", kind] = run_in.name
        outputs[kind] = np.empty((kmap.num_out, channels), dtype=np.float32)
        plan.core.forward(arrays["feats"], weight.numpy(), None, outputs[kind], 1, None, False, active=run.active,
                          vector=run.vector)
    path = folder / f"case_c{channels}.npz"
    np.savez(path, **arrays)
    return path, paths, int(kmap.sizes.sum()), outputs


def count(data: Path, kind: str, calls: int, folder: Path, want: np.ndarray) -> tuple[int, str]:
    """Instructions of a child that makes ``calls`` forwards of ``kind``
    (its output checked against ``want`` when it made any), and the build
    it ran (the widest that runs under valgrind, which has no AVX-512: on
    an AVX-512 CPU the AVX2 build)."""
    out_path = folder / f"out_{kind}.npy"
    instructions = callgrind_instructions(CHILD, [ps._core.__file__, data, kind, calls, out_path])
    if calls:
        got = np.load(out_path)
        if not np.array_equal(got, want):
            raise RuntimeError(f"{kind}: the child's output differs from this process's by "
                               f"{np.abs(got - want).max()}")
    return instructions, Path(str(out_path) + ".isa").read_text()


def measure(channels: list, kinds: list, calls: int, coords: torch.Tensor, where: str) -> str:
    builds = set()
    lines = ["| C | pruning | engine path | pairs | instructions per call | per pair |", "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for c in channels:
            data, paths, pairs, outputs = case_data(c, coords, kinds, folder)
            base, _ = count(data, kinds[0], 0, folder, outputs[kinds[0]])
            for kind in kinds:
                counted, build = count(data, kind, calls, folder, outputs[kind])
                builds.add(build)
                per_call = (counted - base) / calls
                lines.append(f"| {c} | {KINDS[kind]} | {paths[kind]} | {pairs:,} | {per_call / 1e6:.2f} M | "
                             f"{per_call / pairs:.1f} |")
                print(lines[-1], flush=True)
    head = (f"{where}; one thread, build {', '.join(sorted(builds))} under valgrind (this CPU's widest: "
            f"{ps._core.runnable_isas()[0]}); instructions per call = (child with {calls} calls - child with none) "
            f"/ {calls}.")
    return "\n".join([head, ""] + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=None, help="default 8 32 64 (--quick: 8)")
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=None,
                        help="default dense offset vector (--quick: dense)")
    parser.add_argument("--calls", type=positive_int, default=None, help="default 2 (--quick: 1)")
    parser.add_argument("--out", type=page_arg, default=None, help="default bench/results/conv_instructions.md")
    parser.add_argument("--quick", action="store_true",
                        help="C = 8 unpruned on a 20k generated street, one call (the options given kept)")
    args = parser.parse_args()
    quick_defaults(args, channels=([8, 32, 64], [8]), kinds=(["dense", "offset", "vector"], ["dense"]), calls=(2, 1))
    if shutil.which("valgrind") is None:
        print("conv_instructions: valgrind is not installed here; nothing counted")
        return
    coords, where = kitti_or_street(args.quick)
    where = f"{where} ({len(coords):,} voxels)"
    torch.set_num_threads(1)
    table = measure(args.channels, list(args.kinds), args.calls, coords, where)
    command = "python bench/conv_instructions.py " + shlex.join(sys.argv[1:])
    out = page_path(args.out, "conv_instructions.md", args.quick)
    write_markdown(out, "Instructions per call of the fused conv kernels (callgrind)", command.strip(),
                   environment(), [table])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
