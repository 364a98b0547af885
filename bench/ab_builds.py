"""Two or more builds of the extension module timed on the same conv, in
lockstep: each build runs in a child process of its own (the module loaded
by its path with numpy alone: pybind11 refuses a second module that
registers the same types in one process), and the parent asks the children
in turn for one call at a time, alternating their order every round, so that
a slow phase of these virtual machines falls on every build alike. Every
child is pinned to the same CPU (``--cpu``), so that no build runs on
another core than the others. Processes still differ on their own: on an
Intel Xeon two builds that ran alike when timed A, B, A (1.000) gave the
second 1.09-1.10x the first's time on the dense and offset kernels at C =
128 when timed A, B (bench/RESULTS.md stop 43). For a difference of a few
percent pass the first build again last (``OLD.so NEW.so OLD.so``): the
two copies' ratio is the spread between processes in that run.

    python bench/ab_builds.py OLD.so NEW.so [...] [--channels 64] [--kinds dense offset vector]
        [--passes forward input weight] [--rounds 15] [--cpu 1] [--threads 1] [--isa avx2] [--out PAGE.md]
        [--dtype bfloat16] [--bias] [--no-check] [--quick]

``--quick``: this tree's module against itself, C = 8 unpruned on a
generated street of 20k voxels, forward, one round, the page in a
temporary folder.

A build of an earlier commit: ``git worktree add /tmp/old <commit>``, then in
it ``make build`` (it builds that tree's wheel and takes the module out into
that tree's ``pointsparse/``). The conv is ``bench/conv_instructions.py``'s:
a submanifold ``Conv3d(C, C, 3)`` on the KITTI sweep (000049, 0.05 m; a
generated street of 20k voxels where the dataset is absent), unpruned and
pruned (``offset``: 75% of the kernel offsets, ``offset50``: 50%, ``vector``:
75% of the engine's vectors, ``vector50``: 50%; ``twin`` / ``twin50``: vectors of two panels, 75% / 50%), run as this tree's engine
chooses for the forward, by the kernels of the build the CPU runs best or
of ``--isa`` (one that runs here: ``_core.runnable_isas()``).
Passes: ``forward``, ``input`` (the input gradient, with the kernels the
engine chooses for it on the transposed weight, as the module does), ``weight`` (the weight gradient; pruning only skips
offsets there). Every build's outputs must equal the first
build's bit for bit (forward: this tree's engine's too) before any timing.
``--dtype bfloat16`` (forward only, a CPU with AVX512-BF16): the same
feats and weights rounded to bfloat16, through the bf16 kernels
(``ConvPlan.forward_bf16``, the sums rounded into bf16 output as
inference does, the vector threshold ``nn._engine`` gives), the path each
took named. ``--bias``: the convs add a bias (a fused model's convs
do), the same seeded one in every build. ``--no-check``: no build's output is compared
(for attribution builds that skip or redirect part of the work on purpose,
such as ``results/sparse_c64_attribution_xeon_stop61.patch``; the page says
the outputs were not checked). One thread (``--threads``: more); medians over the rounds; the
ratios are each build's time over the first build's in the same rounds."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from _common import environment, kitti_or_street, page_arg, positive_int, results_path, write_markdown
from conv_instructions import KINDS, case_data

# The child: the module by its path, the case from the .npz, then one call
# per line read ("pass kind"), its time printed and its result saved.
CHILD = r"""
import importlib.util, os, sys, time
import numpy as np
cpus = [int(c) for c in sys.argv[4].split(",")]
os.sched_setaffinity(0, set(cpus))
isa = None if sys.argv[5] == "auto" else sys.argv[5]
nt = len(cpus)
spec = importlib.util.spec_from_file_location("_core", sys.argv[1])
core = importlib.util.module_from_spec(spec)
spec.loader.exec_module(core)
d = np.load(sys.argv[2])


def aligned(a):  # a copy at a 64-byte boundary, as torch allocates (numpy's large arrays sit 16 bytes past one)
    buf = np.empty(a.nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


arr = {k: aligned(d[k]) for k in d.files}
plan = core.ConvPlan(arr["in_idx"], arr["out_idx"], arr["ptr"], int(arr["num_in"]), int(arr["num_out"]),
                     int(arr["identity"]), nt)
feats = arr["feats"]
out = aligned(np.empty((int(arr["num_out"]), feats.shape[1]), np.float32))
grad = aligned(np.random.default_rng(0).standard_normal(out.shape).astype(np.float32))
grad_w = aligned(np.empty((int(arr["ptr"].shape[0]) - 1, feats.shape[1], out.shape[1]), np.float32))
grad_f = aligned(np.empty_like(feats))
out16 = aligned(np.empty(out.shape, np.int16))
bias = arr["bias"] if "bias" in arr else None
for line in sys.stdin:
    which, kind = line.split()
    choice = "input_" if which == "input" else ""  # the input gradient's own choice, on the transposed weight
    active = arr[choice + "active_" + kind]
    active = active if active.size else None
    w, vector = arr["weight_" + kind], bool(arr[choice + "vector_" + kind])
    t = time.perf_counter()
    if which == "forward" and "bf16_feats" in arr:
        plan.forward_bf16(arr["bf16_feats"], arr["bf16_weight_" + kind], bias, out, nt, False, out_bf16=out16,
                          vector_density=float(arr["vector_density"]))
        res = out16
    elif which == "forward":
        plan.forward(feats, w, bias, out, nt, isa, False, active=active, vector=vector)
        res = out
    elif which == "input":
        plan.backward_input(grad, w, grad_f, nt, isa, active=active, vector=vector)
        res = grad_f
    else:
        plan.backward_weight(feats, grad, grad_w, nt, isa, active=active)
        res = grad_w
    t = time.perf_counter() - t
    np.save(sys.argv[3] + which + "_" + kind + ".npy", res)
    print(t, flush=True)
"""


def ps_isas() -> list[str]:
    """The kernel builds this CPU runs (this tree's module)."""
    import pointsparse as ps

    return list(ps._core.runnable_isas())


def ps_core():
    import pointsparse as ps

    return ps._core


def case_plan(arrays: dict):
    """This tree's plan of the case's map (one thread)."""
    return ps_core().ConvPlan(arrays["in_idx"], arrays["out_idx"], arrays["ptr"], int(arrays["num_in"]),
                              int(arrays["num_out"]), int(arrays["identity"]), 1)


def with_bias(data: Path, kinds: list) -> dict:
    """Adds a seeded bias to the case's .npz; returns each variant's float32
    output with it from this tree's build."""
    arrays = dict(np.load(data))
    plan = case_plan(arrays)
    cols = arrays["feats"].shape[1]
    arrays["bias"] = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    outputs = {}
    for kind in kinds:
        active = arrays["active_" + kind]
        outputs[kind] = np.empty((int(arrays["num_out"]), cols), np.float32)
        plan.forward(arrays["feats"], arrays["weight_" + kind], arrays["bias"], outputs[kind], 1, None, False,
                     active=active if active.size else None, vector=bool(arrays["vector_" + kind]))
    np.savez(data, **arrays)
    return outputs


def bf16_case(data: Path, kinds: list) -> tuple[dict, dict]:
    """Adds to the case's .npz the feats and each variant's weight rounded to
    bfloat16 (their bits) and the bf16 vector threshold; returns the path
    the bf16 kernels of this tree take for each and its bf16 output (bits)."""
    from pointsparse.nn import _engine

    arrays = dict(np.load(data))
    plan = case_plan(arrays)
    bits = lambda a: torch.from_numpy(a).bfloat16().view(torch.int16).numpy()  # noqa: E731
    arrays["bf16_feats"] = bits(arrays["feats"])
    cols = arrays["feats"].shape[1]
    arrays["vector_density"] = np.float64(_engine.bf16_vector_threshold(cols))
    paths, outputs = {}, {}
    for kind in kinds:
        arrays["bf16_weight_" + kind] = bits(arrays["weight_" + kind])
        out = np.empty((int(arrays["num_out"]), cols), np.float32)
        outputs[kind] = np.empty(out.shape, np.int16)
        paths[kind] = "bf16 " + plan.forward_bf16(arrays["bf16_feats"], arrays["bf16_weight_" + kind],
                                                  arrays.get("bias"), out, 1,
                                                  False, out_bf16=outputs[kind],
                                                  vector_density=float(arrays["vector_density"]))
    np.savez(data, **arrays)
    return paths, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="*", help="paths of extension modules (_core*.so); the first is the baseline")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=["dense", "vector"])
    parser.add_argument("--passes", nargs="+", choices=["forward", "input", "weight"], default=["forward"])
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)),
                        help="the CPU every child runs on (default: the last this process may use)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="threads a call (default 1, pinned to --cpu; 2 or more: pinned to that many of the "
                             "CPUs this process may use, --cpu ignored)")
    parser.add_argument("--isa", default="auto", choices=("auto", "avx512", "avx2", "generic"),
                        help="the kernels' build (default: the best this CPU runs)")
    parser.add_argument("--out", type=page_arg, default=None, help="also write a page there")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="bfloat16: the forward of the bf16 kernels (AVX512-BF16)")
    parser.add_argument("--bias", action="store_true", help="the convs add a bias")
    parser.add_argument("--quick", action="store_true", help="this module against itself, C = 8, one round")
    parser.add_argument("--no-check", action="store_true",
                        help="time builds whose outputs differ on purpose (an attribution patch that skips or "
                             "redirects work): their outputs are not compared, and the page says so")
    args = parser.parse_args()
    if args.quick:
        import pointsparse as ps

        args.builds = args.builds or [ps._core.__file__] * 2
        args.channels, args.kinds, args.passes, args.rounds = 8, ["dense"], ["forward"], 1
        args.out = str(results_path("ab_builds.md", quick=True))
    if len(args.builds) < 2:
        parser.error("give at least two builds")
    for b in args.builds:
        if not Path(b).is_file():
            parser.error(f"build {b!r} is not a file")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    allowed = sorted(os.sched_getaffinity(0))
    if args.threads < 1 or args.threads > len(allowed):
        parser.error(f"--threads must be in [1, {len(allowed)}] (the CPUs this process may use)")
    cpus = [args.cpu] if args.threads == 1 else allowed[:args.threads]
    if args.isa != "auto" and args.isa not in ps_isas():
        parser.error(f"--isa {args.isa} does not run here: {', '.join(ps_isas())}")
    if args.dtype == "bfloat16" and (args.passes != ["forward"] or args.isa != "auto"):
        parser.error("--dtype bfloat16 times the forward of the bf16 kernels alone: no --passes, no --isa")
    if args.dtype == "bfloat16" and not ps_core().conv_bf16():
        parser.error("--dtype bfloat16 needs a CPU with AVX512-BF16")
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"--cpu {args.cpu} is not one this process may run on: {sorted(os.sched_getaffinity(0))}")
    coords, where = kitti_or_street(args.quick)
    torch.set_num_threads(1)
    kinds = [k for k in KINDS if k in args.kinds]
    calls = [(p, k) for p in args.passes for k in kinds]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data, paths, pairs, outputs = case_data(args.channels, coords, kinds, folder)
        if args.bias:
            outputs = with_bias(data, kinds)
        if args.dtype == "bfloat16":
            paths, outputs = bf16_case(data, kinds)
        env = {"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
        children = [subprocess.Popen([sys.executable, "-c", CHILD, str(Path(b).resolve()), str(data),
                                      str(folder / f"b{i}_"), ",".join(map(str, cpus)), args.isa],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
                    for i, b in enumerate(args.builds)]

        def call(i: int, which: str, kind: str) -> float:
            child = children[i]
            child.stdin.write(f"{which} {kind}\n")
            child.stdin.flush()
            line = child.stdout.readline()
            if not line:
                raise RuntimeError(f"build {args.builds[i]} stopped (exit {child.wait()})")
            return float(line)

        try:
            for i in range(len(children)):
                for which, kind in calls:
                    call(i, which, kind)
                    got = np.load(folder / f"b{i}_{which}_{kind}.npy")
                    want = outputs[kind] if which == "forward" else np.load(folder / f"b0_{which}_{kind}.npy")
                    if not args.no_check and not np.array_equal(got, want):
                        raise RuntimeError(f"{args.builds[i]}: {which} of {kind} differs from the baseline's by "
                                           f"{np.abs(got - want).max()}")
            times = {(i, c): [] for i in range(len(children)) for c in calls}
            for r in range(args.rounds):
                order = range(len(children)) if r % 2 == 0 else reversed(range(len(children)))
                for i in order:
                    for c in calls:
                        times[i, c].append(call(i, *c))
        finally:
            for child in children:
                child.stdin.close()
                child.wait()
    med = {key: float(np.median(v)) * 1e3 for key, v in times.items()}
    names = [f"`{Path(b).name}`" for b in args.builds]
    on = f"one thread on CPU {args.cpu}" if args.threads == 1 else f"{args.threads} threads on CPUs {cpus}"
    lines = [f"C = {args.channels}, {where} ({len(coords):,} voxels, {pairs:,} pairs), {on}, kernels: {args.isa if args.dtype == 'float32' else 'bf16'}, medians of {args.rounds} rounds; each cell: ms (time / the first build's)."
             + (" Outputs NOT checked (--no-check): the builds compute different things." if args.no_check else ""),
             "",
             "| pass | pruning (engine path) | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    for which, kind in calls:
        base = med[0, (which, kind)]
        cells = [f"{med[i, (which, kind)]:.2f} ({med[i, (which, kind)] / base:.3f})" for i in range(len(names))]
        path = paths.get((which, kind), paths[kind]) if args.dtype == "float32" else paths[kind]
        lines.append(f"| {which} | {KINDS[kind]} ({path}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        command = "python bench/ab_builds.py " + shlex.join(sys.argv[1:])
        write_markdown(Path(args.out), "Builds in lockstep", command, environment(), [table])
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
